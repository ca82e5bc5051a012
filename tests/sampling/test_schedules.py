"""karras_sigmas: endpoints, monotonicity, length, and the rho = 7 / rho = 90 grids."""

from __future__ import annotations

import pytest
import torch

from lightning_dpmot.sampling import karras_sigmas


@pytest.mark.parametrize("rho", [1.0, 7.0, 72.0, 90.0])
@pytest.mark.parametrize("n", [1, 2, 14, 18])
def test_endpoints_length_monotone(rho: float, n: int) -> None:
    s = karras_sigmas(n, 0.002, 80.0, rho)
    assert s.shape == (n + 1,) and s.dtype == torch.float64
    assert s[0].item() == 80.0 and s[-1].item() == 0.0
    if n > 1:
        assert s[-2].item() == pytest.approx(0.002, rel=1e-12)
    assert bool((s[1:] < s[:-1]).all())


def test_rho7_matches_formula() -> None:
    n, rho, lo, hi = 18, 7.0, 0.002, 80.0
    s = karras_sigmas(n, lo, hi, rho)
    for i in range(n):
        expected = (hi ** (1 / rho) + i / (n - 1) * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
        assert s[i].item() == pytest.approx(expected, rel=1e-12)
    assert s[1].item() == pytest.approx(57.586, rel=1e-4)  # EDM's CIFAR-10 grid: 80, 57.6, 40.8, ...
    assert s[2].item() == pytest.approx(40.786, rel=1e-4)


def test_rho90_is_nearly_log_uniform() -> None:
    s = karras_sigmas(14, 0.002, 80.0, 90.0)[:-1]
    ratios = s[:-1] / s[1:]
    assert s[1].item() == pytest.approx(36.96, rel=1e-3)  # edm-aot.md 2.2: 80, 37, 17, 7.7, ...
    assert ratios.min().item() > 2.1 and ratios.max().item() < 2.4  # within 10 % of a constant ratio


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="num_steps"):
        karras_sigmas(0)
    with pytest.raises(ValueError, match="sigma_min"):
        karras_sigmas(5, 1.0, 0.5)
    with pytest.raises(ValueError, match="rho"):
        karras_sigmas(5, rho=0)
