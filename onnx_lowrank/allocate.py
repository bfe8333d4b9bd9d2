r"""Global allocation: one candidate (dense, or groups g and rank r) per layer under a budget.

Every solver sees the same problem: for each layer ``ℓ`` a finite ``CandidateTable`` of rows
``x``, each with an error ``e_ℓ(x)`` (in the configured measure, ``--error``) and a cost vector
``c_ℓ(x)`` (parameters, MACs); row 0 is the dense layer (error 0, original cost). A budget is a
limit ``B_k`` per budgeted cost kind ``k``, and a choice ``x_ℓ`` per layer is feasible when
``Σ_ℓ c_{ℓ,k}(x_ℓ) ≤ B_k`` for every ``k``. A solver returns one row index per layer. Solvers see
only the tables (no models, no device arrays), so any error measure that fills ``errors`` (the
spectral bounds, or calibration-aware ones) works with every solver.

**One order for several budgets.** Where several budgets are active, "cheapest" means the least
*budget share* ``Σ_k c_{ℓ,k}(x) / T_k`` (``T_k`` the whole model's count of kind ``k``). Within
one layer, every row's MACs are its parameters times the same ``P_ℓ ≥ 0`` (cost.py), so the row
of least share is the row cheapest in parameters and in MACs at once, and "cheapest row with
error ≤ t" is one row whether one budget or both are active. This is what makes the min-max
solver below exact for both at once. Measured latency (latency.py; the third cost column)
orders a layer's rows differently; alone it is exact like any single budget, while together
with ``params`` or ``macs`` the feasibility of a threshold is a multi-dimensional knapsack
question, and the search below, which walks the least-share rows, is a heuristic that always
meets every budget but may miss the optimum.

The solvers are in solvers.py.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from .config import CompressionConfig
from .cost import candidate_params
from .solvers import SOLVERS, Problem, cheapest
from .spectra import error_table, group_counts
from .types import COST_KINDS, BudgetLimit, CandidateTable, Layer, LayerSpectrum

__all__ = [
    "allocate",
    "build_table",
    "with_block",
    "with_latency",
    "without_rows",
]

log = logging.getLogger(__name__)


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
    dense_positions, lookups = layer.mac_positions() or (0, 0)
    groups, ranks, errors, energy = [0], [0], [0.0], [0.0]
    g1 = spectrum.singular_values[1][0]
    tail_energy = np.concatenate([np.cumsum((g1 * g1)[::-1])[::-1], [0.0]])
    fro = spectrum.frobenius_sq or 1.0
    for g in group_counts(layer, max_groups):
        if g not in spectrum.singular_values:
            raise ValueError(
                f"no spectra for {g} groups of {layer.name}: analyze with the same or a larger "
                "max_groups than the candidate tables"
            )
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
    # MACs: params·P per Conv/Gemm/MatMul use, r·d per id looked up (a dense lookup: none)
    macs = params * dense_positions + np.where(groups_a == 0, 0, ranks_a * cols) * lookups
    costs = np.stack([params, macs, 0 * params], axis=1).astype(np.float64)  # latency: unmeasured
    return CandidateTable(
        layer=layer.name,
        groups=groups_a,
        ranks=ranks_a,
        errors=np.asarray(errors),
        costs=costs,
        energy=np.asarray(energy),
        full_rank=min(f, cols),
    )


def with_latency(
    table: CandidateTable, row_ms: np.ndarray, *, drop_slower: bool = True
) -> CandidateTable:
    """The table with its latency column set to ``row_ms`` (ms per row, row 0 dense).

    With ``drop_slower``, rows measured slower than the dense layer are dropped: they are never
    offered to a solver (DESIGN.md §8).
    """
    costs = table.costs.copy()
    costs[:, COST_KINDS.index("latency")] = row_ms
    keep = np.ones(len(table), dtype=bool)
    if drop_slower:
        keep = (table.groups == 0) | (row_ms <= row_ms[0])
    return without_rows(replace(table, costs=costs), ~keep)


def with_block(table: CandidateTable, layer: Layer, block: int) -> CandidateTable:
    """``--rank-multiple auto``: the Conv candidates whose shapes the runtime's blocked kernels
    take, when the layer has any.

    A Conv candidate is kept when its first, grouped conv has input and output channels per group
    that are multiples of ``block`` (``c/g`` and ``r``; for ``g = 1`` only ``r``, since ONNX
    Runtime's NCHWc path converts an unaligned input once but needs the output aligned), so
    neither conv of the pair leaves the blocked layout (docs/performance.md). A layer with no such
    candidate keeps its table, and other ops are unchanged.
    """
    if layer.op_type != "Conv" or block <= 1:
        return table
    width = np.where(table.groups > 0, layer.in_channels // np.maximum(table.groups, 1), 0)
    aligned = (table.ranks % block == 0) & ((table.groups == 1) | (width % block == 0))
    if not np.any(aligned & (table.groups > 0)):
        return table
    return without_rows(table, ~aligned)


def without_rows(table: CandidateTable, drop: np.ndarray) -> CandidateTable:
    """The table without the rows where ``drop`` holds (the dense row is always kept)."""
    keep = ~np.asarray(drop, dtype=bool) | (table.groups == 0)
    if keep.all():
        return table
    return replace(
        table,
        groups=table.groups[keep],
        ranks=table.ranks[keep],
        errors=table.errors[keep],
        costs=table.costs[keep],
        energy=table.energy[keep],
    )


def allocate(
    tables: Sequence[CandidateTable], budgets: Sequence[BudgetLimit], config: CompressionConfig
) -> list[int]:
    """Choose one row per table with the configured method, within every budget.

    Raises:
        InfeasibleBudgetError: even the cheapest rows the method may choose exceed a budget. The
            error names the smallest fraction that can be reached.
    """
    columns = tuple(COST_KINDS.index(b.kind) for b in budgets)
    limits = np.asarray([b.limit for b in budgets], dtype=np.float64)
    problem = Problem(
        tables=tables, limits=limits, columns=columns, config=config, budgets=tuple(budgets)
    )
    floor = cheapest(problem, [np.ones(len(table), dtype=bool) for table in tables])
    if not problem.fits(floor):
        raise problem.infeasible(floor)
    choices = SOLVERS[config.method](problem)
    if not problem.fits(choices):  # every solver guarantees this; a failure is a bug
        raise AssertionError(f"solver {config.method} exceeded the budget")
    return choices
