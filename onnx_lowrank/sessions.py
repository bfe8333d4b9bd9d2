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

import onnx

from .errors import RuntimeMissingError

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
    """
    ort = runtime()
    options = ort.SessionOptions()
    options.log_severity_level = log_level
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPTIMIZATION)
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if isinstance(model, onnx.ModelProto):
        source: bytes | str = model.SerializeToString()
    elif isinstance(model, bytes):
        source = model
    else:
        source = str(model)
    return ort.InferenceSession(source, options, providers=list(providers))


def session_settings(threads: int | None) -> dict[str, Any]:
    """The session options ``make_session(..., threads)`` uses and the runtime's version."""
    return {
        "onnxruntime": runtime().__version__,
        "intra_op_num_threads": threads,
        "graph_optimization_level": OPTIMIZATION,
    }
