"""Every real model we have, end to end: at full rank the rewrite reproduces the original, a
budgeted compression passes the checker and runs in ONNX Runtime with names and opsets kept,
and the input files are never changed. Cache-only models skip when the cache is absent."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from builders import MNIST, MODELS
from robust_helpers import assert_close, cached, file_hashes, full_rank, outputs

from onnx_lowrank import CompressionConfig, NothingToCompressError, compress
from onnx_lowrank.discover import discover
from onnx_lowrank.load import external_data_files, open_model
from onnx_lowrank.save import save_model

RNG = np.random.default_rng(0)


def silero_feeds(rate: int) -> dict[str, np.ndarray]:
    samples = 576 if rate == 16000 else 288
    return {
        "input": (0.1 * RNG.standard_normal((1, samples))).astype(np.float32),
        "state": np.zeros((2, 1, 128), np.float32),
        "sr": np.array(rate, dtype=np.int64),
    }


def images(shape, scale=1.0) -> np.ndarray:
    return (scale * RNG.standard_normal(shape)).astype(np.float32)


REPO_MODELS = {
    "mnist": (MNIST, {"input": images((2, 1, 28, 28))}),
    "ppocr_constant_nodes": (MODELS / "ppocr_mobile_v2.0_cls.onnx", {"x": images((1, 3, 48, 192))}),
    "mtcnn_channels_last": (MODELS / "mtcnn_onet.onnx", {"input_3": images((2, 48, 48, 3))}),
    "crepe_tall_kernels": (MODELS / "crepe_tiny.onnx", {"frames": images((2, 1024))}),
}


@pytest.mark.parametrize("name", sorted(REPO_MODELS))
def test_full_rank_rewrite_reproduces_repo_models(name):
    path, feeds = REPO_MODELS[name]
    model = onnx.load(path)
    compressed = full_rank(model)
    assert compressed.opset_import == model.opset_import
    assert [o.name for o in compressed.graph.output] == [o.name for o in model.graph.output]
    assert_close(model, compressed, feeds, tolerance=1e-4)


def test_silero_vad_if_subgraphs(tmp_path):
    """All weights of silero-vad sit in the two branches of an If (16 and 8 kHz). Both branches
    are compressed in place; the first Conv of each branch, the fixed STFT basis, is a layer like
    any other (its flat spectrum makes every rank cut costly in error)."""
    path = MODELS / "silero_vad.onnx"
    before = file_hashes(path)
    model = onnx.load(path)
    discovery = discover(model)
    assert len(discovery.layers) == 10
    assert {layer.graph_path[0][1] for layer in discovery.layers} == {"then_branch", "else_branch"}
    stft = [layer for layer in discovery.layers if "stft" in layer.name]
    assert [layer.weight_shape for layer in stft] == [(130, 1, 128), (258, 1, 256)]
    reasons = [s.reason for s in discovery.skipped]
    assert (
        reasons
        == ["too small to factorize: rank 1 already costs 129 weights, the layer has 128"] * 2
    )
    compressed = full_rank(model)
    for rate in (16000, 8000):
        assert_close(model, compressed, silero_feeds(rate), tolerance=1e-4)
    np.savez(tmp_path / "inputs.npz", **silero_feeds(16000))
    result = compress(
        path,
        CompressionConfig(
            params=0.8, method="svd", inputs=str(tmp_path / "inputs.npz"), latency_runs=1
        ),
    )
    assert result.report.validation.passed
    assert len(result.report.compressed_layers) == 10
    onnx.checker.check_model(result.model, full_check=True)
    for rate in (16000, 8000):
        outputs(result.model, silero_feeds(rate))
    assert file_hashes(path) == before


def test_khmersm_external_data(tmp_path):
    """External data in the real model: loaded eagerly and lazily, written back as external data
    by default, and the input's files stay as they were (CLI, like a user would run it)."""
    path = cached("khmersm/model.onnx")
    before = file_hashes(path.parent)
    feeds = {"x": RNG.integers(1, 60, (1, 20)).astype(np.int64), "mask": np.ones((1, 20), bool)}
    loaded = open_model(path, lazy=True)  # weights read one at a time from model.onnx.data
    full = save_model(
        full_rank(loaded.model, data_dir=loaded.data_dir),
        tmp_path / "full.onnx",
        external_data=True,
        data_dir=loaded.data_dir,
    )
    assert_close(path, full, feeds, tolerance=1e-4)
    out = tmp_path / "out.onnx"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "onnx_lowrank",
            "compress",
            str(path),
            "-o",
            str(out),
            "--params",
            "0.7",
            "--input-shape",
            "x:1,20",
            "--input-shape",
            "mask:1,20",
            "--latency-runs",
            "1",
            "-q",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert external_data_files(out) == ((tmp_path / "out.onnx.data").resolve(),)
    onnx.checker.check_model(str(out), full_check=True)
    assert outputs(out, feeds)[0].shape == (1, 20, 2)
    assert file_hashes(path.parent) == before


def test_cifar10_keras_channels_last():
    path = cached("cifar10_keras_cnn.onnx")
    model = onnx.load(path)
    discovery = discover(model)
    assert [layer.op_type for layer in discovery.layers] == ["Conv"] * 6 + ["MatMul"] * 3
    feeds = {"conv2d_input": images((2, 32, 32, 3), 50.0) + 128}
    assert_close(model, full_rank(model), feeds, tolerance=1e-4)
    result = compress(path, CompressionConfig(params=0.5, latency_runs=1))
    assert result.report.validation.passed
    assert result.model.opset_import == model.opset_import


@pytest.mark.slow
def test_efficientnet_lite0_depthwise_and_pads():
    path = cached("efficientnet_lite0.onnx")
    model = onnx.load(path)
    discovery = discover(model)
    assert sum("depthwise" in s.reason for s in discovery.skipped) == 16
    assert len(discovery.layers) == 49 - 16 + 1
    assert_close(model, full_rank(model), {"input": images((1, 3, 224, 224))}, tolerance=1e-4)


def test_ddddocr_quantized_is_left_alone():
    path = cached("ddddocr_common_old.onnx")
    discovery = discover(onnx.load(path))
    assert discovery.layers == []
    assert all("quantized" in s.reason for s in discovery.skipped)
    with pytest.raises(NothingToCompressError, match="23 × quantized operator"):
        compress(path, CompressionConfig(params=0.5))
