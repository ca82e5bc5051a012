"""Discrete-time variance-preserving diffusion (DDPM, Ho et al. 2020; DDIM, Song et al. 2021) in sigma space.

The forward process at step t in {0, ..., T-1} is x_t = sqrt(abar_t) y + sqrt(1 - abar_t) eps with
abar_t = prod_{s<=t} (1 - beta_s). Dividing by sqrt(abar_t) gives EDM's sigma space,
x_t / sqrt(abar_t) = y + sigma_t eps
with sigma_t = sqrt((1 - abar_t) / abar_t). That shared "noise level" lets one set of samplers (Euler = DDIM with
eta = 0, Euler-ancestral = DDIM with eta > 0 and DDPM ancestral with eta = 1 on all T steps, Heun) drive both EDM and
epsilon-prediction models, and lets the DPM-OT expressway start the reverse process at any level.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from lightning_dpmot.diffusion.conditioning import Cond
from lightning_dpmot.diffusion.denoiser import append_dims
from lightning_dpmot.utils.precision import autocast_off

BetaSchedule = Literal["linear", "cosine"]


def linear_betas(T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """DDPM's linear schedule beta_t = linspace(beta_start, beta_end, T), float64 (T,)."""
    return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)


def cosine_betas(T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Nichol & Dhariwal (2021) cosine schedule: abar(t) = cos^2(((t/T + s) / (1 + s)) pi/2), betas clipped."""
    steps = torch.arange(T + 1, dtype=torch.float64) / T
    abar = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - abar[1:] / abar[:-1]).clamp(max=max_beta)


class VPSchedule(nn.Module):
    """A discrete VP schedule with its sigma-space view.

    Args:
        schedule: "linear" (DDPM: 1e-4 .. 0.02) or "cosine".
        T: number of diffusion steps.
    """

    def __init__(self, schedule: BetaSchedule = "linear", T: int = 1000) -> None:
        super().__init__()
        if schedule == "linear":
            betas = linear_betas(T)
        elif schedule == "cosine":
            betas = cosine_betas(T)
        else:
            raise ValueError(f"unknown beta schedule {schedule!r}; expected 'linear' or 'cosine'")
        self.T = T
        alphas_cumprod = torch.cumprod(1 - betas, 0)
        self.register_buffer("alphas_cumprod", alphas_cumprod.float(), persistent=False)
        self.register_buffer("sigmas", ((1 - alphas_cumprod) / alphas_cumprod).sqrt().float(), persistent=False)
        self.register_buffer("log_sigmas", self.sigmas.log(), persistent=False)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """Continuous timestep for each sigma (B,) by linear interpolation in log sigma; clamped to [0, T-1]."""
        log_sigma = sigma.float().log().clamp(self.log_sigmas[0], self.log_sigmas[-1])
        high = torch.searchsorted(self.log_sigmas, log_sigma).clamp(1, self.T - 1)
        low = high - 1
        lo, hi = self.log_sigmas[low], self.log_sigmas[high]
        w = ((log_sigma - lo) / (hi - lo)).clamp(0, 1)
        return low + w

    def timestep_sigmas(self, num_steps: int, sigma_max: float | None = None) -> Tensor:
        """DDIM's uniformly spaced timesteps as a descending sigma schedule with a final 0, (num_steps + 1,).

        Spacing: ``round(linspace(T - 1, 0, num_steps))``, which includes t = T - 1 and t = 0; the DDIM paper's
        "uniform" skip ``range(0, T, T // num_steps)`` starts lower (t = 980 for 50 steps of 1000) — use that only
        to match published DDIM numbers exactly.

        With ``sigma_max`` the schedule starts at the largest discrete level <= sigma_max (an intermediate start
        for the DPM-OT expressway) and spaces the steps uniformly below it.
        """
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        t_start = self.T - 1
        if sigma_max is not None:
            t_start = int((self.sigmas <= sigma_max * (1 + 1e-6)).nonzero().max())
        t = torch.linspace(t_start, 0, num_steps, dtype=torch.float64).round().long()
        sigmas = self.sigmas[t]
        return torch.cat([sigmas, sigmas.new_zeros(1)])

    def q_sample(self, y: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """x_t = sqrt(abar_t) y + sqrt(1 - abar_t) eps for integer timesteps t (B,)."""
        abar = append_dims(self.alphas_cumprod[t], y.ndim)
        return abar.sqrt() * y + (1 - abar).sqrt() * eps


class VPEpsDenoiser(nn.Module):
    """Sigma-space denoiser from an epsilon-prediction network:
    D(x; sigma) = x - sigma * eps(x / sqrt(1 + sigma^2), t(sigma)).

    Args:
        raw_net: the raw network eps_theta with ``forward(x_vp, t, cond)`` predicting eps.
        schedule: the VP schedule the network was trained with.
    """

    def __init__(self, raw_net: nn.Module, schedule: VPSchedule) -> None:
        super().__init__()
        self.raw_net = raw_net
        self.schedule = schedule

    def forward(self, x: Tensor, sigma: Tensor, cond: Cond | None = None) -> Tensor:
        """x: (B, *S) in sigma space; sigma: (B,) or scalar. Returns the x0 estimate with x's dtype.

        As :class:`~lightning_dpmot.diffusion.edm.EDMPrecond`: everything but the raw net in float32 with autocast
        off; the net's output is cast back to float32.
        """
        dtype = x.dtype
        with autocast_off(x.device):
            x = x.float()
            sigma = sigma.float().reshape(-1).expand(x.shape[0])
            c_in = append_dims(1 / (sigma**2 + 1).sqrt(), x.ndim)
            net_in, t = x * c_in, self.schedule.sigma_to_t(sigma)
        eps = self.raw_net(net_in, t, cond)
        with autocast_off(x.device):
            return (x - append_dims(sigma, x.ndim) * eps.float()).to(dtype)
