"""Choice of array library: NumPy on the CPU, CuPy on a CUDA GPU, and how CPU work is threaded.

This is the only module that imports CuPy, and it does so lazily, when a GPU is asked for.
Numerical stages receive a ``Backend`` and use ``backend.xp``, an array-API-standard namespace
(through ``array_api_compat``), so the same code runs on NumPy, CuPy and the strict reference
namespace used by the tests. Arrays return to NumPy at every stage boundary.

**Threads on the CPU.** The spectra and factors are many independent dense problems (one per
channel group, layer and group count), most of them small or medium (64–1024), where LAPACK's
own threading gains little: the symmetric tridiagonal reduction is half matrix-vector work and
synchronizes its threads at every column. Worse, OpenBLAS threads spin while they wait, so on a
machine whose cores are busy with anything else a two-thread ``eigvalsh`` was measured 7–35×
slower than a one-thread one (docs/performance.md). So the NumPy backend runs BLAS/LAPACK with
one thread inside ``Backend.parallel()`` (through threadpoolctl) and spreads independent
problems over ``workers`` Python threads instead (NumPy releases the GIL in LAPACK calls).
That uses every core on an idle machine and degrades gracefully on a busy one. Other backends
run the work in the calling thread.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType
from typing import Any, TypeVar

import numpy as np

from .errors import RuntimeMissingError

__all__ = ["Backend", "cpu_threads", "cuda_available", "get_backend", "numpy_backend"]

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class _InlineExecutor(Executor):
    """Runs every submitted call at once, in the calling thread."""

    def submit(self, fn: Callable[..., R], /, *args: Any, **kwargs: Any) -> Future[R]:
        future: Future[R] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # handed to the caller through future.result()
            future.set_exception(exc)
        return future


@dataclass(frozen=True)
class Backend:
    """An array namespace, how to move arrays onto and off it, and how to run work in parallel.

    Attributes:
        name: ``"numpy"``, ``"cupy"``, or the name of another array-API namespace.
        xp: the array-API-standard namespace.
        workers: threads for independent problems (NumPy only; 1 runs everything inline).
    """

    name: str
    xp: ModuleType
    workers: int = 1

    def asarray(self, array: np.ndarray, dtype: Any = np.float64) -> Any:
        """Move a NumPy array onto the backend as ``dtype`` (float64, or float32 where a
        caller runs its products in single precision; NumPy: no copy when it already is)."""
        return self.xp.asarray(np.asarray(array, dtype=dtype))

    def to_numpy(self, array: Any) -> np.ndarray:
        """Bring a backend array back to NumPy (a device-to-host copy for CuPy)."""
        if self.name == "cupy":
            return array.get()
        if isinstance(array, (np.ndarray, np.generic)):
            return np.asarray(array)
        return np.from_dlpack(array)

    def bmm(self, first: Any, second: Any) -> Any:
        """Stacked matrix product ``first[i] @ second[i]``, ``(k, m, n) @ (k, n, p)``.

        NumPy's stacked ``matmul`` does not call BLAS for every layout, so there it is a loop of
        2-D products into one array; other backends batch it (one cuBLAS call on CuPy).
        """
        if self.name != "numpy":
            return self.xp.matmul(first, second)
        result = np.empty(
            (first.shape[0], first.shape[1], second.shape[2]),
            dtype=np.result_type(first, second),
        )
        for index, (a, b) in enumerate(zip(first, second, strict=True)):
            np.matmul(a, b, out=result[index])
        return result

    def add_bmm(self, target: Any, first: Any, second: Any) -> None:
        """``target[i] += first[i] @ second[i]`` in place (an accumulation of Gram matrices;
        the products in the factors' dtype, the sum in the target's)."""
        if self.name != "numpy":
            self.add_into(target, self.xp.matmul(first, second))
            return
        for index, (a, b) in enumerate(zip(first, second, strict=True)):
            target[index] += a @ b

    def add_into(self, target: Any, value: Any) -> None:
        """``target += value`` in the target's dtype (float32 products into float64 sums;
        NumPy casts on the fly, without a float64 copy of ``value``)."""
        if self.name != "numpy" and value.dtype != target.dtype:
            value = self.xp.astype(value, target.dtype)
        target += value

    def sum_rows(self, matrix: Any) -> Any:
        """Column sums of a 2-D array, accumulated in float64 whatever its dtype."""
        return self.xp.sum(matrix, axis=0, dtype=self.xp.float64)

    def sum_squares(self, matrix: Any) -> Any:
        """Column sums of squares of a 2-D array, ``Σ_n x_nk²``, in float64 (NumPy: without
        a temporary of the matrix's size)."""
        if self.name == "numpy":
            return np.einsum("nk,nk->k", matrix, matrix, dtype=np.float64)
        return self.xp.sum(matrix * matrix, axis=0, dtype=self.xp.float64)

    def free(self) -> None:
        """Release cached device memory between layers (a no-op on the CPU)."""
        if self.name == "cupy":
            import cupy

            cupy.get_default_memory_pool().free_all_blocks()

    @contextmanager
    def parallel(self) -> Iterator[Executor]:
        """An executor for independent array work, with one BLAS thread per worker.

        NumPy with ``workers > 1``: a thread pool of ``workers`` threads, while BLAS/LAPACK
        are limited to one thread. Inside a worker of such a pool (nested use), and on other
        backends, an executor that runs each call at once in the calling thread.
        """
        if self.name != "numpy":
            yield _InlineExecutor()
            return
        with _single_threaded_blas():
            if self.workers <= 1 or getattr(_thread, "in_pool", False):
                yield _InlineExecutor()
                return
            with ThreadPoolExecutor(self.workers, initializer=_mark_pool_thread) as pool:
                yield pool

    def split_map(self, executor: Executor, function: Callable[[Any], Any], stack: Any) -> Any:
        """``function`` over a stack of matrices, split along axis 0 into one part per worker.

        ``function`` must map a ``(k, ...)`` stack to a ``(k, ...)`` array, or to a tuple of
        such arrays (each is then joined separately).
        """
        count = stack.shape[0]
        parts = min(self.workers, count)
        if parts <= 1 or isinstance(executor, _InlineExecutor):
            return function(stack)
        bounds = [count * part // parts for part in range(parts + 1)]
        futures = [
            executor.submit(function, stack[start:stop, ...])
            for start, stop in itertools.pairwise(bounds)
        ]
        results = [future.result() for future in futures]
        if isinstance(results[0], tuple):
            return tuple(
                self.xp.concat(list(items), axis=0) for items in zip(*results, strict=True)
            )
        return self.xp.concat(results, axis=0)

    def map(self, function: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
        """``function`` over ``items`` under ``parallel()``; results in the order of ``items``.

        At most ``2·workers`` calls are in flight, so memory stays bounded for long inputs.
        """
        with self.parallel() as executor:
            pending: list[Future[R]] = []
            for item in items:
                pending.append(executor.submit(function, item))
                if len(pending) >= 2 * self.workers:
                    yield pending.pop(0).result()
            for future in pending:
                yield future.result()


_thread = threading.local()
_blas_lock = threading.Lock()
_blas_users = 0
_blas_limiter: Any = None


def _mark_pool_thread() -> None:
    _thread.in_pool = True


@functools.cache
def _blas_controller() -> Any:
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


@contextmanager
def _single_threaded_blas() -> Iterator[None]:
    """Limit NumPy's BLAS/LAPACK to one thread while any caller is inside (process-wide).

    The limit is global, so nested and concurrent users share it: the first one sets it and
    the last one restores the original thread count.
    """
    global _blas_users, _blas_limiter
    with _blas_lock:
        if _blas_users == 0:
            _blas_limiter = _blas_controller().limit(limits=1, user_api="blas")
        _blas_users += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_users -= 1
            if _blas_users == 0:
                _blas_limiter.restore_original_limits()
                _blas_limiter = None


def cpu_threads() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def numpy_backend(workers: int | None = None) -> Backend:
    """The CPU backend, with ``workers`` threads (default: every core this process may use)."""
    from array_api_compat import numpy as compat_numpy

    return Backend("numpy", compat_numpy, cpu_threads() if workers is None else max(1, workers))


@functools.cache
def cuda_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device."""
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # ImportError, or CUDA driver/runtime errors of any kind
        return False


def get_backend(device: str = "auto") -> Backend:
    """The backend for ``device``.

    Args:
        device: ``"cpu"``; ``"cuda"`` (raises when CuPy or a GPU is missing); or ``"auto"``,
            which takes the GPU when one is usable and the CPU otherwise.

    Raises:
        RuntimeMissingError: ``device="cuda"`` but CuPy or a CUDA device is not available.
    """
    if device == "cpu" or (device == "auto" and not cuda_available()):
        return numpy_backend()
    if not cuda_available():
        raise RuntimeMissingError(
            "--device cuda needs CuPy and a visible CUDA GPU; install the GPU extra "
            "(pip install 'onnx-lowrank[gpu]') or use --device cpu"
        )
    from array_api_compat import cupy as compat_cupy

    log.info("using CuPy on the GPU for spectra and factors")
    return Backend("cupy", compat_cupy)
