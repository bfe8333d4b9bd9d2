"""inspect: graph inputs and outputs, opsets, IR version and where the parameters are."""

from __future__ import annotations

import json

import numpy as np
from builders import MNIST, MODELS, make_model
from onnx import TensorProto, helper
from robust_helpers import cached

from onnx_lowrank import inspect
from onnx_lowrank.cli import main
from onnx_lowrank.describe import embedding_tables


def _embedding_model():
    """Token embedding (Gather axis 0, 50x16), a tied output projection reading the same table
    through Transpose, a Gather on axis 1 (not an embedding), and a dense MatMul 16x8."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Gather", ["E", "ids"], ["h"], name="embed"),
        helper.make_node("MatMul", ["h", "W"], ["z"], name="proj"),
        helper.make_node("Transpose", ["E"], ["Et"], name="tie", perm=[1, 0]),
        helper.make_node("MatMul", ["h", "Et"], ["logits"], name="head"),
        helper.make_node("Gather", ["C", "ids"], ["cols"], name="columns", axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "embedding",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])],
        [
            helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", "seq", 8]),
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", 50]),
            helper.make_tensor_value_info("cols", TensorProto.FLOAT, [4, "batch", "seq"]),
        ],
        [
            helper.make_tensor("E", TensorProto.FLOAT, [50, 16], rng.standard_normal(800)),
            helper.make_tensor("W", TensorProto.FLOAT, [16, 8], rng.standard_normal(128)),
            helper.make_tensor("C", TensorProto.FLOAT, [4, 30], rng.standard_normal(120)),
        ],
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8, producer_name="t"
    )


def test_inputs_outputs_opset_and_shares_of_a_tiny_model():
    model = _embedding_model()
    listing = inspect(model)
    assert [(i.name, i.dtype, i.shape) for i in listing.inputs] == [
        ("ids", "int64", ("batch", "seq"))
    ]
    assert [(o.name, o.shape) for o in listing.outputs] == [
        ("z", ("batch", "seq", 8)),
        ("logits", ("batch", "seq", 50)),
        ("cols", (4, "batch", "seq")),
    ]
    assert listing.opsets == {"": 17} and listing.ir_version == 8
    assert set(embedding_tables(model)) == {((), "E")}
    # the head shares E with the Gather: one tied layer, counted once, as an embedding
    embed = next(layer for layer in listing.layers if layer.name == "embed")
    assert embed.op_type == "Gather" and embed.shared_with == ("head",)
    shares = listing.shares
    assert shares.total == 800 + 128 + 120
    assert (shares.compressible, shares.embeddings, shares.other) == (128, 800, 120)


def test_a_gather_table_that_discovery_skips_still_counts_as_embedding():
    model = _embedding_model()
    del model.graph.node[2:4]  # no tied head; the table is also summed: not a layer
    model.graph.node.append(helper.make_node("ReduceSum", ["E"], ["total"], keepdims=0))
    model.graph.output[1].CopyFrom(helper.make_tensor_value_info("total", TensorProto.FLOAT, []))
    listing = inspect(model)
    embed = next(layer for layer in listing.layers if layer.name == "embed")
    assert embed.skipped_reason is not None
    shares = listing.shares
    assert (shares.compressible, shares.embeddings, shares.other) == (128, 800, 120)


def test_inspect_cli_text_and_json(capsys, tmp_path):
    assert main(["inspect", str(MNIST)]) == 0
    out = capsys.readouterr().out
    assert "IR version 8, opset ai.onnx 17" in out
    assert "  input: float32 (batch, 1, 28, 28)" in out
    assert "  logits: float32 (batch, 10)" in out
    assert "in compressible layers" in out and "in embeddings" in out
    assert main(["inspect", str(MNIST), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["inputs"] == [{"name": "input", "dtype": "float32", "shape": ["batch", 1, 28, 28]}]
    assert data["opsets"] == {"": 17} and data["ir_version"] == 8
    shares = data["shares"]
    assert shares["total"] == data["params"] == 421_642
    assert shares["compressible"] + shares["embeddings"] + shares["other"] == shares["total"]
    assert abs(shares["compressible_fraction"] - 421_408 / 421_642) < 1e-12


def test_unnamed_dynamic_dims_and_scalars_on_a_real_model():
    listing = inspect(MODELS / "silero_vad.onnx")
    shapes = {i.name: (i.dtype, i.shape) for i in listing.inputs}
    assert shapes == {
        "input": ("float32", ("?", "?")),
        "state": ("float32", (2, "?", 128)),
        "sr": ("int64", ()),
    }


def test_embedding_share_of_a_real_transformer():
    """khmersm: a token embedding read by Gather, next to MatMul layers."""
    listing = inspect(cached("khmersm/model.onnx"))
    assert listing.shares.embeddings > 0
    assert listing.shares.compressible > listing.shares.embeddings
    assert [i.name for i in listing.inputs] == ["x", "mask"]
    assert listing.inputs[0].dtype == "int64" and listing.inputs[0].shape == ("batch", "seq")


def test_make_model_helper_has_no_embeddings():
    model = make_model(
        [helper.make_node("MatMul", ["x", "B"], ["y"], name="m")],
        [("x", ["n", 4])],
        [("y", None)],
        {"B": np.ones((4, 3), np.float32)},
    )
    assert embedding_tables(model) == {}


def _head_first_model():
    """The tied table's first reader in graph order is the output MatMul (it reads another
    input), the Gather comes after it: the discovered layer is the MatMul, tied with the
    lookup."""
    rng = np.random.default_rng(1)
    nodes = [
        helper.make_node("Transpose", ["E"], ["Et"], name="tie", perm=[1, 0]),
        helper.make_node("MatMul", ["x", "Et"], ["logits"], name="head"),
        helper.make_node("Gather", ["E", "ids"], ["h"], name="embed"),
        helper.make_node("MatMul", ["h", "W"], ["z"], name="proj"),
    ]
    graph = helper.make_graph(
        nodes,
        "head_first",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 3]),
        ],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, [2, 50]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 3, 8]),
        ],
        [
            helper.make_tensor("E", TensorProto.FLOAT, [50, 16], rng.standard_normal(800)),
            helper.make_tensor("W", TensorProto.FLOAT, [16, 8], rng.standard_normal(128)),
        ],
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8, producer_name="t"
    )


def test_a_table_first_read_by_its_output_matmul_is_an_embedding():
    listing = inspect(_head_first_model())
    head = next(layer for layer in listing.layers if layer.shared_with)
    assert head.op_type == "MatMul"  # the layer is named after its first reader
    shares = listing.shares
    assert (shares.compressible, shares.embeddings, shares.other) == (128, 800, 0)


def test_compress_report_states_the_shares_it_budgets_against(tmp_path):
    """The shares inspect shows are in the compress summary and the JSON report."""
    from onnx_lowrank import CompressionConfig, compress
    from onnx_lowrank.report import format_summary

    result = compress(_head_first_model(), CompressionConfig(params=0.6, latency_check=False))
    shares = result.report.shares
    assert (shares.compressible, shares.embeddings, shares.other) == (128, 800, 0)
    assert "parameters of the input: 13.8% in compressible layers, 86.2% in embeddings" in (
        format_summary(result.report)
    )
    out = tmp_path / "mnist.onnx"
    report = tmp_path / "report.json"
    assert main(["compress", str(MNIST), str(out), "--params", "0.5", "--report", str(report)]) == 0
    data = json.loads(report.read_text())["shares"]
    assert data["total"] == 421_642 and data["embeddings"] == 0
    assert data["compressible"] + data["other"] == data["total"]
