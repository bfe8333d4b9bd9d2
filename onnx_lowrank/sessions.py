"""The one place that builds ONNX Runtime sessions, and the probe runner that feeds data through
them in batches.

Validation, calibration probes, shape probes and latency measurement (latency.py) all get their
sessions from ``make_session``, so a candidate's cost is measured with exactly the session
options its model is validated with: full graph optimization (``ORT_ENABLE_ALL``, ONNX
Runtime's default) and, where a thread count is given (``validate.session_threads``: validation
and latency measurement), exactly that many intra-op threads with one inter-op thread and
sequential execution. ``session_settings`` describes them for cache keys and reports.

**Probe runs** (``run_batches``). Calibration statistics (activations.py), output errors
(output_errors.py) and the refit (refit.py) need tensors inside the graph: a copy of the model
exposes them as extra graph outputs (``exposed``), and the data runs through it batch by batch.
Batches have the model's fixed batch size (``fixed_batch``), or else grow from one sample to what
fits in ``ACTIVATION_BYTES`` (at most ``MAX_BATCH``), so memory stays bounded whatever the input
size. ONNX Runtime never fuses away a node whose output is a graph output, so the exposed tensors
are the original graph's.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
from onnx.external_data_helper import uses_external_data

from .errors import InvalidModelError, RuntimeMissingError
from .feeds import graph_inputs
from .graphs import external_array, tensor_to_array
from .surgery import Surgery
from .types import Progress
from .walk import iter_graphs, iter_tensors

__all__ = [
    "ACTIVATION_BYTES",
    "MAX_BATCH",
    "exposed",
    "fixed_batch",
    "make_session",
    "run_batches",
    "runtime",
    "session_settings",
]

#: Name of the ``GraphOptimizationLevel`` every session uses.
OPTIMIZATION = "ORT_ENABLE_ALL"
#: Target bytes of the activations one probe batch exposes (``run_batches``).
ACTIVATION_BYTES = 256 * 2**20
#: Most samples per probe batch.
MAX_BATCH = 64


def runtime():
    """The ``onnxruntime`` module.

    Raises:
        RuntimeMissingError: it is not installed.
    """
    try:
        import onnxruntime
    except ImportError as exc:
        raise RuntimeMissingError(
            "onnxruntime is not installed; install it with pip install 'onnx-lowrank[cpu]' "
            "(or [gpu]), or pass --no-validate"
        ) from exc
    return onnxruntime


def make_session(
    model: onnx.ModelProto | bytes | str | os.PathLike,
    providers: Sequence[str | tuple[str, dict]],
    threads: int | None = None,
    *,
    log_level: int = 4,
    data_dir: str | os.PathLike | None = None,
):
    """An ``InferenceSession`` with the options every stage shares.

    Args:
        model: a ModelProto, its serialized bytes, or a path (read by ONNX Runtime itself, with
            its external data).
        providers: execution providers in order of preference (names, or ``(name, options)``).
        threads: with a count, the intra-op thread pool has exactly that many threads (one
            inter-op thread, sequential execution), so sessions timed in turn have the same
            pools. Spinning is left at ONNX Runtime's default, as deployments run it
            (docs/performance.md, "Latency"). None: ONNX Runtime's own choice.
        log_level: ONNX Runtime's log severity; 4 keeps stderr quiet (failures surface as
            exceptions).
        data_dir: the folder of a ModelProto loaded lazily (load.py), whose weights are
            still in its external data files. ONNX Runtime reads a model given as bytes without
            knowing its folder, so those weights are handed to it as external initializers,
            memory-mapped from their files (``model`` may be changed: pass a copy).
    """
    ort = runtime()
    options = ort.SessionOptions()
    options.log_severity_level = log_level
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPTIMIZATION)
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    buffers: list = []
    if isinstance(model, onnx.ModelProto):
        if data_dir is not None:
            buffers = _external_initializers(model, data_dir, options)
        source: bytes | str = model.SerializeToString()
    elif isinstance(model, bytes):
        source = model
    else:
        source = str(model)
    session = ort.InferenceSession(source, options, providers=list(providers))
    session.onnx_lowrank_buffers = buffers  # ONNX Runtime reads them for the session's life
    return session


def _external_initializers(model: onnx.ModelProto, data_dir: str | os.PathLike, options) -> list:
    """Give ``options`` the main-graph initializers that still sit in external files (as
    memory maps); read in any other external tensor (subgraphs, Constant nodes). Returns the
    arrays and values, which must live as long as the session. An external initializer that
    no node reads (a probe's replaced weight) is removed: ONNX Runtime drops unused
    initializers before it looks for the handed ones, and fails on a missing name."""
    ort = runtime()
    read = {
        name for graph in iter_graphs(model.graph) for node in graph.node for name in node.input
    }
    read |= {info.name for info in (*model.graph.input, *model.graph.output)}
    unused = [t for t in model.graph.initializer if uses_external_data(t) and t.name not in read]
    for tensor in unused:
        model.graph.initializer.remove(tensor)
    names, values, arrays = [], [], []
    for tensor in model.graph.initializer:
        if not uses_external_data(tensor):
            continue
        try:
            array = external_array(tensor, data_dir)
            value = ort.OrtValue.ortvalue_from_numpy(array)
        except (InvalidModelError, RuntimeError, TypeError, ValueError):
            continue  # read in below (an element type NumPy or ONNX Runtime cannot map)
        names.append(tensor.name)
        values.append(value)
        arrays.append(array)
    handed = set(names)
    for tensor in iter_tensors(model):
        if uses_external_data(tensor) and tensor.name not in handed:
            array = np.asarray(tensor_to_array(tensor, data_dir))
            tensor.CopyFrom(onnx.numpy_helper.from_array(array, tensor.name))
    if names:
        options.add_external_initializers(names, values)
    return [*arrays, *values]


def session_settings(threads: int | None) -> dict[str, Any]:
    """The session options ``make_session(..., threads)`` uses and the runtime's version."""
    return {
        "onnxruntime": runtime().__version__,
        "intra_op_num_threads": threads,
        "graph_optimization_level": OPTIMIZATION,
    }


# --------------------------------------------------------------------------------------------
# Probe runs


def fixed_batch(model: onnx.ModelProto) -> int | None:
    """The batch size the model's inputs fix in their first dimension, or None when dynamic."""
    sizes = set()
    for info in graph_inputs(model):
        dims = info.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
            sizes.add(dims[0].dim_value)
    return min(sizes) if sizes else None


def exposed(model: onnx.ModelProto, outputs: Mapping[str, int]) -> onnx.ModelProto:
    """A copy of ``model`` with the main-graph tensors ``outputs`` (name -> element type) as
    graph outputs, edited through onnx-graphsurgeon (``surgery.Surgery``); the model is not
    modified. A name that already is a graph input or output is left as it is.

    Raises:
        InvalidModelError: a name is not a tensor of the main graph.
    """
    surgery = Surgery(model)
    graph = surgery.graph
    tensors = graph.tensors()
    present = {tensor.name for tensor in (*graph.inputs, *graph.outputs)}
    present |= {info.name for info in graph_inputs(model)}
    for name, elem_type in outputs.items():
        if name in present:
            continue
        if name not in tensors:
            raise InvalidModelError(f"cannot expose {name!r}: it is not a tensor of the main graph")
        tensor = tensors[name]
        if tensor.dtype is None:
            tensor.dtype = onnx.helper.tensor_dtype_to_np_dtype(elem_type)
        graph.outputs.append(tensor)
    return surgery.export()


def run_batches(
    model: onnx.ModelProto,
    wanted: Mapping[str, int],
    feeds: Mapping[str, np.ndarray],
    providers: Sequence[str],
    progress: Progress | None,
    stage: str = "calibrate",
    other: onnx.ModelProto | None = None,
    other_wanted: Sequence[str] = (),
    *,
    data_dir: str | os.PathLike | None = None,
    other_data_dir: str | os.PathLike | None = None,
) -> Iterator[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """Yield, per batch, the ``wanted`` tensors (name -> element type) of ``model`` and
    ``other_wanted`` of ``other``.

    Both models run on the same batch (see the module docstring for its size), and report
    ``progress(stage, samples_done, samples)``. ``data_dir`` and ``other_data_dir`` are the
    folders of models whose weights are still in external files (``make_session``).
    """
    # Full optimization runs EfficientNet-Lite0 2.4x faster than none, with the same exposed
    # values to 1e-5 (checked on the MNIST CNN, CREPE and EfficientNet-Lite0).
    session = make_session(exposed(model, wanted), providers, log_level=3, data_dir=data_dir)
    second = None
    if other is not None:
        other_types = {name: wanted[name] for name in other_wanted}
        second = make_session(
            exposed(other, other_types), providers, log_level=3, data_dir=other_data_dir
        )
    samples = int(next(iter(feeds.values())).shape[0])
    fixed = fixed_batch(model)
    size = fixed or 1
    start = 0
    while start < samples:
        batch = {name: np.asarray(array[start : start + size]) for name, array in feeds.items()}
        fetch = [name for name in wanted if name not in batch]
        # an empty fetch list would make ONNX Runtime return every output
        values = session.run(fetch, batch) if fetch else []
        activations = dict(zip(fetch, values, strict=True))
        activations.update({name: batch[name] for name in wanted if name in batch})
        others = {}
        if second is not None:
            others = dict(zip(other_wanted, second.run(list(other_wanted), batch), strict=True))
        done = min(start + size, samples)
        yield activations, others
        if progress is not None:
            progress(stage, done, samples)
        if fixed is None:
            taken = sum(value.nbytes for value in activations.values()) / (done - start)
            size = int(min(MAX_BATCH, max(1, ACTIVATION_BYTES // max(taken, 1.0))))
        start = done
