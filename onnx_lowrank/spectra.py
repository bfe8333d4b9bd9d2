r"""Grouped singular values of every layer, and the error tables built from them.

Channel slicing (DESIGN.md §2): the folded weight ``W ∈ R^{f × cκ}`` is split by input channel
into ``g`` groups, ``W = [W_1 … W_g]`` with ``W_i ∈ R^{f × (c/g)κ}``. Keeping rank ``r`` in every
group gives ``Ŵ = [Ŵ_1 … Ŵ_g]`` and the residual ``E = [E_1 … E_g]`` with
``‖E_i‖₂ = σ_{i,r+1}``, the first singular value dropped in group ``i``.

Error measures of ``ε(g, r) = ‖W − Ŵ‖₂ / ‖W‖₂`` (DESIGN.md §3):

* ``bound`` (default), a valid upper bound:
  ``ε ≤ sqrt(Σ_i σ_{i,r+1}²) / ‖W‖₂``, since ``‖E‖₂² = ‖Σ_i E_i E_iᵀ‖₂ ≤ Σ_i ‖E_i‖₂²``.
  It is never looser than the ``√g · max_i σ_{i,r+1} / ‖W‖₂`` of Theorem 1 of Liebenwein,
  Maalouf et al., "Compressing Neural Networks: Towards Determining the Optimal Layer-wise
  Decomposition", NeurIPS 2021.
* ``max-group``, a lower bound: ``ε ≥ max_i σ_{i,r+1} / ‖W‖₂``. It is what the reference code
  (torchprune) optimizes; it never penalizes many groups.

**The Gram path.** Only singular values are needed, so they come from the eigenvalues of the
smaller Gram matrix of each group, in float64: ``G_i = W_i W_iᵀ`` (``f × f``) when
``f ≤ (c/g)κ``, else ``G_i = W_iᵀ W_i``, and ``σ_j = sqrt(max(λ_j(G_i), 0))``. Forming ``G_i``
is one matrix product (BLAS 3), and a symmetric eigenvalue solve costs about a quarter of the
singular values of a square matrix of the same size, and far less than those of a wide one.

Gram matrices are shared between group counts. On the ``f`` side a coarser group's Gram is the
sum of the Grams of the finer groups it is made of (``W_a W_aᵀ = Σ_{i ∈ a} W_i W_iᵀ``), so for
candidate counts 1, 2, 4, 8 only the eight finest Grams are multiplied out. On the column side
a finer group's Gram is a diagonal block of a coarser one's (``W_iᵀ W_i`` is the ``i``-th
diagonal block of ``W_aᵀ W_a``), so only the coarsest is multiplied out.

All Gram matrices of one size, of all group counts and across layers, are decomposed in one
batched ``eigvalsh`` call. The Gram matrices waiting for a call never hold more than
``batch_bytes`` (default ``BATCH_BYTES``, 64 MiB) beyond those of the layer being read, and no
single call gets more than ``batch_bytes`` of input (a lone matrix larger than that gets its
own call).

**Tolerance of the Gram path.** Forming ``G_i`` in float64 and ``eigvalsh`` are both backward
stable, so every computed eigenvalue is within ``‖δG‖₂`` of an exact one; rounding in the
product grows with the length of the group matrix, the eigensolver's with its size. Measured,
``‖δG‖₂ ≤ 2(m + 4)·u·σ_1²`` with ``u = 2⁻⁵³``, ``m = max(f, (c/g)κ)`` the longer side of the
group matrix and ``σ_1 = ‖W_i‖₂``. For every singular value of the group this gives

    |σ̃_j² − σ_j²| ≤ τ·σ_1²,   τ = 2(m + 4)·u,   hence   |σ̃_j − σ_j| ≤ min(τ·σ_1²/σ_j, √τ·σ_1).

Singular values above ``√τ·σ_1`` (about ``10⁻⁶·σ_1`` for ``m = 4608``) agree with an SVD's to a
relative ``τ·(σ_1/σ_j)²``; smaller ones are resolved only to an absolute ``√τ·σ_1``. An
error-table entry is a norm of dropped singular values over ``σ_1``, so it is exact to about
``√τ`` absolute: far below anything an allocation can tell apart, and below the precision of
float32 weights. ``tests/test_spectra.py`` checks the first inequality against float64
``numpy.linalg.svd`` on random, ill-conditioned (``σ_1/σ_n = 10¹²``) and exactly low-rank
matrices; on 3000 such matrices the largest error seen was 0.65 of ``τ·σ_1²``, and it shrinks
as ``m`` grows (below 0.15 for ``m ≥ 100``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from .backend import Backend, numpy_backend
from .discover import Discovery, Layer

__all__ = [
    "BATCH_BYTES",
    "LayerSpectrum",
    "compute_spectra",
    "error_table",
    "group_counts",
    "grouped_singular_values",
    "layer_spectrum",
]

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]

#: Default byte budget of the Gram matrices waiting for (and given to) one ``eigvalsh`` call.
BATCH_BYTES = 64 * 2**20

_FLOAT64_BYTES = 8


@dataclass(frozen=True)
class LayerSpectrum:
    """Singular values of one layer for every candidate group count.

    Attributes:
        name: layer name.
        spectral_norm: ``‖W‖₂``, the largest singular value of the whole folded weight.
        frobenius_sq: ``‖W‖_F²``.
        singular_values: group count ``g`` -> array ``(g, k)`` of each group's singular values
            in descending order, ``k = min(f, c·κ/g)``.
    """

    name: str
    spectral_norm: float
    frobenius_sq: float
    singular_values: dict[int, np.ndarray]


def group_counts(layer: Layer, max_groups: int) -> list[int]:
    """Candidate group counts of ``layer``: divisors of its input channels up to the limit."""
    limit = max_groups if layer.max_groups is None else min(max_groups, layer.max_groups)
    return [g for g in range(1, limit + 1) if layer.in_channels % g == 0]


def _check_groups(shape: tuple[int, int], in_channels: int, counts: list[int]) -> None:
    for groups in counts:
        if groups < 1 or in_channels % groups or shape[1] % groups:
            raise ValueError(
                f"{groups} groups do not divide {in_channels} input channels "
                f"of a {shape[0]}×{shape[1]} weight"
            )


def _gram_stacks(weight: Any, counts: list[int], xp: Any) -> dict[int, Any]:
    """Gram matrices ``(g, n, n)`` of every group count, each of the smaller side.

    ``f``-side Grams of a count are summed from those of a finer count that it divides;
    column-side Grams are cut from the diagonal blocks of a coarser count that divides it.
    """
    rows, cols = weight.shape
    row_side = sorted((g for g in counts if rows <= cols // g), reverse=True)
    col_side = sorted(g for g in counts if rows > cols // g)
    grams: dict[int, Any] = {}
    for groups in row_side:  # finest first
        finer = [h for h in grams if h % groups == 0]
        if finer:
            source = min(finer)
            stack = grams[source]
            size = stack.shape[-1]
            grams[groups] = xp.sum(
                xp.reshape(stack, (groups, source // groups, size, size)), axis=1
            )
        else:
            blocks = _blocks(weight, groups, xp)
            grams[groups] = xp.matmul(blocks, xp.matrix_transpose(blocks))
    coarse: list[int] = []
    for groups in col_side:  # coarsest first
        coarser = [h for h in coarse if groups % h == 0]
        if coarser:
            grams[groups] = _diagonal_blocks(grams[max(coarser)], groups, xp)
        else:
            blocks = _blocks(weight, groups, xp)
            grams[groups] = xp.matmul(xp.matrix_transpose(blocks), blocks)
        coarse.append(groups)
    return grams


def _blocks(weight: Any, groups: int, xp: Any) -> Any:
    """``(g, f, (c/g)κ)``: the column blocks ``W_i`` of a folded weight."""
    rows, cols = weight.shape
    return xp.permute_dims(xp.reshape(weight, (rows, groups, cols // groups)), (1, 0, 2))


def _diagonal_blocks(stack: Any, groups: int, xp: Any) -> Any:
    """The ``groups // h`` diagonal blocks of each of the ``h`` matrices of ``stack``, in order."""
    count, size, _ = stack.shape
    parts = groups // count
    width = size // parts
    # (h, m·w, m·w) -> (h, m, w, m, w) -> (h, w, w, m, m) -> diagonal over the two m axes.
    split = xp.permute_dims(xp.reshape(stack, (count, parts, width, parts, width)), (0, 2, 4, 1, 3))
    diagonal = xp.linalg.diagonal(split)  # (h, w, w, m)
    return xp.reshape(xp.permute_dims(diagonal, (0, 3, 1, 2)), (groups, width, width))


def _singular_values(grams: Any, backend: Backend) -> np.ndarray:
    """``σ = sqrt(max(λ, 0))`` of a stack of Gram matrices, descending, as NumPy."""
    xp = backend.xp
    eigenvalues = xp.linalg.eigvalsh(grams)  # ascending
    values = xp.flip(xp.sqrt(xp.clip(eigenvalues, 0.0, None)), axis=-1)
    return np.ascontiguousarray(backend.to_numpy(values))


class _Batches:
    """Gram stacks waiting for a batched ``eigvalsh``, grouped by matrix size."""

    def __init__(self, backend: Backend, batch_bytes: int):
        self.backend = backend
        self.batch_bytes = batch_bytes
        self.pending: dict[int, list[tuple[Any, Any]]] = {}
        self.pending_bytes = 0

    def add(self, key: Any, stack: Any) -> None:
        size = stack.shape[-1]
        self.pending.setdefault(size, []).append((key, stack))
        self.pending_bytes += stack.shape[0] * size * size * _FLOAT64_BYTES

    @property
    def full(self) -> bool:
        return self.pending_bytes >= self.batch_bytes

    def flush(self) -> Iterator[tuple[Any, np.ndarray]]:
        """Decompose everything pending; yield ``(key, singular values)`` per added stack."""
        for size, items in self.pending.items():
            per_call = max(1, self.batch_bytes // (size * size * _FLOAT64_BYTES))
            chunk: list[tuple[Any, Any]] = []
            count = 0
            for key, stack in items:
                if chunk and count + stack.shape[0] > per_call:
                    yield from self._decompose(chunk)
                    chunk, count = [], 0
                if stack.shape[0] > per_call:  # one stack over the budget: split it
                    parts = [
                        self._values([stack[start : start + per_call, ...]])
                        for start in range(0, stack.shape[0], per_call)
                    ]
                    yield key, np.concatenate(parts, axis=0)
                    continue
                chunk.append((key, stack))
                count += stack.shape[0]
            if chunk:
                yield from self._decompose(chunk)
        self.pending.clear()
        self.pending_bytes = 0
        self.backend.free()

    def _decompose(self, chunk: list[tuple[Any, Any]]) -> Iterator[tuple[Any, np.ndarray]]:
        values = self._values([stack for _, stack in chunk])
        start = 0
        for key, stack in chunk:
            yield key, values[start : start + stack.shape[0]]
            start += stack.shape[0]

    def _values(self, stacks: list[Any]) -> np.ndarray:
        xp = self.backend.xp
        grams = stacks[0] if len(stacks) == 1 else xp.concat(stacks, axis=0)
        return _singular_values(grams, self.backend)


def layer_spectrum(
    name: str,
    weight: np.ndarray,
    in_channels: int,
    counts: list[int],
    backend: Backend | None = None,
) -> LayerSpectrum:
    """The spectrum of one folded weight for the given group counts (``1`` must be one)."""
    backend = backend or numpy_backend()
    _check_groups(weight.shape, in_channels, counts)
    grams = _gram_stacks(backend.asarray(weight), counts, backend.xp)
    values = {groups: _singular_values(stack, backend) for groups, stack in grams.items()}
    return _assemble(name, _frobenius_sq(weight), {g: values[g] for g in counts})


def _frobenius_sq(weight: np.ndarray) -> float:
    flat = weight.reshape(-1)
    return float(np.dot(flat, flat))


def _assemble(name: str, frobenius_sq: float, values: dict[int, np.ndarray]) -> LayerSpectrum:
    return LayerSpectrum(
        name=name,
        spectral_norm=float(values[1][0, 0]) if values[1].size else 0.0,
        frobenius_sq=frobenius_sq,
        singular_values=dict(sorted(values.items())),
    )


def grouped_singular_values(
    weight: np.ndarray, in_channels: int, groups: int, backend: Backend | None = None
) -> np.ndarray:
    """Singular values of each channel group of a folded weight.

    Args:
        weight: the folded weight ``W`` (``f × c·κ``), columns channel-major.
        in_channels: ``c``; ``groups`` must divide it.
        groups: ``g``.
        backend: array backend (NumPy when None).

    Returns:
        NumPy array ``(g, min(f, c·κ/g))``, each row in descending order.
    """
    backend = backend or numpy_backend()
    _check_groups(weight.shape, in_channels, [groups])
    grams = _gram_stacks(backend.asarray(weight), [groups], backend.xp)
    return _singular_values(grams[groups], backend)


def compute_spectra(
    discovery: Discovery,
    max_groups: int,
    backend: Backend | None = None,
    progress: Progress | None = None,
    *,
    batch_bytes: int = BATCH_BYTES,
) -> dict[str, LayerSpectrum]:
    """Singular values of every layer of ``discovery`` for each candidate group count.

    Layers are read one at a time; their Gram matrices are batched by size across layers
    (see the module docstring for the byte budget and the tolerance).

    Args:
        discovery: the layers and their weights.
        max_groups: largest candidate group count.
        backend: array backend (NumPy when None); results come back as NumPy arrays.
        progress: called with ``("spectra", done, total)`` as layers complete.
        batch_bytes: byte budget of the Gram matrices of one batched eigenvalue call.
    """
    backend = backend or numpy_backend()
    if batch_bytes < 1:
        raise ValueError(f"batch_bytes must be positive, got {batch_bytes}")
    layers = discovery.layers
    batches = _Batches(backend, batch_bytes)
    values: list[dict[int, np.ndarray]] = [{} for _ in layers]
    waiting = [0] * len(layers)
    frobenius_sq = [0.0] * len(layers)
    spectra: dict[str, LayerSpectrum] = {}

    def collect() -> None:
        for (index, groups), result in batches.flush():
            values[index][groups] = result
            waiting[index] -= 1
            if waiting[index] == 0:
                layer = layers[index]
                spectra[layer.name] = _assemble(layer.name, frobenius_sq[index], values[index])
                values[index] = {}
                if progress is not None:
                    progress("spectra", len(spectra), len(layers))

    for index, layer in enumerate(layers):
        weight = discovery.weight(layer)
        counts = group_counts(layer, max_groups)
        _check_groups(weight.shape, layer.in_channels, counts)
        grams = _gram_stacks(backend.asarray(weight), counts, backend.xp)
        frobenius_sq[index] = _frobenius_sq(weight)
        waiting[index] = len(grams)
        for groups, stack in grams.items():
            batches.add((index, groups), stack)
        if batches.full:
            collect()
    collect()
    log.debug("spectra of %d layers", len(spectra))
    return {layer.name: spectra[layer.name] for layer in layers}


def error_table(spectrum: LayerSpectrum, groups: int, measure: str = "bound") -> np.ndarray:
    """Relative error ``ε(g, r)`` for ``r = 0 … k`` (index = rank; ``ε(g, k) = 0``).

    Args:
        spectrum: the layer's spectra.
        groups: ``g``.
        measure: ``"bound"`` for ``sqrt(Σ_i σ_{i,r+1}²)/‖W‖₂`` or ``"max-group"`` for
            ``max_i σ_{i,r+1}/‖W‖₂``.
    """
    values = spectrum.singular_values[groups]
    norm = spectrum.spectral_norm
    if norm == 0.0:
        return np.zeros(values.shape[1] + 1)
    if measure == "bound":
        dropped = np.sqrt(np.sum(values * values, axis=0))
    elif measure == "max-group":
        dropped = np.max(values, axis=0)
    else:
        raise ValueError(f"unknown error measure {measure!r}")
    return np.append(dropped / norm, 0.0)
