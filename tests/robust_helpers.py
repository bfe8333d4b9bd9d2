"""Helpers for the robustness tests: full-rank rewrites, output comparison, file hashes, and
the cache of real models that are too large or unlicensed for the repository."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from builders import runtime_loads

from onnx_lowrank.discover import discover
from onnx_lowrank.factorize import factorize
from onnx_lowrank.graphs import opset_version
from onnx_lowrank.rewrite import rewrite

#: Real models outside the repository (see tests/models/README.md); tests skip without them.
CACHE = Path(
    os.environ.get("ONNX_LOWRANK_MODELS", Path.home() / ".cache" / "onnx-lowrank" / "models")
)


def cached(name: str) -> Path:
    """A model of the cache, or skip the test when it is not there."""
    path = CACHE / name
    if not path.exists():
        pytest.skip(f"{name} is not in the model cache {CACHE} (tests/models/fetch_models.py)")
    if path.suffix == ".onnx":
        model = onnx.load(path, load_external_data=False)
        if not runtime_loads(model.ir_version, opset_version(model)):
            pytest.skip(f"onnxruntime {ort.__version__} cannot load {name} (IR {model.ir_version})")
    return path


def full_rank(model: onnx.ModelProto, **discover_options) -> onnx.ModelProto:
    """``model`` with every compressible layer rewritten at full rank (g = 1)."""
    discovery = discover(model, **discover_options)
    replacements = []
    for layer in discovery.layers:
        weight = discovery.weight(layer)
        replacements.append((layer, factorize(weight, 1, min(weight.shape))))
    return rewrite(model, replacements)


def session(model: onnx.ModelProto | str | os.PathLike) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 4
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def outputs(model, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    return session(model).run(None, dict(feeds))


def assert_close(original, compressed, feeds: Mapping[str, np.ndarray], tolerance=1e-4) -> None:
    """Checker (full), then the same outputs in ONNX Runtime up to ``tolerance`` (rel. L2)."""
    if isinstance(compressed, onnx.ModelProto):
        onnx.checker.check_model(compressed, full_check=True)
    else:
        onnx.checker.check_model(str(compressed), full_check=True)
    for before, after in zip(outputs(original, feeds), outputs(compressed, feeds), strict=True):
        assert before.shape == after.shape
        before64, after64 = before.astype(np.float64), after.astype(np.float64)
        scale = max(float(np.linalg.norm(before64)), 1e-12)
        assert float(np.linalg.norm(before64 - after64)) / scale <= tolerance


def file_hashes(*paths: Path) -> dict[str, str]:
    """SHA-256 of every file under the given files and folders."""
    hashes = {}
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            hashes[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return hashes
