"""The graph index: producers, consumers and constants of a graph, and the one place that
follows a tensor back to the constant it stores.

``GraphIndex.resolve`` follows a name through ``Identity``/``Cast``/``Transpose`` to an
initializer or a ``Constant`` node (of this graph, or of an enclosing graph for a subgraph),
or says why it is no constant; ``read_constant`` evaluates it in float64, as the node reads
it. Discovery, the weight reader, bias correction and the pipeline's embedding scan all use it.
``GraphIndex.value`` evaluates a constant operand through the shape-only operators of
``VALUE_OPS`` (paddle2onnx writes a Conv bias as ``Add(y, Reshape(Constant, Constant))``), for
folding; fold.py's index extends this one with the updates a fold makes.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np
import onnx

from .graphs import attribute, tensor_to_array
from .types import GraphPath
from .walk import walk_graphs

__all__ = [
    "OVERRIDABLE_REASON",
    "PASS_THROUGH",
    "VALUE_OPS",
    "ConstantRef",
    "GraphIndex",
    "read_constant",
    "subgraph_readers",
]

#: Nodes a constant may pass through on its way to a layer and still count as a constant.
PASS_THROUGH = {"Identity", "Cast", "Transpose"}
#: Operators through which ``GraphIndex.value`` evaluates a constant (shape and type only).
VALUE_OPS = frozenset({"Identity", "Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten"})
_STANDARD = ("", "ai.onnx")


OVERRIDABLE_REASON = (
    "weight is a graph input whose initializer is only its default (IR version >= 4): a "
    "caller can feed another value, so it is not a constant"
)


@dataclass(frozen=True)
class ConstantRef:
    source: str  # initializer or Constant output name
    chain: tuple[int, ...]  # indices of the Identity/Cast/Transpose nodes between source and use
    shape: tuple[int, ...]
    dtype: int  # element type as the node reads it
    stored_dtype: int  # element type of the stored constant
    owner: GraphIndex = field(compare=False, repr=False)  # the graph that holds source and chain


class GraphIndex:
    """Producers, consumers and constants of one graph, with its enclosing graph's index."""

    def __init__(
        self,
        graph: onnx.GraphProto,
        path: GraphPath = (),
        parent: GraphIndex | None = None,
        overridable: frozenset[str] = frozenset(),
    ):
        self.graph, self.path, self.parent = graph, path, parent
        self.initializers = {tensor.name: tensor for tensor in graph.initializer}
        self.overridable = overridable  # graphs.overridable_initializers (main graph)
        self.producers: dict[str, int] = {}
        self.consumers: dict[str, list[int]] = {}
        for position, node in enumerate(graph.node):
            for output in node.output:
                self.producers[output] = position
            for name in node.input:
                self.consumers.setdefault(name, []).append(position)
        self.graph_inputs = {info.name for info in graph.input}
        self.graph_outputs = {info.name for info in graph.output}
        self.subgraph_readers = subgraph_readers(graph, path)

    def readers(self, name: str) -> int:
        """How many things read ``name``: nodes, graph outputs and subgraphs."""
        count = len(self.consumers.get(name, ()))
        return count + (name in self.graph_outputs) + (name in self.subgraph_readers)

    def stored(self, name: str) -> onnx.TensorProto | None:
        """The tensor stored under ``name`` in this graph: an initializer that is no graph
        input's default, or a ``Constant`` node's value."""
        if name in self.overridable:
            return None
        if name in self.initializers:
            return self.initializers[name]
        position = self.producers.get(name)
        node = None if position is None else self.graph.node[position]
        if node is not None and node.op_type == "Constant" and node.domain in _STANDARD:
            value = attribute(node, "value")
            if isinstance(value, onnx.TensorProto):
                return value
        return None

    def value(
        self, name: str, opset: int, data_dir: str | os.PathLike | None = None, depth: int = 0
    ) -> np.ndarray | None:
        """The value of ``name`` when it is a constant of this graph or a shape-only function
        (``VALUE_OPS``) of such constants, else None."""
        stored = self.stored(name)
        if stored is not None:
            return np.asarray(tensor_to_array(stored, data_dir))
        position = self.producers.get(name)
        node = None if position is None else self.graph.node[position]
        if node is None or depth > 8 or node.domain not in _STANDARD:
            return None
        if node.op_type not in VALUE_OPS:
            return None
        inputs = []
        for item in node.input:
            value = self.value(item, opset, data_dir, depth + 1) if item else None
            if item and value is None:
                return None
            inputs.append(value)
        return _evaluate(node, inputs, opset)

    def resolve(self, name: str) -> ConstantRef | str:
        """Follow ``name`` back to a stored constant, or return why it is not one."""
        chain: list[int] = []
        shape_ops: list[onnx.NodeProto] = []
        current = name
        while True:
            if current in self.overridable:
                return OVERRIDABLE_REASON
            if current in self.initializers:
                tensor = self.initializers[current]
                shape, dtype = tuple(tensor.dims), tensor.data_type
                break
            if current in self.graph_inputs:
                if self.path:
                    return "weight is an input of the subgraph (loop state or scan slice)"
                return "weight is a graph input, not a constant"
            if current not in self.producers:
                if self.parent is not None and not chain:
                    return self.parent.resolve(current)  # an outer-scope constant
                if self.parent is not None:
                    return "weight reaches the layer through nodes in two scopes"
                return "weight is not produced in this graph"
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
            if node.op_type in PASS_THROUGH and node.domain in ("", "ai.onnx") and node.input:
                chain.append(position)
                shape_ops.append(node)
                current = node.input[0]
                continue
            return f"weight is computed at run time (output of {node.op_type})"
        stored_dtype = dtype
        for node in reversed(shape_ops):
            if node.op_type == "Transpose":
                perm = attribute(node, "perm") or list(reversed(range(len(shape))))
                if sorted(perm) != list(range(len(shape))):
                    return f"Transpose perm {list(perm)} does not fit the weight's rank"
                shape = tuple(shape[axis] for axis in perm)
            elif node.op_type == "Cast":
                dtype = attribute(node, "to", dtype)
        return ConstantRef(current, tuple(chain), shape, dtype, stored_dtype, self)

    def other_consumers(self, ref: ConstantRef, node_key: tuple[GraphPath, int]) -> set[str]:
        """Nodes other than the layer's node (``(graph path, position)``) and its pass-through
        chain that read the weight, in the owning graph or any subgraph below it."""
        owner = ref.owner
        chain_outputs = {owner.graph.node[p].output[0] for p in ref.chain}
        others: set[str] = set()
        for tensor in {ref.source} | chain_outputs:
            for position in owner.consumers.get(tensor, []):
                if position in ref.chain or (owner.path, position) == node_key:
                    continue
                consumer = owner.graph.node[position]
                others.add(consumer.name or f"{consumer.op_type}_{position}")
            for sub_path, position, label in owner.subgraph_readers.get(tensor, []):
                if (sub_path, position) != node_key:
                    others.add(label)
            if tensor in owner.graph_outputs:
                others.add("the graph outputs")
        return others


def subgraph_readers(
    graph: onnx.GraphProto, path: GraphPath
) -> dict[str, list[tuple[GraphPath, int, str]]]:
    """For every name read inside a subgraph of ``graph``: ``(graph path, position, label)``
    of each reading node."""
    readers: dict[str, list[tuple[GraphPath, int, str]]] = {}
    for sub_path, sub in list(walk_graphs(graph, path))[1:]:
        for position, node in enumerate(sub.node):
            label = node.name or f"{sub.name or 'subgraph'}/{node.op_type}_{position}"
            for name in node.input:
                readers.setdefault(name, []).append((sub_path, position, label))
    return readers


def read_constant(
    index: GraphIndex, name: str, data_dir: str | os.PathLike | None = None
) -> np.ndarray:
    """Evaluate the constant ``name`` (through Identity/Cast/Transpose) in float64."""
    ref = index.resolve(name)
    if isinstance(ref, str):
        raise ValueError(f"{name} is not a constant: {ref}")
    owner = ref.owner
    if ref.source in owner.initializers:
        array = tensor_to_array(owner.initializers[ref.source], data_dir)
    else:
        constant = attribute(owner.graph.node[owner.producers[ref.source]], "value")
        array = tensor_to_array(constant, data_dir)
    array = np.asarray(array)
    for position in reversed(ref.chain):
        node = owner.graph.node[position]
        if node.op_type == "Transpose":
            array = np.transpose(array, attribute(node, "perm"))
        elif node.op_type == "Cast":
            # Round through the cast's type so the folded weight is what the node really reads.
            array = array.astype(onnx.helper.tensor_dtype_to_np_dtype(attribute(node, "to")))
    return array.astype(np.float64)


def _evaluate(node: onnx.NodeProto, inputs: list[np.ndarray | None], opset: int) -> np.ndarray:
    """NumPy evaluation of the shape-only operators of ``VALUE_OPS``."""
    data = inputs[0]
    if node.op_type == "Identity":
        return data
    if node.op_type == "Cast":
        return data.astype(onnx.helper.tensor_dtype_to_np_dtype(attribute(node, "to")))
    if node.op_type == "Flatten":
        axis = attribute(node, "axis", 1) % max(data.ndim, 1)
        return data.reshape(math.prod(data.shape[:axis]), -1)
    if node.op_type == "Reshape":
        shape = [int(d) for d in inputs[1]]
        if not attribute(node, "allowzero", 0):
            shape = [data.shape[i] if d == 0 else d for i, d in enumerate(shape)]
        return data.reshape(shape)
    axes = attribute(node, "axes") if opset < 13 else inputs[1] if len(inputs) > 1 else None
    if node.op_type == "Squeeze":
        return np.squeeze(data, axis=None if axes is None else tuple(int(a) for a in axes))
    rank = data.ndim + len(axes)
    return np.expand_dims(data, tuple(sorted(int(a) % rank for a in axes)))  # Unsqueeze
