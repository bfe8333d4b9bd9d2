"""Find the compressible layers of a model, and say why every other one is skipped.

A layer is a Conv (``group == 1``, any spatial rank), a Gemm, or a MatMul whose weight is a
constant: an initializer or a ``Constant`` node, possibly behind ``Identity``, ``Cast`` and
``Transpose`` nodes (fp16 exports put ``Cast`` and ``Transpose`` in front of MatMul weights).

Every weight is folded to the matrix ``W ∈ R^{f × cκ}`` (DESIGN.md §2): rows are output
channels, columns run over input channel, then kernel position. For a Gemm ``W = B'ᵀ`` where
``B'`` is ``B`` after ``transB``; for a MatMul ``x @ B``, ``W = Bᵀ``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx

from .cost import ShapeInfo, infer_shapes, node_macs
from .graphs import FLOAT_TYPES, attribute, iter_graphs, tensor_to_array

__all__ = ["FACTOR_TAG", "Discovery", "Layer", "SkippedLayer", "discover"]

log = logging.getLogger(__name__)

#: Suffix of the node names rewrite.py gives to the two halves of a factorized pair. Layers that
#: carry it are never factorized again.
FACTOR_TAG = "/lowrank"

_PASS_THROUGH = {"Identity", "Cast", "Transpose"}
_QUANTIZED_OPS = {
    "ConvInteger",
    "MatMulInteger",
    "QLinearConv",
    "QLinearMatMul",
    "MatMulNBits",
    "MatMulInteger16",
    "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat",
    "QGemm",
    "QAttention",
    "DynamicQuantizeLSTM",
    "MatMulBnb4",
    "GatherBlockQuantized",
}
_LAYER_OPS = {"Conv", "Gemm", "MatMul"}


@dataclass(frozen=True)
class Layer:
    """A compressible layer.

    Attributes:
        name: unique layer name (the node name, or ``<op_type>_<index>`` when it has none).
        op_type: ``Conv``, ``Gemm`` or ``MatMul``.
        node_index: position of the node in its graph's node list.
        weight_input: the tensor the node reads as its weight.
        weight_source: the initializer or Constant-node output that stores the weight.
        weight_shape: the weight's shape as the node reads it.
        weight_dtype: ONNX element type of the weight as the node reads it.
        out_channels: ``f``, rows of the folded weight.
        in_channels: ``c``, input channels (columns of the folded weight are ``c·κ``).
        kernel_shape: spatial kernel of a Conv, ``()`` for Gemm/MatMul.
        output_positions: ``P`` of cost.py, or None when a shape is dynamic.
        input_rank: rank of the data input, or None when unknown.
        max_groups: largest group count the rewrite supports for this layer (None: no limit).
    """

    name: str
    op_type: str
    node_index: int
    weight_input: str
    weight_source: str
    weight_shape: tuple[int, ...]
    weight_dtype: int
    out_channels: int
    in_channels: int
    kernel_shape: tuple[int, ...]
    output_positions: int | None
    input_rank: int | None
    max_groups: int | None = None

    @property
    def kernel_size(self) -> int:
        """``κ``: taps of the kernel (1 for Gemm/MatMul)."""
        return math.prod(self.kernel_shape)

    @property
    def cols(self) -> int:
        """``c·κ``: columns of the folded weight."""
        return self.in_channels * self.kernel_size

    @property
    def params(self) -> int:
        """Weights of the dense layer, ``f·c·κ`` (bias excluded)."""
        return self.out_channels * self.cols

    @property
    def macs(self) -> int | None:
        """MACs of the dense layer, ``f·c·κ·P``, or None when ``P`` is unknown."""
        if self.output_positions is None:
            return None
        return self.params * self.output_positions


@dataclass(frozen=True)
class SkippedLayer:
    """A Conv/Gemm/MatMul (or quantized or contrib variant) left as it is, and why."""

    name: str
    op_type: str
    reason: str
    weight_shape: tuple[int, ...] | None = None
    params: int = 0
    macs: int | None = None


@dataclass
class Discovery:
    """What ``discover`` found.

    Attributes:
        layers: the compressible layers, in graph order.
        skipped: every other Conv/Gemm/MatMul-like node, with the reason.
        shapes: inferred tensor shapes.
    """

    layers: list[Layer]
    skipped: list[SkippedLayer]
    shapes: ShapeInfo
    model: onnx.ModelProto = field(repr=False)
    _index: _GraphIndex | None = field(default=None, repr=False)

    def weight(self, layer: Layer) -> np.ndarray:
        """The folded float64 weight matrix ``W`` (``f × c·κ``) of ``layer``."""
        if self._index is None:
            self._index = _GraphIndex(self.model.graph)
        array = _read_weight(self._index, layer.weight_input)
        if layer.op_type == "Conv":
            return array.reshape(layer.out_channels, layer.cols)
        node = self.model.graph.node[layer.node_index]
        if layer.op_type == "Gemm" and attribute(node, "transB", 0):
            return array
        return array.T

    def layer(self, name: str) -> Layer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)


def discover(
    model: onnx.ModelProto, input_shapes: Mapping[str, tuple[int, ...]] | None = None
) -> Discovery:
    """Find every compressible layer of ``model`` and the reason each other layer is skipped.

    Args:
        model: the model; it is read, never modified.
        input_shapes: concrete shapes for dynamic graph inputs (for MAC counts).
    """
    shapes = infer_shapes(model, input_shapes or {})
    graph = model.graph
    index = _GraphIndex(graph)
    layers: list[Layer] = []
    skipped: list[SkippedLayer] = []
    names = _unique_names(graph)
    for position, node in enumerate(graph.node):
        name = names[position]
        outcome = _examine(node, position, name, index, shapes)
        if isinstance(outcome, Layer):
            layers.append(outcome)
        elif outcome is not None:
            skipped.append(outcome)
    for sub in list(iter_graphs(graph))[1:]:
        for position, node in enumerate(sub.node):
            if _is_candidate_op(node):
                skipped.append(
                    SkippedLayer(
                        node.name or f"{sub.name}/{node.op_type}_{position}",
                        node.op_type,
                        "inside a subgraph (If/Loop/Scan body); subgraphs are not compressed",
                    )
                )
    log.info("found %d compressible layers, %d skipped", len(layers), len(skipped))
    return Discovery(layers=layers, skipped=skipped, shapes=shapes, model=model, _index=index)


def _is_candidate_op(node: onnx.NodeProto) -> bool:
    return node.op_type in _LAYER_OPS | _QUANTIZED_OPS | {
        "ConvTranspose",
        "FusedConv",
        "FusedGemm",
        "FusedMatMul",
    }


def _examine(
    node: onnx.NodeProto, position: int, name: str, index: _GraphIndex, shapes: ShapeInfo
) -> Layer | SkippedLayer | None:
    def skip(reason: str, weight_shape: tuple[int, ...] | None = None) -> SkippedLayer:
        params = math.prod(weight_shape) if weight_shape else 0
        return SkippedLayer(
            name, node.op_type, reason, weight_shape, params, node_macs(node, shapes)
        )

    if node.op_type in _QUANTIZED_OPS:
        return skip("quantized operator; quantized layers are left unchanged")
    if node.domain not in ("", "ai.onnx"):
        if _is_candidate_op(node):
            return skip(f"operator {node.domain}.{node.op_type} is not a standard ONNX op")
        return None
    if node.op_type == "ConvTranspose":
        return skip("ConvTranspose is not factorized")
    if node.op_type not in _LAYER_OPS:
        return None
    if node.name.endswith((FACTOR_TAG + "_v", FACTOR_TAG + "_u")):
        return skip("already a low-rank factor written by onnx-lowrank")
    if len(node.input) < 2:
        return skip("malformed node: fewer than two inputs")
    weight_name = node.input[1]
    ref = index.resolve(weight_name)
    if isinstance(ref, str):
        if node.op_type != "Conv" and not isinstance(index.resolve(node.input[0]), str):
            return skip("the constant is the left operand; only right-hand weights are factorized")
        return skip(ref)
    shape, dtype = ref.shape, ref.dtype
    if dtype not in FLOAT_TYPES:
        return skip(
            f"weight type {onnx.TensorProto.DataType.Name(dtype)} is not floating point", shape
        )
    shared = index.other_consumers(ref, node)
    if shared:
        return skip(f"weight {ref.source!r} is shared with {', '.join(sorted(shared))}", shape)
    out_shape = shapes.get(node.output[0])
    in_shape = shapes.get(node.input[0])
    input_rank = len(in_shape) if in_shape is not None else None

    if node.op_type == "Conv":
        if len(shape) < 3:
            return skip(f"Conv weight has rank {len(shape)}; expected at least 3", shape)
        group = attribute(node, "group", 1)
        if group != 1:
            return skip(f"grouped or depthwise convolution (group={group})", shape)
        out_channels, in_channels, kernel = shape[0], shape[1], tuple(shape[2:])
        positions = _positions(out_shape, channel_axis=1)
    else:
        if len(shape) != 2:
            return skip(f"weight has rank {len(shape)}; only 2-D weights are factorized", shape)
        if node.op_type == "Gemm" and attribute(node, "transB", 0):
            out_channels, in_channels = shape
        else:
            in_channels, out_channels = shape
        kernel = ()
        positions = _positions(out_shape, channel_axis=-1)
    cols = in_channels * math.prod(kernel)
    if out_channels + cols >= out_channels * cols:
        return skip(
            f"too small to factorize: rank 1 already costs {out_channels + cols} weights, "
            f"the layer has {out_channels * cols}",
            shape,
        )
    # A grouped MatMul reshapes (..., c) to (..., g, 1, c/g) and needs the input's rank.
    max_groups = 1 if node.op_type == "MatMul" and input_rank is None else None
    return Layer(
        name=name,
        op_type=node.op_type,
        node_index=position,
        weight_input=weight_name,
        weight_source=ref.source,
        weight_shape=tuple(shape),
        weight_dtype=dtype,
        out_channels=out_channels,
        in_channels=in_channels,
        kernel_shape=kernel,
        output_positions=positions,
        input_rank=input_rank,
        max_groups=max_groups,
    )


def _positions(out_shape: tuple[int | None, ...] | None, channel_axis: int) -> int | None:
    if out_shape is None or not out_shape:
        return None
    dims = list(out_shape)
    del dims[channel_axis]
    if any(d is None for d in dims):
        return None
    return math.prod(dims)


def _unique_names(graph: onnx.GraphProto) -> list[str]:
    names: list[str] = []
    seen: set[str] = set()
    for position, node in enumerate(graph.node):
        name = node.name or f"{node.op_type}_{position}"
        if name in seen:
            name = f"{name}_{position}"
        seen.add(name)
        names.append(name)
    return names


@dataclass(frozen=True)
class _ConstantRef:
    source: str  # initializer or Constant output name
    chain: tuple[int, ...]  # indices of the Identity/Cast/Transpose nodes between source and use
    shape: tuple[int, ...]
    dtype: int


class _GraphIndex:
    """Producers, consumers and constants of one graph."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.initializers = {tensor.name: tensor for tensor in graph.initializer}
        self.producers: dict[str, int] = {}
        self.consumers: dict[str, list[int]] = {}
        for position, node in enumerate(graph.node):
            for output in node.output:
                self.producers[output] = position
            for name in node.input:
                self.consumers.setdefault(name, []).append(position)
        self.graph_inputs = {info.name for info in graph.input}
        self.graph_outputs = {info.name for info in graph.output}
        self.subgraph_uses = _names_used_in_subgraphs(graph)

    def resolve(self, name: str) -> _ConstantRef | str:
        """Follow ``name`` back to a stored constant, or return why it is not one."""
        chain: list[int] = []
        shape_ops: list[onnx.NodeProto] = []
        current = name
        while True:
            if current in self.initializers:
                tensor = self.initializers[current]
                shape, dtype = tuple(tensor.dims), tensor.data_type
                break
            if current in self.graph_inputs:
                return "weight is a graph input, not a constant"
            if current not in self.producers:
                return "weight is not produced in this graph (outer-scope value)"
            position = self.producers[current]
            node = self.graph.node[position]
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                tensor = attribute(node, "value")
                if not isinstance(tensor, onnx.TensorProto):
                    return "weight is a Constant without a tensor value"
                shape, dtype = tuple(tensor.dims), tensor.data_type
                break
            if node.op_type == "DequantizeLinear":
                return "weight is quantized (DequantizeLinear); quantized layers are left unchanged"
            if node.op_type in _PASS_THROUGH and node.domain in ("", "ai.onnx") and node.input:
                chain.append(position)
                shape_ops.append(node)
                current = node.input[0]
                continue
            return f"weight is computed at run time (output of {node.op_type})"
        for node in reversed(shape_ops):
            if node.op_type == "Transpose":
                perm = attribute(node, "perm") or list(reversed(range(len(shape))))
                shape = tuple(shape[axis] for axis in perm)
            elif node.op_type == "Cast":
                dtype = attribute(node, "to")
        return _ConstantRef(current, tuple(chain), shape, dtype)

    def other_consumers(self, ref: _ConstantRef, node: onnx.NodeProto) -> set[str]:
        """Nodes other than ``node`` and its pass-through chain that read the weight."""
        chain_outputs = {self.graph.node[p].output[0] for p in ref.chain}
        names = {ref.source} | chain_outputs
        others: set[str] = set()
        for tensor in names:
            for position in self.consumers.get(tensor, []):
                consumer = self.graph.node[position]
                if position in ref.chain or consumer is node:
                    continue
                others.add(consumer.name or f"{consumer.op_type}_{position}")
            if tensor in self.subgraph_uses:
                others.add("a subgraph")
            if tensor in self.graph_outputs:
                others.add("the graph outputs")
        return others


def _names_used_in_subgraphs(graph: onnx.GraphProto) -> set[str]:
    used: set[str] = set()
    for sub in list(iter_graphs(graph))[1:]:
        for node in sub.node:
            used.update(node.input)
    return used


def _read_weight(index: _GraphIndex, name: str) -> np.ndarray:
    """Evaluate the constant ``name`` (through Identity/Cast/Transpose) in float64."""
    ref = index.resolve(name)
    if isinstance(ref, str):
        raise ValueError(f"{name} is not a constant: {ref}")
    graph = index.graph
    if ref.source in index.initializers:
        array = tensor_to_array(index.initializers[ref.source])
    else:
        array = tensor_to_array(attribute(graph.node[index.producers[ref.source]], "value"))
    array = np.asarray(array)
    for position in reversed(ref.chain):
        node = graph.node[position]
        if node.op_type == "Transpose":
            array = np.transpose(array, attribute(node, "perm"))
        elif node.op_type == "Cast":
            # Round through the cast's type so the folded weight is what the node really reads.
            array = array.astype(onnx.helper.tensor_dtype_to_np_dtype(attribute(node, "to")))
    return array.astype(np.float64)
