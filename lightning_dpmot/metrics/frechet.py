"""Fréchet distance between Gaussians fitted to feature sets (the "F" in FID).

For features summarised by N(mu1, Sigma1) and N(mu2, Sigma2) (Heusel et al., 2017)::

    d^2 = ||mu1 - mu2||^2 + tr(Sigma1) + tr(Sigma2) - 2 tr((Sigma1 Sigma2)^{1/2})

The trace of the matrix square root is taken from the eigenvalues of the symmetric PSD matrix
``Sigma1^{1/2} Sigma2 Sigma1^{1/2}``, which has the same spectrum as ``Sigma1 Sigma2``. Unlike
``scipy.linalg.sqrtm`` on the non-symmetric product, this needs no complex arithmetic, no diagonal offset for
singular covariances (d > n) and never returns NaN. Everything is computed in float64.
"""

from __future__ import annotations

import numpy as np
import torch
from einops import einsum
from torch import Tensor

ArrayLike = np.ndarray | Tensor


def _as_float64(a: ArrayLike, name: str) -> np.ndarray:
    """Converts a tensor or array to a float64 numpy array; rejects NaN and inf."""
    if isinstance(a, Tensor):
        a = a.detach().to(device="cpu", dtype=torch.float64).numpy()
    out = np.asarray(a, dtype=np.float64)
    if not np.all(np.isfinite(out)):
        raise ValueError(f"{name} contains NaN or inf values")
    return out


def _sqrt_psd(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a (numerically) PSD matrix; tiny negative eigenvalues are clipped to 0.

    Args:
        sigma: (d, d) symmetric matrix.

    Returns:
        (d, d) symmetric R with R @ R ~= sigma.
    """
    eigval, eigvec = np.linalg.eigh(0.5 * (sigma + sigma.T))
    root = np.sqrt(np.clip(eigval, 0.0, None))
    return (eigvec * root) @ eigvec.T


def trace_sqrt_product(sigma1: ArrayLike, sigma2: ArrayLike) -> float:
    """tr((Sigma1 Sigma2)^{1/2}) for two covariance matrices, via a symmetric eigenproblem.

    Args:
        sigma1: (d, d) covariance matrix.
        sigma2: (d, d) covariance matrix.

    Returns:
        The trace as a Python float (>= 0).
    """
    s1 = _as_float64(sigma1, "sigma1")
    s2 = _as_float64(sigma2, "sigma2")
    root1 = _sqrt_psd(s1)
    m = root1 @ s2 @ root1
    eigval = np.linalg.eigvalsh(0.5 * (m + m.T))
    return float(np.sqrt(np.clip(eigval, 0.0, None)).sum())


def _check_gaussian(mu: np.ndarray, sigma: np.ndarray, which: str) -> None:
    if mu.ndim != 1:
        raise ValueError(f"mu{which} must have shape (d,), got {mu.shape}")
    d = mu.shape[0]
    if sigma.shape != (d, d):
        raise ValueError(f"sigma{which} must have shape ({d}, {d}) to match mu{which}, got {sigma.shape}")


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike) -> float:
    """Squared Fréchet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2).

    Args:
        mu1: (d,) mean of the first feature set.
        sigma1: (d, d) covariance of the first feature set.
        mu2: (d,) mean of the second feature set.
        sigma2: (d, d) covariance of the second feature set.

    Returns:
        The FID value as a float (float64 arithmetic; clipped at 0 against round-off).

    Raises:
        ValueError: if the shapes disagree or an input holds NaN/inf.
    """
    m1, s1 = _as_float64(mu1, "mu1"), _as_float64(sigma1, "sigma1")
    m2, s2 = _as_float64(mu2, "mu2"), _as_float64(sigma2, "sigma2")
    _check_gaussian(m1, s1, "1")
    _check_gaussian(m2, s2, "2")
    if m1.shape != m2.shape:
        raise ValueError(f"feature dimensions differ: mu1 has shape {m1.shape}, mu2 has shape {m2.shape}")
    diff = m1 - m2
    value = diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt_product(s1, s2)
    return float(max(value, 0.0))


def feature_statistics(features: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance of a feature set (as ``numpy.cov(rowvar=False)``), in float64.

    Args:
        features: (N, d) features, N >= 2.

    Returns:
        mu (d,) and sigma (d, d), both float64.
    """
    f = _as_float64(features, "features")
    if f.ndim != 2:
        raise ValueError(f"features must have shape (N, d), got {f.shape}")
    if f.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {f.shape[0]}")
    mu = f.mean(axis=0)
    centred = f - mu
    sigma = centred.T @ centred / (f.shape[0] - 1)
    return mu, sigma


class FeatureStatsAccumulator:
    """Streaming float64 mean and covariance of features (Chan et al.'s pairwise update).

    Keeps the count ``n``, the running mean ``mean`` (d,) and the centred scatter ``m2`` (d, d) on the device
    of the first batch. Merging centred moments avoids the cancellation of the raw ``sum x x^T - n mu mu^T``
    form.

    Args:
        num_features: feature dimension d.
    """

    def __init__(self, num_features: int) -> None:
        if num_features < 1:
            raise ValueError(f"num_features must be >= 1, got {num_features}")
        self.num_features = num_features
        self.n = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None

    def update(self, features: Tensor) -> None:
        """Adds a batch of features.

        Args:
            features: (B, d) features, any float dtype and device.
        """
        if features.ndim != 2 or features.shape[1] != self.num_features:
            raise ValueError(f"features must have shape (B, {self.num_features}), got {tuple(features.shape)}")
        nb = features.shape[0]
        if nb == 0:
            return
        f = features.detach().to(torch.float64)
        mean_b = f.mean(dim=0)
        centred = f - mean_b
        m2_b = einsum(centred, centred, "b i, b j -> i j")
        if self.mean is None or self.m2 is None:
            self.n, self.mean, self.m2 = nb, mean_b, m2_b
            return
        n = self.n + nb
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (nb / n)
        self.m2 = self.m2 + m2_b + torch.outer(delta, delta) * (self.n * nb / n)
        self.n = n

    def statistics(self) -> tuple[np.ndarray, np.ndarray]:
        """Returns mu (d,) and the unbiased covariance sigma (d, d) as float64 numpy arrays."""
        if self.n < 2 or self.mean is None or self.m2 is None:
            raise ValueError(f"need at least 2 feature vectors for a covariance, got {self.n}")
        mu = self.mean.cpu().numpy()
        sigma = (self.m2 / (self.n - 1)).cpu().numpy()
        return mu, 0.5 * (sigma + sigma.T)
