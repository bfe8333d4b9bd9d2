r"""Truncated factors of a layer for its chosen groups ``g`` and rank ``r``.

For each channel group ``W_i ∈ R^{f × (c/g)κ}`` with SVD ``W_i = Û_i Σ_i V̂_iᵀ``, keep the top
``r`` triplets and split ``√Σ`` evenly (DESIGN.md §2):

    U_i = Û_i √Σ_i   (f × r),        V_i = √Σ_i V̂_iᵀ   (r × (c/g)κ),

so ``Ŵ = [U_1 V_1 … U_g V_g]`` and both factors stay well scaled, which matters in fp16.
The factorized layer computes ``Σ_i U_i (V_i x_i)``; at full rank it is ``W x`` exactly.

**How the triplets are computed.** A full SVD of a large group matrix costs seconds (a
``2048 × 4608`` float64 SVD takes about 8 s on one core), so the top ``r`` singular vectors of
the *smaller side* come from a symmetric eigendecomposition of its Gram matrix in float64, and
the other side from one matrix product:

* ``f ≤ (c/g)κ``: ``W_i W_iᵀ = Q Λ Qᵀ``; with ``Q_r`` its top ``r`` eigenvectors,
  ``B = Q_rᵀ W_i`` (``r × (c/g)κ``), ``σ_j = ‖B_j‖`` (row norms), ``Û = Q_r``, ``Σ V̂ᵀ = B``;
* otherwise ``W_iᵀ W_i = Q Λ Qᵀ``; ``B = W_i Q_r`` (``f × r``), ``σ_j = ‖B_{:,j}‖``,
  ``Û Σ = B``, ``V̂ = Q_r``.

Either way ``Ŵ_i = Q_r Q_rᵀ W_i`` (or ``W_i Q_r Q_rᵀ``): the orthogonal projection of ``W_i``
onto the computed subspace, which *is* the rank-``r`` truncated SVD up to the accuracy of that
subspace. With ``τ = 2(m + 4)·u`` the Gram-path tolerance of spectra.py (``u = 2⁻⁵³``, ``m`` the
longer side of ``W_i``) and ``σ_j`` the singular values of ``W_i``:

    ‖W_i − Ŵ_i‖₂ ≤ sqrt(σ_{r+1}² + τ·σ_1²)                (always; the optimum is σ_{r+1}),
    ‖Ŵ_i − W_{i,r}‖₂ ≲ σ_1 · τ·σ_1² / (σ_r² − σ_{r+1}²)     (Davis–Kahan, given a gap at r),

where ``W_{i,r}`` is the exact truncated SVD. Singular vectors with well separated singular
values agree with an SVD's to the same accuracy. Signs are fixed so that the largest-magnitude
entry of every column of ``U_i`` is positive, so the output does not depend on the LAPACK
build or the device.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .backend import Backend, numpy_backend
from .types import Factors

__all__ = [
    "factorize",
    "factorize_with_error",
    "fix_signs",
    "reconstruct",
    "relative_error",
    "relative_error_bound",
]


def factorize(
    weight: np.ndarray, groups: int, rank: int, backend: Backend | None = None
) -> Factors:
    """Rank-``rank`` truncated SVD of each of ``groups`` column blocks of ``weight``.

    Args:
        weight: folded float64 weight ``W`` (``f × c·κ``).
        groups: ``g``; it must divide the columns.
        rank: ``r``, at most ``min(f, c·κ/g)``.
        backend: array backend (NumPy when None); the factors come back as NumPy arrays.

    Raises:
        ValueError: ``groups`` does not divide the columns or ``rank`` is out of range.
    """
    return _factorize(weight, groups, rank, backend or numpy_backend(), with_error=False)[0]


def factorize_with_error(
    weight: np.ndarray,
    groups: int,
    rank: int,
    spectral_norm: float,
    backend: Backend | None = None,
) -> tuple[Factors, float]:
    """``factorize``, and the actual relative error ``‖W − Ŵ‖₂ / ‖W‖₂`` of the factors.

    The error comes from the same eigendecompositions ``G_i = Q Λ Qᵀ`` as the factors, at
    little extra cost. With ``Q_⊥``, ``Λ_⊥`` the eigenpairs left out of group ``i``, its
    residual is ``E_i = Q_⊥Q_⊥ᵀ W_i`` (``f`` side) or ``W_i Q_⊥Q_⊥ᵀ`` (column side), so

        ‖E‖₂² = ‖Σ_i E_i E_iᵀ‖₂ = ‖K‖₂²,  K = [K_1 … K_g],
        K_i = Q_⊥ Λ_⊥^{1/2}  (f side)   or   K_i = W_i Q_⊥  (column side),

    and for ``g = 1`` simply ``‖E‖₂² = max Λ_⊥ = λ_{r+1}``. ``‖K‖₂`` is the square root of the
    largest eigenvalue of the smaller Gram matrix of ``K``. Nothing is subtracted, so there is
    no cancellation; the result agrees with ``relative_error`` of the same factors to the
    Gram-path tolerance (``tests/test_factorize.py``). Use ``relative_error`` for factors
    computed any other way.

    Args:
        weight, groups, rank, backend: as for ``factorize``.
        spectral_norm: ``‖W‖₂``.
    """
    factors, residual = _factorize(
        weight, groups, rank, backend or numpy_backend(), with_error=True
    )
    return factors, (residual / spectral_norm if spectral_norm > 0 else 0.0)


def _factorize(
    weight: np.ndarray, groups: int, rank: int, backend: Backend, with_error: bool
) -> tuple[Factors, float]:
    xp = backend.xp
    rows, cols = weight.shape
    width = cols // groups
    if groups < 1 or cols % groups or not 1 <= rank <= min(rows, width):
        raise ValueError(
            f"cannot factorize a {rows}×{cols} weight into {groups} groups of rank {rank}"
        )
    row_side = rows <= width
    with backend.parallel() as executor:
        blocks = xp.permute_dims(
            xp.reshape(backend.asarray(weight), (rows, groups, width)), (1, 0, 2)
        )
        transposed = xp.matrix_transpose(blocks)
        grams = xp.matmul(blocks, transposed) if row_side else xp.matmul(transposed, blocks)
        values, vectors = backend.split_map(executor, lambda part: _eigh(part, xp), grams)
        size = vectors.shape[-1]
        basis = xp.flip(vectors[:, :, size - rank :], axis=-1)  # top r, largest first
        if row_side:
            projected = xp.matmul(xp.matrix_transpose(basis), blocks)  # (g, r, width) = Σ V̂ᵀ
            root = _sqrt_norms(projected, -1, xp)  # (g, r)
            u = basis * root[:, None, :]
            v = projected / _nonzero(root, xp)[:, :, None]
        else:
            projected = xp.matmul(blocks, basis)  # (g, f, r) = Û Σ
            root = _sqrt_norms(projected, -2, xp)
            u = projected / _nonzero(root, xp)[:, None, :]
            v = xp.matrix_transpose(basis) * root[:, :, None]
        residual = 0.0
        if with_error and size > rank:
            residual = _residual_norm(values, vectors, blocks, size - rank, row_side, xp, backend)
    u, v = fix_signs(backend.to_numpy(u), backend.to_numpy(v))
    second = np.ascontiguousarray(np.transpose(u, (1, 0, 2)).reshape(rows, groups * rank))
    factors = Factors(groups=groups, rank=rank, first=np.ascontiguousarray(v), second=second)
    return factors, residual


def _eigh(grams: Any, xp: Any) -> tuple[Any, Any]:
    result = xp.linalg.eigh(grams)  # ascending eigenvalues
    return result.eigenvalues, result.eigenvectors


def _residual_norm(
    values: Any, vectors: Any, blocks: Any, left: int, row_side: bool, xp: Any, backend: Backend
) -> float:
    """``‖E‖₂`` from the ``left`` eigenpairs each group leaves out (see factorize_with_error)."""
    dropped = xp.maximum(values[:, :left], 0.0)  # (g, left), ascending
    if values.shape[0] == 1:
        return float(backend.to_numpy(xp.sqrt(xp.max(dropped))))
    rest = vectors[:, :, :left]
    # (g, f, left): Q_⊥ Λ_⊥^{1/2} on the f side, W_i Q_⊥ on the column side
    parts = rest * xp.sqrt(dropped)[:, None, :] if row_side else xp.matmul(blocks, rest)
    count, rows, _ = parts.shape
    matrix = xp.reshape(xp.permute_dims(parts, (1, 0, 2)), (rows, count * left))  # K
    transposed = xp.matrix_transpose(matrix)
    small = xp.matmul(matrix, transposed) if rows <= count * left else xp.matmul(transposed, matrix)
    largest = float(backend.to_numpy(xp.max(xp.linalg.eigvalsh(small))))
    return float(np.sqrt(max(largest, 0.0)))


def _sqrt_norms(array: Any, axis: int, xp: Any) -> Any:
    """``sqrt(σ)`` with ``σ`` the vector norms of ``array`` along ``axis``."""
    return xp.sqrt(xp.linalg.vector_norm(array, axis=axis))


def _nonzero(values: Any, xp: Any) -> Any:
    """``values`` with zeros replaced by ones: a zero singular value has a zero row or column
    in ``B``, which then stays zero instead of becoming NaN."""
    return xp.where(values > 0, values, xp.ones_like(values))


def fix_signs(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Make the largest-magnitude entry of each column of ``u`` (``(g, f, r)``) positive, and
    flip the matching rows of ``v`` (``(g, r, w)``) with them.

    Singular vectors are defined up to sign, and LAPACK builds and GPUs choose differently;
    fixing them makes the written model identical for identical inputs (the truncated SVD here
    and the whitened factors of whiten.py alike).
    """
    rows = np.argmax(np.abs(u), axis=1)  # (g, r)
    signs = np.sign(np.take_along_axis(u, rows[:, None, :], axis=1))[:, 0, :]
    signs[signs == 0] = 1.0
    return u * signs[:, None, :], v * signs[:, :, None]


def reconstruct(factors: Factors) -> np.ndarray:
    """``Ŵ = [U_1 V_1 … U_g V_g]`` as a float64 ``f × c·κ`` matrix."""
    g, r = factors.groups, factors.rank
    rows = factors.second.shape[0]
    u = np.transpose(factors.second.reshape(rows, g, r), (1, 0, 2)).astype(np.float64)
    blocks = np.matmul(u, factors.first.astype(np.float64))  # (g, f, width)
    return np.transpose(blocks, (1, 0, 2)).reshape(rows, -1)


def relative_error(
    weight: np.ndarray,
    factors: Factors,
    spectral_norm: float,
    backend: Backend | None = None,
) -> float:
    """``‖W − Ŵ‖₂ / ‖W‖₂``, with the residual's spectral norm computed exactly.

    ``‖E‖₂² = λ_max(E Eᵀ) = λ_max(Eᵀ E)``; the smaller of the two Gram matrices of the residual
    ``E = W − Ŵ`` is formed in float64 and its largest eigenvalue taken. ``E`` is formed
    explicitly, so there is no cancellation: the result is accurate to about ``n·u`` relative
    (``n`` the Gram size, ``u = 2⁻⁵³``).

    Args:
        weight: the folded float64 weight ``W``.
        factors: its factors.
        spectral_norm: ``‖W‖₂``.
        backend: array backend (NumPy when None).
    """
    if spectral_norm == 0.0:
        return 0.0
    residual = weight - reconstruct(factors)
    if not np.any(residual):
        return 0.0
    backend = backend or numpy_backend()
    xp = backend.xp
    with backend.parallel():
        matrix = backend.asarray(residual)
        if residual.shape[0] <= residual.shape[1]:
            gram = xp.matmul(matrix, xp.matrix_transpose(matrix))
        else:
            gram = xp.matmul(xp.matrix_transpose(matrix), matrix)
        largest = float(backend.to_numpy(xp.max(xp.linalg.eigvalsh(gram))))
    return float(np.sqrt(max(largest, 0.0))) / spectral_norm


def relative_error_bound(
    weight: np.ndarray,
    factors: Factors,
    spectral_norm: float,
    backend: Backend | None = None,
) -> float:
    """``sqrt(Σ_i ‖W_i − Ŵ_i‖₂²) / ‖W‖₂``, the per-group bound on ``‖W − Ŵ‖₂ / ‖W‖₂``.

    ``‖[E_1 … E_g]‖₂² = ‖Σ_i E_i E_iᵀ‖₂ ≤ Σ_i ‖E_i‖₂²`` (DESIGN.md §3). For the truncated SVD
    ``‖E_i‖₂ = σ_{i,r+1}``, which gives spectra.py's bound; for any other factors of the same
    ``(g, r)`` (the whitened ones of whiten.py) it is the bound of *those* factors, with each
    group's ``‖E_i‖₂`` from the largest eigenvalue of its smaller Gram matrix in float64.
    """
    if spectral_norm == 0.0:
        return 0.0
    groups = factors.groups
    residual = weight - reconstruct(factors)
    if not np.any(residual):
        return 0.0
    rows = residual.shape[0]
    blocks = np.ascontiguousarray(np.transpose(residual.reshape(rows, groups, -1), (1, 0, 2)))
    backend = backend or numpy_backend()
    xp = backend.xp
    with backend.parallel():
        matrix = backend.asarray(blocks)
        transposed = xp.matrix_transpose(matrix)
        if blocks.shape[1] <= blocks.shape[2]:
            gram = xp.matmul(matrix, transposed)
        else:
            gram = xp.matmul(transposed, matrix)
        largest = backend.to_numpy(xp.max(xp.linalg.eigvalsh(gram), axis=-1))
    return float(np.sqrt(np.sum(np.maximum(largest, 0.0)))) / spectral_norm
