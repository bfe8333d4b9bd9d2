"""The inputs a model is fed: its graph inputs, random inputs shaped by them, and checks that
given inputs match them.

Validation, calibration, the sensitivity probe, latency timing and ``make-calibration`` all feed
models; this helper is what they share (docs/design.md, "Layout").
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import onnx

from .errors import CalibrationError, ShapeError, UnsupportedModelError

__all__ = [
    "LATENCY_BATCH",
    "MAX_RANDOM_ELEMENTS",
    "RANDOM_BATCH",
    "batch_rows",
    "check_feeds",
    "common_rows",
    "declared",
    "graph_inputs",
    "latency_feeds",
    "natural_noise",
    "random_inputs",
    "unknown_dimensions",
]

#: Batch size of random validation inputs when the model's batch dimension is dynamic.
RANDOM_BATCH = 8


#: Samples per latency run when every input's leading dimension is dynamic.
LATENCY_BATCH = 1


#: Largest random validation input (values); a larger declared shape is a ShapeError.
MAX_RANDOM_ELEMENTS = 2**28


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The graph inputs that must be fed (initializers listed as inputs excluded)."""
    initializers = {tensor.name for tensor in model.graph.initializer}
    return [info for info in model.graph.input if info.name not in initializers]


def declared(info: onnx.ValueInfoProto) -> tuple[np.dtype, list[int | None]]:
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


#: Axes of a float input longer than this carry ``natural_noise``'s 1/f spectrum (an image's
#: height and width, a signal's time); shorter ones (channels) are left independent.
SHORT_AXIS = 4


def natural_noise(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Random samples (axis 0) with the spectrum of natural signals, in float64.

    Images and sounds have amplitude spectra falling about as 1/f; white noise has a flat one
    and drives a network far from what it was trained on. Here each sample is white noise
    filtered to a 1/f amplitude over its axes longer than ``SHORT_AXIS`` (other axes keep
    independent values), then standardized to mean 0 and variance 1. A shape without such an
    axis gets standard normal noise.
    """
    noise = rng.standard_normal(shape)
    axes = tuple(axis for axis in range(1, len(shape)) if shape[axis] > SHORT_AXIS)
    if not axes:
        return noise
    grids = np.meshgrid(*(np.fft.fftfreq(shape[axis]) for axis in axes), indexing="ij")
    frequency = np.sqrt(sum(grid**2 for grid in grids))
    frequency.flat[0] = 1.0  # the mean's component, removed below
    frequency = frequency.reshape(
        [shape[axis] if axis in axes else 1 for axis in range(len(shape))]
    )
    noise = np.real(np.fft.ifftn(np.fft.fftn(noise, axes=axes) / frequency, axes=axes))
    rest = tuple(range(1, len(shape)))
    noise -= noise.mean(axis=rest, keepdims=True)
    return noise / np.maximum(noise.std(axis=rest, keepdims=True), np.finfo(np.float64).tiny)


def random_inputs(
    model: onnx.ModelProto,
    input_shapes: Mapping[str, tuple[int, ...]],
    seed: int = 0,
    natural: bool = False,
) -> dict[str, np.ndarray]:
    """Random inputs for every graph input.

    Float inputs are standard normal (with ``natural``, ``natural_noise``: the data-free
    ``--error network`` measures on it), integer inputs uniform in [0, 10), booleans fair coins.
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
        dtype, dims = declared(info)
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
            values = natural_noise(shape, rng) if natural else rng.standard_normal(shape)
            feeds[info.name] = values.astype(dtype)
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
        dtype, dims = declared(info)
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


def batch_rows(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> int | None:
    """The number of rows when every input's leading dimension is dynamic and the same (the
    inputs can then run in slices); else None."""
    infos = graph_inputs(model)
    if not infos or not all(declared(info)[1][:1] == [None] for info in infos):
        return None
    rows = common_rows({info.name: feeds[info.name] for info in infos})
    return rows if rows is not None and rows >= 1 else None


def common_rows(feeds: Mapping[str, np.ndarray]) -> int | None:
    """The number of rows when every array has a leading axis of the same size, so the feeds
    can be cut into samples; None when one is a scalar or the leading sizes differ (silero-vad's
    sample-rate scalar beside its audio)."""
    sizes = {int(array.shape[0]) if array.ndim else None for array in feeds.values()}
    return sizes.pop() if len(sizes) == 1 else None


def latency_feeds(
    model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]
) -> tuple[int | None, dict[str, np.ndarray]]:
    """The inputs latency is timed on, and their batch size (None: the full inputs).

    The first ``LATENCY_BATCH`` rows of every input when every input's leading dimension is
    dynamic and all inputs have the same number of rows; otherwise the full inputs.
    """
    rows = batch_rows(model, feeds)
    if rows is None:
        return None, dict(feeds)
    batch = min(LATENCY_BATCH, rows)
    return batch, {name: array[:batch] for name, array in feeds.items()}
