"""A ResNet-50-shaped ONNX model built with onnx.helper, for the speed benchmarks.

The graph is torchvision's ResNet-50 (v1.5: the stride sits in the 3×3 conv of each bottleneck)
after BatchNormalization was folded into the convolutions: 53 Conv (each with a bias), one Gemm
(2048 → 1000), Relu, Add, MaxPool, GlobalAveragePool and Flatten. It has 25.5 M parameters.
The weights are random (He-normal; the last conv of each residual branch is scaled down so the
activations stay finite through all 16 blocks), which is enough to time every stage: the
spectra of random matrices are no cheaper to compute than trained ones.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["build_resnet50"]

#: (bottleneck width, blocks, stride of the first block) of the four stages.
_STAGES = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))
_EXPANSION = 4


class _Builder:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def _constant(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(array.astype(np.float32), name))
        return name

    def conv(
        self,
        name: str,
        data: str,
        channels: tuple[int, int],
        kernel: int,
        stride: int = 1,
        scale: float = 1.0,
    ) -> str:
        out_channels, in_channels = channels
        fan_in = in_channels * kernel * kernel
        weight = self.rng.standard_normal((out_channels, in_channels, kernel, kernel))
        weight *= scale * np.sqrt(2.0 / fan_in)
        bias = 0.01 * self.rng.standard_normal(out_channels)
        pad = kernel // 2
        self.nodes.append(
            helper.make_node(
                "Conv",
                [
                    data,
                    self._constant(f"{name}.weight", weight),
                    self._constant(f"{name}.bias", bias),
                ],
                [f"{name}.out"],
                name=name,
                kernel_shape=[kernel, kernel],
                strides=[stride, stride],
                pads=[pad] * 4,
            )
        )
        return f"{name}.out"

    def op(self, op_type: str, inputs: list[str], name: str, **attributes) -> str:
        self.nodes.append(
            helper.make_node(op_type, inputs, [f"{name}.out"], name=name, **attributes)
        )
        return f"{name}.out"

    def bottleneck(self, name: str, data: str, in_channels: int, width: int, stride: int) -> str:
        out_channels = width * _EXPANSION
        x = self.op(
            "Relu", [self.conv(f"{name}.conv1", data, (width, in_channels), 1)], f"{name}.relu1"
        )
        x = self.op(
            "Relu", [self.conv(f"{name}.conv2", x, (width, width), 3, stride)], f"{name}.relu2"
        )
        x = self.conv(f"{name}.conv3", x, (out_channels, width), 1, scale=0.2)
        shortcut = data
        if stride != 1 or in_channels != out_channels:
            shortcut = self.conv(f"{name}.downsample", data, (out_channels, in_channels), 1, stride)
        return self.op("Relu", [self.op("Add", [x, shortcut], f"{name}.add")], f"{name}.relu")


def build_resnet50(seed: int = 0, batch: int | str = "N", classes: int = 1000) -> onnx.ModelProto:
    """The ResNet-50-shaped model, input ``input`` ``(batch, 3, 224, 224)``, output ``logits``.

    Args:
        seed: seed of the random weights.
        batch: a fixed batch size, or a name for a dynamic batch dimension.
        classes: outputs of the final Gemm.
    """
    builder = _Builder(seed)
    x = builder.conv("conv1", "input", (64, 3), 7, stride=2)
    x = builder.op("Relu", [x], "relu")
    x = builder.op("MaxPool", [x], "maxpool", kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4)
    channels = 64
    for stage, (width, blocks, stride) in enumerate(_STAGES, start=1):
        for block in range(blocks):
            x = builder.bottleneck(
                f"layer{stage}.{block}", x, channels, width, stride if block == 0 else 1
            )
            channels = width * _EXPANSION
    x = builder.op("GlobalAveragePool", [x], "avgpool")
    x = builder.op("Flatten", [x], "flatten", axis=1)
    weight = builder.rng.standard_normal((classes, channels)) * np.sqrt(1.0 / channels)
    builder.nodes.append(
        helper.make_node(
            "Gemm",
            [
                x,
                builder._constant("fc.weight", weight),
                builder._constant("fc.bias", np.zeros(classes)),
            ],
            ["logits"],
            name="fc",
            transB=1,
        )
    )
    graph = helper.make_graph(
        builder.nodes,
        "resnet50_shaped",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, 224, 224])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, classes])],
        builder.initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17)],
        producer_name="onnx-lowrank benchmarks",
        ir_version=8,
    )
    onnx.checker.check_model(model)
    return model
