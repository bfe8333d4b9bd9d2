"""Parameter and MAC counts: of whole models, of layers, and of factorization candidates.

A candidate factorization of a layer with ``f`` outputs, ``c`` input channels and a kernel of
``κ`` taps into ``g`` channel groups of rank ``r`` has

    params(g, r) = r · (g·f + c·κ)          (first, grouped layer: g·r·(c/g)·κ; second: f·g·r)
    MACs(g, r)   = params(g, r) · P

where ``P`` is the number of output positions (batch × spatial size for a Conv, rows for a
Gemm/MatMul). Both layers of the pair are counted, the grouped one included. The bias is
unchanged and is not part of either count.

Shapes come from shapes.py (``infer_shapes``).
"""

from __future__ import annotations

import logging
import math

import onnx

from .graphs import FLOAT_TYPES, attribute
from .types import ShapeInfo
from .walk import iter_graphs, iter_tensors

__all__ = [
    "MAC_OPS",
    "candidate_macs",
    "candidate_params",
    "count_macs",
    "count_parameters",
]

log = logging.getLogger(__name__)


def candidate_params(out_channels: int, cols: int, groups: int, rank: int) -> int:
    """Weights of the factorized pair: ``r·(g·f + c·κ)``, with ``cols = c·κ``."""
    return rank * (groups * out_channels + cols)


def candidate_macs(out_channels: int, cols: int, groups: int, rank: int, positions: int) -> int:
    """MACs of the factorized pair: ``params(g, r) · P``."""
    return candidate_params(out_channels, cols, groups, rank) * positions


def count_parameters(model: onnx.ModelProto) -> int:
    """Number of floating-point constant values in the model: initializers and Constant-node
    tensors in every graph and function. Integer tensors (shapes, indices, quantized data) are
    not parameters. A tensor stored once is counted once however many nodes use it."""
    total = 0
    for tensor in iter_tensors(model):
        if tensor.data_type in FLOAT_TYPES:
            total += math.prod(tensor.dims)
    return total


def count_macs(model: onnx.ModelProto, shapes: ShapeInfo) -> tuple[int, list[str]]:
    """Multiply-accumulates of every Conv, ConvTranspose, Gemm and MatMul, counted node by node.

    Other operators are not counted. Returns the total and the names of nodes whose MACs are
    unknown because a shape is dynamic (those contribute 0).
    """
    total = 0
    unknown: list[str] = []
    for graph in iter_graphs(model.graph):
        for index, node in enumerate(graph.node):
            if node.domain not in ("", "ai.onnx"):
                continue
            macs = node_macs(node, shapes)
            if macs is None:
                if node.op_type in MAC_OPS:
                    unknown.append(node.name or f"{node.op_type}_{index}")
                continue
            total += macs
    return total, unknown


MAC_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


def node_macs(node: onnx.NodeProto, shapes: ShapeInfo) -> int | None:
    """MACs of one node, or None when it is not a MAC op or a needed shape is unknown."""
    if node.op_type not in MAC_OPS or len(node.input) < 2:
        return None
    weight = shapes.get(node.input[1])
    out = shapes.get(node.output[0])
    if node.op_type == "MatMul":  # B's shape is not needed: K is A's last axis
        x = shapes.get(node.input[0])
        if x is None or None in x or not x or out is None or None in out:
            return None
        return math.prod(out) * x[-1]  # every output value is a dot product of length K
    if weight is None or out is None or None in weight or None in out:
        return None
    if len(weight) < (3 if node.op_type.startswith("Conv") else 2):
        return None  # a malformed weight: the node's MACs are unknown
    if node.op_type == "Conv":
        # every output value needs (c/group)·κ products: weight is (f, c/group, k...)
        return math.prod(out) * math.prod(weight[1:])
    if node.op_type == "ConvTranspose":
        x = shapes.get(node.input[0])
        if x is None or None in x:
            return None
        # every input value is spread over (f/group)·κ outputs: weight is (c, f/group, k...)
        return math.prod(x) * math.prod(weight[1:])
    inner = weight[1] if attribute(node, "transB", 0) else weight[0]
    return math.prod(out) * inner  # Gemm
