"""Compare a compressed model with its original in ONNX Runtime.

Both models run on the same inputs: the user's (an ``.npz`` keyed by input name, "real"
inputs) or random ones shaped by the model's inputs and ``--input-shape``. For every output the
report gives the max absolute error, the relative L2 error ``‖a − b‖ / ‖a‖``, the cosine
similarity, and, for an output with a class axis (floating point, at least two dimensions, the
last of size two or more), the top-1 agreement: the fraction of positions where the argmax over
the last axis is the same, every position counted (an ``(N, T, classes)`` sequence output has
``N·T`` positions). Agreement on random inputs says how close the two models are, not how well
the compressed one does its task; the report says so.

Memory follows a cap, not the output size. When every input's leading (batch) dimension is
dynamic and the same, the inputs run in slices of rows: one row first, then as many rows per
run as keep the original's outputs under ``OUTPUT_BYTES_CAP``; the metrics are accumulated per
slice, in chunks of ``COMPARE_CHUNK`` values in float64, so no whole-output float64 copy is
ever made. Otherwise the inputs run whole and only the comparison is chunked.

Latency is timed on ``LATENCY_BATCH`` (1) sample: the first row of every input, when every
input's leading dimension is dynamic; otherwise on the full inputs, which a static batch
requires. Both sessions have the same, explicit number of intra-op threads
(``config.latency_threads``, 1 by default). After
``LATENCY_WARMUP`` untimed pairs, the two models run interleaved, the first of each pair
alternating, for at most ``config.latency_runs`` pairs, or until the timed runs have taken
``LATENCY_BUDGET_S`` seconds (at least ``MIN_LATENCY_RUNS`` pairs). The report gives the median,
min and max of each model and the thread count, batch and number of pairs
(docs/performance.md, "Latency").

A compressed model fails validation when ONNX Runtime cannot load or run it, when an output's
shape differs or holds NaN/Inf where the original does not, or when a metric crosses a
tolerance the user set. A tolerance is set for every output or per output name; one that names
an output that does not exist, or ``--min-top1`` for an output without a class axis, is a
``ConfigError``: the run refuses rather than skip it.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import time
from collections.abc import Mapping

import numpy as np
import onnx

from .backend import cuda_available
from .config import ALL_OUTPUTS, TOLERANCES, CompressionConfig
from .errors import (
    ConfigError,
    UnsupportedModelError,
    reason,
)
from .feeds import batch_rows, check_feeds, graph_inputs, latency_feeds, random_inputs
from .metrics import OutputMetrics, has_class_axis, names_output
from .records import LatencyStats, ValidationReport
from .sessions import make_session
from .sessions import runtime as _ort

__all__ = [
    "LatencyStats",
    "check_tolerances",
    "providers_for",
    "run_rows",
    "session_threads",
    "validate",
    "validation_inputs",
]

log = logging.getLogger(__name__)

#: Seconds of timed runs after which the latency measurement stops early.
LATENCY_BUDGET_S = 1.0
#: Pairs timed before the budget may stop the latency measurement.
MIN_LATENCY_RUNS = 5
#: Untimed pairs run at the latency batch before timing (the first run at a new shape allocates).
LATENCY_WARMUP = 2
#: Most bytes of the original's outputs per validation run; the rows per run follow from it.
OUTPUT_BYTES_CAP = 64 * 2**20


def _both_runtimes_installed() -> bool:
    found = set()
    for name in ("onnxruntime", "onnxruntime-gpu"):
        try:
            importlib.metadata.version(name)
            found.add(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return len(found) == 2


def providers_for(device: str) -> list[str]:
    """ONNX Runtime providers for ``device``: CUDA first when usable, else CPU only.

    ``cpu`` always gets the CPU EP. ``auto`` and ``cuda`` get the CUDA EP first when the
    installed ONNX Runtime offers it (onnxruntime-gpu); otherwise the CPU EP, with a one-line
    warning when a GPU was asked for (``cuda``) or CuPy sees one (``auto``). Whether the CUDA EP
    really starts is only known once a session exists; ``validate`` reports the provider the
    session got and warns when it fell back to the CPU.
    """
    ort = _ort()
    available = ort.get_available_providers()
    if device != "cpu" and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cuda" or (device == "auto" and cuda_available()):
        hint = (
            (
                " (onnxruntime and onnxruntime-gpu are both installed and clash; "
                "uninstall both, then install onnxruntime-gpu)"
            )
            if _both_runtimes_installed()
            else ""
        )
        log.warning("CUDA execution provider not available%s; validating on the CPU", hint)
    return ["CPUExecutionProvider"]


def session_threads(config: CompressionConfig) -> int:
    """Intra-op threads of the validation sessions: ``config.latency_threads``, or every CPU
    this process may run on."""
    if config.latency_threads is not None:
        return config.latency_threads
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def check_tolerances(model: onnx.ModelProto, config: CompressionConfig) -> None:
    """Check, before any work, that every output a tolerance names exists and, for
    ``min_top1``, can have a class axis by its declared type and shape.

    Raises:
        ConfigError: naming the unknown outputs (and listing the model's), an output that
            ``min_top1`` names but that has no class axis, or a ``min_top1`` that can apply to
            no output at all.
    """
    outputs = {info.name: info for info in model.graph.output}
    for name in TOLERANCES:
        value = getattr(config, name)
        if not isinstance(value, Mapping):
            continue
        unknown = [output for output in value if output != ALL_OUTPUTS and output not in outputs]
        if unknown:
            raise ConfigError(
                f"--{name.replace('_', '-')} names {', '.join(map(repr, unknown))}, which "
                f"{'is not an output' if len(unknown) == 1 else 'are not outputs'} of the "
                f"model; its outputs: {', '.join(outputs)}"
            )
    if config.min_top1 is None:
        return
    verdicts = {name: _declared_class_axis(info) for name, info in outputs.items()}
    for output, verdict in verdicts.items():
        if verdict is False and names_output(config, "min_top1", output):
            raise ConfigError(
                f"--min-top1 names output {output!r}, which has no class axis "
                f"({_describe(outputs[output])}); top-1 agreement needs a floating-point "
                "output of 2+ dimensions whose last has size 2+"
            )
    targets = [o for o in outputs if config.tolerance("min_top1", o) is not None]
    if targets and all(verdicts[o] is False for o in targets):
        raise ConfigError(
            "--min-top1 applies to no output: none has a class axis ("
            + "; ".join(f"{o}: {_describe(outputs[o])}" for o in targets)
            + "); use --min-cosine or --max-rel-error"
        )


def _declared_class_axis(info: onnx.ValueInfoProto) -> bool | None:
    if not info.type.HasField("tensor_type"):
        return False
    tensor_type = info.type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    try:
        floating = np.issubdtype(
            onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type), np.floating
        )
    except (KeyError, ValueError):
        floating = tensor_type.elem_type == onnx.TensorProto.BFLOAT16
    dims = [
        d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
        for d in tensor_type.shape.dim
    ]
    return has_class_axis(dims, bool(floating))


def _describe(info: onnx.ValueInfoProto) -> str:
    tensor_type = info.type.tensor_type
    dims = ",".join(
        str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?")
        for d in tensor_type.shape.dim
    )
    kind = onnx.TensorProto.DataType.Name(tensor_type.elem_type).lower()
    return f"{kind} ({dims})"


def validation_inputs(
    model: onnx.ModelProto, config: CompressionConfig
) -> tuple[dict[str, np.ndarray], str]:
    """The inputs validation runs on, checked against the model, and where they came from.

    ``config.inputs`` when given, else random inputs (``random_inputs``). The pipeline calls this
    before any heavy work, so a missing input size or a mismatched file fails at once.

    Raises:
        ShapeError: a dynamic dimension has no size for random inputs.
        CalibrationError: the ``.npz`` cannot be read or does not match the model's inputs.
    """
    if config.inputs is not None:
        from .data import read_arrays  # data.py reads through load_npz: imported here

        label = str(config.inputs)  # the file's arrays are checked before they are read
        check = lambda arrays: check_feeds(model, arrays, label)  # noqa: E731
        feeds = read_arrays(config.inputs, model, "--inputs", check)
    else:
        feeds = random_inputs(model, config.input_shapes, config.seed)
        label = f"random (seed {config.seed})"
    check_feeds(model, feeds, label)
    return feeds, label


def validate(
    original: onnx.ModelProto | str | os.PathLike,
    compressed: onnx.ModelProto | str | os.PathLike,
    config: CompressionConfig,
    feeds: Mapping[str, np.ndarray] | None = None,
    label: str | None = None,
    declared: onnx.ModelProto | None = None,
) -> ValidationReport:
    """Run both models in ONNX Runtime on the same inputs and compare their outputs.

    Args:
        original: the uncompressed model (ModelProto or path).
        compressed: the compressed model (ModelProto or path).
        config: tolerances, device, seed, latency runs and threads, input shapes and ``inputs``
            (.npz).
        feeds: inputs to use instead of ``config.inputs`` or random ones (see
            ``validation_inputs``).
        label: where ``feeds`` came from, for the report.
        declared: the original model already in memory, for its input declarations (saves
            reading ``original`` again when it is a path).

    Raises:
        UnsupportedModelError: the *original* model does not run in ONNX Runtime.
        ShapeError, CalibrationError: inputs cannot be made or do not match.
        ConfigError: a tolerance names an output that does not exist, or ``min_top1`` cannot
            apply to an output it names (or to any output).
    """
    if isinstance(original, onnx.ModelProto):
        reference_model = original
    else:
        reference_model = declared or onnx.load(str(original), load_external_data=False)
    check_tolerances(reference_model, config)
    if feeds is None:
        feeds, label = validation_inputs(reference_model, config)
    else:
        label = label or "given inputs"
        check_feeds(reference_model, feeds, label)
    random = feeds is not None and config.inputs is None and label.startswith("random")
    providers = providers_for(config.device)
    threads = session_threads(config)
    try:
        reference_session = make_session(original, providers, threads)
    except Exception as exc:
        raise _original_fails(exc) from exc
    provider = reference_session.get_providers()[0]
    if provider != providers[0]:
        log.warning("%s did not start; validating on %s", providers[0], provider)
        providers = [provider]
    common = {
        "samples": _samples(reference_model, feeds),
        "random_inputs": random,
        "latency_threads": threads,
        "tolerances": config.tolerances,
    }
    try:
        session = make_session(compressed, providers, threads)
    except Exception as exc:
        return ValidationReport(
            provider,
            label,
            failures=(f"ONNX Runtime cannot load the compressed model: {reason(exc)}",),
            **common,
        )
    names = [output.name for output in reference_session.get_outputs()]
    metrics = [OutputMetrics(name) for name in names]
    try:
        rows_per_run = _compare_runs(reference_model, reference_session, session, feeds, metrics)
    except _CompressedFails as exc:
        return ValidationReport(
            provider,
            label,
            failures=(f"ONNX Runtime cannot run the compressed model: {exc}",),
            **common,
        )
    comparisons = tuple(item.result(config) for item in metrics)
    if config.min_top1 is not None and not any("min_top1" in c.checked for c in comparisons):
        raise ConfigError(
            "--min-top1 applies to no output: none has a class axis ("
            + ", ".join(f"{c.name} {c.shape}" for c in comparisons)
            + "); use --min-cosine or --max-rel-error"
        )
    batch, timed = latency_feeds(reference_model, feeds)
    try:
        before, after, runs = _latencies(reference_session, session, timed, config.latency_runs)
    except Exception:  # a graph that only runs at its full batch (e.g. a fixed Reshape)
        batch = None
        before, after, runs = _latencies(reference_session, session, feeds, config.latency_runs)
    failures = tuple(f for c in comparisons for f in c.failures)
    return ValidationReport(
        provider,
        label,
        comparisons,
        before.median_ms,
        after.median_ms,
        failures,
        latency_batch=batch,
        latency_runs=runs,
        latency_before=before,
        latency_after=after,
        latency_warmup=LATENCY_WARMUP,
        rows_per_run=rows_per_run,
        **common,
    )


class _CompressedFails(Exception):
    """The compressed model cannot run on inputs the original runs on."""


def _original_fails(exc: BaseException) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"the original model does not run in ONNX Runtime ({reason(exc)}); "
        "pass valid --inputs or use --no-validate"
    )


def _compare_runs(
    model: onnx.ModelProto,
    reference_session,
    session,
    feeds: Mapping[str, np.ndarray],
    metrics: list[OutputMetrics],
) -> int | None:
    """Run both models over ``feeds`` and accumulate every output's metrics.

    Splittable inputs (``_batch_rows``) run one row first, then in slices of as many rows as
    keep the original's outputs under ``OUTPUT_BYTES_CAP``; other inputs run whole.

    Returns:
        The rows per run after the first one-row run (None: the inputs ran whole).

    Raises:
        UnsupportedModelError: the original does not run.
        _CompressedFails: the compressed model does not run where the original does.
    """
    total = batch_rows(model, feeds)
    if total is not None:
        first = {name: array[:1] for name, array in feeds.items()}
        try:
            reference = reference_session.run(None, first)
        except Exception:  # a graph that only runs at its full batch (e.g. a fixed Reshape)
            total = None
    if total is None:
        try:
            reference = reference_session.run(None, dict(feeds))
        except Exception as exc:
            raise _original_fails(exc) from exc
        _compare_one(session, feeds, reference, metrics, None)
        return None
    per_row = max(1, sum(int(getattr(output, "nbytes", 0)) for output in reference))
    step = run_rows(per_row)
    _compare_one(session, first, reference, metrics, 1)
    del reference
    for start in range(1, total, step):
        part = {name: array[start : start + step] for name, array in feeds.items()}
        try:
            reference = reference_session.run(None, part)
        except Exception as exc:
            raise _original_fails(exc) from exc
        _compare_one(session, part, reference, metrics, len(next(iter(part.values()))))
        del reference
    return min(step, max(total - 1, 1))


def run_rows(bytes_per_row: int) -> int:
    """Rows per validation run so that the original's outputs stay under ``OUTPUT_BYTES_CAP``
    (at least one)."""
    return max(1, OUTPUT_BYTES_CAP // max(1, bytes_per_row))


def _compare_one(session, feeds, reference, metrics: list[OutputMetrics], rows) -> None:
    try:
        outputs = session.run(None, dict(feeds))
    except Exception as exc:
        raise _CompressedFails(reason(exc)) from exc
    for item, ref, out in zip(metrics, reference, outputs, strict=True):
        item.add(np.asarray(ref), np.asarray(out), rows)


def _samples(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> int:
    """Samples the inputs hold: their common batch rows, else the leading dimension of the
    first input that has one (1 when no input has a dimension)."""
    rows = batch_rows(model, feeds)
    if rows is not None:
        return rows
    for info in graph_inputs(model):
        array = feeds[info.name]
        if array.ndim:
            return int(array.shape[0])
    return 1


def _latencies(
    first, second, feeds: Mapping[str, np.ndarray], runs: int
) -> tuple[LatencyStats, LatencyStats, int]:
    """Latency of two sessions, timed interleaved.

    ``LATENCY_WARMUP`` untimed pairs first (the validation runs may have used another batch).
    Then pairs, the first of each pair alternating (AB, BA, ...) so that neither model always
    runs right after the other; stops after ``runs`` pairs, or earlier once the timed runs took
    ``LATENCY_BUDGET_S`` and at least ``MIN_LATENCY_RUNS`` pairs ran (a median of fewer says
    little).
    """
    feeds = dict(feeds)
    for _ in range(LATENCY_WARMUP):
        first.run(None, feeds)
        second.run(None, feeds)
    times: tuple[list[float], list[float]] = ([], [])
    sessions = (first, second)
    spent = 0.0
    least = min(runs, MIN_LATENCY_RUNS)
    pairs = 0
    while pairs < runs and (pairs < least or spent < LATENCY_BUDGET_S):
        for index in (0, 1) if pairs % 2 == 0 else (1, 0):
            start = time.perf_counter()
            sessions[index].run(None, feeds)
            elapsed = time.perf_counter() - start
            times[index].append(elapsed * 1000)
            spent += elapsed
        pairs += 1
    return LatencyStats.of(times[0]), LatencyStats.of(times[1]), pairs
