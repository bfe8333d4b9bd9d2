"""Layer discovery on tiny and real models: what is found, folded, and skipped, and why."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from builders import (
    MNIST,
    MODELS,
    conv_model,
    gemm_model,
    make_model,
    matmul_model,
    mnist_calibration,
)
from onnx import helper

from onnx_lowrank import CompressionConfig
from onnx_lowrank.discover import WeightReader, discover
from onnx_lowrank.pipeline import analyze, candidate_tables, choose, realize


def test_mnist_layers_and_shapes():
    discovery = discover(onnx.load(MNIST))
    assert [
        (layer.op_type, layer.out_channels, layer.in_channels, layer.kernel_shape)
        for layer in discovery.layers
    ] == [
        ("Conv", 32, 1, (3, 3)),
        ("Conv", 64, 32, (3, 3)),
        ("Gemm", 128, 3136, ()),
        ("Gemm", 10, 128, ()),
    ]
    # batch taken as 1: output positions are spatial sizes (28², 14²) and 1 row
    assert [layer.output_positions for layer in discovery.layers] == [784, 196, 1, 1]
    assert discovery.skipped == []


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_folding_respects_trans_b(trans_b):
    weight = np.arange(12, dtype=np.float32).reshape(3, 4)  # W: f=3 × c=4
    model = gemm_model(weight if trans_b else weight.T.copy(), trans_b=trans_b)
    discovery = discover(model)
    np.testing.assert_array_equal(discovery.weight(discovery.layers[0]), weight)


def test_conv_folding_is_channel_major():
    weight = np.arange(2 * 3 * 2 * 2, dtype=np.float32).reshape(2, 3, 2, 2)
    discovery = discover(conv_model(weight, (4, 4)))
    folded = discovery.weight(discovery.layers[0])
    assert folded.shape == (2, 12)
    np.testing.assert_array_equal(folded[1, 4:8], weight[1, 1].ravel())


def test_skip_reasons():
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["x", "Wd"], ["d"], name="depthwise", group=4),
        helper.make_node("ConvTranspose", ["d", "Wt"], ["t"], name="deconv"),
        helper.make_node("Conv", ["t", "Wx"], ["u"], name="dynamic_weight"),
        helper.make_node("Conv", ["u", "Ws"], ["y"], name="shared_a"),
        helper.make_node("ReduceMax", ["Ws"], ["ws_shape"], name="peek", keepdims=0),
    ]
    model = make_model(
        nodes,
        [("x", [1, 4, 8, 8]), ("Wx", [4, 4, 1, 1])],
        [("y", None), ("ws_shape", None)],
        {
            "Wd": rng.standard_normal((4, 1, 3, 3)).astype(np.float32),
            "Wt": rng.standard_normal((4, 4, 2, 2)).astype(np.float32),
            "Ws": rng.standard_normal((4, 4, 3, 3)).astype(np.float32),
        },
    )
    discovery = discover(model)
    assert discovery.layers == []
    reasons = {skipped.name: skipped.reason for skipped in discovery.skipped}
    assert "depthwise" in reasons["depthwise"]
    assert "ConvTranspose" in reasons["deconv"]
    assert "graph input" in reasons["dynamic_weight"]
    assert "'Ws' is shared with peek, which are not all layers" in reasons["shared_a"]


def test_too_small_layer_is_skipped():
    model = matmul_model(np.ones((5, 1), np.float32), [3])  # f = 1: rank 1 saves nothing
    discovery = discover(model)
    assert discovery.layers == []
    assert "too small" in discovery.skipped[0].reason


def test_left_constant_operand_is_skipped():
    node = helper.make_node("MatMul", ["B", "x"], ["y"], name="left")
    model = make_model([node], [("x", [6, 3])], [("y", None)], {"B": np.ones((4, 6), np.float32)})
    assert "left operand" in discover(model).skipped[0].reason


def test_paddle_constant_node_weights_are_found():
    discovery = discover(onnx.load(MODELS / "ppocr_mobile_v2.0_cls.onnx"))
    reasons = [skipped.reason for skipped in discovery.skipped]
    assert len(discovery.layers) == 53 - 11 + 1  # 42 dense convs + the MatMul
    assert sum("depthwise" in reason for reason in reasons) == 11
    assert all(layer.weight_source for layer in discovery.layers)


def test_matmul_weights_and_positions_on_mtcnn():
    discovery = discover(onnx.load(MODELS / "mtcnn_onet.onnx"))
    ops = [layer.op_type for layer in discovery.layers]
    assert ops.count("Conv") == 4
    assert ops.count("MatMul") >= 2


def test_an_initializer_that_is_a_graph_input_is_not_a_constant():
    """From IR version 4 on, an initializer listed as a graph input is only its default: the
    caller may feed another weight. It is skipped, and the compressed model keeps the input
    (and reads it) instead of factorizing the default away."""
    from onnx_lowrank import CompressionConfig, compress
    from onnx_lowrank.fold import fold

    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Gemm", ["x", "A"], ["h"], name="fixed", transB=1),
        helper.make_node("Gemm", ["h", "B"], ["y"], name="fed", transB=1),
    ]
    inits = {
        "A": rng.standard_normal((32, 24)).astype(np.float32),
        "B": rng.standard_normal((16, 32)).astype(np.float32),
    }
    model = make_model(nodes, [("x", ["N", 24])], [("y", None)], inits)
    model.graph.input.append(helper.make_tensor_value_info("B", onnx.TensorProto.FLOAT, [16, 32]))
    onnx.checker.check_model(model, full_check=True)
    discovery = discover(model)
    assert [layer.name for layer in discovery.layers] == ["fixed"]
    (skipped,) = discovery.skipped
    assert skipped.name == "fed" and "graph input" in skipped.reason
    assert "IR version >= 4" in skipped.reason
    assert not fold(model).modified
    result = compress(model, CompressionConfig(params=0.7, latency_runs=1))
    compressed = result.model
    onnx.checker.check_model(compressed, full_check=True)
    assert [info.name for info in compressed.graph.input] == ["x", "B"]
    assert "B" in {tensor.name for tensor in compressed.graph.initializer}
    import onnxruntime as ort

    session = ort.InferenceSession(compressed.SerializeToString())
    x = rng.standard_normal((3, 24)).astype(np.float32)
    (default,) = session.run(None, {"x": x})
    (fed,) = session.run(None, {"x": x, "B": 2 * inits["B"]})
    np.testing.assert_allclose(fed, 2 * default, rtol=1e-5, atol=1e-5)  # the fed B is read
    reasons = {layer.name: layer.skipped_reason for layer in result.report.layers}
    assert "graph input" in reasons["fed"]


def test_each_weight_is_converted_to_float64_once_per_run(tmp_path):
    """Spectra, calibration statistics, whitened factors, bias correction and the measured output
    errors all read the weights; the reader converts each one once."""
    calibration = str(mnist_calibration(tmp_path, 64))
    config = CompressionConfig(params=0.5, calibration=calibration, latency_runs=1)
    analysis = analyze(MNIST, config)
    tables = candidate_tables(analysis, config)
    result = realize(analysis, tables, choose(analysis, tables, config), config)
    assert result.report.validation.passed and result.report.compressed_layers
    reader = analysis.discovery.reader
    assert reader.reads == len(analysis.discovery.layers) == 4
    assert not reader.cached  # released before validation


def test_without_calibration_the_weights_are_not_kept():
    """Data-free, a factorized layer's weight is read twice (spectra, factors) and nothing is
    kept: keeping every float64 weight raised the peak memory of a BERT-shaped run."""
    config = CompressionConfig(params=0.5, latency_runs=1)
    analysis = analyze(MNIST, config)
    tables = candidate_tables(analysis, config)
    result = realize(analysis, tables, choose(analysis, tables, config), config)
    reader = analysis.discovery.reader
    factorized = len(result.report.compressed_layers)
    assert factorized and reader.cache_bytes == 0 and not reader.cached
    assert reader.reads == len(analysis.discovery.layers) + factorized


def test_the_weight_reader_rereads_what_it_cannot_keep():
    model = onnx.load(MNIST)
    discovery = discover(model)
    kept, uncached = discovery.reader, WeightReader(model, cache_bytes=0)
    for _ in range(2):
        for layer in discovery.layers:
            weight = discovery.weight(layer)
            assert not weight.flags.writeable and weight.dtype == np.float64
            np.testing.assert_array_equal(weight, uncached(layer))
    assert kept.reads == len(discovery.layers) and uncached.reads == 2 * len(discovery.layers)
