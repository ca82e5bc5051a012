"""Guidance as a denoiser wrapper, configured apart from the ODE/SDE solver.

:class:`GuidanceSpec` is the configuration (YAML ``guidance: {scale: 2.0}``); :meth:`GuidanceSpec.wrap` turns a
denoiser into the guided one, which every sampler then uses like any other denoiser. Classifier-free guidance
(Ho & Salimans 2022) in denoiser form:

    D_w(x; sigma, c) = D(x; sigma, null(c)) + w * (D(x; sigma, c) - D(x; sigma, null(c)))

The conditional and null passes run as one batch of 2B; guidance counts as one function evaluation (the convention
of the guidance literature). ``w = 1`` is the plain conditional model and no wrapper is built.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_dpmot.diffusion.conditioning import Cond, cond_cat
from lightning_dpmot.diffusion.denoiser import Denoiser

NullCondition = Callable[[Cond], Cond]


class CFGDenoiser:
    """Classifier-free guidance around ``denoiser`` with weight ``scale`` and the model's null condition."""

    def __init__(self, denoiser: Denoiser, scale: float, null: NullCondition) -> None:
        self.denoiser = denoiser
        self.scale = scale
        self.null = null

    def __call__(self, x: Tensor, sigma: Tensor, cond: Cond | None = None) -> Tensor:
        if not cond or self.scale == 1.0:
            return self.denoiser(x, sigma, cond)
        both = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), cond_cat(cond, self.null(cond)))
        d_cond, d_uncond = both.chunk(2)
        return d_uncond + self.scale * (d_cond - d_uncond)


@dataclass
class GuidanceSpec:
    """How generation is guided (independent of the sampler).

    Args:
        scale: classifier-free guidance weight w (1 = the plain conditional model; 0 = the unconditional one).
    """

    scale: float = 1.0

    def __post_init__(self) -> None:
        if not float("-inf") < self.scale < float("inf"):
            raise ValueError(f"guidance scale must be finite, got {self.scale}")

    @property
    def needs_grad(self) -> bool:
        """Whether sampling with this guidance differentiates through the model (CFG does not)."""
        return False

    def wrap(self, denoiser: Denoiser, null: NullCondition | None) -> Denoiser:
        """The guided denoiser (``denoiser`` itself when nothing is to be done or the model is unconditional)."""
        if self.scale == 1.0 or null is None:
            return denoiser
        return CFGDenoiser(denoiser, self.scale, null)


__all__ = ["CFGDenoiser", "GuidanceSpec", "NullCondition"]
