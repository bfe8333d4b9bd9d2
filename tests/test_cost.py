"""Parameter and MAC counts: direct counts over nodes, and shapes that inference cannot reach."""

from __future__ import annotations

import math

import numpy as np
import onnx
from builders import MNIST, MODELS, conv_model
from onnx import helper

from onnx_lowrank import CompressionConfig, compress
from onnx_lowrank.cost import count_macs, count_parameters, node_macs
from onnx_lowrank.shapes import infer_shapes
from onnx_lowrank.types import ShapeInfo


def test_mnist_macs_are_the_sum_over_its_layers():
    model = onnx.load(MNIST)
    macs, unknown = count_macs(model, infer_shapes(model, {}))
    # conv1: 28²·32·9, conv2: 14²·64·32·9, fc1: 128·3136, fc2: 10·128 (batch taken as 1)
    assert macs == 784 * 32 * 9 + 196 * 64 * 32 * 9 + 128 * 3136 + 10 * 128
    assert unknown == []


def test_conv_macs_follow_stride_and_padding():
    weight = np.ones((8, 4, 3, 3), np.float32)
    model = conv_model(weight, (10, 12), strides=[2, 3], pads=[1, 1, 1, 1])
    shapes = infer_shapes(model, {"x": (2, 4, 10, 12)})
    out_positions = 2 * 5 * 4  # batch · ceil(10/2) · ceil(12/3)
    assert count_macs(model, shapes) == (out_positions * 8 * 4 * 9, [])


def test_shapes_behind_computed_pads_are_measured_in_onnx_runtime():
    """CREPE's exported Pad amounts come from a Shape/Slice/Concat chain that ONNX shape
    inference does not follow; one ONNX Runtime run at the concrete input shape measures them."""
    model = onnx.load(MODELS / "crepe_tiny.onnx")
    shapes = infer_shapes(model, {})
    macs, unknown = count_macs(model, shapes)
    assert unknown == []
    assert any("measured by running the model" in note for note in shapes.assumed)
    convs = [node for node in model.graph.node if node.op_type == "Conv"]
    weights = {t.name: tuple(t.dims) for t in model.graph.initializer}
    direct = sum(
        math.prod(shapes.get(node.output[0])) * math.prod(weights[node.input[1]][1:])
        for node in convs
    )
    gemm = next(node for node in model.graph.node if node.op_type == "Gemm")
    assert macs == direct + math.prod(weights[gemm.input[1]])


def test_flops_budget_on_a_model_with_computed_pads():
    result = compress(MODELS / "crepe_tiny.onnx", CompressionConfig(flops=0.5, latency_runs=1))
    report = result.report
    assert report.macs_after <= 0.5 * report.macs_before * 1.001
    direct, unknown = count_macs(result.model, infer_shapes(result.model, {}))
    assert unknown == [] and direct == report.macs_after
    assert report.params_after == count_parameters(result.model)


def test_matmul_macs_need_only_the_left_operand_and_the_output():
    # attention scores Q @ Kᵀ with Kᵀ computed at run time (its shape unknown, as in PP-OCRv4)
    node = helper.make_node("MatMul", ["q", "kt"], ["scores"], name="scores")
    shapes = ShapeInfo({"q": (1, 8, 40, 15), "scores": (1, 8, 40, 40)})
    assert node_macs(node, shapes) == 8 * 40 * 40 * 15
    assert node_macs(node, ShapeInfo({"q": (1, 8, 40, 15)})) is None  # output unknown
    vector = ShapeInfo({"q": (15,), "scores": (40,)})  # 1-D left operand
    assert node_macs(node, vector) == 40 * 15
