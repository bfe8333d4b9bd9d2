"""The factors of the chosen layers (layer_factors.py): made once per ``(layer, g, r)`` in a run,
shared by the choices ``--latency`` times end to end and the final rewrite, and the same as
factors made afresh."""

from __future__ import annotations

import hashlib
from collections import Counter

import pytest
from builders import MNIST, MODELS, mnist_calibration

from onnx_lowrank import CompressionConfig, factorize, latency, whiten
from onnx_lowrank.layer_factors import choice_model
from onnx_lowrank.pipeline import analyze, candidate_tables, choose, realize


@pytest.fixture(autouse=True)
def few_rounds(monkeypatch):
    """Timing values are not asserted here; a few rounds keep the tests fast."""
    monkeypatch.setattr(latency, "MIN_ROUNDS", 2)
    monkeypatch.setattr(latency, "MAX_ROUNDS", 3)
    monkeypatch.setattr(latency, "LAYER_BUDGET_S", 0.01)
    monkeypatch.setattr(latency, "CHOICE_ROUNDS", 5)


def _counting(monkeypatch) -> Counter:
    """Every factorization of a weight (truncated SVD or whitened), counted by the weight's
    bytes, ``g`` and ``r``: both factorize.factorize and factorize_with_error go through
    ``factorize._factorize``, every whitened factorization through ``whitened_factors``."""
    made: Counter = Counter()
    plain, whitened = factorize._factorize, whiten.whitened_factors

    def key(weight, groups, rank):
        return hashlib.sha1(weight.tobytes()).hexdigest(), int(groups), int(rank)

    def counted_plain(weight, groups, rank, *args, **kwargs):
        made[key(weight, groups, rank)] += 1
        return plain(weight, groups, rank, *args, **kwargs)

    def counted_whitened(weight, stats, groups, rank, *args, **kwargs):
        made[key(weight, groups, rank)] += 1
        return whitened(weight, stats, groups, rank, *args, **kwargs)

    monkeypatch.setattr(factorize, "_factorize", counted_plain)
    monkeypatch.setattr(whiten, "whitened_factors", counted_whitened)
    return made


def _options(calibrated: bool, folder) -> tuple:
    if calibrated:
        return MNIST, {"calibration": mnist_calibration(folder, 64), "refit": True}
    return MODELS / "mtcnn_onet.onnx", {}


@pytest.mark.parametrize("calibrated", [False, True], ids=["onet-data-free", "mnist-calibrated"])
def test_latency_rounds_and_the_rewrite_factorize_each_layer_once(
    monkeypatch, tmp_path, calibrated
):
    """``--latency`` times up to four choices end to end, each with the factors that will be
    written; the rounds and the final rewrite factorize every ``(layer, g, r)`` once (the old
    code factorized the chosen layers again in every round and once more in realize)."""
    path, options = _options(calibrated, tmp_path)
    config = CompressionConfig(latency=0.6, validate=False, max_groups=4, **options)
    analysis = analyze(path, config)
    tables = candidate_tables(analysis, config)
    made = _counting(monkeypatch)
    choices = choose(analysis, tables, config)
    assert made and any(row > 0 for row in choices)
    realize(analysis, tables, choices, config)
    assert max(made.values()) == 1, [key for key, count in made.items() if count > 1]
    assert not analysis.factors  # released with the weights after the rewrite


@pytest.mark.parametrize("calibrated", [False, True], ids=["onet-data-free", "mnist-calibrated"])
def test_cached_factors_write_the_same_model_as_fresh_ones(tmp_path, calibrated):
    """The model written from the factors ``--latency`` made while timing, and the models it
    timed, are byte for byte those a fresh analysis makes for the same choice (refit included
    with calibration data)."""
    path, options = _options(calibrated, tmp_path)
    config = CompressionConfig(latency=0.6, validate=False, max_groups=4, **options)
    analysis = analyze(path, config)
    tables = candidate_tables(analysis, config)
    choices = choose(analysis, tables, config)
    assert analysis.factors  # the kept choice's factors, made while timing it
    timed = choice_model(analysis, tables, choices).SerializeToString()
    written = realize(analysis, tables, choices, config).model.SerializeToString()

    fresh = analyze(path, config)
    assert not fresh.factors
    assert choice_model(fresh, tables, choices).SerializeToString() == timed
    fresh.factors.clear()
    again = realize(fresh, tables, choices, config).model.SerializeToString()
    assert again == written
