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
steps for ``analyze`` (``calibrate``), only for the group counts the allocator can use
(``candidate_groups``).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import replace

import numpy as np
import onnx

from .activations import collect_statistics
from .backend import Backend, numpy_backend
from .config import HEAD_FLOOR, ROW_FLOOR
from .cost import candidate_params
from .data import read_arrays
from .errors import CalibrationError
from .feeds import check_feeds
from .records import Calibration
from .sessions import fixed_batch
from .spectra import group_counts
from .types import Discovery, Layer, Progress, UserChoice
from .whiten import whitened_spectra

__all__ = ["calibrate", "candidate_groups", "check_calibration", "load_calibration"]

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


def candidate_groups(
    discovery: Discovery,
    max_groups: int,
    rank_multiple: int | str = 1,
    choices: Mapping[str, UserChoice] | None = None,
) -> dict[str, list[int]]:
    """The group counts whose statistics the allocator can use, per layer.

    Every layer gets ``g = 1``: its whitened spectrum gives ``‖W S‖_F``, the scale of every
    output error. Beyond it:

    * every layer gets the counts of ``spectra.group_counts(layer, max_groups)`` that have a
      row in the allocator's table (``allocate.build_table``): a rank ``r ≤ min(f, c·κ/g)``
      with ``g·r`` a multiple of ``rank_multiple`` whose factors save weights,
      ``r·(g·f + c·κ) < f·c·κ``. The smallest such ``r`` is ``m / gcd(g, m)``.
      ``--rank-multiple auto`` only drops rows later (``allocate.with_block``), so it keeps
      every count;
    * a layer the user pinned (``--rank``, ``--groups-for``, ``--recipe``) adds its pinned
      count, even outside ``max_groups`` (``choices.constrain_table``). It keeps the others,
      so that the statistics, which are summed in an order that depends on the counts
      (``accumulate.plan_statistics``), and so the factors, are those of the run a recipe
      came from, bit for bit; an excluded layer gets ``g = 1`` alone.

    Args:
        discovery: the compressible layers.
        max_groups: largest candidate group count (``budgets.group_limit``).
        rank_multiple: ``--rank-multiple`` (``"auto"`` counts as 1).
        choices: the user's choices by layer name (``choices.user_choices``).
    """
    multiple = rank_multiple if isinstance(rank_multiple, int) else 1
    result = {}
    for layer in discovery.layers:
        choice = (choices or {}).get(layer.name)
        if choice is not None and choice.kind == "excluded":
            result[layer.name] = [1]
            continue
        counts = {g for g in group_counts(layer, max_groups) if _has_row(layer, g, multiple)}
        result[layer.name] = sorted({1, *counts, *([choice.groups or 1] if choice else [])})
    return result


def _has_row(layer: Layer, groups: int, multiple: int) -> bool:
    rank = multiple // math.gcd(groups, multiple)
    f, cols = layer.out_channels, layer.cols
    return rank <= min(f, cols // groups) and candidate_params(f, cols, groups, rank) < layer.params


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
    groups: Mapping[str, Sequence[int]] | None = None,
    backend: Backend | None = None,
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
        groups: layer name -> the group counts to compute (default:
            ``candidate_groups(discovery, max_groups)``); no other count gets statistics.
        backend: where the statistics are accumulated (default: NumPy on every core).
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
    if groups is None:
        groups = candidate_groups(discovery, max_groups)
    backend = backend or numpy_backend()
    statistics = collect_statistics(
        discovery,
        feeds,
        max_groups,
        providers,
        progress,
        groups=groups,
        backend=backend,
        row_floor=row_floor,
        head_floor=head_floor,
    )
    spectra = whitened_spectra(discovery, statistics, max_groups, groups, backend)
    samples = int(next(iter(feeds.values())).shape[0])
    return Calibration(
        source=source,
        feeds=dict(feeds),
        samples=samples,
        statistics=statistics,
        spectra=spectra,
        providers=list(providers),
    )
