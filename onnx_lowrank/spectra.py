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

and, as a different norm, ``frobenius``: the exact ``‖W − Ŵ‖_F / ‖W‖_F =
sqrt(Σ_i Σ_{j>r} σ_{i,j}²) / ‖W‖_F`` (the groups' residuals occupy disjoint columns, so their
energies add). It is the relative output error for white inputs, the data-free limit of the
calibrated ``output`` measure, and it counts the whole dropped tail, not only its first value.

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

**Batches.** Gram matrices of one size, of all group counts and across layers, are collected
until they hold ``batch_bytes`` (default ``BATCH_BYTES``, 64 MiB), then cut into calls of at
most ``batch_bytes`` of input and at least one per worker of the backend (a lone matrix larger
than the budget gets its own call). The workers decompose one batch while the caller reads the
next layers and forms their Grams, so at most two batches, plus the Grams of the layer being
read, are alive at a time. On CuPy a call is one batched kernel; on NumPy, whose LAPACK loops
over a stack anyway, the stacks of a call are decomposed one after the other without a copy.

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
matrices; on 3000 such matrices (sides 1–320) the largest error seen was 0.30 of ``τ·σ_1²``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from concurrent.futures import Executor, Future
from typing import Any

import numpy as np

from .backend import Backend, numpy_backend
from .types import Discovery, Layer, LayerSpectrum, Progress

__all__ = [
    "BATCH_BYTES",
    "bmm",
    "compute_spectra",
    "diagonal_blocks",
    "error_table",
    "group_blocks",
    "group_counts",
    "grouped_singular_values",
    "layer_spectrum",
]

log = logging.getLogger(__name__)

#: Default byte budget of the Gram matrices waiting for (and given to) one ``eigvalsh`` call.
BATCH_BYTES = 64 * 2**20

_FLOAT64_BYTES = 8


def group_counts(layer: Layer, max_groups: int) -> list[int]:
    """Candidate group counts of ``layer``: divisors of its input channels up to the limit."""
    limit = max_groups if layer.max_groups is None else min(max_groups, layer.max_groups)
    channels = layer.in_channels
    small = [d for d in range(1, math.isqrt(channels) + 1) if channels % d == 0]
    divisors = sorted(set(small) | {channels // d for d in small})
    return [groups for groups in divisors if groups <= limit]


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
            blocks = group_blocks(weight, groups, xp)
            grams[groups] = xp.matmul(blocks, xp.matrix_transpose(blocks))
    coarse: list[int] = []
    for groups in col_side:  # coarsest first
        coarser = [h for h in coarse if groups % h == 0]
        if coarser:
            grams[groups] = diagonal_blocks(grams[max(coarser)], groups, xp)
        else:
            blocks = group_blocks(weight, groups, xp)
            grams[groups] = xp.matmul(xp.matrix_transpose(blocks), blocks)
        coarse.append(groups)
    return grams


def group_blocks(weight: Any, groups: int, xp: Any = None) -> Any:
    """``(g, f, (c/g)κ)``: the column blocks ``W_i`` of a folded weight (``xp``: the array
    namespace, NumPy's when None)."""
    xp = xp or _numpy()
    rows, cols = weight.shape
    return xp.permute_dims(xp.reshape(weight, (rows, groups, cols // groups)), (1, 0, 2))


def diagonal_blocks(stack: Any, groups: int, xp: Any = None) -> Any:
    """The ``groups // h`` diagonal blocks of each of the ``h`` matrices of ``stack``
    (``(h, n, n)``; a single ``(n, n)`` matrix is ``h = 1``), in order: ``(groups, w, w)``."""
    xp = xp or _numpy()
    if stack.ndim == 2:
        stack = xp.reshape(stack, (1, *stack.shape))
    count, size, _ = stack.shape
    parts = groups // count
    width = size // parts
    # (h, m·w, m·w) -> (h, m, w, m, w) -> (h, w, w, m, m) -> diagonal over the two m axes.
    split = xp.permute_dims(xp.reshape(stack, (count, parts, width, parts, width)), (0, 2, 4, 1, 3))
    diagonal = xp.linalg.diagonal(split)  # (h, w, w, m)
    return xp.reshape(xp.permute_dims(diagonal, (0, 3, 1, 2)), (groups, width, width))


def bmm(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Stacked matrix product as a loop: numpy's stacked ``matmul`` is often not BLAS-backed."""
    return np.stack([a @ b for a, b in zip(first, second, strict=True)])


def _numpy() -> Any:
    from array_api_compat import numpy as compat_numpy

    return compat_numpy


def _singular_values(grams: Any, backend: Backend) -> np.ndarray:
    """``σ = sqrt(max(λ, 0))`` of a stack of Gram matrices, descending, as NumPy."""
    xp = backend.xp
    eigenvalues = xp.linalg.eigvalsh(grams)  # ascending
    values = xp.flip(xp.sqrt(xp.maximum(eigenvalues, 0.0)), axis=-1)
    return np.ascontiguousarray(backend.to_numpy(values))


_Key = tuple[int, int]  # (layer index, group count)
_Piece = tuple[_Key, Any, int, int]  # key, Gram stack, first and last+1 matrix of it


class _Batches:
    """Gram stacks waiting for a batched ``eigvalsh``, grouped by matrix size.

    ``add`` collects stacks. ``flush`` cuts everything pending into calls of equal-sized
    matrices (at most ``batch_bytes`` of input each, and at least one per worker when there are
    enough matrices), hands them to the executor, and yields the results of every earlier
    flush as they complete. So the workers decompose one batch while the caller forms the
    Grams of the next, and at most two batches are alive at a time.
    """

    def __init__(self, backend: Backend, batch_bytes: int, executor: Executor):
        self.backend = backend
        self.batch_bytes = batch_bytes
        self.executor = executor
        self.pending: dict[int, list[tuple[_Key, Any]]] = {}
        self.pending_bytes = 0
        self.inflight: list[Future[list[tuple[_Key, int, np.ndarray]]]] = []
        self.parts: dict[_Key, list[tuple[int, np.ndarray]]] = {}
        self.remaining: dict[_Key, int] = {}

    def add(self, key: _Key, stack: Any) -> None:
        size = stack.shape[-1]
        self.pending.setdefault(size, []).append((key, stack))
        self.pending_bytes += stack.shape[0] * size * size * _FLOAT64_BYTES
        self.remaining[key] = stack.shape[0]
        self.parts[key] = []

    @property
    def full(self) -> bool:
        return self.pending_bytes >= self.batch_bytes

    def flush(self, final: bool = False) -> Iterator[tuple[_Key, np.ndarray]]:
        """Submit everything pending; yield ``(key, singular values)`` of finished stacks.

        Waits for the batches of earlier flushes, and with ``final`` for this one too.
        """
        earlier, self.inflight = self.inflight, []
        for size, items in self.pending.items():
            for chunk in self._chunks(size, items):
                self.inflight.append(self.executor.submit(self._decompose, chunk))
        self.pending.clear()
        self.pending_bytes = 0
        for future in earlier + (self.inflight if final else []):
            yield from self._collect(future.result())
        if final:
            self.inflight = []
        self.backend.free()

    def _chunks(self, size: int, items: list[tuple[_Key, Any]]) -> list[list[_Piece]]:
        count = sum(stack.shape[0] for _, stack in items)
        by_bytes = max(1, self.batch_bytes // (size * size * _FLOAT64_BYTES))
        per_call = max(1, min(by_bytes, -(-count // self.backend.workers)))
        chunks: list[list[_Piece]] = []
        current: list[_Piece] = []
        filled = 0
        for key, stack in items:
            start = 0
            while start < stack.shape[0]:
                take = min(stack.shape[0] - start, per_call - filled)
                current.append((key, stack, start, start + take))
                start += take
                filled += take
                if filled == per_call:
                    chunks.append(current)
                    current, filled = [], 0
        if current:
            chunks.append(current)
        return chunks

    def _decompose(self, chunk: list[_Piece]) -> list[tuple[_Key, int, np.ndarray]]:
        xp = self.backend.xp
        parts = [
            stack if (start, stop) == (0, stack.shape[0]) else stack[start:stop, ...]
            for _, stack, start, stop in chunk
        ]
        if self.backend.name == "numpy":  # LAPACK loops over a stack anyway: skip the copy
            values = np.concatenate([_singular_values(part, self.backend) for part in parts])
        else:  # one kernel launch for the whole batch
            grams = parts[0] if len(parts) == 1 else xp.concat(parts, axis=0)
            values = _singular_values(grams, self.backend)
        results, offset = [], 0
        for key, _, start, stop in chunk:
            results.append((key, start, values[offset : offset + stop - start]))
            offset += stop - start
        return results

    def _collect(
        self, results: list[tuple[_Key, int, np.ndarray]]
    ) -> Iterator[tuple[_Key, np.ndarray]]:
        for key, start, values in results:
            self.parts[key].append((start, values))
            self.remaining[key] -= values.shape[0]
            if self.remaining[key] == 0:
                parts = sorted(self.parts.pop(key), key=lambda part: part[0])
                del self.remaining[key]
                yield key, np.concatenate([part for _, part in parts], axis=0)


def layer_spectrum(
    name: str,
    weight: np.ndarray,
    in_channels: int,
    counts: list[int],
    backend: Backend | None = None,
) -> LayerSpectrum:
    """The spectrum of one folded weight for the given group counts (``1`` must be one)."""
    values = _grouped_values(weight, in_channels, counts, backend or numpy_backend())
    return _assemble(name, _frobenius_sq(weight), values)


def _grouped_values(
    weight: np.ndarray, in_channels: int, counts: list[int], backend: Backend
) -> dict[int, np.ndarray]:
    _check_groups(weight.shape, in_channels, counts)
    with backend.parallel() as executor:
        batches = _Batches(backend, BATCH_BYTES, executor)
        for groups, stack in _gram_stacks(backend.asarray(weight), counts, backend.xp).items():
            batches.add((0, groups), stack)
        return {groups: result for (_, groups), result in batches.flush(final=True)}


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
    return _grouped_values(weight, in_channels, [groups], backend or numpy_backend())[groups]


def compute_spectra(
    discovery: Discovery,
    max_groups: int,
    backend: Backend | None = None,
    progress: Progress | None = None,
    *,
    batch_bytes: int = BATCH_BYTES,
) -> dict[str, LayerSpectrum]:
    """Singular values of every layer of ``discovery`` for each candidate group count.

    Layers are read one at a time; their Gram matrices are batched by size across layers and
    decomposed by the backend's workers (see the module docstring for the byte budget and the
    tolerance).

    Args:
        discovery: the layers and their weights.
        max_groups: largest candidate group count.
        backend: array backend (NumPy when None); results come back as NumPy arrays.
        progress: called with ``("spectra", done, total)`` as layers complete.
        batch_bytes: byte budget of the Gram matrices of one batch.
    """
    backend = backend or numpy_backend()
    if batch_bytes < 1:
        raise ValueError(f"batch_bytes must be positive, got {batch_bytes}")
    layers = discovery.layers
    values: list[dict[int, np.ndarray]] = [{} for _ in layers]
    waiting = [0] * len(layers)
    frobenius_sq = [0.0] * len(layers)
    spectra: dict[str, LayerSpectrum] = {}

    def collect(results: Iterator[tuple[_Key, np.ndarray]]) -> None:
        for (index, groups), result in results:
            values[index][groups] = result
            waiting[index] -= 1
            if waiting[index] == 0:
                layer = layers[index]
                spectra[layer.name] = _assemble(layer.name, frobenius_sq[index], values[index])
                values[index] = {}
                if progress is not None:
                    progress("spectra", len(spectra), len(layers))

    with backend.parallel() as executor:
        batches = _Batches(backend, batch_bytes, executor)
        for index, layer in enumerate(layers):
            weight = discovery.weight(layer)
            counts = group_counts(layer, max_groups)
            _check_groups(weight.shape, layer.in_channels, counts)
            frobenius_sq[index] = _frobenius_sq(weight)
            grams = _gram_stacks(backend.asarray(weight), counts, backend.xp)
            waiting[index] = len(grams)
            for groups, stack in grams.items():
                batches.add((index, groups), stack)
            if batches.full:
                collect(batches.flush())
        collect(batches.flush(final=True))
    log.debug("spectra of %d layers", len(spectra))
    return {layer.name: spectra[layer.name] for layer in layers}


def error_table(spectrum: LayerSpectrum, groups: int, measure: str = "bound") -> np.ndarray:
    """Relative error ``ε(g, r)`` for ``r = 0 … k`` (index = rank; ``ε(g, k) = 0``).

    Args:
        spectrum: the layer's spectra.
        groups: ``g``.
        measure: ``"bound"`` for ``sqrt(Σ_i σ_{i,r+1}²)/‖W‖₂``, ``"max-group"`` for
            ``max_i σ_{i,r+1}/‖W‖₂``, or ``"frobenius"`` for the exact
            ``‖W − Ŵ‖_F/‖W‖_F = sqrt(Σ_i Σ_{j>r} σ_{i,j}²)/‖W‖_F``.
    """
    values = spectrum.singular_values[groups]
    if measure == "frobenius":
        if spectrum.frobenius_sq == 0.0:
            return np.zeros(values.shape[1] + 1)
        energy = np.sum(values * values, axis=0)
        tail = np.append(np.cumsum(energy[::-1])[::-1], 0.0)
        return np.sqrt(np.maximum(tail, 0.0) / spectrum.frobenius_sq)
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
