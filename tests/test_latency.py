"""Measured latency tables (latency.py): micro-models, interleaved timing, the disk cache."""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import (
    MNIST,
    MODELS,
    conv_model,
    gemm_model,
    low_rank,
    make_model,
    mnist_calibration,
)
from onnx import TensorProto

from onnx_lowrank import (
    CompressionConfig,
    ConfigError,
    InfeasibleBudgetError,
    ShapeError,
    compress,
    device,
    latency,
    timing,
)
from onnx_lowrank.allocate import allocate
from onnx_lowrank.latency import LatencyCache, grid_ranks, interpolate
from onnx_lowrank.pipeline import analyze, candidate_tables, choose, realize
from onnx_lowrank.records import TimingStats
from onnx_lowrank.report import format_summary
from onnx_lowrank.speed import latency_book, latency_budget
from onnx_lowrank.sweeps import sweep

CPU = ["CPUExecutionProvider"]


@pytest.fixture(autouse=True)
def few_rounds(monkeypatch):
    """Timing values are not asserted here; a few rounds keep the tests fast."""
    monkeypatch.setattr(latency, "MIN_ROUNDS", 2)
    monkeypatch.setattr(latency, "MAX_ROUNDS", 3)
    monkeypatch.setattr(latency, "LAYER_BUDGET_S", 0.01)


def _tables(model, **options):
    config = CompressionConfig(params=0.5, validate=False, **options)
    analysis = analyze(model, config)
    return analysis, candidate_tables(analysis, config)


def test_grid_includes_both_ends_and_is_sorted():
    assert grid_ranks([5, 1, 3], 6) == [1, 3, 5]
    grid = grid_ranks(range(1, 101), 6)
    assert grid[0] == 1 and grid[-1] == 100 and len(grid) == 6 and grid == sorted(grid)


def test_interpolation_is_monotone_between_timed_ranks():
    values = interpolate({1: 2.0, 5: 1.0, 9: 4.0}, [1, 3, 5, 7, 9])
    # the dip at rank 5 is lifted to the running maximum 2.0, then 2.0 -> 4.0 linearly
    np.testing.assert_allclose(values, [2.0, 2.0, 2.0, 3.0, 4.0])
    assert np.all(np.diff(values) >= 0)


def test_conv_and_gemm_tables_are_measured_then_cached(tmp_path):
    weight = low_rank(32, 16 * 9, 8).reshape(32, 16, 3, 3)
    for model in (conv_model(weight, [12, 12], pads=[1, 1, 1, 1]), gemm_model(low_rank(64, 48, 4))):
        analysis, tables = _tables(model)
        cache = LatencyCache(tmp_path)
        stats = TimingStats()
        first = latency.measure_layers(
            analysis.model, analysis.discovery, tables, CPU, cache=cache, stats=stats
        )
        (table,) = tables
        (measured,) = first.values()
        assert stats.measured > 1 and stats.cached == 0 and not stats.unknown
        assert measured.row_ms.shape == (len(table),) and measured.timed[0]
        assert np.all(measured.row_ms > 0) and measured.dense_ms == measured.row_ms[0]
        for g in np.unique(table.groups[1:]):  # monotone in the rank within a group count
            rows = np.flatnonzero(table.groups == g)
            assert np.all(np.diff(measured.row_ms[rows[np.argsort(table.ranks[rows])]]) >= 0)
        again = TimingStats()
        second = latency.measure_layers(
            analysis.model, analysis.discovery, tables, CPU, cache=cache, stats=again
        )
        assert again.measured == 0 and again.cached == stats.measured
        np.testing.assert_array_equal(next(iter(second.values())).row_ms, measured.row_ms)


def test_cache_key_separates_shapes(tmp_path):
    weight = low_rank(16, 8 * 9, 4).reshape(16, 8, 3, 3)
    cache = LatencyCache(tmp_path)
    for size in (8, 10):
        analysis, tables = _tables(conv_model(weight, [size, size]))
        stats = TimingStats()
        latency.measure_layers(
            analysis.model, analysis.discovery, tables, CPU, cache=cache, stats=stats
        )
        assert stats.measured > 0 and stats.cached == 0  # another input shape: timed again
    assert len(list(tmp_path.glob("*.json"))) == 2


def test_corrupt_cache_file_is_ignored_with_a_warning(tmp_path, caplog):
    analysis, tables = _tables(gemm_model(low_rank(32, 24, 4)))
    cache = LatencyCache(tmp_path)
    latency.measure_layers(analysis.model, analysis.discovery, tables, CPU, cache=cache)
    (path,) = tmp_path.glob("*.json")
    path.write_text("{not json")
    stats = TimingStats()
    with caplog.at_level(logging.WARNING, logger="onnx_lowrank.latency"):
        latency.measure_layers(
            analysis.model, analysis.discovery, tables, CPU, cache=cache, stats=stats
        )
    assert "ignoring unreadable latency cache file" in caplog.text
    assert stats.measured > 0  # timed again, and the file rewritten whole
    assert "times" in json.loads(path.read_text())


def test_cache_folder_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("ONNX_LOWRANK_CACHE", str(tmp_path))
    assert latency.cache_dir() == tmp_path / "latency"
    monkeypatch.delenv("ONNX_LOWRANK_CACHE")
    assert latency.cache_dir().parts[-2:] == ("onnx-lowrank", "latency")


def test_mnist_tables_measured_on_the_real_model(tmp_path):
    model = onnx.load(MNIST)
    analysis, tables = _tables(model, max_groups=4)
    stats = TimingStats()
    result = latency.measure_layers(
        analysis.model, analysis.discovery, tables, CPU, cache=LatencyCache(tmp_path), stats=stats
    )
    assert set(result) == {layer.name for layer in analysis.discovery.layers}
    assert stats.device and stats.provider == "CPUExecutionProvider" and stats.seconds > 0
    whole = latency.measure_model(
        analysis.model, {"input": np.zeros((1, 1, 28, 28), np.float32)}, CPU
    )
    assert whole > 0


# --- budgets and the never-slower check (allocate.py, pipeline.py) ---------------------------


def _mnist(**options):
    config = CompressionConfig(inputs=None, **options)
    analysis = analyze(MNIST, config)
    return config, analysis


def test_latency_budget_alone_is_met_by_the_predicted_sum():
    config, analysis = _mnist(latency=0.6, validate=False, max_groups=4)
    tables = candidate_tables(analysis, config)
    assert all(np.all(t.costs[1:, 2] <= t.costs[0, 2]) for t in tables)  # none slower offered
    choices = allocate(tables, [latency_budget(analysis, tables, 0.6)], config)
    total = analysis.latency_ms
    dense = sum(t.costs[0, 2] for t in tables)
    chosen = sum(t.costs[row, 2] for t, row in zip(tables, choices, strict=True))
    assert (total - dense + chosen) / total <= 0.6 + 1e-9
    assert any(row > 0 for row in choices)


def test_latency_with_params_meets_both():
    config, analysis = _mnist(latency=0.8, params=0.4, validate=False, max_groups=4)
    tables = candidate_tables(analysis, config)
    choices = choose(analysis, tables, config)  # re-solved on the measured ratio, params kept
    fixed = analysis.params_total - sum(layer.params for layer in analysis.discovery.layers)
    params = fixed + sum(t.costs[row, 0] for t, row in zip(tables, choices, strict=True))
    assert params / analysis.params_total <= 0.4 + 1e-9


def test_unreachable_latency_names_the_smallest_reachable():
    config, analysis = _mnist(latency=0.01, validate=False, max_groups=4)
    tables = candidate_tables(analysis, config)
    with pytest.raises(InfeasibleBudgetError, match=r"--latency 0.01 is below the smallest"):
        choose(analysis, tables, config)


def test_latency_budget_needs_timing():
    with pytest.raises(ConfigError, match="--no-latency-check"):
        CompressionConfig(latency=0.5, latency_check=False)


def test_never_slower_drops_candidates_measured_slower(monkeypatch):
    """Timings planted in the analysis's book (every candidate slower than its dense layer):
    no candidate may be chosen, so --params 0.5 cannot be met; without the check it can."""
    config, analysis = _mnist(params=0.5, validate=False, max_groups=4, latency_check=True)
    tables = candidate_tables(analysis, config)
    book = latency_book(analysis, config)
    for table in tables:
        book.timed[table.layer] = {(0, 0): 1.0} | {
            (int(g), int(r)): 2.0 for g, r in zip(table.groups[1:], table.ranks[1:], strict=True)
        }
    with pytest.raises(InfeasibleBudgetError, match=r"--params 0\.5"):
        choose(analysis, list(tables), config)
    unchecked = config.replace(latency_check=False)
    choices = choose(analysis, candidate_tables(analysis, unchecked), unchecked)
    assert any(row > 0 for row in choices)


def test_compress_reports_measured_latency_and_max_ratio_fails():
    config = CompressionConfig(params=0.5, latency_check=True, max_latency_ratio=0.01)
    result = compress(MNIST, config)
    latency_report = result.report.latency
    assert latency_report is not None and latency_report["model_ms"] > 0
    assert 0 < latency_report["predicted_ratio"] <= 1.0  # never slower by prediction
    timed = [layer for layer in result.report.compressed_layers if layer.latency_ms_after]
    assert timed and all(layer.latency_ms_after <= layer.latency_ms_before for layer in timed)
    assert not result.report.validation.passed
    assert any("--max-latency-ratio 0.01" in f for f in result.report.validation.failures)
    assert "latency on CPUExecutionProvider" in format_summary(result.report)


def _timed_models(monkeypatch, folder) -> list[onnx.ModelProto]:
    """The compressed models ``measure_choice`` times end to end, recorded as it is called (it
    still times them), with few rounds: timings are not asserted. The latency cache is the
    empty ``folder``, so every choice is timed."""
    monkeypatch.setenv("ONNX_LOWRANK_CACHE", str(folder))
    monkeypatch.setattr(latency, "CHOICE_ROUNDS", 9)
    timed: list[onnx.ModelProto] = []
    measure = latency.measure_choice

    def recording(original, compressed, *args, **kwargs):
        timed.append(compressed)
        return measure(original, compressed, *args, **kwargs)

    monkeypatch.setattr(latency, "measure_choice", recording)
    return timed


def _same_graph(first: onnx.ModelProto, second: onnx.ModelProto) -> bool:
    """Same nodes and the same initializer values."""
    nodes = [(n.op_type, list(n.input), list(n.output)) for n in first.graph.node]
    if nodes != [(n.op_type, list(n.input), list(n.output)) for n in second.graph.node]:
        return False
    values = {t.name: onnx.numpy_helper.to_array(t) for t in first.graph.initializer}
    others = {t.name: onnx.numpy_helper.to_array(t) for t in second.graph.initializer}
    return values.keys() == others.keys() and all(
        np.array_equal(values[name], others[name]) for name in values
    )


@pytest.mark.parametrize("calibrated", [False, True], ids=["onet-data-free", "mnist-calibrated"])
def test_latency_budget_times_the_factors_that_are_written(monkeypatch, tmp_path, calibrated):
    """A model's speed depends on its weights, not only on their shapes: ONNX Runtime's CPU
    PRelu is up to 8x slower on inputs of unpredictable sign, and O-Net timed with random
    factors of its chosen shapes measured 0.74 of the original where the written model ran at
    0.47 (docs/performance.md). The choice --latency keeps must have been timed end to end as
    the model that is written (truncated SVD factors; whitened ones and their biases with
    calibration data)."""
    timed = _timed_models(monkeypatch, tmp_path / "cache")
    if calibrated:
        path, budget = MNIST, 0.7
        options = {"calibration": mnist_calibration(tmp_path, 64), "refit": False}
    else:
        path, budget, options = MODELS / "mtcnn_onet.onnx", 0.7, {}
    config = CompressionConfig(latency=budget, validate=False, max_groups=4, **options)
    analysis = analyze(path, config)
    tables = candidate_tables(analysis, config)
    choices = choose(analysis, tables, config)
    assert any(row > 0 for row in choices) and timed
    written = realize(analysis, tables, choices, config, keep_weights=True).model
    assert any(_same_graph(model, written) for model in timed)
    assert all(not _same_graph(model, analysis.model) for model in timed)


def test_a_second_latency_run_times_nothing(monkeypatch, tmp_path):
    """With a warm cache, ``--latency`` times no session at all (layers, the whole model and
    the choices timed end to end all come from the cache) and writes the same model."""
    monkeypatch.setenv("ONNX_LOWRANK_CACHE", str(tmp_path))
    monkeypatch.setattr(latency, "CHOICE_ROUNDS", 9)
    config = CompressionConfig(latency=0.7, validate=False, max_groups=4)
    first = compress(MNIST, config)
    assert first.report.latency["measured"] > 0
    timed = []
    measure = latency.time_sessions

    def counted(runners, **kwargs):
        timed.append(len(runners))
        return measure(runners, **kwargs)

    monkeypatch.setattr(latency, "time_sessions", counted)
    second = compress(MNIST, config)
    assert not timed
    assert second.report.latency["measured"] == 0 and second.report.latency["cached"] > 0
    assert second.model.SerializeToString() == first.model.SerializeToString()


def test_the_whole_model_timing_is_cached_by_its_file(monkeypatch, tmp_path):
    """A model read from a file is known to the cache by its path, size and modification time
    (hashing 100 MB of weights costs 0.7 s): the second run times no whole model, a changed
    file is timed again."""
    path = tmp_path / "mnist.onnx"
    path.write_bytes(MNIST.read_bytes())
    monkeypatch.setenv("ONNX_LOWRANK_CACHE", str(tmp_path / "cache"))
    timed = []
    measure = latency.measure_model
    monkeypatch.setattr(
        latency, "measure_model", lambda *a, **k: timed.append(1) or measure(*a, **k)
    )
    monkeypatch.setattr(latency, "_digest", None)  # never called for the original: not hashed
    config = CompressionConfig(params=0.5, latency_check=True, validate=False, max_groups=2)
    compress(path, config)
    compress(path, config)
    assert len(timed) == 1
    status = path.stat()
    os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns + 10**9))
    compress(path, config)
    assert len(timed) == 2


def test_sweep_accepts_latency_lists(tmp_path):
    config = CompressionConfig(validate=False, max_groups=4)
    result = sweep(MNIST, config, tmp_path, latency=[0.8, 0.6])
    assert [row["latency"] for row in result.rows] == [0.8, 0.6]
    # the layer budget is re-solved on the measured ratio, so the prediction may pass F a little
    assert all(0 < row["latency_predicted"] < 1 for row in result.rows)
    with pytest.raises(ConfigError, match="same length"):
        sweep(MNIST, config, tmp_path, latency=[0.8, 0.6], params=[0.5])


@pytest.mark.skipif(
    "CUDAExecutionProvider" not in __import__("onnxruntime").get_available_providers(),
    reason="needs onnxruntime-gpu with a CUDA device",
)
def test_tables_on_the_cuda_execution_provider(tmp_path):
    """--device cuda: the candidates are timed with the CUDA EP, keyed by the GPU's name."""
    weight = low_rank(64, 32 * 9, 8).reshape(64, 32, 3, 3)
    analysis, tables = _tables(conv_model(weight, [28, 28], pads=[1, 1, 1, 1]))
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    stats = TimingStats()
    result = latency.measure_layers(
        analysis.model,
        analysis.discovery,
        tables,
        providers,
        cache=LatencyCache(tmp_path),
        stats=stats,
    )
    assert stats.provider == "CUDAExecutionProvider" and stats.measured > 0
    assert "CPU" not in stats.device or "GPU" in stats.device
    assert all(np.all(value.row_ms > 0) for value in result.values())


def test_rank_multiple_auto_keeps_blocked_conv_shapes():
    """The NHWC O-Net's conv2d_9 (64x32x3x3) at g = 4 has 8 input channels per group: ONNX
    Runtime's NCHWc kernels (blocks of 8 or 16 channels) do not take it, and the pair pays two
    layout conversions. ``auto`` offers only aligned Conv candidates; the MatMul heads and a
    Conv without any aligned candidate keep their tables."""
    path = MODELS / "mtcnn_onet.onnx"
    free = CompressionConfig(params=0.5, validate=False)
    analysis = analyze(path, free)
    plain = {t.layer: t for t in candidate_tables(analysis, free)}
    auto = {t.layer: t for t in candidate_tables(analysis, free.replace(rank_multiple="auto"))}
    block = device.preferred_multiple("CPUExecutionProvider")
    conv = auto["conv2d_9"]
    assert len(conv) < len(plain["conv2d_9"]) and len(conv) > 1
    factorized = conv.groups > 0
    assert np.all(conv.ranks[factorized] % block == 0)
    assert np.all((32 // conv.groups[factorized]) % block == 0)
    assert len(auto["dense_3"]) == len(plain["dense_3"])  # MatMul: unchanged
    assert len(auto["conv2d_8"]) == len(plain["conv2d_8"])  # 32x3x3x3: no aligned candidate
    with pytest.raises(ConfigError, match="rank-multiple"):
        CompressionConfig(rank_multiple="fast")


def test_auto_block_is_the_one_onnx_runtime_applies():
    """``auto``'s CPU block comes from the CPU's flags; ONNX Runtime's optimizer, asked with
    grouped Convs of each width (benchmarks/rank_multiple.py), moves exactly the widths that are
    multiples of it into the NCHWc layout: the smallest such width is the flags' block."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from rank_multiple import nchwc_block

    block = device.preferred_multiple("CPUExecutionProvider")
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert block > 1
    assert nchwc_block() == block
    assert device.preferred_multiple("CUDAExecutionProvider") == 8


@pytest.mark.parametrize("path", [MNIST, MODELS / "mtcnn_onet.onnx"])
def test_rank_multiple_auto_on_real_models_gives_aligned_convs(path):
    """Compressed with ``--rank-multiple auto`` and validated: every factorized Conv of a layer
    that has aligned candidates has channels per group and rank in multiples of the block (MNIST
    gets its 64x32x3x3 conv at g = 2, r = 32 with blocks of 16, O-Net's conv2d_9 at g = 1)."""
    config = CompressionConfig(params=0.5, rank_multiple="auto")
    result = compress(path, config)
    assert result.report.validation.passed
    analysis = analyze(path, config)
    plain = {t.layer: t for t in candidate_tables(analysis, config.replace(rank_multiple=1))}
    auto = {t.layer: t for t in candidate_tables(analysis, config)}
    layers = {layer.name: layer for layer in analysis.discovery.layers}
    block = device.preferred_multiple("CPUExecutionProvider")
    convs = [
        layer
        for layer in result.report.compressed_layers
        if layer.op_type == "Conv" and len(auto[layer.name]) < len(plain[layer.name])
    ]
    assert convs
    for layer in convs:
        assert layer.rank % block == 0
        assert layer.groups == 1 or (layers[layer.name].in_channels // layer.groups) % block == 0


def test_check_skips_what_it_cannot_time(caplog):
    """Dynamic spatial sizes and no validation inputs: neither the layer nor the model can be
    timed; the never-slower check says so and the budget is met without it."""
    weight = low_rank(32, 16 * 9, 8).reshape(32, 16, 3, 3)
    model = conv_model(weight, ["H", "W"])
    config = CompressionConfig(params=0.5, validate=False, latency_check=True)
    with caplog.at_level(logging.WARNING, logger="onnx_lowrank.pipeline"):
        result = compress(model, config)
    assert "cannot time the whole model" in caplog.text
    assert result.report.compressed_layers
    with pytest.raises(ShapeError, match="--input-shape"):
        compress(model, config.replace(params=None, latency=0.5))


def test_fp16_layers_are_timed():
    weight = low_rank(32, 16 * 9, 8).reshape(32, 16, 3, 3).astype(np.float16)
    node = onnx.helper.make_node("Conv", ["x", "W"], ["y"], name="conv", pads=[1, 1, 1, 1])
    model = make_model(
        [node], [("x", [1, 16, 12, 12])], [("y", None)], {"W": weight}, dtype=TensorProto.FLOAT16
    )
    analysis, _ = _tables(model)
    book = latency.LatencyBook(analysis.model, analysis.discovery, CPU, threads=1)
    book.items({"conv": [(1, 4), (2, 4)]})
    timed = book.timed["conv"]
    assert not book.unknown and all(timed[item] > 0 for item in [(0, 0), (1, 4), (2, 4)])


def test_timing_stops_early_only_when_the_spread_is_small():
    """``settled``: the median ratio's notch (1.57·IQR/√n) within the precision. A tight
    ratio stops a timing after its minimum rounds; a spread one (a busy machine) runs on to
    its budget."""
    rng = np.random.default_rng(0)
    base = list(1.0 + 0.01 * rng.random(50))
    tight = [b * (2.0 + 0.01 * rng.standard_normal()) for b in base]
    spread = [b * (2.0 + 0.8 * rng.standard_normal()) for b in base]
    assert timing.settled([base, tight], 0.01)
    assert not timing.settled([base, spread], 0.01)
    assert not timing.settled([base[:3], tight[:3]], 0.01)  # too few rounds to tell
    assert timing.settled([base], 0.01)  # one runner: its own times

    calls = [0, 0]

    def runner(which, seconds):
        def run():
            calls[which] += 1
            time.sleep(seconds)

        return run

    runners = [runner(0, 0.001), runner(1, 0.002)]
    options = {"min_rounds": 8, "max_rounds": 400, "budget_s": 10.0, "warmup": 1}
    first, second = timing.time_sessions(runners, precision=0.5, **options)
    assert calls[0] < 400 and second > first  # settled long before the budget or max rounds
