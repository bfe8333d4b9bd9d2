"""Interleaved timing of zero-argument runners, and the rank grids of latency tables.

``time_sessions`` runs several runners in rounds (one run of each per round, the order rotating)
and stops at a budget, or once the spread says the medians are known (``settled``): what
latency.py times layers, whole models and end-to-end choices with. ``grid_ranks`` and
``interpolate`` pick the ranks of a layer that are timed and fill in the others.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["grid_ranks", "interpolate", "settled", "time_sessions"]


def grid_ranks(ranks: Sequence[int], points: int) -> list[int]:
    """``points`` ranks spread evenly over the sorted ``ranks`` (first and last included)."""
    ordered = sorted(set(int(r) for r in ranks))
    if len(ordered) <= points:
        return ordered
    positions = np.unique(np.round(np.linspace(0, len(ordered) - 1, points)).astype(int))
    return [ordered[p] for p in positions]


def interpolate(timed: Mapping[int, float], ranks: Sequence[int]) -> np.ndarray:
    """Time of every rank in ``ranks`` from the timed ones, monotone in the rank.

    The timed values, in rank order, are replaced by their running maximum; ranks between two
    timed ranks get the linear interpolation, ranks outside the timed range the nearest end.
    """
    known = sorted(timed)
    values = np.maximum.accumulate(np.asarray([timed[r] for r in known], dtype=np.float64))
    return np.interp(np.asarray(ranks, dtype=np.float64), np.asarray(known, float), values)


def time_sessions(
    runners: Sequence[Callable[[], Any]],
    *,
    min_rounds: int,
    max_rounds: int,
    budget_s: float,
    warmup: int,
    precision: float | None = None,
    settle_after: int = 0,
) -> list[float]:
    """Median ms of each runner, timed interleaved after ``warmup`` runs each.

    Every round runs each runner once, starting one further along each round, so no runner
    always follows the same one. At least ``min_rounds`` and at most ``max_rounds`` rounds run;
    no new round starts once the timed runs took ``budget_s``, nor, with ``precision`` and
    after ``settle_after`` rounds, once every runner's time relative to the first runner's is
    known that well (``settled``, checked every fourth round).
    """
    max_rounds = max(max_rounds, min_rounds)
    for runner in runners:
        for _ in range(warmup):
            runner()
    times: list[list[float]] = [[] for _ in runners]
    spent = 0.0
    count = len(runners)
    for round_index in range(max_rounds):
        if round_index >= min_rounds and (
            spent >= budget_s
            or (
                precision is not None
                and round_index >= settle_after
                and round_index % 4 == 0  # the check costs more than a run of a small layer
                and settled(times, precision)
            )
        ):
            break
        for step in range(count):
            which = (round_index + step) % count
            started = time.perf_counter()
            runners[which]()
            elapsed = time.perf_counter() - started
            times[which].append(elapsed * 1000)
            spent += elapsed
    return [statistics.median(values) for values in times]


def settled(times: Sequence[Sequence[float]], precision: float) -> bool:
    """Whether every runner's per-round ratio to the first runner (with one runner, its times)
    has a median known to ``precision`` (relative): the half-width of the median's notch,
    ``1.57·IQR/√n``, at most ``precision`` times the median. On a busy machine the ratios
    spread, and timing goes on to its budget."""
    rounds = len(times[0])
    if rounds < 4:
        return False
    values = np.asarray(times, dtype=np.float64)  # (runners, rounds)
    ratios = values[1:] / values[0] if len(values) > 1 else values
    low, median, high = np.quantile(ratios, [0.25, 0.5, 0.75], axis=1)
    return bool(np.all(1.57 * (high - low) / math.sqrt(rounds) <= precision * median))
