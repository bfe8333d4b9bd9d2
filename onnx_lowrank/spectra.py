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

Only singular values are needed, so they come from the eigenvalues of the smaller Gram matrix
of each group, in float64: ``σ² = λ`` (clipped at 0). All groups of one group count are
batched into one ``eigvalsh`` call.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .backend import Backend, numpy_backend
from .discover import Discovery, Layer

__all__ = [
    "LayerSpectrum",
    "compute_spectra",
    "error_table",
    "group_counts",
    "grouped_singular_values",
]

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]


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
    xp = backend.xp
    rows, cols = weight.shape
    width = cols // groups
    if in_channels % groups or cols % groups:
        raise ValueError(f"{groups} groups do not divide {in_channels} input channels")
    blocks = xp.permute_dims(xp.reshape(backend.asarray(weight), (rows, groups, width)), (1, 0, 2))
    if rows <= width:
        gram = xp.matmul(blocks, xp.matrix_transpose(blocks))
    else:
        gram = xp.matmul(xp.matrix_transpose(blocks), blocks)
    eigenvalues = xp.linalg.eigvalsh(gram)  # ascending
    values = xp.sqrt(xp.clip(eigenvalues, 0.0, None))
    return np.ascontiguousarray(backend.to_numpy(values)[:, ::-1])


def compute_spectra(
    discovery: Discovery,
    max_groups: int,
    backend: Backend | None = None,
    progress: Progress | None = None,
) -> dict[str, LayerSpectrum]:
    """Singular values of every layer of ``discovery`` for each candidate group count."""
    backend = backend or numpy_backend()
    spectra: dict[str, LayerSpectrum] = {}
    total = len(discovery.layers)
    for done, layer in enumerate(discovery.layers):
        weight = discovery.weight(layer)
        by_groups = {
            groups: grouped_singular_values(weight, layer.in_channels, groups, backend)
            for groups in group_counts(layer, max_groups)
        }
        spectra[layer.name] = LayerSpectrum(
            name=layer.name,
            spectral_norm=float(by_groups[1][0, 0]),
            frobenius_sq=float(np.sum(weight * weight)),
            singular_values=by_groups,
        )
        backend.free()
        if progress is not None:
            progress("spectra", done + 1, total)
    return spectra


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
