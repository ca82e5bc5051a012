"""EDM preconditioning and training objective (Karras et al. 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models", Table 1 and Sec. 5).

Noise levels live in "sigma space": x = y + sigma * n with y the data (in [-1, 1], sigma_data = 0.5) and
n ~ N(0, I). The denoiser D(x; sigma) estimates y and is built from a raw network F:

    D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma))

    c_skip = sigma_data^2 / (sigma^2 + sigma_data^2)     c_out = sigma sigma_data / sqrt(sigma^2 + sigma_data^2)
    c_in   = 1 / sqrt(sigma^2 + sigma_data^2)            c_noise = ln(sigma) / 4

Training draws ln(sigma) ~ N(P_mean, P_std^2) and weights the squared error by
lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2, so that lambda * c_out^2 = 1.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from lightning_dpmot.diffusion.conditioning import Cond
from lightning_dpmot.diffusion.denoiser import append_dims
from lightning_dpmot.utils.precision import autocast_off


class EDMCoefficients(NamedTuple):
    """Preconditioning coefficients, each with the shape of ``sigma``."""

    c_skip: Tensor
    c_out: Tensor
    c_in: Tensor
    c_noise: Tensor


def edm_precond(sigma: Tensor, sigma_data: float = 0.5) -> EDMCoefficients:
    """EDM preconditioning (Table 1, "Ours" column).

    Args:
        sigma: (B,) noise levels, > 0.
        sigma_data: standard deviation of the data.
    """
    sd2 = sigma_data**2
    s2 = sigma**2
    return EDMCoefficients(
        c_skip=sd2 / (s2 + sd2),
        c_out=sigma * sigma_data / (s2 + sd2).sqrt(),
        c_in=1.0 / (s2 + sd2).sqrt(),
        c_noise=sigma.log() / 4.0,
    )


def edm_loss_weight(sigma: Tensor, sigma_data: float = 0.5) -> Tensor:
    """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def sample_sigma_lognormal(
    n: int,
    P_mean: float = -1.2,
    P_std: float = 1.2,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Training noise levels: ln(sigma) ~ N(P_mean, P_std^2). Returns (n,) float32."""
    rnd = torch.randn(n, generator=generator, device=device)
    return (rnd * P_std + P_mean).exp()


class EDMPrecond(nn.Module):
    """Wraps a raw network F (project net interface) into the EDM denoiser D(x; sigma, cond).

    Args:
        raw_net: the raw network F with ``forward(x, noise_labels, cond)``.
        sigma_data: data standard deviation (0.5 for images in [-1, 1]).
    """

    def __init__(self, raw_net: nn.Module, sigma_data: float = 0.5) -> None:
        super().__init__()
        if not sigma_data > 0 or sigma_data == float("inf"):
            raise ValueError(f"sigma_data must be a finite positive number, got {sigma_data}")
        self.raw_net = raw_net
        self.sigma_data = sigma_data

    def forward(self, x: Tensor, sigma: Tensor, cond: Cond | None = None) -> Tensor:
        """x: (B, *S) noisy samples; sigma: (B,) or scalar; returns D(x; sigma) with x's shape and dtype.

        Mixed precision as in NVlabs/edm: the coefficients, the net's input ``c_in x`` and the output combination
        ``c_skip x + c_out F`` are float32 with autocast off; only the raw net runs under the caller's autocast
        (bf16 under ``bf16-mixed``), and its output is cast back to float32.
        """
        dtype = x.dtype
        with autocast_off(x.device):
            x = x.float()
            sigma = sigma.float().reshape(-1).expand(x.shape[0])
            c = edm_precond(sigma, self.sigma_data)
            net_in = append_dims(c.c_in, x.ndim) * x
        F_x = self.raw_net(net_in, c.c_noise, cond)
        with autocast_off(x.device):
            D_x = append_dims(c.c_skip, x.ndim) * x + append_dims(c.c_out, x.ndim) * F_x.float()
        return D_x.to(dtype)


def edm_loss(denoiser: EDMPrecond, y: Tensor, n: Tensor, sigma: Tensor, cond: Cond | None = None) -> Tensor:
    """Per-sample EDM loss: lambda(sigma) * ||D(y + sigma n; sigma) - y||^2 summed over the sample's elements.

    Args:
        denoiser: the preconditioned denoiser.
        y: (B, *S) clean data; n: (B, *S) unit Gaussian noise (possibly OT-assigned); sigma: (B,);
        cond: condition mapping of (B, ...) tensors or None.
    Returns:
        (B,) float32 loss per sample (EDM sums over pixels and averages over the batch), computed in float32 also
        under bf16 autocast.
    """
    with autocast_off(y.device):
        y, n, sigma = y.float(), n.float(), sigma.float()
        x = y + append_dims(sigma, y.ndim) * n
    D_x = denoiser(x, sigma, cond)  # float32 (the net inside may run in bf16)
    with autocast_off(y.device):  # the weighting and the reduction in float32
        weight = edm_loss_weight(sigma, denoiser.sigma_data)
        return weight * (D_x.float() - y).square().flatten(1).sum(1)


__all__ = [
    "EDMCoefficients",
    "EDMPrecond",
    "edm_loss",
    "edm_loss_weight",
    "edm_precond",
    "sample_sigma_lognormal",
]
