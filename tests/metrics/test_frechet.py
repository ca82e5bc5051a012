from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from lightning_dpmot.metrics.frechet import (
    FeatureStatsAccumulator,
    feature_statistics,
    frechet_distance,
    trace_sqrt_product,
)


def _scipy_fid(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """The classic TTUR / pytorch-fid formula with scipy's general matrix square root."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.fixture(scope="module")
def two_sets() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 12)) @ rng.normal(size=(12, 12))
    b = rng.normal(size=(300, 12)) @ rng.normal(size=(12, 12)) + 0.5
    return a, b


def test_matches_scipy_sqrtm(two_sets: tuple[np.ndarray, np.ndarray]) -> None:
    a, b = two_sets
    mu1, s1 = feature_statistics(a)
    mu2, s2 = feature_statistics(b)
    expected = _scipy_fid(mu1, s1, mu2, s2)
    assert expected > 1.0
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6)


def test_feature_statistics_is_numpy_cov_in_float64(two_sets: tuple[np.ndarray, np.ndarray]) -> None:
    a, _ = two_sets
    mu, sigma = feature_statistics(torch.from_numpy(a).float())
    assert mu.dtype == np.float64 and sigma.dtype == np.float64
    a32 = a.astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(mu, a32.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(a32, rowvar=False), rtol=1e-10, atol=1e-12)


def test_self_distance_is_zero_and_symmetric(two_sets: tuple[np.ndarray, np.ndarray]) -> None:
    a, b = two_sets
    mu1, s1 = feature_statistics(a)
    mu2, s2 = feature_statistics(b)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-10)


def test_tensors_and_arrays_give_the_same_value(two_sets: tuple[np.ndarray, np.ndarray]) -> None:
    a, b = two_sets
    mu1, s1 = feature_statistics(a)
    mu2, s2 = feature_statistics(b)
    as_tensors = [torch.from_numpy(v) for v in (mu1, s1, mu2, s2)]
    assert frechet_distance(*as_tensors) == frechet_distance(mu1, s1, mu2, s2)


def test_closed_form_for_diagonal_gaussians() -> None:
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    v1, v2 = rng.uniform(0.1, 3.0, size=6), rng.uniform(0.1, 3.0, size=6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-12)


def test_singular_covariances_give_finite_values() -> None:
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(10, 64)), rng.normal(size=(10, 64)) + 0.1  # d > n: rank-9 covariances
    mu1, s1 = feature_statistics(a)
    mu2, s2 = feature_statistics(b)
    value = frechet_distance(mu1, s1, mu2, s2)
    assert np.isfinite(value) and value > 0
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8)
    # tr sqrt(S1 S2) equals the sum of square roots of the (real, non-negative) eigenvalues of S1 S2
    eig = np.clip(np.linalg.eigvals(s1 @ s2).real, 0, None)
    assert trace_sqrt_product(s1, s2) == pytest.approx(np.sqrt(eig).sum(), rel=1e-6)


def test_shape_errors_are_clear() -> None:
    mu, sigma = np.zeros(4), np.eye(4)
    with pytest.raises(ValueError, match=r"sigma1 must have shape \(4, 4\)"):
        frechet_distance(mu, np.eye(3), mu, sigma)
    with pytest.raises(ValueError, match="feature dimensions differ"):
        frechet_distance(mu, sigma, np.zeros(5), np.eye(5))
    with pytest.raises(ValueError, match=r"mu2 must have shape \(d,\)"):
        frechet_distance(mu, sigma, np.zeros((1, 4)), sigma)
    with pytest.raises(ValueError, match="mu1 contains NaN"):
        frechet_distance(np.full(4, np.nan), sigma, mu, sigma)
    with pytest.raises(ValueError, match="at least 2 feature vectors"):
        feature_statistics(np.zeros((1, 4)))


def test_streaming_accumulator_matches_batch_statistics(two_sets: tuple[np.ndarray, np.ndarray]) -> None:
    a, _ = two_sets
    acc = FeatureStatsAccumulator(12)
    for chunk in np.array_split(a + 1e4, [1, 50, 51, 260]):  # uneven batches, a large offset
        acc.update(torch.from_numpy(chunk))
    mu, sigma = acc.statistics()
    assert acc.n == 400
    np.testing.assert_allclose(mu, (a + 1e4).mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(a, rowvar=False), rtol=1e-8, atol=1e-9)
    with pytest.raises(ValueError, match=r"shape \(B, 12\)"):
        acc.update(torch.zeros(3, 5))
