"""compress() between onnx-graphsurgeon passes: a Graph in, a Graph out, the caller's graph kept."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from builders import MNIST, REPO, conv_model, low_rank, run

from onnx_lowrank import CompressionConfig, InvalidModelError, compress
from onnx_lowrank.load import model_to_graph, open_model
from onnx_lowrank.save import save_model
from onnx_lowrank.sessions import exposed, make_session


def _exported(graph: gs.Graph) -> bytes:
    return gs.export_onnx(graph.copy()).SerializeToString()


def test_docs_example_runs():
    text = (REPO / "docs" / "graphsurgeon.md").read_text()
    (code,) = re.findall(r"```python\n(.*?)```", text, re.S)
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "MatMul" in result.stdout  # the Gemm layers became factor pairs
    accuracy = float(re.search(r"accuracy on 500 test images ([0-9.]+)", result.stdout)[1])
    assert accuracy > 0.97


def test_graph_source_matches_file_source_and_is_not_modified():
    graph = gs.import_onnx(onnx.load(MNIST))
    before = _exported(graph)
    config = CompressionConfig(params=0.5)
    from_graph = compress(graph, config)
    from_file = compress(MNIST, config)
    assert _exported(graph) == before
    assert [(layer.groups, layer.rank) for layer in from_graph.report.layers] == [
        (layer.groups, layer.rank) for layer in from_file.report.layers
    ]
    images = np.random.default_rng(0).standard_normal((8, 1, 28, 28)).astype(np.float32)
    name = graph.inputs[0].name
    (a,) = run(gs.export_onnx(from_graph.graph()), {name: images})
    (b,) = run(from_file.model, {name: images})
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_result_graph_is_a_fresh_graph_of_the_compressed_model():
    weight = low_rank(16, 8 * 9, rank=3).reshape(16, 8, 3, 3)
    model = conv_model(weight, (10, 10), batch=1)
    result = compress(model, CompressionConfig(params=0.7))
    first, second = result.graph(), result.graph()
    assert first is not second
    first.nodes.clear()  # the caller owns it: editing one graph leaves the result alone
    exported = gs.export_onnx(second)
    onnx.checker.check_model(exported)
    feeds = {"x": np.random.default_rng(1).standard_normal((1, 8, 10, 10)).astype(np.float32)}
    (expected,) = run(model, feeds)
    (got,) = run(exported, feeds)
    assert [n.op_type for n in exported.graph.node] == ["Conv", "Conv"]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)  # rank 3 of a rank-3 weight


def test_graph_of_a_lazily_loaded_model_holds_its_weights(tmp_path):
    weight = low_rank(16, 8 * 9, rank=3).reshape(16, 8, 3, 3)
    path = save_model(
        conv_model(weight, (10, 10), batch=1), tmp_path / "m.onnx", external_data=True
    )
    loaded = open_model(path, lazy=True)
    assert loaded.lazy
    graph = model_to_graph(loaded.model, loaded.data_dir)
    np.testing.assert_array_equal(graph.tensors()["W"].values, weight)


def test_graph_that_cannot_be_exported_is_a_one_line_error():
    graph = gs.import_onnx(onnx.load(MNIST))
    graph.inputs[0].dtype = None  # export_onnx refuses graph inputs without a dtype
    with pytest.raises(
        InvalidModelError, match=r"onnx_graphsurgeon\.Graph cannot be exported"
    ) as e:
        compress(graph, CompressionConfig(params=0.5))
    assert "\n" not in str(e.value)


def test_probe_graphs_are_edited_through_graphsurgeon_and_keep_the_model():
    """The calibration probe (extra graph outputs) keeps names, doc strings, metadata and the
    original's outputs, and its extra outputs hold the values the layers read."""
    model = onnx.load(MNIST)
    model.doc_string, model.model_version = "the MNIST sample", 7
    onnx.helper.set_model_props(model, {"owner": "tests"})
    conv = next(node for node in model.graph.node if node.op_type == "Conv")
    conv.doc_string = "first conv"
    conv.metadata_props.add(key="origin", value="torch")
    before = model.SerializeToString()
    wanted = {node.output[0]: onnx.TensorProto.FLOAT for node in model.graph.node[:3]}
    probe = exposed(model, wanted)
    assert model.SerializeToString() == before  # the input is not modified
    names = [info.name for info in probe.graph.output]
    assert names[: len(model.graph.output)] == [info.name for info in model.graph.output]
    assert set(wanted) <= set(names)
    assert probe.doc_string == "the MNIST sample" and probe.model_version == 7
    assert {p.key: p.value for p in probe.metadata_props}["owner"] == "tests"
    kept = next(node for node in probe.graph.node if node.name == conv.name)
    assert kept.doc_string == "first conv"
    assert {p.key: p.value for p in kept.metadata_props} == {"origin": "torch"}
    feeds = {"input": np.random.default_rng(0).standard_normal((2, 1, 28, 28), np.float32)}
    session = make_session(probe, ["CPUExecutionProvider"])
    values = dict(zip(names, session.run(names, feeds), strict=True))
    (reference,) = run(model, feeds)
    np.testing.assert_array_equal(values[model.graph.output[0].name], reference)
    with pytest.raises(InvalidModelError, match="not a tensor of the main graph"):
        exposed(model, {"no_such_tensor": onnx.TensorProto.FLOAT})
