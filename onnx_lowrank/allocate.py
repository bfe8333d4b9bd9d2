"""Global allocation: one candidate (dense, or groups g and rank r) per layer under a budget.

Every solver sees the same problem: for each layer a finite ``CandidateTable`` of rows, each with
an error and a cost vector (parameters, MACs), row 0 being the dense layer (error 0, original
cost); and a limit per budgeted cost kind, which the sum of the chosen rows' costs must not
exceed. A solver returns one row index per layer. Solvers never see models or device arrays.

Within one layer, every row's MACs are its parameters times the same ``P`` (cost.py), so the
cheapest row in parameters is also the cheapest in MACs: both budgets order a layer's rows the
same way.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .config import CompressionConfig
from .cost import candidate_params
from .discover import Layer
from .errors import InfeasibleBudgetError
from .spectra import LayerSpectrum, error_table, group_counts

__all__ = [
    "COST_KINDS",
    "SOLVERS",
    "BudgetLimit",
    "CandidateTable",
    "Problem",
    "allocate",
    "build_table",
    "solve_svd",
]

log = logging.getLogger(__name__)

#: Cost columns of every candidate table, in order.
COST_KINDS: tuple[str, ...] = ("params", "macs")


@dataclass(frozen=True)
class CandidateTable:
    """The candidates of one layer. Row 0 is the dense layer.

    Attributes:
        layer: layer name.
        groups: group count per row (0 for the dense row).
        ranks: rank per row (0 for the dense row).
        errors: relative layer error per row, in the configured measure.
        costs: ``(rows, 2)`` parameters and MACs per row (MACs 0 when unknown).
        energy: removed Frobenius energy ``Σ_{i>r} σ_i² / ‖W‖_F²`` of ``g = 1`` rows (NaN for
            others, 0 for the dense row).
        full_rank: ``min(f, c·κ)``, the ``g = 1`` rank that reproduces ``W``.
    """

    layer: str
    groups: np.ndarray
    ranks: np.ndarray
    errors: np.ndarray
    costs: np.ndarray
    energy: np.ndarray
    full_rank: int

    def __len__(self) -> int:
        return len(self.groups)


@dataclass(frozen=True)
class BudgetLimit:
    """A whole-model budget on one cost kind.

    Attributes:
        kind: ``"params"`` or ``"macs"``.
        fraction: fraction of the whole model's count to keep.
        total: the whole model's count.
        fixed: the part of ``total`` outside the compressible layers' weights (biases, skipped
            layers, other constants), which no allocation changes.
    """

    kind: str
    fraction: float
    total: float
    fixed: float

    @property
    def limit(self) -> float:
        """What the compressible layers may cost together."""
        return self.fraction * self.total - self.fixed


@dataclass(frozen=True)
class Problem:
    """The allocation problem as solvers see it.

    Attributes:
        tables: one candidate table per layer.
        limits: ``(K,)`` budget per active cost kind.
        columns: the cost-table columns of the active kinds, aligned with ``limits``.
        config: the run's options (fixed groups, seed, ...).
    """

    tables: Sequence[CandidateTable]
    limits: np.ndarray
    columns: tuple[int, ...]
    config: CompressionConfig

    def costs(self, layer: int) -> np.ndarray:
        """``(rows, K)`` costs of layer ``layer`` in the active kinds."""
        return self.tables[layer].costs[:, self.columns]

    def total(self, choices: Sequence[int]) -> np.ndarray:
        """``(K,)`` summed cost of one choice per layer."""
        if not self.tables:
            return np.zeros(len(self.columns))
        return sum(self.costs(i)[row] for i, row in enumerate(choices))

    def fits(self, choices: Sequence[int]) -> bool:
        return bool(np.all(self.total(choices) <= self.limits * (1 + 1e-12)))


Solver = Callable[[Problem], list[int]]


def build_table(
    layer: Layer,
    spectrum: LayerSpectrum,
    measure: str,
    max_groups: int,
    rank_multiple: int = 1,
) -> CandidateTable:
    """All candidates of ``layer`` that cost less than the dense layer.

    A candidate ``(g, r)`` is kept when ``g`` divides the input channels (up to ``max_groups``),
    ``g·r`` is a multiple of ``rank_multiple``, and ``params(g, r) < f·c·κ``.
    """
    f, cols = layer.out_channels, layer.cols
    positions = layer.output_positions or 0
    groups, ranks, errors, energy = [0], [0], [0.0], [0.0]
    g1 = spectrum.singular_values[1][0]
    tail_energy = np.concatenate([np.cumsum((g1 * g1)[::-1])[::-1], [0.0]])
    fro = spectrum.frobenius_sq or 1.0
    for g in group_counts(layer, max_groups):
        table = error_table(spectrum, g, measure)
        for rank in range(1, len(table)):
            if (g * rank) % rank_multiple:
                continue
            if candidate_params(f, cols, g, rank) >= layer.params:
                break
            groups.append(g)
            ranks.append(rank)
            errors.append(float(table[rank]))
            energy.append(float(tail_energy[rank] / fro) if g == 1 else math.nan)
    groups_a = np.asarray(groups, dtype=np.int64)
    ranks_a = np.asarray(ranks, dtype=np.int64)
    params = np.where(groups_a == 0, layer.params, ranks_a * (groups_a * f + cols))
    costs = np.stack([params, params * positions], axis=1).astype(np.float64)
    return CandidateTable(
        layer=layer.name,
        groups=groups_a,
        ranks=ranks_a,
        errors=np.asarray(errors),
        costs=costs,
        energy=np.asarray(energy),
        full_rank=min(f, cols),
    )


def allocate(
    tables: Sequence[CandidateTable], budgets: Sequence[BudgetLimit], config: CompressionConfig
) -> list[int]:
    """Choose one row per table with the configured method, within every budget.

    Raises:
        InfeasibleBudgetError: even the cheapest row of every layer exceeds a budget. The error
            names the smallest fraction that can be reached.
    """
    columns = tuple(COST_KINDS.index(b.kind) for b in budgets)
    limits = np.asarray([b.limit for b in budgets], dtype=np.float64)
    problem = Problem(tables=tables, limits=limits, columns=columns, config=config)
    cheapest = [int(np.argmin(problem.costs(i)[:, 0])) for i in range(len(tables))]
    if not problem.fits(cheapest):
        floor = problem.total(cheapest)
        smallest = {b.kind: (b.fixed + floor[i]) / b.total for i, b in enumerate(budgets)}
        parts = ", ".join(
            f"--{_flag(b.kind)} {b.fraction:g} is below the smallest reachable "
            f"{math.ceil(smallest[b.kind] * 1000) / 1000:.3f}"
            for b in budgets
            if smallest[b.kind] > b.fraction
        )
        raise InfeasibleBudgetError(
            f"budget cannot be met: {parts}; raise the budget, or allow more candidates "
            "(higher --max-groups, lower --rank-multiple)",
            smallest,
        )
    choices = SOLVERS[config.method](problem)
    if not problem.fits(choices):  # every solver guarantees this; a failure is a bug
        raise AssertionError(f"solver {config.method} exceeded the budget")
    return choices


def _flag(kind: str) -> str:
    return "flops" if kind == "macs" else kind


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
        return _cheapest(problem)
    while low < high:  # largest feasible breakpoint
        middle = (low + high + 1) // 2
        if problem.fits(choose(breakpoints[middle])):
            low = middle
        else:
            high = middle - 1
    return choose(breakpoints[low])


def _cheapest(problem: Problem) -> list[int]:
    return [int(np.argmin(problem.costs(i)[:, 0])) for i in range(len(problem.tables))]


#: Allocation methods by name; ``config.METHODS`` lists the same names.
SOLVERS: dict[str, Solver] = {
    "svd": solve_svd,
}
