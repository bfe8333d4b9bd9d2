r"""Fold BatchNormalization and constant per-channel Mul/Add into the preceding Conv.

The error of a layer must be measured on the weight as it really acts. When a Conv's only
consumer rescales its output channels, the effective weight is the rescaled one, so this pass
folds the rescaling into the Conv before discovery and removes the node. With ``W`` the Conv
weight ``(f, c/group, k…)``, ``b`` its bias (0 when it has none) and ``y = W ∗ x + b``:

* ``BatchNormalization`` (inference form) with scale ``γ``, shift ``β``, running mean ``μ``,
  variance ``v`` and ``ε``: ``BN(y) = s ⊙ (y − μ) + β`` with ``s = γ / sqrt(v + ε)``, so
  ``W' = s ⊙ W`` (row ``o`` times ``s_o``) and ``b' = s ⊙ (b − μ) + β``;
* ``Mul(y, m)`` with a constant ``m`` per output channel (or a scalar): ``W' = m ⊙ W``,
  ``b' = m ⊙ b``;
* ``Add(y, a)`` with a constant ``a`` per output channel (or a scalar): ``W' = W``,
  ``b' = b + a``.

"Per output channel" means ``m`` broadcasts against the Conv output ``(N, f, d1, …)`` along the
channel axis only: after left-padding its shape to the output's rank, every dimension is 1
except the channel one, which is 1 or ``f``. The constant may be an initializer, a ``Constant``
node, or the output of ``Identity``/``Cast``/``Reshape``/``Unsqueeze``/``Squeeze``/``Flatten``
of such constants (paddle2onnx writes a Conv bias as ``Add(y, Reshape(Constant, Constant))``).

Folding happens only when it is exact up to float rounding and changes nothing else: the Conv
is in the main graph with a constant weight (and bias) that nothing else reads, its output has
that one consumer and is neither a graph output nor read by a subgraph, and the consumer's
other outputs (BatchNormalization's running statistics) are unused. Arithmetic is in float64,
rounded once to the weight's type. The consumer takes the Conv's place in the graph in the
sense that the Conv now produces the consumer's output name, so every downstream name stays
valid; constants only the folded nodes read are removed. An initializer that is also a graph
input of a model of IR version 4 or newer is only that input's default, not a constant
(``graphs.overridable_initializers``; discovery skips such weights too), so nothing folds into
it; below IR version 4 initializers are listed as inputs and are constants, and a new bias gets
its input as well. The pass repeats until nothing more
folds, so ``Conv → BatchNormalization → Mul`` folds completely, and running it again changes
nothing. The graph index (producers, consumers, readers) is built once and updated by every
fold, and the graph's lists are rewritten once at the end, so the pass takes time linear in
the size of the graph (``benchmarks/fold_scaling.py``).
"""

from __future__ import annotations

import bisect
import heapq
import logging
import os
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from .graphs import (
    FLOAT_TYPES,
    FreshNames,
    attribute,
    opset_version,
    overridable_initializers,
    tensor_to_array,
)
from .index import GraphIndex

__all__ = ["FoldedNode", "Folding", "fold"]

log = logging.getLogger(__name__)

_FOLDABLE = ("BatchNormalization", "Mul", "Add")
_STANDARD = ("", "ai.onnx")


@dataclass(frozen=True)
class FoldedNode:
    """One node folded into a Conv.

    Attributes:
        conv: name of the Conv (node name, or ``Conv_<index>`` when it has none, with its
            index in the folded model, as discovery names it).
        node: name of the folded node (or ``<op_type>_<index>``, its index in the input).
        op_type: ``BatchNormalization``, ``Mul`` or ``Add``.
    """

    conv: str
    node: str
    op_type: str


@dataclass(frozen=True)
class Folding:
    """What ``fold`` returns.

    Attributes:
        model: the model with the nodes folded (a copy; the input is never modified).
        folded: every node folded, in the order they were folded.
    """

    model: onnx.ModelProto
    folded: tuple[FoldedNode, ...]

    @property
    def modified(self) -> bool:
        return bool(self.folded)

    def summary(self) -> str:
        """One line for reports, e.g. ``folded into the preceding Conv: 35 BatchNormalization``."""
        if not self.folded:
            return "nothing folded into Conv weights"
        counts = {op: sum(1 for f in self.folded if f.op_type == op) for op in _FOLDABLE}
        parts = ", ".join(f"{count} {op}" for op, count in counts.items() if count)
        return f"folded into the preceding Conv (weight and bias): {parts}"


def fold(model: onnx.ModelProto, data_dir: str | os.PathLike | None = None) -> Folding:
    """Fold every BatchNormalization and constant per-channel Mul/Add into its Conv.

    Args:
        model: the model; it is not modified.
        data_dir: folder of the model file, for weights still in external files (models
            loaded lazily).

    Returns:
        A copy with the nodes folded and the list of what was folded. When nothing folds, the
        copy equals the input.
    """
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    index = _Index(copy, data_dir)
    opset = opset_version(copy)
    names = FreshNames(copy)  # new names are fresh in every graph: no subgraph shadows them
    # Convs are tried in graph order and one that folded is tried again at once, which is the
    # order of "fold the graph's first foldable pair until none is left" without rescanning the
    # graph: a fold can only make a Conv foldable that reads a name it released (``woken``).
    pending = [position for position, node in enumerate(index.nodes) if _is_conv(node)]
    steps: list[tuple[int, int, str]] = []
    while pending:
        position = heapq.heappop(pending)
        step = _fold_at(index, position, opset, names)
        if step is not None:
            steps.append(step)
            for woken in (position, *index.woken()):
                heapq.heappush(pending, woken)
    folded = index.commit(steps)
    for step in folded:
        log.info("folded %s %r into Conv %r", step.op_type, step.node, step.conv)
    return Folding(copy, folded)


def _is_conv(node: onnx.NodeProto) -> bool:
    return node.op_type == "Conv" and node.domain in _STANDARD and len(node.input) >= 2


class _Index(GraphIndex):
    """The main graph's ``index.GraphIndex``, built once and updated by every fold; the graph's
    node, initializer, input and value_info lists are only rewritten once, by ``commit``."""

    def __init__(self, model: onnx.ModelProto, data_dir: str | os.PathLike | None = None):
        super().__init__(model.graph, (), None, overridable_initializers(model))
        self.data_dir = data_dir
        self.listed = 0 < model.ir_version < 4  # every initializer is also a graph input
        self.nodes = list(self.graph.node)
        self.removed: set[int] = set()  # node positions
        self.dead_initializers: set[str] = set()
        self.dead_values: set[str] = set()  # value_info entries to drop
        self.released: set[str] = set()  # names that lost a reader since ``woken``

    def constant(self, name: str, opset: int) -> np.ndarray | None:
        """The value of ``name`` when it is a constant or a shape-only function of constants."""
        return self.value(name, opset, self.data_dir)

    def add_initializer(self, tensor: onnx.TensorProto) -> None:
        self.graph.initializer.append(tensor)
        self.initializers[tensor.name] = self.graph.initializer[-1]
        if self.listed:
            info = onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims)
            self.graph.input.append(info)

    def rename_output(self, position: int, old: str, new: str) -> None:
        """Node ``position`` produces ``new`` instead of ``old``; ``new``'s producer is gone."""
        node = self.nodes[position]
        node.output[list(node.output).index(old)] = new
        self.producers.pop(old, None)
        self.producers[new] = position
        self.dead_values.add(old)

    def remove_node(self, position: int) -> None:
        """Remove a node, then the constants behind its inputs that nothing reads any more:
        initializers (overridable ones stay) and the nodes computing them."""
        self.removed.add(position)
        node = self.nodes[position]
        for name in node.output:
            if self.producers.get(name) == position:
                del self.producers[name]
                self.dead_values.add(name)  # no value_info for a name nothing defines
        for name in node.input:
            if name:
                self.consumers[name].remove(position)
                self.released.add(name)
        for name in dict.fromkeys(node.input):
            if name and not self.readers(name):
                self._remove_constant(name)

    def _remove_constant(self, name: str) -> None:
        if name in self.overridable:  # a graph input's default: not ours to remove
            return
        if name in self.initializers:
            del self.initializers[name]
            self.dead_initializers.add(name)
            return
        position = self.producers.get(name)
        if position is not None and not any(map(self.readers, self.nodes[position].output)):
            self.remove_node(position)

    def woken(self) -> set[int]:
        """Convs that may have become foldable since the last call: those that read, or
        produce, a name that lost a reader."""
        positions = set()
        for name in self.released:
            for position in (*self.consumers.get(name, ()), self.producers.get(name)):
                if position is not None and _is_conv(self.nodes[position]):
                    positions.add(position)
        self.released.clear()
        return positions

    def commit(self, steps: list[tuple[int, int, str]]) -> tuple[FoldedNode, ...]:
        """Write the removals into the graph; the folds as ``FoldedNode``s."""
        graph = self.graph
        if self.removed:
            del graph.node[:]
            graph.node.extend(
                node for position, node in enumerate(self.nodes) if position not in self.removed
            )
        if self.dead_initializers:
            _keep(graph.initializer, lambda item: item.name not in self.dead_initializers)
            _keep(graph.input, lambda item: item.name not in self.dead_initializers)
        if self.dead_values:
            _keep(graph.value_info, lambda item: item.name not in self.dead_values)
        removed = sorted(self.removed)
        return tuple(
            FoldedNode(
                self.nodes[conv].name or f"Conv_{conv - bisect.bisect_left(removed, conv)}",
                self.nodes[consumer].name or f"{op_type}_{consumer}",
                op_type,
            )
            for conv, consumer, op_type in steps
        )


def _keep(items, keep) -> None:
    """Keep the items of a repeated protobuf field for which ``keep`` is true, in order."""
    kept = [item for item in items if keep(item)]
    if len(kept) != len(items):
        del items[:]
        items.extend(kept)


def _fold_at(
    index: _Index, position: int, opset: int, names: FreshNames
) -> tuple[int, int, str] | None:
    """Fold the Conv at ``position`` with its consumer: ``(conv, consumer, op_type)`` positions,
    or None when they do not fold."""
    node = index.nodes[position]
    output = node.output[0]
    readers = index.consumers.get(output, [])
    if index.readers(output) != 1 or len(readers) != 1:
        return None
    consumer_position = readers[0]
    consumer = index.nodes[consumer_position]
    scale_shift = _scale_shift(consumer, output, node, index, opset)
    if scale_shift is None or not _owns_constants(node, index):
        return None
    _apply(index, position, consumer_position, *scale_shift, names)
    return position, consumer_position, consumer.op_type


def _owns_constants(conv: onnx.NodeProto, index: _Index) -> bool:
    """True when the Conv's weight (and bias) are stored float constants only it reads."""
    for name in conv.input[1:3]:
        if not name:
            continue
        tensor = index.stored(name)
        if tensor is None or tensor.data_type not in FLOAT_TYPES or index.readers(name) != 1:
            return False
    return True


def _scale_shift(
    consumer: onnx.NodeProto, output: str, conv: onnx.NodeProto, index: _Index, opset: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """``(s, t)`` with ``consumer(y) = s ⊙ y + t`` per output channel, or None."""
    if consumer.domain not in _STANDARD or consumer.op_type not in _FOLDABLE:
        return None
    weight = index.stored(conv.input[1])
    if weight is None or len(weight.dims) < 3:
        return None
    channels, rank = int(weight.dims[0]), len(weight.dims)
    if consumer.op_type == "BatchNormalization":
        return _batchnorm(consumer, output, channels, index, opset)
    if len(consumer.input) != 2 or consumer.input[0] == consumer.input[1]:
        return None
    other = consumer.input[1] if consumer.input[0] == output else consumer.input[0]
    value = index.constant(other, opset)
    if value is None or value.dtype.kind != "f":
        return None
    per_channel = _per_channel(value, channels, rank)
    if per_channel is None:
        return None
    if consumer.op_type == "Mul":
        return per_channel, np.zeros(channels)
    return np.ones(channels), per_channel


def _per_channel(value: np.ndarray, channels: int, rank: int) -> np.ndarray | None:
    """``value`` as ``(channels,)`` when it broadcasts along the channel axis only."""
    if value.ndim > rank:
        return None
    shape = (1,) * (rank - value.ndim) + value.shape
    if any(size != 1 for axis, size in enumerate(shape) if axis != 1) or shape[1] not in (
        1,
        channels,
    ):
        return None
    return np.broadcast_to(value.reshape(-1).astype(np.float64), (channels,)).copy()


def _batchnorm(
    node: onnx.NodeProto, output: str, channels: int, index: _Index, opset: int
) -> tuple[np.ndarray, np.ndarray] | None:
    if len(node.input) != 5 or node.input[0] != output:
        return None
    if attribute(node, "training_mode", 0) or not attribute(node, "spatial", 1):
        return None
    if any(name and index.readers(name) for name in node.output[1:]):
        return None  # running statistics are used: training form
    values = [index.constant(name, opset) for name in node.input[1:]]
    if any(v is None or v.shape != (channels,) for v in values):
        return None
    scale, shift, mean, variance = (v.astype(np.float64) for v in values)
    epsilon = float(attribute(node, "epsilon", 1e-5))
    factor = scale / np.sqrt(variance + epsilon)
    return factor, shift - factor * mean


def _apply(
    index: _Index,
    position: int,
    consumer_position: int,
    factor: np.ndarray,
    shift: np.ndarray,
    names: FreshNames,
) -> None:
    """``W' = factor ⊙ W``, ``b' = factor ⊙ b + shift``; the Conv takes the consumer's output."""
    conv, consumer = index.nodes[position], index.nodes[consumer_position]
    weight_tensor = index.stored(conv.input[1])
    weight = np.asarray(tensor_to_array(weight_tensor, index.data_dir))
    dtype = weight.dtype
    scaled = weight.astype(np.float64) * factor.reshape((-1,) + (1,) * (weight.ndim - 1))
    _store(weight_tensor, scaled.astype(dtype))
    if len(conv.input) > 2 and conv.input[2]:
        bias_tensor = index.stored(conv.input[2])
        bias = np.asarray(tensor_to_array(bias_tensor, index.data_dir))
        _store(bias_tensor, (factor * bias.astype(np.float64) + shift).astype(bias.dtype))
    else:
        name = names.fresh((conv.name or conv.input[1]) + "/folded_bias")
        index.add_initializer(numpy_helper.from_array(shift.astype(dtype), name))
        while len(conv.input) < 3:
            conv.input.append("")
        conv.input[2] = name
        index.consumers.setdefault(name, []).append(position)
    index.rename_output(position, conv.output[0], consumer.output[0])
    index.remove_node(consumer_position)


def _store(tensor: onnx.TensorProto, array: np.ndarray) -> None:
    """Replace a tensor's values in place, keeping its name."""
    tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))
