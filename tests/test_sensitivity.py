"""Network-aware error tables (sensitivity.py) and the additive solver ``sum``."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
from builders import (
    MNIST,
    SAMPLES,
    check_model,
    gemm_model,
    if_model,
    make_model,
    matmul_model,
    mnist_calibration,
    mnist_images,
    random_feed,
    run,
)

from onnx_lowrank import CompressionConfig
from onnx_lowrank.allocate import allocate
from onnx_lowrank.cli import main
from onnx_lowrank.factorize import factorize
from onnx_lowrank.pipeline import analyze, candidate_tables, choose, realize
from onnx_lowrank.sensitivity import (
    TIE_BREAK,
    NetworkErrors,
    degradation,
    holdout_indices,
    interpolated,
    probe_model,
)
from onnx_lowrank.types import BudgetLimit, CandidateTable


@pytest.mark.parametrize(
    "model",
    [
        gemm_model(random_feed((12, 7)), bias=random_feed((7,), 1)),
        gemm_model(random_feed((7, 12)), trans_b=1, beta=0.5, bias=random_feed((7,), 1)),
        matmul_model(random_feed((12, 7)), ["N", 3]),
    ],
)
def test_probe_defaults_reproduce_the_model_and_overrides_replace_the_layer(model):
    analysis = analyze(model, CompressionConfig(validate=False))
    discovery = analysis.discovery
    probe, weights, shifts = probe_model(model, discovery, discovery.layers)
    check_model(probe)
    name = next(iter(model.graph.input)).name
    shape = [d.dim_value or 2 for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = random_feed(shape, 3)
    np.testing.assert_allclose(run(probe, {name: x})[0], run(model, {name: x})[0], rtol=1e-6)
    layer = discovery.layers[0]
    [weight_name] = weights.values()
    [shift_name] = shifts.values()
    zero = np.zeros(onnx.numpy_helper.to_array(_initializer(probe, weight_name)).shape, np.float32)
    shift = np.arange(layer.out_channels, dtype=np.float32)
    out = run(probe, {name: x, weight_name: zero, shift_name: shift})[0]
    # with a zero weight the layer's output is its bias (beta·C) plus the fed shift
    base = run(model, {name: np.zeros_like(x)})[0]
    np.testing.assert_allclose(out, base + shift, rtol=1e-6, atol=1e-6)


def _initializer(model, name):
    return next(t for t in model.graph.initializer if t.name == name)


def test_degradation_is_kl_for_scores_and_relative_error_otherwise():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((5, 4)).astype(np.float32)
    moved = logits + rng.standard_normal((5, 4)).astype(np.float32)
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    q = np.exp(moved) / np.exp(moved).sum(1, keepdims=True)
    kl = np.mean(np.sum(p * np.log(p / q), axis=1))
    tie = TIE_BREAK * np.linalg.norm(moved - logits) / np.linalg.norm(logits)
    kl_p = kl + TIE_BREAK * np.linalg.norm(q - p) / np.linalg.norm(p)
    kl += tie
    assert degradation([logits], [moved]) == pytest.approx(kl, rel=1e-5)
    assert degradation([logits], [logits]) == pytest.approx(0.0, abs=1e-9)
    # probabilities (values in [0, 1]) are compared as given, normalized per row
    assert degradation([p.astype(np.float32)], [q.astype(np.float32)]) == pytest.approx(
        kl_p, rel=1e-4
    )
    features = rng.standard_normal((2, 3, 4))
    other = features + 0.1
    expected = np.linalg.norm(features - other) / np.linalg.norm(features)
    assert degradation([features], [other]) == pytest.approx(expected)


def test_holdout_is_deterministic_spread_and_whole_batches():
    first = holdout_indices(100, 8)
    assert list(first) == list(holdout_indices(100, 8))
    assert len(first) == 8 and first[0] == 0 and first[-1] == 99
    assert len(holdout_indices(20, 32)) == 5  # at most a quarter
    batched = holdout_indices(40, 6, batch=4)
    assert len(batched) == 4 and len(set(batched // 4)) == 1


def test_interpolation_keeps_measurements_and_never_falls_with_rank():
    table = CandidateTable(
        layer="x",
        groups=np.array([0, 1, 1, 1, 1, 2, 2]),
        ranks=np.array([0, 1, 2, 3, 4, 1, 2]),
        errors=np.array([0.0, 0.9, 0.6, 0.3, 0.1, 0.8, 0.4]),
        costs=np.zeros((7, 2)),
        energy=np.zeros(7),
        full_rank=8,
    )

    class Layer:
        out_channels, cols = 8, 8

    points = {(1, 1): 2.0, (1, 3): 0.5}
    errors = interpolated(table, points, Layer)
    assert errors[0] == 0.0
    assert errors[1] == 2.0 and errors[3] == 0.5
    assert errors[2] == pytest.approx(1.25)  # halfway between ranks 1 and 3
    assert errors[4] == pytest.approx(0.5 * (8 - 4) / (8 - 3))  # towards zero at full rank
    # g = 2 was not measured: through the per-layer error -> network error relation
    assert errors[5] == pytest.approx(np.interp(0.8, [0.3, 0.9], [0.5, 2.0]))
    assert np.all(np.diff(errors[1:5]) <= 0)


def _random_tables(rng, layers):
    tables = []
    for index in range(layers):
        rows = rng.integers(2, 5)
        params = np.sort(rng.integers(1, 50, rows))[::-1].astype(float)
        errors = np.sort(rng.random(rows))
        tables.append(
            CandidateTable(
                layer=f"l{index}",
                groups=np.r_[0, np.ones(rows, int)],
                ranks=np.r_[0, np.arange(rows, 0, -1)],
                errors=np.r_[0.0, errors],
                costs=np.stack([np.r_[60.0, params]] * 2, axis=1),
                energy=np.zeros(rows + 1),
                full_rank=rows + 1,
            )
        )
    return tables


@pytest.mark.parametrize("seed", range(20))
def test_sum_solver_is_feasible_and_near_the_brute_force_optimum(seed):
    rng = np.random.default_rng(seed)
    tables = _random_tables(rng, 4)
    fraction = rng.uniform(0.3, 0.9)
    budget = BudgetLimit("params", fraction, 240.0, 0.0)
    config = CompressionConfig(params=fraction, method="sum")
    choices = allocate(tables, [budget], config)
    cost = sum(t.costs[c, 0] for t, c in zip(tables, choices, strict=True))
    assert cost <= budget.limit
    value = sum(t.errors[c] for t, c in zip(tables, choices, strict=True))
    best = min(
        sum(t.errors[c] for t, c in zip(tables, combo, strict=True))
        for combo in itertools.product(*(range(len(t)) for t in tables))
        if sum(t.costs[c, 0] for t, c in zip(tables, combo, strict=True)) <= budget.limit
    )
    # Lagrangian + leftover: optimal up to the duality gap, at most one layer's error range
    gap = max(float(t.errors.max()) for t in tables)
    assert best <= value <= best + gap + 1e-12
    alds = allocate(tables, [budget], config.replace(method="alds"))
    assert value <= sum(t.errors[c] for t, c in zip(tables, alds, strict=True)) + 1e-12


def test_network_errors_are_the_degradation_of_the_compressed_model(tmp_path):
    """Data-free, on the MNIST CNN: the table's measured row is exactly what the compressed
    model (only that layer factorized) does to the outputs on the same inputs."""
    inputs = tmp_path / "inputs.npz"
    images = mnist_images(16)
    np.savez(inputs, input=images)
    config = CompressionConfig(
        params=1.0, error="network", inputs=str(inputs), validate=False, method="sum"
    )
    analysis = analyze(MNIST, config)
    tables = candidate_tables(analysis, config.replace(params=None))
    network = analysis.network
    assert network is not None and network.samples == 16
    layer = analysis.discovery.layers[2]  # the 3136 x 128 Gemm
    table = next(t for t in tables if t.layer == layer.name)
    (g, r), value = sorted(network.measured[layer.name].items())[0]
    row = int(np.flatnonzero((table.groups == g) & (table.ranks == r))[0])
    choices = [row if t.layer == layer.name else 0 for t in tables]
    result = realize(analysis, tables, choices, config)
    original = run(onnx.load(MNIST), {"input": images})
    compressed = run(result.model, {"input": images})
    assert value == pytest.approx(degradation(original, compressed), rel=1e-3)
    assert table.errors[row] == value
    # a sweep reuses the measurements: the same tables again cost no run
    runs = network.runs
    candidate_tables(analysis, config.replace(params=None))
    assert network.runs == runs


def test_calibrated_network_errors_hold_samples_out_and_meet_the_budget(tmp_path):
    path = mnist_calibration(tmp_path, 160)
    config = CompressionConfig(
        params=0.2, calibration=str(path), error="network", sensitivity_samples=24, validate=False
    )
    analysis = analyze(MNIST, config)
    assert analysis.calibration.samples == 160 - 24
    assert analysis.network.samples == 24
    fewer = analyze(MNIST, config.replace(calibration_samples=100, error="output"))
    assert fewer.calibration.samples == 100
    tables = candidate_tables(analysis, config)
    choices = choose(analysis, tables, config)
    for table, row in zip(tables, choices, strict=True):  # every chosen row was measured
        if row:
            key = (int(table.groups[row]), int(table.ranks[row]))
            assert key in analysis.network.measured[table.layer]
    result = realize(analysis, tables, choices, config)
    assert result.report.params_after <= 0.2 * result.report.params_before + 1
    assert "sensitivity" in result.report.timings
    test = np.load(SAMPLES / "mnist_test.npz")
    x = ((test["images"][:1000].astype(np.float32) / 255.0 - 0.1307) / 0.3081)[:, None]
    accuracy = np.mean(run(result.model, {"input": x})[0].argmax(1) == test["labels"][:1000])
    assert accuracy > 0.9


def test_cli_network_error(tmp_path, capsys):
    path = mnist_calibration(tmp_path, count=64)
    out = tmp_path / "small.onnx"
    code = main(
        [
            "compress",
            str(MNIST),
            "-o",
            str(out),
            "--params",
            "0.5",
            "--calibration",
            str(path),
            "--error",
            "network",
            "--method",
            "sum",
            "--sensitivity-samples",
            "8",
            "--calibration-samples",
            "48",
            "--refit",
            "--no-validate",
            "-q",
        ]
    )
    assert code == 0 and out.is_file()
    code = main(["compress", str(MNIST), "-o", str(out), "--params", "0.5", "--error",
                 "network", "--sensitivity-samples", "0", "--overwrite", "-q"])  # fmt: skip
    assert code == 2
    assert "--sensitivity-samples must be a positive integer" in capsys.readouterr().err


def test_probe_overrides_a_layer_inside_a_subgraph():
    """A Conv inside an If branch reads its probe weight and shift from the main graph by
    outer-scope reference, and its Add sits in the branch."""
    model = if_model()
    discovery = analyze(model, CompressionConfig(validate=False)).discovery
    inner = discovery.layer("inner")
    assert inner.graph_path  # inside the If
    probe, weights, shifts = probe_model(model, discovery, discovery.layers)
    check_model(probe)
    x = random_feed((2, 8, 6, 6), 3)
    expected = run(model, {"x": x})[0]
    scale = float(np.abs(expected).max())  # float32 rounding of sums of ~100
    np.testing.assert_allclose(run(probe, {"x": x})[0], expected, atol=1e-6 * scale)
    zero = np.zeros((16, 16, 3, 3), np.float32)
    shift = np.arange(16, dtype=np.float32).reshape(16, 1, 1)
    out = run(probe, {"x": x, weights["inner"]: zero, shifts["inner"]: shift})[0]
    np.testing.assert_allclose(out, np.broadcast_to(shift, out.shape), atol=1e-6)


@pytest.mark.parametrize("taken", [True, False])
def test_network_errors_of_layers_inside_subgraphs(tmp_path, taken):
    """Layers in an If branch are measured on the full probe; one in a branch the held-out
    samples never take changes nothing at any rank, so it is kept dense, with a note."""
    calibration = tmp_path / "calibration.npz"
    rng = np.random.default_rng(0)
    np.savez(calibration, x=rng.standard_normal((32, 8, 6, 6)).astype(np.float32))
    config = CompressionConfig(
        params=0.8, calibration=str(calibration), latency_check=False, latency_runs=1
    )
    assert (config.error, config.method) == ("network", "sum")  # the calibrated default
    analysis = analyze(if_model(taken), config)
    tables = {table.layer: table for table in candidate_tables(analysis, config)}
    measured = analysis.network.measured
    assert measured["inner"] and measured["outer"]  # both measured, on the full probe
    assert all(measured["outer"].values())
    assert all(measured["inner"].values()) if taken else not any(measured["inner"].values())
    assert len(tables["inner"]) > 1 if taken else len(tables["inner"]) == 1  # dense only
    result = realize(
        analysis, list(tables.values()), choose(analysis, list(tables.values()), config), config
    )
    notes = [note for note in result.report.notes if "kept dense" in note]
    if taken:
        assert not notes
    else:
        assert notes and "inside subgraphs (e.g. inner) kept dense" in notes[0]
        assert result.report.layers[0].rank is not None  # the budget falls on "outer"
    assert result.report.validation.passed


def test_a_calibration_file_too_small_to_hold_samples_out(tmp_path, capsys):
    """One sample cannot be split into statistics and held-out samples: the default
    --error network refuses in one line that names the way out, and --error output runs."""
    path = mnist_calibration(tmp_path, 1)
    out = tmp_path / "small.onnx"
    args = ["compress", str(MNIST), "-o", str(out), "--params", "0.5", "--calibration", str(path)]
    assert main([*args, "--no-validate", "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has only 1" in err and "--error output" in err
    assert not out.exists()
    assert main([*args, "--no-validate", "-q", "--error", "output"]) == 0 and out.is_file()


def test_network_errors_of_a_gemm_with_trans_b_inside_a_branch():
    """A Gemm with transB = 1 inside an If branch: its candidates are fed in the layout of its
    own node (the branch's node 0), not of the main graph's node at the same position (a
    Constant, without transB), which would transpose the 12 × 16 weight and fail to run."""
    from onnx import TensorProto, helper

    then_branch = helper.make_graph(
        [helper.make_node("Gemm", ["h", "W2"], ["t"], transB=1, name="inner")],
        "then",
        [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)],
    )
    else_branch = helper.make_graph(
        [helper.make_node("Identity", ["k"], ["e"])],
        "else",
        [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)],
    )
    nodes = [
        helper.make_node(
            "Constant", [], ["cond"], value=helper.make_tensor("v", TensorProto.BOOL, [], [True])
        ),
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="outer"),
        helper.make_node("MatMul", ["h", "K"], ["k"], name="side"),
        helper.make_node("If", ["cond"], ["y"], then_branch=then_branch, else_branch=else_branch),
    ]
    weights = {"W1": random_feed((16, 16), 1), "W2": random_feed((12, 16), 2)}
    weights["K"] = random_feed((16, 12), 3)
    model = make_model(nodes, [("x", ["N", 16])], [("y", None)], weights)
    analysis = analyze(model, CompressionConfig(validate=False))
    inner = analysis.discovery.layer("inner")
    assert inner.graph_path and inner.node_index == 0
    network = NetworkErrors(
        analysis.discovery,
        {"x": random_feed((8, 16), 4)},
        lambda layer, g, r: (factorize(analysis.discovery.weight(layer), g, r), {}),
    )
    network.measure({"inner": [(1, 2), (1, 12)]})
    assert network.measured["inner"][(1, 2)] > 1e-3
    assert network.measured["inner"][(1, 12)] == pytest.approx(0.0, abs=1e-5)  # full rank
