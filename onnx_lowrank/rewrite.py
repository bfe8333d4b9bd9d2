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

Bias correction (calibrate.py): ``biases`` maps a layer name to the layer's new bias ``b'``
(``f`` values, in output units). The second node then reads ``b'`` instead of the original bias:
a Conv gets it as its bias input, a Gemm as ``C`` with ``beta = 1``, and a MatMul, which has no
bias input, gets an ``Add`` after it that produces the original output name.

The pass edits a copy of the model in place at the protobuf level. Every node that is not
replaced keeps its bytes; the graph's inputs, outputs, opset imports, IR version, producer and
metadata are untouched. The replaced node's output name goes to the second node, so every
downstream name stays valid. Weights that nothing reads any more are removed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .discover import FACTOR_TAG, Layer
from .factorize import Factors
from .graphs import attribute

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
        replacements: layers of the main graph with their factors.
        inplace: edit ``model`` itself instead of a copy.
        biases: layer name -> new bias ``b'`` (``f`` values in output units) that replaces the
            layer's bias (bias correction); layers not named keep their bias.

    Returns:
        The rewritten model. The ONNX checker and shape inference accept it.
    """
    if not inplace:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        model = copy
    if not replacements:
        return model
    graph = model.graph
    names = _Names(graph)
    biases = biases or {}
    new_nodes: dict[int, list[onnx.NodeProto]] = {}
    initializers: list[onnx.TensorProto] = []
    unused = {layer.weight_input for layer, _ in replacements}
    for layer, factors in replacements:
        node = graph.node[layer.node_index]
        builder = _PairBuilder(layer, factors, node, names, biases.get(layer.name))
        new_nodes[layer.node_index] = builder.nodes()
        initializers.extend(builder.initializers)
        if layer.name in biases and len(node.input) > 2 and node.input[2]:
            unused.add(node.input[2])
    nodes = []
    for position, node in enumerate(graph.node):
        nodes.extend(new_nodes.get(position, [node]))
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(initializers)
    _remove_unused(graph, unused)
    return model


class _Names:
    """Fresh, unique tensor and node names for a graph."""

    def __init__(self, graph: onnx.GraphProto):
        self.used: set[str] = set()
        for node in graph.node:
            self.used.update(node.input)
            self.used.update(node.output)
            self.used.add(node.name)
        for collection in (graph.input, graph.output, graph.value_info, graph.initializer):
            self.used.update(item.name for item in collection)

    def fresh(self, base: str) -> str:
        name, suffix = base, 1
        while name in self.used:
            suffix += 1
            name = f"{base}_{suffix}"
        self.used.add(name)
        return name


class _PairBuilder:
    """The nodes and initializers that replace one layer."""

    def __init__(
        self,
        layer: Layer,
        factors: Factors,
        node: onnx.NodeProto,
        names: _Names,
        bias: np.ndarray | None = None,
    ):
        self.layer, self.factors, self.node, self.names = layer, factors, node, names
        self.bias = bias
        self.dtype = helper.tensor_dtype_to_np_dtype(layer.weight_dtype)
        self.initializers: list[onnx.TensorProto] = []
        self._extra = 0

    def nodes(self) -> list[onnx.NodeProto]:
        if self.layer.op_type == "Conv":
            return self._conv()
        return self._dense()

    def _tensor(self, suffix: str, array: np.ndarray, dtype=None) -> str:
        name = self.names.fresh(f"{self.layer.weight_input}{FACTOR_TAG}_{suffix}")
        values = np.ascontiguousarray(array, dtype=dtype or self.dtype)
        self.initializers.append(numpy_helper.from_array(values, name))
        return name

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
                    [data, self._tensor("v", factors.first[0].T)],
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
                    [middle, self._tensor("u", factors.second.T)],
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


def _remove_unused(graph: onnx.GraphProto, candidates: set[str]) -> None:
    """Remove constants (and their Identity/Cast/Transpose chains) that nothing reads now."""
    while candidates:
        read = {name for node in graph.node for name in node.input}
        read |= {info.name for info in graph.output}
        read |= _outer_scope_reads(graph)
        dead = {name for name in candidates if name not in read}
        if not dead:
            return
        candidates = set()
        kept_nodes = []
        for node in graph.node:
            if any(output in dead for output in node.output) and all(
                output in dead or output not in read for output in node.output
            ):
                candidates.update(name for name in node.input if name)
                continue
            kept_nodes.append(node)
        if len(kept_nodes) != len(graph.node):
            del graph.node[:]
            graph.node.extend(kept_nodes)
        initializers = [t for t in graph.initializer if t.name not in dead]
        if len(initializers) != len(graph.initializer):
            del graph.initializer[:]
            graph.initializer.extend(initializers)
        inputs = [info for info in graph.input if info.name not in dead]
        if len(inputs) != len(graph.input):
            removed = sorted({info.name for info in graph.input} - {i.name for i in inputs})
            log.warning(
                "removed graph input(s) %s: they were initializers listed as inputs "
                "(IR version < 4) and are replaced by low-rank factors",
                ", ".join(removed),
            )
            del graph.input[:]
            graph.input.extend(inputs)
        value_info = [info for info in graph.value_info if info.name not in dead]
        if len(value_info) != len(graph.value_info):
            del graph.value_info[:]
            graph.value_info.extend(value_info)


def _outer_scope_reads(graph: onnx.GraphProto) -> set[str]:
    from .graphs import iter_graphs

    return {
        name for sub in list(iter_graphs(graph))[1:] for node in sub.node for name in node.input
    }
