"""The latency side of choosing: measured latency columns, latency budgets met on the ratio
measured end to end, the never-slower check, and the latency part of the report.

``pipeline.choose`` calls ``allocate_rows`` for every budget, and for a latency budget
``measured_latency`` (re-solved on end-to-end timings) or, with ``--latency-check``,
``never_slower``. Layer timings come from the analysis's ``LatencyBook`` (latency.py), made
once by ``latency_book``.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from .allocate import allocate, with_latency, without_rows
from .config import CompressionConfig
from .errors import InfeasibleBudgetError, ShapeError
from .feeds import latency_feeds
from .latency import LatencyBook
from .types import COST_KINDS, Analysis, BudgetLimit, CandidateTable, Progress
from .validate import providers_for, session_threads, validation_inputs

if TYPE_CHECKING:
    from .records import LayerReport, ValidationReport

__all__ = [
    "allocate_rows",
    "check_latency_ratio",
    "end_to_end",
    "latency_book",
    "latency_budget",
    "latency_summary",
    "measured_latency",
    "never_slower",
    "report_latency",
    "timed_tables",
]

log = logging.getLogger(__name__)

#: Builds the model of a choice with the factors that will be written
#: (``layer_factors.choice_model``; speed.py stands beside layer_factors, so the pipeline hands
#: it in).
ChoiceModel = Callable[[Analysis, list[CandidateTable], list[int]], onnx.ModelProto]


def latency_book(
    analysis: Analysis, config: CompressionConfig, progress: Progress | None = None
) -> LatencyBook:
    """The analysis's latency book, made on first use, with the whole model timed once."""
    if analysis.latency is None:
        started = time.perf_counter()
        providers = providers_for(config.device)
        threads = session_threads(config)
        book = LatencyBook(
            analysis.model, analysis.discovery, providers, progress=progress, threads=threads
        )
        reference = analysis.original or analysis.model
        loaded = analysis.loaded
        if loaded is not None and loaded.path is not None:
            with suppress(OSError):  # else the cache keys hash the model's bytes
                book.original = (reference, _file_identity([loaded.path, *loaded.data_files]))
        try:
            feeds = (analysis.validation_inputs or validation_inputs(reference, config))[0]
            book.model_feeds = latency_feeds(reference, feeds)[1]
            analysis.latency_ms = book.model_ms(reference, book.model_feeds)
        except Exception as exc:  # no inputs can be made, or the model does not run in ORT
            if config.latency is not None:
                raise ShapeError(
                    f"--latency times the whole model, which failed ({exc}); give concrete "
                    "input sizes with --input-shape NAME:D1,D2,... or real inputs with --inputs"
                ) from exc
            log.warning("cannot time the whole model (%s); only its layers are timed", exc)
        book.stats.seconds += time.perf_counter() - started
        analysis.latency = book
    return analysis.latency


def _file_identity(paths: list[Path]) -> str:
    """The files' resolved paths, sizes and modification times: the original model's identity
    in the latency cache's keys, instead of the SHA-256 of its bytes, which would cost every
    default run (the never-slower check times the whole model) a serialization and a pass over
    every weight."""
    parts = []
    for path in paths:
        status = os.stat(path)
        parts.append(f"{Path(path).resolve()}:{status.st_size}:{status.st_mtime_ns}")
    return "files:" + "|".join(parts)


def timed_tables(
    analysis: Analysis, tables: list[CandidateTable], config: CompressionConfig
) -> list[CandidateTable]:
    """With a latency budget, every table gets its measured latency column (latency.py), and
    rows measured slower than their dense layer are dropped."""
    if config.latency is None:
        return tables
    book = latency_book(analysis, config)
    started = time.perf_counter()
    measured = book.grid(tables)
    analysis.timings["latency"] = analysis.timings.get("latency", 0.0) + (
        time.perf_counter() - started
    )
    return [
        with_latency(table, measured[table.layer].row_ms) if table.layer in measured else table
        for table in tables
    ]


def allocate_rows(
    analysis: Analysis,
    tables: list[CandidateTable],
    budgets: list[BudgetLimit],
    config: CompressionConfig,
) -> list[int]:
    """``allocate`` on the tables that leave a choice; a table of one row is a fixed cost.

    The budgets exclude every layer (``budget_limits``), so each fixed layer's one row is added to
    their fixed part, and the method spends the rest on the other layers.
    """
    free = [index for index, table in enumerate(tables) if len(table) > 1]
    fixed = [index for index, table in enumerate(tables) if len(table) == 1]
    budgets = [
        replace(
            budget,
            fixed=budget.fixed
            + sum(float(tables[i].costs[0, COST_KINDS.index(budget.kind)]) for i in fixed),
        )
        for budget in budgets
    ]
    try:
        picked = allocate([tables[i] for i in free], budgets, config)
    except InfeasibleBudgetError as exc:
        if not analysis.user_choices:
            raise
        raise InfeasibleBudgetError(
            f"{exc}; the layers excluded or pinned by the user count at their fixed cost",
            exc.smallest_fraction,
        ) from exc
    choices = [0] * len(tables)
    for index, row in zip(free, picked, strict=True):
        choices[index] = row
    return choices


#: Re-solves of a latency budget on the measured end-to-end ratio, and the relative distance
#: to the target at which it stops.
_LATENCY_ROUNDS = 3
_LATENCY_TOLERANCE = 0.03
#: How far (relative) the fastest choice may measure above ``F`` before ``F`` is called
#: unreachable: end-to-end ratios on a loaded machine move by several per cent between calls.
_REACHABLE_TOLERANCE = 0.10


def end_to_end(analysis: Analysis) -> bool:
    """Whether choices can be timed end to end (not for models whose weights stay on disk)."""
    loaded = analysis.loaded
    return bool(analysis.latency and analysis.latency_ms) and not (loaded and loaded.lazy)


def measured_latency(
    analysis: Analysis,
    tables: list[CandidateTable],
    budgets: list[BudgetLimit],
    config: CompressionConfig,
    build: ChoiceModel,
) -> list[int]:
    """Meet a latency budget on the measured end-to-end ratio, not only on the layer sum.

    The layers' times do not add up to the model's (fused activations, layout conversions
    between layers, memory traffic the one-layer models do not have: on EfficientNet-Lite0 the
    sum predicted 0.97 where the model measured 0.73), so choices are timed end to end: the
    original against the model with the chosen layers factorized by the factors that will be
    written (``build``: ``layer_factors.choice_model``, which keeps the factors it makes for the
    later rounds and the final rewrite; ``LatencyBook.choice_ms``: ``latency.measure_choice``,
    cached on disk), interleaved. First the fastest
    choice (every layer's fastest row): its measured ratio ``m_min`` is the smallest reachable
    fraction, and an ``F`` with ``m_min > F·(1 + _REACHABLE_TOLERANCE)`` is an
    ``InfeasibleBudgetError`` naming it.
    Then the layer budget is solved for the predicted fraction ``p'`` that interpolates
    linearly between the nearest measured (predicted, measured) points below and above ``F``
    (at first the fastest choice and ``(1, 1)``, the dense model; regula falsi, so one noisy
    timing cannot send the next guess outside what has been measured), timed, and re-solved
    until ``m`` is within ``_LATENCY_TOLERANCE`` of ``F`` (relative), at most
    ``_LATENCY_ROUNDS`` times. The choice measured nearest ``F`` is kept.
    """
    started = time.perf_counter()
    spent = sum(analysis.timings.values())  # what ``build`` records is not timing
    before = set(analysis.factors)  # factors of earlier points of a sweep stay
    target = config.latency
    fastest = [int(np.argmin(t.costs[:, 2])) for t in tables]
    floor = _predicted(analysis, tables, fastest)
    point = (floor, _measure_end_to_end(analysis, tables, fastest, build))
    # the fastest choice may break another budget (--params, --flops): then it is only a bound
    tried: list[tuple[float, list[int]]] = [(point[1], fastest)] if len(budgets) == 1 else []
    log.info("latency budget %.3g: fastest choice measured %.3f", target, point[1])
    if point[1] > target * (1 + _REACHABLE_TOLERANCE):
        smallest = math.ceil(point[1] * 1000) / 1000
        raise InfeasibleBudgetError(
            f"budget cannot be met: --latency {target:g} is below the smallest reachable "
            f"{smallest:.3f} (every layer at its fastest candidate, measured end to end); raise "
            "the budget, or allow more candidates (higher --max-groups, lower --rank-multiple)",
            {"latency": point[1]},
        )
    points = [point]
    for _ in range(_LATENCY_ROUNDS):
        if tried and abs(tried[-1][0] - target) <= _LATENCY_TOLERANCE * target:
            break
        # regula falsi: interpolate between the nearest measured points on either side of F,
        # (1, 1) (the dense model) and the fastest choice to start with; a noisy timing then
        # cannot throw the next guess outside what has been measured
        below = max((q for q in points if q[1] <= target), key=lambda q: q[1], default=None)
        above = min((q for q in points if q[1] > target), key=lambda q: q[1], default=(1.0, 1.0))
        if below is None or above[1] <= below[1]:
            break  # the fastest choice measured over F (within the reachable tolerance)
        share = (target - below[1]) / (above[1] - below[1])
        wanted = below[0] + share * (above[0] - below[0])
        fraction = min(max(wanted, floor * (1 + 1e-9)), 1.0)
        choices = _allocate_latency(analysis, tables, budgets, fraction, config)
        point = (
            _predicted(analysis, tables, choices),
            _measure_end_to_end(analysis, tables, choices, build),
        )
        points.append(point)
        tried.append((point[1], choices))
        log.info("latency budget %.3g: layer budget %.3g measured %.3f", target, fraction, point[1])
    if not tried:  # another budget refused every latency fraction tried
        raise InfeasibleBudgetError(
            f"budget cannot be met: --latency {target:g} together with the other budgets; "
            "raise one of them",
            {"latency": point[1]},
        )
    best = min(tried, key=lambda item: (abs(item[0] - target), item[0]))
    kept = before | {
        (table.layer, int(table.groups[row]), int(table.ranks[row]))
        for table, row in zip(tables, best[1], strict=True)
    }
    for key in set(analysis.factors) - kept:  # the rounds not kept: their factors go
        del analysis.factors[key]
    built = sum(analysis.timings.values()) - spent
    analysis.timings["latency"] = analysis.timings.get("latency", 0.0) + (
        time.perf_counter() - started - built
    )
    return best[1]


def _allocate_latency(
    analysis: Analysis,
    tables: list[CandidateTable],
    budgets: list[BudgetLimit],
    fraction: float,
    config: CompressionConfig,
) -> list[int]:
    """Allocate with the latency budget (last) at ``fraction``. With other budgets, whose rows
    of least joint share may not fit a low latency fraction, the fraction moves halfway to 1
    until they do (at 1 the latency budget holds the dense model, which every budget allows)."""
    for _ in range(8):
        try:
            latency = replace(budgets[-1], fraction=fraction)
            return allocate_rows(analysis, tables, [*budgets[:-1], latency], config)
        except InfeasibleBudgetError:
            if len(budgets) == 1:
                raise
            fraction = (fraction + 1) / 2
    return allocate_rows(analysis, tables, budgets[:-1], config)


def _measure_end_to_end(
    analysis: Analysis, tables: list[CandidateTable], choices: list[int], build: ChoiceModel
) -> float:
    """Measured latency ratio of the model with ``choices`` (made by ``build``) to the
    original. The timing counts in the book's seconds; ``build`` accounts for its own."""
    book = analysis.latency
    model = build(analysis, tables, choices)
    started = time.perf_counter()
    before, after = book.choice_ms(analysis.original or analysis.model, model)
    book.stats.seconds += time.perf_counter() - started
    return after / before


def _predicted(analysis: Analysis, tables: list[CandidateTable], choices: list[int]) -> float:
    """``(T_model − Σ_ℓ T_ℓ(dense) + Σ_ℓ T_ℓ(x_ℓ)) / T_model`` from the latency column."""
    total = analysis.latency_ms or 1.0
    saved = sum(t.costs[0, 2] - t.costs[row, 2] for t, row in zip(tables, choices, strict=True))
    return 1 - saved / total


def latency_budget(
    analysis: Analysis, tables: list[CandidateTable], fraction: float
) -> BudgetLimit:
    """``Σ_ℓ T_ℓ(x_ℓ) ≤ F·T_model − rest`` with ``rest = T_model − Σ_ℓ T_ℓ(dense)``."""
    total = analysis.latency_ms or 0.0
    book = analysis.latency
    dense = sum(  # row 0 is dense but in the one row of a layer the user pinned
        float(table.costs[0, 2])
        if table.groups[0] == 0 or book is None
        else book.dense_ms(table.layer)
        for table in tables
    )
    return BudgetLimit("latency", fraction, total, total - dense)


#: Candidates of one layer measured slower than dense before the never-slower check times the
#: layer's whole grid (latency.py) instead of dropping one group count's ranks at a time.
_STRIKES = 3


def never_slower(
    analysis: Analysis,
    tables: list[CandidateTable],
    budgets: list[BudgetLimit],
    choices: list[int],
    config: CompressionConfig,
) -> list[int]:
    """Re-solve until no chosen candidate is measured slower than its dense layer.

    Only the chosen candidates are timed (with their dense layers; cached on disk). When a
    layer's chosen ``(g, r)`` is slower, its rows with the same ``g`` and a rank ``≥ r`` are
    dropped (a larger rank of the same shape is not faster, see latency.py); at the
    ``_STRIKES``-th slower candidate of a layer, its grid is timed and every row measured or
    interpolated slower than dense is dropped (and the chosen row itself). Then the budget is
    solved again. Rows are dropped from ``tables`` in place, so ``realize`` and later sweep
    points see the same tables. Every round drops at least one row, so the loop ends. A budget
    that only slower candidates can meet is an ``InfeasibleBudgetError``.
    """
    book = latency_book(analysis, config)
    started = time.perf_counter()
    strikes: dict[str, int] = {}
    while True:
        chosen = {
            table.layer: (int(table.groups[row]), int(table.ranks[row]))
            for table, row in zip(tables, choices, strict=True)
            if table.groups[row] > 0
            and table.layer not in book.unknown
            and table.layer not in analysis.user_choices  # the user's choice stands
        }
        book.items({layer: [item] for layer, item in chosen.items()})
        slow = [
            index
            for index, table in enumerate(tables)
            if table.layer in chosen
            and book.timed[table.layer][chosen[table.layer]] > book.dense_ms(table.layer)
        ]
        if not slow:
            break
        for index in slow:
            table = tables[index]
            strikes[table.layer] = strikes.get(table.layer, 0) + 1
            groups, rank = chosen[table.layer]
            same = table.groups == groups
            if strikes[table.layer] < _STRIKES:
                tables[index] = without_rows(table, same & (table.ranks >= rank))
            else:  # the grid, and the chosen row whatever its interpolated time says
                table = with_latency(table, book.grid([table])[table.layer].row_ms)
                same = table.groups == groups
                tables[index] = without_rows(table, same & (table.ranks == rank))
        try:
            choices = allocate_rows(analysis, tables, budgets, config)
        except InfeasibleBudgetError as exc:
            raise InfeasibleBudgetError(
                f"{exc} (candidates measured slower than their dense layer were dropped; "
                "--no-latency-check allows them)",
                exc.smallest_fraction,
            ) from exc
    analysis.timings["latency"] = analysis.timings.get("latency", 0.0) + (
        time.perf_counter() - started
    )
    return choices


def check_latency_ratio(
    validation: ValidationReport | None, config: CompressionConfig
) -> ValidationReport | None:
    """Add a failure when the compressed model measured more than ``--max-latency-ratio``
    times the original's latency."""
    if validation is None or config.max_latency_ratio is None:
        return validation
    before, after = validation.latency_ms_before, validation.latency_ms_after
    if not before or after is None or after / before <= config.max_latency_ratio:
        return validation
    failure = (
        f"latency {after:.3f} ms is {after / before:.2f}x the original's {before:.3f} ms "
        f"> --max-latency-ratio {config.max_latency_ratio:g}"
    )
    return replace(validation, failures=(*validation.failures, failure))


def latency_summary(
    analysis: Analysis,
    tables: list[CandidateTable],
    choices: list[int],
    validation: ValidationReport | None,
) -> dict[str, Any] | None:
    """Measured latencies for the report: per layer (dense, chosen), the whole model, the
    predicted ratio ``1 − Σ_ℓ (T_ℓ(dense) − T_ℓ(x_ℓ)) / T_model``, the ratio validation
    measured, and what measuring took. None when nothing was timed."""
    book = analysis.latency
    if book is None or not analysis.latency_ms:
        return None
    per_layer: dict[str, tuple[float, float]] = {}
    for table, row in zip(tables, choices, strict=True):
        dense = book.dense_ms(table.layer)
        if dense is None:
            continue
        item = (int(table.groups[row]), int(table.ranks[row]))
        chosen = book.timed[table.layer].get(item)
        if chosen is None:  # an interpolated grid row
            chosen = float(table.costs[row, 2]) if table.costs[row, 2] > 0 else None
        per_layer[table.layer] = (dense, dense if chosen is None else chosen)
    saved = sum(dense - chosen for dense, chosen in per_layer.values())
    measured = None
    if validation is not None and validation.latency_ms_before and validation.latency_ms_after:
        measured = validation.latency_ms_after / validation.latency_ms_before
    return {
        "provider": book.stats.provider,
        "device": book.stats.device,
        "model_ms": analysis.latency_ms,
        "predicted_ratio": 1 - saved / analysis.latency_ms,
        "measured_ratio": measured,
        "seconds": book.stats.seconds,
        "measured": book.stats.measured,
        "cached": book.stats.cached,
        "cache": book.stats.cache,
        "untimed_layers": list(book.unknown),
        "layers": per_layer,
    }


def report_latency(layer: LayerReport, timed: dict[str, tuple[float, float]]) -> LayerReport:
    """``layer`` with its measured dense and chosen latencies (``latency_summary``'s layers)."""
    if layer.name not in timed:
        return layer
    dense, chosen = timed[layer.name]
    return replace(layer, latency_ms_before=dense, latency_ms_after=chosen)
