"""sweep(): spectra once, every budget × method solved, models, JSON rows and the plot."""

from __future__ import annotations

import json
import subprocess
import sys

import onnx
import pytest
from builders import MNIST, check_model

import onnx_lowrank
from onnx_lowrank import CompressionConfig, ConfigError, InfeasibleBudgetError, compress
from onnx_lowrank.cost import count_parameters


def test_sweep_solves_every_point_with_spectra_computed_once(tmp_path):
    events = []
    result = onnx_lowrank.sweep(
        MNIST,
        CompressionConfig(latency_runs=1),
        tmp_path / "out",
        params=[0.7, 0.4],
        methods=["alds", "svd"],
        progress=lambda stage, done, total: events.append((stage, done, total)),
    )
    spectra = [event for event in events if event[0] == "spectra"]
    assert [done for _, done, _ in spectra] == [1, 2, 3, 4]  # once per layer, not per point
    assert [(row["method"], row["params"]) for row in result.rows] == [
        ("alds", 0.7),
        ("svd", 0.7),
        ("alds", 0.4),
        ("svd", 0.4),
    ]
    folder = tmp_path / "out"
    for row in result.rows:
        model = onnx.load(folder / row["model"])
        check_model(model)
        assert count_parameters(model) == row["params_after"]
        assert row["params_fraction"] <= row["params"] * 1.001
        assert row["validation_passed"] is True and row["outputs"][0]["name"] == "logits"
        saved = json.loads((folder / row["model"].replace(".onnx", ".json")).read_text())
        assert saved["max_error_bound"] == row["max_error_bound"]
        assert saved["report"]["params_after"] == row["params_after"]
    overall = json.loads(result.json.read_text())
    assert overall["rows"] == result.rows
    alds = {row["params"]: row["max_error_bound"] for row in result.rows if row["method"] == "alds"}
    svd = {row["params"]: row["max_error_bound"] for row in result.rows if row["method"] == "svd"}
    assert all(alds[p] < svd[p] for p in alds)
    assert result.plot is not None and result.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result.notice is None


def test_a_sweep_point_is_the_model_compress_writes(tmp_path):
    config = CompressionConfig(validate=False, max_groups=4)
    result = onnx_lowrank.sweep(MNIST, config, tmp_path, flops=[0.6], methods=["alds-paper"])
    single = compress(MNIST, config.replace(flops=0.6, method="alds-paper"))
    written = (tmp_path / result.rows[0]["model"]).read_bytes()
    assert written == single.model.SerializeToString()
    assert result.rows[0]["macs_fraction"] <= 0.6
    assert result.rows[0]["validation_passed"] is None


def test_an_infeasible_point_raises_before_anything_is_written(tmp_path):
    with pytest.raises(
        InfeasibleBudgetError, match=r"--params 0\.001 with --method alds: .* 0\.010"
    ):
        onnx_lowrank.sweep(
            MNIST,
            CompressionConfig(validate=False),
            tmp_path / "out",
            params=[0.5, 0.001],
            methods=["alds", "svd"],
        )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("params", "flops", "message"),
    [([], [], "no budget"), ([0.5, 0.4], [0.5], "same length")],
)
def test_bad_budget_lists_are_config_errors(tmp_path, params, flops, message):
    with pytest.raises(ConfigError, match=message):
        onnx_lowrank.sweep(MNIST, CompressionConfig(), tmp_path, params=params, flops=flops)


def run_cli(*args: str, block_matplotlib: bool = False) -> subprocess.CompletedProcess:
    prelude = "import sys; sys.modules['matplotlib'] = None; " if block_matplotlib else ""
    code = prelude + "from onnx_lowrank.cli import main; sys.exit(main(sys.argv[1:]))"
    if not block_matplotlib:
        code = "import sys; " + code
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300
    )


def test_cli_sweep_pairs_budgets_and_notes_a_missing_matplotlib(tmp_path):
    result = run_cli(
        "sweep",
        str(MNIST),
        "--params",
        "0.8,0.5",
        "--flops",
        "0.9,0.6",
        "--method",
        "alds,energy",
        "--out",
        str(tmp_path),
        "--no-validate",
        "--max-groups",
        "all",
        block_matplotlib=True,
    )
    assert result.returncode == 0, result.stderr
    assert "alds    params 0.8 flops 0.9" in result.stdout
    assert result.stderr.strip().splitlines() == [
        "onnx-lowrank: note: matplotlib is not installed; no plot written "
        "(pip install 'onnx-lowrank[plot]')"
    ]
    rows = json.loads((tmp_path / "sweep.json").read_text())["rows"]
    assert len(rows) == 4 and not (tmp_path / "sweep.png").exists()
    for row in rows:
        assert row["params_fraction"] <= row["params"] * 1.001
        assert row["macs_fraction"] <= row["flops"] * 1.001


def test_cli_sweep_rejects_an_unknown_method_in_one_line(tmp_path):
    result = run_cli("sweep", str(MNIST), "--params", "0.5", "--method", "alds,magic", "--out", "x")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "unknown method magic" in result.stderr


def test_sweep_with_calibration_collects_statistics_once(tmp_path):
    import numpy as np

    data = np.load(MNIST.parent / "mnist_train_calib.npz")
    images = data["images"][:200].astype(np.float32) / 255.0
    calibration = tmp_path / "calibration.npz"
    np.savez(calibration, input=((images - 0.1307) / 0.3081)[:, None])
    events = []
    result = onnx_lowrank.sweep(
        MNIST,
        CompressionConfig(calibration=str(calibration), latency_runs=1),
        tmp_path / "out",
        params=[0.5, 0.3],
        methods=["alds", "svd"],
        progress=lambda stage, done, total: events.append((stage, done, total)),
    )
    passes = [event for event in events if event[0] == "calibrate"]
    statistics = 200 - 32  # --error network (the default) holds 32 samples out
    assert passes and passes[-1][1] == passes[-1][2] == statistics  # one pass over the data
    assert len([event for event in passes if event[1] == event[2]]) == 1
    for row in result.rows:
        report = json.loads((tmp_path / "out" / row["model"].replace(".onnx", ".json")).read_text())
        assert report["report"]["config"]["error"] == "network"
        assert report["report"]["calibration"]["samples"] == statistics
