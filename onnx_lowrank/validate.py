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
import math
import os
import time
from collections.abc import Mapping, Sequence

import numpy as np
import onnx

from .backend import cuda_available
from .config import ALL_OUTPUTS, TOLERANCES, CompressionConfig
from .errors import (
    CalibrationError,
    ConfigError,
    ShapeError,
    UnsupportedModelError,
)
from .load import load_npz  # re-exported: it lived here
from .records import LatencyStats, OutputComparison, ValidationReport
from .sessions import make_session
from .sessions import runtime as _ort

__all__ = [
    "LatencyStats",
    "OutputMetrics",
    "check_feeds",
    "check_tolerances",
    "compare_output",
    "graph_inputs",
    "has_class_axis",
    "latency_feeds",
    "load_npz",
    "make_session",
    "providers_for",
    "random_inputs",
    "run_rows",
    "session_threads",
    "unknown_dimensions",
    "validate",
    "validation_inputs",
]

log = logging.getLogger(__name__)

#: Batch size of random validation inputs when the model's batch dimension is dynamic.
RANDOM_BATCH = 8
#: Samples per latency run when every input's leading dimension is dynamic.
LATENCY_BATCH = 1
#: Seconds of timed runs after which the latency measurement stops early.
LATENCY_BUDGET_S = 1.0
#: Pairs timed before the budget may stop the latency measurement.
MIN_LATENCY_RUNS = 5
#: Untimed pairs run at the latency batch before timing (the first run at a new shape allocates).
LATENCY_WARMUP = 2
#: Most bytes of the original's outputs per validation run; the rows per run follow from it.
OUTPUT_BYTES_CAP = 64 * 2**20
#: Values compared per float64 chunk.
COMPARE_CHUNK = 2**20
#: Largest random validation input (values); a larger declared shape is a ShapeError.
MAX_RANDOM_ELEMENTS = 2**28


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


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The graph inputs that must be fed (initializers listed as inputs excluded)."""
    initializers = {tensor.name for tensor in model.graph.initializer}
    return [info for info in model.graph.input if info.name not in initializers]


def _declared(info: onnx.ValueInfoProto) -> tuple[np.dtype, list[int | None]]:
    tensor_type = info.type.tensor_type
    try:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
    except (KeyError, ValueError) as exc:
        raise UnsupportedModelError(
            f"input {info.name!r} has element type {tensor_type.elem_type}, which has no numpy "
            "equivalent; fix the model's input type, or pass --no-validate"
        ) from exc
    dims = [
        d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
        for d in tensor_type.shape.dim
    ]
    return np.dtype(dtype), dims


def random_inputs(
    model: onnx.ModelProto, input_shapes: Mapping[str, tuple[int, ...]], seed: int = 0
) -> dict[str, np.ndarray]:
    """Random inputs for every graph input.

    Float inputs are standard normal, integer inputs uniform in [0, 10), booleans fair coins.
    A dynamic leading dimension becomes ``RANDOM_BATCH``; other dynamic dimensions need
    ``input_shapes``.

    Raises:
        ShapeError: a dynamic dimension other than the batch has no given size.
    """
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for info in graph_inputs(model):
        if not info.type.HasField("tensor_type"):
            raise UnsupportedModelError(
                f"input {info.name!r} is not a tensor; pass validation inputs with --inputs "
                "or use --no-validate"
            )
        dtype, dims = _declared(info)
        if info.name in input_shapes:
            shape = tuple(input_shapes[info.name])
        else:
            if dims and dims[0] is None:
                dims[0] = RANDOM_BATCH
            missing = [i for i, d in enumerate(dims) if d is None]
            if missing:
                raise ShapeError(
                    f"input {info.name!r} has dynamic dimension(s) {missing}; give sizes with "
                    f"--input-shape {info.name}:D1,D2,... or real inputs with --inputs FILE.npz"
                )
            shape = tuple(dims)
        if math.prod(shape) > MAX_RANDOM_ELEMENTS:
            raise ShapeError(
                f"input {info.name!r} of shape {shape} is too large for random validation "
                f"inputs (over {MAX_RANDOM_ELEMENTS:,} values); give smaller sizes with "
                f"--input-shape {info.name}:D1,D2,... or real inputs with --inputs FILE.npz"
            )
        if np.issubdtype(dtype, np.floating) or dtype.kind == "V":
            feeds[info.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[info.name] = rng.integers(0, 2, shape).astype(bool)
        else:
            feeds[info.name] = rng.integers(0, 10, shape).astype(dtype)
    return feeds


def unknown_dimensions(
    model: onnx.ModelProto, input_shapes: Mapping[str, tuple[int, ...]]
) -> list[str]:
    """The input dimensions ``random_inputs`` has no size for, as ``name[axis]``.

    A dynamic leading (batch) dimension is not listed (it becomes ``RANDOM_BATCH``), nor is any
    dimension of an input that ``input_shapes`` gives.
    """
    unknown = []
    for info in graph_inputs(model):
        if info.name in input_shapes or not info.type.HasField("tensor_type"):
            continue
        dims = [
            d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
            for d in info.type.tensor_type.shape.dim
        ]
        unknown += [f"{info.name}[{axis}]" for axis, d in enumerate(dims) if axis and d is None]
    return unknown


def check_feeds(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], label: str) -> None:
    """Check that ``feeds`` match the model's inputs in names, dtypes and fixed dimensions.

    Raises:
        CalibrationError: naming the first mismatch and how to fix it.
    """
    expected = {info.name: info for info in graph_inputs(model)}
    missing = sorted(set(expected) - set(feeds))
    extra = sorted(set(feeds) - set(expected))
    if missing or extra:
        raise CalibrationError(
            f"{label} does not match the model's inputs: "
            + "; ".join(
                part
                for part in (
                    f"missing {', '.join(missing)}" if missing else "",
                    f"unknown {', '.join(extra)}" if extra else "",
                )
                if part
            )
            + f" (model inputs: {', '.join(expected)})"
        )
    for name, info in expected.items():
        array = feeds[name]
        dtype, dims = _declared(info)
        if array.dtype != dtype:
            raise CalibrationError(
                f"{label}: input {name!r} is {array.dtype} but the model expects {dtype}; "
                f"convert it with .astype(numpy.{dtype})"
            )
        if len(array.shape) != len(dims) or any(
            d is not None and d != s for d, s in zip(dims, array.shape, strict=True)
        ):
            want = ",".join("?" if d is None else str(d) for d in dims)
            raise CalibrationError(
                f"{label}: input {name!r} has shape {tuple(array.shape)} but the model "
                f"expects ({want})"
            )


def has_class_axis(shape: Sequence[int | None], floating: bool) -> bool | None:
    """Whether an output of this shape and type has a class axis for top-1 agreement: floating
    point, at least two dimensions, the last of size two or more. None when the shape leaves it
    open (a dynamic last dimension)."""
    if not floating or len(shape) < 2:
        return False
    if shape[-1] is None:
        return None
    return shape[-1] >= 2


class OutputMetrics:
    """The comparison of one output, accumulated over validation runs in float64 chunks.

    Sums of ``a²``, ``b²``, ``a·b`` and ``(a − b)²`` over the values where both are finite give
    the relative L2 error and the cosine similarity of the whole output without ever holding it
    in float64; top-1 agreement counts equal argmaxes over the last axis, chunk by chunk.
    """

    def __init__(self, name: str):
        self.name = name
        self.shape: tuple[int, ...] | None = None
        self.mismatch: str | None = None
        self.floating = True
        self.new_nonfinite = 0
        self.max_abs = 0.0
        self.sums = np.zeros(4)  # a·a, b·b, a·b, (a − b)·(a − b)
        self.top1_same = 0
        self.top1_positions = 0

    def add(self, reference: np.ndarray, candidate: np.ndarray, rows: int | None = None) -> None:
        """Compare one run's output. ``rows``: the rows of the inputs of this run, when the
        inputs were run in slices (the output's rows add up when its leading dimension
        follows them)."""
        if self.mismatch is not None:
            return
        if reference.shape != candidate.shape:
            self.shape = tuple(candidate.shape)
            self.mismatch = f"{self.name}: shape {candidate.shape} != original {reference.shape}"
            return
        shape = tuple(int(d) for d in reference.shape)
        if self.shape is None:
            self.shape = shape
        elif rows is not None and shape[1:] == self.shape[1:] and shape[:1] == (rows,):
            self.shape = (self.shape[0] + rows, *shape[1:])
        self.floating = bool(np.issubdtype(reference.dtype, np.floating))
        flat_a, flat_b = reference.reshape(-1), candidate.reshape(-1)
        for start in range(0, flat_a.size, COMPARE_CHUNK):
            self._add_values(
                flat_a[start : start + COMPARE_CHUNK], flat_b[start : start + COMPARE_CHUNK]
            )
        if has_class_axis(shape, self.floating):
            classes = shape[-1]
            rows_a, rows_b = reference.reshape(-1, classes), candidate.reshape(-1, classes)
            step = max(1, COMPARE_CHUNK // classes)
            for start in range(0, rows_a.shape[0], step):
                self.top1_same += int(
                    np.count_nonzero(
                        rows_a[start : start + step].argmax(axis=1)
                        == rows_b[start : start + step].argmax(axis=1)
                    )
                )
            self.top1_positions += rows_a.shape[0]

    def _add_values(self, chunk_a: np.ndarray, chunk_b: np.ndarray) -> None:
        a, b = chunk_a.astype(np.float64), chunk_b.astype(np.float64)
        finite_a, finite_b = np.isfinite(a), np.isfinite(b)
        self.new_nonfinite += int(np.count_nonzero(finite_a & ~finite_b))
        both = finite_a & finite_b
        if not both.all():
            a, b = a[both], b[both]
        diff = a - b
        if diff.size:
            self.max_abs = max(self.max_abs, float(np.max(np.abs(diff))))
        self.sums += (a @ a, b @ b, a @ b, diff @ diff)

    @property
    def top1_agreement(self) -> float | None:
        return self.top1_same / self.top1_positions if self.top1_positions else None

    def result(self, config: CompressionConfig) -> OutputComparison:
        """The metrics and the failures of the tolerances ``config`` sets for this output.

        Raises:
            ConfigError: ``min_top1`` names this output, which has no class axis.
        """
        if self.mismatch is not None:
            return OutputComparison(
                self.name, self.shape or (), math.inf, math.inf, 0.0, None, (self.mismatch,)
            )
        ref2, cand2, dot, diff2 = (float(x) for x in self.sums)
        norm_a, norm_b, norm_diff = math.sqrt(ref2), math.sqrt(cand2), math.sqrt(diff2)
        rel = norm_diff / norm_a if norm_a > 0 else norm_diff
        cosine = dot / (norm_a * norm_b) if norm_a > 0 and norm_b > 0 else float(norm_a == norm_b)
        top1 = self.top1_agreement
        failures = []
        if self.new_nonfinite:
            failures.append(f"{self.name}: NaN or Inf where the original is finite")
        checked: dict[str, float] = {}
        not_applicable: list[str] = []
        measured = {"max_rel_error": rel, "min_cosine": cosine, "min_top1": top1}
        for name in TOLERANCES:
            limit = config.tolerance(name, self.name)
            if limit is None:
                continue
            value = measured[name]
            if value is None:  # min_top1 on an output without a class axis
                if _names(config, name, self.name):
                    raise ConfigError(
                        f"--min-top1 names output {self.name!r} of shape {self.shape}, which "
                        "has no class axis (floating point, 2+ dimensions, last of size 2+); "
                        "drop it or check this output with --min-cosine / --max-rel-error"
                    )
                not_applicable.append(name)
                continue
            checked[name] = limit
            if name == "max_rel_error" and value > limit:
                failures.append(
                    f"{self.name}: relative L2 error {value:.4g} > --max-rel-error {limit:g}"
                )
            elif name == "min_cosine" and value < limit:
                failures.append(
                    f"{self.name}: cosine similarity {value:.4g} < --min-cosine {limit:g}"
                )
            elif name == "min_top1" and value < limit:
                failures.append(
                    f"{self.name}: top-1 agreement {value:.4g} < --min-top1 {limit:g} "
                    f"({self.top1_positions} positions)"
                )
        return OutputComparison(
            self.name,
            self.shape or (),
            self.max_abs,
            rel,
            cosine,
            top1,
            tuple(failures),
            top1_positions=self.top1_positions or None,
            checked=checked,
            not_applicable=tuple(not_applicable),
        )


def _names(config: CompressionConfig, tolerance: str, output: str) -> bool:
    """True when ``tolerance`` names ``output`` explicitly (not through the value for all)."""
    value = getattr(config, tolerance)
    return isinstance(value, Mapping) and output in value


def compare_output(
    name: str, reference: np.ndarray, candidate: np.ndarray, config: CompressionConfig
) -> OutputComparison:
    """Metrics and tolerance failures of one output (``OutputMetrics`` over one run)."""
    metrics = OutputMetrics(name)
    metrics.add(reference, candidate)
    return metrics.result(config)


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
        if verdict is False and _names(config, "min_top1", output):
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
            failures=(f"ONNX Runtime cannot load the compressed model: {_first_line(exc)}",),
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
        f"the original model does not run in ONNX Runtime ({_first_line(exc)}); "
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
    total = _batch_rows(model, feeds)
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
        raise _CompressedFails(_first_line(exc)) from exc
    for item, ref, out in zip(metrics, reference, outputs, strict=True):
        item.add(np.asarray(ref), np.asarray(out), rows)


def _batch_rows(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> int | None:
    """The number of rows when every input's leading dimension is dynamic and the same (the
    inputs can then run in slices); else None."""
    infos = graph_inputs(model)
    if not infos or not all(_declared(info)[1][:1] == [None] for info in infos):
        return None
    if not all(feeds[info.name].ndim for info in infos):
        return None
    leading = {int(feeds[info.name].shape[0]) for info in infos}
    if len(leading) != 1:
        return None
    rows = leading.pop()
    return rows if rows >= 1 else None


def _samples(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> int:
    """Samples the inputs hold: their common batch rows, else the leading dimension of the
    first input that has one (1 when no input has a dimension)."""
    rows = _batch_rows(model, feeds)
    if rows is not None:
        return rows
    for info in graph_inputs(model):
        array = feeds[info.name]
        if array.ndim:
            return int(array.shape[0])
    return 1


def latency_feeds(
    model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]
) -> tuple[int | None, dict[str, np.ndarray]]:
    """The inputs latency is timed on, and their batch size (None: the full inputs).

    The first ``LATENCY_BATCH`` rows of every input when every input's leading dimension is
    dynamic and all inputs have the same number of rows; otherwise the full inputs.
    """
    rows = _batch_rows(model, feeds)
    if rows is None:
        return None, dict(feeds)
    batch = min(LATENCY_BATCH, rows)
    return batch, {name: array[:batch] for name, array in feeds.items()}


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


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]
