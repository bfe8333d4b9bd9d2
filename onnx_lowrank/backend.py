"""Choice of array library: NumPy on the CPU, CuPy on a CUDA GPU.

This is the only module that imports CuPy, and it does so lazily, when a GPU is asked for.
Numerical stages receive a ``Backend`` and use ``backend.xp``, an array-API-standard namespace
(through ``array_api_compat``), so the same code runs on NumPy, CuPy and the strict reference
namespace used by the tests. Arrays return to NumPy at every stage boundary.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from .errors import RuntimeMissingError

__all__ = ["Backend", "cuda_available", "get_backend", "numpy_backend"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backend:
    """An array namespace and how to move arrays onto and off it.

    Attributes:
        name: ``"numpy"``, ``"cupy"``, or the name of another array-API namespace.
        xp: the array-API-standard namespace.
    """

    name: str
    xp: ModuleType

    def asarray(self, array: np.ndarray) -> Any:
        """Move a NumPy array onto the backend as float64."""
        return self.xp.asarray(np.asarray(array, dtype=np.float64))

    def to_numpy(self, array: Any) -> np.ndarray:
        """Bring a backend array back to NumPy (a device-to-host copy for CuPy)."""
        if self.name == "cupy":
            return array.get()
        if isinstance(array, (np.ndarray, np.generic)):
            return np.asarray(array)
        return np.from_dlpack(array)

    def free(self) -> None:
        """Release cached device memory between layers (a no-op on the CPU)."""
        if self.name == "cupy":
            import cupy

            cupy.get_default_memory_pool().free_all_blocks()


def numpy_backend() -> Backend:
    """The CPU backend."""
    from array_api_compat import numpy as compat_numpy

    return Backend("numpy", compat_numpy)


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
