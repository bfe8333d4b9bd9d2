"""Find the compressible layers of a model, and say why every other one is skipped.

A layer is a Conv (``group == 1``, any spatial rank), a Gemm, or a MatMul whose weight is a
constant: an initializer or a ``Constant`` node, possibly behind ``Identity``, ``Cast`` and
``Transpose`` nodes (fp16 exports put ``Cast`` and ``Transpose`` in front of MatMul weights).
Layers are found in the main graph and in every subgraph (``If`` branches, ``Loop`` and ``Scan``
bodies); a subgraph layer's weight may also be a constant of an enclosing graph. Nodes inside
local functions are listed as skipped: one function body serves every call site.

A weight read by several layers of the same kind in one graph (Siamese towers, unrolled
recurrences, ALBERT-style shared blocks) is one ``Layer`` with ``tied`` uses: it is factorized
once, every use gets its own pair reading the same factors, and it counts once in the
parameter budget (its MACs are those of all uses). A weight that anything else reads as well is
skipped with the reason.

Every weight is folded to the matrix ``W ∈ R^{f × cκ}`` (DESIGN.md §2): rows are output
channels, columns run over input channel, then kernel position. For a Gemm ``W = B'ᵀ`` where
``B'`` is ``B`` after ``transB``; for a MatMul ``x @ B``, ``W = Bᵀ``.

A model written by onnx-lowrank records its factorized layers in ``metadata_props`` under
``FACTORIZED_KEY``. Those layers are never factorized again, and ``Discovery.factorized`` gives
what each cost before, so budgets stay fractions of the original model.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import replace

import numpy as np
import onnx

from .cost import node_macs
from .errors import UnsupportedModelError
from .graphs import FLOAT_TYPES, attribute, opset_version, overridable_initializers, type_name
from .history import factorized_layers, folded_params
from .index import PASS_THROUGH, ConstantRef, GraphIndex, read_constant
from .shapes import infer_shapes
from .types import (
    FACTOR_TAG,
    Discovery,
    GraphPath,
    Layer,
    ShapeInfo,
    SkippedLayer,
    TiedUse,
)
from .walk import graph_at, walk_graphs

__all__ = ["WeightReader", "discover"]

log = logging.getLogger(__name__)

#: Most bytes of float64 weights ``WeightReader`` keeps, so that each is read once per run.
WEIGHT_CACHE_BYTES = 1 << 30

#: Oldest default-domain opset whose models are factorized.
MIN_OPSET = 7

_FACTOR_NODE = re.compile(re.escape(FACTOR_TAG) + r"_[uv](_\d+)?$")

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
_QUANTIZED_REASON = "quantized operator; quantized layers are left unchanged"


def discover(
    model: onnx.ModelProto,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    *,
    data_dir: str | os.PathLike | None = None,
    cache_bytes: int | None = None,
) -> Discovery:
    """Find every compressible layer of ``model`` and the reason each other layer is skipped.

    Args:
        model: the model; it is read, never modified.
        input_shapes: concrete shapes for dynamic graph inputs (for MAC counts).
        data_dir: folder of the model file, for tensors whose data is still in external files.
        cache_bytes: most bytes of float64 weights the ``WeightReader`` keeps (default
            ``WEIGHT_CACHE_BYTES``; 0 keeps none).
    """
    shapes = infer_shapes(model, input_shapes or {})
    indexes: dict[GraphPath, GraphIndex] = {}
    layers: list[Layer] = []
    skipped: list[SkippedLayer] = []
    names = _LayerNames()
    overridable = overridable_initializers(model)
    for path, graph in walk_graphs(model.graph):
        index = indexes[path] = _Index(
            graph,
            path,
            indexes.get(path[:-1]) if path else None,
            frozenset() if path else overridable,
        )
        # named up front: a tied layer found at its first node names its later uses too
        index.node_names = [
            names.name(node, position, graph if path else None)
            for position, node in enumerate(graph.node)
        ]
        for position, node in enumerate(graph.node):
            outcome = _examine(node, position, index.node_names[position], index, shapes)
            if isinstance(outcome, Layer):
                layers.append(outcome)
            elif outcome is not None:
                skipped.append(outcome)
    skipped += _function_layers(model)
    opset = opset_version(model)
    if layers and opset < MIN_OPSET:
        # The rewrite's Reshape takes its shape as an input (opset 5) and its Gemm has no
        # ``broadcast`` attribute (opset 7).
        reason = (
            f"the model imports ONNX opset {opset}; factorized layers need opset {MIN_OPSET} or "
            "newer (convert it with onnx.version_converter.convert_version)"
        )
        skipped = [_skip_layer(use, reason) for layer in layers for use in layer.uses()] + skipped
        layers = []
    factorized = factorized_layers(model, shapes)
    log.info("found %d compressible layers, %d skipped", len(layers), len(skipped))
    return Discovery(
        layers=layers,
        skipped=skipped,
        shapes=shapes,
        model=model,
        data_dir=data_dir,
        factorized=factorized,
        folded_params=folded_params(model),
        reader=WeightReader(model, data_dir, indexes, cache_bytes),
    )


class _Index(GraphIndex):
    """A graph index with what discovery notes per graph while it examines the nodes."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.ties: dict[str, list[Layer] | None] = {}  # _tied_members, by weight input
        self.node_names: list[str] = []  # layer names of the nodes (_LayerNames)


class WeightReader:
    """Reads each layer's folded float64 weight from the model (``Discovery.reader``).

    Each weight is read from its tensor (or external file) and converted to float64 once per
    run while the weights read so far fit in ``cache_bytes`` (``WEIGHT_CACHE_BYTES``); the
    stages that need a weight again (spectra, calibration, factorization, refit, the
    sensitivity probe) get the cached array. Arrays are returned read-only: a stage that
    changes a weight must copy it. ``release`` empties the cache once no stage needs it.
    """

    def __init__(
        self,
        model: onnx.ModelProto,
        data_dir: str | os.PathLike | None = None,
        indexes: dict[GraphPath, GraphIndex] | None = None,
        cache_bytes: int | None = None,
    ):
        self.model, self.data_dir = model, data_dir
        self.indexes: dict[GraphPath, GraphIndex] = dict(indexes or {})
        self.cache_bytes = WEIGHT_CACHE_BYTES if cache_bytes is None else cache_bytes
        self.cached: dict[str, np.ndarray] = {}
        self.kept = 0  # bytes in ``cached``
        self.reads = 0  # conversions to float64 so far (tests check that each happens once)

    def __call__(self, layer: Layer) -> np.ndarray:
        key = f"{layer.graph_path}/{layer.name}"
        if key in self.cached:
            return self.cached[key]
        weight = self._read(layer)
        weight.flags.writeable = False
        if self.kept + weight.nbytes <= self.cache_bytes:
            self.cached[key] = weight
            self.kept += weight.nbytes
        return weight

    def release(self) -> None:
        self.cached.clear()
        self.kept = 0

    def _read(self, layer: Layer) -> np.ndarray:
        index = self._index(layer.graph_path)
        array = read_constant(index, layer.weight_input, self.data_dir)
        self.reads += 1
        if not np.all(np.isfinite(array)):
            raise UnsupportedModelError(
                f"the weight of layer {layer.name} holds NaN or Inf values, which cannot be "
                "factorized; fix the model (or remove the layer's weight from it)"
            )
        if layer.op_type == "Conv":
            return array.reshape(layer.out_channels, layer.cols)
        node = index.graph.node[layer.node_index]
        if layer.op_type == "Gather" or (layer.op_type == "Gemm" and attribute(node, "transB", 0)):
            return array
        return array.T

    def _index(self, path: GraphPath) -> GraphIndex:
        if path not in self.indexes:
            parent = self._index(path[:-1]) if path else None
            self.indexes[path] = GraphIndex(
                graph_at(self.model.graph, path),
                path,
                parent,
                frozenset() if path else overridable_initializers(self.model),
            )
        return self.indexes[path]


def _skip_layer(layer: Layer, reason: str) -> SkippedLayer:
    return SkippedLayer(
        layer.name, layer.op_type, reason, layer.weight_shape, layer.params, layer.macs
    )


class _LayerNames:
    """Layer names, unique across the main graph and all subgraphs.

    A main-graph node is named by its node name, or ``<op_type>_<index>`` when it has none (the
    names reports have always used); a subgraph node without a name gets its graph's name in
    front. A repeated name gets ``_<index>`` appended.
    """

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def name(self, node: onnx.NodeProto, position: int, subgraph: onnx.GraphProto | None) -> str:
        name = node.name or f"{node.op_type}_{position}"
        if not node.name and subgraph is not None:
            name = f"{subgraph.name or 'subgraph'}/{name}"
        base, suffix = name, position
        while name in self.seen:
            name = f"{base}_{suffix}"
            suffix += 1
        self.seen.add(name)
        return name


def _is_candidate_op(node: onnx.NodeProto) -> bool:
    return node.op_type in _LAYER_OPS | _QUANTIZED_OPS | {
        "ConvTranspose",
        "FusedConv",
        "FusedGemm",
        "FusedMatMul",
    }


def _function_layers(model: onnx.ModelProto) -> list[SkippedLayer]:
    skipped = []
    for function in model.functions:
        for position, node in enumerate(function.node):
            if _is_candidate_op(node):
                skipped.append(
                    SkippedLayer(
                        f"{function.domain}.{function.name}/{node.name or node.op_type}_{position}",
                        node.op_type,
                        "inside a local function; function bodies are shared by every call "
                        "site and are not compressed",
                    )
                )
    return skipped


def _examine(
    node: onnx.NodeProto,
    position: int,
    name: str,
    index: _Index,
    shapes: ShapeInfo,
    tie: bool = True,
) -> Layer | SkippedLayer | None:
    """The node as a Layer, a SkippedLayer, or None when it is no layer (or a tied use of a
    layer found at an earlier node). ``tie=False`` examines it as if its weight were its own."""

    def skip(reason: str, weight_shape: tuple[int, ...] | None = None) -> SkippedLayer:
        params = math.prod(weight_shape) if weight_shape else 0
        return SkippedLayer(
            name, node.op_type, reason, weight_shape, params, node_macs(node, shapes)
        )

    if node.op_type in _QUANTIZED_OPS:
        return skip(_QUANTIZED_REASON)
    if node.domain not in ("", "ai.onnx"):
        if _is_candidate_op(node):
            return skip(f"operator {node.domain}.{node.op_type} is not a standard ONNX op")
        return None
    if node.op_type == "ConvTranspose":
        return skip("ConvTranspose is not factorized")
    lookup = node.op_type == "Gather"
    if lookup and not _is_table_lookup(node, index):
        return None  # a Gather of shapes, indices or activations: no layer
    if node.op_type not in _LAYER_OPS and not lookup:
        return None
    if _FACTOR_NODE.search(node.name):
        return skip("already a low-rank factor written by onnx-lowrank")
    if len(node.input) < 2 or not node.input[1] or not node.output or not node.output[0]:
        return skip("malformed node: a required input or output is missing")
    weight_name = node.input[_weight_slot(node)]
    ref = index.resolve(weight_name)
    if isinstance(ref, str):
        if node.op_type != "Conv" and not isinstance(index.resolve(node.input[0]), str):
            return skip("the constant is the left operand; only right-hand weights are factorized")
        return skip(ref)
    shape, dtype = ref.shape, ref.dtype
    if dtype not in FLOAT_TYPES:
        return skip(f"weight type {type_name(dtype)} is not floating point", shape)
    if any(d <= 0 for d in shape):
        return skip(f"weight has an empty or invalid shape {shape}", shape)
    shared = index.other_consumers(ref, (index.path, position)) if tie else set()
    if shared:
        members = _tied_members(ref, weight_name, index, shapes)
        if members is None:
            others = ", ".join(sorted(shared))
            return skip(
                f"weight {ref.source!r} is shared with {others}, which are not all layers of the "
                "same kind in this graph",
                shape,
            )
        if position != members[0].node_index:
            return None  # a tied use of the layer at the first node that reads the weight
        return _tied_layer(members[0], members[1:])
    out_shape = shapes.get(node.output[0])
    in_shape = shapes.get(node.input[1 if lookup else 0])
    input_rank = len(in_shape) if in_shape is not None else None

    if lookup:
        axis = attribute(node, "axis", 0)
        if axis not in (0, -len(shape)):
            return skip(f"Gather on axis {axis}; only row lookups (axis 0) are factorized", shape)
        out_channels, in_channels = shape  # rows are the outputs: W = T
        kernel = ()
        positions = None if in_shape is None or None in in_shape else math.prod(in_shape)
    elif node.op_type == "Conv":
        if len(shape) < 3:
            return skip(f"Conv weight has rank {len(shape)}; expected at least 3", shape)
        group = attribute(node, "group", 1)
        if group != 1:
            return skip(f"grouped or depthwise convolution (group={group})", shape)
        kernel_attr = attribute(node, "kernel_shape")
        if kernel_attr is not None and tuple(kernel_attr) != tuple(shape[2:]):
            return skip(f"kernel_shape {tuple(kernel_attr)} does not match the weight {shape}")
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
    # A grouped MatMul reshapes (..., c) to (..., g, 1, c/g) and needs the input's rank; a
    # table lookup is factorized as a whole (g = 1).
    max_groups = 1 if lookup or (node.op_type == "MatMul" and input_rank is None) else None
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
        graph_path=index.path,
        stored_dtype=ref.stored_dtype if ref.stored_dtype != dtype else None,
    )


def _weight_slot(node: onnx.NodeProto) -> int:
    """Input index of the weight: a Gather's table is its first input, the others' second."""
    return 0 if node.op_type == "Gather" else 1


def _is_table_lookup(node: onnx.NodeProto, index: _Index) -> bool:
    """Whether ``node`` is a Gather from a constant 2-D floating-point table (an embedding)."""
    if not node.input or not node.input[0]:
        return False
    ref = index.resolve(node.input[0])
    return not isinstance(ref, str) and ref.dtype in FLOAT_TYPES and len(ref.shape) == 2


def _positions(out_shape: tuple[int | None, ...] | None, channel_axis: int) -> int | None:
    if out_shape is None or not out_shape:
        return None
    dims = list(out_shape)
    del dims[channel_axis]
    if any(d is None for d in dims):
        return None
    return math.prod(dims)


def _tied_members(
    ref: ConstantRef, weight_name: str, index: _Index, shapes: ShapeInfo
) -> list[Layer] | None:
    """Every node that reads the weight, each examined as a layer of its own, when they are all
    compressible layers of one kind (op, folded shape, ``transB``) in ``index``'s graph that read
    it as ``weight_name``, their weight input; else None."""
    if weight_name not in index.ties:  # once per weight: k uses would otherwise cost k² work
        index.ties[weight_name] = _find_tied_members(ref, weight_name, index, shapes)
    return index.ties[weight_name]


def _find_tied_members(
    ref: ConstantRef, weight_name: str, index: _Index, shapes: ShapeInfo
) -> list[Layer] | None:
    owner = ref.owner
    if owner is not index:
        return None  # the weight lives in an enclosing graph
    # Every node that reads the stored constant, each through its own Identity/Cast/Transpose
    # chain (an embedding table is read as it is by a Gather and transposed by an output
    # MatMul).
    readers: dict[int, str] = {}
    frontier, seen = [ref.source], set()
    while frontier:
        tensor = frontier.pop()
        if tensor in seen:
            continue
        seen.add(tensor)
        if tensor in owner.graph_outputs or owner.subgraph_readers.get(tensor):
            return None
        for position in owner.consumers.get(tensor, []):
            node = owner.graph.node[position]
            if _passes_through(node, tensor):
                frontier.append(node.output[0])
            elif position in readers:
                return None  # one node reading the weight twice
            else:
                readers[position] = tensor
    members = []
    for position in sorted(readers):
        node = owner.graph.node[position]
        read = readers[position]
        slot = _weight_slot(node)
        if len(node.input) <= slot or node.input[slot] != read or list(node.input).count(read) > 1:
            return None
        layer = _examine(node, position, index.node_names[position], index, shapes, tie=False)
        if not isinstance(layer, Layer):
            return None
        members.append(layer)
    if any(layer.op_type == "Conv" for layer in members) and any(
        layer.weight_input != weight_name for layer in members
    ):
        return None  # conv weights are tied only when every node reads the same tensor
    lookup = any(layer.op_type == "Gather" for layer in members)

    def kind(layer: Layer) -> tuple:
        # the folded matrices must be the same matrix: same shape, type and orientation
        folded = (layer.out_channels, layer.cols, layer.weight_dtype, _orientation(layer, owner))
        if lookup:
            return folded
        node = owner.graph.node[layer.node_index]
        transposed = layer.op_type == "Gemm" and attribute(node, "transB", 0)
        return layer.op_type, layer.weight_shape, transposed, *folded

    return members if len({kind(layer) for layer in members}) == 1 else None


def _passes_through(node: onnx.NodeProto, tensor: str) -> bool:
    return (
        node.op_type in PASS_THROUGH
        and node.domain in ("", "ai.onnx")
        and len(node.input) >= 1
        and node.input[0] == tensor
        and len(node.output) == 1
    )


def _orientation(layer: Layer, owner: _Index) -> bool | tuple[str, ...]:
    """For a 2-D weight: whether the folded matrix is the stored constant transposed. A Conv
    weight (reshaped, never transposed as a matrix) is identified by the tensor it reads."""
    if len(layer.weight_shape) != 2:
        return (layer.weight_input,)
    ref = owner.resolve(layer.weight_input)
    assert not isinstance(ref, str)
    flips = sum(
        owner.graph.node[p].op_type == "Transpose"
        and list(attribute(owner.graph.node[p], "perm") or [1, 0]) == [1, 0]
        for p in ref.chain
    )
    node = owner.graph.node[layer.node_index]
    read_as_is = layer.op_type == "Gather" or (
        layer.op_type == "Gemm" and bool(attribute(node, "transB", 0))
    )
    return bool(flips % 2) == read_as_is


def _tied_layer(first: Layer, rest: list[Layer]) -> Layer:
    """``first`` standing for all the nodes that read its weight."""
    uses = [first, *rest]
    positions = [layer.output_positions for layer in uses]
    unknown_rank = any(layer.op_type == "MatMul" and layer.input_rank is None for layer in uses)
    lookup = any(layer.op_type == "Gather" for layer in uses)

    def differs(value, own):
        return value if value != own else None

    return replace(
        first,
        output_positions=None if None in positions else sum(positions),  # type: ignore[arg-type]
        max_groups=1 if unknown_rank or lookup else first.max_groups,
        tied=tuple(
            TiedUse(
                layer.name,
                layer.node_index,
                layer.input_rank,
                layer.output_positions,
                op_type=differs(layer.op_type, first.op_type),
                weight_input=differs(layer.weight_input, first.weight_input),
                weight_shape=differs(layer.weight_shape, first.weight_shape),
            )
            for layer in rest
        ),
    )
