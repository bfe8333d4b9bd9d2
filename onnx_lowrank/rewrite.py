"""Graph surgery: replace each chosen layer by its factorized pair.

Conv (DESIGN.md §2):
    first:  Conv(x, V) with ``group = g``, ``g·r`` outputs, weight ``(g·r, c/g, k…)`` (stacked
            ``V_i``), and the original ``kernel_shape``, ``strides``, ``pads``, ``auto_pad``,
            ``dilations``; no bias.
    second: 1×1 Conv with weight ``(f, g·r, 1…)`` = ``[U_1 … U_g]``, the original bias, and the
            original output name.

Gemm / MatMul:
    first:  ``g = 1``: MatMul(x, Vᵀ). ``g > 1``: Reshape ``(…, c)`` to ``(…, g, 1, c/g)``, MatMul
            with ``(g, c/g, r)``, Reshape to ``(…, g·r)``; never a zero-padded block diagonal.
            A Gemm with ``transA`` gets a Transpose in front.
    second: MatMul(h, Uᵀ) for a MatMul; Gemm(h, U, C, transB=1, alpha, beta) for a Gemm, so the
            bias ``beta·C`` and ``alpha`` are kept.

Gather (an embedding table ``T ≈ U V``, discover.py):
    first:  Gather(U, ids) with the original ``axis`` (0): ``(…, r)``.
    second: MatMul(·, V) with ``V`` ``(r, d)``, producing the original output name.
    A table tied with an output MatMul/Gemm stores ``U`` and ``V`` once: the MatMul's pair
    reads them through Transpose nodes where it needs the other layout.

Bias correction (calibrate.py): ``biases`` maps a node name to the layer's new bias ``b'``
(``f`` values, in output units). The second node then reads ``b'`` instead of the original bias:
a Conv gets it as its bias input, a Gemm as ``C`` with ``beta = 1``, and a MatMul, which has no
bias input, gets an ``Add`` after it that produces the original output name.

The pass edits a copy of the model in place at the protobuf level. Every node that is not
replaced keeps its bytes; the graph's inputs, outputs, opset imports, IR version and producer are
untouched, and ``metadata_props`` only gains the ``discover.FACTORIZED_KEY`` record of what was
factorized (so a second run knows the original sizes). The replaced node's output name goes to
the second node, so every downstream name stays valid. Weights that nothing reads any more are
removed, along with their Identity/Cast/Transpose chains.

A weight read by several nodes (``Layer.tied``) is factorized once: every node gets its own
pair (with its own attributes, input and bias), and all pairs read the same factor tensors.

Layers may sit in subgraphs (``Layer.graph_path``). Subgraphs are rewritten before the graphs
that hold them, and every new name is unique across the whole model, so no subgraph name
shadows an outer one. Factors are stored in the narrower of the stored and the read weight type
(fp16 weights behind a ``Cast`` to fp32 stay fp16, followed by a ``Cast``), as initializers, or
as ``Constant`` nodes in models of IR version < 4, whose initializers must also be graph inputs.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .graphs import FreshNames, attribute, graph_at, iter_graphs
from .types import FACTOR_TAG, FACTORIZED_KEY, Factors, GraphPath, Layer

__all__ = ["rewrite"]

log = logging.getLogger(__name__)

_CONV_KEPT_ATTRIBUTES = ("strides", "pads", "auto_pad", "dilations")


def rewrite(
    model: onnx.ModelProto,
    replacements: Sequence[tuple[Layer, Factors]],
    *,
    inplace: bool = False,
    biases: Mapping[str, np.ndarray] | None = None,
) -> onnx.ModelProto:
    """Replace each layer by its factorized pair.

    Args:
        model: the model ``discover`` ran on.
        replacements: layers (of any graph) with their factors.
        inplace: edit ``model`` itself instead of a copy.
        biases: node name (the layer's, or a tied use's) -> new bias ``b'`` (``f`` values in
            output units) that replaces the node's bias (bias correction); nodes not named keep
            their bias.

    Returns:
        The rewritten model. The ONNX checker and shape inference accept it.
    """
    if not inplace:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        model = copy
    if not replacements:
        return model
    names = FreshNames(model)
    biases = biases or {}
    as_nodes = 0 < model.ir_version < 4
    by_graph: dict[GraphPath, list[tuple[Layer, Factors]]] = {}
    for layer, factors in replacements:
        by_graph.setdefault(layer.graph_path, []).append((layer, factors))
    paths = {path[:depth] for path in by_graph for depth in range(len(path) + 1)}
    unused: dict[GraphPath, set[str]] = {}
    records = []
    # Deepest graphs first: a subgraph's path (node indices of its parents) stays valid until
    # its parent is rewritten.
    for path in sorted(paths, key=len, reverse=True):
        graph = graph_at(model.graph, path)
        candidates = unused.pop(path, set())
        new_nodes: dict[int, list[onnx.NodeProto]] = {}
        for layer, factors in by_graph.get(path, []):
            shared: dict[str, str] = {}  # the factors, written once for all uses of the weight
            seconds = []
            for use in layer.uses():
                node = graph.node[use.node_index]
                bias = biases.get(use.name)
                builder = _PairBuilder(
                    use, factors, node, names, as_nodes, bias, shared, layer.lookup
                )
                new_nodes[use.node_index] = builder.nodes()
                graph.initializer.extend(builder.initializers)  # one layer's factors at a time
                if bias is not None and len(node.input) > 2 and node.input[2]:
                    candidates.add(node.input[2])  # the corrected bias replaces the original
                seconds.append(builder.second_name)
                candidates.add(use.weight_input)
            record = {**_record_of(layer, factors), "second": seconds[0]}
            if seconds[1:]:
                record["tied"] = seconds[1:]
            records.append(record)
        # Splice the pairs in place, last first, so indices stay valid. Rebuilding the whole
        # list would copy every node (and Constant-node weight) into the model's arena again.
        for position in sorted(new_nodes, reverse=True):
            del graph.node[position]
            for offset, node in enumerate(new_nodes[position]):
                graph.node.insert(position + offset, node)
        _remove_unused(graph, set(candidates), main=not path)
        if path:  # an outer-scope weight is removed from the graph that holds it
            unused.setdefault(path[:-1], set()).update(candidates)
    _record(model, records)
    return model


def _record(model: onnx.ModelProto, records: list[dict]) -> None:
    """Add ``records`` to the model's ``FACTORIZED_KEY`` metadata entry."""
    entry = next((p for p in model.metadata_props if p.key == FACTORIZED_KEY), None)
    if entry is None:
        entry = model.metadata_props.add()
        entry.key = FACTORIZED_KEY
        previous = []
    else:
        try:
            previous = json.loads(entry.value)
            if not isinstance(previous, list):
                previous = []
        except ValueError:
            previous = []
    entry.value = json.dumps(previous + records, separators=(",", ":"))


def _record_of(layer: Layer, factors: Factors) -> dict:
    """What ``rewrite`` records in ``metadata_props`` for a layer (``second`` added by the
    caller: the name of the node that now produces the layer's output; ``tied`` those of the
    other uses of a shared weight)."""
    return {
        "name": layer.name,
        "groups": factors.groups,
        "rank": factors.rank,
        "params_dense": layer.params,
        "params": int(factors.first.size + factors.second.size),
    }


#: Factor tensors that every use of a shared weight reads (the reshape shapes depend on each
#: use's input rank, and bias correction is per node).
_SHARED_FACTORS = {"v", "u"}


class _PairBuilder:
    """The nodes and initializers that replace one layer (one use of its weight)."""

    def __init__(
        self,
        layer: Layer,
        factors: Factors,
        node: onnx.NodeProto,
        names: FreshNames,
        as_nodes: bool = False,
        bias: np.ndarray | None = None,
        shared: dict[str, str] | None = None,
        tied_lookup: bool = False,
    ):
        self.layer, self.factors, self.node, self.names = layer, factors, node, names
        self.as_nodes = as_nodes
        self.bias = bias
        # Factor tensors already written for another use of the same weight (Layer.tied):
        # suffix -> name. This builder adds the ones it writes first.
        self.shared = shared
        read = layer.weight_dtype
        stored = layer.stored_dtype or read
        # Keep the narrower type: fp16 weights read through a Cast to fp32 stay fp16 on disk.
        narrow = stored if _itemsize(stored) < _itemsize(read) else read
        self.dtype = helper.tensor_dtype_to_np_dtype(narrow)
        self.cast_to = read if narrow != read else None
        self.initializers: list[onnx.TensorProto] = []
        self.constants: list[onnx.NodeProto] = []
        self.second_name = ""
        self.tied_lookup = tied_lookup

    def nodes(self) -> list[onnx.NodeProto]:
        if self.layer.op_type == "Gather":
            pair = self._lookup()
        else:
            pair = self._conv() if self.layer.op_type == "Conv" else self._dense()
        self.second_name = pair[-1].name
        return self.constants + pair

    def _tensor(self, suffix: str, array: np.ndarray, dtype=None) -> str:
        reuse = self.shared is not None and suffix in _SHARED_FACTORS
        if reuse and suffix in self.shared:
            return self.shared[suffix]
        name = self._new_tensor(suffix, array, dtype)
        if reuse:
            self.shared[suffix] = name
        return name

    def _new_tensor(self, suffix: str, array: np.ndarray, dtype=None) -> str:
        name = self.names.fresh(f"{self.layer.weight_input}{FACTOR_TAG}_{suffix}")
        values = np.ascontiguousarray(array, dtype=dtype or self.dtype)
        tensor = numpy_helper.from_array(values, name)
        if self.as_nodes:
            self.constants.append(
                helper.make_node("Constant", [], [name], name=self.names.fresh(name), value=tensor)
            )
        else:
            self.initializers.append(tensor)
        if dtype is not None or self.cast_to is None:
            return name
        cast = self.names.fresh(f"{name}/cast")
        self.constants.append(
            helper.make_node("Cast", [name], [cast], name=self.names.fresh(cast), to=self.cast_to)
        )
        return cast

    def _transposed(self, suffix: str, array: np.ndarray) -> str:
        """``arrayᵀ`` as the node reads it. A weight tied with a table lookup stores the shared
        factors once, in the lookup's layout, and transposes them with a node."""
        if not self.tied_lookup:
            return self._tensor(suffix, array.T)
        name = self._tensor(suffix, array)
        out = self.names.fresh(f"{name}/transposed")
        self.constants.append(
            helper.make_node("Transpose", [name], [out], name=self.names.fresh(out), perm=[1, 0])
        )
        return out

    def _node_name(self, suffix: str) -> str:
        return self.names.fresh(f"{self.layer.name}{FACTOR_TAG}_{suffix}")

    def _intermediate(self, suffix: str) -> str:
        return self.names.fresh(f"{self.node.output[0]}{FACTOR_TAG}_{suffix}")

    def _conv(self) -> list[onnx.NodeProto]:
        layer, factors, node = self.layer, self.factors, self.node
        g, r = factors.groups, factors.rank
        kernel = list(layer.kernel_shape)
        first_weight = factors.first.reshape(g * r, layer.in_channels // g, *kernel)
        second_weight = factors.second.reshape(layer.out_channels, g * r, *[1] * len(kernel))
        kept = {
            a.name: helper.get_attribute_value(a)
            for a in node.attribute
            if a.name in _CONV_KEPT_ATTRIBUTES
        }
        middle = self._intermediate("mid")
        first = helper.make_node(
            "Conv",
            [node.input[0], self._tensor("v", first_weight)],
            [middle],
            name=self._node_name("v"),
            kernel_shape=kernel,
            group=g,
            **kept,
        )
        second_inputs = [middle, self._tensor("u", second_weight)]
        if self.bias is not None:
            second_inputs.append(self._tensor("bias", self.bias))
        elif len(node.input) > 2 and node.input[2]:
            second_inputs.append(node.input[2])
        second = helper.make_node(
            "Conv",
            second_inputs,
            list(node.output),
            name=self._node_name("u"),
            kernel_shape=[1] * len(kernel),
        )
        return [first, second]

    def _lookup(self) -> list[onnx.NodeProto]:
        node, factors = self.node, self.factors
        middle = self._intermediate("mid")
        first = helper.make_node(
            "Gather",
            [self._tensor("u", factors.second), node.input[1]],
            [middle],
            name=self._node_name("u"),
        )
        first.attribute.extend(node.attribute)  # axis
        second = helper.make_node(
            "MatMul",
            [middle, self._tensor("v", factors.first[0])],
            list(node.output),
            name=self._node_name("v"),
        )
        return [first, second]

    def _dense(self) -> list[onnx.NodeProto]:
        layer, factors, node = self.layer, self.factors, self.node
        g, r, c = factors.groups, factors.rank, layer.in_channels
        nodes: list[onnx.NodeProto] = []
        data = node.input[0]
        if layer.op_type == "Gemm" and attribute(node, "transA", 0):
            transposed = self._intermediate("a")
            nodes.append(
                helper.make_node(
                    "Transpose",
                    [data],
                    [transposed],
                    name=self._node_name("transpose"),
                    perm=[1, 0],
                )
            )
            data = transposed
        middle = self._intermediate("mid")
        if g == 1:
            nodes.append(
                helper.make_node(
                    "MatMul",
                    [data, self._transposed("v", factors.first[0])],
                    [middle],
                    name=self._node_name("v"),
                )
            )
        else:
            rank = 2 if layer.op_type == "Gemm" else layer.input_rank
            assert rank is not None, "grouped MatMul rewrite needs the input rank"
            keep = [0] * (rank - 1)
            split, grouped = self._intermediate("groups"), self._intermediate("grouped")
            nodes += [
                helper.make_node(
                    "Reshape",
                    [data, self._tensor("split_shape", [*keep, g, 1, c // g], np.int64)],
                    [split],
                    name=self._node_name("split"),
                ),
                helper.make_node(
                    "MatMul",
                    [split, self._tensor("v", np.transpose(factors.first, (0, 2, 1)))],
                    [grouped],
                    name=self._node_name("v"),
                ),
                helper.make_node(
                    "Reshape",
                    [grouped, self._tensor("merge_shape", [*keep, g * r], np.int64)],
                    [middle],
                    name=self._node_name("merge"),
                ),
            ]
        if layer.op_type == "Gemm":
            inputs = [middle, self._tensor("u", factors.second)]
            beta = attribute(node, "beta", 1.0)
            if self.bias is not None:
                inputs.append(self._tensor("bias", self.bias))
                beta = 1.0
            elif len(node.input) > 2 and node.input[2]:
                inputs.append(node.input[2])
            nodes.append(
                helper.make_node(
                    "Gemm",
                    inputs,
                    list(node.output),
                    name=self._node_name("u"),
                    transB=1,
                    alpha=attribute(node, "alpha", 1.0),
                    beta=beta,
                )
            )
        else:
            product = list(node.output) if self.bias is None else [self._intermediate("product")]
            nodes.append(
                helper.make_node(
                    "MatMul",
                    [middle, self._transposed("u", factors.second)],
                    product,
                    name=self._node_name("u"),
                )
            )
            if self.bias is not None:
                nodes.append(
                    helper.make_node(
                        "Add",
                        [product[0], self._tensor("bias", self.bias)],
                        list(node.output),
                        name=self._node_name("bias"),
                    )
                )
        return nodes


def _itemsize(data_type: int) -> int:
    return np.dtype(helper.tensor_dtype_to_np_dtype(data_type)).itemsize


def _remove_unused(graph: onnx.GraphProto, candidates: set[str], main: bool = True) -> None:
    """Remove constants (and their Identity/Cast/Transpose chains) that nothing reads now.

    In the main graph (``main``), an initializer that was also listed as a graph input (IR
    version < 4) loses that input too; a subgraph's inputs are its signature and stay.
    """
    while candidates:
        read = {name for node in graph.node for name in node.input}
        read |= {info.name for info in graph.output}
        read |= _outer_scope_reads(graph)
        dead = {name for name in candidates if name not in read}
        if not dead:
            return
        candidates = _remove_dead(graph, dead, read, main)


def _remove_dead(graph: onnx.GraphProto, dead: set[str], read: set[str], main: bool) -> set[str]:
    """Remove the producers, initializers, inputs and value infos of the ``dead`` names; return
    the inputs of the removed nodes, which may be dead now."""

    def producer(node: onnx.NodeProto) -> bool:
        outputs = node.output
        return any(o in dead for o in outputs) and all(o in dead or o not in read for o in outputs)

    inputs = {name for node in graph.node if producer(node) for name in node.input if name}
    _delete(graph.node, producer)
    _delete(graph.initializer, lambda tensor: tensor.name in dead)
    removed = _delete(graph.input, lambda info: main and info.name in dead)
    if removed:
        log.warning(
            "removed graph input(s) %s: they were initializers listed as inputs "
            "(IR version < 4) and are replaced by low-rank factors",
            ", ".join(sorted(removed)),
        )
    _delete(graph.value_info, lambda info: info.name in dead)
    return inputs


def _delete(container, doomed) -> list[str]:
    """Delete the items of a repeated protobuf field for which ``doomed(item)`` holds, in place
    (deleting by index does not copy the others, unlike rebuilding the list). Returns the
    deleted items' names."""
    positions = [i for i, item in enumerate(container) if doomed(item)]
    names = [getattr(container[i], "name", "") for i in positions]
    for position in reversed(positions):
        del container[position]
    return names


def _outer_scope_reads(graph: onnx.GraphProto) -> set[str]:
    return {
        name for sub in list(iter_graphs(graph))[1:] for node in sub.node for name in node.input
    }
