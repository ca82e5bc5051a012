"""EDM (Karras et al. 2022) as a LightningModule: preconditioned denoiser, log-normal sigma, lambda(sigma) loss.

Combined with :class:`~lightning_dpmot.callbacks.OTCouplingCallback` it becomes AOT (Kim et al. 2024): the
callback replaces the independent noise of each step by noise assigned to the data by exact minibatch OT; nothing
in this module changes.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lightning_dpmot.diffusion.conditioning import Cond
from lightning_dpmot.diffusion.edm import EDMPrecond, edm_loss, sample_sigma_lognormal
from lightning_dpmot.models.base import DiffusionModule, NetFactory
from lightning_dpmot.sampling.schedules import karras_sigmas
from lightning_dpmot.sampling.spec import SamplerSpec


class EDMModule(DiffusionModule):
    """EDM training and sampling.

    Args:
        net: the raw network F (e.g. ``lightning_dpmot.nets.DDPMppUNet``); built as
            ``net(data_shape, **conditioner.net_kwargs())``.
        sigma_data: data standard deviation (0.5 for [-1, 1] images).
        P_mean: mean of ln(sigma) during training.
        P_std: standard deviation of ln(sigma) during training.
        sigma_min: smallest sampling noise level.
        sigma_max: largest sampling noise level.
        **kwargs: :class:`~lightning_dpmot.models.base.DiffusionModule`'s arguments (data_shape, num_classes,
            class_conditional, label_dropout, optimizer — EDM: Adam, lr 1e-3 —, lr_warmup_images — EDM: 10 M —,
            sampler, guidance, seed, nan_to_num_grads).
    """

    def __init__(
        self,
        net: NetFactory,
        sigma_data: float = 0.5,
        P_mean: float = -1.2,
        P_std: float = 1.2,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not (0 < sigma_min < sigma_max < math.inf) or not (P_std > 0 and math.isfinite(P_mean)):
            raise ValueError(
                f"need 0 < sigma_min < sigma_max < inf and P_std > 0, got sigma_min={sigma_min}, "
                f"sigma_max={sigma_max}, P_mean={P_mean}, P_std={P_std}"
            )
        self.sigma_data, self.P_mean, self.P_std = sigma_data, P_mean, P_std
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.denoiser = EDMPrecond(self.build_net(net), sigma_data)

    def loss(self, x: Tensor, noise: Tensor, cond: Cond | None, generator: torch.Generator) -> Tensor:
        """EDM loss (B,): lambda(sigma) ||D(x + sigma n; sigma, cond) - x||^2 with ln sigma ~ N(P_mean, P_std^2)."""
        sigma = sample_sigma_lognormal(x.shape[0], self.P_mean, self.P_std, generator=generator, device=x.device)
        return edm_loss(self.denoiser, x, noise, sigma, cond)

    def sigmas_for(self, spec: SamplerSpec) -> Tensor:
        if spec.schedule != "karras":
            raise ValueError(f"EDMModule samples on the 'karras' schedule; got schedule={spec.schedule!r}")
        return karras_sigmas(
            spec.num_steps, spec.sigma_min or self.sigma_min, spec.sigma_max or self.sigma_max, spec.rho
        )
