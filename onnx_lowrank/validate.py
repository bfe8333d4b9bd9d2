"""Compare a compressed model with its original in ONNX Runtime.

Both models run on the same inputs: the user's (an ``.npz`` keyed by input name) or random ones
shaped by the model's inputs and ``--input-shape``. For every output the report gives the max
absolute error, the relative L2 error ``‖a − b‖ / ‖a‖``, the cosine similarity, and, for
``(batch, classes)`` score outputs, the top-1 agreement. It also gives the median latency of
both models, measured alternately on the same inputs.

Latency is timed on ``LATENCY_BATCH`` (1) sample: the first row of every input, when every
input's leading (batch) dimension is dynamic; otherwise on the full inputs, which a static
batch requires. The accuracy metrics always use all inputs, and that run warms both models up;
then the two models run alternately for ``config.latency_runs`` pairs, or until the timed runs have
taken ``LATENCY_BUDGET_S`` seconds (at least ``MIN_LATENCY_RUNS`` pairs run), so validating a
large model on a small machine stays quick; the report records the batch and the number of
pairs.

A compressed model fails validation when ONNX Runtime cannot load or run it, when an output's
shape differs or holds NaN/Inf where the original does not, or when a metric crosses a
tolerance the user set.
"""

from __future__ import annotations

import importlib.metadata
import logging
import math
import os
import statistics
import time
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .backend import cuda_available
from .config import CompressionConfig
from .errors import CalibrationError, RuntimeMissingError, ShapeError, UnsupportedModelError

__all__ = [
    "OutputComparison",
    "ValidationReport",
    "check_feeds",
    "graph_inputs",
    "latency_feeds",
    "load_npz",
    "providers_for",
    "random_inputs",
    "validate",
    "validation_inputs",
]

log = logging.getLogger(__name__)

#: Batch size of random validation inputs when the model's batch dimension is dynamic.
RANDOM_BATCH = 8
#: Samples per latency run when every input's leading dimension is dynamic.
LATENCY_BATCH = 1
#: Seconds of timed runs after which the latency measurement stops early.
LATENCY_BUDGET_S = 0.5
#: Pairs timed before the budget may stop the latency measurement.
MIN_LATENCY_RUNS = 3
#: An output whose cosine similarity with the original is below this gets a warning, tolerances
#: or not: the compressed model may be broken.
FAR_COSINE = 0.9
#: Largest random validation input (values); a larger declared shape is a ShapeError.
MAX_RANDOM_ELEMENTS = 2**28


@dataclass(frozen=True)
class OutputComparison:
    """How one output of the compressed model compares with the original."""

    name: str
    shape: tuple[int, ...]
    max_abs_error: float
    rel_l2_error: float
    cosine_similarity: float
    top1_agreement: float | None
    failures: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        return not self.failures


@dataclass(frozen=True)
class ValidationReport:
    """Result of ``validate``.

    Attributes:
        provider: the ONNX Runtime execution provider used.
        inputs: where the inputs came from.
        outputs: one comparison per graph output.
        latency_ms_before: median latency of the original model, in milliseconds.
        latency_ms_after: median latency of the compressed model.
        failures: every reason the compressed model failed; empty when it passed.
        latency_batch: samples per latency run (None when the inputs were not split).
        latency_runs: timed runs per model behind each median.
        tolerances: the tolerances checked (``max_rel_error``, ``min_cosine``, ``min_top1``
            that were set). Without any, passing only means that the compressed model runs
            and its outputs have the original's shapes and no NaN/Inf where it has none.
    """

    provider: str
    inputs: str
    outputs: tuple[OutputComparison, ...] = ()
    latency_ms_before: float | None = None
    latency_ms_after: float | None = None
    failures: tuple[str, ...] = field(default_factory=tuple)
    latency_batch: int | None = None
    latency_runs: int = 0
    tolerances: Mapping[str, float] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def far_outputs(self) -> list[OutputComparison]:
        """Outputs whose cosine similarity with the original is below ``FAR_COSINE``."""
        return [o for o in self.outputs if o.cosine_similarity < FAR_COSINE]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["passed"] = self.passed
        for item, output in zip(data["outputs"], self.outputs, strict=True):
            item["passed"] = output.passed
        return data


def _ort():
    try:
        import onnxruntime
    except ImportError as exc:
        raise RuntimeMissingError(
            "onnxruntime is not installed; install it with pip install 'onnx-lowrank[cpu]' "
            "(or [gpu]), or pass --no-validate"
        ) from exc
    return onnxruntime


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


def _session(model: onnx.ModelProto | str | os.PathLike, providers: list[str]):
    ort = _ort()
    options = ort.SessionOptions()
    options.log_severity_level = 4  # failures surface as exceptions; keep stderr to one line
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, options, providers=providers)


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


def load_npz(path: str | os.PathLike, what: str = "--inputs") -> dict[str, np.ndarray]:
    """Arrays of an ``.npz`` file, with a clear error when it cannot be read."""
    target = Path(path)
    fix = "save one array per model input with numpy.savez(FILE, name=array, ...)"
    if not target.exists():
        raise CalibrationError(f"{what} file not found: {path}")
    if target.is_dir():
        raise CalibrationError(f"{what} {path} is a directory; give an .npz file")
    try:
        if not zipfile.is_zipfile(target):  # empty, truncated, .npy, text, ...
            raise CalibrationError(f"{what} file {path} is not an .npz archive; {fix}")
        with np.load(target, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise CalibrationError(f"{what} file {path} cannot be read ({reason}); {fix}") from exc
    stray = sorted(key for key, value in arrays.items() if not isinstance(value, np.ndarray))
    if stray:
        raise CalibrationError(
            f"{what} file {path} holds {stray[0]!r}, which is not a NumPy array; {fix}"
        )
    return arrays


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


def compare_output(
    name: str, reference: np.ndarray, candidate: np.ndarray, config: CompressionConfig
) -> OutputComparison:
    """Metrics and tolerance failures of one output."""
    failures: list[str] = []
    if reference.shape != candidate.shape:
        return OutputComparison(
            name,
            tuple(candidate.shape),
            math.inf,
            math.inf,
            0.0,
            None,
            (f"{name}: shape {candidate.shape} != original {reference.shape}",),
        )
    a = reference.astype(np.float64).ravel()
    b = candidate.astype(np.float64).ravel()
    if np.any(np.isfinite(a) & ~np.isfinite(b)):
        failures.append(f"{name}: NaN or Inf where the original is finite")
    finite = np.isfinite(a) & np.isfinite(b)
    a, b = a[finite], b[finite]
    diff = a - b
    max_abs = float(np.max(np.abs(diff))) if diff.size else 0.0
    norm_a, norm_b = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    rel = float(np.linalg.norm(diff) / norm_a) if norm_a > 0 else float(np.linalg.norm(diff))
    cosine = (
        float(a @ b / (norm_a * norm_b)) if norm_a > 0 and norm_b > 0 else float(norm_a == norm_b)
    )
    top1 = None
    if (
        reference.ndim == 2
        and reference.shape[1] >= 2
        and np.issubdtype(reference.dtype, np.floating)
    ):
        top1 = float(np.mean(reference.argmax(axis=1) == candidate.argmax(axis=1)))
    if config.max_rel_error is not None and rel > config.max_rel_error:
        failures.append(
            f"{name}: relative L2 error {rel:.4g} > --max-rel-error {config.max_rel_error:g}"
        )
    if config.min_cosine is not None and cosine < config.min_cosine:
        failures.append(
            f"{name}: cosine similarity {cosine:.4g} < --min-cosine {config.min_cosine:g}"
        )
    if config.min_top1 is not None and top1 is not None and top1 < config.min_top1:
        failures.append(f"{name}: top-1 agreement {top1:.4g} < --min-top1 {config.min_top1:g}")
    return OutputComparison(
        name, tuple(candidate.shape), max_abs, rel, cosine, top1, tuple(failures)
    )


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
        feeds = load_npz(config.inputs)
        label = str(config.inputs)
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
        config: tolerances, device, seed, latency runs, input shapes and ``inputs`` (.npz).
        feeds: inputs to use instead of ``config.inputs`` or random ones (see
            ``validation_inputs``).
        label: where ``feeds`` came from, for the report.
        declared: the original model already in memory, for its input declarations (saves
            reading ``original`` again when it is a path).

    Raises:
        UnsupportedModelError: the *original* model does not run in ONNX Runtime.
        ShapeError, CalibrationError: inputs cannot be made or do not match.
    """
    if isinstance(original, onnx.ModelProto):
        reference_model = original
    else:
        reference_model = declared or onnx.load(str(original), load_external_data=False)
    if feeds is None:
        feeds, label = validation_inputs(reference_model, config)
    else:
        label = label or "given inputs"
        check_feeds(reference_model, feeds, label)
    providers = providers_for(config.device)
    try:
        reference_session = _session(original, providers)
        reference = reference_session.run(None, dict(feeds))
    except Exception as exc:
        raise UnsupportedModelError(
            f"the original model does not run in ONNX Runtime ({_first_line(exc)}); "
            "pass valid --inputs or use --no-validate"
        ) from exc
    provider = reference_session.get_providers()[0]
    if provider != providers[0]:
        log.warning("%s did not start; validating on %s", providers[0], provider)
        providers = [provider]
    try:
        session = _session(compressed, providers)
        outputs = session.run(None, dict(feeds))
    except Exception as exc:
        return ValidationReport(
            provider,
            label,
            failures=(f"ONNX Runtime cannot run the compressed model: {_first_line(exc)}",),
        )
    names = [output.name for output in reference_session.get_outputs()]
    comparisons = tuple(
        compare_output(name, ref, out, config)
        for name, ref, out in zip(names, reference, outputs, strict=True)
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
        before,
        after,
        failures,
        latency_batch=batch,
        latency_runs=runs,
        tolerances=config.tolerances,
    )


def latency_feeds(
    model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]
) -> tuple[int | None, dict[str, np.ndarray]]:
    """The inputs latency is timed on, and their batch size (None: the full inputs).

    The first ``LATENCY_BATCH`` rows of every input when every input's leading dimension is
    dynamic and all inputs have the same number of rows; otherwise the full inputs.
    """
    infos = graph_inputs(model)
    leading = {int(feeds[info.name].shape[0]) for info in infos if feeds[info.name].ndim}
    dynamic = all(_declared(info)[1][:1] == [None] and feeds[info.name].ndim for info in infos)
    if not infos or not dynamic or len(leading) != 1:
        return None, dict(feeds)
    batch = min(LATENCY_BATCH, leading.pop())
    return batch, {name: array[:batch] for name, array in feeds.items()}


def _latencies(
    first, second, feeds: Mapping[str, np.ndarray], runs: int
) -> tuple[float, float, int]:
    """Median latency in ms of two sessions, timed alternately.

    Both sessions have already run the validation inputs, which warmed them up. Stops after
    ``runs`` pairs, or earlier once the timed runs took ``LATENCY_BUDGET_S`` and at least
    ``MIN_LATENCY_RUNS`` pairs ran (a median of fewer says little).
    """
    times: tuple[list[float], list[float]] = ([], [])
    spent = 0.0
    least = min(runs, MIN_LATENCY_RUNS)
    while len(times[0]) < runs and (len(times[0]) < least or spent < LATENCY_BUDGET_S):
        for session, bucket in ((first, times[0]), (second, times[1])):
            start = time.perf_counter()
            session.run(None, dict(feeds))
            elapsed = time.perf_counter() - start
            bucket.append(elapsed * 1000)
            spent += elapsed
    return statistics.median(times[0]), statistics.median(times[1]), len(times[0])


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]
