"""Sequential anchored refit (refit.py)."""

from __future__ import annotations

import numpy as np
import onnx
from builders import MNIST, SAMPLES, check_model, make_model, random_feed, run
from onnx import helper

from onnx_lowrank import CompressionConfig
from onnx_lowrank.pipeline import analyze, candidate_tables, choose, realize
from onnx_lowrank.refit import levels, refit_layers
from onnx_lowrank.whiten import factorize_layers


def two_layer_model(seed=0):
    rng = np.random.default_rng(seed)
    first = rng.standard_normal((16, 12)).astype(np.float32)
    second = rng.standard_normal((12, 10)).astype(np.float32)
    bias = rng.standard_normal(12).astype(np.float32)
    nodes = [
        helper.make_node("Gemm", ["x", "W1", "B1"], ["h"], name="gemm1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "W2"], ["y"], name="matmul2"),
    ]
    return make_model(
        nodes, [("x", ["N", 16])], [("y", None)], {"W1": first, "B1": bias, "W2": second}
    )


def _calibration(tmp_path, model_inputs):
    path = tmp_path / "calibration.npz"
    np.savez(path, **model_inputs)
    return path


def test_levels_follow_the_graph():
    model = two_layer_model()
    analysis = analyze(model, CompressionConfig(validate=False))
    names = [layer.name for layer in analysis.discovery.layers]
    assert levels(analysis.discovery, names) == {names[0]: 0, names[1]: 1}
    assert levels(analysis.discovery, names[1:]) == {names[1]: 0}


def test_first_layer_refit_is_the_calibrated_solution(tmp_path):
    """A layer that sees the original inputs (X̂ = X) gets back its calibrated factors."""
    model = two_layer_model()
    path = _calibration(tmp_path, {"x": random_feed((400, 16), 1)})
    config = CompressionConfig(params=1.0, calibration=str(path), validate=False)
    analysis = analyze(model, config)
    first = analysis.discovery.layers[0]
    chosen = [(first, 1, 4)]
    calibrated = factorize_layers(analysis.calibration, analysis.discovery, chosen)
    refitted = refit_layers(analysis.discovery, analysis.calibration, calibrated)
    before, after = calibrated[first.name], refitted[first.name]
    np.testing.assert_allclose(after.factors.second, before.factors.second, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(after.biases[first.name], before.biases[first.name], atol=1e-5)


def test_refit_lowers_the_network_error_on_real_models(tmp_path):
    """MNIST CNN at 20 % of the parameters: refitting every layer on the compressed model's
    inputs brings the logits on unseen test images closer to the original's."""
    data = np.load(SAMPLES / "mnist_train_calib.npz")
    images = ((data["images"][:200].astype(np.float32) / 255.0 - 0.1307) / 0.3081)[:, None]
    path = _calibration(tmp_path, {"input": images})
    test = np.load(SAMPLES / "mnist_test.npz")
    x = ((test["images"][:500].astype(np.float32) / 255.0 - 0.1307) / 0.3081)[:, None]
    reference = run(onnx.load(MNIST), {"input": x})[0]
    base = CompressionConfig(params=0.2, calibration=str(path), validate=False)
    analysis = analyze(MNIST, base)
    tables = candidate_tables(analysis, base)
    choices = choose(analysis, tables, base)
    errors, sizes = {}, {}
    for refit in (False, True):
        config = base.replace(refit=refit)
        result = realize(analysis, tables, choices, config)
        check_model(result.model)
        out = run(result.model, {"input": x})[0]
        errors[refit] = np.linalg.norm(out - reference) / np.linalg.norm(reference)
        sizes[refit] = result.report.params_after
        if refit:
            assert "refit" in result.report.timings
    assert sizes[True] == sizes[False]  # the same allocation: only U and the biases change
    assert errors[True] < 0.8 * errors[False]


def test_refit_without_calibration_changes_nothing():
    model = two_layer_model()
    config = CompressionConfig(params=0.5, refit=True, validate=False)
    analysis = analyze(model, config)
    tables = candidate_tables(analysis, config)
    result = realize(analysis, tables, choose(analysis, tables, config), config)
    x = random_feed((3, 16), 2)
    plain = realize(analysis, tables, choose(analysis, tables, config), config.replace(refit=False))
    np.testing.assert_array_equal(run(result.model, {"x": x})[0], run(plain.model, {"x": x})[0])
