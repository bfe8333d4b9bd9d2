"""Embedding tables: ``Gather(T, ids)`` found, factorized as ``Gather(U, ids) → MatMul(·, V)``,
and tied with an output MatMul; checker, ONNX Runtime and exactness every time."""

from __future__ import annotations

import os

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
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
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


@pytest.mark.parametrize("tied", [False, True])
def test_network_errors_of_a_table_replace_it_in_every_layout(tmp_path, tied):
    # the probe fed a Gather's table as its ids and stored it transposed (an ONNX Runtime
    # type error); a table tied with its output MatMul is read in two layouts
    from onnx_lowrank.sensitivity import probe_model

    table = np.random.default_rng(12).standard_normal((VOCAB, WIDTH)).astype(np.float32)
    model = embedding_model(table, tied=tied, ids_shape=("N", 3))
    discovery = discover(model)
    probe, weights, _ = probe_model(model, discovery, discovery.layers)
    check_model(probe)
    ids = ids_feed((4, 3), seed=13)
    for before, after in zip(run(model, {"ids": ids}), run(probe, {"ids": ids}), strict=True):
        np.testing.assert_allclose(after, before, rtol=1e-6)
    assert len(set(weights.values())) == (2 if tied else 1)
    other = np.random.default_rng(15).standard_normal((VOCAB, WIDTH)).astype(np.float32)
    feeds = {"ids": ids}
    for name in set(weights.values()):
        shape = tuple(next(t.dims for t in probe.graph.initializer if t.name == name))
        feeds[name] = other if shape == other.shape else np.ascontiguousarray(other.T)
    outputs = run(probe, feeds)
    np.testing.assert_allclose(outputs[0], other[ids], rtol=1e-6)
    if tied:
        np.testing.assert_allclose(outputs[1], other[ids] @ other.T, rtol=1e-4, atol=1e-4)
    data = tmp_path / "calibration.npz"
    np.savez(data, ids=ids_feed((16, 3), seed=14))
    config = CompressionConfig(params=0.5, calibration=str(data), error="network")
    result = compress(model, config)
    check_model(result.model)
    assert count_parameters(result.model) <= 0.5 * VOCAB * WIDTH


def test_row_weighted_factors_are_the_weighted_truncated_svd():
    from onnx_lowrank.factorize import reconstruct
    from onnx_lowrank.records import LayerStatistics
    from onnx_lowrank.whiten import whitened_factors, whitened_singular_values

    rng = np.random.default_rng(9)
    weight = rng.standard_normal((VOCAB, WIDTH))
    weights = rng.uniform(0.05, 3.0, VOCAB)
    stats = LayerStatistics(
        "t", "input", 1, np.zeros(WIDTH), np.ones(WIDTH), np.eye(WIDTH), row_weights=weights
    )
    root = np.sqrt(weights)[:, None]
    values = np.linalg.svd(root * weight, compute_uv=False)
    damped = np.sqrt(1 + stats.damping)  # S = sqrt(1 + λ)·I
    np.testing.assert_allclose(whitened_singular_values(weight, stats, 1)[0], values * damped)
    for rank in (1, 4, WIDTH):
        approx = reconstruct(whitened_factors(weight, stats, 1, rank))
        error = np.linalg.norm(root * (weight - approx))
        np.testing.assert_allclose(error, np.sqrt(np.sum(values[rank:] ** 2)), atol=1e-9)
    # the unweighted truncation is worse in the weighted norm
    u, s, vt = np.linalg.svd(weight, full_matrices=False)
    plain = (u[:, :4] * s[:4]) @ vt[:4]
    assert np.linalg.norm(root * (weight - plain)) > np.sqrt(np.sum(values[4:] ** 2))


def test_row_weights_mix_counts_with_a_floor():
    from onnx_lowrank.activations import _id_counts, row_weights

    counts = _id_counts(np.array([[0, 0, -1], [3, 3, 3]]), 5)  # -1 is row 4
    np.testing.assert_array_equal(counts, [2, 0, 0, 3, 1])
    weights = row_weights(counts, 0.1)
    np.testing.assert_allclose(weights.mean(), 1.0)
    np.testing.assert_allclose(weights, 5 * (0.9 * counts / 6 + 0.1 / 5))
    assert weights[1] == pytest.approx(0.1)  # an unseen id keeps a tenth of the average weight
    np.testing.assert_array_equal(row_weights(counts, 1.0), np.ones(5))


def lookup_errors(model, result, ids) -> np.ndarray:
    """Squared error of each compressed lookup of ``ids``."""
    feed = {"ids": np.asarray(ids, dtype=np.int64).reshape(1, -1)}
    original, compressed = run(model, feed)[0], run(result, feed)[0]
    return np.sum((original - compressed) ** 2, axis=-1)[0]


@pytest.mark.parametrize("tied", [False, True])
def test_frequency_weighting_keeps_the_ids_that_are_used(tmp_path, tied):
    # a table of full rank; the calibration data uses only ids 0..7 (id 0 most)
    table = np.random.default_rng(10).standard_normal((VOCAB, WIDTH)).astype(np.float32)
    model = embedding_model(table, tied=tied, ids_shape=("N", "L"))
    rng = np.random.default_rng(11)
    ids = np.minimum(rng.geometric(0.3, (64, 3)) - 1, 7).astype(np.int64)
    data = tmp_path / "calibration.npz"
    np.savez(data, ids=ids)
    errors = {}
    for floor in (0.1, 1.0):
        config = CompressionConfig(
            params=0.4, calibration=str(data), row_floor=floor, input_shapes={"ids": (2, 3)}
        )
        result = compress(model, config)
        check_model(result.model)
        seen = lookup_errors(model, result.model, ids).mean()  # as often as the data uses them
        unseen = lookup_errors(model, result.model, np.arange(8, VOCAB)).mean()
        errors[floor] = seen, unseen
    (seen_weighted, unseen_weighted), (seen_plain, _) = errors[0.1], errors[1.0]
    assert seen_weighted < 0.5 * seen_plain  # the rows that are used get the rank
    # the floor keeps unseen rows from being wiped out: less error than deleting them
    assert unseen_weighted < 0.9 * np.mean(np.sum(table[8:] ** 2, axis=1))


def test_row_floor_one_is_the_plain_factorization(tmp_path):
    table = np.random.default_rng(12).standard_normal((VOCAB, WIDTH)).astype(np.float32)
    model = embedding_model(table, ids_shape=("N", "L"))
    data = tmp_path / "calibration.npz"
    np.savez(data, ids=ids_feed((16, 3), seed=13))
    shapes = {"ids": (2, 3)}
    plain = compress(model, CompressionConfig(params=0.5, input_shapes=shapes))
    uniform = compress(
        model,
        CompressionConfig(params=0.5, calibration=str(data), row_floor=1, input_shapes=shapes),
    )
    ids = ids_feed((4, 3), seed=14)
    np.testing.assert_allclose(
        run(uniform.model, {"ids": ids})[0], run(plain.model, {"ids": ids})[0], atol=1e-4
    )


def head_model(classes: int = 30, width: int = 16, softmax: bool = True) -> onnx.ModelProto:
    """``scores = Softmax(x @ W + b)`` (or the logits): a classifier head; the bias makes the
    first five classes the likely ones."""
    rng = np.random.default_rng(15)
    weight = rng.standard_normal((width, classes)).astype(np.float32)
    bias = np.where(np.arange(classes) < 5, 4.0, -4.0).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["logits"], name="head"),
        helper.make_node("Add", ["logits", "b"], ["biased"]),
    ]
    if softmax:
        nodes.append(helper.make_node("Softmax", ["biased"], ["scores"], axis=-1))
    else:
        nodes.append(helper.make_node("Identity", ["biased"], ["scores"]))
    graph = helper.make_graph(
        nodes,
        "head",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", classes])],
        [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "b")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("softmax", [True, False])
def test_classifier_head_rows_are_weighted_by_class_mass(tmp_path, softmax):
    from onnx_lowrank.activations import score_output

    model = head_model(softmax=softmax)
    discovery = discover(model)
    expected = ("scores", "probabilities" if softmax else "logits")
    assert score_output(discovery, discovery.layers[0]) == expected
    data = tmp_path / "calibration.npz"
    np.savez(data, x=np.random.default_rng(16).standard_normal((64, 16)).astype(np.float32))
    x = np.random.default_rng(17).standard_normal((256, 16)).astype(np.float32)
    (reference,) = run(model, {"x": x})
    errors = {}
    for floor in (0.1, 1.0):
        config = CompressionConfig(params=0.35, calibration=str(data), head_floor=floor)
        result = compress(model, config)
        check_model(result.model)
        (scores,) = run(result.model, {"x": x})
        errors[floor] = np.abs(scores - reference)[:, :5].mean()  # the likely classes
    assert errors[0.1] < 0.8 * errors[1.0], errors


def test_a_layer_followed_by_more_than_a_bias_and_softmax_is_no_head():
    from onnx_lowrank.activations import score_output

    model = head_model()
    model.graph.node[1].op_type = "Mul"  # a scale, not a bias
    discovery = discover(model)
    assert score_output(discovery, discovery.layers[0]) is None


def test_the_ppocr_recognizer_ctc_head_is_a_classifier_head():
    from pathlib import Path

    from onnx_lowrank.activations import score_output

    path = Path.home() / ".cache" / "onnx-lowrank" / "models" / "ch_PP-OCRv4_rec_infer.onnx"
    path = Path(os.environ.get("ONNX_LOWRANK_MODELS", path.parent)) / path.name
    if not path.exists():
        pytest.skip(f"{path} is not in the model cache (tests/models/fetch_models.py)")
    discovery = discover(onnx.load(str(path)), {"x": (1, 3, 48, 320)})
    # inference gives the Softmax's output a shape but not its input: the head is still found
    head = discovery.layer("p2o.MatMul.24")
    assert score_output(discovery, head) == ("softmax_11.tmp_0", "probabilities")


def test_heads_are_not_row_weighted_by_default(tmp_path):
    """The default leaves classifier heads unweighted (HEAD_FLOOR = 1: class-mass weighting
    ruined the PP-OCRv4 recognizer, docs/calibration.md) while tables keep their row weights."""
    model = head_model()
    data = tmp_path / "calibration.npz"
    np.savez(data, x=np.random.default_rng(16).standard_normal((64, 16)).astype(np.float32))
    default = compress(model, CompressionConfig(params=0.35, calibration=str(data)))
    off = compress(model, CompressionConfig(params=0.35, calibration=str(data), head_floor=1))
    on = compress(model, CompressionConfig(params=0.35, calibration=str(data), head_floor=0.1))
    assert default.model.SerializeToString() == off.model.SerializeToString()
    assert default.model.SerializeToString() != on.model.SerializeToString()
    assert CompressionConfig().row_floor < 1
