r"""Calibration-aware compression: keep each layer's outputs on real data, not its weights.

Data-free factorization minimizes ``‖W − Ŵ‖``. Given real inputs, we minimize instead the error
of each layer's *outputs* on them (the idea of ASVD and SVD-LLM). Let ``x`` be the layer's input
vectors (a Conv's im2col patches, a Gemm/MatMul's rows), with mean ``μ`` and covariance ``Σ``.
The layer computes ``y = α·W x + b``; we want a rank-limited ``Ŵ`` and a bias ``b'`` with

    min E‖(α·W x + b) − (α·Ŵ x + b')‖².

**Bias correction.** For any ``Ŵ`` the best bias is ``b' = b + α·(W − Ŵ) μ``, and what remains
is ``α² · E‖(W − Ŵ)(x − μ)‖² = α² · ‖(W − Ŵ) S‖_F²`` with ``S Sᵀ = Σ``. So the whitening uses
the *centred* second moment ``Σ = E[x xᵀ] − μ μᵀ``; with the bias corrected, this is the exact
optimum, and it is never worse than whitening with the raw second moment ``E[x xᵀ]``.

**Tied weights** (``Layer.tied``: one weight, several nodes). The statistics pool the input
vectors of every node; node ``u`` keeps its own mean ``μ_u`` and bias correction
``b'_u = b_u + α_u·(W − Ŵ) μ_u``, so what remains is ``Σ_u E‖(W − Ŵ)(x_u − μ_u)‖²`` and ``Σ`` is
the covariance within the nodes, ``Σ_u (n_u/n)·Σ_u`` (``LayerStatistics.use_means``).

**Whitened factors, per channel group** (DESIGN.md §2, §7). Group ``i`` reads the block
``W_i`` (``f × (c/g)κ``) and the diagonal block ``Σ_i`` of ``Σ``. Take ``S_i`` with
``S_i S_iᵀ = Σ_i + λI`` (Cholesky), the damping being ``λ = DAMPING · tr(Σ) / (c·κ)`` (the mean
input variance times ``DAMPING``), so that inputs that never vary (dead ReLUs, zero padding)
keep ``S_i`` invertible. With the SVD ``W_i S_i = A Λ Bᵀ``, the best rank-``r`` approximation
``A_r Λ_r B_rᵀ`` maps back to

    Ŵ_i = A_r Λ_r B_rᵀ S_i⁻¹ = A_r A_rᵀ W_i        (since Λ_r B_rᵀ = A_rᵀ W_i S_i),

so no inverse is ever formed: ``U_i = A_r`` and ``V_i = A_rᵀ W_i``, rescaled per rank-one term
so that both have the same norm (fp16-friendly, like factorize.py's ``√Σ`` split). ``A_r`` are
also the top eigenvectors of the ``f × f`` matrix ``W_i (Σ_i + λI) W_iᵀ``; its eigenvalues are the
``λ_j(W_i S_i)²``. At full rank ``Ŵ_i = W_i``.

**Memory and time: the cheaper side per layer** (DESIGN.md §7). The input side keeps ``Σ``
(``cκ × cκ``), from which every candidate group count reads its blocks. The output side keeps,
for each candidate group count ``g``, the ``g`` matrices ``W_i Σ_i W_iᵀ = Cov(W_i x_i)``
(``f × f`` each), accumulated from the partial outputs ``z_i = W_i x_i``. A tall-kernel conv
with ``cκ = 8192`` and ``f = 16`` needs 512 MiB and ``8192²`` multiply-adds per input vector on
the input side, and 30 KiB and ``16·8192 + 15·16²`` on the output side. ``choose_side`` picks.

**Error tables.** The relative output error of a candidate, estimated from the whitened singular
values ``s_{i,j}`` of each ``W_i S_i``, is

    ε_out(g, r) = sqrt(Σ_i Σ_{j>r} s_{i,j}²) / ‖W S‖_F,

where ``‖W S‖_F² = tr(W (Σ + λI) Wᵀ)`` is the spread of the layer's output around its mean. For
``g = 1`` it is exact (up to ``λ``); for ``g > 1`` it leaves out the cross-group terms
``tr(E_i Σ_ij E_jᵀ)``, so it is exact when the groups' inputs are uncorrelated. The errors
measured after compression (``measure_output_errors``) are reported next to it.

**Row weights: embedding tables and classifier heads.** Some rows of a weight matter more
than others on real data. With ``D = diag(d)`` a positive weight per output row (``f`` values,
mean 1), the factors minimize the weighted output error ``‖D^{1/2}(W − Ŵ) S‖_F``: the same
whitened SVD of ``D^{1/2} W_i S_i`` with top left singular vectors ``A_r``, mapped back as

    U_i = D^{-1/2} A_r,    V_i = A_rᵀ D^{1/2} W_i,

so ``Ŵ_i = D^{-1/2} A_r A_rᵀ D^{1/2} W_i`` (``W_i`` itself at full rank), and the error tables
use the singular values of ``D^{1/2} W_i S_i``. Two kinds of layer get row weights:

* an **embedding table** (a ``Gather`` layer, ``W = T``): ``d_v`` is how often id ``v`` occurs
  in the calibration inputs (negative ids counted as ``v + vocab``). A lookup ``T[v]`` has no
  input vector to whiten, so ``S = I``: the error is ``E_v ‖T[v] − T̂[v]‖²`` over the ids seen.
  A table tied with an output MatMul is weighted by its lookups alone;
* a **classifier head**: a MatMul/Gemm whose output reaches a graph output through only a
  constant bias ``Add``, ``Cast``/``Identity`` and a last-axis ``Softmax``/``LogSoftmax``.
  ``d_k`` is the probability mass of class ``k`` in that output on the calibration data (the
  softmax of logits, averaged over samples and positions).

Unseen ids and classes must not be destroyed, so the weights are mixed with the uniform ones:
``d = f·((1 − ρ)·p + ρ/f)`` with ``p`` the normalized counts or masses and ``ρ`` the floor
(``row_floor`` for tables, ``ROW_FLOOR`` by default; ``head_floor`` for heads, ``HEAD_FLOOR``
= 1 by default, which turns the weighting off). A row that never occurs
still weighs ``ρ`` times an average row.

**Activation statistics through ONNX Runtime.** A copy of the model exposes every compressible
layer's input as an extra graph output; the calibration set runs through it in batches, and each
batch's activations are turned into input vectors chunk by chunk (``CHUNK_BYTES``), so memory
stays bounded whatever the image size. Statistics accumulate in float64 around a pilot mean (the
first chunk's), which avoids cancellation in ``E[x xᵀ] − μ μᵀ``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import onnx
from numpy.lib.stride_tricks import sliding_window_view

from .config import HEAD_FLOOR, ROW_FLOOR
from .data import read_arrays
from .errors import CalibrationError
from .factorize import reconstruct
from .graphs import FreshNames, attribute, overridable_initializers, tensor_to_array
from .records import CalibratedLayer, Calibration, LayerStatistics, OutputErrors, Side
from .sessions import make_session
from .spectra import group_counts
from .types import CandidateTable, Discovery, Factors, Layer, LayerSpectrum, Progress
from .validate import check_feeds, graph_inputs

__all__ = [
    "CHUNK_BYTES",
    "ROW_FLOOR",
    "calibrate",
    "check_calibration",
    "choose_side",
    "collect_statistics",
    "factorize_layers",
    "layer_vectors",
    "load_calibration",
    "measure_output_errors",
    "output_error_table",
    "row_weights",
    "score_output",
    "whitened_factors",
    "whitened_singular_values",
    "whitened_spectra",
    "with_bias_cost",
    "with_output_errors",
]

log = logging.getLogger(__name__)

#: Largest block of input vectors (im2col patches or rows) built at once, in bytes of float64.
CHUNK_BYTES = 8 * 2**20
#: Target bytes of the activations one ONNX Runtime batch exposes.
ACTIVATION_BYTES = 256 * 2**20
#: Most samples per ONNX Runtime batch.
MAX_BATCH = 64
#: Largest input-side matrix ``Σ`` kept for one layer; beyond it the output side is used.
MAX_INPUT_SIDE_BYTES = 512 * 2**20
#: Most channel slices whose partial outputs the output side computes at once.
MAX_ATOMS = 64


# --------------------------------------------------------------------------------------------
# Calibration data


def load_calibration(path: str | os.PathLike, model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Read calibration data (``.npz``, ``.npy`` or a folder of ``.npy``: ``data.read_arrays``)
    and check it against the model's inputs.

    Raises:
        CalibrationError: the file cannot be read or does not match the model.
    """
    label = f"--calibration {path}"  # checked against the model before the data is read
    feeds = read_arrays(path, model, "--calibration", lambda a: check_calibration(model, a, label))
    check_calibration(model, feeds, label)
    return feeds


def check_calibration(
    model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], label: str = "calibration data"
) -> int:
    """Check calibration arrays: one per model input, batch first, equal batch sizes.

    Names, dtypes and every fixed dimension must match the model's inputs. A model whose
    inputs declare a fixed batch ``B`` gets batches of ``B``, so the sample count must be a
    multiple of ``B``.

    Returns:
        The number of samples.

    Raises:
        CalibrationError: naming the first mismatch and the fix.
    """
    if not feeds:
        raise CalibrationError(f"{label} holds no arrays; save one array per model input")
    scalars = sorted(name for name, array in feeds.items() if np.ndim(array) == 0)
    if scalars:
        raise CalibrationError(
            f"{label}: {', '.join(scalars)} must have a leading batch dimension, not be a scalar"
        )
    sizes = {name: int(array.shape[0]) for name, array in feeds.items()}
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{name} has {size}" for name, size in sorted(sizes.items()))
        raise CalibrationError(
            f"{label}: arrays disagree on the batch (first) dimension ({listed}); "
            "give every input the same number of samples"
        )
    samples = next(iter(sizes.values()))
    if samples == 0:
        raise CalibrationError(f"{label} holds 0 samples; give at least one")
    batch = fixed_batch(model)
    view = dict(feeds)
    if batch is not None and samples != batch:
        if samples % batch:
            raise CalibrationError(
                f"{label}: the model's inputs have a fixed batch of {batch}, so the number of "
                f"samples must be a multiple of it; got {samples}"
            )
        view = {name: array[:batch] for name, array in feeds.items()}
        label = f"{label} (in batches of {batch})"
    check_feeds(model, view, label)
    for name, array in feeds.items():
        if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
            raise CalibrationError(f"{label}: input {name!r} contains NaN or Inf values")
    return samples


def fixed_batch(model: onnx.ModelProto) -> int | None:
    """The batch size the model's inputs fix in their first dimension, or None when dynamic."""
    sizes = set()
    for info in graph_inputs(model):
        dims = info.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
            sizes.add(dims[0].dim_value)
    return min(sizes) if sizes else None


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
    layer: Layer, node: onnx.NodeProto, activation: np.ndarray, chunk_bytes: int = CHUNK_BYTES
) -> Iterator[np.ndarray]:
    """The layer's input vectors in float64 chunks ``(n, c·κ)`` of at most ``chunk_bytes``.

    A Conv's vectors are its im2col patches: for every sample and output position, the input
    values the kernel reads (with the node's strides, pads or ``auto_pad``, and dilations),
    channel-major ``(c, k1, …, kd)`` like the folded weight's columns. A Gemm's are the rows of
    ``A`` (columns with ``transA``); a MatMul's the last-axis vectors of its input.
    """
    rows = max(1, chunk_bytes // (8 * layer.cols))
    if layer.op_type == "Conv":
        yield from _patches(activation, _ConvGeometry.of(node, layer.kernel_shape), rows)
        return
    if layer.op_type == "Gemm" and attribute(node, "transA", 0):
        matrix = activation.T
    else:
        matrix = activation.reshape(-1, layer.in_channels)
    for start in range(0, matrix.shape[0], rows):
        yield np.asarray(matrix[start : start + rows], dtype=np.float64)


def _patches(x: np.ndarray, geometry: _ConvGeometry, rows: int) -> Iterator[np.ndarray]:
    spatial_rank = len(geometry.kernel)
    batch, channels = x.shape[:2]
    axes = tuple(range(2, 2 + spatial_rank))
    padded = np.pad(x, [(0, 0), (0, 0), *geometry.padding(x.shape[2:])])
    spans = [(k - 1) * d + 1 for k, d in zip(geometry.kernel, geometry.dilations, strict=True)]
    view = sliding_window_view(padded, spans, axis=axes)  # (b, c, *positions, *spans)
    steps = [slice(None, None, step) for step in (*geometry.strides, *geometry.dilations)]
    view = view[(slice(None), slice(None), *steps)]  # (b, c, *out, *kernel)
    view = np.moveaxis(view, 1, 1 + spatial_rank)  # (b, *out, c, *kernel)
    out = view.shape[1 : 1 + spatial_rank]
    cols = channels * math.prod(geometry.kernel)
    positions = math.prod(out)
    if positions == 0:
        return
    if positions <= rows:
        step = max(1, rows // positions)
        for start in range(0, batch, step):
            yield _float64(view[start : start + step], cols)
        return
    per_line = positions // out[0]
    lines = max(1, rows // per_line)
    for sample in range(batch):
        for start in range(0, out[0], lines):
            yield _float64(view[sample, start : start + lines], cols)


def _float64(view: np.ndarray, cols: int) -> np.ndarray:
    # Gathering the strided view in its own dtype first is several times faster than
    # converting while gathering.
    return np.ascontiguousarray(view).reshape(-1, cols).astype(np.float64)


# --------------------------------------------------------------------------------------------
# Accumulating statistics


def choose_side(layer: Layer, groups: Sequence[int]) -> Side:
    """The cheaper side for ``layer`` (DESIGN.md §7).

    Per input vector the input side costs ``(cκ)²`` multiply-adds, in one large product, and
    stores ``(cκ)²`` values; the output side costs ``f·cκ + Σ_g g·f²`` in smaller products,
    which run about half as fast, and stores ``Σ_g g·f²``. The output side is taken when it is
    cheaper by that measure, or when ``Σ`` would exceed ``MAX_INPUT_SIDE_BYTES``.
    """
    f, cols = layer.out_channels, layer.cols
    output_cost = 2 * (f * cols + sum(g * f * f for g in groups))
    too_large = 8 * cols * cols > MAX_INPUT_SIDE_BYTES
    if f < cols and (output_cost < cols * cols or too_large):
        return "output"
    return "input"


class _Accumulator:
    """Running sums of one layer's input vectors, shifted by a pilot mean ``m``."""

    def __init__(self, layer: Layer, weight: np.ndarray, groups: Sequence[int], side: Side):
        self.layer, self.side, self.groups = layer, side, list(groups)
        cols = layer.cols
        #: float64 values held per input vector while it is processed
        self.row_values = cols
        self.count = 0
        self.pilot: np.ndarray | None = None
        self.total = np.zeros(cols)
        self.squares = np.zeros(cols)
        self.weight = weight
        self.use_sums: dict[str, np.ndarray] = {}  # node name -> Σ x, for tied uses
        self.use_counts: dict[str, int] = {}
        if side == "input":
            self.outer = np.zeros((cols, cols))
            return
        # Partial outputs W_a x_a of the finest common refinement of all candidate groupings:
        # atom a covers channels [a·c/L, (a+1)·c/L) with L = lcm(groups), which every g
        # divides, and a group's partial output is the sum of its atoms'. When L is large
        # (many divisors), each group count gets its own partition instead.
        f = layer.out_channels
        atoms = math.lcm(*self.groups)
        self.plans = (
            [(atoms, self.groups)] if atoms <= MAX_ATOMS else [(g, [g]) for g in self.groups]
        )
        self.row_values = max(cols, max(count for count, _ in self.plans) * f)
        self.atom_weights = {
            count: np.ascontiguousarray(weight.reshape(f, count, -1).transpose(1, 2, 0))
            for count, _ in self.plans
        }  # (L, width, f) per partition
        self.pilot_partial: dict[int, np.ndarray] = {}
        self.partial_total = {g: np.zeros((g, f)) for g in self.groups}
        self.partial_outer = {g: np.zeros((g, f, f)) for g in self.groups}

    def add(self, vectors: np.ndarray, use: str | None = None) -> None:
        n = len(vectors)
        raw_sum = vectors.sum(axis=0)
        if use is not None:
            self.use_sums[use] = self.use_sums.get(use, 0.0) + raw_sum
            self.use_counts[use] = self.use_counts.get(use, 0) + n
        if self.pilot is None:
            self.pilot = vectors.mean(axis=0)
            if self.side == "output":
                for count, weights in self.atom_weights.items():  # W_a m_a, (L, 1, f)
                    self.pilot_partial[count] = _bmm(self.pilot.reshape(count, 1, -1), weights)
        pilot = self.pilot
        self.count += n
        self.total += raw_sum - n * pilot
        # Σ (x − m)² = Σ x² − 2 m Σ x + n m²; only the damping scale reads it.
        self.squares += np.einsum("nk,nk->k", vectors, vectors) - 2 * pilot * raw_sum
        self.squares += n * pilot * pilot
        if self.side == "input":
            shifted = vectors - pilot
            self.outer += shifted.T @ shifted
            return
        for count, derived in self.plans:
            width = self.layer.cols // count
            weights = self.atom_weights[count]
            # W_a (x_a − m_a), (L, n, f); a loop: numpy's stacked matmul is far slower here
            partial = np.stack(
                [vectors[:, a * width : (a + 1) * width] @ weights[a] for a in range(count)]
            )
            partial -= self.pilot_partial[count]
            for g in derived:  # a group's partial output sums its atoms': (g, n, f)
                z = partial if g == count else partial.reshape(g, count // g, n, -1).sum(axis=1)
                self.partial_total[g] += z.sum(axis=1)
                self.partial_outer[g] += _bmm(z.transpose(0, 2, 1), z)

    def statistics(self) -> LayerStatistics:
        n = max(self.count, 1)
        pilot = self.pilot if self.pilot is not None else np.zeros_like(self.total)
        shift = self.total / n
        mean = pilot + shift
        variance = self.squares / n - shift * shift
        name = self.layer.name
        # Tied uses: remove the scatter of the uses' means around the pooled mean (``d_u``),
        # which leaves the covariance within the uses (see LayerStatistics.use_means).
        use_means = {u: total / max(self.use_counts[u], 1) for u, total in self.use_sums.items()}
        spread = [(self.use_counts[u] / n, m - mean) for u, m in use_means.items()]
        spread = spread if len(spread) > 1 else []
        for weight, d in spread:
            variance -= weight * d * d
        variance = np.maximum(variance, 0.0)
        use_means = use_means if spread else {}
        if self.side == "input":
            covariance = self.outer / n - np.outer(shift, shift)
            for weight, d in spread:
                covariance -= weight * np.outer(d, d)
            covariance = (covariance + covariance.T) / 2
            return LayerStatistics(
                name,
                "input",
                self.count,
                mean,
                variance,
                covariance=covariance,
                use_means=use_means,
            )
        output = {}
        f = self.layer.out_channels
        for g in self.groups:
            partial_mean = self.partial_total[g] / n  # (g, f)
            matrix = self.partial_outer[g] / n - partial_mean[:, :, None] * partial_mean[:, None, :]
            blocks = self.weight.reshape(f, g, -1).transpose(1, 0, 2)  # (g, f, width)
            for weight, d in spread:
                wd = np.einsum("gfw,gw->gf", blocks, d.reshape(g, -1))  # W_i d_i
                matrix -= weight * wd[:, :, None] * wd[:, None, :]
            output[g] = (matrix + matrix.transpose(0, 2, 1)) / 2
        return LayerStatistics(
            name,
            "output",
            self.count,
            mean,
            variance,
            output_covariance=output,
            use_means=use_means,
        )


def collect_statistics(
    discovery: Discovery,
    feeds: Mapping[str, np.ndarray],
    max_groups: int,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    progress: Progress | None = None,
    *,
    sides: Mapping[str, Side] | None = None,
    chunk_bytes: int = CHUNK_BYTES,
    row_floor: float = ROW_FLOOR,
    head_floor: float = HEAD_FLOOR,
) -> dict[str, LayerStatistics]:
    """Run the calibration set through ONNX Runtime and accumulate every layer's statistics.

    Args:
        discovery: the compressible layers of the (analysis) model ``discovery.model``, which
            is the model that runs.
        feeds: calibration inputs (checked with ``check_calibration``).
        max_groups: the candidate group counts are ``spectra.group_counts(layer, max_groups)``.
        providers: ONNX Runtime execution providers.
        progress: called as ``progress("calibrate", samples_done, samples)``.
        sides: force the side of some layers (default: ``choose_side``).
        chunk_bytes: largest block of input vectors built at once.
        row_floor: ``ρ`` of the row weights of embedding tables (1: none).
        head_floor: ``ρ`` of the row weights of classifier heads (1: none).
    """
    model = discovery.model
    graph = model.graph
    accumulators: dict[str, _Accumulator] = {}
    lookups = {
        layer.name: np.zeros(layer.out_channels) for layer in discovery.layers if layer.lookup
    }
    heads: dict[str, tuple[str, str]] = {}
    for layer in discovery.layers:
        if layer.lookup:
            log.info("calibration statistics of %s: id counts", layer.name)
            continue
        groups = group_counts(layer, max_groups)
        side = (sides or {}).get(layer.name) or choose_side(layer, groups)
        weight = discovery.weight(layer) if side == "output" else np.empty(0)
        accumulators[layer.name] = _Accumulator(layer, weight, groups, side)
        head = None if head_floor >= 1 else score_output(discovery, layer)
        if head is not None:
            heads[layer.name] = head
        log.info("calibration statistics of %s on the %s side", layer.name, side)
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
    for activations, _ in _run_batches(
        model, wanted, feeds, providers, progress, data_dir=discovery.data_dir
    ):
        for layer in discovery.layers:
            if layer.lookup:
                for use in layer.uses():
                    if use.op_type == "Gather":
                        ids = activations[_data_input(graph.node[use.node_index], use)]
                        lookups[layer.name] += _id_counts(ids, layer.out_channels)
                continue
            accumulator = accumulators[layer.name]
            limit = chunk_bytes * layer.cols // accumulator.row_values
            for use in layer.uses():  # a tied weight pools the inputs of all its nodes
                node = graph.node[use.node_index]
                label = use.name if layer.tied else None
                for vectors in layer_vectors(use, node, activations[node.input[0]], limit):
                    accumulator.add(vectors, label)
        for name, (output, kind) in heads.items():
            masses[name] += _class_mass(activations[output], kind)
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


def score_output(discovery: Discovery, layer: Layer) -> tuple[str, str] | None:
    """``(graph output, kind)`` when ``layer`` is a classifier head: a main-graph MatMul or
    Gemm (one node) whose output reaches a graph output through only a constant bias ``Add``,
    ``Cast``/``Identity`` and a ``Softmax``/``LogSoftmax`` over the last (class) axis. ``kind``
    is ``"logits"``, ``"probabilities"`` or ``"log-probabilities"``; else None."""
    if layer.op_type not in ("MatMul", "Gemm") or layer.tied or layer.graph_path:
        return None
    graph = discovery.model.graph
    outputs = {info.name for info in graph.output}
    tensor, kind = graph.node[layer.node_index].output[0], "logits"
    for _ in range(len(graph.node)):
        if tensor in outputs:
            shape = discovery.shapes.get(tensor)
            if shape is None or not shape or shape[-1] != layer.out_channels:
                return None
            return tensor, kind
        readers = [node for node in graph.node if tensor in node.input]
        if len(readers) != 1 or readers[0].domain not in ("", "ai.onnx"):
            return None
        node = readers[0]
        if node.op_type not in _SCORE_PATH or (kind != "logits" and node.op_type != "Cast"):
            return None
        if node.op_type == "Add":
            other = node.input[1] if node.input[0] == tensor else node.input[0]
            if _constant(graph, other) is None:
                return None
        if node.op_type in ("Softmax", "LogSoftmax"):
            # the rank of its input, or of its output when inference stopped before it
            shape = discovery.shapes.get(tensor) or discovery.shapes.get(node.output[0])
            axis = attribute(node, "axis", -1 if _opset(discovery.model) >= 13 else 1)
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


# --------------------------------------------------------------------------------------------
# ONNX Runtime passes


def _exposed(model: onnx.ModelProto, outputs: Mapping[str, int]) -> onnx.ModelProto:
    """A copy of ``model`` with the tensors ``outputs`` (name -> element type) as graph outputs."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    present = {info.name for info in copy.graph.output}
    present |= {info.name for info in graph_inputs(copy)}
    for name, elem_type in outputs.items():
        if name not in present:
            copy.graph.output.append(onnx.helper.make_tensor_value_info(name, elem_type, None))
    return copy


def _session(
    model: onnx.ModelProto,
    providers: Sequence[str],
    data_dir: str | os.PathLike | None = None,
):
    """An ONNX Runtime session of ``model``; ``data_dir`` is the folder of a lazily loaded
    model whose weights are still in its external data files (``sessions.make_session``)."""
    # ONNX Runtime never fuses away a node whose output is a graph output, so the exposed
    # tensors are the original graph's; full optimization runs EfficientNet-Lite0 2.4x faster
    # than none, with the same exposed values to 1e-5 (checked on the MNIST CNN, CREPE and
    # EfficientNet-Lite0).
    return make_session(model, providers, log_level=3, data_dir=data_dir)


def _run_batches(
    model: onnx.ModelProto,
    wanted: Mapping[str, int],
    feeds: Mapping[str, np.ndarray],
    providers: Sequence[str],
    progress: Progress | None,
    stage: str = "calibrate",
    other: onnx.ModelProto | None = None,
    other_wanted: Sequence[str] = (),
    *,
    data_dir: str | os.PathLike | None = None,
    other_data_dir: str | os.PathLike | None = None,
) -> Iterator[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """Yield, per batch, the ``wanted`` tensors (name -> element type) of ``model`` and
    ``other_wanted`` of ``other``.

    Both models run on the same batch. Batches have the model's fixed batch size, or else grow
    from one sample to what fits in ``ACTIVATION_BYTES`` (at most ``MAX_BATCH``). ``data_dir``
    and ``other_data_dir`` are the folders of models whose weights are still in external files.
    """
    session = _session(_exposed(model, wanted), providers, data_dir)
    second = None
    if other is not None:
        other_types = {name: wanted[name] for name in other_wanted}
        second = _session(_exposed(other, other_types), providers, other_data_dir)
    samples = int(next(iter(feeds.values())).shape[0])
    fixed = fixed_batch(model)
    size = fixed or 1
    start = 0
    while start < samples:
        batch = {name: np.asarray(array[start : start + size]) for name, array in feeds.items()}
        fetch = [name for name in wanted if name not in batch]
        # an empty fetch list would make ONNX Runtime return every output
        values = session.run(fetch, batch) if fetch else []
        activations = dict(zip(fetch, values, strict=True))
        activations.update({name: batch[name] for name in wanted if name in batch})
        others = {}
        if second is not None:
            others = dict(zip(other_wanted, second.run(list(other_wanted), batch), strict=True))
        done = min(start + size, samples)
        yield activations, others
        if progress is not None:
            progress(stage, done, samples)
        if fixed is None:
            taken = sum(value.nbytes for value in activations.values()) / (done - start)
            size = int(min(MAX_BATCH, max(1, ACTIVATION_BYTES // max(taken, 1.0))))
        start = done


# --------------------------------------------------------------------------------------------
# Whitened spectra and factors


def _bmm(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Stacked matrix product as a loop: numpy's stacked ``matmul`` is often not BLAS-backed."""
    return np.stack([a @ b for a, b in zip(first, second, strict=True)])


def _blocks(weight: np.ndarray, groups: int) -> np.ndarray:
    rows, cols = weight.shape
    return weight.reshape(rows, groups, cols // groups).transpose(1, 0, 2)  # (g, f, w)


def _diagonal_blocks(matrix: np.ndarray, groups: int) -> np.ndarray:
    width = matrix.shape[0] // groups
    return np.stack(
        [matrix[i * width : (i + 1) * width, i * width : (i + 1) * width] for i in range(groups)]
    )


def _output_gram(blocks: np.ndarray, stats: LayerStatistics, groups: int) -> np.ndarray:
    """``D^{1/2} W_i (Σ_i + λI) W_iᵀ D^{1/2}`` per group, ``(g, f, f)`` (``D = I`` without
    row weights)."""
    damping = stats.damping * _bmm(blocks, blocks.transpose(0, 2, 1))
    if stats.side == "output":
        if stats.output_covariance is None or groups not in stats.output_covariance:
            raise ValueError(f"no output-side statistics of {stats.name} for {groups} groups")
        gram = stats.output_covariance[groups] + damping
    else:
        sigma = _diagonal_blocks(stats.covariance, groups)
        gram = _bmm(_bmm(blocks, sigma), blocks.transpose(0, 2, 1)) + damping
    if stats.row_weights is None:
        return gram
    root = np.sqrt(stats.row_weights)
    return gram * root[:, None] * root[None, :]


def _whitened_blocks(blocks: np.ndarray, stats: LayerStatistics, groups: int) -> np.ndarray:
    """``D^{1/2} W_i S_i`` per group with ``S_i S_iᵀ = Σ_i + λI`` (Cholesky), ``(g, f, w)``."""
    sigma = _diagonal_blocks(stats.covariance, groups)
    sigma = sigma + stats.damping * np.eye(sigma.shape[-1])
    return _bmm(_weighted(blocks, stats), np.linalg.cholesky(sigma))


def _weighted(blocks: np.ndarray, stats: LayerStatistics) -> np.ndarray:
    """``D^{1/2} W_i`` per group."""
    if stats.row_weights is None:
        return blocks
    return blocks * np.sqrt(stats.row_weights)[:, None]


def _uses_output_gram(stats: LayerStatistics, rows: int, width: int) -> bool:
    """Work with the ``f × f`` matrices (output side, or ``f ≤ w``), else with ``W_i S_i``."""
    return stats.side == "output" or rows <= width


def whitened_singular_values(weight: np.ndarray, stats: LayerStatistics, groups: int) -> np.ndarray:
    """Singular values of every ``W_i S_i``, ``(g, min(f, c·κ/g))``, each row descending."""
    blocks = _blocks(weight, groups)
    _, rows, width = blocks.shape
    if _uses_output_gram(stats, rows, width):
        eigenvalues = np.linalg.eigvalsh(_output_gram(blocks, stats, groups))
    else:
        whitened = _whitened_blocks(blocks, stats, groups)
        eigenvalues = np.linalg.eigvalsh(_bmm(whitened.transpose(0, 2, 1), whitened))
    values = np.sqrt(np.clip(eigenvalues, 0.0, None))[:, ::-1]
    return np.ascontiguousarray(values[:, : min(rows, width)])


def whitened_spectra(
    discovery: Discovery,
    statistics: Mapping[str, LayerStatistics],
    max_groups: int,
) -> dict[str, LayerSpectrum]:
    """Whitened singular values of every layer for each candidate group count.

    The spectra have the layout of spectra.py's (``frobenius_sq`` is ``‖W S‖_F²``), so the
    solvers' tables can be built from them with ``output_error_table``.
    """
    result = {}
    for layer in discovery.layers:
        weight = discovery.weight(layer)
        stats = statistics[layer.name]
        by_groups = {
            g: whitened_singular_values(weight, stats, g) for g in group_counts(layer, max_groups)
        }
        result[layer.name] = LayerSpectrum(
            name=layer.name,
            spectral_norm=float(by_groups[1][0, 0]),
            frobenius_sq=float(np.sum(by_groups[1] ** 2)),
            singular_values=by_groups,
        )
    return result


def output_error_table(spectrum: LayerSpectrum, groups: int) -> np.ndarray:
    """``ε_out(g, r) = sqrt(Σ_i Σ_{j>r} s_{i,j}²) / ‖W S‖_F`` for ``r = 0 … k`` (index = rank).

    Args:
        spectrum: whitened spectra of the layer (``whitened_spectra``).
        groups: ``g``.
    """
    values = spectrum.singular_values[groups]
    total = spectrum.frobenius_sq
    squares = np.sum(values * values, axis=0)  # (k,) summed over groups
    tails = np.append(np.cumsum(squares[::-1])[::-1], 0.0)  # tails[r] = Σ_{j>r}
    if total <= 0.0:
        return np.zeros(values.shape[1] + 1)
    return np.sqrt(tails / total)


def with_output_errors(table: CandidateTable, spectrum: LayerSpectrum) -> CandidateTable:
    """The same candidates with their errors replaced by ``ε_out(g, r)``."""
    cache: dict[int, np.ndarray] = {}
    errors = np.zeros(len(table))
    for row in range(len(table)):
        g = int(table.groups[row])
        if g == 0:
            continue
        if g not in cache:
            cache[g] = output_error_table(spectrum, g)
        errors[row] = cache[g][int(table.ranks[row])]
    return replace(table, errors=errors)


def with_bias_cost(table: CandidateTable, layer: Layer, graph: onnx.GraphProto) -> CandidateTable:
    """Count the bias that bias correction adds to each node of a layer without one (``f``
    parameters each; a tied weight's nodes each get their own).

    Candidates that then cost as much as the dense layer are dropped.
    """
    missing = 0
    for use in layer.uses():
        node = graph.node[use.node_index]
        missing += layer.op_type == "MatMul" or len(node.input) < 3 or not node.input[2]
    if not missing or layer.lookup:  # a table gets no bias correction
        return table
    costs = table.costs.copy()
    factorized = table.groups > 0
    costs[factorized, 0] += missing * layer.out_channels
    keep = ~factorized | (costs[:, 0] < layer.params)
    return replace(
        table,
        groups=table.groups[keep],
        ranks=table.ranks[keep],
        errors=table.errors[keep],
        costs=costs[keep],
        energy=table.energy[keep],
    )


def whitened_factors(weight: np.ndarray, stats: LayerStatistics, groups: int, rank: int) -> Factors:
    """Factors of ``Ŵ_i = A_r A_rᵀ W_i`` for every group: ``U_i = A_r``, ``V_i = A_rᵀ W_i``
    (with row weights ``D``: ``U_i = D^{-1/2} A_r``, ``V_i = A_rᵀ D^{1/2} W_i``).

    ``A_r`` holds the top ``rank`` left singular vectors of ``W_i S_i`` (equivalently the top
    eigenvectors of ``W_i (Σ_i + λI) W_iᵀ``). Each rank-one term ``u vᵀ`` is rescaled to
    ``(s·u)(vᵀ/s)`` with ``‖s·u‖ = ‖v/s‖``, and the largest entry of each ``u`` made positive,
    so the written model is the same for the same input.
    """
    blocks = _blocks(weight, groups)
    _, rows, width = blocks.shape
    if not 1 <= rank <= min(rows, width):
        raise ValueError(
            f"cannot factorize a {rows}×{width * groups} weight into {groups} groups of rank {rank}"
        )
    if _uses_output_gram(stats, rows, width):
        _, vectors = np.linalg.eigh(_output_gram(blocks, stats, groups))
        left = vectors[:, :, ::-1][:, :, :rank]  # (g, f, r)
    else:
        left = np.linalg.svd(_whitened_blocks(blocks, stats, groups), full_matrices=False)[0]
        left = left[:, :, :rank]
    first = _bmm(left.transpose(0, 2, 1), _weighted(blocks, stats))  # (g, r, w) = A_rᵀ D^½ W_i
    norms = np.linalg.norm(first, axis=2)  # ‖v‖ per term; ‖u‖ = 1
    if stats.row_weights is not None:  # U_i = D^{-1/2} A_r: balance ‖u‖ and ‖v‖ again
        left = left / np.sqrt(stats.row_weights)[:, None]
        norms = norms / np.linalg.norm(left, axis=1)
    scale = np.sqrt(np.where(norms > 0, norms, 1.0))
    second = left * scale[:, None, :]
    first = first / scale[:, :, None]
    peak = np.argmax(np.abs(second), axis=1)  # (g, r)
    signs = np.sign(np.take_along_axis(second, peak[:, None, :], axis=1))[:, 0, :]
    signs[signs == 0] = 1.0
    second, first = second * signs[:, None, :], first * signs[:, :, None]
    u = np.ascontiguousarray(second.transpose(1, 0, 2).reshape(rows, groups * rank))
    return Factors(groups=groups, rank=rank, first=np.ascontiguousarray(first), second=u)


# --------------------------------------------------------------------------------------------
# Bias correction


def _constant(
    graph: onnx.GraphProto,
    name: str,
    data_dir: str | os.PathLike | None = None,
    overridable: frozenset[str] = frozenset(),
) -> np.ndarray | None:
    """The value of a constant tensor (initializer or Constant node, through Identity/Cast);
    ``data_dir`` is the folder of a model whose weights are still in external files, and
    ``overridable`` names initializers that are no constants (graph inputs, IR version >= 4)."""
    initializers = {t.name: t for t in graph.initializer if t.name not in overridable}
    producers = {output: node for node in graph.node for output in node.output}
    while True:
        if name in initializers:
            array = tensor_to_array(initializers[name], data_dir)
            return np.asarray(array, dtype=np.float64)
        node = producers.get(name)
        if node is None or node.domain not in ("", "ai.onnx"):
            return None
        if node.op_type == "Constant":
            value = attribute(node, "value")
            if not isinstance(value, onnx.TensorProto):
                return None
            return np.asarray(tensor_to_array(value, data_dir), dtype=np.float64)
        if node.op_type not in ("Identity", "Cast") or not node.input:
            return None
        name = node.input[0]


def _effective_bias(
    graph: onnx.GraphProto,
    node: onnx.NodeProto,
    layer: Layer,
    data_dir: str | os.PathLike | None = None,
    overridable: frozenset[str] = frozenset(),
) -> tuple[np.ndarray | None, float]:
    """``(b, α)`` with the layer computing ``y = α·W x + b``; ``b`` None when unreadable."""
    f = layer.out_channels
    alpha = float(attribute(node, "alpha", 1.0)) if layer.op_type == "Gemm" else 1.0
    if layer.op_type == "MatMul" or len(node.input) < 3 or not node.input[2]:
        return np.zeros(f), alpha
    value = _constant(graph, node.input[2], data_dir, overridable)
    if value is None:
        return None, alpha
    if layer.op_type == "Conv":
        return (value.reshape(f) if value.size == f else None), alpha
    beta = float(attribute(node, "beta", 1.0))
    if value.size == 1:
        return np.full(f, beta * float(value.reshape(()))), alpha
    if value.ndim <= 2 and value.shape[-1] == f and value.size == f:
        return beta * value.reshape(f), alpha
    return None, alpha  # per-row bias: not a per-channel constant


def factorize_layers(
    calibration: Calibration,
    discovery: Discovery,
    chosen: Sequence[tuple[Layer, int, int]],
    progress: Progress | None = None,
) -> dict[str, CalibratedLayer]:
    """Whitened factors and bias correction of every chosen ``(layer, groups, rank)``."""
    graph = discovery.model.graph
    overridable = overridable_initializers(discovery.model)  # such a bias is not corrected
    result = {}
    for done, (layer, groups, rank) in enumerate(chosen):
        weight = discovery.weight(layer)
        stats = calibration.statistics[layer.name]
        factors = whitened_factors(weight, stats, groups, rank)
        residual = weight - reconstruct(factors)
        biases, shifts = {}, {}
        for use in layer.uses():  # each node of a tied weight with its own mean and bias
            node = graph.node[use.node_index]
            if layer.lookup:  # no input mean: nothing to correct
                width = layer.cols if use.op_type == "Gather" else layer.out_channels
                biases[use.name], shifts[use.name] = None, np.zeros(width)
                continue
            bias, alpha = _effective_bias(graph, node, use, discovery.data_dir, overridable)
            shift = alpha * (residual @ stats.use_means.get(use.name, stats.mean))
            had_bias = len(node.input) > 2 and bool(node.input[2])
            if bias is None:
                log.warning(
                    "no bias correction for %s: its bias is not a constant per output channel",
                    use.name,
                )
                biases[use.name], shifts[use.name] = None, np.zeros_like(shift)
                continue
            biases[use.name] = None if not had_bias and not np.any(shift) else bias + shift
            shifts[use.name] = shift
        estimate = output_error_table(calibration.spectra[layer.name], groups)[rank]
        result[layer.name] = CalibratedLayer(factors, biases, shifts, float(estimate))
        if progress is not None:
            progress("factorize", done + 1, len(chosen))
    return result


# --------------------------------------------------------------------------------------------
# Output errors after compression


def _residual_probe(
    model: onnx.ModelProto,
    discovery: Discovery,
    layers: Mapping[str, CalibratedLayer],
) -> tuple[onnx.ModelProto, dict[str, str]]:
    """A copy of ``model`` with, for every layer, a twin node computing ``α·(W − Ŵ) x``.

    The twin is the layer's own node (same op and attributes, so the same patches) with the
    residual weight ``W − Ŵ`` in the layout the node reads, and no bias; a tied weight gets a
    twin for each of its nodes. Returns the probe model and node name -> the twin's output.
    """
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    graph = probe.graph
    names = FreshNames(probe)
    outputs = {}
    for layer in discovery.layers:
        if layer.name not in layers:
            continue
        residual = discovery.weight(layer) - reconstruct(layers[layer.name].factors)
        base = f"{layer.name}/onnx_lowrank_residual"
        dtype = onnx.helper.tensor_dtype_to_np_dtype(layer.weight_dtype)
        stored_names: dict[bool, str] = {}  # tied uses share the residual weight per layout
        zero = None
        if layer.op_type == "Gemm":
            # Gemm's C is required before opset 11; a zero scalar (broadcast since opset 7) is
            # no bias in every opset
            zero = names.fresh(f"{base}_zero")
            graph.initializer.append(onnx.numpy_helper.from_array(np.zeros((), dtype), zero))
        for use in layer.uses():
            node = graph.node[use.node_index]
            if use.op_type == "Conv":
                stored, transposed = residual.reshape(layer.weight_shape), False
            else:
                transposed = not (
                    use.op_type == "Gather"
                    or (use.op_type == "Gemm" and attribute(node, "transB", 0))
                )
                stored = residual.T if transposed else residual
            if transposed not in stored_names:
                stored_names[transposed] = names.fresh(f"{base}_weight")
                graph.initializer.append(
                    onnx.numpy_helper.from_array(
                        np.ascontiguousarray(stored, dtype=dtype), stored_names[transposed]
                    )
                )
            weight_name = stored_names[transposed]
            twin = onnx.NodeProto()
            twin.CopyFrom(node)
            twin.name = names.fresh(base)
            del twin.input[:]
            if use.op_type == "Gather":
                twin.input.extend([weight_name, node.input[1]])
            else:
                twin.input.extend([node.input[0], weight_name])
                if use.op_type == "Gemm" and zero is not None:
                    twin.input.append(zero)
            del twin.output[:]
            twin.output.append(names.fresh(base))
            graph.node.append(twin)
            outputs[use.name] = twin.output[0]
    return probe, outputs


class _OutputErrorSums:
    """Running sums for the two relative output errors of one layer."""

    def __init__(self, layer: Layer):
        self.channel_axis = 1 if layer.op_type == "Conv" else -1
        self.local = self.network = self.squares = 0.0
        self.channel_sums: dict[str, np.ndarray] = {}  # per node: the output's own mean
        self.counts: dict[str, int] = {}

    def add(
        self,
        use: str,
        shift: np.ndarray,
        original: np.ndarray,
        residual: np.ndarray,
        compressed: np.ndarray,
    ) -> None:
        """One batch of node ``use``; ``shift`` is its bias correction in output units."""
        # float32 differences, float64 sums: no float64 copies of large activations
        original = original.astype(np.float32, copy=False)
        axis = self.channel_axis % original.ndim
        shape = [1] * original.ndim
        shape[axis] = -1
        # Ŷ − Y of the layer alone: −(α(W − Ŵ)x − α(W − Ŵ)μ) once the bias is corrected
        local = residual.astype(np.float32) - shift.astype(np.float32).reshape(shape)
        network = compressed.astype(np.float32) - original
        self.local += _sum_of_squares(local)
        self.network += _sum_of_squares(network)
        self.squares += _sum_of_squares(original)
        others = tuple(a for a in range(original.ndim) if a != axis)
        sums = original.sum(axis=others, dtype=np.float64)
        self.channel_sums[use] = self.channel_sums.get(use, 0.0) + sums
        self.counts[use] = self.counts.get(use, 0) + original.size // original.shape[axis]

    def result(self) -> OutputErrors:
        # ‖Y − Ȳ‖², each node's output around its own per-channel mean
        spread = self.squares - sum(
            float(np.sum(total**2)) / max(self.counts[use], 1)
            for use, total in self.channel_sums.items()
        )

        def relative(value: float) -> float:
            if spread > 0:
                return math.sqrt(value / spread)
            return 0.0 if value == 0 else math.inf

        return OutputErrors(local=relative(self.local), network=relative(self.network))


def _sum_of_squares(array: np.ndarray) -> float:
    return float(np.sum(np.square(array), dtype=np.float64))


def measure_output_errors(
    calibration: Calibration,
    discovery: Discovery,
    compressed: onnx.ModelProto,
    layers: Mapping[str, CalibratedLayer],
    progress: Progress | None = None,
    *,
    compressed_dir: str | os.PathLike | None = None,
) -> dict[str, OutputErrors]:
    """Relative output errors of the compressed layers on the calibration data.

    Everything runs in ONNX Runtime, batch by batch: the original model, with every compressed
    layer's output ``Y`` exposed and a twin node that computes ``α·(W − Ŵ) x`` on the same
    input (``_residual_probe``), and the compressed model, whose layers keep their output
    names. Reports ``progress("output-error", samples_done, samples)``. ``compressed_dir``
    is the folder whose external data files hold the compressed model's weights, when they are
    not in memory (the original's is ``discovery.data_dir``).
    """
    graph = discovery.model.graph
    chosen = [layer for layer in discovery.layers if layer.name in layers]
    if not chosen:
        return {}
    probe, residuals = _residual_probe(discovery.model, discovery, layers)
    sums, wanted, outputs = {}, {}, []
    for layer in chosen:
        sums[layer.name] = _OutputErrorSums(layer)
        for use in layer.uses():
            node = graph.node[use.node_index]
            wanted[node.output[0]] = layer.weight_dtype
            wanted[residuals[use.name]] = layer.weight_dtype
            outputs.append(node.output[0])
    batches = _run_batches(
        probe,
        wanted,
        calibration.feeds,
        calibration.providers,
        progress,
        stage="output-error",
        other=compressed,
        other_wanted=outputs,
        data_dir=discovery.data_dir,
        other_data_dir=compressed_dir,
    )
    for activations, others in batches:
        for layer in chosen:
            shifts = layers[layer.name].shifts
            for use in layer.uses():
                output = graph.node[use.node_index].output[0]
                sums[layer.name].add(
                    use.name,
                    shifts[use.name],
                    activations[output],
                    activations[residuals[use.name]],
                    others[output],
                )
    return {name: total.result() for name, total in sums.items()}


# --------------------------------------------------------------------------------------------
# Everything analyze needs


def calibrate(
    discovery: Discovery,
    feeds: Mapping[str, np.ndarray],
    max_groups: int,
    *,
    source: str = "calibration data",
    providers: Sequence[str] = ("CPUExecutionProvider",),
    progress: Progress | None = None,
    row_floor: float = ROW_FLOOR,
    head_floor: float = HEAD_FLOOR,
) -> Calibration:
    """Activation statistics and whitened spectra of every compressible layer.

    Args:
        discovery: the compressible layers of the analysis model ``discovery.model`` (after
            any graph pass ``analyze`` makes before discovery); statistics are taken on it.
        feeds: calibration inputs, already checked with ``check_calibration``.
        max_groups: largest candidate group count.
        source: a label of where the data came from.
        providers: ONNX Runtime execution providers.
        progress: callback ``(stage, done, total)``; stage ``"calibrate"``.
        row_floor: ``ρ`` of the row weights of embedding tables (1: none).
        head_floor: ``ρ`` of the row weights of classifier heads (1: none).
    """
    inner = [layer.name for layer in discovery.layers if layer.graph_path]
    if inner:
        # A subgraph's tensors cannot be fetched as outputs of the main graph.
        log.warning(
            "%d layer(s) inside subgraphs (e.g. %s) are factorized without calibration",
            len(inner),
            inner[0],
        )
        discovery = replace(
            discovery, layers=[layer for layer in discovery.layers if not layer.graph_path]
        )
    statistics = collect_statistics(
        discovery,
        feeds,
        max_groups,
        providers,
        progress,
        row_floor=row_floor,
        head_floor=head_floor,
    )
    spectra = whitened_spectra(discovery, statistics, max_groups)
    samples = int(next(iter(feeds.values())).shape[0])
    return Calibration(
        source=source,
        feeds=dict(feeds),
        samples=samples,
        statistics=statistics,
        spectra=spectra,
        providers=list(providers),
    )
