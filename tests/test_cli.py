"""The command line: outputs, reports, exit codes, and one-line errors for bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import onnx
import pytest
from builders import MNIST, check_model

from onnx_lowrank import CompressionConfig
from onnx_lowrank.cli import main
from onnx_lowrank.cli_options import build_parser
from onnx_lowrank.cost import count_parameters


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "onnx_lowrank", *args], capture_output=True, text=True, timeout=300
    )


def test_compress_writes_model_and_report(tmp_path):
    out, report_path = tmp_path / "small.onnx", tmp_path / "report.json"
    before = MNIST.read_bytes()
    result = run_cli(
        "compress",
        str(MNIST),
        "-o",
        str(out),
        "--params",
        "0.5",
        "--report",
        str(report_path),
        "--latency-runs",
        "2",
        "--timings",
    )
    assert result.returncode == 0, result.stderr
    assert "parameters" in result.stdout and "validation" in result.stdout
    assert "timings:" in result.stdout
    model = onnx.load(out)
    check_model(model)
    report = json.loads(report_path.read_text())
    for key in (
        "params_before",
        "params_after",
        "macs_before",
        "macs_after",
        "config",
        "validation",
        "layers",
        "timings",
    ):
        assert key in report
    assert report["params_after"] == count_parameters(model)
    assert report["params_after"] <= 0.5 * report["params_before"] * 1.01
    for layer in report["layers"]:
        assert set(layer) >= {
            "name",
            "op_type",
            "weight_shape",
            "groups",
            "rank",
            "params_before",
            "params_after",
            "error_bound",
            "error_actual",
            "skipped_reason",
        }
    assert report["config"]["params"] == 0.5
    assert MNIST.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "small.onnx"]


def test_inspect_prints_layers(capsys):
    assert main(["inspect", str(MNIST)]) == 0
    out = capsys.readouterr().out
    assert "/features/features.3/Conv" in out and "421,642 parameters" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["compress", "missing.onnx", "-o", "x.onnx", "--params", "0.5"], "not found"),
        (["compress", "{tmp}", "-o", "x.onnx", "--params", "0.5"], "is a directory"),
        (["compress", "{empty}", "-o", "x.onnx", "--params", "0.5"], "empty"),
        (["compress", "{text}", "-o", "x.onnx", "--params", "0.5"], "not an ONNX model"),
        (["compress", "{truncated}", "-o", "x.onnx", "--params", "0.5"], "not an ONNX model"),
        (["compress", "{mnist}", "-o", "x.onnx", "--params", "1.5"], "(0, 1]"),
        (["compress", "{mnist}", "-o", "x.onnx", "--params", "0"], "(0, 1]"),
        (["compress", "{mnist}", "-o", "x.onnx", "--params", "abc"], "fraction"),
        (["compress", "{mnist}", "-o", "x.onnx"], "no budget"),
        (["compress", "{mnist}", "-o", "x.onnx", "--params", "0.001"], "smallest reachable"),
        (
            ["compress", "{mnist}", "-o", "x.onnx", "--flops", "0.001"],
            "--flops 0.001 is below the smallest reachable",
        ),
        (
            # alds reaches 0.05 with grouped candidates; svd, g = 1 only, cannot
            [
                "compress",
                "{mnist}",
                "-o",
                "x.onnx",
                "--params",
                "0.05",
                "--method",
                "svd",
                "--rank-multiple",
                "8",
            ],
            "with --method svd (g = 1): --params 0.05 is below the smallest reachable 0.073",
        ),
        (
            ["compress", "{mnist}", "-o", "x.onnx", "--params", "0.5", "--method", "magic"],
            "invalid choice",
        ),
        (
            ["compress", "{mnist}", "-o", "x.onnx", "--params", "0.5", "--input-shape", "input"],
            "NAME:D1,D2",
        ),
        (
            ["compress", "{mnist}", "-o", "x.onnx", "--params", "0.5", "--input-shape", "nope:1,2"],
            "not a graph input",
        ),
        (
            ["compress", "{mnist}", "-o", "{tmp}/no/such/dir/x.onnx", "--params", "0.5"],
            "does not exist",
        ),
        (["compress", "{mnist}", "-o", "{mnist}", "--params", "0.5"], "is the input model"),
        (
            ["compress", "{mnist}", "-o", "x.onnx", "--params", "0.5", "--max-groups", "0"],
            "positive integer",
        ),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_input_gets_one_line_and_nonzero_exit(tmp_path, args, message):
    (tmp_path / "empty.onnx").write_bytes(b"")
    (tmp_path / "text.onnx").write_text("this is not a model\n" * 20)
    (tmp_path / "truncated.onnx").write_bytes(MNIST.read_bytes()[:5000])
    mnist = tmp_path / "mnist.onnx"
    shutil.copy(MNIST, mnist)
    fill = {
        "tmp": str(tmp_path),
        "empty": str(tmp_path / "empty.onnx"),
        "text": str(tmp_path / "text.onnx"),
        "truncated": str(tmp_path / "truncated.onnx"),
        "mnist": str(mnist),
    }
    original = mnist.read_bytes()
    result = subprocess.run(
        [sys.executable, "-m", "onnx_lowrank", *[a.format(**fill) for a in args]],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("onnx-lowrank: error:")
    assert message in lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "x.onnx").exists()
    assert mnist.read_bytes() == original


def test_validation_failure_exits_3_and_writes_no_model(tmp_path):
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    result = run_cli(
        "compress",
        str(MNIST),
        "-o",
        str(out),
        "--params",
        "0.3",
        "--max-rel-error",
        "0.001",
        "--report",
        str(report),
        "--latency-runs",
        "1",
    )
    assert result.returncode == 3
    assert "validation failed" in result.stderr and "logits" in result.stderr
    assert not out.exists()
    assert json.loads(report.read_text())["validation"]["passed"] is False


def test_console_script_and_module_agree():
    script = shutil.which("onnx-lowrank")
    assert script is not None
    result = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.startswith("onnx-lowrank ")


def test_rank_multiple_defaults_to_1_and_takes_auto(capsys):
    """``--rank-multiple`` stays 1 by default (docs/performance.md, "Rank multiples": ``auto``
    made PP-OCR's budgets unreachable); ``auto`` and integers parse, and --help names both."""
    assert CompressionConfig().rank_multiple == 1
    base = ["compress", str(MNIST), "-o", "x.onnx", "--params", "0.5"]
    parser = build_parser()
    assert parser.parse_args(base).rank_multiple == 1
    assert parser.parse_args([*base, "--rank-multiple", "auto"]).rank_multiple == "auto"
    assert parser.parse_args([*base, "--rank-multiple", "8"]).rank_multiple == 8
    with pytest.raises(SystemExit):
        parser.parse_args(["compress", "--help"])
    assert "--rank-multiple N|auto" in capsys.readouterr().out
