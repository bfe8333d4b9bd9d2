"""Factors of the layers the allocation chose: truncated SVD factors of every chosen layer (in
parallel, with their measured relative error), and whitened factors where calibration
statistics exist, with the error bound of the factors actually used.
"""

from __future__ import annotations

import dataclasses
from dataclasses import replace

import numpy as np
import onnx

from .factorize import factorize_with_error, relative_error, relative_error_bound
from .records import CalibratedLayer, Calibration
from .types import Analysis, CandidateTable, Discovery, Factors, Layer, LayerSpectrum, Progress
from .whiten import factorize_layers

__all__ = ["factorize_calibrated", "factorize_chosen", "with_errors"]


def factorize_chosen(
    discovery: Discovery,
    tables: list[CandidateTable],
    choices: list[int],
    spectra: dict[str, LayerSpectrum],
    backend,
    progress: Progress | None,
) -> dict[str, tuple[Factors, float]]:
    """Factors and actual relative error of every layer the allocation factorizes."""
    chosen = [
        (layer, table, row)
        for layer, table, row in zip(discovery.layers, tables, choices, strict=True)
        if table.groups[row] > 0
    ]

    def work(item: tuple[Layer, CandidateTable, int]) -> tuple[str, tuple[Factors, float]]:
        layer, table, row = item
        weight = discovery.weight(layer)
        groups, rank = int(table.groups[row]), int(table.ranks[row])
        spectrum = spectra.get(layer.name)  # none for a recipe: the error is not measured
        norm = 0.0 if spectrum is None else spectrum.spectral_norm
        factors, error = factorize_with_error(weight, groups, rank, norm, backend)
        if spectrum is None:
            error = None
        if layer.weight_dtype == onnx.TensorProto.FLOAT and layer.stored_dtype is None:
            # the rewrite writes float32 anyway; holding float32 halves the factors' memory
            factors = dataclasses.replace(
                factors,
                first=factors.first.astype(np.float32),
                second=factors.second.astype(np.float32),
            )
        return layer.name, (factors, error)

    result: dict[str, tuple[Factors, float]] = {}
    for done, (name, value) in enumerate(backend.map(work, chosen)):  # layers in parallel
        result[name] = value
        if progress is not None:
            progress("factorize", done + 1, len(chosen))
    return result


def factorize_calibrated(
    analysis: Analysis,
    tables: list[CandidateTable],
    choices: list[int],
    calibration: Calibration,
    progress: Progress | None,
) -> tuple[dict[str, CalibratedLayer], dict[str, tuple[Factors, float]]]:
    """Whitened factors of the chosen layers, with their actual relative weight error and
    their error bound (``CalibratedLayer.error_bound``).

    Layers without calibration statistics (inside subgraphs) get plain factors.
    """
    discovery = analysis.discovery
    calibrated_rows = [
        (table, row) if table.layer in calibration.statistics else (table, 0)
        for table, row in zip(tables, choices, strict=True)
    ]
    plain_rows = [
        0 if table.layer in calibration.statistics else row
        for table, row in zip(tables, choices, strict=True)
    ]
    chosen = [
        (layer, int(table.groups[row]), int(table.ranks[row]))
        for layer, (table, row) in zip(discovery.layers, calibrated_rows, strict=True)
        if table.groups[row] > 0
    ]
    calibrated = factorize_layers(calibration, discovery, chosen, progress)
    factors = factorize_chosen(
        discovery, tables, plain_rows, analysis.spectra, analysis.backend, progress
    )
    for layer, _, _ in chosen:
        item = calibrated[layer.name]
        spectrum = analysis.spectra.get(layer.name)
        error = None
        if spectrum is not None:  # a recipe's fixed layers have no spectra
            weight = discovery.weight(layer)
            error = relative_error(weight, item.factors, spectrum.spectral_norm)
            # the plain SVD's bound does not hold for whitened factors: report theirs
            bound = relative_error_bound(weight, item.factors, spectrum.spectral_norm)
            calibrated[layer.name] = replace(item, error_bound=bound)
        factors[layer.name] = (item.factors, error)
    return calibrated, factors


def with_errors(
    analysis: Analysis, calibrated: dict[str, CalibratedLayer]
) -> tuple[dict[str, CalibratedLayer], dict[str, tuple[Factors, float | None]]]:
    """The layers of ``calibrated`` (refitted, refit.py) with the weight-error bound of their
    own factors (``CalibratedLayer.error_bound``), and their factors with their actual relative
    weight error; None for a layer without spectra (a recipe's fixed layers)."""
    discovery = analysis.discovery
    bounded = dict(calibrated)
    factors: dict[str, tuple[Factors, float | None]] = {}
    for name, item in calibrated.items():
        spectrum = analysis.spectra.get(name)
        error = None
        if spectrum is not None:
            weight = discovery.weight(discovery.layer(name))
            error = relative_error(weight, item.factors, spectrum.spectral_norm)
            bound = relative_error_bound(weight, item.factors, spectrum.spectral_norm)
            bounded[name] = replace(item, error_bound=bound)
        factors[name] = (item.factors, error)
    return bounded, factors
