"""The allocation solvers: optimality against brute force, budgets, constraints, determinism.

Random small instances are candidate tables drawn directly (the solvers only see tables); the
real-model tests build the tables from the MNIST CNN's spectra.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from builders import MNIST, MODELS, conv_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onnx_lowrank import CompressionConfig, InfeasibleBudgetError, compress
from onnx_lowrank.allocate import allocate, build_table
from onnx_lowrank.config import METHODS
from onnx_lowrank.cost import count_macs
from onnx_lowrank.discover import discover
from onnx_lowrank.factorize import factorize
from onnx_lowrank.pipeline import analyze, candidate_tables
from onnx_lowrank.rewrite import rewrite
from onnx_lowrank.shapes import infer_shapes
from onnx_lowrank.solvers import SOLVERS
from onnx_lowrank.types import BudgetLimit, CandidateTable

PROPERTY = settings(
    max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)


@st.composite
def tables(draw) -> list[CandidateTable]:
    """1–4 layers of 1–5 candidates. Errors come from a small grid so that ties occur; MACs are
    params times the layer's output positions, as in every real table."""
    layers = []
    for index in range(draw(st.integers(1, 4))):
        dense = draw(st.integers(8, 60))
        positions = draw(st.integers(1, 6))
        rows = draw(st.integers(1, 5))
        groups = [0] + [draw(st.sampled_from([1, 2, 4])) for _ in range(rows)]
        params = [dense] + [draw(st.integers(1, dense - 1)) for _ in range(rows)]
        errors = [0.0] + [draw(st.integers(0, 6)) / 8 for _ in range(rows)]
        energy = [0.0] + [draw(st.integers(0, 6)) / 9 if g == 1 else math.nan for g in groups[1:]]
        params_a = np.asarray(params, dtype=np.float64)
        layers.append(
            CandidateTable(
                layer=f"layer{index}",
                groups=np.asarray(groups),
                ranks=np.arange(len(groups)),
                errors=np.asarray(errors),
                costs=np.stack([params_a, params_a * positions], axis=1),
                energy=np.asarray(energy),
                full_rank=rows,
            )
        )
    return layers


def budgets_for(candidate_tables, draw, kinds) -> list[BudgetLimit]:
    budgets = []
    for kind in kinds:
        column = ("params", "macs").index(kind)
        total = float(sum(t.costs[0, column] for t in candidate_tables))
        floor = float(sum(t.costs[:, column].min() for t in candidate_tables))
        limit = draw(st.floats(floor, total))
        budgets.append(BudgetLimit(kind, limit / total, total, 0.0))
    return budgets


def brute_force(candidate_tables, budgets, values=None, allowed=None) -> float:
    """Smallest achievable maximum of ``values`` (default: errors) over every combination."""
    columns = [("params", "macs").index(b.kind) for b in budgets]
    best = math.inf
    ranges = [
        [row for row in range(len(t)) if allowed is None or allowed(t, row)]
        for t in candidate_tables
    ]
    for combo in itertools.product(*ranges):
        cost = sum(t.costs[row, columns] for t, row in zip(candidate_tables, combo, strict=True))
        if all(cost[i] <= b.limit * (1 + 1e-12) for i, b in enumerate(budgets)):
            value = max(
                (values or (lambda t, r: t.errors[r]))(t, row)
                for t, row in zip(candidate_tables, combo, strict=True)
            )
            best = min(best, value)
    return best


def max_error(candidate_tables, choices) -> float:
    return max(float(t.errors[row]) for t, row in zip(candidate_tables, choices, strict=True))


def fits(candidate_tables, budgets, choices) -> bool:
    for b in budgets:
        column = ("params", "macs").index(b.kind)
        used = sum(t.costs[row, column] for t, row in zip(candidate_tables, choices, strict=True))
        if used > b.limit * (1 + 1e-12):
            return False
    return True


KINDS = st.sampled_from([("params",), ("macs",), ("params", "macs")])


@PROPERTY
@given(st.data(), tables(), KINDS)
def test_alds_is_the_brute_force_min_max_optimum_and_meets_the_budget(data, layers, kinds):
    budgets = budgets_for(layers, data.draw, kinds)
    choices = allocate(layers, budgets, CompressionConfig(method="alds"))
    assert fits(layers, budgets, choices)
    assert max_error(layers, choices) == brute_force(layers, budgets)


@PROPERTY
@given(st.data(), tables(), KINDS, st.sampled_from([1, 2, 4]))
def test_alds_is_never_worse_than_alds_paper_or_alds_error(data, layers, kinds, groups):
    budgets = budgets_for(layers, data.draw, kinds)
    best = max_error(layers, allocate(layers, budgets, CompressionConfig(method="alds")))
    paper = allocate(layers, budgets, CompressionConfig(method="alds-paper"))
    assert fits(layers, budgets, paper)
    assert best <= max_error(layers, paper)
    config = CompressionConfig(method="alds-error", groups=groups, max_groups=4)
    try:
        fixed = allocate(layers, budgets, config)
    except InfeasibleBudgetError:
        return  # fewer rows than alds: a budget alds meets can be out of its reach
    assert fits(layers, budgets, fixed)
    assert best <= max_error(layers, fixed)


@PROPERTY
@given(st.data(), tables(), st.sampled_from([1, 2, 4]))
def test_alds_error_is_the_min_max_optimum_with_groups_fixed(data, layers, groups):
    budgets = budgets_for(layers, data.draw, ("params",))
    fixed = {}
    for t in layers:
        options = t.groups[(t.groups > 0) & (t.groups <= groups)]
        fixed[t.layer] = options.max() if options.size else -1

    def allowed(t, row):
        return t.groups[row] in (0, fixed[t.layer])

    optimum = brute_force(layers, budgets, allowed=allowed)
    config = CompressionConfig(method="alds-error", groups=groups, max_groups=4)
    if optimum == math.inf:
        with pytest.raises(InfeasibleBudgetError, match="alds-error"):
            allocate(layers, budgets, config)
        return
    choices = allocate(layers, budgets, config)
    assert all(allowed(t, row) for t, row in zip(layers, choices, strict=True))
    assert fits(layers, budgets, choices)
    assert max_error(layers, choices) == optimum


@PROPERTY
@given(st.data(), tables())
def test_energy_is_the_min_max_of_removed_energy_with_g_1(data, layers):
    budgets = budgets_for(layers, data.draw, ("params",))

    def allowed(t, row):
        return t.groups[row] in (0, 1)

    optimum = brute_force(layers, budgets, values=lambda t, r: t.energy[r], allowed=allowed)
    config = CompressionConfig(method="energy")
    if optimum == math.inf:
        with pytest.raises(InfeasibleBudgetError, match="energy"):
            allocate(layers, budgets, config)
        return
    choices = allocate(layers, budgets, config)
    assert all(allowed(t, row) for t, row in zip(layers, choices, strict=True))
    assert fits(layers, budgets, choices)
    assert max(t.energy[row] for t, row in zip(layers, choices, strict=True)) == optimum


@PROPERTY
@given(st.data(), tables(), KINDS)
def test_leftover_greedy_stops_only_when_no_improving_move_fits(data, layers, kinds):
    budgets = budgets_for(layers, data.draw, kinds)
    choices = allocate(layers, budgets, CompressionConfig(method="alds"))
    for index, t in enumerate(layers):
        for row in range(len(t)):
            if t.errors[row] < t.errors[choices[index]]:
                moved = list(choices)
                moved[index] = row
                assert not fits(layers, budgets, moved)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_meets_the_budget_below_the_cheapest_rows_raises(method):
    layers = [
        CandidateTable(
            "a",
            np.array([0, 1, 1, 2]),
            np.array([0, 1, 2, 1]),
            np.array([0.0, 0.5, 0.2, 0.4]),
            np.array([[100.0, 400.0], [30, 120], [60, 240], [40, 160]]),
            np.array([0.0, 0.3, 0.1, math.nan]),
            full_rank=4,
        )
    ]
    config = CompressionConfig(method=method)
    choices = allocate(layers, [BudgetLimit("macs", 0.5, 400.0, 0.0)], config)
    assert layers[0].costs[choices[0], 1] <= 200
    with pytest.raises(InfeasibleBudgetError, match=r"--flops 0\.2 is below .* 0\.300") as info:
        allocate(layers, [BudgetLimit("macs", 0.2, 400.0, 0.0)], config)
    assert info.value.smallest_fraction == {"flops": 0.3}


def test_methods_listed_in_config_are_the_solvers():
    assert METHODS == ("alds", "alds-paper", "alds-error", "energy", "svd", "sum")
    assert tuple(SOLVERS) == METHODS
    assert CompressionConfig().method == "alds"


@pytest.fixture(scope="module")
def mnist_analysis():
    return analyze(MNIST, CompressionConfig(max_groups=8, validate=False))


def mnist_budget(analysis, fraction: float) -> list[BudgetLimit]:
    fixed = analysis.params_total - sum(layer.params for layer in analysis.discovery.layers)
    return [BudgetLimit("params", fraction, analysis.params_total, fixed)]


@pytest.mark.parametrize("measure", ["bound", "max-group", "frobenius"])
def test_alds_beats_the_heuristics_on_mnist_in_each_measure(mnist_analysis, measure):
    errors = {}
    for method in ("alds", "alds-paper", "alds-error", "energy", "svd"):
        config = CompressionConfig(params=0.3, method=method, error=measure, max_groups=8)
        layers = candidate_tables(mnist_analysis, config)
        budgets = mnist_budget(mnist_analysis, 0.3)
        errors[method] = max_error(layers, allocate(layers, budgets, config))
    assert errors["alds"] == min(errors.values())
    assert errors["alds"] < errors["svd"]


def test_alds_paper_is_deterministic_under_its_seed(mnist_analysis):
    config = CompressionConfig(params=0.3, method="alds-paper", seed=7, max_groups=8)
    layers = candidate_tables(mnist_analysis, config)
    budgets = mnist_budget(mnist_analysis, 0.3)
    first = allocate(layers, budgets, config)
    assert allocate(layers, budgets, config) == first


@pytest.mark.parametrize(
    ("path", "shapes"),
    [(MNIST, {}), (MODELS / "crepe_tiny.onnx", {}), (MODELS / "mtcnn_onet.onnx", {})],
)
@pytest.mark.parametrize("rank_multiple", [1, 8])
def test_tables_keep_dense_and_only_rows_that_save_params_and_macs(path, shapes, rank_multiple):
    config = CompressionConfig(max_groups=16, rank_multiple=rank_multiple, input_shapes=shapes)
    analysis = analyze(path, config)
    for layer, table in zip(
        analysis.discovery.layers, candidate_tables(analysis, config), strict=True
    ):
        assert table.groups[0] == 0 and table.ranks[0] == 0 and table.errors[0] == 0
        assert table.costs[0, 0] == layer.params
        assert np.all(table.costs[1:, 0] < layer.params)
        if layer.macs:
            assert table.costs[0, 1] == layer.macs
            assert np.all(table.costs[1:, 1] < layer.macs)
        assert np.all((table.groups[1:] * table.ranks[1:]) % rank_multiple == 0)
        assert np.all(layer.in_channels % table.groups[1:] == 0)
        assert np.all(table.groups[1:] <= 16)


def test_build_table_error_columns_follow_the_measure(mnist_analysis):
    layer = mnist_analysis.discovery.layers[1]
    spectrum = mnist_analysis.spectra[layer.name]
    bound = build_table(layer, spectrum, "bound", 4)
    lower = build_table(layer, spectrum, "max-group", 4)
    single = bound.groups == 1
    np.testing.assert_array_equal(bound.errors[single], lower.errors[single])
    grouped = bound.groups > 1
    assert np.all(bound.errors[grouped] >= lower.errors[grouped])
    assert np.any(bound.errors[grouped] > lower.errors[grouped])


@pytest.mark.parametrize("method", METHODS)
def test_same_input_and_options_give_byte_identical_models(method):
    config = CompressionConfig(params=0.35, method=method, validate=False)
    first = compress(MNIST, config).model.SerializeToString()
    assert compress(MNIST, config).model.SerializeToString() == first


def test_flops_budget_holds_and_the_report_matches_a_count_over_the_nodes():
    config = CompressionConfig(flops=0.5, method="alds-error", groups=4, max_groups=4)
    result = compress(MNIST, config.replace(validate=False))
    report = result.report
    assert any(layer.groups == 4 for layer in report.compressed_layers)  # grouped pairs counted
    direct, unknown = count_macs(result.model, infer_shapes(result.model, {}))
    assert not unknown
    assert direct == report.macs_after
    assert direct == sum(layer.macs_after for layer in report.layers)  # MNIST: only layers
    assert direct <= 0.5 * report.macs_before


def test_macs_of_a_grouped_pair_count_both_layers():
    weight = np.random.default_rng(0).standard_normal((8, 4, 3, 3)).astype(np.float32)
    model = conv_model(weight, (6, 6), pads=[1, 1, 1, 1])
    discovery = discover(model)
    layer = discovery.layers[0]
    factors = factorize(discovery.weight(layer), groups=2, rank=2)
    rewritten = rewrite(model, [(layer, factors)])
    macs, _ = count_macs(rewritten, infer_shapes(rewritten, {"x": (1, 4, 6, 6)}))
    positions = 6 * 6
    first = positions * (2 * 2) * (4 // 2) * 9  # g·r outputs, each (c/g)·κ products
    second = positions * 8 * (2 * 2)  # f outputs, each g·r products
    assert macs == first + second == 2 * (2 * 8 + 4 * 9) * positions


def test_by_default_every_divisor_of_the_input_channels_is_a_candidate():
    config = CompressionConfig()
    assert config.max_groups is None
    analysis = analyze(MODELS / "crepe_tiny.onnx", config)
    for layer, table in zip(
        analysis.discovery.layers, candidate_tables(analysis, config), strict=True
    ):
        divisors = {g for g in range(1, layer.in_channels + 1) if layer.in_channels % g == 0}
        assert set(analysis.spectra[layer.name].singular_values) == divisors
        assert set(table.groups[1:]) <= divisors
    conv2 = candidate_tables(analysis, config)[1]  # 16 x 128 x 64: wide, many groups pay
    assert 128 in set(conv2.groups)
