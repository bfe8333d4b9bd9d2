r"""Activation statistics: each layer's input vectors on the calibration data.

Whitened factorization (whiten.py) minimizes each layer's output error on real inputs, which
needs, per layer, the mean ``μ`` and covariance ``Σ = E[x xᵀ] − μ μᵀ`` of its input vectors
``x``: a Conv's im2col patches (``layer_vectors``), a Gemm/MatMul's rows.

**Through ONNX Runtime.** A copy of the model exposes every compressible layer's input as an
extra graph output, and the calibration set runs through it in batches
(``sessions.run_batches``). Each batch's activations are turned into input vectors chunk by
chunk (``CHUNK_BYTES``, but at least ``MIN_CHUNK_ROWS`` vectors), so memory stays bounded
whatever the image size. Statistics accumulate in float64 around a pilot mean (the first
chunk's), which avoids cancellation in ``E[x xᵀ] − μ μᵀ``.

**In parallel, on the backend.** The sums and products (accumulate.py) run on the array backend
(NumPy, or CuPy on a GPU). On the CPU the layers of a batch, and once a layer has its pilot
mean, ``SAMPLE_SHARES`` shares of the batch's samples (each into its own fork of the layer's
sums, added up at the end), are spread over the backend's workers with one BLAS thread each.

**Tied weights** (``Layer.tied``: one weight, several nodes). The statistics pool the input
vectors of every node; node ``u`` keeps its own mean ``μ_u``, and ``Σ`` is the covariance
within the nodes, ``Σ_u (n_u/n)·Σ_u`` (``LayerStatistics.use_means``), which is what remains
once each node's bias is corrected with its own mean (whiten.py).

**Memory and time: the cheaper side per group count** (DESIGN.md §7;
``accumulate.plan_statistics``). Statistics are kept only for the candidate group counts the
allocator can use (``calibrate.candidate_groups``), each on its cheaper side: the diagonal
blocks ``Σ_i`` of the input vectors for counts whose groups are narrower than ``f``, the
``f × f`` output covariances ``W_i Σ_i W_iᵀ`` for the others. A tall-kernel conv with
``cκ = 8192`` and ``f = 16`` needs 512 MiB and ``8192²`` multiply-adds per input vector for the
whole ``Σ``, and 30 KiB and ``16·8192 + 15·16²`` on the output side; CREPE full's ``1024 × 64``-tap
conv (``cκ = 65536``, ``f = 128``, 11 counts) takes blocks of 512 groups for 512 and 1024 groups
and the output side for 1 … 256, about three times the layer's own multiply-adds, where the
output side for every count cost fifteen times.

**Row weights: embedding tables and classifier heads.** Some rows of a weight matter more
than others on real data; the factors then minimize a row-weighted output error with
``D = diag(d)``, a positive weight per output row (``f`` values, mean 1; whiten.py). Two kinds
of layer get row weights:

* an **embedding table** (a ``Gather`` layer, ``W = T``): ``d_v`` is how often id ``v`` occurs
  in the calibration inputs (negative ids counted as ``v + vocab``). A lookup ``T[v]`` has no
  input vector to whiten, so its statistics are ``μ = 0``, ``Σ = I``: the error is
  ``E_v ‖T[v] − T̂[v]‖²`` over the ids seen. A table tied with an output MatMul is weighted by
  its lookups alone;
* a **classifier head**: a MatMul/Gemm whose output reaches a graph output through only a
  constant bias ``Add``, ``Cast``/``Identity`` and a last-axis ``Softmax``/``LogSoftmax``
  (``score_output``). ``d_k`` is the probability mass of class ``k`` in that output on the
  calibration data (the softmax of logits, averaged over samples and positions).

Unseen ids and classes must not be destroyed, so the weights are mixed with the uniform ones:
``d = f·((1 − ρ)·p + ρ/f)`` with ``p`` the normalized counts or masses and ``ρ`` the floor
(``row_floor`` for tables, ``ROW_FLOOR`` by default; ``head_floor`` for heads, ``HEAD_FLOOR``
= 1 by default, which turns the weighting off). A row that never occurs
still weighs ``ρ`` times an average row.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import onnx
from numpy.lib.stride_tricks import sliding_window_view

from .accumulate import Accumulator, plan_statistics
from .backend import Backend, numpy_backend
from .config import HEAD_FLOOR, ROW_FLOOR
from .graphs import attribute, overridable_initializers
from .index import ConstantRef, GraphIndex
from .records import LayerStatistics, Side
from .sessions import run_batches
from .spectra import group_counts
from .types import Discovery, Layer, Progress

__all__ = [
    "CHUNK_BYTES",
    "MIN_CHUNK_ROWS",
    "SAMPLE_SHARES",
    "collect_statistics",
    "layer_vectors",
    "row_weights",
    "score_output",
]

log = logging.getLogger(__name__)

#: Largest block of input vectors (im2col patches or rows) built at once, in bytes of float64.
CHUNK_BYTES = 8 * 2**20
#: Shares of each batch's samples, each summed into its own fork of a layer's sums by a worker
#: of its own. A constant, not the worker count, so that the sums, whose rounding depends on
#: their order, are the same on every machine.
SAMPLE_SHARES = 2
#: Fewest input vectors in a chunk, whatever ``CHUNK_BYTES`` says: the products of very wide
#: layers (``c·κ`` in the tens of thousands) run far below speed on a few rows.
MIN_CHUNK_ROWS = 128


# --------------------------------------------------------------------------------------------
# Input vectors: im2col patches and rows


@dataclass(frozen=True)
class _ConvGeometry:
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...]
    auto_pad: str

    @classmethod
    def of(cls, node: onnx.NodeProto, kernel: tuple[int, ...]) -> _ConvGeometry:
        rank = len(kernel)
        auto_pad = attribute(node, "auto_pad", b"NOTSET")
        return cls(
            kernel=kernel,
            strides=tuple(attribute(node, "strides", None) or [1] * rank),
            dilations=tuple(attribute(node, "dilations", None) or [1] * rank),
            pads=tuple(attribute(node, "pads", None) or [0] * (2 * rank)),
            auto_pad=auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad),
        )

    def padding(self, spatial: Sequence[int]) -> list[tuple[int, int]]:
        """(begin, end) padding per spatial axis, resolving ``auto_pad`` like ONNX does."""
        rank = len(self.kernel)
        if self.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            result = []
            for size, k, s, d in zip(
                spatial, self.kernel, self.strides, self.dilations, strict=True
            ):
                total = max(0, (math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size)
                small = total // 2
                result.append(
                    (small, total - small)
                    if self.auto_pad == "SAME_UPPER"
                    else (total - small, small)
                )
            return result
        if self.auto_pad == "VALID":
            return [(0, 0)] * rank
        return list(zip(self.pads[:rank], self.pads[rank:], strict=True))


def layer_vectors(
    layer: Layer,
    node: onnx.NodeProto,
    activation: np.ndarray,
    chunk_bytes: int = CHUNK_BYTES,
    dtype: type[np.floating] = np.float64,
) -> Iterator[np.ndarray]:
    """The layer's input vectors in chunks ``(n, c·κ)`` of ``dtype``, of at most
    ``chunk_bytes`` (counted in float64). The caller may overwrite a chunk; it is valid until
    the next one is drawn (the chunks of one call share a buffer: a fresh 32 MiB array per
    chunk costs as much again in page faults as gathering it).

    A Conv's vectors are its im2col patches: for every sample and output position, the input
    values the kernel reads (with the node's strides, pads or ``auto_pad``, and dilations),
    channel-major ``(c, k1, …, kd)`` like the folded weight's columns. A Gemm's are the rows of
    ``A`` (columns with ``transA``); a MatMul's the last-axis vectors of its input.
    """
    rows = max(1, chunk_bytes // (8 * layer.cols))
    gather = _Gather(layer.cols, dtype)
    if layer.op_type == "Conv":
        yield from _patches(activation, _ConvGeometry.of(node, layer.kernel_shape), rows, gather)
        return
    if layer.op_type == "Gemm" and attribute(node, "transA", 0):
        matrix = activation.T
    else:
        matrix = activation.reshape(-1, layer.in_channels)
    for start in range(0, matrix.shape[0], rows):
        yield gather(matrix[start : start + rows])  # a copy, always


class _Gather:
    """Copies views of vectors into ``(n, cols)`` chunks of ``dtype``, in buffers reused from
    chunk to chunk. Gathering a strided view in its own dtype first is several times faster
    than converting while gathering, so a view of another dtype is gathered, then converted."""

    def __init__(self, cols: int, dtype: type[np.floating]):
        self.cols, self.dtype = cols, np.dtype(dtype)
        self.buffers: dict[np.dtype, np.ndarray] = {}

    def _buffer(self, dtype: np.dtype, count: int) -> np.ndarray:
        buffer = self.buffers.get(dtype)
        if buffer is None or len(buffer) < count:
            buffer = self.buffers[dtype] = np.empty((count, self.cols), dtype)
        return buffer[:count]

    def __call__(self, view: np.ndarray) -> np.ndarray:
        count = view.size // self.cols
        gathered = self._buffer(view.dtype, count)
        np.copyto(gathered.reshape(view.shape), view)
        if view.dtype == self.dtype:
            return gathered
        converted = self._buffer(self.dtype, count)
        np.copyto(converted, gathered)
        return converted


def _patches(
    x: np.ndarray, geometry: _ConvGeometry, rows: int, gather: _Gather
) -> Iterator[np.ndarray]:
    spatial_rank = len(geometry.kernel)
    batch = x.shape[0]
    axes = tuple(range(2, 2 + spatial_rank))
    padded = np.pad(x, [(0, 0), (0, 0), *geometry.padding(x.shape[2:])])
    spans = [(k - 1) * d + 1 for k, d in zip(geometry.kernel, geometry.dilations, strict=True)]
    view = sliding_window_view(padded, spans, axis=axes)  # (b, c, *positions, *spans)
    steps = [slice(None, None, step) for step in (*geometry.strides, *geometry.dilations)]
    view = view[(slice(None), slice(None), *steps)]  # (b, c, *out, *kernel)
    view = np.moveaxis(view, 1, 1 + spatial_rank)  # (b, *out, c, *kernel)
    out = view.shape[1 : 1 + spatial_rank]
    positions = math.prod(out)
    if positions == 0:
        return
    if positions <= rows:
        step = max(1, rows // positions)
        for start in range(0, batch, step):
            yield gather(view[start : start + step])
        return
    per_line = positions // out[0]
    lines = max(1, rows // per_line)
    for sample in range(batch):
        for start in range(0, out[0], lines):
            yield gather(view[sample, start : start + lines])


# --------------------------------------------------------------------------------------------
# Accumulating statistics


def collect_statistics(
    discovery: Discovery,
    feeds: Mapping[str, np.ndarray],
    max_groups: int,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    progress: Progress | None = None,
    *,
    sides: Mapping[str, Side] | None = None,
    groups: Mapping[str, Sequence[int]] | None = None,
    backend: Backend | None = None,
    chunk_bytes: int = CHUNK_BYTES,
    row_floor: float = ROW_FLOOR,
    head_floor: float = HEAD_FLOOR,
    dtype: type[np.floating] | None = None,
) -> dict[str, LayerStatistics]:
    """Run the calibration set through ONNX Runtime and accumulate every layer's statistics.

    Args:
        discovery: the compressible layers of the (analysis) model ``discovery.model``, which
            is the model that runs.
        feeds: calibration inputs (checked with ``calibrate.check_calibration``).
        max_groups: the candidate group counts are ``spectra.group_counts(layer, max_groups)``
            for every layer not in ``groups``.
        providers: ONNX Runtime execution providers.
        progress: called as ``progress("calibrate", samples_done, samples)``.
        sides: force the side of some layers (default: ``plan_statistics`` chooses).
        groups: layer name -> the group counts to keep statistics for (the others are never
            computed; ``calibrate.candidate_groups``).
        backend: where the sums and products run (default: NumPy, one thread per core); the
            layers of a batch are spread over its workers.
        chunk_bytes: largest block of input vectors built at once (but at least
            ``MIN_CHUNK_ROWS`` vectors).
        row_floor: ``ρ`` of the row weights of embedding tables (1: none).
        head_floor: ``ρ`` of the row weights of classifier heads (1: none).
        dtype: of the products within a chunk, for every layer (the sums are float64);
            None: float32 for the layers whose plan costs at least
            ``accumulate.FLOAT32_COST`` multiply-adds per vector, float64 for the others.
    """
    backend = backend or numpy_backend()
    model = discovery.model
    graph = model.graph
    accumulators: dict[str, Accumulator] = {}
    lookups = {
        layer.name: np.zeros(layer.out_channels) for layer in discovery.layers if layer.lookup
    }
    heads: dict[str, tuple[str, str]] = {}
    index = None  # the main graph's, to follow classifier heads to their outputs
    if head_floor < 1:
        index = GraphIndex(graph, overridable=overridable_initializers(model))
    for layer in discovery.layers:
        if layer.lookup:
            log.info("calibration statistics of %s: id counts", layer.name)
            continue
        counts = (groups or {}).get(layer.name) or group_counts(layer, max_groups)
        plan = plan_statistics(layer, [1, *counts], (sides or {}).get(layer.name))
        weight = discovery.weight(layer)  # output partitions, and the shrinkage (accumulate.py)
        accumulators[layer.name] = Accumulator(layer, weight, plan, backend, dtype)
        head = None if index is None else score_output(discovery, layer, index)
        if head is not None:
            heads[layer.name] = head
        log.info(
            "calibration statistics of %s: input blocks of %s groups, output side for %s",
            layer.name,
            plan.blocks,
            plan.output_groups,
        )
    wanted: dict[str, int] = {}
    for layer in discovery.layers:
        for use in layer.uses():
            if use.op_type == "Gather" or not layer.lookup:
                name = _data_input(graph.node[use.node_index], use)
                lookup = use.op_type == "Gather"
                ids_type = discovery.shapes.types.get(name, onnx.TensorProto.INT64)
                wanted[name] = ids_type if lookup else use.weight_dtype
    types = {info.name: info.type.tensor_type.elem_type for info in graph.output}
    wanted.update({output: types[output] for output, _ in heads.values()})
    masses = {name: np.zeros(discovery.layer(name).out_channels) for name in heads}

    def accumulate(
        accumulator: Accumulator, activations: Mapping[str, np.ndarray], part: int, parts: int
    ) -> None:
        layer = accumulator.layer
        limit = max(
            chunk_bytes * layer.cols // accumulator.row_values, 8 * MIN_CHUNK_ROWS * layer.cols
        )
        for use in layer.uses():  # a tied weight pools the inputs of all its nodes
            node = graph.node[use.node_index]
            label = use.name if layer.tied else None
            activation = _sample_part(activations[node.input[0]], use, node, part, parts)
            for vectors in layer_vectors(use, node, activation, limit, accumulator.dtype):
                accumulator.add(vectors, label)

    # Each task owns one accumulator: the layers are independent, and once a layer has its
    # pilot mean, each worker takes its share of a batch's samples into a fork of it.
    forks = {name: [accumulator] for name, accumulator in accumulators.items()}
    with backend.parallel() as executor:  # one BLAS thread per worker on the CPU
        for activations, _ in run_batches(
            model, wanted, feeds, providers, progress, data_dir=discovery.data_dir
        ):
            tasks = []
            for name, accumulator in accumulators.items():
                shares = forks[name]
                parts = SAMPLE_SHARES if accumulator.pilot is not None else 1
                while len(shares) < parts:
                    shares.append(accumulator.fork())
                tasks += [
                    executor.submit(accumulate, shares[part], activations, part, parts)
                    for part in range(parts)
                ]
            for layer in discovery.layers:
                if layer.lookup:
                    for use in layer.uses():
                        if use.op_type == "Gather":
                            ids = activations[_data_input(graph.node[use.node_index], use)]
                            lookups[layer.name] += _id_counts(ids, layer.out_channels)
            for name, (output, kind) in heads.items():
                masses[name] += _class_mass(activations[output], kind)
            for task in tasks:
                task.result()
    for name, accumulator in accumulators.items():
        for share in forks[name][1:]:
            accumulator.merge(share)
    statistics = {name: accumulator.statistics() for name, accumulator in accumulators.items()}
    for name, mass in masses.items():
        statistics[name] = replace(statistics[name], row_weights=row_weights(mass, head_floor))
    for name, counts in lookups.items():
        width = discovery.layer(name).cols
        statistics[name] = LayerStatistics(
            name,
            "input",
            int(counts.sum()),
            np.zeros(width),
            np.ones(width),
            covariance=np.eye(width),
            row_weights=row_weights(counts, row_floor),
        )
    return statistics


def _sample_part(
    activation: np.ndarray, layer: Layer, node: onnx.NodeProto, part: int, parts: int
) -> np.ndarray:
    """Part ``part`` of ``parts`` of a layer input's samples: its first axis (the second for
    a Gemm with ``transA``, whose vectors are columns)."""
    if parts == 1:
        return activation
    axis = 1 if layer.op_type == "Gemm" and attribute(node, "transA", 0) else 0
    if activation.ndim < 2:
        return activation if part == 0 else activation[:0]
    size = activation.shape[axis]
    start, stop = size * part // parts, size * (part + 1) // parts
    return activation[start:stop] if axis == 0 else activation[:, start:stop]


def _data_input(node: onnx.NodeProto, layer: Layer) -> str:
    """The tensor a layer's node reads its data from: a Gather's ids, the others' input."""
    return node.input[1] if layer.op_type == "Gather" else node.input[0]


def _id_counts(ids: np.ndarray, vocab: int) -> np.ndarray:
    """How often each row of a ``vocab``-row table is looked up; negative ids count from the
    end, as in ONNX."""
    flat = np.asarray(ids, dtype=np.int64).reshape(-1)
    flat = np.where(flat < 0, flat + vocab, flat)
    flat = flat[(flat >= 0) & (flat < vocab)]
    return np.bincount(flat, minlength=vocab).astype(np.float64)


def row_weights(mass: np.ndarray, floor: float = ROW_FLOOR) -> np.ndarray:
    """``d = f·((1 − ρ)·p + ρ/f)``: the normalized ``mass`` mixed with uniform weights by the
    floor ``ρ`` (mean 1; all ones when ``ρ = 1`` or nothing was seen)."""
    rows = len(mass)
    total = float(np.sum(mass))
    if total <= 0 or floor >= 1:
        return np.ones(rows)
    return rows * ((1.0 - floor) * mass / total + floor / rows)


#: Operators between a classifier head and its score output (score_output).
_SCORE_PATH = {"Add", "Identity", "Cast", "Softmax", "LogSoftmax"}


def score_output(
    discovery: Discovery, layer: Layer, index: GraphIndex | None = None
) -> tuple[str, str] | None:
    """``(graph output, kind)`` when ``layer`` is a classifier head: a main-graph MatMul or
    Gemm (one node) whose output reaches a graph output through only a constant bias ``Add``,
    ``Cast``/``Identity`` and a ``Softmax``/``LogSoftmax`` over the last (class) axis. ``kind``
    is ``"logits"``, ``"probabilities"`` or ``"log-probabilities"``; else None. ``index`` is
    the main graph's ``GraphIndex`` (built when None)."""
    if layer.op_type not in ("MatMul", "Gemm") or layer.tied or layer.graph_path:
        return None
    model = discovery.model
    graph = model.graph
    if index is None:
        index = GraphIndex(graph, overridable=overridable_initializers(model))
    tensor, kind = graph.node[layer.node_index].output[0], "logits"
    for _ in range(len(graph.node)):
        if tensor in index.graph_outputs:
            shape = discovery.shapes.get(tensor)
            if shape is None or not shape or shape[-1] != layer.out_channels:
                return None
            return tensor, kind
        readers = index.consumers.get(tensor, [])
        if len(set(readers)) != 1 or graph.node[readers[0]].domain not in ("", "ai.onnx"):
            return None
        node = graph.node[readers[0]]
        if node.op_type not in _SCORE_PATH or (kind != "logits" and node.op_type != "Cast"):
            return None
        if node.op_type == "Add":
            other = node.input[1] if node.input[0] == tensor else node.input[0]
            if not isinstance(index.resolve(other), ConstantRef):
                return None
        if node.op_type in ("Softmax", "LogSoftmax"):
            # the rank of its input, or of its output when inference stopped before it
            shape = discovery.shapes.get(tensor) or discovery.shapes.get(node.output[0])
            axis = attribute(node, "axis", -1 if _opset(model) >= 13 else 1)
            if shape is None or axis % len(shape) != len(shape) - 1:
                return None
            kind = "probabilities" if node.op_type == "Softmax" else "log-probabilities"
        tensor = node.output[0]
    return None


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def _class_mass(scores: np.ndarray, kind: str) -> np.ndarray:
    """Probability mass of each class (last axis) summed over every sample and position."""
    values = np.asarray(scores, dtype=np.float64)
    values = values.reshape(-1, values.shape[-1])
    if kind == "logits":
        values = np.exp(values - values.max(axis=1, keepdims=True))
        values /= values.sum(axis=1, keepdims=True)
    elif kind == "log-probabilities":
        values = np.exp(values)
    return values.sum(axis=0)
