"""Truncated factors from the Gram eigendecomposition, checked against float64 SVDs.

factorize.py documents what it guarantees (``u = 2⁻⁵³``, ``m`` the longer side of a group):
``‖W_i − Ŵ_i‖₂ ≤ sqrt(σ_{r+1}² + τ·σ_1²)`` always, and ``Ŵ_i`` equal to the exact truncated SVD
up to ``σ_1·τ·σ_1²/(σ_r² − σ_{r+1}²)``, with ``τ = 2(m + 4)·u`` as in spectra.py.
"""

from __future__ import annotations

import array_api_strict
import numpy as np
import onnx
import pytest
from builders import MODELS
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from test_spectra import matrix, tau

from onnx_lowrank.backend import Backend
from onnx_lowrank.discover import discover
from onnx_lowrank.factorize import factorize, factorize_with_error, reconstruct, relative_error
from onnx_lowrank.types import Factors

STRICT = Backend("array_api_strict", array_api_strict)


pytestmark = pytest.mark.usefixtures("single_threaded_reference_blas")


def svd_truncation(weight: np.ndarray, groups: int, rank: int):
    """Per group: the exact truncated SVD ``W_{i,r}``, its singular values, and ``U_i``, ``V_i``."""
    width = weight.shape[1] // groups
    parts = []
    for i in range(groups):
        left, values, right = np.linalg.svd(weight[:, i * width : (i + 1) * width])
        scale = np.sqrt(values[:rank])
        parts.append(
            (left[:, :rank] * values[:rank] @ right[:rank], values, left[:, :rank] * scale)
        )
    return parts


def group_blocks(array: np.ndarray, groups: int) -> list[np.ndarray]:
    width = array.shape[1] // groups
    return [array[:, i * width : (i + 1) * width] for i in range(groups)]


def assert_truncated_svd(weight: np.ndarray, factors: Factors) -> None:
    """The documented guarantees, group by group."""
    groups, rank = factors.groups, factors.rank
    longer = max(weight.shape[0], weight.shape[1] // groups)
    approx = group_blocks(reconstruct(factors), groups)
    for block, got, (exact, values, _) in zip(
        group_blocks(weight, groups), approx, svd_truncation(weight, groups, rank), strict=True
    ):
        top = values[0]
        dropped = values[rank] if rank < len(values) else 0.0
        error = np.linalg.norm(block - got, 2)
        assert error <= np.sqrt(dropped**2 + tau(longer) * top**2) * (1 + 1e-12)
        gap = values[rank - 1] ** 2 - dropped**2
        if gap > 1e-3 * top**2:
            limit = top * tau(longer) * top**2 / gap
            assert np.linalg.norm(got - exact, 2) <= 10 * limit + 1e-13 * top


@seed(7)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from(["gaussian", "low-rank", "ill-conditioned"]),
    rows=st.integers(1, 40),
    channels=st.integers(1, 10),
    kernel=st.sampled_from([1, 3, 9]),
    groups=st.sampled_from([1, 2, 4]),
    rank_fraction=st.floats(0.0, 1.0),
    planted=st.integers(1, 6),
    salt=st.integers(0, 2**16),
)
def test_factors_are_the_truncated_svd_to_the_documented_tolerance(
    kind, rows, channels, kernel, groups, rank_fraction, planted, salt
):
    channels *= groups
    weight = matrix(kind, rows, channels * kernel, planted, np.random.default_rng(salt))
    full = min(rows, channels * kernel // groups)
    rank = max(1, round(rank_fraction * full))
    factors = factorize(weight, groups, rank)
    assert factors.first.shape == (groups, rank, channels * kernel // groups)
    assert factors.second.shape == (rows, groups * rank)
    assert_truncated_svd(weight, factors)


@pytest.mark.parametrize("shape", [(30, 80), (80, 30)], ids=["f-side", "column-side"])
def test_well_separated_factors_match_svd_factors_and_split_sqrt_sigma(shape):
    rng = np.random.default_rng(1)
    rows, cols = shape
    size = min(rows, cols)
    left = np.linalg.qr(rng.standard_normal((rows, size)))[0]
    right = np.linalg.qr(rng.standard_normal((cols, size)))[0]
    weight = (left * np.linspace(3.0, 0.1, size)) @ right.T
    factors = factorize(weight, 1, 10)
    u, v = factors.second, factors.first[0]
    _, values, expected_u = svd_truncation(weight, 1, 10)[0]
    signs = np.sign(expected_u[np.argmax(np.abs(expected_u), axis=0), range(10)])
    np.testing.assert_allclose(u, expected_u * signs, atol=1e-12)
    # √Σ is split evenly: the i-th column of U and row of V both have norm sqrt(σ_i).
    np.testing.assert_allclose(np.linalg.norm(u, axis=0), np.sqrt(values[:10]), rtol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), np.sqrt(values[:10]), rtol=1e-12)
    np.testing.assert_allclose(
        (u / np.sqrt(values[:10])).T @ (u / np.sqrt(values[:10])), np.eye(10), atol=1e-12
    )


def test_signs_are_fixed_and_output_is_deterministic():
    weight = np.random.default_rng(2).standard_normal((24, 60))
    first, second = factorize(weight, 3, 5), factorize(weight.copy(), 3, 5)
    assert np.array_equal(first.first, second.first)
    assert np.array_equal(first.second, second.second)
    u = first.second.reshape(24, 3, 5)
    largest = np.take_along_axis(u, np.argmax(np.abs(u), axis=0)[None], axis=0)
    assert np.all(largest > 0)


@pytest.mark.parametrize("shape, groups", [((20, 48), 1), ((20, 48), 4), ((48, 20), 2)])
def test_full_rank_reproduces_the_weight(shape, groups):
    weight = np.random.default_rng(3).standard_normal(shape)
    full = min(shape[0], shape[1] // groups)
    factors = factorize(weight, groups, full)
    np.testing.assert_allclose(reconstruct(factors), weight, atol=1e-12 * np.abs(weight).max())
    assert relative_error(weight, factors, np.linalg.norm(weight, 2)) < 1e-7


@pytest.mark.parametrize("shape", [(40, 300), (300, 40)])
def test_exactly_low_rank_groups_are_reproduced_at_and_above_their_rank(shape):
    rows, cols = shape
    rng = np.random.default_rng(4)
    weight = np.concatenate(
        [rng.standard_normal((rows, 3)) @ rng.standard_normal((3, cols // 2)) for _ in range(2)],
        axis=1,
    )
    scale = np.abs(weight).max()
    for rank in (3, 7):  # above the planted rank the extra directions carry nothing
        factors = factorize(weight, 2, rank)
        assert np.all(np.isfinite(factors.first)) and np.all(np.isfinite(factors.second))
        np.testing.assert_allclose(reconstruct(factors), weight, atol=1e-10 * scale)
    zero = factorize(np.zeros((6, 8)), 2, 3)
    assert not np.any(zero.first) and not np.any(zero.second)


def test_relative_error_is_the_exact_spectral_norm_of_the_residual():
    rng = np.random.default_rng(5)
    for shape, groups, rank in (((30, 90), 3, 4), ((90, 30), 2, 6), ((16, 16), 1, 5)):
        weight = rng.standard_normal(shape)
        norm = np.linalg.norm(weight, 2)
        factors = factorize(weight, groups, rank)
        expected = np.linalg.norm(weight - reconstruct(factors), 2) / norm
        assert relative_error(weight, factors, norm) == pytest.approx(expected, rel=1e-10)
        if groups == 1:  # a truncated SVD leaves exactly σ_{r+1}
            values = np.linalg.svd(weight, compute_uv=False)
            assert expected == pytest.approx(values[rank] / norm, rel=1e-10)
    assert relative_error(np.zeros((3, 4)), factorize(np.zeros((3, 4)), 1, 1), 0.0) == 0.0


@pytest.mark.parametrize(
    "shape, groups, rank",
    [((30, 90), 1, 4), ((30, 90), 3, 4), ((90, 30), 1, 6), ((90, 30), 2, 6), ((16, 48), 2, 16)],
    ids=["f-side", "f-side-groups", "column-side", "column-side-groups", "full-rank"],
)
def test_error_from_the_eigendecomposition_equals_the_explicit_residual_norm(shape, groups, rank):
    for kind in ("gaussian", "ill-conditioned", "low-rank"):
        weight = matrix(kind, *shape, 3, np.random.default_rng(8))
        norm = np.linalg.norm(weight, 2)
        factors, error = factorize_with_error(weight, groups, rank, norm)
        plain = factorize(weight, groups, rank)
        assert np.array_equal(factors.first, plain.first)
        assert np.array_equal(factors.second, plain.second)
        explicit = np.linalg.norm(weight - reconstruct(factors), 2) / norm
        longer = max(shape[0], shape[1] // groups)
        # both are exact up to the Gram-path tolerance: |a² − b²| ≤ τ (relative to ‖W‖²)
        assert abs(error**2 - explicit**2) <= 4 * tau(longer)
        if explicit > 1e-3:
            assert error == pytest.approx(explicit, rel=1e-9)


def test_strict_array_namespace_gives_the_numpy_factors():
    """factorize and relative_error use only the array API standard, on both Gram sides."""
    rng = np.random.default_rng(6)
    for shape, groups, rank in (((12, 40), 2, 5), ((40, 12), 3, 2)):
        weight = rng.standard_normal(shape)
        expected, got = factorize(weight, groups, rank), factorize(weight, groups, rank, STRICT)
        assert isinstance(got.first, np.ndarray) and isinstance(got.second, np.ndarray)
        np.testing.assert_allclose(got.first, expected.first, atol=1e-12)
        np.testing.assert_allclose(got.second, expected.second, atol=1e-12)
        norm = np.linalg.norm(weight, 2)
        assert relative_error(weight, got, norm, STRICT) == pytest.approx(
            relative_error(weight, expected, norm), rel=1e-12
        )
        _, error = factorize_with_error(weight, groups, rank, norm, STRICT)
        assert error == pytest.approx(factorize_with_error(weight, groups, rank, norm)[1])


def test_real_model_layers_meet_the_guarantees():
    """Every layer of the real MTCNN O-Net (Conv and MatMul) at a few (g, r)."""
    discovery = discover(onnx.load(MODELS / "mtcnn_onet.onnx"))
    for layer in discovery.layers:
        weight = discovery.weight(layer)
        groups = 2 if layer.in_channels % 2 == 0 else 1
        full = min(layer.out_channels, layer.cols // groups)
        norm = np.linalg.norm(weight, 2)
        for rank in sorted({1, max(1, full // 3), full}):
            factors, error = factorize_with_error(weight, groups, rank, norm)
            assert_truncated_svd(weight, factors)
            explicit = relative_error(weight, factors, norm)
            assert error == pytest.approx(explicit, rel=1e-9, abs=1e-7)


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="cannot factorize"):
        factorize(np.ones((4, 10)), 3, 1)
    with pytest.raises(ValueError, match="cannot factorize"):
        factorize(np.ones((4, 10)), 2, 5)
