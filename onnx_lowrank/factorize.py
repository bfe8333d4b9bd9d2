r"""Truncated factors of a layer for its chosen groups ``g`` and rank ``r``.

For each channel group ``W_i ∈ R^{f × (c/g)κ}`` with SVD ``W_i = Û_i Σ_i V̂_iᵀ``, keep the top
``r`` triplets and split ``√Σ`` evenly (DESIGN.md §2):

    U_i = Û_i √Σ_i   (f × r),        V_i = √Σ_i V̂_iᵀ   (r × (c/g)κ),

so ``Ŵ = [U_1 V_1 … U_g V_g]`` and both factors stay well scaled, which matters in fp16.
The factorized layer computes ``Σ_i U_i (V_i x_i)``; at full rank it is ``W x`` exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .backend import Backend, numpy_backend

__all__ = ["Factors", "factorize", "reconstruct", "relative_error"]


@dataclass(frozen=True)
class Factors:
    """The factors of one layer.

    Attributes:
        groups: ``g``.
        rank: ``r`` per group.
        first: ``(g, r, (c/g)·κ)``: ``V_i`` of every group, applied first.
        second: ``(f, g·r)``: ``[U_1 … U_g]``, applied second.
    """

    groups: int
    rank: int
    first: np.ndarray
    second: np.ndarray


def factorize(
    weight: np.ndarray, groups: int, rank: int, backend: Backend | None = None
) -> Factors:
    """Rank-``rank`` truncated SVD of each of ``groups`` column blocks of ``weight``.

    Args:
        weight: folded float64 weight ``W`` (``f × c·κ``).
        groups: ``g``; it must divide the columns.
        rank: ``r``, at most ``min(f, c·κ/g)``.
        backend: array backend (NumPy when None).
    """
    backend = backend or numpy_backend()
    xp = backend.xp
    rows, cols = weight.shape
    width = cols // groups
    if cols % groups or not 1 <= rank <= min(rows, width):
        raise ValueError(
            f"cannot factorize a {rows}×{cols} weight into {groups} groups of rank {rank}"
        )
    blocks = xp.permute_dims(xp.reshape(backend.asarray(weight), (rows, groups, width)), (1, 0, 2))
    left, values, right = xp.linalg.svd(blocks, full_matrices=False)
    scale = xp.sqrt(values[:, :rank])
    u = left[:, :, :rank] * scale[:, None, :]  # (g, f, r)
    v = right[:, :rank, :] * scale[:, :, None]  # (g, r, width)
    u, v = backend.to_numpy(u), backend.to_numpy(v)
    u, v = _fix_signs(u, v)
    second = np.ascontiguousarray(np.transpose(u, (1, 0, 2)).reshape(rows, groups * rank))
    return Factors(groups=groups, rank=rank, first=np.ascontiguousarray(v), second=second)


def _fix_signs(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Make the largest-magnitude entry of each column of ``u`` positive.

    SVD sign choices differ between LAPACK builds and GPUs; fixing them makes the written model
    identical for identical inputs.
    """
    rows = np.argmax(np.abs(u), axis=1)  # (g, r)
    signs = np.sign(np.take_along_axis(u, rows[:, None, :], axis=1))[:, 0, :]
    signs[signs == 0] = 1.0
    return u * signs[:, None, :], v * signs[:, :, None]


def reconstruct(factors: Factors) -> np.ndarray:
    """``Ŵ = [U_1 V_1 … U_g V_g]`` as a float64 ``f × c·κ`` matrix."""
    g, r = factors.groups, factors.rank
    rows = factors.second.shape[0]
    u = factors.second.reshape(rows, g, r)
    blocks = np.einsum("fgr,grw->fgw", u, factors.first)
    return blocks.reshape(rows, -1)


def relative_error(
    weight: np.ndarray,
    factors: Factors,
    spectral_norm: float,
    iterations: int = 50,
    tolerance: float = 1e-9,
    block: int = 8,
    seed: int = 0,
) -> float:
    """``‖W − Ŵ‖₂ / ‖W‖₂``, with the residual's norm from block power iteration.

    Subspace iteration on ``EᵀE`` with ``block`` orthonormal vectors converges like
    ``(σ_{block+1}/σ_1)²`` per step, so clustered top singular values (common in residuals)
    do not stall it the way a single power-iteration vector does. The estimate is the largest
    singular value of ``E Q`` (Rayleigh-Ritz); it stops when that changes by less than
    ``tolerance`` (relative) or after ``iterations`` steps.
    """
    if spectral_norm == 0.0:
        return 0.0
    residual = weight - reconstruct(factors)
    if not np.any(residual):
        return 0.0
    small = residual if residual.shape[0] >= residual.shape[1] else residual.T
    width = min(block, small.shape[1])
    basis = np.linalg.qr(np.random.default_rng(seed).standard_normal((small.shape[1], width)))[0]
    estimate = 0.0
    for _ in range(iterations):
        image = small @ basis
        previous, estimate = estimate, float(np.linalg.svd(image, compute_uv=False)[0])
        if estimate == 0.0 or abs(estimate - previous) <= tolerance * estimate:
            break
        basis = np.linalg.qr(small.T @ image)[0]
    return estimate / spectral_norm
