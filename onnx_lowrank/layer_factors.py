"""Factors of the layers the allocation chose: truncated SVD factors (in parallel, with their
measured relative error), and whitened factors where calibration statistics exist, with the
error bound of the factors actually used; and the model rewritten with them.

Every factorization goes through ``cached_factors``, the one place that decides which layers
get whitened factors, and which keeps what it made in ``Analysis.factors`` by ``(layer, g, r)``:
the choices a ``--latency`` budget times end to end (``choice_model``, handed to
``speed.measured_latency`` by the pipeline) and the final rewrite (``chosen_factors``) then
factorize each ``(layer, g, r)`` once. The factors depend on nothing else that can change within
one analysis: the weight, the calibration statistics and the backend belong to the analysis.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import onnx

from .factorize import factorize_with_error, relative_error, relative_error_bound
from .records import CalibratedLayer
from .rewrite import rewrite
from .types import Analysis, CandidateTable, Factors, Layer, Progress
from .whiten import factorize_layers, node_biases

__all__ = ["cached_factors", "choice_model", "chosen_factors", "chosen_layers", "with_errors"]

#: ``(layer, g, r)`` of one factorized layer.
Chosen = tuple[Layer, int, int]


def chosen_layers(
    analysis: Analysis, tables: Sequence[CandidateTable], choices: Sequence[int]
) -> list[Chosen]:
    """``(layer, g, r)`` of every layer the choice factorizes, in discovery order."""
    return [
        (layer, int(table.groups[row]), int(table.ranks[row]))
        for layer, table, row in zip(analysis.discovery.layers, tables, choices, strict=True)
        if table.groups[row] > 0
    ]


def cached_factors(
    analysis: Analysis, chosen: Sequence[Chosen], progress: Progress | None = None
) -> tuple[dict[str, CalibratedLayer], dict[str, tuple[Factors, float | None]]]:
    """Factors of every chosen ``(layer, g, r)``: from ``analysis.factors``, else made (and kept).

    Layers with calibration statistics get whitened factors and their bias correction
    (``whiten.factorize_layers``; returned as made, without ``error_bound``); the others (all
    of them without calibration, layers inside subgraphs with it) truncated SVD factors with
    their actual relative weight error (None for a layer without spectra: a recipe's fixed
    layers), held in float32 when the rewrite writes float32 anyway.

    Returns:
        ``(whitened, plain)``, each by layer name, in the order of ``chosen``.
    """
    calibration, cache = analysis.calibration, analysis.factors
    statistics = calibration.statistics if calibration is not None else {}
    whitened = [item for item in chosen if item[0].name in statistics]
    plain = [item for item in chosen if item[0].name not in statistics]
    missing = [item for item in whitened if _key(item) not in cache]
    if missing:
        made = factorize_layers(calibration, analysis.discovery, missing, progress)
        cache.update({_key(item): made[item[0].name] for item in missing})
    missing = [item for item in plain if _key(item) not in cache]
    made = analysis.backend.map(lambda item: _plain(analysis, item), missing)  # in parallel
    for done, (item, value) in enumerate(zip(missing, made, strict=True)):
        cache[_key(item)] = value
        if progress is not None:
            progress("factorize", done + 1, len(missing))
    return (
        {item[0].name: cache[_key(item)] for item in whitened},
        {item[0].name: cache[_key(item)] for item in plain},
    )


def _key(item: Chosen) -> tuple[str, int, int]:
    return item[0].name, item[1], item[2]


def _plain(analysis: Analysis, item: Chosen) -> tuple[Factors, float | None]:
    layer, groups, rank = item
    spectrum = analysis.spectra.get(layer.name)  # none for a recipe: the error is not measured
    norm = 0.0 if spectrum is None else spectrum.spectral_norm
    weight = analysis.discovery.weight(layer)
    factors, error = factorize_with_error(weight, groups, rank, norm, analysis.backend)
    if layer.weight_dtype == onnx.TensorProto.FLOAT and layer.stored_dtype is None:
        # the rewrite writes float32 anyway; holding float32 halves the factors' memory
        factors = dataclasses.replace(
            factors,
            first=factors.first.astype(np.float32),
            second=factors.second.astype(np.float32),
        )
    return factors, None if spectrum is None else error


def chosen_factors(
    analysis: Analysis,
    tables: Sequence[CandidateTable],
    choices: Sequence[int],
    progress: Progress | None = None,
) -> tuple[dict[str, CalibratedLayer] | None, dict[str, tuple[Factors, float | None]]]:
    """Factors and actual relative weight error of every layer the choice factorizes, and with
    calibration data the whitened layers with the error bound of their own factors
    (``CalibratedLayer.error_bound``); None without calibration data.

    The factors come in discovery order, the whitened layers after the plain ones.
    """
    chosen = chosen_layers(analysis, tables, choices)
    whitened, factors = cached_factors(analysis, chosen, progress)
    factors = dict(factors)
    if analysis.calibration is None:
        return None, factors
    calibrated = dict(whitened)
    discovery = analysis.discovery
    for name, item in whitened.items():
        spectrum = analysis.spectra.get(name)
        error = None
        if spectrum is not None:  # a recipe's fixed layers have no spectra
            weight = discovery.weight(discovery.layer(name))
            error = relative_error(weight, item.factors, spectrum.spectral_norm)
            # the plain SVD's bound does not hold for whitened factors: report theirs
            bound = relative_error_bound(weight, item.factors, spectrum.spectral_norm)
            calibrated[name] = replace(item, error_bound=bound)
        factors[name] = (item.factors, error)
    return calibrated, factors


def choice_model(
    analysis: Analysis, tables: Sequence[CandidateTable], choices: Sequence[int]
) -> onnx.ModelProto:
    """``analysis.model`` with ``choices`` factorized by the factors ``pipeline.realize`` writes
    (``cached_factors``: the same ones, made once), with the corrected biases of whitened
    layers. The sequential refit (``--refit``) is left out: it changes the factors' values a
    little, not their shapes. The seconds spent go to ``analysis.timings`` ("factorize",
    "rewrite").

    The values matter for speed, not only the shapes: ONNX Runtime's CPU PRelu runs up to 8
    times slower on inputs of unpredictable sign, and random factors of O-Net's chosen shapes
    made its PRelu inputs just that, so the model timed end to end measured 0.74 of the
    original where the written one ran at 0.47 (docs/performance.md, "Why O-Net landed below
    F").
    """
    started = time.perf_counter()
    chosen = chosen_layers(analysis, tables, choices)
    whitened, plain = cached_factors(analysis, chosen)
    factorized = time.perf_counter()
    replacements = [
        (layer, whitened[layer.name].factors) for layer, _, _ in chosen if layer.name in whitened
    ]
    replacements += [(layer, plain[layer.name][0]) for layer, _, _ in chosen if layer.name in plain]
    model = rewrite(analysis.model, replacements, biases=node_biases(whitened.values()))
    timings = analysis.timings
    timings["factorize"] = timings.get("factorize", 0.0) + factorized - started
    timings["rewrite"] = timings.get("rewrite", 0.0) + time.perf_counter() - factorized
    return model


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
