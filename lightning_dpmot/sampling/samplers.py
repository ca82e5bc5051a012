"""Samplers in sigma space, one signature for all (k-diffusion style).

``sampler(denoiser, x, sigmas, *, cond=None, generator=None, callback=None, **options) -> SampleResult``

- ``denoiser``: D(x, sigma, cond) (see :mod:`lightning_dpmot.diffusion.denoiser`); guidance is a denoiser wrapper.
- ``cond``: the condition mapping (``{"label": (B,)}``, text states, ...), passed to the denoiser untouched.
- ``x``: (B, *S) initial state at level ``sigmas[0]`` (noise scaled by ``sigmas[0]``, or an OT-mapped latent).
- ``sigmas``: (N + 1,) descending noise levels ending in 0.
- ``generator``: randomness for stochastic samplers (a :class:`torch.Generator` or a per-sample
  :class:`~lightning_dpmot.utils.random.StackedGenerator`).
- ``callback``: called after every step with a dict ``{"i", "x_in", "x", "sigma", "sigma_next", "denoised"}`` (the
  state ``x_in`` at level ``sigma`` that the step started from, the new state ``x`` at ``sigma_next``); used to
  record trajectories (curvature metrics) or show progress.

Every sampler returns the final sample and its exact number of network function evaluations (NFE).
The ODE state is kept in float64 as in EDM's reference sampler; the network runs in its own precision.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal, NamedTuple, Protocol

import torch
from torch import Tensor

from lightning_dpmot.diffusion.conditioning import Cond
from lightning_dpmot.diffusion.denoiser import CountingDenoiser, Denoiser

StepCallback = Callable[[dict[str, Any]], None]


class SampleResult(NamedTuple):
    """x: (B, *S) final samples; nfe: network function evaluations used."""

    x: Tensor
    nfe: int


class NoiseSource(Protocol):
    def randn_like(self, x: Tensor) -> Tensor: ...


def _randn_like(x: Tensor, generator: torch.Generator | NoiseSource | None) -> Tensor:
    if generator is None:
        return torch.randn_like(x)
    if isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return generator.randn_like(x)


def _check_sigmas(sigmas: Tensor) -> None:
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError(f"sigmas must be a 1-D schedule of N + 1 >= 2 levels, got shape {tuple(sigmas.shape)}")
    if float(sigmas[-1]) != 0.0 or bool((sigmas[1:] > sigmas[:-1]).any()):
        raise ValueError("sigmas must be non-increasing and end with 0")


def _setup(denoiser: Denoiser, x: Tensor, sigmas: Tensor) -> tuple[CountingDenoiser, Tensor, Tensor]:
    """Check the schedule; count NFE; keep the ODE state and the levels in float64 on x's device."""
    _check_sigmas(sigmas)
    return CountingDenoiser(denoiser), x.to(torch.float64), sigmas.to(device=x.device, dtype=torch.float64)


def _denoise(D: CountingDenoiser, x: Tensor, sigma: Tensor, cond: Cond | None) -> Tensor:
    return D(x, sigma.to(x.dtype).expand(x.shape[0]), cond).to(x.dtype)


def _emit(
    callback: StepCallback | None,
    i: int,
    x_in: Tensor,
    x: Tensor,
    sigma: Tensor,
    sigma_next: Tensor,
    denoised: Tensor,
) -> None:
    if callback is not None:
        info = {"i": i, "x_in": x_in, "x": x, "sigma": float(sigma), "sigma_next": float(sigma_next)}
        callback({**info, "denoised": denoised})


@torch.no_grad()
def sample_euler(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: Cond | None = None,
    generator: torch.Generator | NoiseSource | None = None,
    callback: StepCallback | None = None,
) -> SampleResult:
    """Euler's method on the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma. NFE = N.

    For a VP epsilon model on its discrete timesteps this is exactly DDIM with eta = 0.
    """
    D, x, sigmas = _setup(denoiser, x, sigmas)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = _denoise(D, x, sigma, cond)
        d = (x - denoised) / sigma
        x_in, x = x, x + (sigma_next - sigma) * d
        _emit(callback, i, x_in, x, sigma, sigma_next, denoised)
    return SampleResult(x, D.nfe)


def _heun_step(
    D: CountingDenoiser, x: Tensor, sigma: Tensor, sigma_next: Tensor, cond: Cond | None
) -> tuple[Tensor, Tensor]:
    """One step of EDM's Algorithm 1 (Euler + trapezoidal correction unless sigma_next = 0)."""
    denoised = _denoise(D, x, sigma, cond)
    d = (x - denoised) / sigma
    x_next = x + (sigma_next - sigma) * d
    if sigma_next > 0:
        d_prime = (x_next - _denoise(D, x_next, sigma_next, cond)) / sigma_next
        x_next = x + (sigma_next - sigma) * (0.5 * d + 0.5 * d_prime)
    return x_next, denoised


@torch.no_grad()
def sample_heun(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: Cond | None = None,
    generator: torch.Generator | NoiseSource | None = None,
    callback: StepCallback | None = None,
) -> SampleResult:
    """EDM's deterministic 2nd-order sampler (Karras et al. 2022, Algorithm 1). NFE = 2N - 1."""
    D, x, sigmas = _setup(denoiser, x, sigmas)
    for i in range(len(sigmas) - 1):
        x_in = x
        x, denoised = _heun_step(D, x_in, sigmas[i], sigmas[i + 1], cond)
        _emit(callback, i, x_in, x, sigmas[i], sigmas[i + 1], denoised)
    return SampleResult(x, D.nfe)


@torch.no_grad()
def sample_heun_stochastic(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: Cond | None = None,
    generator: torch.Generator | NoiseSource | None = None,
    callback: StepCallback | None = None,
    S_churn: float = 0.0,
    S_min: float = 0.0,
    S_max: float = float("inf"),
    S_noise: float = 1.0,
) -> SampleResult:
    """EDM's stochastic sampler (Algorithm 2): before each Heun step, raise the noise level to
    sigma_hat = sigma (1 + gamma) with gamma = min(S_churn / N, sqrt(2) - 1) when S_min <= sigma <= S_max, adding
    fresh noise of std sqrt(sigma_hat^2 - sigma^2) * S_noise. NFE = 2N - 1. S_churn = 0 reproduces Algorithm 1.
    """
    D, x, sigmas = _setup(denoiser, x, sigmas)
    N = len(sigmas) - 1
    for i in range(N):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        gamma = min(S_churn / N, math.sqrt(2) - 1) if S_min <= float(sigma) <= S_max else 0.0
        sigma_hat = sigma * (1 + gamma)
        if gamma > 0:
            x = x + (sigma_hat**2 - sigma**2).sqrt() * S_noise * _randn_like(x, generator)
        x_in = x
        x, denoised = _heun_step(D, x_in, sigma_hat, sigma_next, cond)
        _emit(callback, i, x_in, x, sigma_hat, sigma_next, denoised)
    return SampleResult(x, D.nfe)


def ancestral_step(sigma: Tensor, sigma_next: Tensor, eta: float) -> tuple[Tensor, Tensor]:
    """Split the move to ``sigma_next`` into a deterministic part to ``sigma_down`` and fresh noise ``sigma_up``
    with sigma_down^2 + sigma_up^2 = sigma_next^2 and
    sigma_up = eta * sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2)
    (DDIM's sigma_t(eta) written in sigma space)."""
    sigma_up = (eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2).clamp(min=0).sqrt()).clamp(max=sigma_next)
    sigma_down = (sigma_next**2 - sigma_up**2).clamp(min=0).sqrt()
    return sigma_down, sigma_up


@torch.no_grad()
def sample_euler_ancestral(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: Cond | None = None,
    generator: torch.Generator | NoiseSource | None = None,
    callback: StepCallback | None = None,
    eta: float = 1.0,
) -> SampleResult:
    """DDIM with stochasticity eta (Song et al. 2021, Eq. 12) in sigma space. NFE = N.

    eta = 0 is deterministic DDIM (= Euler); eta = 1 on all T discrete steps of a VP model is DDPM's ancestral
    sampler.
    """
    D, x, sigmas = _setup(denoiser, x, sigmas)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = _denoise(D, x, sigma, cond)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x_in = x
        x = denoised + sigma_down * (x_in - denoised) / sigma
        if sigma_up > 0:
            x = x + sigma_up * _randn_like(x, generator)
        _emit(callback, i, x_in, x, sigma, sigma_next, denoised)
    return SampleResult(x, D.nfe)


@torch.no_grad()
def sample_ddpm_ho(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: Cond | None = None,
    generator: torch.Generator | NoiseSource | None = None,
    callback: StepCallback | None = None,
    variance: Literal["large", "small"] = "large",
    clip_denoised: bool = True,
) -> SampleResult:
    """Ho et al. (2020)'s CIFAR-10 sampler: the posterior mean of q(x_{t-1} | x_t, x0) at x0 = clip(D, -1, 1) plus
    noise of variance beta_t ("fixedlarge", as in hojonathanho/diffusion and ermongroup/ddim) or the posterior variance
    ("small", = the "ddpm" sampler when unclipped). NFE = N.

    Written in VP variables: alpha_bar = 1 / (1 + sigma^2), x_vp = sqrt(alpha_bar) x, beta_t = 1 - alpha_bar_t /
    alpha_bar_{t-1};  mean = sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t) x0 + sqrt(1 - beta_t)
    (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) x_t;  no noise on the step to sigma = 0.
    """
    D, x, sigmas = _setup(denoiser, x, sigmas)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = _denoise(D, x, sigma, cond)
        x0 = denoised.clamp(-1.0, 1.0) if clip_denoised else denoised
        a, a_next = 1.0 / (1.0 + sigma**2), 1.0 / (1.0 + sigma_next**2)
        beta = 1.0 - a / a_next
        mean = a_next.sqrt() * beta / (1.0 - a) * x0 + (1.0 - beta).sqrt() * (1.0 - a_next) / (1.0 - a) * (a.sqrt() * x)
        x_in = x
        if sigma_next > 0:
            var = beta if variance == "large" else beta * (1.0 - a_next) / (1.0 - a)
            mean = mean + var.sqrt() * _randn_like(x, generator)
        x = mean / a_next.sqrt()
        _emit(callback, i, x_in, x, sigma, sigma_next, denoised)
    return SampleResult(x, D.nfe)
