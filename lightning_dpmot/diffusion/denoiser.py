"""The denoiser interface shared by every model and sampler, and wrappers around it.

A *denoiser* is any callable ``D(x, sigma, class_labels=None) -> Tensor`` in sigma space: ``x`` (B, *S) is a noisy
sample ``y + sigma * n``, ``sigma`` (B,) its noise level, and the result (B, *S) estimates the clean ``y``. EDM
models are denoisers by construction; discrete-time VP / epsilon models are wrapped into one
(:class:`~lightning_dpmot.diffusion.vp.VPEpsDenoiser`), so all samplers work with all models.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor


class Denoiser(Protocol):
    """D(x; sigma): x (B, *S), sigma (B,), class_labels (B,) int64 (-1 = unconditional) or None."""

    def __call__(self, x: Tensor, sigma: Tensor, class_labels: Tensor | None = None) -> Tensor: ...


def append_dims(t: Tensor, ndim: int) -> Tensor:
    """Append trailing singleton dims so that ``t`` (B,) broadcasts against a (B, ...) tensor of ``ndim`` dims."""
    if t.ndim > ndim:
        raise ValueError(f"cannot broadcast a tensor of {t.ndim} dims to {ndim} dims")
    return t.reshape(*t.shape, *([1] * (ndim - t.ndim)))


class CountingDenoiser:
    """Wraps a denoiser and counts network function evaluations (one per call, whatever the batch size)."""

    def __init__(self, denoiser: Denoiser) -> None:
        self.denoiser = denoiser
        self.nfe = 0

    def __call__(self, x: Tensor, sigma: Tensor, class_labels: Tensor | None = None) -> Tensor:
        self.nfe += 1
        return self.denoiser(x, sigma, class_labels)


class CFGDenoiser:
    """Classifier-free guidance (Ho & Salimans 2022) in denoiser form:
    D_w = D(x; sigma, null) + w * (D(x; sigma, c) - D(x; sigma, null)).

    The conditional and unconditional passes run as one batch of 2B; guidance counts as one function evaluation
    (the convention of the guidance literature). ``w = 1`` is the plain conditional model.
    """

    def __init__(self, denoiser: Denoiser, guidance_scale: float) -> None:
        self.denoiser = denoiser
        self.guidance_scale = guidance_scale

    def __call__(self, x: Tensor, sigma: Tensor, class_labels: Tensor | None = None) -> Tensor:
        if class_labels is None or self.guidance_scale == 1.0:
            return self.denoiser(x, sigma, class_labels)

        null = torch.full_like(class_labels, -1)
        both = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([class_labels, null]))
        d_cond, d_uncond = both.chunk(2)
        return d_uncond + self.guidance_scale * (d_cond - d_uncond)
