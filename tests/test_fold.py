"""Folding BatchNormalization and per-channel Mul/Add into the preceding Conv.

Every fold must keep the outputs equal to float tolerance, remove the folded node, and leave
alone what it cannot fold exactly.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from builders import MODELS, check_model, make_model, op_types, random_feed, rel_l2, run
from onnx import helper

from onnx_lowrank import CompressionConfig, compress
from onnx_lowrank.cost import count_parameters
from onnx_lowrank.fold import fold
from onnx_lowrank.pipeline import analyze

TOLERANCE = 1e-5


def conv_then(
    ops: list[tuple[str, dict]],
    channels: int = 6,
    bias: bool = True,
    group: int = 1,
    spatial: tuple[int, ...] = (5, 5),
    seed: int = 0,
) -> onnx.ModelProto:
    """``Conv`` followed by a chain of ops; each op is ``(op_type, constants by input slot)``.

    A constant slot named ``"x"`` takes the chain's running tensor.
    """
    rng = np.random.default_rng(seed)
    in_channels = 4 * group
    kernel = (3,) * len(spatial)
    inits = {"W": rng.standard_normal((channels, in_channels // group, *kernel)).astype("f4")}
    inputs = ["x", "W"]
    if bias:
        inits["B"] = rng.standard_normal(channels).astype("f4")
        inputs.append("B")
    nodes = [helper.make_node("Conv", inputs, ["y0"], name="conv", group=group)]
    current = "y0"
    for position, (op_type, spec) in enumerate(ops):
        names = []
        attributes = spec.get("attributes", {})
        for slot, value in enumerate(spec["inputs"]):
            if isinstance(value, str) and value == "x":
                names.append(current)
            elif isinstance(value, str):
                names.append(value)
            else:
                name = f"c{position}_{slot}"
                inits[name] = np.asarray(value, dtype="f4")
                names.append(name)
        output = f"y{position + 1}"
        nodes.append(
            helper.make_node(op_type, names, [output], name=f"{op_type}{position}", **attributes)
        )
        current = output
    nodes.append(helper.make_node("Identity", [current], ["out"], name="out"))
    return make_model(nodes, [("x", [2, in_channels, *spatial])], [("out", None)], inits, opset=17)


def batchnorm(channels: int, seed: int = 1) -> tuple[str, dict]:
    rng = np.random.default_rng(seed)
    return (
        "BatchNormalization",
        {
            "inputs": [
                "x",
                rng.uniform(0.5, 2.0, channels),
                rng.standard_normal(channels),
                rng.standard_normal(channels),
                rng.uniform(0.1, 3.0, channels),
            ],
            "attributes": {"epsilon": 1e-3},
        },
    )


def assert_same_outputs(before: onnx.ModelProto, after: onnx.ModelProto, shape) -> None:
    check_model(after)
    feeds = {"x": random_feed(shape, seed=3)}
    assert rel_l2(run(before, feeds)[0], run(after, feeds)[0]) < TOLERANCE


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("group", [1, 2])
def test_batchnorm_folds_into_conv_with_or_without_bias(bias, group):
    model = conv_then([batchnorm(6)], bias=bias, group=group)
    folding = fold(model)
    assert [(f.conv, f.node, f.op_type) for f in folding.folded] == [
        ("conv", "BatchNormalization0", "BatchNormalization")
    ]
    assert op_types(folding.model) == ["Conv", "Identity"]
    assert len(folding.model.graph.node[0].input) == 3  # a bias was added where missing
    assert_same_outputs(model, folding.model, (2, 4 * group, 5, 5))


@pytest.mark.parametrize(
    "constant",
    [
        np.float32(1.7),
        np.arange(1, 7).reshape(6, 1, 1) / 3,
        np.arange(1, 7).reshape(1, 6, 1, 1) / 3,
        np.ones((1, 1, 1)) * -0.5,
    ],
    ids=["scalar", "c11", "1c11", "111"],
)
@pytest.mark.parametrize("op_type", ["Mul", "Add"])
def test_per_channel_mul_and_add_fold(constant, op_type):
    model = conv_then([(op_type, {"inputs": [constant, "x"]})])
    folding = fold(model)
    assert [f.op_type for f in folding.folded] == [op_type]
    assert op_types(folding.model) == ["Conv", "Identity"]
    assert_same_outputs(model, folding.model, (2, 4, 5, 5))


def test_chain_folds_completely_and_a_second_pass_changes_nothing():
    chain = [
        batchnorm(6),
        ("Mul", {"inputs": ["x", np.linspace(0.5, 1.5, 6).reshape(6, 1)]}),
        ("Add", {"inputs": ["x", np.linspace(-1, 1, 6).reshape(1, 6, 1)]}),
    ]
    model = conv_then(chain, spatial=(7,))
    folding = fold(model)
    assert [f.op_type for f in folding.folded] == ["BatchNormalization", "Mul", "Add"]
    assert op_types(folding.model) == ["Conv", "Identity"]
    assert not folding.model.graph.initializer or all(
        t.name in ("W", "B") for t in folding.model.graph.initializer
    )
    assert_same_outputs(model, folding.model, (2, 4, 7))
    again = fold(folding.model)
    assert not again.modified
    assert again.model.SerializeToString() == folding.model.SerializeToString()


def test_input_model_is_not_modified():
    model = conv_then([batchnorm(6)])
    before = model.SerializeToString()
    fold(model)
    assert model.SerializeToString() == before


@pytest.mark.parametrize(
    "ops",
    [
        [("Relu", {"inputs": ["x"]}), batchnorm(6)],  # BN after an activation (CREPE)
        [
            ("Mul", {"inputs": ["x", np.arange(3.0).reshape(1, 1, 3, 1)]})
        ],  # varies along space, not channels
        [("Mul", {"inputs": ["x", np.ones((2, 6, 1, 1))]})],  # varies along the batch
        [("Mul", {"inputs": ["x", np.ones((1, 1, 1, 1, 1))]})],  # broadcasts to a larger rank
        [("Mul", {"inputs": ["x", "x"]})],  # not a constant
        [("Sub", {"inputs": ["x", np.ones((6, 1, 1))]})],  # not an op this pass folds
    ],
    ids=["after-relu", "spatial", "batch", "rank", "square", "sub"],
)
def test_what_cannot_fold_exactly_is_left_alone(ops):
    model = conv_then(ops)
    folding = fold(model)
    assert not folding.modified
    assert folding.model.SerializeToString() == model.SerializeToString()


def test_conv_output_with_two_readers_or_a_graph_output_is_not_folded():
    model = conv_then([batchnorm(6)])
    model.graph.output.append(helper.make_tensor_value_info("y0", onnx.TensorProto.FLOAT, None))
    assert not fold(model).modified
    shared = conv_then([batchnorm(6)])
    shared.graph.node.append(helper.make_node("Relu", ["y0"], ["r"], name="relu"))
    shared.graph.output.append(helper.make_tensor_value_info("r", onnx.TensorProto.FLOAT, None))
    assert not fold(shared).modified


def test_shared_weight_is_not_folded():
    model = conv_then([batchnorm(6)])
    graph = model.graph
    graph.node.insert(1, helper.make_node("Conv", ["x", "W"], ["other"], name="conv2"))
    graph.output.append(helper.make_tensor_value_info("other", onnx.TensorProto.FLOAT, None))
    assert not fold(model).modified


def test_ppocr_folds_its_35_batchnorms_and_18_bias_adds_exactly():
    model = onnx.load(MODELS / "ppocr_mobile_v2.0_cls.onnx")
    folding = fold(model)
    counts = {
        op: sum(f.op_type == op for f in folding.folded) for op in ("BatchNormalization", "Add")
    }
    assert counts == {"BatchNormalization": 35, "Add": 18}
    assert "BatchNormalization" not in op_types(folding.model)
    onnx.checker.check_model(folding.model, full_check=True)
    feeds = {"x": random_feed((4, 3, 48, 192), seed=1)}
    before, after = run(model, feeds)[0], run(folding.model, feeds)[0]
    assert rel_l2(before, after) < TOLERANCE
    assert not fold(folding.model).modified


def test_crepe_batchnorm_after_relu_is_not_folded():
    model = onnx.load(MODELS / "crepe_tiny.onnx")
    assert not fold(model).modified


def test_compress_folds_reports_it_and_validates_against_the_original():
    path = MODELS / "ppocr_mobile_v2.0_cls.onnx"
    config = CompressionConfig(params=1.0, input_shapes={"x": (1, 3, 48, 192)}, latency_runs=1)
    analysis = analyze(path, config)
    assert analysis.original is not None
    assert "35 BatchNormalization, 18 Add" in analysis.notes[0]
    result = compress(path, config)
    assert any("35 BatchNormalization" in note for note in result.report.notes)
    assert result.report.params_before == 133_700
    # only the folding: BN statistics and reshape constants are gone, biases were added
    output = result.report.validation.outputs[0]
    assert output.rel_l2_error < TOLERANCE and output.top1_agreement == 1.0
    unfolded = compress(path, config.replace(fold_batchnorm=False))
    assert unfolded.report.params_after == 133_700
    assert "BatchNormalization" in op_types(unfolded.model)


def test_folding_lowers_the_error_of_the_same_budget_on_ppocr():
    """The error is measured on the effective weights only when BN is folded."""
    path = MODELS / "ppocr_mobile_v2.0_cls.onnx"
    feeds = {"x": random_feed((8, 3, 48, 192), seed=2)}
    errors = {}
    for folded in (True, False):
        config = CompressionConfig(params=0.6, fold_batchnorm=folded, validate=False)
        result = compress(path, config)
        errors[folded] = rel_l2(run(onnx.load(path), feeds)[0], run(result.model, feeds)[0])
    assert errors[True] < errors[False]


def _add_if(graph: onnx.GraphProto, branches: dict[str, onnx.GraphProto]) -> None:
    """Append ``If(cond)`` with ``branches`` and its output ``flag`` to ``graph``."""
    graph.node.append(helper.make_node("If", ["cond"], ["flag"], name="if", **branches))
    graph.input.append(helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, []))
    graph.output.append(helper.make_tensor_value_info("flag", onnx.TensorProto.FLOAT, [1]))


def _constant_branch(name: str, output: str) -> onnx.GraphProto:
    value = onnx.numpy_helper.from_array(np.ones(1, np.float32))
    return helper.make_graph(
        [helper.make_node("Constant", [], [output], value=value)],
        name,
        [],
        [helper.make_tensor_value_info(output, onnx.TensorProto.FLOAT, [1])],
    )


def test_a_new_bias_name_is_fresh_in_subgraphs_too():
    """fold names the bias it adds ``<conv>/folded_bias``; here an If branch already defines
    that name, and a main-graph initializer of the same name breaks single assignment (the
    checker and ONNX Runtime reject the model)."""
    conv_bn = conv_then([batchnorm(6)], bias=False)
    branches = {
        "then_branch": _constant_branch("then", "conv/folded_bias"),
        "else_branch": _constant_branch("else", "other"),
    }
    graph = conv_bn.graph
    _add_if(graph, branches)
    onnx.checker.check_model(conv_bn, full_check=True)
    folding = fold(conv_bn)
    assert [f.op_type for f in folding.folded] == ["BatchNormalization"]
    onnx.checker.check_model(folding.model, full_check=True)
    feeds = {"x": random_feed((2, 4, 5, 5), seed=3), "cond": np.array(True)}
    before, after = run(conv_bn, feeds), run(folding.model, feeds)
    assert rel_l2(before[0], after[0]) < TOLERANCE
    assert np.array_equal(before[1], after[1])


def test_an_overridable_weight_is_not_folded_and_ir3_constants_are():
    """An initializer that is also a graph input is that input's default from IR version 4 on:
    a caller may feed another weight, so folding a BatchNormalization into it would change the
    model. Below IR version 4 every initializer is listed as an input and is a constant."""
    model = conv_then([batchnorm(6)], bias=False)
    weight = model.graph.initializer[0]
    model.graph.input.append(helper.make_tensor_value_info("W", weight.data_type, weight.dims))
    assert not fold(model).modified
    old = conv_then([batchnorm(6)], bias=False)
    for tensor in old.graph.initializer:
        old.graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, None))
        old.graph.input[-1].type.tensor_type.shape.dim.extend(
            onnx.TensorShapeProto.Dimension(dim_value=d) for d in tensor.dims
        )
    old.ir_version = 3
    old.opset_import[0].version = 9
    onnx.checker.check_model(old, full_check=True)
    folding = fold(old)
    assert [f.op_type for f in folding.folded] == ["BatchNormalization"]
    onnx.checker.check_model(folding.model, full_check=True)  # the new bias is an input too
    inputs = {info.name for info in folding.model.graph.input}
    assert inputs == {"x"} | {t.name for t in folding.model.graph.initializer}
    assert_same_outputs(old, folding.model, (2, 4, 5, 5))


def test_recompressing_a_folded_model_with_the_same_budget_is_a_no_op(tmp_path):
    """The PP-OCR classifier loses 6,408 BatchNormalization/Add parameters to folding. Budgets of
    a second run are fractions of the original model, so the recorded original must count them,
    or the same --params takes more parameters away the second time."""
    import json
    import subprocess
    import sys

    source = MODELS / "ppocr_mobile_v2.0_cls.onnx"
    first, second = tmp_path / "first.onnx", tmp_path / "second.onnx"
    reports = []
    for given, out in ((source, first), (first, second)):
        report = out.with_suffix(".json")
        args = ["compress", given, "-o", out, "--params", "0.8", "--report", report]
        args += ["--input-shape", "x:1,3,48,192"]
        done = subprocess.run(
            [sys.executable, "-m", "onnx_lowrank", *map(str, args)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
        reports.append(json.loads(report.read_text()))
    original = count_parameters(onnx.load(source))
    assert reports[0]["params_before"] == original == 133_700
    assert reports[0]["params_after"] <= 0.8 * original
    assert reports[1]["params_after"] == reports[1]["params_before"] == reports[0]["params_after"]
    assert not [layer for layer in reports[1]["layers"] if layer["rank"] is not None]
    assert any(f"original {original:,} parameters" in note for note in reports[1]["notes"])
    # a smaller budget on the compressed model is still a fraction of the original
    third = compress(second, CompressionConfig(params=0.7, validate=False))
    assert 0.69 * original <= third.report.params_after <= 0.7 * original


def _nested_branch(name: str, output: str) -> onnx.GraphProto:
    """A branch whose If defines ``name`` one level further down."""
    inner = helper.make_node(
        "If",
        ["cond"],
        [output],
        then_branch=_constant_branch("inner_then", name),
        else_branch=_constant_branch("inner_else", output + "_other"),
    )
    return helper.make_graph(
        [inner], "outer", [], [helper.make_tensor_value_info(output, onnx.TensorProto.FLOAT, [1])]
    )


def test_a_new_bias_name_is_fresh_in_nested_subgraphs():
    """The name fold would give the new bias, ``<conv>/folded_bias`` (and its first
    alternative), is already defined two levels down, in an If inside an If branch: the folded
    model keeps single assignment, the checker and ONNX Runtime accept it, outputs match."""
    conv_bn = conv_then([batchnorm(6)], bias=False)
    graph = conv_bn.graph
    branches = {
        "then_branch": _nested_branch("conv/folded_bias", "a"),
        "else_branch": _nested_branch("conv/folded_bias_2", "b"),
    }
    _add_if(graph, branches)
    onnx.checker.check_model(conv_bn, full_check=True)
    folding = fold(conv_bn)
    assert [f.op_type for f in folding.folded] == ["BatchNormalization"]
    assert folding.model.graph.node[0].input[2] == "conv/folded_bias_3"
    onnx.checker.check_model(folding.model, full_check=True)
    for cond in (True, False):
        feeds = {"x": random_feed((2, 4, 5, 5), seed=3), "cond": np.array(cond)}
        before, after = run(conv_bn, feeds), run(folding.model, feeds)
        assert rel_l2(before[0], after[0]) < TOLERANCE
        assert np.array_equal(before[1], after[1])


def with_metadata(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with model, graph and Conv-node doc strings and metadata_props."""
    model.doc_string, model.domain, model.model_version = "a model", "org.example", 7
    helper.set_model_props(model, {"source": "tests", "license": "MIT"})
    model.graph.doc_string = "the graph"
    for position, node in enumerate(model.graph.node):
        if node.op_type == "Conv":
            node.doc_string = f"conv {position}"
            node.metadata_props.add(key="origin", value=f"layer{position}")
    return model


def assert_metadata_kept(before: onnx.ModelProto, after: onnx.ModelProto) -> None:
    for field in ("doc_string", "domain", "model_version", "metadata_props", "opset_import"):
        assert getattr(after, field) == getattr(before, field), field
    assert after.ir_version == before.ir_version
    assert after.graph.doc_string == before.graph.doc_string
    convs = {n.name: n for n in before.graph.node if n.op_type == "Conv"}
    kept = [n for n in after.graph.node if n.op_type == "Conv"]
    assert len(kept) == len(convs)
    for node in kept:
        assert node.doc_string == convs[node.name].doc_string
        assert node.metadata_props == convs[node.name].metadata_props


def test_node_and_model_metadata_are_kept():
    """The Conv that survives a fold keeps its doc string and metadata_props; the model keeps
    its doc string, metadata_props, domain, model_version, opset and IR version (a graphsurgeon
    round trip drops all but the last two)."""
    model = with_metadata(conv_then([batchnorm(6), ("Mul", {"inputs": ["x", np.float32(2)]})]))
    folding = fold(model)
    assert len(folding.folded) == 2
    assert_metadata_kept(model, folding.model)
    assert_same_outputs(model, folding.model, (2, 4, 5, 5))


def test_ppocr_keeps_metadata_and_outputs_when_folded():
    model = with_metadata(onnx.load(MODELS / "ppocr_mobile_v2.0_cls.onnx"))
    folding = fold(model)
    assert len(folding.folded) == 53
    assert_metadata_kept(model, folding.model)
    onnx.checker.check_model(folding.model, full_check=True)
    feeds = {"x": random_feed((2, 3, 48, 192), seed=4)}
    assert rel_l2(run(model, feeds)[0], run(folding.model, feeds)[0]) < TOLERANCE
    assert fold(model).model.SerializeToString() == folding.model.SerializeToString()


def test_value_info_of_removed_nodes_is_dropped():
    """A folded Add's constant computed by ``Reshape(Constant, Constant)`` (paddle2onnx's bias)
    disappears with its nodes, and so do the value_info entries of every name removed: the
    old code kept those of the constant nodes' outputs, describing names nothing defines."""
    rng = np.random.default_rng(0)
    shift = onnx.numpy_helper.from_array(np.linspace(-1, 1, 6).astype(np.float32))
    shape = onnx.numpy_helper.from_array(np.array([1, 6, 1, 1], np.int64))
    nodes = [
        helper.make_node("Constant", [], ["bias_c"], name="c", value=shift),
        helper.make_node("Constant", [], ["shape_c"], name="s", value=shape),
        helper.make_node("Reshape", ["bias_c", "shape_c"], ["bias_r"], name="r"),
        helper.make_node("Conv", ["x", "W"], ["y0"], name="conv"),
        helper.make_node("Add", ["y0", "bias_r"], ["y1"], name="add"),
        helper.make_node("Relu", ["y1"], ["out"], name="relu"),
    ]
    weight = rng.standard_normal((6, 4, 3, 3)).astype(np.float32)
    model = make_model(nodes, [("x", [2, 4, 5, 5])], [("out", None)], {"W": weight})
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    graph = model.graph
    assert {"bias_c", "shape_c", "bias_r", "y0"} <= {info.name for info in graph.value_info}
    folding = fold(model)
    assert [f.op_type for f in folding.folded] == ["Add"]
    assert op_types(folding.model) == ["Conv", "Relu"]
    defined = {name for node in folding.model.graph.node for name in node.output}
    assert {info.name for info in folding.model.graph.value_info} <= defined
    assert_same_outputs(model, folding.model, (2, 4, 5, 5))


def test_the_graph_index_is_built_once(monkeypatch):
    """Folding is linear in the graph: one index, updated by each fold (the old code rebuilt it
    after every fold and again to find dead constants, 0.8 s for 200 Conv+BN pairs and 14 s
    for 800; benchmarks/fold_scaling.py measures it)."""
    from onnx_lowrank import fold as fold_module

    built = []

    class Counted(fold_module._Index):
        def __init__(self, *args, **kwargs):
            built.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(fold_module, "_Index", Counted)
    folding = fold(onnx.load(MODELS / "ppocr_mobile_v2.0_cls.onnx"))
    assert len(folding.folded) == 53 and len(built) == 1


def test_lazy_external_weights_fold_like_loaded_ones(tmp_path):
    """A model whose weights stay in their external file (the lazy path of models over 1 GiB)
    folds to the same values as the loaded model; the weights fold leaves alone stay external."""
    from onnx.external_data_helper import load_external_data_for_model, uses_external_data

    from onnx_lowrank.load import open_model

    model = conv_then([batchnorm(6)], bias=True)
    graph = model.graph
    extra = np.random.default_rng(5).standard_normal((3, 6, 1, 1)).astype(np.float32)
    graph.initializer.append(onnx.numpy_helper.from_array(extra, "W2"))
    graph.node[-1].CopyFrom(helper.make_node("Conv", ["y1", "W2"], ["out"], name="conv2"))
    path = tmp_path / "model.onnx"
    onnx.save(model, path, save_as_external_data=True, size_threshold=0)
    loaded = open_model(path, lazy=True)
    assert loaded.lazy
    lazy = fold(loaded.model, data_dir=loaded.data_dir)
    eager = fold(open_model(path, lazy=False).model)
    assert [f.op_type for f in lazy.folded] == ["BatchNormalization"]
    external = {t.name for t in lazy.model.graph.initializer if uses_external_data(t)}
    assert external == {"W2"}
    load_external_data_for_model(lazy.model, str(tmp_path))
    assert lazy.model.SerializeToString() == eager.model.SerializeToString()


def test_a_fold_that_frees_an_earlier_convs_weight_lets_it_fold():
    """Conv ``a``'s weight is also read, through a Reshape, as the constant of the Mul after
    the later Conv ``k``, so ``a`` cannot fold at first. Folding the Mul into ``k`` removes the
    Reshape, ``a`` then owns its weight and its BatchNormalization folds as well: the single
    pass retries a Conv whose weight lost a reader, as rescanning the graph would."""
    rng = np.random.default_rng(6)
    scale, shift, mean, var = (rng.uniform(0.5, 1.5, 6).astype(np.float32) for _ in range(4))
    inits = {
        "Wa": rng.standard_normal((6, 1, 1, 1)).astype(np.float32),
        "Wk": rng.standard_normal((6, 4, 3, 3)).astype(np.float32),
        "shape": np.array([1, 6, 1, 1], np.int64),
        **dict(zip(("scale", "shift", "mean", "var"), (scale, shift, mean, var), strict=True)),
    }
    nodes = [
        helper.make_node("Conv", ["xa", "Wa"], ["ya"], name="a"),
        helper.make_node("BatchNormalization", ["ya", "scale", "shift", "mean", "var"], ["ba"]),
        helper.make_node("Reshape", ["Wa", "shape"], ["m"], name="reshape"),
        helper.make_node("Conv", ["xk", "Wk"], ["yk"], name="k"),
        helper.make_node("Mul", ["yk", "m"], ["mk"], name="mul"),
        helper.make_node("Add", ["ba", "mk"], ["out"], name="sum"),
    ]
    model = make_model(nodes, [("xa", [2, 1, 3, 3]), ("xk", [2, 4, 5, 5])], [("out", None)], inits)
    folding = fold(model)
    assert [(f.conv, f.op_type) for f in folding.folded] == [
        ("k", "Mul"),
        ("a", "BatchNormalization"),
    ]
    assert op_types(folding.model) == ["Conv", "Conv", "Add"]
    check_model(folding.model)
    feeds = {"xa": random_feed((2, 1, 3, 3), seed=1), "xk": random_feed((2, 4, 5, 5), seed=2)}
    assert rel_l2(run(model, feeds)[0], run(folding.model, feeds)[0]) < TOLERANCE
