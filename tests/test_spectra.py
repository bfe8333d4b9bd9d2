"""Grouped singular values through the float64 Gram path, checked against float64 SVDs.

The tolerance under test is the one spectra.py documents: ``|σ̃_j² − σ_j²| ≤ τ·σ_1²`` per group,
``τ = 2(m + 4)·u``, with ``m`` the longer side of the group matrix and ``u = 2⁻⁵³``.
"""

from __future__ import annotations

import array_api_strict
import numpy as np
import onnx
import pytest
from builders import MNIST, MODELS, low_rank
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from onnx_lowrank.backend import Backend, numpy_backend
from onnx_lowrank.discover import discover
from onnx_lowrank.spectra import (
    compute_spectra,
    error_table,
    group_counts,
    grouped_singular_values,
    layer_spectrum,
)

UNIT_ROUNDOFF = 2.0**-53


pytestmark = pytest.mark.usefixtures("single_threaded_reference_blas")


def tau(longer: int) -> float:
    """The documented relative tolerance of ``σ²`` for a group matrix with longer side ``m``."""
    return 2 * (longer + 4) * UNIT_ROUNDOFF


STRICT = Backend("array_api_strict", array_api_strict)


def reference(weight: np.ndarray, groups: int) -> np.ndarray:
    """The naive method: one float64 SVD per group matrix."""
    width = weight.shape[1] // groups
    return np.stack(
        [
            np.linalg.svd(weight[:, i * width : (i + 1) * width], compute_uv=False)
            for i in range(groups)
        ]
    )


def assert_within_tolerance(values: np.ndarray, weight: np.ndarray, groups: int) -> None:
    expected = reference(weight, groups)
    assert values.shape == expected.shape
    assert np.all(values >= 0)
    assert np.all(np.diff(values, axis=1) <= 0), "each row is in descending order"
    longer = max(weight.shape[0], weight.shape[1] // groups)
    top = expected[:, :1]  # σ_1 of each group
    assert np.all(np.abs(values**2 - expected**2) <= tau(longer) * top**2)


def matrix(kind: str, rows: int, cols: int, rank: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "gaussian":
        return rng.standard_normal((rows, cols))
    if kind == "low-rank":
        return rng.standard_normal((rows, rank)) @ rng.standard_normal((rank, cols))
    # ill-conditioned: singular values from 1 down to 1e-12, random singular vectors
    size = min(rows, cols)
    left = np.linalg.qr(rng.standard_normal((rows, size)))[0]
    right = np.linalg.qr(rng.standard_normal((cols, size)))[0]
    return (left * np.logspace(0, -12, size)) @ right.T


@seed(4)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from(["gaussian", "low-rank", "ill-conditioned"]),
    rows=st.integers(1, 48),
    channels=st.integers(1, 12),
    kernel=st.sampled_from([1, 3, 9]),
    groups=st.sampled_from([1, 2, 3, 4]),
    rank=st.integers(1, 6),
    salt=st.integers(0, 2**16),
)
def test_gram_path_agrees_with_float64_svd(kind, rows, channels, kernel, groups, rank, salt):
    channels *= groups
    weight = matrix(kind, rows, channels * kernel, rank, np.random.default_rng(salt))
    values = grouped_singular_values(weight, channels, groups)
    assert_within_tolerance(values, weight, groups)


def test_ill_conditioned_large_values_are_accurate_small_ones_bounded():
    rng = np.random.default_rng(0)
    weight = matrix("ill-conditioned", 60, 90, 0, rng)
    values = grouped_singular_values(weight, 90, 1)[0]
    exact = np.logspace(0, -12, 60)
    resolved = exact > np.sqrt(tau(90))
    # above √τ·σ_1 the relative error is at most τ·(σ_1/σ_j)², up to the SVD's own rounding
    relative = np.abs(values - exact)[resolved] / exact[resolved]
    assert np.all(relative <= tau(90) / exact[resolved] ** 2 + 1e-13)
    # below it, the absolute error is at most √τ·σ_1
    assert np.all(np.abs(values - exact)[~resolved] <= np.sqrt(tau(90)))


@pytest.mark.parametrize("shape", [(40, 300), (300, 40)])
def test_exactly_low_rank_groups_have_that_many_nonzero_values(shape):
    rows, cols = shape
    weight = low_rank(rows, cols, 5, seed=3, groups=4).astype(np.float64)
    values = grouped_singular_values(weight, cols, 4)
    expected = reference(weight, 4)
    np.testing.assert_allclose(values[:, :5], expected[:, :5], rtol=1e-10)
    longer = max(rows, cols // 4)
    assert np.all(values[:, 5:] <= np.sqrt(tau(longer)) * values[:, :1])


def test_zero_weight_gives_zero_spectrum_and_error_table():
    spectrum = layer_spectrum("zero", np.zeros((6, 12)), 12, [1, 2, 3])
    assert spectrum.spectral_norm == 0.0 and spectrum.frobenius_sq == 0.0
    assert all(np.all(v == 0) for v in spectrum.singular_values.values())
    assert np.all(error_table(spectrum, 3) == 0)


def test_every_group_count_shares_grams_correctly_on_both_sides():
    """Counts 1, 2, 3, 4, 6, 8, 12, 24 of 24 channels are not all nested: f-side sums and
    column-side diagonal blocks must each come from a count they divide or are divided by."""
    rng = np.random.default_rng(5)
    for rows in (8, 40, 100):  # all f-side, mixed, all column-side
        weight = rng.standard_normal((rows, 24 * 4))
        counts = [1, 2, 3, 4, 6, 8, 12, 24]
        spectrum = layer_spectrum("layer", weight, 24, counts)
        assert sorted(spectrum.singular_values) == counts
        for groups, values in spectrum.singular_values.items():
            assert_within_tolerance(values, weight, groups)
        assert spectrum.spectral_norm == pytest.approx(np.linalg.norm(weight, 2), rel=1e-12)
        assert spectrum.frobenius_sq == pytest.approx(np.sum(weight**2), rel=1e-12)


def test_mnist_spectra_match_the_naive_method():
    discovery = discover(onnx.load(MNIST))
    spectra = compute_spectra(discovery, 8)
    assert list(spectra) == [layer.name for layer in discovery.layers]
    for layer in discovery.layers:
        spectrum = spectra[layer.name]
        weight = discovery.weight(layer)
        assert sorted(spectrum.singular_values) == group_counts(layer, 8)
        for groups, values in spectrum.singular_values.items():
            assert_within_tolerance(values, weight, groups)


def test_byte_budget_changes_batching_but_not_results():
    """A budget of one byte decomposes every matrix alone; the default batches across layers."""
    discovery = discover(onnx.load(MODELS / "mtcnn_onet.onnx"))
    batched = compute_spectra(discovery, 4)
    calls: list[tuple[int, int]] = []
    alone = compute_spectra(discovery, 4, progress=lambda *a: calls.append(a[1:]), batch_bytes=1)
    assert calls == [(i + 1, len(discovery.layers)) for i in range(len(discovery.layers))]
    for name, spectrum in batched.items():
        for groups, values in spectrum.singular_values.items():
            np.testing.assert_allclose(alone[name].singular_values[groups], values, rtol=1e-12)
    with pytest.raises(ValueError, match="batch_bytes"):
        compute_spectra(discovery, 4, batch_bytes=0)


def test_strict_array_namespace_gives_the_numpy_results():
    """Running on array_api_strict proves the spectra code uses only the array API standard:
    Gram sums (f side), diagonal blocks (column side), batching and split batches."""
    rng = np.random.default_rng(6)
    for rows in (8, 40, 100):
        weight = rng.standard_normal((rows, 24 * 4))
        counts = [1, 2, 3, 4, 6, 8, 12, 24]
        expected = layer_spectrum("layer", weight, 24, counts)
        got = layer_spectrum("layer", weight, 24, counts, STRICT)
        for groups in counts:
            values = got.singular_values[groups]
            assert isinstance(values, np.ndarray)
            np.testing.assert_allclose(values, expected.singular_values[groups], atol=1e-12)
    discovery = discover(onnx.load(MNIST))
    expected = compute_spectra(discovery, 4, numpy_backend())
    got = compute_spectra(discovery, 4, STRICT, batch_bytes=2**16)
    for name, spectrum in expected.items():
        assert got[name].spectral_norm == pytest.approx(spectrum.spectral_norm, rel=1e-12)
        for groups, values in spectrum.singular_values.items():
            np.testing.assert_allclose(
                got[name].singular_values[groups], values, atol=1e-12 * values.max()
            )


def test_bad_group_count_is_rejected():
    with pytest.raises(ValueError, match="do not divide"):
        grouped_singular_values(np.ones((4, 10)), 10, 3)


def test_error_tables_bound_the_actual_error_from_both_sides():
    rng = np.random.default_rng(2)
    weight = rng.standard_normal((12, 32))
    spectrum = layer_spectrum("layer", weight, 32, [1, 2, 4])
    sigma = spectrum.singular_values[1][0]
    np.testing.assert_allclose(error_table(spectrum, 1)[:-1], sigma / sigma[0], rtol=1e-12)
    for groups in (2, 4):
        upper = error_table(spectrum, groups, "bound")
        lower = error_table(spectrum, groups, "max-group")
        assert upper[-1] == 0.0 and lower[-1] == 0.0
        assert np.all(lower <= upper + 1e-15)
        assert np.all(upper <= np.sqrt(groups) * lower + 1e-15)
    with pytest.raises(ValueError, match="unknown error measure"):
        error_table(spectrum, 2, "spectral")


@pytest.mark.parametrize("groups", [1, 2, 4, 8])
def test_frobenius_table_is_the_exact_grouped_truncation_error(groups):
    """``frobenius`` is exact, not a bound: the residual blocks of the groups are disjoint."""
    rng = np.random.default_rng(groups)
    weight = rng.standard_normal((12, 32)) * np.linspace(3, 0.1, 32)
    spectrum = layer_spectrum("layer", weight, 32, [1, 2, 4, 8])
    table = error_table(spectrum, groups, "frobenius")
    width = 32 // groups
    blocks = [
        np.linalg.svd(weight[:, i * width : (i + 1) * width], full_matrices=False)
        for i in range(groups)
    ]
    for rank in range(len(table)):
        approx = np.hstack([(u[:, :rank] * s[:rank]) @ vt[:rank] for u, s, vt in blocks])
        expected = np.linalg.norm(weight - approx) / np.linalg.norm(weight)
        np.testing.assert_allclose(table[rank], expected, rtol=1e-9, atol=1e-12)
    assert table[-1] == 0.0 and np.all(np.diff(table) <= 1e-15)
    zero = layer_spectrum("zero", np.zeros((6, 12)), 12, [1, 2])
    assert np.all(error_table(zero, 2, "frobenius") == 0)
