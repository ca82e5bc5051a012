"""The denoiser interface shared by every model and sampler.

A *denoiser* is any callable ``D(x, sigma, cond=None) -> Tensor`` in sigma space: ``x`` (B, *S) is a noisy sample
``y + sigma * n`` of clean data ``y``, ``sigma`` (B,) its noise level, ``cond`` a condition mapping
(:mod:`lightning_dpmot.diffusion.conditioning`) or None, and the output estimates the clean ``y``. EDM models are
denoisers by construction; discrete-time VP / epsilon models are wrapped into one
(:class:`~lightning_dpmot.diffusion.vp.VPEpsDenoiser`), so all samplers work with all models. Guidance wraps a
denoiser into another one (:mod:`lightning_dpmot.diffusion.guidance`).
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor

from lightning_dpmot.diffusion.conditioning import Cond


class Denoiser(Protocol):
    """D(x; sigma, cond): x (B, *S), sigma (B,), cond a mapping of (B, ...) tensors or None -> (B, *S)."""

    def __call__(self, x: Tensor, sigma: Tensor, cond: Cond | None = None) -> Tensor: ...


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

    def __call__(self, x: Tensor, sigma: Tensor, cond: Cond | None = None) -> Tensor:
        self.nfe += 1
        return self.denoiser(x, sigma, cond)
