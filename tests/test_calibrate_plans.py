"""What calibration computes, and where (issue 12, item 4): statistics only for the group counts
the allocator can use, each layer planned on the cheaper side per group count (input-side blocks
for the fine counts of a wide layer, the output side for the coarse ones), on any array backend.

The planned statistics are checked against the whole input-side covariance, which
test_calibrate.py checks against explicit im2col patches and ONNX Runtime.
"""

from __future__ import annotations

import array_api_strict
import numpy as np
import onnx
import pytest
from builders import MNIST, MODELS, conv_model

from onnx_lowrank import CompressionConfig, accumulate, activations, calibrate, whiten
from onnx_lowrank.allocate import build_table
from onnx_lowrank.backend import Backend, cuda_available, get_backend, numpy_backend
from onnx_lowrank.discover import discover
from onnx_lowrank.factorize import reconstruct
from onnx_lowrank.pipeline import analyze, candidate_tables, choose, realize
from onnx_lowrank.spectra import compute_spectra, group_counts

CREPE = MODELS / "crepe_tiny.onnx"
STRICT = Backend("array_api_strict", array_api_strict)


def wide_conv(seed: int = 0, tied: bool = False):
    """6 filters over 16 channels × 5 taps: 16 groups are 5 columns wide (≤ f), so their
    blocks ``Σ_i`` are cheaper than output covariances; 1, 2, 4 and 8 groups are not."""
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((6, 16, 5)).astype(np.float32)
    model = conv_model(weight, (30,), pads=[2, 2])
    scale = rng.uniform(0.2, 2.0, (1, 16, 1))
    x = (rng.standard_normal((3, 16, 30)) * scale + 0.5).astype(np.float32)
    return model, {"x": x}


def test_a_wide_layer_keeps_input_blocks_for_fine_counts_and_output_side_for_coarse_ones():
    model, feeds = wide_conv()
    discovery = discover(model)
    layer = discovery.layers[0]
    plan = accumulate.plan_statistics(layer, group_counts(layer, 16))
    assert plan.blocks == 16 and plan.output_groups == [1, 2, 4, 8]
    assert plan.cost(layer) < accumulate.plan_statistics(layer, [1, 2, 4, 8, 16], "input").cost(
        layer
    )
    planned = activations.collect_statistics(discovery, feeds, 16)["conv"]
    whole = activations.collect_statistics(discovery, feeds, 16, sides={"conv": "input"})["conv"]
    assert planned.covariance.shape == (16, 5, 5) and whole.covariance.shape == (80, 80)
    assert sorted(planned.output_covariance) == [1, 2, 4, 8] and whole.output_covariance is None
    weight = discovery.weight(layer)
    for groups in (1, 2, 4, 8, 16):
        np.testing.assert_allclose(
            whiten.whitened_singular_values(weight, planned, groups),
            whiten.whitened_singular_values(weight, whole, groups),
            rtol=1e-9,
        )
        for rank in (1, 3):
            np.testing.assert_allclose(
                reconstruct(whiten.whitened_factors(weight, planned, groups, rank)),
                reconstruct(whiten.whitened_factors(weight, whole, groups, rank)),
                atol=1e-8,
            )


@pytest.mark.parametrize("side", [None, "input", "output"])
def test_statistics_on_the_array_api_reference_backend_match_numpy(side):
    """The accumulation uses only the array API standard (so CuPy runs the same code)."""
    model, feeds = wide_conv(seed=3)
    discovery = discover(model)
    sides = {"conv": side} if side else None
    by_numpy = activations.collect_statistics(
        discovery, feeds, 16, sides=sides, backend=numpy_backend(2)
    )["conv"]
    by_strict = activations.collect_statistics(
        discovery, feeds, 16, sides=sides, backend=STRICT, chunk_bytes=4096
    )["conv"]
    for name in ("mean", "variance", "covariance"):
        first, second = getattr(by_numpy, name), getattr(by_strict, name)
        if first is None:
            assert second is None
            continue
        np.testing.assert_allclose(second, first, rtol=1e-10, atol=1e-12)
    assert sorted(by_numpy.output_covariance or {}) == sorted(by_strict.output_covariance or {})
    for groups, matrix in (by_numpy.output_covariance or {}).items():
        np.testing.assert_allclose(by_strict.output_covariance[groups], matrix, rtol=1e-10)


def test_whitened_spectra_on_the_array_api_reference_backend_match_numpy():
    model, feeds = wide_conv(seed=4)
    discovery = discover(model)
    statistics = activations.collect_statistics(discovery, feeds, 16)
    by_numpy = whiten.whitened_spectra(discovery, statistics, 16, backend=numpy_backend(2))
    by_strict = whiten.whitened_spectra(discovery, statistics, 16, backend=STRICT)
    spectrum = by_numpy["conv"]
    assert sorted(spectrum.singular_values) == [1, 2, 4, 8, 16]
    for groups, values in spectrum.singular_values.items():
        np.testing.assert_allclose(by_strict["conv"].singular_values[groups], values, rtol=1e-10)


@pytest.mark.skipif(not cuda_available(), reason="needs CuPy and a CUDA device")
def test_statistics_and_spectra_on_the_gpu_match_numpy():
    model, feeds = wide_conv(seed=5)
    discovery = discover(model)
    gpu = get_backend("cuda")
    on_cpu = activations.collect_statistics(discovery, feeds, 16, backend=numpy_backend(1))
    on_gpu = activations.collect_statistics(discovery, feeds, 16, backend=gpu)
    np.testing.assert_allclose(on_gpu["conv"].covariance, on_cpu["conv"].covariance, rtol=1e-9)
    for groups, matrix in on_cpu["conv"].output_covariance.items():
        np.testing.assert_allclose(on_gpu["conv"].output_covariance[groups], matrix, rtol=1e-9)
    first = whiten.whitened_spectra(discovery, on_cpu, 16)["conv"].singular_values
    second = whiten.whitened_spectra(discovery, on_gpu, 16, backend=gpu)["conv"].singular_values
    for groups, values in first.items():
        np.testing.assert_allclose(second[groups], values, rtol=1e-8)


@pytest.mark.parametrize("path", [MNIST, CREPE])
@pytest.mark.parametrize("multiple", [1, 8, 32])
def test_candidate_groups_are_the_group_counts_of_the_allocators_tables(path, multiple):
    discovery = discover(onnx.load(path))
    limit = max(layer.in_channels for layer in discovery.layers)
    spectra = compute_spectra(discovery, limit)
    allowed = calibrate.candidate_groups(discovery, limit, multiple)
    for layer in discovery.layers:
        table = build_table(layer, spectra[layer.name], "bound", limit, multiple)
        assert set(allowed[layer.name]) == {1, *table.groups[table.groups > 0].tolist()}


def test_calibration_computes_only_the_group_counts_the_allocator_may_choose(tmp_path):
    rng = np.random.default_rng(0)
    frames = rng.standard_normal((6, 1024)).astype(np.float32)
    np.savez(tmp_path / "frames.npz", frames=frames)
    config = CompressionConfig(
        params=0.5,
        calibration=str(tmp_path / "frames.npz"),
        max_groups=8,
        rank_multiple=32,
        groups_for={"/conv2/Conv": 16},  # pinned beyond --max-groups
        ranks={"/conv2/Conv": 2},
        exclude=("/conv6/Conv",),
        validate=False,
    )
    analysis = analyze(str(CREPE), config)
    computed = {
        name: sorted(spectrum.singular_values)
        for name, spectrum in analysis.calibration.spectra.items()
    }
    # --rank-multiple 32: conv3 (16 × 16·64) has no rank for g = 1 (32 > 16) and no saving
    # rank for g = 2 (16·(2·16 + 1024) ≥ 16·1024); conv5 (32 filters) none for g = 1; conv2
    # (16 × 128·64) none for 1 and 2 groups, and adds its pinned 16; conv6 is excluded.
    assert computed == {
        "/conv1/Conv": [1],
        "/conv2/Conv": [1, 4, 8, 16],
        "/conv3/Conv": [1, 4, 8],
        "/conv4/Conv": [1, 4, 8],
        "/conv5/Conv": [1, 2, 4, 8],
        "/conv6/Conv": [1],
        "/classifier/Gemm": [1, 2, 4, 8],
    }
    for name, stats in analysis.calibration.statistics.items():
        assert set(stats.output_covariance or {}) <= set(computed[name])
    tables = candidate_tables(analysis, config)
    result = realize(analysis, tables, choose(analysis, tables, config), config)
    chosen = {layer.name: layer for layer in result.report.layers}
    assert (chosen["/conv2/Conv"].groups, chosen["/conv2/Conv"].rank) == (16, 2)


def test_wide_layers_take_float32_products_and_narrow_ones_float64():
    backend = numpy_backend(1)
    chosen = {}
    for path in (CREPE, MNIST):
        discovery = discover(onnx.load(path))
        for layer in discovery.layers:
            plan = accumulate.plan_statistics(layer, group_counts(layer, 1024))
            weight = discovery.weight(layer)
            chosen[layer.name] = accumulate.Accumulator(layer, weight, plan, backend).dtype
            expected = np.float32 if plan.cost(layer) >= accumulate.FLOAT32_COST else np.float64
            assert chosen[layer.name] == expected
    # MNIST's classifier.0 (3136 inputs: 7.8 M multiply-adds per vector on the input side)
    assert [name for name, dtype in chosen.items() if dtype == np.float32] == [
        "/classifier/classifier.0/Gemm"
    ]


@pytest.mark.parametrize("backend", [numpy_backend(2), STRICT], ids=["numpy", "strict"])
def test_float32_products_give_the_float64_spectra_and_factors_to_float32_precision(backend):
    """Products in float32 within a chunk, sums in float64 across chunks (issue 12, item 4):
    on CREPE tiny with 24 tone-like frames, every layer's whitened singular values and factors
    agree with all-float64 statistics to float32 precision (measured: means within 1.3e-7,
    singular values within 7.1e-6 of the largest, rank-4 factors within 1.5e-6 relative)."""
    discovery = discover(onnx.load(CREPE))
    rng = np.random.default_rng(0)
    time = np.arange(1024) / 16000
    pitch = rng.uniform(60, 1500, (24, 1))
    frames = np.sin(2 * np.pi * pitch * time) + 0.01 * rng.standard_normal((24, 1024))
    frames = ((frames - frames.mean(1, keepdims=True)) / frames.std(1, keepdims=True)).astype(
        np.float32
    )
    feeds = {"frames": frames}
    counts = calibrate.candidate_groups(discovery, 64)
    exact = activations.collect_statistics(discovery, feeds, 64, groups=counts, dtype=np.float64)
    single = activations.collect_statistics(
        discovery, feeds, 64, groups=counts, dtype=np.float32, backend=backend, chunk_bytes=2**20
    )
    for layer in discovery.layers:
        weight = discovery.weight(layer)
        first, second = exact[layer.name], single[layer.name]
        np.testing.assert_allclose(second.mean, first.mean, rtol=0, atol=1e-6)
        for groups in counts[layer.name]:
            values = whiten.whitened_singular_values(weight, first, groups)
            other = whiten.whitened_singular_values(weight, second, groups)
            np.testing.assert_allclose(other, values, rtol=0, atol=3e-5 * values.max())
            rank = min(4, values.shape[1])
            reference = reconstruct(whiten.whitened_factors(weight, first, groups, rank))
            approximate = reconstruct(whiten.whitened_factors(weight, second, groups, rank))
            difference = np.linalg.norm(approximate - reference) / np.linalg.norm(reference)
            assert difference < 1e-5, (layer.name, groups, difference)
