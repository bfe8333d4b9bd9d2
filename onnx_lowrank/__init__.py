"""onnx-lowrank: post-export low-rank compression of ONNX models.

>>> import onnx_lowrank
>>> result = onnx_lowrank.compress("model.onnx", onnx_lowrank.CompressionConfig(params=0.5))
>>> result.save("model.lowrank.onnx")
>>> result.report.params_after / result.report.params_before
"""

from importlib.metadata import PackageNotFoundError, version

from .config import CompressionConfig
from .errors import (
    CalibrationError,
    ConfigError,
    InfeasibleBudgetError,
    InvalidModelError,
    ModelFileError,
    NothingToCompressError,
    OnnxLowRankError,
    OutputPathError,
    RuntimeMissingError,
    ShapeError,
    UnsupportedModelError,
    ValidationFailedError,
)
from .pipeline import compress, inspect
from .plots import plot_layers
from .records import CompressionReport, InspectionReport, LayerReport
from .result import CompressionResult
from .sweeps import SweepResult, sweep

try:
    __version__ = version("onnx-lowrank")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "CalibrationError",
    "CompressionConfig",
    "CompressionReport",
    "CompressionResult",
    "ConfigError",
    "InfeasibleBudgetError",
    "InspectionReport",
    "InvalidModelError",
    "LayerReport",
    "ModelFileError",
    "NothingToCompressError",
    "OnnxLowRankError",
    "OutputPathError",
    "RuntimeMissingError",
    "ShapeError",
    "SweepResult",
    "UnsupportedModelError",
    "ValidationFailedError",
    "__version__",
    "compress",
    "inspect",
    "plot_layers",
    "sweep",
]
