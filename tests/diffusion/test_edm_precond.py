"""EDM preconditioning, loss weight and log-normal sigma against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_dpmot.diffusion import EDMPrecond, edm_loss, edm_loss_weight, edm_precond, sample_sigma_lognormal

SIGMAS = [0.002, 0.1, 0.5, 1.0, 2.0, 80.0]


@pytest.mark.parametrize("sigma", SIGMAS)
def test_coefficients_match_hand_formulas(sigma: float) -> None:
    sd = 0.5
    c = edm_precond(torch.tensor([sigma], dtype=torch.float64), sd)
    assert c.c_skip.item() == pytest.approx(sd**2 / (sigma**2 + sd**2), rel=1e-12)
    assert c.c_out.item() == pytest.approx(sigma * sd / math.sqrt(sigma**2 + sd**2), rel=1e-12)
    assert c.c_in.item() == pytest.approx(1 / math.sqrt(sigma**2 + sd**2), rel=1e-12)
    assert c.c_noise.item() == pytest.approx(math.log(sigma) / 4, rel=1e-12)


def test_known_values_at_sigma_equal_sigma_data() -> None:
    c = edm_precond(torch.tensor([0.5], dtype=torch.float64), 0.5)
    assert c.c_skip.item() == pytest.approx(0.5)
    assert c.c_out.item() == pytest.approx(0.5 / math.sqrt(2))
    assert c.c_in.item() == pytest.approx(math.sqrt(2))
    assert edm_loss_weight(torch.tensor(0.5, dtype=torch.float64)).item() == pytest.approx(
        8.0
    )  # (0.25 + 0.25) / 0.25^2


@pytest.mark.parametrize("sigma", SIGMAS)
def test_loss_weight_times_c_out_squared_is_one(sigma: float) -> None:
    s = torch.tensor([sigma], dtype=torch.float64)
    assert (edm_loss_weight(s) * edm_precond(s).c_out ** 2).item() == pytest.approx(1.0, rel=1e-12)
    assert edm_loss_weight(s).item() == pytest.approx((sigma**2 + 0.25) / (sigma * 0.5) ** 2, rel=1e-12)


def test_limits_of_c_skip_and_c_out() -> None:
    c_small = edm_precond(torch.tensor([1e-6], dtype=torch.float64))
    c_large = edm_precond(torch.tensor([1e6], dtype=torch.float64))
    assert c_small.c_skip.item() == pytest.approx(1.0) and c_small.c_out.item() == pytest.approx(0.0, abs=1e-5)
    assert c_large.c_skip.item() == pytest.approx(0.0, abs=1e-12) and c_large.c_out.item() == pytest.approx(0.5)


class WildNet(nn.Module):
    """Returns large arbitrary outputs; the denoiser must still return its input as sigma -> 0."""

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None = None):
        return 1e3 * torch.sin(7 * x) + noise_labels.reshape(-1, 1, 1, 1)


def test_denoiser_returns_input_as_sigma_to_zero() -> None:
    """|D(x; sigma) - x| <= c_out |F| + (1 - c_skip)|x| -> 0, however large the network output F."""
    D = EDMPrecond(WildNet())
    x = torch.randn(4, 1, 4, 4)
    errors = []
    for sigma in (1e-3, 1e-5, 1e-7):
        err = (D(x, torch.full((4,), sigma)) - x).abs().max().item()
        assert err <= sigma * 1.01e3 + 1e-6, (sigma, err)  # c_out ~ sigma, |F| <= ~1e3
        errors.append(err)
    assert errors[2] < 1e-3 * errors[0]


def test_network_sees_preconditioned_input_and_c_noise() -> None:
    seen = {}

    class Spy(nn.Module):
        def forward(self, x, noise_labels, class_labels=None):
            seen["x"], seen["c_noise"] = x.clone(), noise_labels.clone()
            return torch.zeros_like(x)

    x = torch.randn(2, 3, 2, 2)
    sigma = torch.tensor([2.0, 0.1])
    out = EDMPrecond(Spy())(x, sigma)
    c = edm_precond(sigma)
    assert torch.allclose(seen["x"], x * c.c_in.reshape(-1, 1, 1, 1))
    assert torch.allclose(seen["c_noise"], torch.log(sigma) / 4)
    assert torch.allclose(out, x * c.c_skip.reshape(-1, 1, 1, 1))  # F = 0 -> D = c_skip x


def test_edm_loss_equals_weighted_sum_of_squares() -> None:
    torch.manual_seed(0)
    D = EDMPrecond(WildNet())
    y, n = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    sigma = torch.tensor([0.3, 1.0, 5.0])
    loss = edm_loss(D, y, n, sigma)
    expected = edm_loss_weight(sigma) * (D(y + sigma.reshape(-1, 1, 1, 1) * n, sigma) - y).square().sum((1, 2, 3))
    assert loss.shape == (3,)
    assert torch.allclose(loss, expected)


def test_training_sigma_is_lognormal_with_edm_parameters() -> None:
    gen = torch.Generator().manual_seed(0)
    sigma = sample_sigma_lognormal(200_000, -1.2, 1.2, generator=gen)
    log_sigma = sigma.log()
    assert log_sigma.mean().item() == pytest.approx(-1.2, abs=0.01)
    assert log_sigma.std().item() == pytest.approx(1.2, abs=0.01)
