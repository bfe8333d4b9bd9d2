"""The rewrite of every layer form: checker, ONNX Runtime, structure, and exactness.

For a weight whose every channel group has exact rank r, factorizing with (g, r) must reproduce
the original outputs to float tolerance; so must full-rank factorization of any weight.
"""

from __future__ import annotations

import hashlib
import itertools
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime
import pytest
from builders import (
    MNIST,
    MODELS,
    check_model,
    conv_model,
    gemm_model,
    low_rank,
    make_model,
    matmul_model,
    op_types,
    random_feed,
    rel_l2,
    run,
    runtime_loads,
)
from onnx import helper
from robust_helpers import assert_close, full_rank
from test_robustness import if_feeds, if_model, loop_model

from onnx_lowrank.discover import discover
from onnx_lowrank.factorize import factorize
from onnx_lowrank.load import open_model
from onnx_lowrank.rewrite import rewrite
from onnx_lowrank.save import save_model
from onnx_lowrank.surgery import Surgery
from onnx_lowrank.types import FACTOR_TAG, FACTORIZED_KEY
from onnx_lowrank.walk import graph_at, walk_graphs

TOLERANCE = 1e-4


def factorized(model: onnx.ModelProto, groups: int, rank: int | None = None) -> onnx.ModelProto:
    """Rewrite the model's only layer with (groups, rank); rank None means full rank."""
    discovery = discover(model)
    assert len(discovery.layers) == 1, discovery.skipped
    layer = discovery.layers[0]
    weight = discovery.weight(layer)
    full = min(layer.out_channels, layer.cols // groups)
    factors = factorize(weight, groups, full if rank is None else rank)
    return rewrite(model, [(layer, factors)])


def assert_same_outputs(original, compressed, feeds):
    check_model(compressed)
    for before, after in zip(run(original, feeds), run(compressed, feeds), strict=True):
        assert after.shape == before.shape
        assert rel_l2(before, after) < TOLERANCE


def conv_weight(f, c, kernel, groups, rank, seed=0):
    kappa = int(np.prod(kernel))
    return low_rank(f, c * kappa, rank, seed, groups).reshape(f, c, *kernel)


CONV_CASES = {
    "2d-pad": ((3, 3), (9, 9), {"pads": [1, 1, 1, 1]}),
    "2d-stride": ((3, 3), (11, 10), {"strides": [2, 2], "pads": [1, 0, 1, 0]}),
    "2d-dilation": ((3, 3), (12, 12), {"dilations": [2, 2]}),
    "2d-same-upper": ((3, 2), (7, 8), {"auto_pad": "SAME_UPPER", "strides": [2, 1]}),
    "2d-same-lower": ((2, 3), (7, 8), {"auto_pad": "SAME_LOWER"}),
    "2d-valid": ((3, 3), (8, 8), {"auto_pad": "VALID"}),
    "2d-asym-pads": ((3, 3), (8, 8), {"pads": [0, 2, 1, 0]}),
    "2d-1x1": ((1, 1), (5, 5), {}),
    "1d": ((5,), (30,), {"strides": [2], "pads": [2, 1]}),
    "1d-tall": ((16,), (40,), {"dilations": [2]}),
    "3d": ((3, 3, 3), (5, 6, 5), {"pads": [1, 1, 1, 1, 1, 1], "strides": [1, 2, 1]}),
}


@pytest.mark.parametrize("case", sorted(CONV_CASES))
@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_exact_low_rank(case, groups, bias):
    kernel, spatial, attributes = CONV_CASES[case]
    f, c, rank = 12, 8, 2
    model = conv_model(conv_weight(f, c, kernel, groups, rank), spatial, bias=bias, **attributes)
    compressed = factorized(model, groups, rank)
    assert_same_outputs(model, compressed, {"x": random_feed([2, c, *spatial])})
    first, second = compressed.graph.node
    assert op_types(compressed) == ["Conv", "Conv"]
    attrs = {a.name: helper.get_attribute_value(a) for a in first.attribute}
    assert attrs["group"] == groups
    assert list(attrs["kernel_shape"]) == list(kernel)
    for name, value in attributes.items():
        assert attrs[name] == (value.encode() if isinstance(value, str) else value)
    weights = {t.name: t for t in compressed.graph.initializer}
    assert list(weights[first.input[1]].dims) == [groups * rank, c // groups, *kernel]
    assert list(weights[second.input[1]].dims) == [f, groups * rank, *[1] * len(kernel)]
    assert list(second.input[2:]) == (["B"] if bias else [])
    assert second.output[0] == "y"


@pytest.mark.parametrize("case", sorted(CONV_CASES))
@pytest.mark.parametrize("groups", [1, 2])
def test_conv_full_rank_reproduces_any_weight(case, groups):
    kernel, spatial, attributes = CONV_CASES[case]
    weight = np.random.default_rng(3).standard_normal((6, 4, *kernel)).astype(np.float32)
    model = conv_model(weight, spatial, **attributes)
    assert_same_outputs(model, factorized(model, groups), {"x": random_feed([2, 4, *spatial])})


GEMM_BIASES = {
    "none": None,
    "vector": lambda f: np.linspace(-1, 1, f).astype(np.float32),
    "row": lambda f: np.linspace(-1, 1, f).astype(np.float32)[None, :],
    "scalar": lambda f: np.array(0.5, dtype=np.float32),
}


@pytest.mark.parametrize(("trans_a", "trans_b"), list(itertools.product([0, 1], [0, 1])))
@pytest.mark.parametrize("bias", sorted(GEMM_BIASES))
@pytest.mark.parametrize("groups", [1, 3])
def test_gemm_exact_low_rank(trans_a, trans_b, bias, groups):
    f, c, rank = 10, 12, 2
    weight = low_rank(f, c, rank, seed=1, groups=groups)  # W is f × c
    stored = weight if trans_b else weight.T
    make_bias = GEMM_BIASES[bias]
    model = gemm_model(
        stored,
        trans_a=trans_a,
        trans_b=trans_b,
        alpha=0.7,
        beta=1.3,
        bias=None if make_bias is None else make_bias(f),
    )
    a = random_feed([c, 5] if trans_a else [5, c])
    compressed = factorized(model, groups, rank)
    assert_same_outputs(model, compressed, {"a": a})
    last = compressed.graph.node[-1]
    assert last.op_type == "Gemm" and last.output[0] == "y"
    attrs = {x.name: helper.get_attribute_value(x) for x in last.attribute}
    assert attrs["alpha"] == pytest.approx(0.7) and attrs["beta"] == pytest.approx(1.3)
    assert ("Transpose" in op_types(compressed)) == bool(trans_a)
    assert op_types(compressed).count("Reshape") == (2 if groups > 1 else 0)
    full = factorized(model, groups)
    assert_same_outputs(model, full, {"a": a})


def test_gemm_opset_9_keeps_required_bias():
    weight = low_rank(6, 8, 2).T
    model = gemm_model(weight, bias=np.ones(6, np.float32), opset=9)
    compressed = factorized(model, 1, 2)
    assert_same_outputs(model, compressed, {"a": random_feed([3, 8])})


@pytest.mark.parametrize("lead", [(), (5,), (2, 5), (2, 3, 4)])
@pytest.mark.parametrize("groups", [1, 2, 4])
def test_matmul_exact_low_rank(lead, groups):
    f, c, rank = 6, 16, 2
    weight = low_rank(f, c, rank, seed=2, groups=groups)
    model = matmul_model(weight.T.copy(), list(lead))
    feeds = {"x": random_feed([*lead, c])}
    compressed = factorized(model, groups, rank)
    assert_same_outputs(model, compressed, feeds)
    assert compressed.graph.node[-1].output[0] == "y"
    assert_same_outputs(model, factorized(model, groups), feeds)


def test_matmul_dynamic_leading_dimensions():
    weight = low_rank(6, 8, 2, groups=2).T.copy()
    model = matmul_model(weight, ["batch", "seq"])
    compressed = factorized(model, 2, 2)
    for shape in ([1, 3, 8], [4, 7, 8]):
        assert_same_outputs(model, compressed, {"x": random_feed(shape)})


def test_untouched_nodes_and_model_fields_are_kept():
    weight = low_rank(8, 4 * 9, 2).reshape(8, 4, 3, 3)
    conv = helper.make_node("Conv", ["x", "W"], ["h"], name="conv", pads=[1, 1, 1, 1])
    relu = helper.make_node("Relu", ["h"], ["y"], name="relu", doc_string="keep me")
    model = make_model([conv, relu], [("x", ["N", 4, 6, 6])], [("y", None)], {"W": weight})
    model.doc_string = "model doc"
    model.producer_version = "9.9"
    helper.set_model_props(model, {"author": "tests"})
    compressed = factorized(model, 1, 2)
    assert compressed.graph.node[-1] == relu
    assert compressed.ir_version == model.ir_version
    assert compressed.opset_import == model.opset_import
    kept = {p.key: p.value for p in compressed.metadata_props}
    assert kept.pop(FACTORIZED_KEY)  # the record of what was factorized, see test_robustness
    assert kept == {p.key: p.value for p in model.metadata_props}
    assert (compressed.producer_name, compressed.producer_version, compressed.doc_string) == (
        model.producer_name,
        model.producer_version,
        model.doc_string,
    )
    assert [i.name for i in compressed.graph.input] == ["x"]
    assert [o.name for o in compressed.graph.output] == ["y"]
    assert "W" not in {t.name for t in compressed.graph.initializer}
    assert model.graph.node[0] == conv  # the input model is not modified


def test_fp16_weights_are_written_back_as_fp16():
    weight = low_rank(8, 12, 3).astype(np.float16)
    node = helper.make_node("MatMul", ["x", "B"], ["y"], name="mm")
    model = make_model(
        [node],
        [("x", [4, 12])],
        [("y", None)],
        {"B": weight.T.copy()},
        dtype=onnx.TensorProto.FLOAT16,
    )
    compressed = factorized(model, 1, 3)
    check_model(compressed)
    types = {t.data_type for t in compressed.graph.initializer}
    assert types == {onnx.TensorProto.FLOAT16}
    x = random_feed([4, 12], dtype=np.float16)
    (before,), (after,) = run(model, {"x": x}), run(compressed, {"x": x})
    assert rel_l2(before, after) < 5e-3  # fp16 rounding of the factors


def test_constant_node_weight_is_replaced_and_removed():
    weight = low_rank(6, 10, 2)
    const = helper.make_node(
        "Constant", [], ["B"], name="weight", value=onnx.numpy_helper.from_array(weight.T.copy())
    )
    mm = helper.make_node("MatMul", ["x", "B"], ["y"], name="mm")
    model = make_model([const, mm], [("x", [3, 10])], [("y", None)])
    compressed = factorized(model, 1, 2)
    assert "Constant" not in op_types(compressed)
    assert_same_outputs(model, compressed, {"x": random_feed([3, 10])})


def test_weight_behind_transpose_and_cast():
    weight = low_rank(6, 10, 2)  # W (f × c); MatMul reads Transpose(W) = (c × f)
    nodes = [
        helper.make_node("Cast", ["W16"], ["W32"], name="cast", to=onnx.TensorProto.FLOAT),
        helper.make_node("Transpose", ["W32"], ["B"], name="transpose", perm=[1, 0]),
        helper.make_node("MatMul", ["x", "B"], ["y"], name="mm"),
    ]
    model = make_model(nodes, [("x", [3, 10])], [("y", None)], {"W16": weight.astype(np.float16)})
    compressed = factorized(model, 1, 2)
    # fp16 factors, each cast to fp32 like the original weight: the file does not double
    assert op_types(compressed) == ["Cast", "Cast", "MatMul", "MatMul"]
    assert {t.data_type for t in compressed.graph.initializer} == {onnx.TensorProto.FLOAT16}
    check_model(compressed)
    feeds = {"x": random_feed([3, 10])}
    (before,), (after,) = run(model, feeds), run(compressed, feeds)
    assert rel_l2(before, after) < 2e-3  # fp16 rounding of the factors


# The onnx-graphsurgeon round trip ------------------------------------------------------------

FLOAT = onnx.TensorProto.FLOAT


def _tagged(node: onnx.NodeProto, tag: str) -> onnx.NodeProto:
    node.doc_string = f"doc of {tag}"
    helper.set_metadata_props(node, {"origin": tag})
    return node


def everything_graphsurgeon_drops() -> onnx.ModelProto:
    """A model with each thing a plain ``gs.import_onnx``/``gs.export_onnx`` round trip loses:
    model doc string, domain, version and metadata; node doc strings and metadata_props; an
    attribute doc string; a sparse-tensor attribute; an initializer that is an input's default
    (read and unread); an outer-scope initializer that only an If branch reads; a value_info
    with a denotation and one of a tensor no node reads; graph metadata_props."""
    weight = onnx.numpy_helper.from_array(low_rank(4, 4, 2), "We")
    then_branch = helper.make_graph(
        [_tagged(helper.make_node("Relu", ["x"], ["yt"], name="then_relu"), "then")],
        "then",
        [],
        [helper.make_tensor_value_info("yt", FLOAT, None)],
    )
    else_branch = helper.make_graph(
        [_tagged(helper.make_node("MatMul", ["x", "We"], ["ye"], name="else_mm"), "else")],
        "else",
        [],
        [helper.make_tensor_value_info("ye", FLOAT, None)],
    )
    sparse = helper.make_sparse_tensor(
        onnx.numpy_helper.from_array(np.array([1.5, -2.0], np.float32), "s_values"),
        onnx.numpy_helper.from_array(np.array([1, 6], np.int64), "s_indices"),
        [2, 4],
    )
    nodes = [
        helper.make_node("Constant", [], ["s"], name="sparse", sparse_value=sparse),
        _tagged(helper.make_node("Mul", ["x0", "scale"], ["xs"], name="mul"), "mul"),
        helper.make_node("Add", ["xs", "s"], ["x"], name="add"),
        _tagged(
            helper.make_node(
                "If", ["cond"], ["y"], name="if", then_branch=then_branch, else_branch=else_branch
            ),
            "if",
        ),
    ]
    nodes[1].doc_string = ""  # present but empty stays present
    nodes[0].attribute[0].doc_string = "attribute doc"
    graph = helper.make_graph(
        nodes,
        "main",
        [
            helper.make_tensor_value_info("x0", FLOAT, [2, 4]),
            helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, []),
            helper.make_tensor_value_info("scale", FLOAT, []),
            helper.make_tensor_value_info("unread_default", FLOAT, []),
        ],
        [helper.make_tensor_value_info("y", FLOAT, [2, 4])],
        [
            onnx.numpy_helper.from_array(np.array(2.0, np.float32), "scale"),
            onnx.numpy_helper.from_array(np.array(1.0, np.float32), "unread_default"),
            weight,
        ],
        value_info=[
            helper.make_tensor_value_info("xs", FLOAT, [2, 4]),
            helper.make_tensor_value_info("stale", FLOAT, [1]),
        ],
    )
    graph.value_info[0].type.denotation = "TENSOR"
    graph.value_info[0].doc_string = "scaled input"
    helper.set_metadata_props(graph, {"graph": "main"})
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17)],
        ir_version=10,
        doc_string="model doc",
        domain="ai.example",
        model_version=7,
    )
    helper.set_model_props(model, {"author": "tests"})
    onnx.checker.check_model(model, full_check=True)
    return model


def test_graphsurgeon_round_trip_keeps_what_it_drops():
    model = everything_graphsurgeon_drops()
    before = model.SerializeToString()
    exported = Surgery(model).export()
    assert model.SerializeToString() == before  # the input model is not modified
    assert exported.SerializeToString() == before
    if not runtime_loads(model.ir_version, 17):  # graph metadata_props need IR version 10
        pytest.skip(f"onnxruntime {onnxruntime.__version__} cannot load IR {model.ir_version}")
    check_model(exported)
    feeds = {"x0": random_feed([2, 4]), "cond": np.array(False)}
    feeds["scale"] = np.array(3.0, np.float32)  # an input's default can be overridden
    np.testing.assert_array_equal(run(exported, feeds)[0], run(model, feeds)[0])


def test_graphsurgeon_round_trip_keeps_ir3_initializer_inputs():
    weight = onnx.numpy_helper.from_array(low_rank(4, 6, 2), "B")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "B"], ["y"], name="mm")],
        "ir3",
        [
            helper.make_tensor_value_info("B", FLOAT, [4, 6]),
            helper.make_tensor_value_info("x", FLOAT, [3, 4]),
        ],
        [helper.make_tensor_value_info("y", FLOAT, [3, 6])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)], ir_version=3)
    onnx.checker.check_model(model, full_check=True)
    assert Surgery(model).export().SerializeToString() == model.SerializeToString()


REAL_MODELS = [*sorted(MODELS.glob("*.onnx")), MNIST]


@pytest.mark.parametrize("path", REAL_MODELS, ids=lambda path: path.name)
def test_graphsurgeon_round_trip_of_real_models_is_byte_identical(path):
    model = onnx.load(path)
    before = model.SerializeToString()
    assert Surgery(model).export().SerializeToString() == before
    assert model.SerializeToString() == before


# Node and model metadata, subgraphs, determinism, external data -----------------------------

MODEL_FIELDS = ("doc_string", "domain", "model_version", "producer_name", "producer_version")


def _with_metadata(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with model metadata, and a doc string and metadata_props on every node (in
    every graph) that names it."""
    model.doc_string, model.domain, model.model_version = "model doc", "ai.example", 3
    helper.set_model_props(model, {"author": "tests", "license": "MIT"})
    for _, graph in walk_graphs(model.graph):
        for node in graph.node:
            _tagged(node, node.name)
    return model


def _assert_metadata_inherited(model: onnx.ModelProto, compressed: onnx.ModelProto) -> None:
    """Every node of ``compressed`` carries the doc string and metadata_props of the node it
    replaced or was, and the model's own fields and metadata are those of ``model``."""
    for field in MODEL_FIELDS:
        assert getattr(compressed, field) == getattr(model, field)
    kept = {p.key: p.value for p in compressed.metadata_props}
    kept.pop(FACTORIZED_KEY)
    assert kept == {p.key: p.value for p in model.metadata_props}
    originals = {node.name for _, graph in walk_graphs(model.graph) for node in graph.node}
    pairs = 0
    for _, graph in walk_graphs(compressed.graph):
        for node in graph.node:
            origin = dict((p.key, p.value) for p in node.metadata_props)["origin"]
            assert node.doc_string == f"doc of {origin}"
            prefix = node.name.split(FACTOR_TAG)[0]
            if FACTOR_TAG in node.name and prefix in originals:  # a pair node: its layer's
                assert origin == prefix
                pairs += 1
    assert pairs >= 2


@pytest.mark.parametrize("form", ["conv", "matmul-fp16-cast", "gemm-bias-correction"])
def test_pair_nodes_inherit_the_replaced_nodes_metadata(form):
    """Regression: the old rewrite built pairs without the replaced node's doc string and
    metadata_props."""
    biases = {}
    if form == "conv":
        model = conv_model(conv_weight(8, 4, (3, 3), 1, 2), (6, 6), pads=[1, 1, 1, 1])
        feeds = {"x": random_feed([2, 4, 6, 6])}
    elif form == "matmul-fp16-cast":
        nodes = [
            helper.make_node("Cast", ["W16"], ["B"], name="cast", to=onnx.TensorProto.FLOAT),
            helper.make_node("MatMul", ["x", "B"], ["y"], name="mm"),
        ]
        weight = low_rank(6, 10, 2).T.astype(np.float16)
        model = make_model(nodes, [("x", [3, 10])], [("y", None)], {"W16": weight})
        feeds = {"x": random_feed([3, 10])}
    else:
        model = gemm_model(low_rank(6, 8, 2).T.copy(), bias=np.ones(6, np.float32))
        biases = {"gemm": np.full(6, 0.5, np.float32)}
        feeds = {"a": random_feed([3, 8])}
    model = _with_metadata(model)
    discovery = discover(model)
    (layer,) = discovery.layers
    factors = factorize(discovery.weight(layer), 1, 2)
    compressed = rewrite(model, [(layer, factors)], biases=biases)
    check_model(compressed)
    _assert_metadata_inherited(model, compressed)
    if not biases:
        (before,), (after,) = run(model, feeds), run(compressed, feeds)
        assert rel_l2(before, after) < 2e-3  # exact rank 2 (fp16 rounding of the factors)


def test_pair_nodes_inherit_metadata_in_a_real_model_with_if_subgraphs():
    """silero-vad keeps every weight in the branches of (nested) If nodes: every pair, in every
    branch, inherits its node's metadata, and the model's metadata is kept."""
    model = _with_metadata(onnx.load(MODELS / "silero_vad.onnx"))
    compressed = full_rank(model)
    _assert_metadata_inherited(model, compressed)
    rng = np.random.default_rng(0)
    for rate, samples in ((16000, 576), (8000, 288)):
        feeds = {
            "input": (0.1 * rng.standard_normal((1, samples))).astype(np.float32),
            "state": np.zeros((2, 1, 128), np.float32),
            "sr": np.array(rate, dtype=np.int64),
        }
        assert_close(model, compressed, feeds, tolerance=1e-4)


@pytest.mark.parametrize("kind", ["if", "loop"])
def test_full_rank_rewrite_inside_a_subgraph(kind):
    """A layer in an If branch (its weight an outer-scope initializer, or a Constant node in the
    branch) or in a Loop body: the checker's full check passes, ONNX Runtime runs the model,
    and at full rank it computes what the original does. The outer weight is gone."""
    model = _with_metadata(if_model() if kind == "if" else loop_model())
    compressed = full_rank(model)
    onnx.checker.check_model(compressed, full_check=True)
    _assert_metadata_inherited(model, compressed)
    if kind == "if":
        assert "We" not in {t.name for t in compressed.graph.initializer}
        for cond in (True, False):
            assert_close(model, compressed, if_feeds(cond), tolerance=1e-5)
    else:
        body = graph_at(compressed.graph, ((0, "body", 0),))
        assert [n.op_type for n in body.node].count("MatMul") == 2
        assert "Constant" not in [n.op_type for n in body.node]  # W went with its MatMul
        assert_close(model, compressed, {"x": random_feed([2, 12])}, tolerance=1e-5)


_DIGEST = """
import hashlib, sys
sys.path[:0] = ["tests"]
import onnx
from robust_helpers import full_rank
from test_robustness import if_model
print(hashlib.sha256(full_rank(onnx.load(sys.argv[1])).SerializeToString()).hexdigest())
print(hashlib.sha256(full_rank(if_model()).SerializeToString()).hexdigest())
"""


def test_rewrite_is_byte_for_byte_deterministic():
    """Two rewrites of the same model give the same bytes, in one process and in two with
    different hash seeds (set orders change between them)."""
    path = MODELS / "silero_vad.onnx"
    model = onnx.load(path)
    first, second = full_rank(model), full_rank(model)
    assert first.SerializeToString() == second.SerializeToString()
    digests = []
    for seed in ("1", "2"):
        result = subprocess.run(
            [sys.executable, "-c", _DIGEST, str(path)],
            capture_output=True,
            text=True,
            env={**__import__("os").environ, "PYTHONHASHSEED": seed},
            cwd=MODELS.parent.parent,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr
        digests.append(result.stdout.split())
    assert digests[0] == digests[1]
    assert digests[0][0] == hashlib.sha256(first.SerializeToString()).hexdigest()


def test_lazily_loaded_weights_stay_in_their_file(tmp_path):
    """The rewrite of a model whose weights are still in an external file (the lazy path) never
    reads them: untouched weights keep pointing at the file; only the factors are in memory."""
    first, second = low_rank(64, 64, 4, seed=1), low_rank(64, 64, 4, seed=2)
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
        helper.make_node("MatMul", ["h", "W2"], ["y"], name="mm2"),
    ]
    model = make_model(nodes, [("x", ["N", 64])], [("y", None)], {"W1": first, "W2": second})
    path = save_model(model, tmp_path / "m.onnx", external_data=True)
    loaded = open_model(path, lazy=True)
    assert loaded.lazy
    discovery = discover(loaded.model, data_dir=loaded.data_dir)
    layer = next(layer for layer in discovery.layers if layer.name == "mm1")
    factors = factorize(discovery.weight(layer), 1, 64)
    before = loaded.model.SerializeToString()
    compressed = rewrite(loaded.model, [(layer, factors)])
    assert loaded.model.SerializeToString() == before
    tensors = {t.name: t for t in compressed.graph.initializer}
    assert "W1" not in tensors
    assert onnx.external_data_helper.uses_external_data(tensors["W2"])
    factor_names = [name for name in tensors if FACTOR_TAG in name]
    assert len(factor_names) == 2
    assert not any(onnx.external_data_helper.uses_external_data(tensors[n]) for n in factor_names)
    (tmp_path / "out").mkdir()
    out = save_model(
        compressed, tmp_path / "out" / "c.onnx", external_data=True, data_dir=loaded.data_dir
    )
    feeds = {"x": random_feed([3, 64])}
    assert_close(model, str(out), feeds, tolerance=1e-4)
