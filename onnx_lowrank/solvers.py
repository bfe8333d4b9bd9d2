r"""The allocation solvers: each picks one row per candidate table within the budgets.

A ``Problem`` is what ``allocate.allocate`` hands them: the tables, the budget limits and the
cost columns they constrain (allocate.py's docstring gives the model and the "one order for
several budgets" argument).

Methods (``SOLVERS``; ``config.METHODS`` lists the same names):

* ``alds`` (default): exact ``min max_ℓ e_ℓ(x_ℓ)`` over every candidate ``(g, r)``, then the
  leftover budget is spent greedily (``_spend_leftover``).
* ``alds-paper``: the alternating heuristic of Liebenwein, Maalouf et al., "Compressing Neural
  Networks: Towards Determining the Optimal Layer-wise Decomposition", NeurIPS 2021.
* ``alds-error``: exact min-max with the group count fixed (``--groups``).
* ``energy``: exact min-max of the removed Frobenius energy, ``g = 1``.
* ``svd``: the same relative rank in every layer, ``g = 1``.
* ``sum``: ``min Σ_ℓ e_ℓ(x_ℓ)`` (an additive knapsack) by Lagrangian relaxation, then the
  leftover spent (``solve_sum``); meant for additive errors such as ``--error network``.

Every method picks from the same tables, so ``--max-groups`` and ``--rank-multiple`` constrain
them all in the same way, and every method meets the same budgets.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .config import CompressionConfig
from .errors import InfeasibleBudgetError
from .types import BudgetLimit, CandidateTable

__all__ = [
    "SOLVERS",
    "Problem",
    "cheapest",
    "solve_alds",
    "solve_alds_error",
    "solve_alds_paper",
    "solve_energy",
    "solve_sum",
    "solve_svd",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Problem:
    """The allocation problem as solvers see it.

    Attributes:
        tables: one candidate table per layer.
        limits: ``(K,)`` budget per active cost kind.
        columns: the cost-table columns of the active kinds, aligned with ``limits``.
        config: the run's options (fixed groups, seed, ...).
        budgets: the budgets behind ``limits`` (for error messages), in the same order.
    """

    tables: Sequence[CandidateTable]
    limits: np.ndarray
    columns: tuple[int, ...]
    config: CompressionConfig
    budgets: tuple[BudgetLimit, ...] = ()

    def costs(self, layer: int) -> np.ndarray:
        """``(rows, K)`` costs of layer ``layer`` in the active kinds."""
        return self.tables[layer].costs[:, self.columns]

    def shares(self, layer: int) -> np.ndarray:
        """``(rows,)`` budget share ``Σ_k c_k / T_k`` of layer ``layer``'s rows: the order in
        which solvers call a row cheaper (see the module docstring)."""
        costs = self.costs(layer)
        totals = [b.total if b.total > 0 else 1.0 for b in self.budgets]
        if len(totals) != costs.shape[1]:  # a Problem built without its budgets
            totals = [1.0] * costs.shape[1]
        return (costs / np.asarray(totals, dtype=np.float64)).sum(axis=1)

    def total(self, choices: Sequence[int]) -> np.ndarray:
        """``(K,)`` summed cost of one choice per layer."""
        if not self.tables:
            return np.zeros(len(self.columns))
        return sum(self.costs(i)[row] for i, row in enumerate(choices))

    def fits(self, choices: Sequence[int]) -> bool:
        """True when the summed cost of ``choices`` is within every limit."""
        return _within(self.total(choices), self.limits)

    def infeasible(self, floor: Sequence[int], constraint: str = "") -> InfeasibleBudgetError:
        """The error for budgets below the cost of ``floor``, the cheapest allowed choice.

        Args:
            floor: the cheapest choice the method may make.
            constraint: what restricts the method beyond the tables, for the message.
        """
        cost = self.total(floor)
        smallest = {
            _flag(b.kind): (b.fixed + cost[i]) / b.total if b.total else 1.0
            for i, b in enumerate(self.budgets)
        }
        parts = ", ".join(
            f"--{_flag(b.kind)} {b.fraction:g} is below the smallest reachable "
            f"{math.ceil(smallest[_flag(b.kind)] * 1000) / 1000:.3f}"
            for b in self.budgets
            if smallest[_flag(b.kind)] > b.fraction
        )
        where = f" with {constraint}" if constraint else ""
        return InfeasibleBudgetError(
            f"budget cannot be met{where}: {parts}; raise the budget, or allow more candidates "
            "(higher --max-groups, lower --rank-multiple)",
            smallest,
        )


Solver = Callable[[Problem], list[int]]


def _flag(kind: str) -> str:
    return "flops" if kind == "macs" else kind


#: Relative slack on budget limits that absorbs float rounding of sums of large counts.
_SLACK = 1e-12


def _within(total: np.ndarray, limits: np.ndarray) -> bool:
    return bool(np.all(total <= limits + _SLACK * np.abs(limits)))


def solve_alds(problem: Problem) -> list[int]:
    """``alds``: the exact min-max allocation over every ``(g, r)``, then the leftover spent.

    Solves ``min_x max_ℓ e_ℓ(x_ℓ)`` subject to ``Σ_ℓ c_ℓ(x_ℓ) ≤ B`` exactly (``_min_max``) and
    spends what the optimum leaves of the budget by ``_spend_leftover``, which lowers errors
    without raising the maximum. The maximum is therefore the true optimum ``t*``.
    """
    allowed = [np.ones(len(table), dtype=bool) for table in problem.tables]
    values = [table.errors for table in problem.tables]
    choices = _min_max(problem, values, allowed)
    return _spend_leftover(problem, values, allowed, choices)


def solve_alds_error(problem: Problem) -> list[int]:
    """``alds-error``: the exact min-max allocation with the group count fixed.

    Layer ``ℓ`` may take only rows with ``g = g_ℓ``, the largest group count of its table that
    is at most ``--groups`` (``--groups`` itself wherever it divides the input channels; 1 by
    default), or stay dense. Then as ``alds``: exact ``min max_ℓ e_ℓ`` and the leftover spent.
    Its rows are a subset of ``alds``'s, so its maximum error is never below ``alds``'s.
    """
    wanted = problem.config.groups
    allowed = []
    for table in problem.tables:
        options = table.groups[(table.groups > 0) & (table.groups <= wanted)]
        fixed = int(options.max()) if options.size else -1
        allowed.append((table.groups == 0) | (table.groups == fixed))
    values = [table.errors for table in problem.tables]
    floor = cheapest(problem, allowed)
    if not problem.fits(floor):
        raise problem.infeasible(floor, f"--method alds-error --groups {wanted}")
    choices = _min_max(problem, values, allowed)
    return _spend_leftover(problem, values, allowed, choices)


def solve_energy(problem: Problem) -> list[int]:
    """``energy``: equalize the removed Frobenius energy, ``g = 1``.

    With ``E_ℓ(r) = Σ_{i>r} σ_i² / ‖W_ℓ‖_F²`` the share of layer ``ℓ``'s Frobenius energy
    that rank ``r`` removes, solve ``min max_ℓ E_ℓ(r_ℓ)`` over ``g = 1`` rows exactly (the same
    threshold search as ``alds``, on ``E`` instead of ``e``): every layer removes at most the
    same share ``E*``, the smallest share the budget allows. The leftover is then spent on the
    largest reductions of ``Σ_ℓ E_ℓ`` per unit cost, without raising the maximum.
    """
    allowed = [(table.groups == 0) | (table.groups == 1) for table in problem.tables]
    values = [
        np.where(mask, table.energy, np.inf)
        for table, mask in zip(problem.tables, allowed, strict=True)
    ]
    floor = cheapest(problem, allowed)
    if not problem.fits(floor):
        raise problem.infeasible(floor, "--method energy (g = 1)")
    choices = _min_max(problem, values, allowed)
    return _spend_leftover(problem, values, allowed, choices)


def solve_svd(problem: Problem) -> list[int]:
    """``svd``: the same relative rank ``ρ`` in every layer, ``g = 1``.

    Layer ``ℓ`` takes the smallest ``g = 1`` rank ``r ≥ ρ · k_ℓ`` (``k_ℓ = min(f, c·κ)``) that is
    a candidate, or stays dense when none is. Costs grow with ``ρ``, so a binary search over the
    finite set of breakpoints ``r / k_ℓ`` finds the largest ``ρ`` within the budget.
    """
    options = []
    for table in problem.tables:
        rows = np.flatnonzero(table.groups == 1)
        rows = rows[np.argsort(table.ranks[rows], kind="stable")]
        options.append((rows, table.ranks[rows] / table.full_rank))

    def choose(rho: float) -> list[int]:
        choices = []
        for rows, relative in options:
            position = int(np.searchsorted(relative, rho - 1e-12, side="left"))
            choices.append(int(rows[position]) if position < len(rows) else 0)
        return choices

    breakpoints = np.unique(np.concatenate([rel for _, rel in options] + [np.array([0.0, 1.0])]))
    low, high = 0, len(breakpoints) - 1
    if not problem.fits(choose(breakpoints[0])):
        raise problem.infeasible(choose(breakpoints[0]), "--method svd (g = 1)")
    while low < high:  # largest feasible breakpoint
        middle = (low + high + 1) // 2
        if problem.fits(choose(breakpoints[middle])):
            low = middle
        else:
            high = middle - 1
    return choose(breakpoints[low])


#: Seeds of ``alds-paper``: the fixed group counts tried first (nearest candidate per layer),
#: then random group counts, as in the reference implementation (torchprune,
#: ``ALDSErrorIterativeAllocator``: 15 seeds, 4 iterations each).
PAPER_FIXED_SEEDS: tuple[int, ...] = (3, 5, 7, 9)


PAPER_SEEDS = 15


PAPER_ITERATIONS = 4


def solve_alds_paper(problem: Problem) -> list[int]:
    """``alds-paper``: the alternating heuristic of the ALDS paper, with random restarts.

    For each seed assignment of group counts ``g_ℓ`` (first the fixed counts
    ``PAPER_FIXED_SEEDS``, each layer taking its nearest candidate count, larger on ties; then
    random counts drawn with ``numpy.random.default_rng(config.seed)``), alternate
    ``PAPER_ITERATIONS`` times:

    1. *ranks given groups*: ``min max_ℓ e_ℓ(g_ℓ, r_ℓ)`` over the ranks, exactly (the threshold
       search of ``alds`` restricted to rows with ``g = g_ℓ`` or dense);
    2. *groups given per-layer budgets*: each layer keeps its cost ``b_ℓ = c_ℓ(g_ℓ, r_ℓ)`` and
       takes the ``(g, r)`` of least error with ``c_ℓ(g, r) ≤ b_ℓ`` (for each ``g`` the largest
       rank that fits; the current ``g`` wins ties). Dense layers keep their ``g``.

    A seed whose first rank step cannot meet the budget has its group counts halved until it
    can (as the reference does). The seed with the smallest maximum error wins (the earliest on
    ties). Unlike the reference, the groups step rounds ranks down, so it never overshoots a
    layer's budget and each iteration never raises the maximum error. This is a heuristic: its
    maximum error is never below ``alds``'s, which is optimal.
    """
    tables = problem.tables
    values = [table.errors for table in tables]
    options = [np.unique(table.groups[table.groups > 0]) for table in tables]
    rng = np.random.default_rng(problem.config.seed)
    best: list[int] | None = None
    best_error = math.inf
    for seed in range(PAPER_SEEDS):
        if seed < len(PAPER_FIXED_SEEDS):
            groups = [_nearest(opts, PAPER_FIXED_SEEDS[seed]) for opts in options]
        else:
            groups = [int(rng.choice(opts)) if opts.size else 0 for opts in options]
        started = _paper_seed(problem, values, options, groups)
        if started is None:
            log.debug("alds-paper seed %d: no feasible allocation", seed)
            continue
        choices, groups = started
        for _ in range(PAPER_ITERATIONS):
            groups = _paper_groups_step(problem, values, choices, groups)
            improved = _min_max(problem, values, _with_groups(tables, groups))
            if not problem.fits(improved):  # a guard: rounding down keeps every layer's cost
                break
            choices = improved
        error = _max_value(values, choices)
        log.debug("alds-paper seed %d: max error %.6g", seed, error)
        if error < best_error:
            best, best_error = choices, error
    if best is None:
        raise problem.infeasible(cheapest(problem, _with_groups(tables, [1] * len(tables))))
    return best


def _paper_seed(
    problem: Problem, values: list[np.ndarray], options: list[np.ndarray], groups: list[int]
) -> tuple[list[int], list[int]] | None:
    """The first rank step of a seed, halving its group counts until the budget can be met.

    Returns the choice and the group counts it was made with, or None.

    When halving no longer changes them and the budget still cannot be met (``--rank-multiple``
    can make small group counts dearer than large ones), the seed falls back to the group count
    of each layer's cheapest row, which meets every budget ``allocate`` accepts.
    """
    fallback = False
    while True:
        allowed = _with_groups(problem.tables, groups)
        if problem.fits(cheapest(problem, allowed)):
            return _min_max(problem, values, allowed), groups
        halved = [_nearest(opts, max(g // 2, 1)) for opts, g in zip(options, groups, strict=True)]
        if halved != groups:
            groups = halved
        elif not fallback:
            fallback = True
            floor = cheapest(problem, [np.ones(len(t), dtype=bool) for t in problem.tables])
            groups = [int(t.groups[row]) for t, row in zip(problem.tables, floor, strict=True)]
        else:
            return None


def _paper_groups_step(
    problem: Problem, values: list[np.ndarray], choices: list[int], groups: list[int]
) -> list[int]:
    """Each layer's group count of least error within the cost of its current row."""
    updated = []
    for layer, (table, row) in enumerate(zip(problem.tables, choices, strict=True)):
        if table.groups[row] == 0:
            updated.append(groups[layer])
            continue
        costs = problem.costs(layer)
        fits = np.all(costs <= costs[row], axis=1) & (table.groups > 0)
        candidates = np.flatnonzero(fits)
        # least error; ties: the current group count, then the larger group count
        order = np.lexsort(
            (
                -table.groups[candidates],
                table.groups[candidates] != groups[layer],
                values[layer][candidates],
            )
        )
        updated.append(int(table.groups[candidates[order[0]]]))
    return updated


def _nearest(options: np.ndarray, wanted: int) -> int:
    """The candidate group count nearest ``wanted``, the larger on ties (0 when none)."""
    if not options.size:
        return 0
    distance = np.abs(options - wanted)
    return int(options[distance == distance.min()].max())


def _with_groups(tables: Sequence[CandidateTable], groups: Sequence[int]) -> list[np.ndarray]:
    return [
        (table.groups == 0) | (table.groups == g) for table, g in zip(tables, groups, strict=True)
    ]


def _max_value(values: Sequence[np.ndarray], choices: Sequence[int]) -> float:
    return max((float(v[row]) for v, row in zip(values, choices, strict=True)), default=0.0)


def cheapest(problem: Problem, allowed: Sequence[np.ndarray]) -> list[int]:
    """The cheapest allowed row of every layer: least budget share, then the smaller costs."""
    choices = []
    for layer, mask in enumerate(allowed):
        rows = np.flatnonzero(mask)
        costs = problem.costs(layer)[rows]
        if not costs.shape[1]:
            choices.append(0)
            continue
        keys = tuple(costs[:, k] for k in reversed(range(costs.shape[1])))
        order = np.lexsort((*keys, problem.shares(layer)[rows]))
        choices.append(int(rows[order[0]]))
    return choices


class _Staircase:
    """For one layer: the cheapest allowed row whose value is at most a threshold ``t``.

    Rows are sorted by value; a running minimum of the cost over that order gives, for every
    prefix, the cheapest row. Ties in cost keep the earlier row, i.e. the smaller value (then
    the smaller row index).
    """

    def __init__(self, values: np.ndarray, shares: np.ndarray, allowed: np.ndarray):
        rows = np.flatnonzero(allowed & np.isfinite(values))
        order = np.lexsort((rows, values[rows]))
        self.rows = rows[order]
        self.values = values[self.rows]
        key = shares[self.rows]
        earlier = np.concatenate([[np.inf], np.minimum.accumulate(key)[:-1]])
        positions = np.arange(len(key))
        #: position of the cheapest row among the first ``i + 1`` (first on ties)
        self.best = np.maximum.accumulate(np.where(key < earlier, positions, 0))

    def row(self, threshold: float) -> int:
        position = int(np.searchsorted(self.values, threshold, side="right")) - 1
        return int(self.rows[self.best[max(position, 0)]])


def _min_max(
    problem: Problem, values: Sequence[np.ndarray], allowed: Sequence[np.ndarray]
) -> list[int]:
    r"""Exact ``min_x max_ℓ v_ℓ(x_ℓ)`` subject to every budget, over allowed rows.

    For a threshold ``t`` let every layer take its cheapest allowed row with ``v_ℓ(x) ≤ t``, of
    cost ``C_ℓ(t)`` (the same row for params and MACs, see the module docstring; with latency
    and another budget, the row of least budget share, and the search is a heuristic). Any
    choice with maximum ``≤ t`` costs at least ``Σ_ℓ C_ℓ(t)`` in every kind, so ``t`` is
    achievable iff ``Σ_ℓ C_ℓ(t) ≤ B``. ``C_ℓ`` is non-increasing in ``t``, hence so is the sum,
    and the optimum ``t*`` is the smallest feasible value in the finite sorted set of allowed
    row values. A binary search finds it with ``O(L log R)`` work per probe and ``O(log N)``
    probes (``N`` rows in all); sorting costs ``O(N log N)``. The dense row (value 0) is always
    allowed, and the caller has checked that the cheapest allowed rows fit, so ``t*`` exists.

    Returns:
        The choice at ``t*``: every layer's cheapest allowed row with value ``≤ t*`` (ties: the
        smaller value). Its maximum is exactly ``t*``.
    """
    stairs = [
        _Staircase(v, problem.shares(layer), mask)
        for layer, (v, mask) in enumerate(zip(values, allowed, strict=True))
    ]
    thresholds = np.unique(np.concatenate([s.values for s in stairs] + [np.zeros(1)]))

    def choose(threshold: float) -> list[int]:
        return [stair.row(threshold) for stair in stairs]

    low, high = 0, len(thresholds) - 1  # thresholds[high] allows every row: the cheapest
    while low < high:
        middle = (low + high) // 2
        if problem.fits(choose(thresholds[middle])):
            high = middle
        else:
            low = middle + 1
    return choose(thresholds[low])


def _spend_leftover(
    problem: Problem,
    values: Sequence[np.ndarray],
    allowed: Sequence[np.ndarray],
    choices: list[int],
) -> list[int]:
    r"""Spend the budget left after the min-max optimum, never raising any layer's value.

    Greedy on ``Σ_ℓ v_ℓ``: while some move fits, take the one of best value per cost. A move
    replaces the current row ``x_ℓ`` of one layer by an allowed row ``y`` with a *lower* value
    whose extra cost fits what is left in every budget, ``c_ℓ(y) − c_ℓ(x_ℓ) ≤ B − Σ c``. Its
    rate is

        ``(v_ℓ(x_ℓ) − v_ℓ(y)) / max_k ((c_{ℓ,k}(y) − c_{ℓ,k}(x_ℓ)) / B_k)``,

    the value removed per share of the tightest budget (infinite for moves that cost nothing).
    The best rate wins; ties go to the larger reduction, then the earlier layer, then the earlier
    row. Each move strictly lowers one layer's value, so every value stays at or below where
    the min-max left it (the maximum ``t*`` cannot fall either: ``t*`` is optimal), the budget
    still holds, and the loop ends after finitely many moves. The moves include jumps over
    several ranks or to another group count, so a layer reaches the lower convex hull of its
    (cost, value) rows instead of stalling where the next single rank step costs too much.
    """
    choices = list(choices)
    scale = np.maximum(np.abs(problem.limits), 1.0)
    costs = [problem.costs(layer) for layer in range(len(problem.tables))]
    while True:
        leftover = problem.limits - problem.total(choices)
        best: tuple[float, float, int, int] | None = None  # (rate, gain, -layer, -row)
        for layer, (v, mask) in enumerate(zip(values, allowed, strict=True)):
            row = choices[layer]
            extra = costs[layer] - costs[layer][row]
            slack = _SLACK * np.abs(problem.limits)
            movable = mask & (v < v[row]) & np.all(extra <= leftover + slack, axis=1)
            candidates = np.flatnonzero(movable)
            if not candidates.size:
                continue
            gain = v[row] - v[candidates]
            share = np.max(extra[candidates] / scale, axis=1)
            with np.errstate(divide="ignore"):
                rate = np.where(share > 0, gain / np.where(share > 0, share, 1.0), np.inf)
            order = np.lexsort((candidates, -gain, -rate))
            pick = order[0]
            key = (float(rate[pick]), float(gain[pick]), -layer, -int(candidates[pick]))
            if best is None or key > best:
                best = key
        if best is None:
            return choices
        choices[-best[2]] = -best[3]


def solve_sum(problem: Problem) -> list[int]:
    r"""``sum``: ``min Σ_ℓ e_ℓ(x_ℓ)`` within the budgets, by Lagrangian relaxation.

    With the price ``λ ≥ 0`` on the cost ``w_ℓ(x) = Σ_k c_{ℓ,k}(x) / B_k`` (each budget's
    share), every layer independently takes ``argmin_x e_ℓ(x) + λ·w_ℓ(x)`` (the cheaper row on
    ties). The cost of that choice does not rise as ``λ`` grows, so a bisection on ``log λ``
    finds the smallest price whose choice fits. Each such choice is optimal for the budget it
    spends (it lies on the lower convex hull of the layers' (cost, error) rows); the leftover
    is then spent by ``_spend_leftover`` on the same sum. That is within the duality gap of the
    exact knapsack optimum (at most one layer's range of errors); the min-max solution
    (``solve_alds``) replaces it when its sum is lower, so ``sum`` never does worse on the sum.
    """
    tables = problem.tables
    scale = np.maximum(np.abs(problem.limits), 1.0)
    weights = [np.sum(problem.costs(i) / scale, axis=1) for i in range(len(tables))]
    values = [table.errors for table in tables]

    def choose(price: float) -> list[int]:
        picks = []
        for v, w in zip(values, weights, strict=True):
            objective = v + price * w
            best = np.flatnonzero(objective <= objective.min() + 1e-15 * (1 + abs(objective.min())))
            picks.append(int(best[np.argmin(w[best])]))
        return picks

    low, high = -30.0, 30.0  # log10 of the price; 1e30 takes every layer's cheapest row
    if problem.fits(choose(0.0)):
        choices = choose(0.0)
    else:
        for _ in range(100):
            middle = (low + high) / 2
            if problem.fits(choose(10.0**middle)):
                high = middle
            else:
                low = middle
        choices = choose(10.0**high)
    if not problem.fits(choices):  # ties at the top price: fall back to the cheapest rows
        choices = cheapest(problem, [np.ones(len(t), dtype=bool) for t in tables])
    allowed = [np.ones(len(table), dtype=bool) for table in tables]
    choices = _spend_leftover(problem, values, allowed, choices)
    # the duality gap can leave the sum above that of the min-max: keep the better of the two
    other = solve_alds(problem)
    return other if _sum_value(values, other) < _sum_value(values, choices) else choices


def _sum_value(values: Sequence[np.ndarray], choices: Sequence[int]) -> float:
    return float(sum(v[row] for v, row in zip(values, choices, strict=True)))


#: Allocation methods by name; ``config.METHODS`` lists the same names in the same order.
SOLVERS: dict[str, Solver] = {
    "alds": solve_alds,
    "alds-paper": solve_alds_paper,
    "alds-error": solve_alds_error,
    "energy": solve_energy,
    "svd": solve_svd,
    "sum": solve_sum,
}
