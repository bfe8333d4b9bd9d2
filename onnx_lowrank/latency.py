r"""Measured latency of every candidate: the third cost column of the candidate tables.

Parameters and MACs do not predict speed on a real runtime (docs/performance.md), so the
allocator can budget what users pay: the latency of each layer, measured on the execution
provider the model will run on (DESIGN.md §8).

**What is timed.** For one use of a layer: the dense node alone in a one-node model (random
weights, the node's real input shape, a dynamic batch taken as 1) and, per candidate ``(g, r)``,
that model rewritten by ``rewrite.rewrite`` with random factors.

Every session comes from ``sessions.make_session`` (validation's options). Sessions run
interleaved, ``BATCH`` at a time with the dense layer in every batch, after ``WARMUP`` runs each,
inputs bound once (rounds stop early once the spread is small, ``timing.settled``); a session's
cost is the median of its rounds, rescaled by the dense layer's median (load cancels out).

**Which candidates.** Per group count the smallest rank is timed first (a group count whose
smallest rank is not faster than dense is dropped), then ``GRID_POINTS`` ranks of ``g = 1`` and
``GROUPED_GRID_POINTS`` of ``g > 1``; other ranks get the linear interpolation of the timed ones,
made non-decreasing in ``r``. ``measure_model`` times the whole original model, so a latency
budget ``F`` is ``Σ_ℓ T_ℓ(x_ℓ) ≤ F·T_model − (T_model − Σ_ℓ T_ℓ(dense))``. Every timing is cached
on disk (``device.cache_dir()``), written atomically: one JSON file per layer signature
(provider, runtime version and session options, device model, op, attributes, shapes, element
type), and through a ``LatencyBook`` one per whole model and one per choice timed end to end
(the same context, the SHA-256 of the models' and the inputs' bytes), so a second run times
nothing. docs/performance.md ("Measured latency") has the details and the measurements.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .device import cache_dir, device_name
from .errors import OutputPathError
from .records import LayerLatency, TimingStats
from .rewrite import rewrite
from .save import write_file
from .sessions import make_session, runtime, session_settings
from .timing import grid_ranks, interpolate, settled, time_sessions
from .types import Discovery, Factors, Layer, Progress
from .walk import graph_at

__all__ = [
    "GRID_POINTS",
    "GROUPED_GRID_POINTS",
    "LatencyBook",
    "LatencyCache",
    "grid_ranks",
    "interpolate",
    "measure_choice",
    "measure_layers",
    "measure_model",
    "settled",
    "time_sessions",
]

log = logging.getLogger(__name__)

#: Timed ranks of ``g = 1`` (the rest are interpolated).
GRID_POINTS = 6
#: Timed ranks of every other group count.
GROUPED_GRID_POINTS = 3
#: Rounds of the interleaved timing of one layer's sessions.
MIN_ROUNDS = 5
MAX_ROUNDS = 25
#: Seconds of timed runs per layer after which no round beyond ``MIN_ROUNDS`` starts.
LAYER_BUDGET_S = 0.25
#: Most rounds, and seconds after which no new round starts, of an end-to-end timing
#: (``measure_choice``): a small model gets many pairs, a large one at least ``MIN_ROUNDS``.
CHOICE_ROUNDS = 200
CHOICE_BUDGET_S = 1.0
#: Fewer rounds when the spread is small (``timing.settled``): an end-to-end timing stops after
#: ``CHOICE_MIN_ROUNDS`` once the ratio's median is known to ``CHOICE_PRECISION``, a layer's
#: batch after ``MIN_ROUNDS`` once every candidate's ratio to dense is known to
#: ``LAYER_PRECISION`` (docs/performance.md, "What timing costs").
CHOICE_MIN_ROUNDS = 100
CHOICE_PRECISION = 0.01
LAYER_PRECISION = 0.02
#: Warm-up runs per session before timing.
WARMUP = 2
#: Version of the cache files' layout; part of every key.
_CACHE_FORMAT = 1


class LatencyCache:
    """Timings on disk, one JSON file per layer signature (see the module docstring)."""

    def __init__(self, folder: Path | None = None):
        self.folder = folder or cache_dir()

    def _path(self, key: Mapping[str, Any]) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:40]
        return self.folder / f"{digest}.json"

    def read(self, key: Mapping[str, Any]) -> dict[str, float]:
        """Timings stored under ``key``: ``"dense"`` and ``"g,r"`` -> ms ({} when none)."""
        path = self._path(key)
        if not path.exists():
            return {}
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("key") != json.loads(json.dumps(key)):
                raise ValueError("the file holds another key")
            times = {str(name): float(ms) for name, ms in data["times"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("ignoring unreadable latency cache file %s (%s)", path, exc)
            return {}
        return {name: ms for name, ms in times.items() if math.isfinite(ms) and ms >= 0}

    def write(self, key: Mapping[str, Any], times: Mapping[str, float]) -> None:
        """Merge ``times`` into the file of ``key``, atomically. A cache that cannot be
        written costs a warning, not the run."""
        merged = {**self.read(key), **times}
        text = json.dumps({"key": key, "times": merged}, sort_keys=True).encode("utf-8")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            write_file(self._path(key), lambda stream: stream.write(text), "latency cache file")
        except (OSError, OutputPathError) as exc:
            log.warning("cannot write the latency cache in %s (%s)", self.folder, exc)


def measure_model(
    model: onnx.ModelProto | str | os.PathLike,
    feeds: Mapping[str, np.ndarray],
    providers: Sequence[str],
    *,
    rounds: int | None = None,
    budget_s: float | None = None,
    threads: int | None = None,
) -> float:
    """Median ms of the whole model on ``feeds`` (cached by ``LatencyBook.model_ms``)."""
    session = make_session(model, providers, threads)
    runner = _BoundRunner(session, feeds)
    rounds = 2 * MAX_ROUNDS if rounds is None else rounds
    budget_s = 4 * LAYER_BUDGET_S if budget_s is None else budget_s
    return time_sessions(
        [runner], min_rounds=MIN_ROUNDS, max_rounds=rounds, budget_s=budget_s, warmup=WARMUP
    )[0]


class LatencyBook:
    """Timings of one model's layers on one execution provider, from the cache or measured.

    Sessions get ``threads`` intra-op threads (``validate.session_threads``: the validation's
    count), and the count is part of every cache key. ``grid`` times what a latency budget needs
    (every table's grid, see the module docstring); ``items`` times only given candidates (what
    the never-slower check needs). Both keep what they timed, summed over every node that reads
    a layer's weight, in ``timed``.

    Attributes:
        stats: what measuring took.
        timed: layer name -> ``(g, r)`` -> ms (``(0, 0)`` is the dense layer).
        unknown: layers that cannot be timed (unknown input shape, embedding tables).
    """

    def __init__(
        self,
        model: onnx.ModelProto,
        discovery: Discovery,
        providers: Sequence[str],
        *,
        cache: LatencyCache | None = None,
        progress: Progress | None = None,
        threads: int | None = None,
    ):
        self.model, self.discovery, self.providers = model, discovery, list(providers)
        self.threads = threads
        self.cache = cache or LatencyCache()
        self.progress = progress
        provider = str(self.providers[0])
        device = device_name(provider)
        self.stats = TimingStats(provider=provider, device=device, cache=str(self.cache.folder))
        self.context = {
            "format": _CACHE_FORMAT,
            "provider": provider,
            "device": device,
            "session": session_settings(threads),
        }
        self.opsets = {entry.domain or "": entry.version for entry in model.opset_import}
        self.timed: dict[str, dict[tuple[int, int], float]] = {}
        self._uses: dict[str, list[_Use] | None] = {}
        for layer in discovery.layers:
            uses = [_Use.of(model, discovery, view) for view in layer.uses()]
            self._uses[layer.name] = None if None in uses else uses  # type: ignore[assignment]
        self.unknown = [name for name, uses in self._uses.items() if uses is None]
        self.stats.unknown = list(self.unknown)
        #: the inputs the whole model is timed on (set by whoever times it)
        self.model_feeds: dict[str, np.ndarray] = {}
        #: the original model and its identity in cache keys (``_digest`` unless set)
        self.original: tuple[onnx.ModelProto, str] | None = None

    def model_ms(self, model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> float:
        """The whole model's median ms on ``feeds`` (``measure_model``); cached, keyed by the
        model's and the inputs' bytes."""
        key = {**self.context, "kind": "model", "model": self._digest(model)}
        return self._stored(
            {**key, "feeds": _feeds_digest(feeds)},
            lambda: {"model": measure_model(model, feeds, self.providers, threads=self.threads)},
        )["model"]

    def choice_ms(self, original: onnx.ModelProto, choice: onnx.ModelProto) -> tuple[float, float]:
        """``measure_choice`` of the two models on ``model_feeds``; cached, keyed by both
        models' and the inputs' bytes."""
        key = {**self.context, "kind": "choice", "original": self._digest(original)}
        key |= {"choice": _digest(choice), "feeds": _feeds_digest(self.model_feeds)}

        def measure() -> dict[str, float]:
            times = measure_choice(original, choice, self.model_feeds, self.providers, self.threads)
            return dict(zip(("before", "after"), times, strict=True))

        stored = self._stored(key, measure)
        return stored["before"], stored["after"]

    def _stored(self, key: dict[str, Any], measure: Callable[[], dict[str, float]]) -> dict:
        """The timings under ``key`` from the cache, else ``measure()``'s (then cached)."""
        stored = self.cache.read(key)
        if stored:
            self.stats.cached += 1
            return stored
        stored = measure()
        self.stats.measured += 1
        self.cache.write(key, stored)
        return stored

    def _digest(self, model: onnx.ModelProto) -> str:
        """The original model's identity: ``original`` (computed once)."""
        if self.original is None or self.original[0] is not model:
            self.original = (model, _digest(model))
        return self.original[1]

    def _give_up(self, layer: str, exc: Exception) -> None:
        """A layer whose micro-models do not run is not timed (its latency stays unknown)."""
        log.warning("cannot time %s alone (%s); its latency is not measured", layer, exc)
        self._uses[layer] = None
        self.timed.pop(layer, None)
        self.unknown.append(layer)
        self.stats.unknown.append(layer)

    def dense_ms(self, layer: str) -> float | None:
        """The dense layer's time (None when it was not timed)."""
        return self.timed.get(layer, {}).get((0, 0))

    def items(self, wanted: Mapping[str, Sequence[tuple[int, int]]]) -> None:
        """Time the dense layer and the given ``(g, r)`` of every named layer (unless known)."""
        started = time.perf_counter()
        names = [name for name in wanted if self._uses.get(name)]
        for done, name in enumerate(names):
            try:
                self._time(name, [(0, 0), *wanted[name]])
            except Exception as exc:  # an op ONNX Runtime cannot run alone (e.g. fp16 on CPU)
                self._give_up(name, exc)
            if self.progress is not None:
                self.progress("latency", done + 1, len(names))
        self.stats.seconds += time.perf_counter() - started

    def grid(self, tables: Sequence[Any], points: int = GRID_POINTS) -> dict[str, LayerLatency]:
        """The latency of every row of every table whose layer can be timed.

        Args:
            tables: ``types.CandidateTable`` per layer (any subset of the layers).
            points: timed ranks of ``g = 1`` (``GROUPED_GRID_POINTS`` for larger ``g``).

        Returns:
            layer name -> its latency; layers in ``unknown`` are absent.
        """
        started = time.perf_counter()
        result: dict[str, LayerLatency] = {}
        measurable = [table for table in tables if self._uses.get(table.layer)]
        for done, table in enumerate(measurable):
            try:
                result[table.layer] = self._grid(table, points)
            except Exception as exc:
                self._give_up(table.layer, exc)
            if self.progress is not None:
                self.progress("latency", done + 1, len(measurable))
        self.stats.seconds += time.perf_counter() - started
        return result

    def _grid(self, table: Any, points: int) -> LayerLatency:
        """Dense and the smallest rank of every group count first; a group count whose smallest
        rank is not faster than dense is dropped; then the grid ranks of the others."""
        by_groups: dict[int, list[int]] = {}
        for g, r in zip(table.groups[1:], table.ranks[1:], strict=True):
            by_groups.setdefault(int(g), []).append(int(r))
        totals = self._time(table.layer, [(0, 0)] + [(g, min(r)) for g, r in by_groups.items()])
        kept = [g for g in by_groups if totals[(g, min(by_groups[g]))] < totals[(0, 0)]]
        limit = {g: points if g == 1 else min(points, GROUPED_GRID_POINTS) for g in kept}
        grid = [(g, r) for g in kept for r in grid_ranks(by_groups[g], limit[g])]
        totals = self._time(table.layer, grid)
        row_ms = np.zeros(len(table))
        timed = np.zeros(len(table), dtype=bool)
        row_ms[0], timed[0] = totals[(0, 0)], True
        for g in by_groups:
            rows = np.flatnonzero(table.groups == g)
            points_g = {r: ms for (gg, r), ms in totals.items() if gg == g}
            row_ms[rows] = interpolate(points_g, table.ranks[rows])
            timed[rows] = np.isin(table.ranks[rows], list(points_g))
        return LayerLatency(table.layer, float(totals[(0, 0)]), row_ms, timed)

    def _time(self, layer: str, items: Sequence[tuple[int, int]]) -> dict[tuple[int, int], float]:
        """Every timing of ``layer`` so far, after timing those of ``items`` not yet known:
        from the disk cache, else measured (and cached). Summed over the layer's uses."""
        known = self.timed.setdefault(layer, {})
        wanted = list(dict.fromkeys(item for item in items if item not in known))
        if not wanted:
            return known
        totals = dict.fromkeys(wanted, 0.0)
        for use in self._uses[layer] or []:
            key = use.key(self.context)
            stored = self.cache.read(key)
            missing = [item for item in wanted if _name(item) not in stored]
            self.stats.cached += len(wanted) - len(missing)
            if missing:
                measured = _time_candidates(use, missing, self.opsets, self.providers, self.threads)
                self.stats.measured += len(missing)
                fresh = {_name(item): ms for item, ms in measured.items()}
                self.cache.write(key, fresh)
                stored.update(fresh)
            for item in wanted:
                totals[item] += stored[_name(item)]
        known.update(totals)
        return known


def measure_choice(
    original: onnx.ModelProto | str | os.PathLike,
    compressed: onnx.ModelProto,
    feeds: Mapping[str, np.ndarray],
    providers: Sequence[str],
    threads: int | None = None,
) -> tuple[float, float]:
    """Median ms of ``original`` and of ``compressed``, timed interleaved on the same ``feeds``
    with the same session options.

    ``compressed`` must hold the factors that will be written (``layer_factors.choice_model``), not
    random ones of the same shapes: ONNX Runtime's CPU PRelu runs up to 8 times slower on
    inputs whose signs are unpredictable than on inputs of one sign, so a model's speed depends
    on its weights (docs/performance.md, "Why O-Net landed below F").
    """
    runners = [
        _BoundRunner(make_session(m, providers, threads), feeds) for m in (original, compressed)
    ]
    before, after = time_sessions(
        runners,
        min_rounds=MIN_ROUNDS,
        settle_after=CHOICE_MIN_ROUNDS,
        max_rounds=CHOICE_ROUNDS,
        budget_s=CHOICE_BUDGET_S,
        warmup=WARMUP,
        precision=CHOICE_PRECISION,
    )
    return before, after


def measure_layers(
    model: onnx.ModelProto,
    discovery: Discovery,
    tables: Sequence[Any],
    providers: Sequence[str],
    *,
    cache: LatencyCache | None = None,
    points: int = GRID_POINTS,
    progress: Progress | None = None,
    stats: TimingStats | None = None,
    threads: int | None = None,
) -> dict[str, LayerLatency]:
    """``LatencyBook(...).grid(tables, points)``; ``stats`` (when given) gets what it took."""
    book = LatencyBook(model, discovery, providers, cache=cache, progress=progress, threads=threads)
    result = book.grid(tables, points)
    if stats is not None:
        for name, value in book.stats.to_dict().items():
            setattr(stats, name, value)
    return result


#: Layers whose micro-models are built here (the data input first, the weight second).
_TIMED_OPS = frozenset({"Conv", "Gemm", "MatMul"})


@dataclass(frozen=True)
class _Use:
    """One node reading a layer's weight, with everything its micro-models need."""

    layer: Layer
    node: onnx.NodeProto
    input_shape: tuple[int, ...]
    bias_shape: tuple[int, ...] | None
    dtype: int

    @classmethod
    def of(cls, model: onnx.ModelProto, discovery: Discovery, view: Layer) -> _Use | None:
        if view.op_type not in _TIMED_OPS:
            return None
        node = graph_at(model.graph, view.graph_path).node[view.node_index]
        shape = discovery.shapes.get(node.input[0])
        if shape is None or None in shape or not shape:
            return None
        bias_shape = None
        if len(node.input) > 2 and node.input[2]:
            known = discovery.shapes.get(node.input[2])
            bias_shape = (
                tuple(int(d) for d in known)
                if known is not None and None not in known
                else (view.out_channels,)
            )
        return cls(view, node, tuple(int(d) for d in shape), bias_shape, view.weight_dtype)

    def key(self, context: Mapping[str, Any]) -> dict[str, Any]:
        attributes = {a.name: _plain(helper.get_attribute_value(a)) for a in self.node.attribute}
        return {
            **context,
            "op": self.node.op_type,
            "attributes": attributes,
            "input": list(self.input_shape),
            "weight": list(self.layer.weight_shape),
            "bias": None if self.bias_shape is None else list(self.bias_shape),
            "dtype": self.dtype,
        }


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (int, float, str)):
        return value
    return str(value)


def _digest(model: onnx.ModelProto) -> str:
    """SHA-256 of the model's bytes: timings of the whole model depend on its weights' values
    (``measure_choice``)."""
    return hashlib.sha256(model.SerializeToString()).hexdigest()


def _feeds_digest(feeds: Mapping[str, np.ndarray]) -> str:
    """SHA-256 of the inputs' names, element types, shapes and values."""
    digest = hashlib.sha256()
    for name in sorted(feeds):
        array = np.ascontiguousarray(feeds[name])
        digest.update(f"{name}:{array.dtype.str}:{array.shape};".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _name(item: tuple[int, int]) -> str:
    return "dense" if item == (0, 0) else f"{item[0]},{item[1]}"


#: Sessions timed interleaved at once (the dense one included). Every live session keeps its own
#: thread pool, whose threads spin after a run; many at once on few cores would time each
#: other's spinning.
BATCH = 8


def _time_candidates(
    use: _Use,
    items: Sequence[tuple[int, int]],
    opsets: Mapping[str, int],
    providers: Sequence[str],
    threads: int | None = None,
) -> dict[tuple[int, int], float]:
    """Build the micro-model of every item and time them interleaved, ``BATCH`` at a time.

    The dense layer runs in every batch; each batch's times are scaled by the ratio of the dense
    layer's median over all batches to its median in that batch, so load that changes between
    batches cancels out.
    """
    rng = np.random.default_rng(0)
    dense_model = _dense_model(use, opsets, rng)
    feeds = {"x": _random(rng, use.input_shape, use.dtype)}
    dense = _BoundRunner(make_session(dense_model, providers, threads), feeds)
    others = [item for item in items if item != (0, 0)]
    batches = [others[i : i + BATCH - 1] for i in range(0, len(others), BATCH - 1)] or [[]]
    references: list[float] = []
    raw: list[dict[tuple[int, int], float]] = []
    for batch in batches:
        runners = [dense] + [
            _BoundRunner(
                make_session(_factorized_model(dense_model, use, g, r, rng), providers, threads),
                feeds,
            )
            for g, r in batch
        ]
        times = time_sessions(
            runners,
            min_rounds=MIN_ROUNDS,
            max_rounds=MAX_ROUNDS,
            budget_s=LAYER_BUDGET_S,
            warmup=WARMUP,
            precision=LAYER_PRECISION,
        )
        references.append(times[0])
        raw.append(dict(zip(batch, times[1:], strict=True)))
        del runners
    reference = statistics.median(references)
    result = {(0, 0): reference} if (0, 0) in items else {}
    for batch_reference, batch_times in zip(references, raw, strict=True):
        scale = reference / batch_reference if batch_reference > 0 else 1.0
        result.update({item: ms * scale for item, ms in batch_times.items()})
    return result


def _random(rng: np.random.Generator, shape: Sequence[int], dtype: int) -> np.ndarray:
    """Uniform values in [-1, 1): the values do not change the speed of dense float kernels,
    and drawing them is cheap."""
    values = rng.random(tuple(shape), dtype=np.float32) * 2 - 1
    return values.astype(helper.tensor_dtype_to_np_dtype(dtype))


def _dense_model(use: _Use, opsets: Mapping[str, int], rng: np.random.Generator) -> onnx.ModelProto:
    """The node alone: input ``x`` of the real shape, random weight ``w`` and bias ``b``."""
    node = onnx.NodeProto()
    node.CopyFrom(use.node)
    node.name = "layer"
    inputs = ["x", "w"] + (["b"] if use.bias_shape is not None else [])
    del node.input[:]
    node.input.extend(inputs)
    del node.output[:]
    node.output.append("y")
    scale = 1.0 / math.sqrt(max(use.layer.cols, 1))
    weight = _random(rng, use.layer.weight_shape, use.dtype)
    initializers = [numpy_helper.from_array(weight * weight.dtype.type(scale), "w")]
    if use.bias_shape is not None:
        initializers.append(numpy_helper.from_array(_random(rng, use.bias_shape, use.dtype), "b"))
    graph = helper.make_graph(
        [node],
        "latency",
        [helper.make_tensor_value_info("x", use.dtype, list(use.input_shape))],
        [helper.make_tensor_value_info("y", use.dtype, None)],
        initializers,
    )
    opset = [helper.make_opsetid("", opsets.get("", opsets.get("ai.onnx", 13)))]
    model = helper.make_model(graph, opset_imports=opset)
    model.ir_version = min(model.ir_version, 8)  # what every ONNX Runtime we support reads
    return model


def _factorized_model(
    dense: onnx.ModelProto, use: _Use, groups: int, rank: int, rng: np.random.Generator
) -> onnx.ModelProto:
    """``dense`` with its node replaced by the factorized pair, by ``rewrite``."""
    layer = use.layer
    view = dataclasses.replace(
        layer,
        name="layer",
        node_index=0,
        weight_input="w",
        weight_source="w",
        graph_path=(),
        stored_dtype=None,
        tied=(),
        input_rank=len(use.input_shape),
    )
    width = layer.cols // groups
    factors = Factors(
        groups=groups,
        rank=rank,
        first=_random(rng, (groups, rank, width), use.dtype) / math.sqrt(width),
        second=_random(rng, (layer.out_channels, groups * rank), use.dtype) / math.sqrt(rank),
    )
    return rewrite(dense, [(view, factors)])


class _BoundRunner:
    """A zero-argument run of a session with its inputs bound once (no copy per run). It
    holds the bound values, which must outlive the binding."""

    def __init__(self, session, feeds: Mapping[str, np.ndarray]):
        ort = runtime()
        self.session = session
        self.binding = session.io_binding()
        device = "cpu" if session.get_providers()[0] == "CPUExecutionProvider" else "cuda"
        self.values = [
            ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), device, 0)
            for array in feeds.values()
        ]
        for name, value in zip(feeds, self.values, strict=True):
            self.binding.bind_ortvalue_input(name, value)
        for output in session.get_outputs():
            self.binding.bind_output(output.name, device)

    def __call__(self) -> None:
        self.session.run_with_iobinding(self.binding)
