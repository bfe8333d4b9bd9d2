"""Walking a model's graphs: every subgraph (If branches, Loop and Scan bodies) with its path,
and every constant tensor.

It imports nothing from the package, so every module can stand on it, graph surgery included
(docs/design.md, "Layout").
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import onnx

if TYPE_CHECKING:
    from .types import GraphPath

__all__ = ["graph_at", "iter_graphs", "iter_tensors", "walk_graphs"]


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


def walk_graphs(
    graph: onnx.GraphProto, path: GraphPath = ()
) -> Iterator[tuple[GraphPath, onnx.GraphProto]]:
    """``(path, graph)`` for ``graph`` and every subgraph below it, parents before children."""
    yield path, graph
    for position, node in enumerate(graph.node):
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from walk_graphs(attr.g, (*path, (position, attr.name, 0)))
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for index, sub in enumerate(attr.graphs):
                    yield from walk_graphs(sub, (*path, (position, attr.name, index)))


def graph_at(graph: onnx.GraphProto, path: GraphPath) -> onnx.GraphProto:
    """The subgraph of ``graph`` at ``path`` (``graph`` itself for ``()``)."""
    for position, name, index in path:
        node = graph.node[position]
        attr = next(a for a in node.attribute if a.name == name)
        graph = attr.g if attr.type == onnx.AttributeProto.GRAPH else attr.graphs[index]
    return graph


def iter_tensors(
    model: onnx.ModelProto, *, main_initializers: bool = True
) -> Iterator[onnx.TensorProto]:
    """Every constant tensor of a model: initializers and Constant-node values, in all graphs
    and local functions (the main graph's initializers only when ``main_initializers``)."""
    graphs = list(iter_graphs(model.graph))
    for function in model.functions:
        for node in function.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    graphs.extend(iter_graphs(attr.g))
    nodes = [node for graph in graphs for node in graph.node]
    nodes += [node for function in model.functions for node in function.node]
    for position, graph in enumerate(graphs):
        if position or main_initializers:
            yield from graph.initializer
        for sparse in graph.sparse_initializer:
            yield sparse.values
    for node in nodes:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.SPARSE_TENSOR:
                yield attr.sparse_tensor.values
