"""Embedding tables: ``Gather(T, ids)`` found, factorized as ``Gather(U, ids) → MatMul(·, V)``,
and tied with an output MatMul; checker, ONNX Runtime and exactness every time."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from builders import check_model, low_rank, op_types, run
from onnx import TensorProto, helper, numpy_helper

from onnx_lowrank import CompressionConfig, compress
from onnx_lowrank.cost import count_parameters
from onnx_lowrank.discover import discover
from onnx_lowrank.factorize import factorize
from onnx_lowrank.rewrite import rewrite

VOCAB, WIDTH = 40, 12
IDS_TYPES = {np.int64: TensorProto.INT64, np.int32: TensorProto.INT32}


def embedding_model(
    table: np.ndarray,
    opset: int = 17,
    ids_type=np.int64,
    ids_shape=(2, 3),
    tied: bool = False,
    storage: str = "initializer",
) -> onnx.ModelProto:
    """``emb = Gather(T, ids)``; ``tied`` adds ``logits = emb @ Tᵀ`` (Transpose of the same T).

    ``storage``: ``initializer``, ``constant`` (a Constant node) or ``fp16`` (fp16 initializer
    behind a Cast to float).
    """
    nodes, inits = [], []
    if storage == "constant":
        nodes.append(
            helper.make_node("Constant", [], ["T"], value=numpy_helper.from_array(table, "T_value"))
        )
    elif storage == "fp16":
        inits.append(numpy_helper.from_array(table.astype(np.float16), "T16"))
        nodes.append(helper.make_node("Cast", ["T16"], ["T"], to=TensorProto.FLOAT))
    else:
        inits.append(numpy_helper.from_array(table, "T"))
    nodes.append(helper.make_node("Gather", ["T", "ids"], ["emb"], name="embed", axis=0))
    outputs = [helper.make_tensor_value_info("emb", TensorProto.FLOAT, None)]
    if tied:
        nodes.append(helper.make_node("Transpose", ["T"], ["Tt"], perm=[1, 0]))
        nodes.append(helper.make_node("MatMul", ["emb", "Tt"], ["logits"], name="head"))
        outputs.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, None))
    graph = helper.make_graph(
        nodes,
        "embeddings",
        [helper.make_tensor_value_info("ids", IDS_TYPES[ids_type], list(ids_shape))],
        outputs,
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=7)
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model, full_check=True)
    return model


def ids_feed(shape, ids_type=np.int64, negative: bool = False, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    low = -VOCAB if negative else 0
    return rng.integers(low, VOCAB, shape).astype(ids_type)


def rewritten(model: onnx.ModelProto, rank: int | None = None) -> onnx.ModelProto:
    discovery = discover(model)
    assert len(discovery.layers) == 1, discovery.skipped
    layer = discovery.layers[0]
    weight = discovery.weight(layer)
    factors = factorize(weight, 1, rank or min(weight.shape))
    return rewrite(model, [(layer, factors)])


@pytest.mark.parametrize("opset", [9, 11, 13])  # Gather-1, Gather-11, Gather-13
@pytest.mark.parametrize("ids_type", [np.int64, np.int32])
@pytest.mark.parametrize("ids_shape", [(), (5,), (2, 3)])
def test_lookup_full_rank_and_exact_low_rank(opset, ids_type, ids_shape):
    table = np.random.default_rng(1).standard_normal((VOCAB, WIDTH)).astype(np.float32)
    model = embedding_model(table, opset, ids_type, ids_shape)
    layer = discover(model).layers[0]
    assert (layer.op_type, layer.out_channels, layer.in_channels) == ("Gather", VOCAB, WIDTH)
    assert layer.macs == 0  # a lookup multiplies nothing
    ids = ids_feed(ids_shape, ids_type, negative=opset >= 11)  # negative ids from Gather-11
    (expected,) = run(model, {"ids": ids})
    full = rewritten(model)
    check_model(full)
    assert op_types(full) == ["Gather", "MatMul"]
    np.testing.assert_allclose(run(full, {"ids": ids})[0], expected, rtol=1e-5, atol=1e-5)
    planted = low_rank(VOCAB, WIDTH, 3, seed=2)
    model = embedding_model(planted, opset, ids_type, ids_shape)
    (expected,) = run(model, {"ids": ids})
    low = rewritten(model, rank=3)
    check_model(low)
    np.testing.assert_allclose(run(low, {"ids": ids})[0], expected, rtol=1e-4, atol=1e-4)
    assert count_parameters(low) == 3 * (VOCAB + WIDTH)


@pytest.mark.parametrize("storage", ["constant", "fp16"])
def test_table_in_a_constant_node_or_behind_a_cast(storage):
    table = np.random.default_rng(3).standard_normal((VOCAB, WIDTH)).astype(np.float32)
    model = embedding_model(table, storage=storage)
    ids = ids_feed((2, 3))
    (expected,) = run(model, {"ids": ids})
    full = rewritten(model)
    check_model(full)
    tolerance = 1e-2 if storage == "fp16" else 1e-5  # fp16 factors of an fp16 table
    np.testing.assert_allclose(run(full, {"ids": ids})[0], expected, rtol=tolerance, atol=tolerance)
    stored = {t.data_type for t in full.graph.initializer}
    assert stored == ({TensorProto.FLOAT16} if storage == "fp16" else {TensorProto.FLOAT})
    assert "Constant" not in op_types(full) or storage == "constant"


def test_table_tied_with_an_output_matmul_is_one_layer_counted_once():
    planted = low_rank(VOCAB, WIDTH, 4, seed=4)
    model = embedding_model(planted, tied=True)
    discovery = discover(model)
    assert not discovery.skipped
    (layer,) = discovery.layers
    assert layer.op_type == "Gather" and [u.op_type for u in layer.tied] == ["MatMul"]
    assert layer.max_groups == 1
    # the head multiplies 6 rows by the (12 × 40) table; the lookup nothing
    assert layer.macs == 6 * VOCAB * WIDTH
    # factorized: the head's pair costs r·(f + c) per row, the lookup r·d per id
    assert layer.candidate_macs(1, 4) == 6 * 4 * (VOCAB + WIDTH) + 6 * 4 * WIDTH
    ids = ids_feed((2, 3))
    expected = run(model, {"ids": ids})
    for rank in (4, None):
        out = rewritten(model, rank)
        check_model(out)
        for got, want in zip(run(out, {"ids": ids}), expected, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    out = rewritten(model, 4)
    assert count_parameters(out) == 4 * (VOCAB + WIDTH)  # the factors are stored once
    assert not any(t.name == "T" for t in out.graph.initializer)


def test_gather_that_is_no_table_lookup_is_not_a_layer():
    # a Gather of a shape (integers) and one along axis 1 of a float table
    table = np.random.default_rng(5).standard_normal((VOCAB, WIDTH)).astype(np.float32)
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
        helper.make_node("Gather", ["T", "ids"], ["cols"], name="columns", axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, [4]),
        ],
        [
            helper.make_tensor_value_info("n", TensorProto.INT64, []),
            helper.make_tensor_value_info("cols", TensorProto.FLOAT, [VOCAB, 4]),
        ],
        [
            numpy_helper.from_array(np.array(0, dtype=np.int64), "zero"),
            numpy_helper.from_array(table, "T"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    discovery = discover(model)
    assert not discovery.layers
    assert [(s.name, s.op_type) for s in discovery.skipped] == [("columns", "Gather")]
    assert "axis 1" in discovery.skipped[0].reason


def test_compress_reaches_a_budget_below_the_table_share():
    table = np.random.default_rng(6).standard_normal((VOCAB, WIDTH)).astype(np.float32)
    model = embedding_model(table, tied=True)
    result = compress(model, CompressionConfig(params=0.5))
    check_model(result.model)
    assert count_parameters(result.model) <= 0.5 * VOCAB * WIDTH
    (record,) = [layer for layer in result.report.layers if layer.rank is not None]
    assert record.op_type == "Gather" and record.shared_with == ("head",)
    assert record.macs_before == 6 * VOCAB * WIDTH
    rank = record.rank
    assert record.macs_after == 6 * rank * (VOCAB + WIDTH) + 6 * rank * WIDTH


def test_calibrated_compression_of_a_model_with_a_table(tmp_path):
    table = np.random.default_rng(7).standard_normal((VOCAB, WIDTH)).astype(np.float32)
    model = embedding_model(table, tied=True)
    data = tmp_path / "calibration.npz"
    np.savez(data, ids=ids_feed((8, 3), seed=8))
    result = compress(model, CompressionConfig(params=0.5, calibration=str(data)))
    check_model(result.model)
    assert count_parameters(result.model) <= 0.5 * VOCAB * WIDTH
