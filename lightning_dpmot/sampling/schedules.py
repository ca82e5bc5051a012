"""Noise-level discretisations for sampling."""

from __future__ import annotations

import torch
from torch import Tensor


def karras_sigmas(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> Tensor:
    """EDM's time discretisation (Karras et al. 2022, Eq. 5), float64, descending, with a final 0.

    sigma_i = (sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho for i = 0..N-1,
    followed by sigma_N = 0. Large rho concentrates steps at low noise; rho -> infinity is log-uniform.

    Args:
        num_steps: N >= 1 (N = 1 gives [sigma_max, 0]).
        sigma_min, sigma_max: the range, 0 < sigma_min <= sigma_max.
        rho: the schedule's exponent (7 in EDM; AOT uses 90 unconditional, 72 conditional).
    Returns:
        (N + 1,) float64 tensor.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 0 < sigma_min <= sigma_max:
        raise ValueError(f"need 0 < sigma_min <= sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    if rho <= 0:
        raise ValueError(f"rho must be > 0, got {rho}")
    if num_steps == 1:
        sigmas = torch.tensor([sigma_max], dtype=torch.float64)
    else:
        ramp = torch.linspace(0, 1, num_steps, dtype=torch.float64)
        max_inv, min_inv = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
        sigmas = (max_inv + ramp * (min_inv - max_inv)) ** rho
        sigmas[0], sigmas[-1] = sigma_max, sigma_min  # exact endpoints despite the power round trip
    return torch.cat([sigmas, sigmas.new_zeros(1)])
