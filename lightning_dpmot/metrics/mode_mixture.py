"""Mode mixing and mode dropping.

* :func:`mode_mixture_rate`: DPM-OT's mode-mixture ratio (MMR). A classifier gives softmax probabilities
  ``p`` (N, K); a sample is *mixed* at threshold ``tau`` when at least two classes have ``p_c >= tau``. The
  MMR is the share of mixed samples. Report it on real data next to the generator: a generator that returns
  real images scores the classifier's own ambiguity, the floor of this metric.
* :func:`off_mode_rate` / :func:`mode_coverage`: the same question for mixtures with known modes (2-D toy
  data): a sample is *on mode* c when it lies within ``k * std`` of centre ``mu_c``; samples on no mode fall
  between modes (mixing), and modes that receive no samples are dropped.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

#: Thresholds tau reported by default (the first four of DPM-OT's ``test.py``).
DEFAULT_TAUS = (0.1, 0.2, 0.3, 0.4)


def mode_mixture_rate(probs: Tensor, taus: Sequence[float] = DEFAULT_TAUS, atol: float = 1e-3) -> dict[float, float]:
    """Share of samples with at least two classes at probability >= tau, for each tau.

    Args:
        probs: (N, K) softmax probabilities (rows sum to 1), K >= 2.
        taus: thresholds in (0, 0.5]; above 0.5 no two classes can both reach tau.
        atol: tolerance of the row-sum check.

    Returns:
        ``{tau: MMR}`` with MMR in [0, 1].
    """
    if probs.ndim != 2 or probs.shape[1] < 2 or len(probs) == 0:
        raise ValueError(f"probs must have shape (N, K) with N >= 1 and K >= 2, got {tuple(probs.shape)}")
    p = probs.detach().double()
    if p.min() < 0 or (p.sum(1) - 1).abs().max() > atol:
        raise ValueError("probs must be softmax probabilities (non-negative rows summing to 1); got logits?")
    bad = [t for t in taus if not 0.0 < t <= 0.5]
    if bad:
        raise ValueError(f"every tau must lie in (0, 0.5], got {bad}")
    return {float(t): ((p >= t).sum(1) >= 2).double().mean().item() for t in taus}


def _mode_distances(x: Tensor, centers: Tensor, std: float, k: float) -> Tensor:
    """Validated distances (N, K) between samples (N, d) and mode centres (K, d)."""
    if x.ndim != 2 or centers.ndim != 2 or x.shape[1] != centers.shape[1]:
        raise ValueError(
            f"x must be (N, d) and centers (K, d) with the same d, got {tuple(x.shape)} and {tuple(centers.shape)}"
        )
    if len(x) == 0 or len(centers) == 0:
        raise ValueError(f"x and centers must be non-empty, got {len(x)} samples and {len(centers)} centres")
    if std <= 0 or k <= 0:
        raise ValueError(f"std and k must be > 0, got std={std}, k={k}")
    return torch.cdist(x.double(), centers.to(x.device, torch.float64))


def off_mode_rate(x: Tensor, centers: Tensor, std: float, k: float = 3.0) -> float:
    """Share of samples farther than ``k * std`` from every mode centre.

    Args:
        x: (N, d) samples (raw coordinates, e.g. d = 2).
        centers: (K, d) mode centres of the mixture.
        std: per-coordinate standard deviation of each (isotropic) mode.
        k: radius in standard deviations.

    Returns:
        Off-mode share in [0, 1].
    """
    dist = _mode_distances(x, centers, std, k)
    return (dist.min(1).values > k * std).double().mean().item()


def mode_coverage(x: Tensor, centers: Tensor, std: float, k: float = 3.0, min_count: int = 1) -> tuple[Tensor, int]:
    """Samples per mode and the number of modes hit.

    A sample counts for its nearest centre when it lies within ``k * std`` of it; a mode is *hit* when it
    receives at least ``min_count`` samples. ``K - modes_hit`` modes are dropped.

    Args:
        x: (N, d) samples.
        centers: (K, d) mode centres.
        std: per-coordinate standard deviation of each mode.
        k: radius in standard deviations.
        min_count: samples a mode needs to count as hit.

    Returns:
        ``(counts, modes_hit)``: (K,) int64 counts (summing to N minus the off-mode samples) and an int.
    """
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    dist = _mode_distances(x, centers, std, k)
    nearest_dist, nearest = dist.min(1)
    counts = torch.bincount(nearest[nearest_dist <= k * std], minlength=len(centers))
    return counts, int((counts >= min_count).sum().item())
