"""EDM (Karras et al. 2022) as a LightningModule: preconditioned denoiser, log-normal sigma, lambda(sigma) loss.

Combined with :class:`~lightning_dpmot.callbacks.OTCouplingCallback` it becomes AOT (Kim et al. 2024): the
callback replaces the independent noise of each step by noise assigned to the data by exact minibatch OT; nothing
in this module changes.
"""

from __future__ import annotations

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor

from lightning_dpmot.diffusion.edm import EDMPrecond, edm_loss, sample_sigma_lognormal
from lightning_dpmot.models.base import DiffusionModule, NetFactory, adam
from lightning_dpmot.sampling.schedules import karras_sigmas
from lightning_dpmot.sampling.spec import SamplerSpec


class EDMModule(DiffusionModule):
    """EDM training and sampling.

    Args:
        net: the raw network F (e.g. ``lightning_dpmot.nets.DDPMppUNet``); built as ``net(data_shape, classes)``.
        data_shape: linked from the DataModule.
        num_classes: linked from the DataModule.
        class_conditional: condition on class labels.
        label_dropout: CFG label dropout probability during training.
        sigma_data: data standard deviation (0.5 for [-1, 1] images).
        P_mean: mean of ln(sigma) during training.
        P_std: standard deviation of ln(sigma) during training.
        sigma_min: smallest sampling noise level.
        sigma_max: largest sampling noise level.
        optimizer: optimizer factory (EDM: Adam, lr 1e-3, betas (0.9, 0.999), eps 1e-8).
        lr_warmup_images: linear lr warm-up in images (EDM: 10,000,000).
        sampler: sampler for validation grids and ``predict``.
        seed: base seed of the per-rank generators (default: the run's seed).
        nan_to_num_grads: sanitise NaN/inf gradients before each step (as EDM).
    """

    def __init__(
        self,
        net: NetFactory,
        data_shape: tuple[int, ...] = (1, 8, 8),
        num_classes: int = 0,
        class_conditional: bool = False,
        label_dropout: float = 0.0,
        sigma_data: float = 0.5,
        P_mean: float = -1.2,
        P_std: float = 1.2,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        optimizer: OptimizerCallable = adam,
        lr_warmup_images: int = 0,
        sampler: SamplerSpec | None = None,
        seed: int | None = None,
        nan_to_num_grads: bool = True,
    ) -> None:
        super().__init__(
            data_shape,
            num_classes,
            class_conditional,
            label_dropout,
            optimizer,
            lr_warmup_images,
            sampler,
            seed,
            nan_to_num_grads,
        )
        self.save_hyperparameters(ignore=["sampler"])
        self.sigma_data, self.P_mean, self.P_std = sigma_data, P_mean, P_std
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.net = EDMPrecond(net(self.data_shape, num_classes if class_conditional else 0), sigma_data)

    @property
    def denoiser(self) -> EDMPrecond:
        return self.net

    def loss(self, x: Tensor, noise: Tensor, labels: Tensor | None, generator: torch.Generator) -> Tensor:
        """EDM loss per sample (B,): lambda(sigma) ||D(x + sigma n; sigma) - x||^2, ln sigma ~ N(P_mean, P_std^2)."""
        sigma = sample_sigma_lognormal(x.shape[0], self.P_mean, self.P_std, generator=generator, device=x.device)
        return edm_loss(self.net, x, noise, sigma, labels)

    def sigmas_for(self, spec: SamplerSpec) -> Tensor:
        if spec.schedule != "karras":
            raise ValueError(f"EDMModule samples on the 'karras' schedule; got schedule={spec.schedule!r}")
        return karras_sigmas(
            spec.num_steps, spec.sigma_min or self.sigma_min, spec.sigma_max or self.sigma_max, spec.rho
        )
