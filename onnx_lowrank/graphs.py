"""Small read-only helpers over ONNX graphs shared by several stages.

Nothing here changes a model. The stages (discover, cost, rewrite, validate) use these to walk
graphs, subgraphs included, and to read tensor types.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx
from onnx import numpy_helper

__all__ = [
    "FLOAT_TYPES",
    "attribute",
    "iter_graphs",
    "iter_tensors",
    "opset_version",
    "tensor_to_array",
]

#: Element types that hold trainable weights. Integer tensors are shapes, indices or quantized
#: data and are never counted as parameters.
FLOAT_TYPES = frozenset(
    {
        onnx.TensorProto.FLOAT,
        onnx.TensorProto.FLOAT16,
        onnx.TensorProto.BFLOAT16,
        onnx.TensorProto.DOUBLE,
    }
)


def iter_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every subgraph below it (If branches, Loop and Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from iter_graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from iter_graphs(sub)


def iter_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every constant tensor of a model: initializers and Constant-node values, in all graphs
    and local functions."""
    graphs = list(iter_graphs(model.graph))
    for function in model.functions:
        for node in function.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    graphs.extend(iter_graphs(attr.g))
    nodes = [node for graph in graphs for node in graph.node]
    nodes += [node for function in model.functions for node in function.node]
    for graph in graphs:
        yield from graph.initializer
        for sparse in graph.sparse_initializer:
            yield sparse.values
    for node in nodes:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.SPARSE_TENSOR:
                yield attr.sparse_tensor.values


def attribute(node: onnx.NodeProto, name: str, default=None):
    """The value of attribute ``name`` of ``node``, or ``default`` when absent."""
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def opset_version(model: onnx.ModelProto, domain: str = "") -> int:
    """The imported opset version of ``domain`` (default: the ONNX domain), 0 when absent."""
    for entry in model.opset_import:
        if entry.domain in ({domain, "ai.onnx"} if domain == "" else {domain}):
            return entry.version
    return 0


def tensor_to_array(tensor: onnx.TensorProto) -> np.ndarray:
    """A tensor's values as a numpy array (bfloat16 and float8 come back as ml_dtypes types)."""
    return numpy_helper.to_array(tensor)
