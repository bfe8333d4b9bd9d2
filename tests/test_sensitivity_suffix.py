"""Suffix probes (suffix.py): network errors measured on the part of the network after a layer
are those of the full probe, on tiny models (residual branch, If bodies) and real ones."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from builders import MNIST, MODELS, check_model, make_model, mnist_calibration, random_feed
from onnx import TensorProto, helper

from onnx_lowrank import CompressionConfig
from onnx_lowrank.pipeline import analyze
from onnx_lowrank.sensitivity import NetworkErrors, probe_model
from onnx_lowrank.suffix import downstream, suffix_model


def _residual_model():
    """``h1 = x W1``; ``s = relu(h1) W2 + h1`` (a skip over W2); ``y = s W3``; and a second
    output ``z = relu(h1) W4`` that does not depend on W2 or W3."""
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h1"], name="l1"),
        helper.make_node("Relu", ["h1"], ["r1"], name="relu"),
        helper.make_node("MatMul", ["r1", "W2"], ["h2"], name="l2"),
        helper.make_node("Add", ["h2", "h1"], ["s"], name="skip"),
        helper.make_node("MatMul", ["s", "W3"], ["y"], name="l3"),
        helper.make_node("MatMul", ["r1", "W4"], ["z"], name="l4"),
    ]
    weights = {f"W{i}": random_feed((16, 16 if i < 3 else 12), i) for i in range(1, 5)}
    return make_model(nodes, [("x", ["N", 16])], [("y", None), ("z", None)], weights)


def _if_model():
    """``h2 = h1 W2`` and an If whose branches read ``h1`` (upstream of W2) and an outer
    initializer ``K`` only from inside their bodies; the If's condition is a Constant node."""
    then_branch = helper.make_graph(
        [
            helper.make_node("Add", ["h2", "h1"], ["t0"]),
            helper.make_node("Mul", ["t0", "K"], ["t"]),
        ],
        "then",
        [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)],
    )
    else_branch = helper.make_graph(
        [helper.make_node("Sub", ["h2", "h1"], ["e"])],
        "else",
        [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)],
    )
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h1"], name="l1"),
        helper.make_node("MatMul", ["h1", "W2"], ["h2"], name="l2"),
        helper.make_node(
            "Constant",
            [],
            ["flag"],
            name="flag",
            value=helper.make_tensor("v", TensorProto.BOOL, [], [True]),
        ),
        helper.make_node(
            "If", ["flag"], ["j"], name="branch", then_branch=then_branch, else_branch=else_branch
        ),
        helper.make_node("MatMul", ["j", "W3"], ["y"], name="l3"),
    ]
    weights = {f"W{i}": random_feed((16, 16), i) for i in range(1, 4)}
    weights["K"] = random_feed((16,), 9)
    return make_model(nodes, [("x", ["N", 16])], [("y", None)], weights)


def _pair(model, feeds, cut_bytes=None):
    """The same data-free NetworkErrors twice: on suffixes (default cap, or ``cut_bytes``)
    and on the full probe only."""
    analysis = analyze(model, CompressionConfig(validate=False))
    from onnx_lowrank.factorize import factorize

    def approximation(layer, groups, rank):
        return factorize(analysis.discovery.weight(layer), groups, rank, analysis.backend), {}

    extra = {} if cut_bytes is None else {"cut_bytes": cut_bytes}
    suffix = NetworkErrors(analysis.discovery, feeds, approximation, **extra)
    full = NetworkErrors(analysis.discovery, feeds, approximation, cut_bytes=0)
    return analysis, suffix, full


def _every_rank(analysis, ranks=(1, 3, 8)):
    return {layer.name: [(1, r) for r in ranks] for layer in analysis.discovery.layers}


def _assert_same(suffix, full, wanted):
    suffix.measure(wanted)
    full.measure(wanted)
    assert full.suffixes.suffix_layers == 0
    for name, points in suffix.measured.items():
        assert points, name
        for key, value in points.items():
            assert value == pytest.approx(full.measured[name][key], rel=1e-4, abs=1e-9), (name, key)


def test_the_cut_of_a_layer_with_a_skip_is_its_input_and_the_skip():
    model = _residual_model()
    analysis = analyze(model, CompressionConfig(validate=False))
    probe, weights, shifts = probe_model(model, analysis.discovery, analysis.discovery.layers)
    by_node = {layer.name: layer for layer in analysis.discovery.layers}
    start = {weights["l2"], shifts["l2"]}
    nodes, cut, outputs = downstream(probe.graph, start)
    assert cut == ["h1", "r1"] and outputs == ["y"]
    kept = {probe.graph.node[i].name for i in nodes}
    assert {"l2", "skip", "l3"} <= kept and not kept & {"l1", "relu", "l4"}
    values = {"h1": [random_feed((3, 16))], "r1": [random_feed((3, 16), 1)]}
    suffix = suffix_model(probe, nodes, values, outputs, start)
    check_model(suffix)
    assert {info.name for info in suffix.graph.input} == {"h1", "r1", *start}
    # the suffix keeps the layer's weight overridable, and no upstream weight
    names = {tensor.name for tensor in suffix.graph.initializer}
    assert weights["l2"] in names and weights["l1"] not in names and weights["l4"] not in names
    assert len(by_node) == 4


def test_suffix_errors_equal_the_full_probe_on_a_residual_model():
    model = _residual_model()
    feeds = {"x": random_feed((20, 16), 5)}
    analysis, suffix, full = _pair(model, feeds)
    _assert_same(suffix, full, _every_rank(analysis))
    assert suffix.suffixes.fallbacks == {} and suffix.suffixes.suffix_layers == 4
    assert suffix.suffixes.cut_runs == 1  # every layer's cut from one pass
    assert suffix.runs == full.runs == 12
    # z does not depend on l3: its candidates leave z exactly the reference
    assert suffix.measured["l3"][(1, 1)] > 0


def test_a_later_round_of_one_candidate_per_layer_runs_where_it_is_cheaper():
    """On a tiny model building a suffix session costs far more than a full pass: once the
    first round has measured that, one more candidate per layer runs on the full probe."""
    model = _residual_model()
    feeds = {"x": random_feed((20, 16), 5)}
    analysis, suffix, full = _pair(model, feeds)
    _assert_same(suffix, full, _every_rank(analysis))
    assert suffix.suffixes.suffix_layers == 4 and suffix.suffixes.in_full == 0
    _assert_same(suffix, full, _every_rank(analysis, ranks=(5,)))
    assert suffix.suffixes.suffix_layers == 4 and suffix.suffixes.in_full == 4
    assert suffix.suffixes.fallbacks == {}


def test_suffix_errors_equal_the_full_probe_through_if_bodies():
    model = _if_model()
    feeds = {"x": random_feed((8, 16), 6)}
    analysis, suffix, full = _pair(model, feeds)
    _assert_same(suffix, full, _every_rank(analysis))
    assert suffix.suffixes.fallbacks == {}
    probe, weights, shifts = probe_model(model, analysis.discovery, analysis.discovery.layers)
    nodes, cut, _ = downstream(probe.graph, {weights["l2"], shifts["l2"]})
    # h1 is read only inside the If bodies; the Constant condition is copied, not cut
    assert cut == ["h1"]
    assert "flag" in {probe.graph.node[i].name for i in nodes}


def test_a_cap_on_the_cut_bytes_groups_layers_and_falls_back_to_the_full_probe(caplog):
    model = _residual_model()
    feeds = {"x": random_feed((20, 16), 5)}
    # l2's cut (h1 and r1, 20 x 16 floats each) is 2560 bytes: over the cap
    analysis, suffix, full = _pair(model, feeds, cut_bytes=2000)
    with caplog.at_level(logging.INFO, logger="onnx_lowrank.suffix"):
        _assert_same(suffix, full, _every_rank(analysis))
    assert set(suffix.suffixes.fallbacks) == {"l2"}
    assert "cut tensors take" in suffix.suffixes.fallbacks["l2"]
    assert "network errors of l2 on the full model" in caplog.text
    # l3 (s) and l4 (r1) do not fit together: two passes after l1 (whose cut is x alone)
    assert suffix.suffixes.cut_runs == 2


def test_tied_weights_fall_back_to_the_full_probe():
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="first"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "W"], ["y"], name="second"),
    ]
    model = make_model(nodes, [("x", ["N", 16])], [("y", None)], {"W": random_feed((16, 16))})
    feeds = {"x": random_feed((8, 16), 2)}
    analysis, suffix, full = _pair(model, feeds)
    [layer] = analysis.discovery.layers
    assert len(layer.uses()) == 2
    _assert_same(suffix, full, _every_rank(analysis))
    assert "tied" in suffix.suffixes.fallbacks[layer.name]


def test_calibrated_suffix_errors_equal_the_full_probe_on_the_mnist_cnn(tmp_path):
    """With bias correction (the shift overrides) on the real MNIST CNN."""
    path = mnist_calibration(tmp_path, 48)
    config = CompressionConfig(
        calibration=str(path),
        error="network",
        sensitivity_samples=8,
        max_groups=1,
        validate=False,
    )
    network = analyze(MNIST, config).network
    full = NetworkErrors(
        network.discovery, network.feeds, network.approximation, cut_bytes=0, batch=network.batch
    )
    wanted = {layer.name: [(1, 2), (1, 6)] for layer in network.layers}
    _assert_same(network, full, wanted)
    assert network.suffixes.suffix_layers == 4 and network.suffixes.cut_runs == 1


def test_suffix_errors_equal_the_full_probe_on_mtcnn_onet():
    """Data-free on random inputs, on the real O-Net (Conv, PRelu, MatMul, three outputs)."""
    analysis = analyze(MODELS / "mtcnn_onet.onnx", CompressionConfig(error="network"))
    network = analysis.network
    full = NetworkErrors(network.discovery, network.feeds, network.approximation, cut_bytes=0)
    wanted = {layer.name: [(1, 1), (1, 2)] for layer in network.layers}
    _assert_same(network, full, wanted)
    assert network.suffixes.fallbacks == {}
    assert network.suffixes.suffix_layers == len(network.layers) == 8


def _data_shaped_model():
    """``y = (x W1) W2 + t``, where ``t`` is ``x`` sliced to a width computed from the data
    (8 × max |sign(x)|): shape inference cannot reach ``t``'s shape, which is in l2's cut."""
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h1"], name="l1"),
        helper.make_node("MatMul", ["h1", "W2"], ["h2"], name="l2"),
        helper.make_node("Sign", ["x"], ["sg"]),
        helper.make_node("Abs", ["sg"], ["ab"]),
        helper.make_node("ReduceMax", ["ab"], ["mx"], keepdims=1),
        helper.make_node("Mul", ["mx", "eight"], ["w"]),
        helper.make_node("Cast", ["w"], ["wi"], to=TensorProto.INT64),
        helper.make_node("Reshape", ["wi", "one"], ["end"]),
        helper.make_node("Slice", ["x", "zero", "end", "axis"], ["t"]),
        helper.make_node("Add", ["h2", "t"], ["y"], name="join"),
    ]
    weights = {"W1": random_feed((8, 8), 1), "W2": random_feed((8, 8), 2)}
    weights["eight"] = np.array(8.0, np.float32)
    for name, value in {"one": [1], "zero": [0], "axis": [1]}.items():
        weights[name] = np.array(value, np.int64)
    return make_model(nodes, [("x", ["N", 8])], [("y", None)], weights)


def test_a_cut_tensor_shaped_by_data_is_measured_and_the_suffix_used():
    model = _data_shaped_model()
    analysis = analyze(model, CompressionConfig(validate=False, input_shapes={"x": (1, 8)}))
    shape = analysis.discovery.shapes.get("t")
    assert shape is None or None in shape  # inference cannot tell
    feeds = {"x": random_feed((12, 8), 3)}
    analysis, suffix, full = _pair(model, feeds)
    _assert_same(suffix, full, _every_rank(analysis, ranks=(1, 3)))
    assert suffix.suffixes.fallbacks == {}  # before: "the shape or type of 't' is unknown"
    assert suffix.suffixes.measured["t"] == (1, 8)  # one sample, the convention of shapes
    assert suffix.suffixes.suffix_layers == 2


def test_cut_bytes_count_the_held_out_samples_at_the_batch_of_the_given_shapes():
    """With --input-shape x:20,16 the inferred shapes are at batch 20: l2's cut (h1 and r1,
    20 samples x 16 floats each) is 2560 bytes, not 20 times that, and fits a 3000-byte cap."""
    model = _residual_model()
    feeds = {"x": random_feed((20, 16), 5)}
    config = CompressionConfig(validate=False, input_shapes={"x": (20, 16)})
    analysis = analyze(model, config)
    assert analysis.discovery.shapes.get("h1") == (20, 16)
    from onnx_lowrank.factorize import factorize

    def approximation(layer, groups, rank):
        return factorize(analysis.discovery.weight(layer), groups, rank, analysis.backend), {}

    suffix = NetworkErrors(analysis.discovery, feeds, approximation, cut_bytes=3000)
    full = NetworkErrors(analysis.discovery, feeds, approximation, cut_bytes=0)
    _assert_same(suffix, full, _every_rank(analysis))
    assert suffix.suffixes.fallbacks == {}
