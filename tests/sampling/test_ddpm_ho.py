"""Ho et al. (2020)'s CIFAR-10 DDPM sampler ("ddpm_ho": variance beta_t, x0 clipped) against closed forms and
against the eta = 1 ancestral sampler (the same posterior written in sigma space)."""

from __future__ import annotations

import torch

from lightning_dpmot.sampling import SamplerSpec, karras_sigmas, run_sampler, sample_ddpm_ho, sample_euler_ancestral


def gaussian_denoiser(s: float):
    """Exact D(x, sigma) for data N(0, s^2); sigma is (B,)."""

    def D(x: torch.Tensor, sigma: torch.Tensor, cond: object = None) -> torch.Tensor:
        sigma = sigma.reshape(-1, *[1] * (x.ndim - 1))
        return s**2 / (s**2 + sigma**2) * x

    return D


def test_small_variance_without_clipping_is_the_eta_one_ancestral_sampler() -> None:
    sigmas = karras_sigmas(12, 0.002, 80.0).double()
    x = 80.0 * torch.randn(64, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    D = gaussian_denoiser(0.7)
    ho = sample_ddpm_ho(D, x, sigmas, generator=torch.Generator().manual_seed(1), variance="small", clip_denoised=False)
    ancestral = sample_euler_ancestral(D, x, sigmas, generator=torch.Generator().manual_seed(1), eta=1.0)
    assert ho.nfe == ancestral.nfe == 12
    torch.testing.assert_close(ho.x, ancestral.x, rtol=1e-9, atol=1e-9)


def test_large_variance_is_beta_and_clipping_bounds_x0() -> None:
    sigma, sigma_next = 2.0, 1.0
    sigmas = torch.tensor([sigma, sigma_next, 0.0], dtype=torch.float64)
    zero = lambda x, s, cond=None: torch.zeros_like(x)  # noqa: E731
    x = torch.zeros(1000, 1, dtype=torch.float64)
    a, a_next = 1 / (1 + sigma**2), 1 / (1 + sigma_next**2)
    runs = {}
    for variance in ("large", "small"):  # one step from x = 0 with x0 = 0: only the noise remains
        states: list[torch.Tensor] = []
        record = lambda step, states=states: states.append(step["x"])  # noqa: E731
        gen = torch.Generator().manual_seed(3)
        sample_ddpm_ho(zero, x, sigmas, generator=gen, variance=variance, callback=record)
        runs[variance] = states[0]  # the state at sigma_next after the first step
    beta = 1 - a / a_next
    torch.testing.assert_close(runs["large"] / runs["small"], torch.full_like(x, ((1 - a) / (1 - a_next)) ** 0.5))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    torch.testing.assert_close(runs["large"], beta**0.5 * noise / a_next**0.5)
    five = lambda x, s, cond=None: torch.full_like(x, 5.0)  # noqa: E731
    last = torch.tensor([sigma, 0.0], dtype=torch.float64)
    assert torch.equal(sample_ddpm_ho(five, x, last).x, torch.ones_like(x))  # x0 clipped to 1, no noise at sigma 0
    assert torch.equal(sample_ddpm_ho(five, x, last, clip_denoised=False).x, torch.full_like(x, 5.0))


def test_many_steps_reach_the_data_distribution() -> None:
    """With the exact denoiser of N(0, 0.5^2) and 256 steps (no clipping), variance beta_t gives the data's variance;
    the posterior variance ("small", x0 taken at its mean) falls short and approaches it as the steps get finer."""
    spec = SamplerSpec("ddpm_ho", num_steps=3)
    x = 80.0 * torch.randn(40_000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert run_sampler(spec, gaussian_denoiser(0.5), x, karras_sigmas(3, 0.002, 80.0).double()).nfe == spec.nfe == 3
    var = {}
    for variance in ("large", "small"):
        for n in (64, 256):
            gen = torch.Generator().manual_seed(2)
            sigmas = karras_sigmas(n, 0.002, 80.0).double()
            D = gaussian_denoiser(0.5)
            out = sample_ddpm_ho(D, x, sigmas, generator=gen, variance=variance, clip_denoised=False)
            var[variance, n] = out.x.var().item()
    assert abs(var["large", 256] - 0.25) < 0.25 * 0.03, var
    assert var["small", 64] < var["small", 256] < 0.25 and var["small", 256] < var["large", 256], var
