r"""Calibration-aware compression: read and check the calibration data, and compute what
``analyze`` needs from it.

Data-free factorization minimizes ``‖W − Ŵ‖``. Given real inputs, onnx-lowrank minimizes
instead the error of each layer's *outputs* on them (the idea of ASVD and SVD-LLM), with the
bias corrected for the input mean. The work lives in four rooms, each with its maths:

* activations.py: the calibration set through ONNX Runtime, and each layer's input mean and
  covariance (im2col patches, tied weights, the cheaper side, row weights of embedding tables
  and classifier heads);
* whiten.py: whitened spectra and factors, the output-error tables, bias correction and
  ``factorize_layers``;
* output_errors.py: the relative output errors measured after compression;
* sessions.py: the probe runner (a model with extra outputs, run in batches).

This module reads the data (``load_calibration``, ``check_calibration``) and runs the first two
steps for ``analyze`` (``calibrate``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import replace

import numpy as np
import onnx

from .activations import collect_statistics
from .config import HEAD_FLOOR, ROW_FLOOR
from .data import read_arrays
from .errors import CalibrationError
from .feeds import check_feeds
from .records import Calibration
from .sessions import fixed_batch
from .types import Discovery, Progress
from .whiten import whitened_spectra

__all__ = ["calibrate", "check_calibration", "load_calibration"]

log = logging.getLogger(__name__)


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
