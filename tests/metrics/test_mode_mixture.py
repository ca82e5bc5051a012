"""Mode-mixture rate on constructed probabilities; off-mode rate and coverage on a ring of Gaussians."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch

from lightning_dpmot.metrics.mode_mixture import mode_coverage, mode_mixture_rate, off_mode_rate


def test_mode_mixture_rate_on_constructed_rows() -> None:
    probs = torch.tensor(
        [
            [0.50, 0.50, 0.00],  # mixed at every tau <= 0.5
            [0.85, 0.15, 0.00],  # mixed at 0.1 only
            [0.70, 0.30, 0.00],  # mixed at 0.1, 0.2, 0.3 (0.3 >= 0.3)
            [1.00, 0.00, 0.00],  # never
            [0.75, 0.25, 0.00],  # mixed at 0.1, 0.2
            [0.90, 0.05, 0.05],  # never
        ],
        dtype=torch.float64,
    )
    assert mode_mixture_rate(probs) == pytest.approx({0.1: 4 / 6, 0.2: 3 / 6, 0.3: 2 / 6, 0.4: 1 / 6})
    assert mode_mixture_rate(probs, taus=(0.25, 0.5)) == pytest.approx({0.25: 3 / 6, 0.5: 1 / 6})


def test_mode_mixture_rate_is_non_increasing_in_tau() -> None:
    logits = 3.0 * torch.randn(500, 10, generator=torch.Generator().manual_seed(0))
    rates = list(mode_mixture_rate(logits.softmax(-1), taus=(0.05, 0.1, 0.2, 0.3, 0.4, 0.5)).values())
    assert all(a >= b for a, b in pairwise(rates)) and rates[0] > rates[-1]


def test_mode_mixture_rate_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"softmax probabilities .* got logits\?"):
        mode_mixture_rate(torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"every tau must lie in \(0, 0.5\], got \[0.6\]"):
        mode_mixture_rate(torch.full((2, 2), 0.5), taus=(0.1, 0.6))
    with pytest.raises(ValueError, match=r"probs must have shape \(N, K\)"):
        mode_mixture_rate(torch.ones(3))


def _ring(k: int = 8, radius: float = 2.0) -> torch.Tensor:
    angles = torch.arange(k, dtype=torch.float64) * 2 * math.pi / k
    return radius * torch.stack([angles.cos(), angles.sin()], dim=1)


def test_off_mode_rate_counts_midpoints_between_modes() -> None:
    centers, std = _ring(), 0.02
    labels = torch.arange(80) % 8
    directions = torch.randn(80, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    on_mode = centers[labels] + 2.5 * std * directions / directions.norm(dim=1, keepdim=True)
    midpoints = 0.5 * (centers + centers.roll(1, dims=0))  # 0.77 from both neighbours: off every mode
    x = torch.cat([on_mode, midpoints.repeat(3, 1)[:20]])
    assert off_mode_rate(x, centers, std) == pytest.approx(20 / 100)
    assert off_mode_rate(on_mode, centers, std) == 0.0
    assert off_mode_rate(on_mode, centers, std, k=2.0) == 1.0  # all sit at 2.5 std


def test_mode_coverage_reports_dropped_modes() -> None:
    centers, std = _ring(), 0.02
    counts_wanted = torch.tensor([10, 5, 1, 0, 0, 0, 0, 0])
    on_mode = centers.repeat_interleave(counts_wanted, dim=0)
    x = torch.cat([on_mode, torch.zeros(7, 2, dtype=torch.float64)])  # 7 samples at the ring's centre: off-mode
    counts, hit = mode_coverage(x, centers, std)
    assert counts.tolist() == counts_wanted.tolist() and hit == 3
    assert mode_coverage(x, centers, std, min_count=5)[1] == 2


def test_mode_metrics_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="x must be \\(N, d\\) and centers \\(K, d\\) with the same d"):
        off_mode_rate(torch.zeros(4, 3), torch.zeros(2, 2), std=1.0)
    with pytest.raises(ValueError, match="std and k must be > 0, got std=0.0"):
        mode_coverage(torch.zeros(4, 2), torch.zeros(2, 2), std=0.0)
