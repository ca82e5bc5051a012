"""Guidance as a denoiser wrapper, configured apart from the ODE/SDE solver.

:class:`GuidanceSpec` is the configuration (YAML ``guidance: {scale: 2.0}``, optionally ``cross_modal: {...}``);
:meth:`GuidanceSpec.wrap` turns a denoiser into the guided one, which every sampler then uses like any other
denoiser. Classifier-free guidance (Ho & Salimans 2022) in denoiser form:

    D_w(x; sigma, c) = D(x; sigma, null(c)) + w * (D(x; sigma, c) - D(x; sigma, null(c)))

The conditional and null passes run as one batch of 2B; guidance counts as one function evaluation (the convention
of the guidance literature). ``w = 1`` is the plain conditional model and no wrapper is built. ``w`` may be a
schedule of the normalised sampling time tau (:mod:`~lightning_dpmot.diffusion.guidance_schedules`). Cross-modal
(CLIP) guidance (:mod:`~lightning_dpmot.diffusion.cross_modal`) wraps the CFG denoiser, so it differentiates
through the CFG-combined prediction. Discriminator guidance (Kim et al. 2023;
:mod:`~lightning_dpmot.diffusion.discriminator_guidance`, YAML ``discriminator: {checkpoint: ...}``) wraps the CFG
denoiser too, and cross-modal guidance wraps it: CFG -> DG -> cross-modal.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from lightning_dpmot.diffusion.conditioning import Cond, cond_cat
from lightning_dpmot.diffusion.cross_modal import CrossModalSpec
from lightning_dpmot.diffusion.denoiser import Denoiser, append_dims
from lightning_dpmot.diffusion.discriminator_guidance import DiscriminatorGuidanceSpec
from lightning_dpmot.diffusion.guidance_schedules import Constant, GuidanceSchedule, SigmaClock, as_schedule

NullCondition = Callable[[Cond], Cond]


class CFGDenoiser:
    """Classifier-free guidance around ``denoiser`` with weight ``scale`` (a number, or a schedule of tau read
    from ``clock``) and the model's null condition."""

    def __init__(
        self,
        denoiser: Denoiser,
        scale: float | GuidanceSchedule,
        null: NullCondition,
        clock: SigmaClock | None = None,
    ) -> None:
        if isinstance(scale, GuidanceSchedule) and not isinstance(scale, Constant) and clock is None:
            raise ValueError("a scheduled CFG scale needs the sampler's noise levels (a SigmaClock)")
        self.denoiser = denoiser
        self.scale = scale.value if isinstance(scale, Constant) else scale
        self.null = null
        self.clock = clock

    def weight(self, sigma: Tensor) -> Tensor | float:
        """w for each sample (B,) at its noise level (a float for a constant scale)."""
        if isinstance(self.scale, GuidanceSchedule):
            return self.scale(self.clock(sigma)).to(sigma.device)  # type: ignore[misc]
        return self.scale

    def __call__(self, x: Tensor, sigma: Tensor, cond: Cond | None = None) -> Tensor:
        w = self.weight(sigma)
        if not cond or (isinstance(w, float) and w == 1.0):
            return self.denoiser(x, sigma, cond)
        both = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), cond_cat(cond, self.null(cond)))
        d_cond, d_uncond = both.chunk(2)
        if isinstance(w, Tensor):
            w = append_dims(w.to(d_cond.dtype), d_cond.ndim)
        return d_uncond + w * (d_cond - d_uncond)


@dataclass
class GuidanceSpec:
    """How generation is guided (independent of the sampler).

    Args:
        scale: classifier-free guidance weight w (1 = the plain conditional model; 0 = the unconditional one), a
            number or a schedule of the normalised time tau.
        cross_modal: cross-modal (CLIP) guidance through the predicted clean image (None = off).
        discriminator: discriminator guidance, ``D + w sigma^2 grad_x log(d / (1 - d))`` (None = off).
    """

    scale: float | GuidanceSchedule = 1.0
    cross_modal: CrossModalSpec | None = None
    discriminator: DiscriminatorGuidanceSpec | None = None

    def __post_init__(self) -> None:
        if isinstance(self.scale, (int, float)) and not float("-inf") < self.scale < float("inf"):
            raise ValueError(f"guidance scale must be finite, got {self.scale}")
        if isinstance(self.scale, int) and not isinstance(self.scale, bool):
            self.scale = float(self.scale)
        if not isinstance(self.scale, (float, GuidanceSchedule)):
            as_schedule(self.scale)  # raises the TypeError
        if isinstance(self.cross_modal, Mapping):
            self.cross_modal = CrossModalSpec(**self.cross_modal)
        if isinstance(self.discriminator, Mapping):
            self.discriminator = DiscriminatorGuidanceSpec(**self.discriminator)

    @property
    def cfg_is_identity(self) -> bool:
        return (
            isinstance(self.scale, float)
            and self.scale == 1.0
            or (isinstance(self.scale, Constant) and self.scale.value == 1.0)
        )

    @property
    def needs_grad(self) -> bool:
        """Whether sampling needs autograd (cross-modal and discriminator guidance do; CFG does not)."""
        return self.cross_modal_active or (self.discriminator is not None and self.discriminator.active)

    @property
    def cross_modal_active(self) -> bool:
        return self.cross_modal is not None and self.cross_modal.active

    def prepare(self, raw: Mapping[str, Any] | None, seeds: Tensor, device: torch.device | str) -> Cond:
        """Extra condition entries the guidance needs for a request (the matching models' prompt embeddings)."""
        if not self.cross_modal_active:
            return {}
        return self.cross_modal.prepare(raw, seeds, device)  # type: ignore[union-attr]

    def with_guide_text_key(self, key: str) -> GuidanceSpec:
        """A copy whose matching models read the raw-condition entry ``key`` (e.g. ``caption_zh``)."""
        if self.cross_modal is None:
            return self
        return replace(self, cross_modal=self.cross_modal.with_text_key(key))

    def wrap(self, denoiser: Denoiser, null: NullCondition | None, sigmas: Tensor | None = None) -> Denoiser:
        """The guided denoiser (``denoiser`` itself when nothing is to be done or the model is unconditional).

        Args:
            denoiser: the model's denoiser; null: its null condition (None: unconditional model, no CFG);
            sigmas: the sampler's noise levels (N + 1,), needed by schedules and cross-modal guidance.
        """
        clock = SigmaClock(sigmas) if sigmas is not None else None
        guided = denoiser
        if not self.cfg_is_identity and null is not None:
            guided = CFGDenoiser(denoiser, self.scale, null, clock)
        if self.discriminator is not None and self.discriminator.active:
            guided = self.discriminator.wrap(guided)
        if self.cross_modal_active:
            if sigmas is None:
                raise ValueError("cross-modal guidance needs the sampler's noise levels")
            guided = self.cross_modal.wrap(guided, sigmas)  # type: ignore[union-attr]
        return guided


__all__ = ["CFGDenoiser", "GuidanceSpec", "NullCondition"]
