"""Dynamic input sizes: a parameter budget needs none, and MACs are counted at the sizes the
user's data (``--inputs``, ``--calibration``) has when no ``--input-shape`` is given."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
from builders import MODELS, check_model

from onnx_lowrank import CompressionConfig, compress, inspect
from onnx_lowrank.cost import count_macs
from onnx_lowrank.shapes import infer_shapes

CLS = MODELS / "ppocr_mobile_v2.0_cls.onnx"  # input x: (-1, 3, ?, ?)


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "onnx_lowrank", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def macs_at(shape: tuple[int, ...]) -> int:
    model = onnx.load(CLS)
    macs, unknown = count_macs(model, infer_shapes(model, {"x": shape}))
    assert not unknown
    return macs


def test_params_budget_compresses_a_model_with_dynamic_sizes_and_says_validation_skipped(
    tmp_path,
):
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    result = run_cli("compress", CLS, "-o", out, "--params", "0.8", "--report", report)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("validation")]
    assert len(lines) == 1
    assert "skipped" in lines[0] and "x[2], x[3]" in lines[0] and "PASSED" not in result.stdout
    assert "n/a (dynamic)" in result.stdout  # the MAC row: no total that leaves nodes out
    data = json.loads(report.read_text())
    assert data["validation"] is None and "x[2], x[3]" in data["validation_skipped"]
    assert data["macs_before"] is None and data["macs_after"] is None
    assert data["macs_fraction"] is None
    assert data["params_after"] <= 0.8 * data["params_before"] * 1.001
    model = onnx.load(out)
    check_model(model)  # checker, ORT loads it


def test_silero_vad_params_budget_needs_no_sizes(tmp_path):
    out = tmp_path / "out.onnx"
    result = run_cli("compress", MODELS / "silero_vad.onnx", "-o", out, "--params", "0.8")
    assert result.returncode == 0, result.stderr
    assert "input[1], state[1]" in result.stdout and out.exists()


def test_flops_budget_still_needs_sizes(tmp_path):
    result = run_cli("compress", CLS, "-o", tmp_path / "out.onnx", "--flops", "0.8")
    assert result.returncode == 2
    assert "--flops needs the MACs" in result.stderr and len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "out.onnx").exists()


def test_inspect_marks_unknown_macs():
    listing = inspect(CLS)
    assert listing.macs is None
    result = run_cli("inspect", CLS)
    assert result.returncode == 0 and "MACs n/a (dynamic)" in result.stdout


def test_macs_are_counted_at_the_sizes_of_the_given_data(tmp_path):
    rng = np.random.default_rng(0)
    inputs, calibration = tmp_path / "inputs.npz", tmp_path / "calibration.npz"
    np.savez(inputs, x=rng.standard_normal((3, 3, 48, 192)).astype(np.float32))
    np.savez(calibration, x=rng.standard_normal((2, 3, 96, 384)).astype(np.float32))
    small, large = macs_at((1, 3, 48, 192)), macs_at((1, 3, 96, 384))
    assert large > 3 * small  # the count depends on the size: the data must decide it

    given = compress(CLS, CompressionConfig(params=0.8, inputs=str(inputs), latency_runs=1))
    assert given.report.macs_before == small  # per sample: the batch of 3 is not counted
    assert given.report.macs_after is not None and given.report.macs_after < small
    assert any("from --inputs" in note for note in given.report.notes)

    calibrated = compress(
        CLS,
        CompressionConfig(  # sizes only: no refit
            params=0.8, calibration=str(calibration), validate=False, refit=False
        ),
    )
    assert calibrated.report.macs_before == large
    # --input-shape wins over the data
    shaped = compress(
        CLS,
        CompressionConfig(
            params=0.8,
            calibration=str(calibration),
            validate=False,
            refit=False,
            input_shapes={"x": (1, 3, 48, 192)},
        ),
    )
    assert shaped.report.macs_before == small


def test_calibration_sizes_make_random_validation_inputs(tmp_path):
    calibration = tmp_path / "calibration.npz"
    rng = np.random.default_rng(1)
    np.savez(calibration, x=rng.standard_normal((2, 3, 48, 192)).astype(np.float32))
    result = compress(
        CLS,
        CompressionConfig(  # sizes only: no refit
            params=0.8, calibration=str(calibration), latency_runs=1, refit=False
        ),
    )
    assert result.report.validation is not None and result.report.validation_skipped is None
    assert result.report.validation.outputs[0].shape[0] > 0
