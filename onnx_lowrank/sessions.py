"""The one place that builds ONNX Runtime sessions.

Validation, calibration probes, shape probes and latency measurement (latency.py) all get their
sessions from ``make_session``, so a candidate's cost is measured with exactly the session
options its model is validated with: full graph optimization (``ORT_ENABLE_ALL``, ONNX
Runtime's default) and, where a thread count is given (``validate.session_threads``: validation
and latency measurement), exactly that many intra-op threads with one inter-op thread and
sequential execution. ``session_settings`` describes them for cache keys and reports.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
from onnx.external_data_helper import uses_external_data

from .errors import InvalidModelError, RuntimeMissingError
from .graphs import external_array, iter_tensors, tensor_to_array

__all__ = ["make_session", "runtime", "session_settings"]

#: Name of the ``GraphOptimizationLevel`` every session uses.
OPTIMIZATION = "ORT_ENABLE_ALL"


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
    arrays and values, which must live as long as the session."""
    ort = runtime()
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
