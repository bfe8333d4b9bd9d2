"""The per-layer plot (``--plot``, ``CompressionReport.plot``) and how report files are written."""

from __future__ import annotations

import os
import stat
import sys

import numpy as np
import pytest
from builders import MNIST, low_rank, make_model
from onnx import helper

import onnx_lowrank
from onnx_lowrank import CompressionConfig, RuntimeMissingError, compress
from onnx_lowrank.cli import main
from onnx_lowrank.plots import layer_figure
from onnx_lowrank.records import KEPT_DENSE
from onnx_lowrank.report import write_json

pytest.importorskip("matplotlib")

PNG = b"\x89PNG\r\n\x1a\n"


def usual_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def figure_data(figure):
    """(after-bar heights, bar colours, {series label: (x, y)}) of a ``layer_figure``."""
    top, bottom = figure.axes
    bars = [patch for container in top.containers[1:] for patch in container.patches]
    heights = [bar.get_height() for bar in bars]
    colours = [tuple(bar.get_facecolor()) for bar in bars]
    series = {
        line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
        for line in bottom.get_lines()
        if line.get_linestyle() == "None"
    }
    return heights, colours, series


def tiny_model():
    """A depthwise Conv (never factorized) and a Conv of rank 3 (factorized at half size)."""
    nodes = [
        helper.make_node("Conv", ["x", "Wd"], ["d"], name="depthwise", group=8, pads=[1] * 4),
        helper.make_node("Conv", ["d", "W"], ["y"], name="conv", pads=[1] * 4),
    ]
    weights = {
        "Wd": np.random.default_rng(0).standard_normal((8, 1, 3, 3)).astype(np.float32),
        "W": low_rank(32, 8 * 9, 3, seed=1).reshape(32, 8, 3, 3),
    }
    return make_model(nodes, [("x", ["N", 8, 6, 6])], [("y", None)], weights)


def test_layer_figure_draws_the_report_of_a_tiny_model():
    result = compress(tiny_model(), CompressionConfig(params=0.5, validate=False))
    layers = result.report.layers
    assert [layer.name for layer in layers] == ["depthwise", "conv"]
    assert layers[0].skipped_reason != KEPT_DENSE and layers[1].rank is not None
    heights, colours, series = figure_data(layer_figure(result.report))
    assert heights == [layer.params_after for layer in layers]
    assert colours[0] != colours[1]  # not factorizable vs factorized
    assert series["error bound"] == ([1], [layers[1].error_bound])
    assert series["weight error (measured)"] == ([1], [layers[1].error_actual])
    assert not any(label.startswith("output error") for label in series)
    legend = [text.get_text() for text in layer_figure(result.report).axes[0].get_legend().texts]
    assert legend == ["before", "after: factorized", "after: not factorizable"]


def test_plot_of_the_mnist_cnn_with_calibration(tmp_path):
    images = np.load(MNIST.parent / "mnist_train_calib.npz")["images"][:200]
    calibration = tmp_path / "calibration.npz"
    np.savez(calibration, input=(images[:, None] / 255.0 - 0.1307).astype(np.float32) / 0.3081)
    config = CompressionConfig(
        params=0.3, calibration=str(calibration), validate=False, error="output"
    )
    report = compress(MNIST, config).report
    heights, _, series = figure_data(layer_figure(report))
    assert heights == [layer.params_after for layer in report.layers]
    factorized = [i for i, layer in enumerate(report.layers) if layer.rank is not None]
    assert len(factorized) == 2
    xs, ys = series["output error (estimate)"]
    assert xs == factorized
    assert ys == [report.layers[i].output_error_estimate for i in factorized]
    assert "output error (measured)" not in series  # measured only when validation runs
    validated = compress(MNIST, config.replace(validate=True, latency_runs=1)).report
    xs, ys = figure_data(layer_figure(validated))[2]["output error (measured)"]
    assert ys == [validated.layers[i].output_error for i in xs] and len(xs) == 2
    target = onnx_lowrank.plot_layers(report, tmp_path / "layers.png")
    assert target.read_bytes()[:8] == PNG
    assert stat.S_IMODE(target.stat().st_mode) == usual_mode()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calibration.npz", "layers.png"]


def test_cli_plot_writes_a_png_beside_the_model(tmp_path):
    out, plot = tmp_path / "small.onnx", tmp_path / "layers.png"
    args = ["compress", str(MNIST), "-o", str(out), "--params", "0.5", "--quiet"]
    assert main([*args, "--latency-runs", "1", "--plot", str(plot)]) == 0
    assert out.exists() and plot.read_bytes()[:8] == PNG
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layers.png", "small.onnx"]


def test_cli_plot_without_matplotlib_fails_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    out = tmp_path / "small.onnx"
    args = ["compress", str(MNIST), "-o", str(out), "--params", "0.5"]
    assert main([*args, "--plot", str(tmp_path / "layers.png")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [
        "onnx-lowrank: error: --plot needs matplotlib: pip install 'onnx-lowrank[plot]'"
    ]
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeMissingError, match="needs matplotlib"):
        onnx_lowrank.plot_layers(
            compress(tiny_model(), CompressionConfig(params=0.5, validate=False)).report,
            tmp_path / "layers.png",
        )


def test_cli_plot_path_is_checked_before_any_work(tmp_path, capsys):
    out = tmp_path / "small.onnx"
    args = ["compress", str(MNIST), "-o", str(out), "--params", "0.5"]
    assert main([*args, "--plot", str(tmp_path / "missing" / "layers.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not out.exists()


def test_json_reports_get_the_usual_permissions_and_leave_no_temporary_file(tmp_path):
    target = write_json({"a": [1, 2.5]}, tmp_path / "report.json")
    assert target.read_text() == '{\n  "a": [\n    1,\n    2.5\n  ]\n}\n'
    assert stat.S_IMODE(target.stat().st_mode) == usual_mode()
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]
