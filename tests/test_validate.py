"""Validation speed rules: latency on one sample of a dynamic batch, and a time budget."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from builders import MNIST, conv_model, random_feed

import onnx_lowrank.validate as validate_module
from onnx_lowrank import CompressionConfig, compress
from onnx_lowrank.report import format_validation
from onnx_lowrank.validate import latency_feeds, random_inputs, validate


def test_latency_uses_one_sample_of_a_dynamic_batch():
    model = onnx.load(MNIST)
    feeds = random_inputs(model, {})
    assert feeds["input"].shape[0] == validate_module.RANDOM_BATCH
    batch, timed = latency_feeds(model, feeds)
    assert batch == 1
    np.testing.assert_array_equal(timed["input"], feeds["input"][:1])


def test_latency_uses_the_full_inputs_of_a_static_batch():
    weight = random_feed((4, 3, 3, 3))
    model = conv_model(weight, (6, 6), batch=2)
    feeds = {"x": random_feed((2, 3, 6, 6))}
    batch, timed = latency_feeds(model, feeds)
    assert batch is None and timed["x"].shape == (2, 3, 6, 6)


def test_real_model_report_records_latency_batch_and_runs():
    result = compress(MNIST, CompressionConfig(params=0.5, latency_runs=3))
    report = result.report.validation
    assert report.passed and report.provider == "CPUExecutionProvider"
    assert report.latency_batch == 1 and report.latency_runs == 3
    assert report.latency_ms_before > 0 and report.latency_ms_after > 0
    assert report.to_dict()["latency_runs"] == 3


def test_latency_stops_at_the_time_budget(monkeypatch):
    """With no time budget, only the minimum number of pairs is timed."""
    monkeypatch.setattr(validate_module, "LATENCY_BUDGET_S", 0.0)
    model = onnx.load(MNIST)
    report = validate(model, model, CompressionConfig(params=0.5, latency_runs=50))
    assert report.latency_runs == validate_module.MIN_LATENCY_RUNS
    short = validate(model, model, CompressionConfig(params=0.5, latency_runs=2))
    assert short.latency_runs == 2  # never more than asked
    assert report.outputs[0].max_abs_error == 0.0


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_validation_runs_on_the_provider_it_reports(device):
    model = onnx.load(MNIST)
    report = validate(model, model, CompressionConfig(params=0.5, device=device, latency_runs=1))
    assert report.provider in validate_module.providers_for(device)


def test_validation_is_called_passed_only_when_tolerances_were_checked():
    loose = compress(MNIST, CompressionConfig(params=0.5, latency_runs=1)).report.validation
    assert loose.passed and loose.tolerances == {}
    text = format_validation(loose)
    assert "ran (no tolerances set: only shapes and NaN/Inf were checked)" in text
    assert "PASSED" not in text and "warning" not in text  # MNIST at 50 %: cosine 0.98
    config = CompressionConfig(params=0.5, latency_runs=1, min_cosine=0.5, max_rel_error=0.9)
    checked = compress(MNIST, config).report.validation
    assert checked.tolerances == {"max_rel_error": 0.9, "min_cosine": 0.5}
    assert "PASSED (--max-rel-error 0.9, --min-cosine 0.5)" in format_validation(checked)
    assert checked.to_dict()["tolerances"] == {"max_rel_error": 0.9, "min_cosine": 0.5}


def test_outputs_far_from_the_original_get_a_warning_even_without_tolerances():
    # svd at 10 % of the parameters breaks the MNIST CNN
    report = compress(MNIST, CompressionConfig(params=0.1, method="svd", latency_runs=1)).report
    (output,) = report.validation.outputs
    assert report.validation.passed and output.cosine_similarity < 0.9
    warning = f"warning: logits is far from the original (cosine {output.cosine_similarity:.3f})"
    assert warning in format_validation(report.validation)
