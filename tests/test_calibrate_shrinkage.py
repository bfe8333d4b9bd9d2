"""Covariance shrinkage of the whitened factorization (accumulate.ledoit_wolf).

A layer whose statistics rest on few input vectors (a classifier after global pooling: one
vector per sample) is whitened with ``Σ' = (1 − γ)·Σ + γ·(tr Σ / d)·I``, ``γ`` the Ledoit–Wolf
intensity; with many vectors ``γ`` vanishes and the factors are those of ``Σ``.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import onnx
import pytest
from builders import (
    MNIST,
    check_model,
    conv_model,
    gemm_model,
    mnist_calibration,
    mnist_images,
    run,
)
from onnx import TensorProto, helper

from onnx_lowrank import CompressionConfig, activations, whiten
from onnx_lowrank.discover import discover
from onnx_lowrank.factorize import reconstruct
from onnx_lowrank.pipeline import analyze, candidate_tables, choose, realize
from onnx_lowrank.records import Calibration


def statistics(model, feeds, side="input", max_groups=1):
    discovery = discover(model)
    sides = {layer.name: side for layer in discovery.layers}
    stats = activations.collect_statistics(discovery, feeds, max_groups, sides=sides)
    layer = discovery.layers[0]
    return discovery, discovery.weight(layer), stats[layer.name]


def direct_gamma(vectors: np.ndarray, weight: np.ndarray) -> float:
    """Ledoit–Wolf from the vectors themselves, by the definition, for the layer's outputs
    ``z = W (x − μ)``: the noise ``(1/n²) Σ_k ‖z_k z_kᵀ − M‖²`` over the distance
    ``‖M − m·W Wᵀ‖²``, ``M = W Σ Wᵀ``, ``m = tr Σ / d``."""
    centred = vectors - vectors.mean(axis=0)
    n, d = centred.shape
    scale = np.sum(centred * centred) / (n * d)
    z, target = centred @ weight.T, scale * weight @ weight.T
    moment = z.T @ z / n
    noise = np.sum((z[:, :, None] * z[:, None, :] - moment) ** 2) / n**2
    return min(1.0, noise / np.sum((moment - target) ** 2))


def shrunk(stats) -> np.ndarray:
    """``Σ' + λI`` as whiten.py whitens with it, from the unshrunk covariance."""
    d = len(stats.variance)
    gamma, scale = stats.shrinkage, float(np.mean(stats.variance))
    return (1 - gamma) * stats.covariance + (gamma * scale + stats.damping) * np.eye(d)


def few_rows(count: int, c: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    spread = np.linspace(3.0, 0.1, c)  # anisotropic, with a mean to remove
    return (rng.standard_normal((count, c)) * spread + 1.5).astype(np.float32)


@pytest.mark.parametrize("side", ["input", "output"])
def test_few_vectors_are_shrunk_with_the_documented_intensity(side):
    f, c, n = 10, 24, 8  # n < d: Σ has rank 7 of 24
    weight = np.random.default_rng(1).standard_normal((c, f)).astype(np.float32)
    rows = few_rows(n, c, seed=2)
    _, folded, stats = statistics(gemm_model(weight), {"a": rows}, side=side)
    vectors = rows.astype(np.float64)
    expected = direct_gamma(vectors, folded)  # the same on both sides
    assert stats.count == n
    assert stats.shrinkage == pytest.approx(expected, rel=1e-9)
    assert stats.shrinkage > 0.1  # clearly applied
    # the spectra and factors are those of the shrunk covariance
    _, _, by_input = statistics(gemm_model(weight), {"a": rows}, side="input")
    sigma = replace(by_input, shrinkage=stats.shrinkage)
    gram = folded @ shrunk(sigma) @ folded.T
    values, vectors_ = np.linalg.eigh(gram)
    np.testing.assert_allclose(
        whiten.whitened_singular_values(folded, stats, 1)[0],
        np.sqrt(np.clip(values[::-1], 0, None)),
        rtol=1e-8,
    )
    rank = 3
    top = vectors_[:, ::-1][:, :rank]
    np.testing.assert_allclose(
        reconstruct(whiten.whitened_factors(folded, stats, 1, rank)),
        top @ top.T @ folded,
        atol=1e-8,
    )


def test_many_vectors_are_left_unchanged():
    """Shrinkage only where ``Σ`` is singular, ``n ≤ d``; a conv with thousands of patches
    per image keeps ``Σ`` as it is."""
    f, c = 10, 24
    weight = np.random.default_rng(6).standard_normal((c, f)).astype(np.float32)
    for count, applied in ((c, True), (c + 1, False)):
        _, folded, stats = statistics(gemm_model(weight), {"a": few_rows(count, c, seed=7)})
        assert (stats.shrinkage > 0) == applied, (count, stats.shrinkage)
    rng = np.random.default_rng(3)
    weight = rng.standard_normal((16, 8, 3, 3)).astype(np.float32)
    x = (rng.standard_normal((4, 8, 32, 32)) * rng.uniform(0.2, 3, (1, 8, 1, 1))).astype(np.float32)
    _, folded, stats = statistics(conv_model(weight, (32, 32), pads=[1, 1, 1, 1]), {"x": x})
    assert stats.count == 4 * 32 * 32 and folded.shape[1] == 72 and stats.shrinkage == 0.0
    plain = replace(stats, shrinkage=0.0)
    np.testing.assert_array_equal(
        whiten.whitened_singular_values(folded, stats, 1),
        whiten.whitened_singular_values(folded, plain, 1),
    )


def test_the_error_table_is_the_shrunk_error_of_the_factors_written():
    """The tables, the estimate and the factors describe one thing: the factors are optimal
    for ``Σ'``, and the table gives their relative output error under ``Σ'``."""
    f, c = 12, 30
    weight = np.random.default_rng(4).standard_normal((c, f)).astype(np.float32)
    rows = few_rows(10, c, seed=5)
    discovery, folded, stats = statistics(gemm_model(weight), {"a": rows})
    assert stats.shrinkage > 0.1
    spectrum = whiten.whitened_spectra(discovery, {stats.name: stats}, 1)[stats.name]
    table = whiten.output_error_table(spectrum, 1)
    sigma, raw = shrunk(stats), stats.covariance
    calibration = Calibration("test", {"a": rows}, 10, {stats.name: stats}, {}, [])
    calibration.spectra[stats.name] = spectrum
    layer = discovery.layers[0]
    for rank in (1, 4, 8):
        residual = folded - reconstruct(whiten.whitened_factors(folded, stats, 1, rank))
        expected = math.sqrt(
            np.trace(residual @ sigma @ residual.T) / np.trace(folded @ sigma @ folded.T)
        )
        assert table[rank] == pytest.approx(expected, rel=1e-8)
        written = whiten.factorize_layers(calibration, discovery, [(layer, 1, rank)])
        assert written[stats.name].output_error_estimate == pytest.approx(expected, rel=1e-8)
        # the unshrunk factors fit these 10 rows better: the shrinkage trades that for new ones
        plain = folded - reconstruct(
            whiten.whitened_factors(folded, replace(stats, shrinkage=0.0), 1, rank)
        )
        assert np.trace(plain @ raw @ plain.T) <= np.trace(residual @ raw @ residual.T)


def test_shrinkage_lowers_the_error_on_new_vectors():
    """Gaussian vectors with a known covariance: factors from 16 vectors in 64 dimensions
    do better on the population with the shrinkage than without it."""
    d, f, n, rank = 64, 32, 16, 8
    gains = []
    for seed in range(6):
        rng = np.random.default_rng(seed)
        basis = np.linalg.qr(rng.standard_normal((d, d)))[0]
        population = basis @ np.diag(np.arange(1.0, d + 1) ** -0.7) @ basis.T
        weight = rng.standard_normal((d, f)).astype(np.float32)
        rows = rng.standard_normal((n, d)) @ np.linalg.cholesky(population).T
        _, folded, stats = statistics(gemm_model(weight), {"a": rows.astype(np.float32)})
        assert stats.shrinkage > 0.2

        def population_error(s, folded=folded, population=population):
            residual = folded - reconstruct(whiten.whitened_factors(folded, s, 1, rank))
            return np.trace(residual @ population @ residual.T)

        gains.append(population_error(replace(stats, shrinkage=0.0)) / population_error(stats))
    assert min(gains) > 1.0, gains
    assert np.mean(gains) > 1.05, gains


def test_mnist_with_few_calibration_images(tmp_path):
    """32 images: the classifier's 3136-dimensional input rests on 32 vectors and is shrunk,
    the convolutions (thousands of patches per image) are not; compression validates."""
    path = mnist_calibration(tmp_path, 32)
    # every image in the statistics (--error network would hold 8 out)
    config = CompressionConfig(params=0.3, calibration=str(path), latency_runs=1, error="output")
    analysis = analyze(MNIST, config)
    stats = analysis.calibration.statistics
    by_op = {name: s for name, s in stats.items()}
    gemm = by_op["/classifier/classifier.0/Gemm"]
    assert gemm.count == 32 and gemm.shrinkage > 0.05
    for name, s in by_op.items():
        if "features" in name:  # convolutions: 32 × 784 or 32 × 196 patches
            assert s.shrinkage == 0.0, (name, s.shrinkage)
    # the classifier's input vectors, from the flattened features
    images = mnist_images(32)
    flat = analysis.model.graph.node[analysis.discovery.layer(gemm.name).node_index].input[0]
    probe = _with_output(analysis.model, flat)
    (vectors,) = run(probe, {"input": images})[-1:]
    weight = analysis.discovery.weight(analysis.discovery.layer(gemm.name))
    assert gemm.shrinkage == pytest.approx(
        direct_gamma(vectors.astype(np.float64), weight), rel=1e-6
    )
    tables = candidate_tables(analysis, config)
    result = realize(analysis, tables, choose(analysis, tables, config), config)
    check_model(result.model)
    assert result.report.validation is not None and not result.report.validation.failures
    assert result.report.compressed_layers


def _with_output(model: onnx.ModelProto, tensor: str) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.graph.output.append(helper.make_tensor_value_info(tensor, TensorProto.FLOAT, None))
    return copy
