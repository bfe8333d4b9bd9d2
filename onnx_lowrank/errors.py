"""One exception hierarchy for everything onnx-lowrank reports to its users.

Every error carries a message that names the problem and the fix. The CLI prints ``str(error)``
on one line and exits with ``error.exit_code``; the Python API simply raises. ``reason`` and
``file_kind`` phrase the parts of messages that the readers and writers share.
"""

from __future__ import annotations

import os
import stat

__all__ = [
    "CalibrationError",
    "ConfigError",
    "InfeasibleBudgetError",
    "InvalidModelError",
    "ModelFileError",
    "NothingToCompressError",
    "OnnxLowRankError",
    "OutOfMemoryError",
    "OutputPathError",
    "RuntimeMissingError",
    "ShapeError",
    "UnsupportedModelError",
    "ValidationFailedError",
    "file_kind",
    "reason",
]


class OnnxLowRankError(Exception):
    """Base class of every error raised on purpose by onnx-lowrank."""

    exit_code: int = 2


class ConfigError(OnnxLowRankError, ValueError):
    """An option or a combination of options is invalid."""


class ModelFileError(OnnxLowRankError):
    """The model path does not exist, is a directory, or cannot be read."""


class InvalidModelError(OnnxLowRankError):
    """The file is not a readable ONNX model (not protobuf, truncated, fails the checker)."""


class UnsupportedModelError(OnnxLowRankError):
    """The model is valid ONNX but uses something onnx-lowrank cannot handle."""


class ShapeError(OnnxLowRankError):
    """A shape is needed (FLOP budget, random inputs) but the model leaves it dynamic."""


class InfeasibleBudgetError(OnnxLowRankError):
    """No allocation meets the budget.

    Attributes:
        smallest_fraction: the smallest fraction of the budgeted quantity that can be reached,
            keyed by budget kind (``"params"`` or ``"flops"``).
    """

    def __init__(self, message: str, smallest_fraction: dict[str, float]):
        super().__init__(message)
        self.smallest_fraction = dict(smallest_fraction)


class NothingToCompressError(OnnxLowRankError):
    """The model has no layer that can be factorized. Not a failure: the CLI exits 0."""

    exit_code = 0


class OutputPathError(OnnxLowRankError):
    """The output path cannot be written, or would overwrite the input."""


class OutOfMemoryError(OnnxLowRankError):
    """An allocation failed (``MemoryError``); the message names its size when it is known."""


class RuntimeMissingError(OnnxLowRankError):
    """An optional package is needed but not installed or usable: ONNX Runtime, CuPy for
    ``device='cuda'``, or matplotlib for a requested plot."""


class CalibrationError(OnnxLowRankError):
    """Calibration data does not match the model's inputs."""


class ValidationFailedError(OnnxLowRankError):
    """The compressed model failed validation against the original.

    Attributes:
        report: the validation report (a ``ValidationReport``) that says which output failed.
    """

    exit_code = 3

    def __init__(self, message: str, report: object):
        super().__init__(message)
        self.report = report


def reason(exc: BaseException) -> str:
    """An exception's text on one line (at most 300 characters), to quote in a message."""
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())[:300]


def file_kind(path: str | os.PathLike) -> str:
    """What a path is, in words: 'a directory', 'a named pipe (FIFO)', ..."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return "not readable"
    for test, kind in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a named pipe (FIFO)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISREG, "a regular file"),
    ):
        if test(mode):
            return kind
    return "not a regular file"
