r"""Whitened factors: keep each layer's outputs on real data, not its weights.

Data-free factorization minimizes ``‖W − Ŵ‖``. Given real inputs, we minimize instead the error
of each layer's *outputs* on them (the idea of ASVD and SVD-LLM). Let ``x`` be the layer's input
vectors, with mean ``μ`` and covariance ``Σ`` (activations.py). The layer computes
``y = α·W x + b``; we want a rank-limited ``Ŵ`` and a bias ``b'`` with

    min E‖(α·W x + b) − (α·Ŵ x + b')‖².

**Bias correction** (``factorize_layers``). For any ``Ŵ`` the best bias is
``b' = b + α·(W − Ŵ) μ``, and what remains is ``α² · E‖(W − Ŵ)(x − μ)‖² = α² · ‖(W − Ŵ) S‖_F²``
with ``S Sᵀ = Σ``. So the whitening uses the *centred* second moment ``Σ = E[x xᵀ] − μ μᵀ``;
with the bias corrected, this is the exact optimum, and it is never worse than whitening with
the raw second moment ``E[x xᵀ]``. A tied weight's node ``u`` keeps its own bias correction
``b'_u = b_u + α_u·(W − Ŵ) μ_u``, so what remains is ``Σ_u E‖(W − Ŵ)(x_u − μ_u)‖²``, which the
covariance within the nodes measures (activations.py).

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
``λ_j(W_i S_i)²``. At full rank ``Ŵ_i = W_i``. On the output side (activations.py) only these
``f × f`` matrices exist, and they are used.

**Few vectors: shrinkage** (accumulate.ledoit_wolf). Where a layer's statistics rest on
``n ≤ c·κ`` vectors (``Σ`` singular: a classifier after global pooling), ``Σ`` is replaced
everywhere here by ``Σ' = (1 − γ)·Σ + γ·m·I``, ``m = tr Σ / (c·κ)``, with the Ledoit–Wolf
intensity ``γ`` (``LayerStatistics.shrinkage``, estimated by accumulate.py for ``W Σ Wᵀ``);
the spectra, the error tables and the factors all use ``Σ'``, so the estimate is the error
of the factors written, under ``Σ'``.

**Row weights.** With ``D = diag(d)`` a positive weight per output row (``f`` values, mean 1:
embedding tables and classifier heads, activations.py), the factors minimize the weighted
output error ``‖D^{1/2}(W − Ŵ) S‖_F``: the same whitened SVD of ``D^{1/2} W_i S_i`` with top left
singular vectors ``A_r``, mapped back as

    U_i = D^{-1/2} A_r,    V_i = A_rᵀ D^{1/2} W_i,

so ``Ŵ_i = D^{-1/2} A_r A_rᵀ D^{1/2} W_i`` (``W_i`` itself at full rank), and the error tables
use the singular values of ``D^{1/2} W_i S_i``.

**Error tables.** The relative output error of a candidate, estimated from the whitened singular
values ``s_{i,j}`` of each ``W_i S_i``, is

    ε_out(g, r) = sqrt(Σ_i Σ_{j>r} s_{i,j}²) / ‖W S‖_F,

where ``‖W S‖_F² = tr(W (Σ + λI) Wᵀ)`` is the spread of the layer's output around its mean. For
``g = 1`` it is exact (up to ``λ``); for ``g > 1`` it leaves out the cross-group terms
``tr(E_i Σ_ij E_jᵀ)``, so it is exact when the groups' inputs are uncorrelated. The errors
measured after compression (output_errors.py) are reported next to it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import replace

import numpy as np
import onnx

from .backend import Backend, numpy_backend
from .factorize import fix_signs, reconstruct
from .graphs import attribute, overridable_initializers
from .index import GraphIndex, read_constant
from .records import CalibratedLayer, Calibration, LayerStatistics
from .spectra import bmm, diagonal_blocks, group_blocks, group_counts
from .types import CandidateTable, Discovery, Factors, Layer, LayerSpectrum, Progress

__all__ = [
    "effective_bias",
    "factorize_layers",
    "node_biases",
    "output_error_table",
    "whitened_factors",
    "whitened_singular_values",
    "whitened_spectra",
    "with_bias_cost",
    "with_output_errors",
]

log = logging.getLogger(__name__)


def _shrunk(stats: LayerStatistics) -> tuple[float, float]:
    """``(1 − γ, γ·m + λ)``: ``Σ_i' + λI = (1 − γ)·Σ_i + (γ·m + λ)·I`` with ``m = tr Σ/(c·κ)``
    and the shrinkage ``γ`` (accumulate.ledoit_wolf), the damping ``λ``."""
    gamma = stats.shrinkage
    scale = float(np.mean(stats.variance)) if stats.variance.size else 0.0
    return 1.0 - gamma, gamma * scale + stats.damping


def _output_gram(blocks: np.ndarray, stats: LayerStatistics, groups: int) -> np.ndarray:
    """``D^{1/2} W_i (Σ_i' + λI) W_iᵀ D^{1/2}`` per group, ``(g, f, f)`` (``D = I`` without
    row weights, ``Σ'`` the shrunk covariance)."""
    keep, ridge = _shrunk(stats)
    damping = ridge * bmm(blocks, blocks.transpose(0, 2, 1))
    if _has_output_covariance(stats, groups) or stats.side == "output":
        if not _has_output_covariance(stats, groups):
            raise ValueError(f"no output-side statistics of {stats.name} for {groups} groups")
        gram = keep * stats.output_covariance[groups] + damping
    else:
        sigma = diagonal_blocks(stats.covariance, groups)
        gram = keep * bmm(bmm(blocks, sigma), blocks.transpose(0, 2, 1)) + damping
    if stats.row_weights is None:
        return gram
    root = np.sqrt(stats.row_weights)
    return gram * root[:, None] * root[None, :]


def _whitened_blocks(blocks: np.ndarray, stats: LayerStatistics, groups: int) -> np.ndarray:
    """``D^{1/2} W_i S_i`` per group with ``S_i S_iᵀ = Σ_i' + λI`` (Cholesky), ``(g, f, w)``."""
    keep, ridge = _shrunk(stats)
    sigma = keep * diagonal_blocks(stats.covariance, groups)
    sigma = sigma + ridge * np.eye(sigma.shape[-1])
    return bmm(_weighted(blocks, stats), np.linalg.cholesky(sigma))


def _weighted(blocks: np.ndarray, stats: LayerStatistics) -> np.ndarray:
    """``D^{1/2} W_i`` per group."""
    if stats.row_weights is None:
        return blocks
    return blocks * np.sqrt(stats.row_weights)[:, None]


def _has_output_covariance(stats: LayerStatistics, groups: int) -> bool:
    return stats.output_covariance is not None and groups in stats.output_covariance


def _uses_output_gram(stats: LayerStatistics, rows: int, width: int, groups: int) -> bool:
    """Work with the ``f × f`` matrices (output side, or ``f ≤ w``), else with ``W_i S_i``.

    Input-side statistics may keep only the diagonal blocks of some group count ``b``
    (accumulate.plan_statistics); the counts that ``b`` does not divide have output
    covariances instead.
    """
    return stats.side == "output" or rows <= width or _has_output_covariance(stats, groups)


def whitened_singular_values(
    weight: np.ndarray, stats: LayerStatistics, groups: int, backend: Backend | None = None
) -> np.ndarray:
    """Singular values of every ``W_i S_i``, ``(g, min(f, c·κ/g))``, each row descending.

    The eigenvalue problems run on ``backend`` (NumPy when None)."""
    blocks = group_blocks(weight, groups)
    _, rows, width = blocks.shape
    if _uses_output_gram(stats, rows, width, groups):
        gram = _output_gram(blocks, stats, groups)
    else:
        whitened = _whitened_blocks(blocks, stats, groups)
        gram = bmm(whitened.transpose(0, 2, 1), whitened)
    if backend is None:
        eigenvalues = np.linalg.eigvalsh(gram)
    else:
        eigenvalues = backend.to_numpy(backend.xp.linalg.eigvalsh(backend.asarray(gram)))
    values = np.sqrt(np.clip(eigenvalues, 0.0, None))[:, ::-1]
    return np.ascontiguousarray(values[:, : min(rows, width)])


def whitened_spectra(
    discovery: Discovery,
    statistics: Mapping[str, LayerStatistics],
    max_groups: int,
    groups: Mapping[str, Sequence[int]] | None = None,
    backend: Backend | None = None,
) -> dict[str, LayerSpectrum]:
    """Whitened singular values of every layer for each candidate group count
    (``spectra.group_counts(layer, max_groups)``, or ``groups[layer.name]``; ``g = 1`` always).

    The spectra have the layout of spectra.py's (``frobenius_sq`` is ``‖W S‖_F²``), so the
    solvers' tables can be built from them with ``output_error_table``. The ``(layer, g)``
    problems are spread over ``backend``'s workers (``Backend.map``: one BLAS thread each on
    the CPU), with the eigenvalue problems on the backend.
    """
    backend = backend or numpy_backend(1)

    def problems() -> Iterator[tuple[str, np.ndarray, LayerStatistics, int]]:
        for layer in discovery.layers:  # weights are read here, in the calling thread
            weight = discovery.weight(layer)
            counts = (groups or {}).get(layer.name) or group_counts(layer, max_groups)
            for g in sorted({1, *counts}):
                yield layer.name, weight, statistics[layer.name], g

    def solve(problem: tuple[str, np.ndarray, LayerStatistics, int]) -> tuple[str, int, np.ndarray]:
        name, weight, stats, g = problem
        return name, g, whitened_singular_values(weight, stats, g, backend)

    by_layer: dict[str, dict[int, np.ndarray]] = {layer.name: {} for layer in discovery.layers}
    for name, g, values in backend.map(solve, problems()):
        by_layer[name][g] = values
    result = {}
    for name, by_groups in by_layer.items():
        result[name] = LayerSpectrum(
            name=name,
            spectral_norm=float(by_groups[1][0, 0]),
            frobenius_sq=float(np.sum(by_groups[1] ** 2)),
            singular_values=dict(sorted(by_groups.items())),
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
    """The same candidates with their errors replaced by ``ε_out(g, r)``.

    Rows of a group count without whitened spectra are dropped: calibration computes only the
    counts the allocator may choose (``calibrate.candidate_groups``), so such a row belongs to
    a count the user's choice rules out.
    """
    cache: dict[int, np.ndarray] = {}
    errors = np.zeros(len(table))
    for row in range(len(table)):
        g = int(table.groups[row])
        if g == 0 or g not in spectrum.singular_values:
            continue
        if g not in cache:
            cache[g] = output_error_table(spectrum, g)
        errors[row] = cache[g][int(table.ranks[row])]
    keep = (table.groups == 0) | np.isin(table.groups, list(spectrum.singular_values))
    return replace(
        table,
        groups=table.groups[keep],
        ranks=table.ranks[keep],
        errors=errors[keep],
        costs=table.costs[keep],
        energy=table.energy[keep],
    )


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
    blocks = group_blocks(weight, groups)
    _, rows, width = blocks.shape
    if not 1 <= rank <= min(rows, width):
        raise ValueError(
            f"cannot factorize a {rows}×{width * groups} weight into {groups} groups of rank {rank}"
        )
    with numpy_backend(1).parallel():  # one BLAS thread (backend.py: busy cores)
        if _uses_output_gram(stats, rows, width, groups):
            _, vectors = np.linalg.eigh(_output_gram(blocks, stats, groups))
            left = vectors[:, :, ::-1][:, :, :rank]  # (g, f, r)
        else:
            left = np.linalg.svd(_whitened_blocks(blocks, stats, groups), full_matrices=False)[0]
            left = left[:, :, :rank]
    first = bmm(left.transpose(0, 2, 1), _weighted(blocks, stats))  # (g, r, w) = A_rᵀ D^½ W_i
    norms = np.linalg.norm(first, axis=2)  # ‖v‖ per term; ‖u‖ = 1
    if stats.row_weights is not None:  # U_i = D^{-1/2} A_r: balance ‖u‖ and ‖v‖ again
        left = left / np.sqrt(stats.row_weights)[:, None]
        norms = norms / np.linalg.norm(left, axis=1)
    scale = np.sqrt(np.where(norms > 0, norms, 1.0))
    second = left * scale[:, None, :]
    first = first / scale[:, :, None]
    second, first = fix_signs(second, first)
    u = np.ascontiguousarray(second.transpose(1, 0, 2).reshape(rows, groups * rank))
    return Factors(groups=groups, rank=rank, first=np.ascontiguousarray(first), second=u)


# --------------------------------------------------------------------------------------------
# Bias correction


def node_biases(calibrated: Iterable[CalibratedLayer]) -> dict[str, np.ndarray]:
    """The corrected biases of ``calibrated`` by node name, as ``rewrite`` takes them (a tied
    weight's nodes each have their own); nodes whose bias is unreadable are left out."""
    return {
        use: bias for item in calibrated for use, bias in item.biases.items() if bias is not None
    }


def effective_bias(
    index: GraphIndex,
    node: onnx.NodeProto,
    layer: Layer,
    data_dir: str | os.PathLike | None = None,
) -> tuple[np.ndarray | None, float]:
    """``(b, α)`` with the layer computing ``y = α·W x + b``; ``b`` None when unreadable.

    ``index`` is the ``GraphIndex`` of the node's graph; a bias that is an overridable
    initializer (``index.overridable``) is no constant, so it is unreadable.
    """
    f = layer.out_channels
    alpha = float(attribute(node, "alpha", 1.0)) if layer.op_type == "Gemm" else 1.0
    if layer.op_type == "MatMul" or len(node.input) < 3 or not node.input[2]:
        return np.zeros(f), alpha
    try:
        value = read_constant(index, node.input[2], data_dir)
    except ValueError:  # not a constant
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
    *,
    index: GraphIndex | None = None,
) -> dict[str, CalibratedLayer]:
    """Whitened factors and bias correction of every chosen ``(layer, groups, rank)``.

    ``index`` is the ``GraphIndex`` of the main graph of ``discovery.model`` (built once per
    call when None; a caller that factorizes layer by layer passes its own).
    """
    graph = discovery.model.graph
    if index is None:  # an overridable bias is no constant: it is not corrected
        index = GraphIndex(graph, overridable=overridable_initializers(discovery.model))
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
            bias, alpha = effective_bias(index, node, use, discovery.data_dir)
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
