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

Bias correction (whiten.py): ``biases`` maps a node name to the layer's new bias ``b'``
(``f`` values, in output units). The second node then reads ``b'`` instead of the original bias:
a Conv gets it as its bias input, a Gemm as ``C`` with ``beta = 1``, and a MatMul, which has no
bias input, gets an ``Add`` after it that produces the original output name.

The surgery runs on onnx-graphsurgeon (``surgery.Surgery``): each replaced node's outputs go to
the last node of its pair, as graphsurgeon's examples do, so every downstream name stays valid;
the pair is spliced in at the replaced node's place, so the graph stays in topological order;
``Graph.cleanup`` then removes what nothing reads any more, in every graph (the old weights with
their Identity/Cast/Transpose chains, outer-scope weights of rewritten subgraph layers, and any
node that does not contribute to an output). ``Surgery.export`` carries across what a
graphsurgeon round trip drops, so the graph's inputs, outputs, opset imports, IR version,
producer, doc strings and ``metadata_props`` are kept; the nodes of a pair inherit the replaced
node's doc string and ``metadata_props``. The model's ``metadata_props`` only gain the
``discover.FACTORIZED_KEY`` record of what was factorized (so a second run knows the original
sizes). Weights kept in external files (a lazily loaded model) stay there: graphsurgeon reads
constants lazily, and the export copies their file references.

A weight read by several nodes (``Layer.tied``) is factorized once: every node gets its own
pair (with its own attributes, input and bias), and all pairs read the same factor tensors.

Layers may sit in subgraphs (``Layer.graph_path``); every new name is unique across the whole
model, so no subgraph name shadows an outer one. Factors are stored in the narrower of the
stored and the read weight type (fp16 weights behind a ``Cast`` to fp32 stay fp16, followed by a
``Cast``), as initializers, or as ``Constant`` nodes in models of IR version < 4, whose
initializers must also be graph inputs.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper

from .graphs import FreshNames
from .surgery import Surgery
from .types import FACTOR_TAG, FACTORIZED_KEY, Factors, Layer

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
        model: the model ``discover`` ran on; it is not modified unless ``inplace``.
        replacements: layers (of any graph) with their factors.
        inplace: make ``model`` itself the rewritten model (it then holds the result; the
            rewrite still builds it beside the original).
        biases: node name (the layer's, or a tied use's) -> new bias ``b'`` (``f`` values in
            output units) that replaces the node's bias (bias correction); nodes not named keep
            their bias.

    Returns:
        The rewritten model. The ONNX checker and shape inference accept it.
    """
    if not replacements:
        if inplace:
            return model
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        return copy
    surgery = Surgery(model)
    names = FreshNames(model)
    biases = biases or {}
    as_nodes = 0 < model.ir_version < 4
    # Every node is found before any node list changes (paths and indices refer to them).
    graphs = {layer.graph_path: surgery.subgraph(layer.graph_path) for layer, _ in replacements}
    uses = [
        [(use, graphs[layer.graph_path].nodes[use.node_index]) for use in layer.uses()]
        for layer, _ in replacements
    ]
    pairs: dict[int, list[gs.Node]] = {}  # id(replaced node) -> the nodes that replace it
    records = []
    for (layer, factors), layer_uses in zip(replacements, uses, strict=True):
        shared: dict[str, gs.Tensor] = {}  # the factors, written once for all uses of the weight
        seconds = []
        for use, node in layer_uses:
            builder = _PairBuilder(
                use,
                factors,
                node,
                surgery,
                names,
                as_nodes,
                biases.get(use.name),
                shared,
                layer.lookup,
            )
            pairs[id(node)] = nodes = builder.nodes()
            surgery.inherit(nodes, node)
            seconds.append(builder.second_name)
        record = {**_record_of(layer, factors), "second": seconds[0]}
        if seconds[1:]:
            record["tied"] = seconds[1:]
        records.append(record)
    for graph in {id(graph): graph for graph in graphs.values()}.values():
        spliced = []
        for node in graph.nodes:
            if id(node) in pairs:
                node.inputs.clear()  # the pair's last node took the outputs already
                spliced += pairs[id(node)]
            else:
                spliced.append(node)
        graph.nodes = spliced
    surgery.graph.cleanup(recurse_subgraphs=True, recurse_functions=False)
    result = surgery.export()
    del surgery
    kept = {info.name for info in result.graph.input}
    removed = [info.name for info in model.graph.input if info.name not in kept]
    if removed:
        log.warning(
            "removed graph input(s) %s: they were initializers listed as inputs "
            "(IR version < 4) and are replaced by low-rank factors",
            ", ".join(sorted(removed)),
        )
    _record(result, records)
    if inplace:
        model.CopyFrom(result)
        return model
    return result


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


def _node(op: str, inputs, outputs, name: str, **attrs) -> gs.Node:
    """A graphsurgeon node whose attributes are sorted by name, as ``helper.make_node`` writes
    them."""
    return gs.Node(op, name, dict(sorted(attrs.items())), list(inputs), list(outputs))


class _PairBuilder:
    """The nodes that replace one layer (one use of its weight): its pair, and the Constant,
    Cast and Transpose nodes its factors need."""

    def __init__(
        self,
        layer: Layer,
        factors: Factors,
        node: gs.Node,
        surgery: Surgery,
        names: FreshNames,
        as_nodes: bool = False,
        bias: np.ndarray | None = None,
        shared: dict[str, gs.Tensor] | None = None,
        tied_lookup: bool = False,
    ):
        self.layer, self.factors, self.node, self.names = layer, factors, node, names
        self.surgery = surgery
        self.as_nodes = as_nodes
        self.bias = bias
        # Factor tensors already written for another use of the same weight (Layer.tied):
        # suffix -> tensor. This builder adds the ones it writes first.
        self.shared = shared
        read = layer.weight_dtype
        stored = layer.stored_dtype or read
        # Keep the narrower type: fp16 weights read through a Cast to fp32 stay fp16 on disk.
        narrow = stored if _itemsize(stored) < _itemsize(read) else read
        self.dtype = helper.tensor_dtype_to_np_dtype(narrow)
        self.cast_to = read if narrow != read else None
        self.constants: list[gs.Node] = []
        self.output_name = node.outputs[0].name
        self.second_name = ""
        self.tied_lookup = tied_lookup

    def nodes(self) -> list[gs.Node]:
        """The new nodes, in an order that keeps the graph sorted. The last one takes over the
        replaced node's outputs."""
        if self.layer.op_type == "Gather":
            pair = self._lookup()
        else:
            pair = self._conv() if self.layer.op_type == "Conv" else self._dense()
        self.second_name = pair[-1].name
        return self.constants + pair

    def _outputs(self) -> list[gs.Tensor]:
        """The replaced node's outputs, taken from it for the pair's last node."""
        outputs = list(self.node.outputs)
        self.node.outputs.clear()
        return outputs

    def _bias_input(self) -> gs.Tensor | None:
        inputs = self.node.inputs
        if len(inputs) > 2 and not inputs[2].is_empty():
            return inputs[2]
        return None

    def _tensor(self, suffix: str, array: np.ndarray, dtype=None) -> gs.Tensor:
        reuse = self.shared is not None and suffix in _SHARED_FACTORS
        if reuse and suffix in self.shared:
            return self.shared[suffix]
        tensor = self._new_tensor(suffix, array, dtype)
        if reuse:
            self.shared[suffix] = tensor
        return tensor

    def _new_tensor(self, suffix: str, array: np.ndarray, dtype=None) -> gs.Tensor:
        name = self.names.fresh(f"{self.layer.weight_input}{FACTOR_TAG}_{suffix}")
        # a view of the factors: converted and copied into the model when it is exported
        tensor: gs.Tensor = self.surgery.constant(name, array, dtype or self.dtype)
        if self.as_nodes:
            variable = gs.Variable(name)
            self.constants.append(
                _node("Constant", [], [variable], self.names.fresh(name), value=tensor)
            )
            tensor = variable
        if dtype is not None or self.cast_to is None:
            return tensor
        cast = gs.Variable(self.names.fresh(f"{name}/cast"))
        self.constants.append(
            _node("Cast", [tensor], [cast], self.names.fresh(cast.name), to=self.cast_to)
        )
        return cast

    def _transposed(self, suffix: str, array: np.ndarray) -> gs.Tensor:
        """``arrayᵀ`` as the node reads it. A weight tied with a table lookup stores the shared
        factors once, in the lookup's layout, and transposes them with a node."""
        if not self.tied_lookup:
            return self._tensor(suffix, array.T)
        tensor = self._tensor(suffix, array)
        out = gs.Variable(self.names.fresh(f"{tensor.name}/transposed"))
        self.constants.append(
            _node("Transpose", [tensor], [out], self.names.fresh(out.name), perm=[1, 0])
        )
        return out

    def _node_name(self, suffix: str) -> str:
        return self.names.fresh(f"{self.layer.name}{FACTOR_TAG}_{suffix}")

    def _intermediate(self, suffix: str) -> gs.Variable:
        return gs.Variable(self.names.fresh(f"{self.output_name}{FACTOR_TAG}_{suffix}"))

    def _conv(self) -> list[gs.Node]:
        layer, factors, node = self.layer, self.factors, self.node
        g, r = factors.groups, factors.rank
        kernel = list(layer.kernel_shape)
        first_weight = factors.first.reshape(g * r, layer.in_channels // g, *kernel)
        second_weight = factors.second.reshape(layer.out_channels, g * r, *[1] * len(kernel))
        kept = {name: node.attrs[name] for name in _CONV_KEPT_ATTRIBUTES if name in node.attrs}
        middle = self._intermediate("mid")
        first = _node(
            "Conv",
            [node.inputs[0], self._tensor("v", first_weight)],
            [middle],
            self._node_name("v"),
            kernel_shape=kernel,
            group=g,
            **kept,
        )
        second_inputs = [middle, self._tensor("u", second_weight)]
        bias = self._bias_input()
        if self.bias is not None:
            second_inputs.append(self._tensor("bias", self.bias))
        elif bias is not None:
            second_inputs.append(bias)
        second = _node(
            "Conv",
            second_inputs,
            self._outputs(),
            self._node_name("u"),
            kernel_shape=[1] * len(kernel),
        )
        return [first, second]

    def _lookup(self) -> list[gs.Node]:
        node, factors = self.node, self.factors
        middle = self._intermediate("mid")
        first = gs.Node(
            "Gather",
            self._node_name("u"),
            dict(node.attrs),  # axis
            [self._tensor("u", factors.second), node.inputs[1]],
            [middle],
        )
        second = _node(
            "MatMul",
            [middle, self._tensor("v", factors.first[0])],
            self._outputs(),
            self._node_name("v"),
        )
        return [first, second]

    def _dense(self) -> list[gs.Node]:
        layer, factors, node = self.layer, self.factors, self.node
        g, r, c = factors.groups, factors.rank, layer.in_channels
        nodes: list[gs.Node] = []
        data = node.inputs[0]
        if layer.op_type == "Gemm" and node.attrs.get("transA", 0):
            transposed = self._intermediate("a")
            nodes.append(
                _node("Transpose", [data], [transposed], self._node_name("transpose"), perm=[1, 0])
            )
            data = transposed
        middle = self._intermediate("mid")
        if g == 1:
            nodes.append(
                _node(
                    "MatMul",
                    [data, self._transposed("v", factors.first[0])],
                    [middle],
                    self._node_name("v"),
                )
            )
        else:
            rank = 2 if layer.op_type == "Gemm" else layer.input_rank
            assert rank is not None, "grouped MatMul rewrite needs the input rank"
            keep = [0] * (rank - 1)
            split, grouped = self._intermediate("groups"), self._intermediate("grouped")
            nodes += [
                _node(
                    "Reshape",
                    [data, self._tensor("split_shape", [*keep, g, 1, c // g], np.int64)],
                    [split],
                    self._node_name("split"),
                ),
                _node(
                    "MatMul",
                    [split, self._tensor("v", np.transpose(factors.first, (0, 2, 1)))],
                    [grouped],
                    self._node_name("v"),
                ),
                _node(
                    "Reshape",
                    [grouped, self._tensor("merge_shape", [*keep, g * r], np.int64)],
                    [middle],
                    self._node_name("merge"),
                ),
            ]
        if layer.op_type == "Gemm":
            inputs = [middle, self._tensor("u", factors.second)]
            beta = node.attrs.get("beta", 1.0)
            bias = self._bias_input()
            if self.bias is not None:
                inputs.append(self._tensor("bias", self.bias))
                beta = 1.0
            elif bias is not None:
                inputs.append(bias)
            nodes.append(
                _node(
                    "Gemm",
                    inputs,
                    self._outputs(),
                    self._node_name("u"),
                    transB=1,
                    alpha=node.attrs.get("alpha", 1.0),
                    beta=beta,
                )
            )
        else:
            product = self._outputs() if self.bias is None else [self._intermediate("product")]
            nodes.append(
                _node(
                    "MatMul",
                    [middle, self._transposed("u", factors.second)],
                    product,
                    self._node_name("u"),
                )
            )
            if self.bias is not None:
                nodes.append(
                    _node(
                        "Add",
                        [product[0], self._tensor("bias", self.bias)],
                        self._outputs(),
                        self._node_name("bias"),
                    )
                )
        return nodes


def _itemsize(data_type: int) -> int:
    return np.dtype(helper.tensor_dtype_to_np_dtype(data_type)).itemsize
