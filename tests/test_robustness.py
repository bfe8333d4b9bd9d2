"""Every model structure of issue 5 on tiny built models: compressed correctly, or skipped with
a stated reason. Real models with the same structures are in test_real_models.py."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from builders import MNIST, low_rank, make_model, random_feed, runtime_loads
from onnx import TensorProto, helper, numpy_helper
from robust_helpers import assert_close, full_rank, outputs

from onnx_lowrank import CompressionConfig, NothingToCompressError, compress
from onnx_lowrank.cost import count_macs, count_parameters
from onnx_lowrank.discover import discover
from onnx_lowrank.errors import InfeasibleBudgetError
from onnx_lowrank.shapes import infer_shapes
from onnx_lowrank.types import FACTORIZED_KEY
from onnx_lowrank.walk import graph_at

FLOAT = TensorProto.FLOAT


def tensor_value(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


# 1. Constants: Constant nodes, initializers, and initializers listed as inputs (IR < 4) ---------


def ir3_model() -> onnx.ModelProto:
    """Opset 9, IR 3: every initializer is also a graph input, as old exporters wrote them."""
    weight = low_rank(12, 16, 3)  # W (f × c); Gemm reads B = Wᵀ (c × f)
    bias = np.linspace(-1, 1, 12).astype(np.float32)
    inits = [tensor_value("B", weight.T.copy()), tensor_value("C", bias)]
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "B", "C"], ["y"], name="fc")],
        "ir3",
        [
            helper.make_tensor_value_info("x", FLOAT, ["N", 16]),
            helper.make_tensor_value_info("B", FLOAT, [16, 12]),
            helper.make_tensor_value_info("C", FLOAT, [12]),
        ],
        [helper.make_tensor_value_info("y", FLOAT, ["N", 12])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)], ir_version=3)
    onnx.checker.check_model(model, full_check=True)
    return model


def test_ir3_initializer_inputs_are_constants_and_their_removal_is_reported(caplog):
    model = ir3_model()
    discovery = discover(model)
    assert [layer.name for layer in discovery.layers] == ["fc"]
    with caplog.at_level(logging.WARNING, logger="onnx_lowrank"):
        result = compress(model, CompressionConfig(params=0.6, latency_runs=1))
    assert "removed graph input(s) B" in caplog.text
    compressed = result.model
    onnx.checker.check_model(compressed, full_check=True)
    assert compressed.ir_version == 3
    # IR 3 initializers must be graph inputs: the factors are Constant nodes instead
    assert {n.op_type for n in compressed.graph.node} == {"Constant", "Gemm", "MatMul"}
    assert [i.name for i in compressed.graph.input] == ["x", "C"]
    assert result.report.validation.passed
    feeds = {"x": random_feed([4, 16])}
    assert_close(model, compressed, feeds, tolerance=1e-5)  # rank 3 of an exact rank-3 weight


# 2. Subgraphs and local functions ------------------------------------------------------------


def if_model(share_outer: bool = False) -> onnx.ModelProto:
    """``y = If(cond, then: x @ Wt, else: x @ We)``. ``Wt`` is a Constant node inside the then
    branch; ``We`` is an initializer of the main graph (an outer-scope value). With
    ``share_outer`` both branches read ``We``."""
    c, f = 16, 12
    then_weight = low_rank(f, c, 3, seed=1).T.copy()
    else_weight = low_rank(f, c, 4, seed=2).T.copy()
    then_nodes = [
        helper.make_node(
            "Constant", [], ["Wt"], name="then_weight", value=tensor_value("Wt", then_weight)
        ),
        helper.make_node("MatMul", ["x", "We" if share_outer else "Wt"], ["yt"], name="then_mm"),
    ]
    if share_outer:
        then_nodes = then_nodes[1:]
    then_branch = helper.make_graph(
        then_nodes, "then", [], [helper.make_tensor_value_info("yt", FLOAT, None)]
    )
    else_branch = helper.make_graph(
        [helper.make_node("MatMul", ["x", "We"], ["ye"], name="else_mm")],
        "else",
        [],
        [helper.make_tensor_value_info("ye", FLOAT, None)],
    )
    node = helper.make_node(
        "If", ["cond"], ["y"], name="if", then_branch=then_branch, else_branch=else_branch
    )
    graph = helper.make_graph(
        [node],
        "main",
        [
            helper.make_tensor_value_info("x", FLOAT, ["N", c]),
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", FLOAT, ["N", f])],
        [tensor_value("We", else_weight)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def if_feeds(cond: bool) -> dict[str, np.ndarray]:
    return {"x": random_feed([5, 16]), "cond": np.array(cond)}


def test_if_branches_are_compressed_with_local_and_outer_scope_weights():
    model = if_model()
    discovery = discover(model)
    layers = {layer.name: layer for layer in discovery.layers}
    assert set(layers) == {"then_mm", "else_mm"}
    assert layers["then_mm"].graph_path == ((0, "then_branch", 0),)
    assert layers["else_mm"].graph_path == ((0, "else_branch", 0),)
    assert layers["else_mm"].weight_source == "We"  # found in the enclosing graph
    config = CompressionConfig(params=0.9, method="svd", validate=False)  # factorizes every layer
    compressed = compress(model, config).model
    assert "We" not in {t.name for t in compressed.graph.initializer}  # outer weight removed
    for path in (layers["then_mm"].graph_path, layers["else_mm"].graph_path):
        branch = graph_at(compressed.graph, path)
        assert [n.op_type for n in branch.node] == ["MatMul", "MatMul"]
        assert branch.node[-1].output[0] in {"yt", "ye"}  # the branch output name is kept
    names = [n.name for _, g in _graphs(compressed) for n in g.node]
    assert len(names) == len(set(names))
    for cond in (True, False):  # both branches keep their exact-rank weights
        assert_close(model, compressed, if_feeds(cond), tolerance=1e-5)


def _graphs(model):
    from onnx_lowrank.walk import walk_graphs

    return walk_graphs(model.graph)


def test_outer_weight_read_by_both_branches_is_shared_and_skipped():
    discovery = discover(if_model(share_outer=True))
    assert discovery.layers == []
    reasons = {skipped.name: skipped.reason for skipped in discovery.skipped}
    assert "shared with else_mm" in reasons["then_mm"]
    assert "shared with then_mm" in reasons["else_mm"]


def loop_model() -> onnx.ModelProto:
    """``h = x; repeat M times: h = Relu(h @ W)`` with ``W`` a Constant in the loop body."""
    width = 12
    weight = low_rank(width, width, 2, seed=3).T.copy()
    body = helper.make_graph(
        [
            helper.make_node(
                "Constant", [], ["W"], name="body_weight", value=tensor_value("W", weight)
            ),
            helper.make_node("MatMul", ["h_in", "W"], ["h_mm"], name="body_mm"),
            helper.make_node("Relu", ["h_mm"], ["h_out"], name="body_relu"),
            helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body_cond"),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_in", FLOAT, ["N", width]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_out", FLOAT, ["N", width]),
        ],
    )
    node = helper.make_node("Loop", ["M", "", "x"], ["y"], name="loop", body=body)
    graph = helper.make_graph(
        [node],
        "main",
        [helper.make_tensor_value_info("x", FLOAT, ["N", width])],
        [helper.make_tensor_value_info("y", FLOAT, ["N", width])],
        [tensor_value("M", np.array(3, dtype=np.int64))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def test_loop_body_layer_is_compressed():
    model = loop_model()
    discovery = discover(model)
    assert [layer.name for layer in discovery.layers] == ["body_mm"]
    result = compress(model, CompressionConfig(params=0.7, latency_runs=1))
    body = graph_at(result.model.graph, ((0, "body", 0),))
    assert [n.name for n in body.node if n.op_type == "MatMul"] == [
        "body_mm/lowrank_v",
        "body_mm/lowrank_u",
    ]
    assert_close(model, result.model, {"x": random_feed([2, 12])}, tolerance=1e-5)


def test_local_function_layers_are_skipped_with_a_reason():
    weight = low_rank(8, 8, 2)
    function = helper.make_function(
        "local",
        "Dense",
        ["a"],
        ["b"],
        [
            helper.make_node("Constant", [], ["w"], value=tensor_value("w", weight)),
            helper.make_node("MatMul", ["a", "w"], ["b"]),
        ],
        [helper.make_opsetid("", 17)],
    )
    graph = helper.make_graph(
        [helper.make_node("Dense", ["x"], ["y"], domain="local", name="call")],
        "main",
        [helper.make_tensor_value_info("x", FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", FLOAT, [2, 8])],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)],
        functions=[function],
        ir_version=8,
    )
    onnx.checker.check_model(model, full_check=True)
    discovery = discover(model)
    assert discovery.layers == []
    assert "local function" in discovery.skipped[0].reason
    with pytest.raises(NothingToCompressError, match="local function"):
        compress(model, CompressionConfig(params=0.5))


# 4. fp16, bf16, Cast/Transpose chains, shared weights ----------------------------------------


def test_fp16_conv_is_decomposed_in_float64_and_written_in_fp16():
    weight = low_rank(16, 8 * 9, 3, seed=4).reshape(16, 8, 3, 3).astype(np.float16)
    node = helper.make_node("Conv", ["x", "W"], ["y"], name="conv", pads=[1, 1, 1, 1])
    model = make_model(
        [node], [("x", ["N", 8, 6, 6])], [("y", None)], {"W": weight}, dtype=TensorProto.FLOAT16
    )
    result = compress(model, CompressionConfig(params=0.5, latency_runs=1))
    assert [layer.rank for layer in result.report.compressed_layers] >= [3]  # exact rank kept
    assert {t.data_type for t in result.model.graph.initializer} == {TensorProto.FLOAT16}
    feeds = {"x": random_feed([2, 8, 6, 6], dtype=np.float16)}
    assert_close(model, result.model, feeds, tolerance=5e-3)  # fp16 rounding of the factors


def test_bf16_matmul_weights_stay_bf16():
    import ml_dtypes

    weight = low_rank(12, 16, 3, seed=5)
    node = helper.make_node("MatMul", ["x", "B"], ["y"], name="mm")
    model = make_model(
        [node],
        [("x", [4, 16])],
        [("y", None)],
        {"B": weight.T.astype(ml_dtypes.bfloat16)},
        dtype=TensorProto.BFLOAT16,
    )
    result = compress(model, CompressionConfig(params=0.5, validate=False))
    compressed = result.model
    onnx.checker.check_model(compressed, full_check=True)
    assert {t.data_type for t in compressed.graph.initializer} == {TensorProto.BFLOAT16}
    # ONNX Runtime has no bf16 MatMul on the CPU: compare the factors' product with numpy
    first, second = (
        numpy_helper.to_array(t).astype(np.float64) for t in compressed.graph.initializer
    )
    stored = weight.T.astype(ml_dtypes.bfloat16).astype(np.float64)
    assert np.linalg.norm(first @ second - stored) / np.linalg.norm(stored) < 2e-2


def test_weight_shared_with_a_non_layer_is_skipped_and_counted_once_in_the_budget():
    rng = np.random.default_rng(0)
    shared = rng.standard_normal((16, 16, 3, 3)).astype(np.float32)
    own = rng.standard_normal((16, 16, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "S"], ["a"], name="shared_a", pads=[1, 1, 1, 1]),
        helper.make_node("ReduceMax", ["S"], ["peak"], name="peek", keepdims=0),
        helper.make_node("Conv", ["a", "O"], ["y"], name="own", pads=[1, 1, 1, 1]),
    ]
    model = make_model(
        nodes, [("x", [1, 16, 5, 5])], [("y", None), ("peak", None)], {"S": shared, "O": own}
    )
    assert count_parameters(model) == 2 * shared.size
    result = compress(model, CompressionConfig(params=0.75, validate=False))
    report = result.report
    skipped = {layer.name: layer.skipped_reason for layer in report.layers}
    assert "'S' is shared with peek" in skipped["shared_a"]
    assert [layer.name for layer in report.compressed_layers] == ["own"]
    assert report.params_after == count_parameters(result.model)
    assert 0.7 * report.params_before < report.params_after <= 0.75 * report.params_before
    with pytest.raises(InfeasibleBudgetError, match=r"smallest reachable 0\.5"):
        compress(model, CompressionConfig(params=0.4, validate=False))


def tied_conv_model() -> onnx.ModelProto:
    """One rank-4 weight read by two Convs with different strides and pads, and another Conv."""
    shared = low_rank(16, 16 * 9, 4, seed=3).reshape(16, 16, 3, 3)
    own = np.random.default_rng(4).standard_normal((16, 16, 1, 1)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "S"], ["a"], name="tied_a", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "S", "B"], ["b"], name="tied_b", strides=[2, 2]),
        helper.make_node("Conv", ["b", "O"], ["y"], name="own"),
    ]
    bias = np.linspace(-1, 1, 16).astype(np.float32)
    weights = {"S": shared, "B": bias, "O": own}
    return make_model(nodes, [("x", ["N", 16, 9, 9])], [("y", None)], weights)


def test_weight_shared_by_layers_is_factorized_once_for_every_use():
    model = tied_conv_model()
    (layer, _) = discover(model).layers
    assert layer.name == "tied_a" and [use.name for use in layer.tied] == ["tied_b"]
    assert layer.output_positions == 81 + 16  # both uses' MACs count, the weight once
    result = compress(model, CompressionConfig(params=0.5, validate=False))
    report = result.report
    (tied,) = [entry for entry in report.layers if entry.name == "tied_a"]
    assert tied.rank is not None and tied.shared_with == ("tied_b",)
    assert tied.error_bound < 1e-6  # rank 4 fits the budget: exact
    assert report.params_after == count_parameters(result.model) <= 0.5 * report.params_before
    # one pair per use, both reading the same two factor tensors
    factors = [t.name for t in result.model.graph.initializer if t.name.startswith("S/lowrank")]
    assert len(factors) == 2
    readers = [n.name for n in result.model.graph.node for i in n.input if i in factors]
    assert len(readers) == 4
    assert "S" not in {t.name for t in result.model.graph.initializer}
    feeds = {"x": random_feed([2, 16, 9, 9])}
    assert_close(model, result.model, feeds)
    direct, unknown = count_macs(result.model, infer_shapes(result.model, {}))
    assert not unknown and direct == report.macs_after
    assert count_macs(model, infer_shapes(model, {}))[0] == report.macs_before


def test_tied_layers_at_full_rank_and_under_a_flops_budget():
    model = tied_conv_model()
    assert_close(model, full_rank(model), {"x": random_feed([2, 16, 9, 9])})
    result = compress(model, CompressionConfig(flops=0.6, validate=False))
    assert result.report.macs_after <= 0.6 * result.report.macs_before
    assert [layer.name for layer in result.report.compressed_layers] == ["tied_a"]


def test_tied_grouped_matmuls_with_inputs_of_different_rank():
    weight = low_rank(24, 16, 2, seed=5, groups=2).T.copy()  # MatMul reads B = Wᵀ (c × f)
    nodes = [
        helper.make_node("MatMul", ["x2", "W"], ["y2"], name="flat"),
        helper.make_node("MatMul", ["x3", "W"], ["y3"], name="sequence"),
    ]
    model = make_model(
        nodes,
        [("x2", ["N", 16]), ("x3", ["N", 5, 16])],
        [("y2", None), ("y3", None)],
        {"W": weight},
    )
    config = CompressionConfig(params=0.6, method="alds-error", groups=2, validate=False)
    result = compress(model, config)
    (layer,) = result.report.compressed_layers
    assert layer.groups == 2 and layer.rank >= 2 and layer.shared_with == ("sequence",)
    feeds = {"x2": random_feed([3, 16]), "x3": random_feed([3, 5, 16], seed=1)}
    assert_close(model, result.model, feeds)


def test_tied_gemms_keep_their_own_transA_alpha_beta_and_bias():
    weight = low_rank(12, 20, 3, seed=6)  # (f × c), read with transB
    nodes = [
        helper.make_node("Gemm", ["x", "W", "C1"], ["y1"], name="g1", transB=1, alpha=0.5),
        helper.make_node(
            "Gemm", ["xt", "W", "C2"], ["y2"], name="g2", transA=1, transB=1, beta=2.0
        ),
    ]
    weights = {
        "W": weight,
        "C1": np.linspace(0, 1, 12).astype(np.float32),
        "C2": np.linspace(-1, 0, 12).astype(np.float32),
    }
    model = make_model(
        nodes, [("x", [4, 20]), ("xt", [20, 4])], [("y1", None), ("y2", None)], weights
    )
    result = compress(model, CompressionConfig(params=0.7, validate=False))
    assert result.report.compressed_layers[0].shared_with == ("g2",)
    assert_close(model, result.model, {"x": random_feed([4, 20]), "xt": random_feed([20, 4])})
    # tied layers of different kinds (a Gemm without transB reads the weight transposed) are not
    mixed = make_model(
        [nodes[0], helper.make_node("Gemm", ["x2", "W"], ["y2"], name="plain")],
        [("x", [4, 20]), ("x2", [4, 12])],
        [("y1", None), ("y2", None)],
        {"W": weight, "C1": weights["C1"]},
    )
    discovery = discover(mixed)
    assert discovery.layers == []
    assert "not all layers of the same kind" in discovery.skipped[0].reason


def siamese_mnist() -> onnx.ModelProto:
    """The real MNIST CNN twice over, on inputs ``a`` and ``b``: both towers read the same
    eight initializers (a Siamese network as exporters write it)."""
    single = onnx.load(MNIST)
    weights = {tensor.name for tensor in single.graph.initializer}
    nodes = []
    for tower in ("a", "b"):
        for node in single.graph.node:
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.name = f"{tower}{node.name}"
            copy.input[:] = [n if n in weights else f"{tower}:{n}" for n in node.input]
            copy.output[:] = [f"{tower}:{n}" for n in node.output]
            nodes.append(copy)
    graph = helper.make_graph(
        nodes,
        "siamese",
        [helper.make_tensor_value_info(f"{t}:input", FLOAT, ["N", 1, 28, 28]) for t in "ab"],
        [helper.make_tensor_value_info(f"{t}:logits", FLOAT, ["N", 10]) for t in "ab"],
        list(single.graph.initializer),
    )
    model = helper.make_model(graph, opset_imports=single.opset_import, ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def test_siamese_mnist_towers_share_one_factorization_and_match_the_single_model():
    siamese = siamese_mnist()
    assert count_parameters(siamese) == 421_642  # the towers' weights are stored once
    config = CompressionConfig(params=0.5, validate=False)
    twin = compress(siamese, config)
    single = compress(MNIST, config)
    assert len(twin.report.compressed_layers) == len(single.report.compressed_layers) == 2
    for tied, alone in zip(
        twin.report.compressed_layers, single.report.compressed_layers, strict=True
    ):
        assert (tied.groups, tied.rank) == (alone.groups, alone.rank)
        assert tied.shared_with == ("b" + alone.name,)
        assert tied.macs_after == 2 * alone.macs_after
    assert twin.report.params_after == single.report.params_after == count_parameters(twin.model)
    test = np.load(MNIST.parent / "mnist_test.npz")
    images = ((test["images"][:500].astype(np.float32) / 255.0 - 0.1307) / 0.3081)[:, None]
    other = images[::-1].copy()
    a, b = outputs(twin.model, {"a:input": images, "b:input": other})
    (alone,) = outputs(single.model, {"input": images})
    np.testing.assert_allclose(a, alone, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(b, alone[::-1], rtol=1e-5, atol=1e-5)
    accuracy = np.mean(a.argmax(axis=1) == test["labels"][:500])
    assert accuracy > 0.95


def test_unrolled_recurrence_shares_one_factorization_across_its_steps():
    steps, weight = 60, low_rank(32, 32, 4, seed=1).T.copy()
    weight *= 0.9 / np.linalg.norm(weight, 2)  # contractive, so float rounding does not grow
    nodes, previous = [], "x"
    for step in range(steps):
        nodes.append(helper.make_node("MatMul", [previous, "W"], [f"h{step}"], name=f"mm{step}"))
        nodes.append(helper.make_node("Tanh", [f"h{step}"], [f"t{step}"], name=f"tanh{step}"))
        previous = f"t{step}"
    model = make_model(nodes, [("x", ["N", 32])], [(previous, None)], {"W": weight})
    (layer,) = discover(model).layers
    assert len(layer.tied) == steps - 1 and layer.output_positions == steps
    result = compress(model, CompressionConfig(params=0.5, latency_runs=1))
    assert result.report.validation.passed
    assert count_parameters(result.model) == result.report.params_after <= 0.5 * 32 * 32
    assert_close(model, result.model, {"x": random_feed([3, 32])})


def test_tied_layers_inside_an_if_branch():
    weight = low_rank(16, 16, 3, seed=2).T.copy()
    then = helper.make_graph(
        [
            helper.make_node("Constant", [], ["Wc"], value=tensor_value("Wc", weight)),
            helper.make_node("MatMul", ["x", "Wc"], ["a"], name="t1"),
            helper.make_node("Tanh", ["a"], ["b"], name="tanh"),
            helper.make_node("MatMul", ["b", "Wc"], ["t_out"]),  # unnamed: named like any layer
        ],
        "then",
        [],
        [helper.make_tensor_value_info("t_out", FLOAT, [4, 16])],
    )
    other = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["e_out"], name="same")],
        "else",
        [],
        [helper.make_tensor_value_info("e_out", FLOAT, [4, 16])],
    )
    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other, name="if")],
        "tied_if",
        [
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x", FLOAT, [4, 16]),
        ],
        [helper.make_tensor_value_info("y", FLOAT, [4, 16])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    result = compress(model, CompressionConfig(params=0.7, validate=False))
    tied = [(x.name, x.shared_with) for x in result.report.compressed_layers]
    assert tied == [("t1", ("then/MatMul_3",))]
    assert_close(model, result.model, {"c": np.array(True), "x": random_feed([4, 16])})


def test_tied_fp16_weight_behind_a_cast_and_tied_ir3_constants():
    # fp16 weight read through one Cast by two MatMuls: fp16 factors, one Cast each, shared
    weight = low_rank(10, 24, 3, seed=7).T.astype(np.float16)
    nodes = [
        helper.make_node("Cast", ["W16"], ["W"], name="cast", to=TensorProto.FLOAT),
        helper.make_node("MatMul", ["x", "W"], ["h"], name="first"),
        helper.make_node("MatMul", ["z", "W"], ["y"], name="second"),
    ]
    model = make_model(
        nodes, [("x", [3, 24]), ("z", [2, 24])], [("h", None), ("y", None)], {"W16": weight}
    )
    result = compress(model, CompressionConfig(params=0.8, validate=False))
    assert result.report.compressed_layers[0].shared_with == ("second",)
    halves = [t for t in result.model.graph.initializer if t.data_type == TensorProto.FLOAT16]
    assert len(halves) == 2 and len(result.model.graph.initializer) == 2
    assert [n.op_type for n in result.model.graph.node].count("Cast") == 2
    assert_close(model, result.model, {"x": random_feed([3, 24]), "z": random_feed([2, 24])}, 1e-3)
    # IR 3: the shared factors are Constant nodes placed before the first use
    ir3 = ir3_model()
    ir3.graph.node.append(helper.make_node("Relu", ["y"], ["r"], name="relu"))
    ir3.graph.node.append(helper.make_node("Gemm", ["r", "B", "C"], ["y3"], name="fc3", transA=1))
    ir3.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 16  # transA needs N = 16
    ir3.graph.output.append(helper.make_tensor_value_info("y3", FLOAT, [12, 12]))
    onnx.checker.check_model(ir3, full_check=True)
    compressed = compress(ir3, CompressionConfig(params=0.6, validate=False)).model
    constants = [n for n in compressed.graph.node if n.op_type == "Constant"]
    assert len(constants) == 2  # B's factors, once for fc and fc3
    assert_close(ir3, compressed, {"x": random_feed([16, 16])}, tolerance=1e-5)


def test_calibrated_siamese_mnist_matches_the_calibrated_single_model(tmp_path):
    # Both towers fed the same training images: the pooled statistics are the single model's,
    # so the tied factors and corrected biases must be the same as the single model's.
    train = np.load(MNIST.parent / "mnist_train_calib.npz")["images"][:300]
    images = ((train.astype(np.float32) / 255.0 - 0.1307) / 0.3081)[:, None]
    np.savez(tmp_path / "twin.npz", **{"a:input": images, "b:input": images})
    np.savez(tmp_path / "single.npz", input=images)
    # the calibrated factors (the refit leaves tied layers alone, so it would refit only one)
    config = CompressionConfig(params=0.3, validate=False)
    twin_data, single_data = str(tmp_path / "twin.npz"), str(tmp_path / "single.npz")
    twin = compress(siamese_mnist(), config.replace(calibration=twin_data, refit=False))
    single = compress(MNIST, config.replace(calibration=single_data, refit=False))
    pairs = zip(twin.report.compressed_layers, single.report.compressed_layers, strict=True)
    for tied, alone in pairs:
        assert (tied.groups, tied.rank) == (alone.groups, alone.rank)
        assert tied.output_error_estimate == pytest.approx(alone.output_error_estimate, rel=1e-9)
    test = np.load(MNIST.parent / "mnist_test.npz")
    evaluation = ((test["images"][:500].astype(np.float32) / 255.0 - 0.1307) / 0.3081)[:, None]
    a, b = outputs(twin.model, {"a:input": evaluation, "b:input": evaluation})
    (alone,) = outputs(single.model, {"input": evaluation})
    np.testing.assert_allclose(a, alone, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(b, alone, rtol=1e-4, atol=1e-4)


def test_compressing_tied_layers_twice_changes_nothing():
    model = tied_conv_model()
    first = compress(model, CompressionConfig(params=0.5, validate=False))
    (record,) = json.loads(first.model.metadata_props[0].value)
    assert record["name"] == "tied_a" and len(record["tied"]) == 1
    second = compress(first.model, CompressionConfig(params=0.5, validate=False))
    assert second.report.compressed_layers == []
    assert second.model.SerializeToString() == first.model.SerializeToString()


@pytest.mark.parametrize("kind", ["matmul", "conv"])  # input-side and output-side statistics
def test_tied_layers_are_calibrated_with_each_node_its_own_mean(tmp_path, kind):
    rng = np.random.default_rng(8)
    if kind == "matmul":
        weight = rng.standard_normal((16, 24)).astype(np.float32)  # B (c × f): input side
        nodes = [
            helper.make_node("MatMul", ["x1", "W"], ["y1"], name="first"),
            helper.make_node("MatMul", ["x2", "W"], ["y2"], name="second"),
        ]
        shapes = [("x1", ["N", 16]), ("x2", ["N", 5, 16])]
        weights = {"W": weight}
    else:
        weight = rng.standard_normal((4, 16, 3, 3)).astype(np.float32)  # f < cκ: output side
        nodes = [
            helper.make_node("Conv", ["x1", "W", "B"], ["y1"], name="first", pads=[1] * 4),
            helper.make_node("Conv", ["x2", "W"], ["y2"], name="second", strides=[2, 2]),
        ]
        shapes = [("x1", ["N", 16, 6, 6]), ("x2", ["N", 16, 7, 7])]
        weights = {"W": weight, "B": np.ones(4, np.float32)}
    model = make_model(nodes, shapes, [("y1", None), ("y2", None)], weights)
    # the two nodes see inputs with different means and correlations
    mix = rng.standard_normal((16, 16))
    channel_axis = -1 if kind == "matmul" else 1

    def inputs(count: int, seed: int) -> dict[str, np.ndarray]:
        local = np.random.default_rng(seed)
        one = local.standard_normal([count, *[d for d in shapes[0][1][1:]]]) + 3.0
        two = np.moveaxis(
            np.moveaxis(local.standard_normal([count, *shapes[1][1][1:]]), channel_axis, -1) @ mix,
            -1,
            channel_axis,
        )
        return {"x1": one.astype(np.float32), "x2": (two - 1.0).astype(np.float32)}

    feeds = inputs(64, 1)
    path = tmp_path / "calibration.npz"
    np.savez(path, **feeds)
    config = CompressionConfig(  # every sample in the statistics, whose means are kept
        params=0.5, method="alds-error", calibration=str(path), latency_runs=1, error="output"
    )
    result = compress(model, config)
    (layer,) = result.report.compressed_layers
    assert layer.shared_with == ("second",) and layer.groups == 1
    # every node without a bias got one (counted in the budget)
    assert result.report.params_after == count_parameters(result.model)
    assert result.report.params_after <= 0.5 * result.report.params_before
    # each node corrected with its own mean, whitened by the covariance within the nodes:
    # for g = 1 the table's estimate is then the measured error (across both nodes)
    assert layer.output_error == pytest.approx(layer.output_error_estimate, rel=1e-3)
    assert layer.output_error_network == pytest.approx(layer.output_error, rel=1e-3)
    assert 0.05 < layer.output_error < 0.9
    # and every node keeps its mean output on the calibration data
    for before, after in zip(outputs(model, feeds), outputs(result.model, feeds), strict=True):
        axes = tuple(a for a in range(before.ndim) if a != channel_axis % before.ndim)
        np.testing.assert_allclose(after.mean(axis=axes), before.mean(axis=axes), atol=2e-4)


# 5. Quantized graphs are left alone ----------------------------------------------------------


def quantized_models() -> dict[str, onnx.ModelProto]:
    rng = np.random.default_rng(1)
    w8 = rng.integers(-100, 100, (8, 8, 3, 3)).astype(np.int8)
    qdq = make_model(
        [
            helper.make_node("DequantizeLinear", ["Wq", "s", "z"], ["W"], name="dq"),
            helper.make_node("Conv", ["x", "W"], ["y"], name="qdq_conv"),
        ],
        [("x", [1, 8, 6, 6])],
        [("y", None)],
        {"Wq": w8, "s": np.array(0.02, np.float32), "z": np.array(0, np.int8)},
    )
    conv_integer = onnx.helper.make_model(
        helper.make_graph(
            [helper.make_node("ConvInteger", ["x", "Wq"], ["y"], name="conv_int")],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 8, 6, 6])],
            [helper.make_tensor_value_info("y", TensorProto.INT32, [1, 8, 4, 4])],
            [tensor_value("Wq", w8.view(np.uint8))],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
        ir_version=8,
    )
    matmul_integer = onnx.helper.make_model(
        helper.make_graph(
            [helper.make_node("MatMulInteger", ["x", "Bq"], ["y"], name="mm_int")],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.UINT8, [2, 16])],
            [helper.make_tensor_value_info("y", TensorProto.INT32, [2, 16])],
            [tensor_value("Bq", rng.integers(0, 255, (16, 16)).astype(np.uint8))],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
        ir_version=8,
    )
    nbits = onnx.helper.make_model(
        helper.make_graph(
            [
                helper.make_node(
                    "MatMulNBits",
                    ["x", "Bq", "scales"],
                    ["y"],
                    name="mm_nbits",
                    domain="com.microsoft",
                    K=32,
                    N=16,
                    bits=4,
                    block_size=32,
                )
            ],
            "g",
            [helper.make_tensor_value_info("x", FLOAT, [2, 32])],
            [helper.make_tensor_value_info("y", FLOAT, [2, 16])],
            [
                tensor_value("Bq", rng.integers(0, 255, (16, 1, 16)).astype(np.uint8)),
                tensor_value("scales", np.full(16, 0.1, np.float32)),
            ],
        ),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
        ir_version=8,
    )
    return {
        "qdq": qdq,
        "ConvInteger": conv_integer,
        "MatMulInteger": matmul_integer,
        "nbits": nbits,
    }


@pytest.mark.parametrize("kind", ["qdq", "ConvInteger", "MatMulInteger", "nbits"])
def test_quantized_layers_are_left_alone(kind):
    model = quantized_models()[kind]
    onnx.checker.check_model(model)
    discovery = discover(model)
    assert discovery.layers == []
    assert "quantized" in discovery.skipped[0].reason
    with pytest.raises(NothingToCompressError, match="quantized"):
        compress(model, CompressionConfig(params=0.5))


def test_nothing_to_compress_is_said_before_asking_for_input_shapes():
    # A model without compressible layers needs no --input-shape, even with dynamic inputs.
    model = quantized_models()["qdq"]
    for dim in model.graph.input[0].type.tensor_type.shape.dim:
        dim.dim_param = "dynamic"
    with pytest.raises(NothingToCompressError, match="quantized"):
        compress(model, CompressionConfig(params=0.5))


# 6. Opsets 9 to the newest, dynamic batch and sequence dimensions ----------------------------


def opset_model(opset: int) -> onnx.ModelProto:
    """Conv → Flatten → Gemm → MatMul at ``opset``, dynamic batch."""
    rng = np.random.default_rng(opset)
    nodes = [
        helper.make_node("Conv", ["x", "W", "Bc"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Flatten", ["r"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "G", "Bg"], ["g"], name="gemm", transB=1),
        helper.make_node("MatMul", ["g", "M"], ["y"], name="matmul"),
    ]
    inits = {
        "W": rng.standard_normal((8, 4, 3, 3)).astype(np.float32),
        "Bc": rng.standard_normal(8).astype(np.float32),
        "G": rng.standard_normal((12, 8 * 4 * 4)).astype(np.float32),
        "Bg": rng.standard_normal(12).astype(np.float32),
        "M": rng.standard_normal((12, 10)).astype(np.float32),
    }
    ir_version = onnx.helper.find_min_ir_version_for([helper.make_opsetid("", opset)])
    return make_model(
        nodes,
        [("x", ["N", 4, 4, 4])],
        [("y", None)],
        inits,
        opset=opset,
        ir_version=max(ir_version, 4),
    )


@pytest.mark.parametrize("opset", [9, 11, 13, 17, onnx.defs.onnx_opset_version()])
def test_every_opset_from_9_to_the_newest(opset):
    model = opset_model(opset)
    if not runtime_loads(model.ir_version, opset):  # the oldest supported runtime (CI floor)
        pytest.skip(f"onnxruntime {ort.__version__} does not run opset {opset}")
    compressed = full_rank(model)
    assert compressed.opset_import == model.opset_import
    assert sum(n.op_type in ("Conv", "Gemm", "MatMul") for n in compressed.graph.node) == 6
    assert_close(model, compressed, {"x": random_feed([3, 4, 4, 4])})
    result = compress(model, CompressionConfig(params=0.6, latency_runs=1))
    assert result.report.validation.passed
    assert result.model.opset_import == model.opset_import


def test_dynamic_batch_and_sequence_dimensions():
    weight = low_rank(6, 16, 2, seed=6).T.copy()
    node = helper.make_node("MatMul", ["x", "B"], ["y"], name="mm")
    model = make_model([node], [("x", ["batch", "seq", 16])], [("y", None)], {"B": weight})
    result = compress(model, CompressionConfig(params=0.9, input_shapes={"x": (2, 5, 16)}))
    assert result.report.validation.passed
    assert [layer.rank for layer in result.report.compressed_layers] >= [2]
    for shape in ([1, 1, 16], [3, 7, 16]):
        assert_close(model, result.model, {"x": random_feed(shape)}, tolerance=1e-5)


def test_dynamic_spatial_dimensions_of_a_conv():
    weight = low_rank(16, 8 * 9, 3, seed=7).reshape(16, 8, 3, 3)
    node = helper.make_node("Conv", ["x", "W"], ["y"], name="conv", pads=[1, 1, 1, 1])
    model = make_model([node], [("x", ["N", 8, "H", "W"])], [("y", None)], {"W": weight})
    result = compress(model, CompressionConfig(params=0.6, input_shapes={"x": (1, 8, 9, 7)}))
    for shape in ([1, 8, 5, 5], [2, 8, 11, 6]):
        assert_close(model, result.model, {"x": random_feed(shape)}, tolerance=1e-5)


# 8. Compressing an already compressed model ---------------------------------------------------


def test_recompression_with_the_same_budget_changes_nothing(tmp_path):
    first = compress(MNIST, CompressionConfig(params=0.9, validate=False))
    first.save(tmp_path / "once.onnx")
    record = json.loads(
        next(p.value for p in first.model.metadata_props if p.key == FACTORIZED_KEY)
    )
    assert [entry["name"] for entry in record] == [
        layer.name for layer in first.report.compressed_layers
    ]
    assert all(entry["params"] < entry["params_dense"] for entry in record)
    second = compress(tmp_path / "once.onnx", CompressionConfig(params=0.9, latency_runs=1))
    assert second.report.compressed_layers == []
    assert any("original 421,642 parameters" in note for note in second.report.notes)
    second.save(tmp_path / "twice.onnx")
    assert (tmp_path / "twice.onnx").read_bytes() == (tmp_path / "once.onnx").read_bytes()


def test_recompression_with_a_smaller_budget_factorizes_what_is_left(tmp_path):
    first = compress(MNIST, CompressionConfig(params=0.9, validate=False))
    dense = {layer.name for layer in first.report.layers if layer.rank is None}
    second = compress(first.model, CompressionConfig(params=0.87, latency_runs=1))
    assert {layer.name for layer in second.report.compressed_layers} <= dense
    assert second.report.compressed_layers
    assert second.report.params_after <= 0.87 * 421_642
    assert len(json.loads(second.model.metadata_props[0].value)) == len(
        first.report.compressed_layers
    ) + len(second.report.compressed_layers)
    feeds = {"input": random_feed([2, 1, 28, 28])}
    assert outputs(second.model, feeds)[0].shape == (2, 10)


def test_fully_compressed_model_is_a_no_op_or_infeasible():
    # svd factorizes every layer, so nothing is left for a second run
    first = compress(MNIST, CompressionConfig(params=0.5, method="svd", validate=False)).model
    with pytest.raises(NothingToCompressError, match="earlier onnx-lowrank run"):
        compress(first, CompressionConfig(params=0.5))
    with pytest.raises(InfeasibleBudgetError, match="needs a run on the original model"):
        compress(first, CompressionConfig(params=0.3))


def test_models_older_than_opset_7_are_listed_but_not_factorized():
    weight = np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32)
    node = helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
        [numpy_helper.from_array(weight, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 1)])
    discovery = discover(model)
    assert discovery.layers == []
    assert "opset 1" in discovery.skipped[0].reason
    with pytest.raises(NothingToCompressError):
        compress(model, CompressionConfig(params=0.5))


# signals and killed runs (issue 10, item 11) ----------------------------------------------------

#: Runs the CLI on a model whose weights stay on disk (so it spills to TMPDIR), pausing at a
#: named step: the step writes ``ready`` and sleeps, so the test can signal the run right there.
PAUSED_RUN = """
import pathlib, sys, time
from onnx_lowrank import cli, load, pipeline, save
load.LAZY_EXTERNAL_BYTES = 0
module, name, ready = sys.argv[1], sys.argv[2], pathlib.Path(sys.argv[3])
real = getattr(globals()[module], name)
def paused(*args, **kwargs):
    ready.write_text("paused")
    time.sleep(120)
    return real(*args, **kwargs)
setattr(globals()[module], name, paused)
sys.exit(cli.main(sys.argv[4:]))
"""


def paused_run(tmp_path, step: tuple[str, str]):
    """A CLI run paused at ``step``; returns the process once it is there."""
    from test_load import external_model

    model = external_model(tmp_path / "in")
    (tmp_path / "tmp").mkdir(exist_ok=True)
    ready = tmp_path / "ready"
    ready.unlink(missing_ok=True)
    args = [*step, ready, "compress", model, "-o", tmp_path / "out.onnx", "--params", "0.5"]
    process = subprocess.Popen(
        [sys.executable, "-c", PAUSED_RUN, *map(str, args), "-q"],
        env={**os.environ, "TMPDIR": str(tmp_path / "tmp")},
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not ready.exists():
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return process


def leftovers(tmp_path) -> list[str]:
    """Temporary files and folders of onnx-lowrank in TMPDIR and beside the output."""
    names = [p.name for p in (tmp_path / "tmp").iterdir() if p.name.startswith("onnx-lowrank")]
    return names + [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.onnx")]


@pytest.mark.parametrize(
    "step", [("pipeline", "_validate"), ("save", "_check_written")], ids=["validate", "save"]
)
def test_sigterm_removes_the_spill_and_staging_folders(tmp_path, step):
    process = paused_run(tmp_path, step)
    assert leftovers(tmp_path)  # the spill folder (and, when saving, the staging folder)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143, stderr
    assert stderr.strip().splitlines() == [
        "onnx-lowrank: terminated (SIGTERM); nothing was written"
    ]
    assert leftovers(tmp_path) == []
    assert not (tmp_path / "out.onnx").exists()


def test_a_killed_runs_spill_folder_is_removed_by_the_next_run(tmp_path):
    process = paused_run(tmp_path, ("pipeline", "_validate"))
    process.kill()  # SIGKILL: no cleanup can run
    process.communicate(timeout=60)
    stale = leftovers(tmp_path)
    assert len(stale) == 1 and stale[0].startswith(f"onnx-lowrank-spill.{_host()}-{process.pid}.")
    script = "import sys; from onnx_lowrank import cli, load; load.LAZY_EXTERNAL_BYTES = 0; "
    script += "sys.exit(cli.main(sys.argv[1:]))"
    args = ["compress", tmp_path / "in" / "model.onnx", "-o", tmp_path / "out.onnx"]
    rerun = subprocess.run(
        [sys.executable, "-c", script, *map(str, args), "--params", "0.5", "--latency-runs", "1"],
        env={**os.environ, "TMPDIR": str(tmp_path / "tmp")},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert rerun.returncode == 0, rerun.stderr
    assert leftovers(tmp_path) == []
    assert (tmp_path / "out.onnx").exists()


def _host() -> str:
    from onnx_lowrank import save

    return save.temporary_prefix("x").split(".")[1].split("-")[0]
