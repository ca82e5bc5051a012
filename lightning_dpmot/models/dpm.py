"""Discrete-time VP diffusion (DDPM, Ho et al. 2020) with epsilon prediction as a LightningModule.

Training is DDPM's L_simple: t ~ U{0, ..., T-1}, x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,
loss = mean over elements of (eps_theta(x_t, t) - eps)^2. The ``eps`` is the unit noise of the base class's noise
hook, so a coupling callback (``batch["noise"]``) turns this into minibatch-OT-coupled DDPM without changes here.

Sampling goes through the shared sigma-space samplers via :class:`~lightning_dpmot.diffusion.vp.VPEpsDenoiser`
(x_t / sqrt(abar_t) = x_0 + sigma_t eps with sigma_t = sqrt((1 - abar_t) / abar_t)):

- DDIM (Song et al. 2021), the default: ``SamplerSpec("ddim", 50, schedule="timesteps", eta=0)`` (= Euler);
- DDPM ancestral: ``SamplerSpec("ddpm", num_steps=T, schedule="timesteps")`` (eta = 1 on every discrete step,
  i.e. the posterior variance beta-tilde; see :meth:`DPMModule.ddpm_spec`);
- any other sampler on the "karras" schedule, clipped to the model's discrete range [sigma_0, sigma_{T-1}];
- the DPM-OT expressway: ``sigma_max`` in the spec starts the reverse process at an intermediate level.

Generation starts, as for EDM, from sigma_max * n in sigma space, i.e. x_{T-1} = sigma / sqrt(1 + sigma^2) * n in
VP coordinates instead of DDPM's n: a variance difference of 1 / (1 + sigma_max^2) (4e-5 for the linear schedule).

The schedule's buffers (``alphas_cumprod``, ``sigmas``, ``log_sigmas``) are non-persistent: they never enter a
checkpoint and are rebuilt from the hyperparameters ``beta_schedule`` and ``T``. Two consequences:

- :class:`~lightning_dpmot.callbacks.EMAHalfLife` averages parameters only (``use_buffers=False``); its swaps and
  the final copy move buffers too, but both copies hold the same constant schedule, so the schedule is never
  averaged into anything else.
- "true" low-precision trainer settings (``bf16-true``, ``16-true``) cast buffers with the module and round the
  schedule; use the mixed-precision settings (``bf16-mixed``) or fp32 for this model.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

import torch
from einops import reduce
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn

from lightning_dpmot.diffusion.conditioning import Cond
from lightning_dpmot.diffusion.vp import VPEpsDenoiser, VPSchedule
from lightning_dpmot.models.base import DiffusionModule, NetFactory
from lightning_dpmot.sampling.schedules import karras_sigmas
from lightning_dpmot.sampling.spec import SamplerSpec
from lightning_dpmot.utils.precision import autocast_off


def ddpm_adam(params: Iterator[nn.Parameter]) -> torch.optim.Optimizer:
    """DDPM's optimizer: Adam(lr=2e-4, betas=(0.9, 0.999), eps=1e-8)."""
    return torch.optim.Adam(params, lr=2e-4, betas=(0.9, 0.999), eps=1e-8)


def ddim_spec(num_steps: int = 50) -> SamplerSpec:
    """Deterministic DDIM (eta = 0) on ``num_steps`` uniformly spaced discrete timesteps."""
    return SamplerSpec("ddim", num_steps=num_steps, schedule="timesteps", eta=0.0)


class DPMModule(DiffusionModule):
    """DDPM training (L_simple, epsilon prediction) and DDIM / DDPM / sigma-space sampling.

    Args:
        net: the raw epsilon network; built as ``net(data_shape, **conditioner.net_kwargs())`` and called as
            ``net(x_t, t, cond)`` with x_t (B, *S) in VP coordinates and t (B,) float timesteps in [0, T-1].
        beta_schedule: "linear" (DDPM: beta 1e-4 .. 0.02) or "cosine" (Nichol & Dhariwal 2021).
        T: number of discrete diffusion steps (DDPM: 1000).
        optimizer: optimizer factory (DDPM: Adam, lr 2e-4).
        sampler: sampler for validation grids and ``predict`` (default: DDIM, 50 timesteps, eta 0).
        **kwargs: :class:`~lightning_dpmot.models.base.DiffusionModule`'s other arguments (data_shape, num_classes,
            class_conditional, label_dropout, lr_warmup_images — DDPM CIFAR-10: 640,000 —, guidance, seed,
            nan_to_num_grads).
    """

    def __init__(
        self,
        net: NetFactory,
        beta_schedule: Literal["linear", "cosine"] = "linear",
        T: int = 1000,
        optimizer: OptimizerCallable = ddpm_adam,
        sampler: SamplerSpec | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(optimizer=optimizer, sampler=sampler or ddim_spec(50), **kwargs)
        if T < 2:
            raise ValueError(f"T must be >= 2 discrete diffusion steps, got {T}")
        self.beta_schedule, self.T = beta_schedule, T
        schedule = VPSchedule(beta_schedule, T)  # non-persistent buffers, rebuilt from (beta_schedule, T)
        self.denoiser = VPEpsDenoiser(self.build_net(net), schedule)

    @property
    def schedule(self) -> VPSchedule:
        """The discrete VP schedule (alphas_cumprod (T,), sigmas (T,) ascending in t)."""
        return self.denoiser.schedule

    def sample_timesteps(self, batch_size: int, generator: torch.Generator, device: torch.device) -> Tensor:
        """t ~ U{0, ..., T-1}, (B,) int64, drawn from ``generator``."""
        return torch.randint(self.T, (batch_size,), generator=generator, device=device)

    def loss(self, x: Tensor, noise: Tensor, cond: Cond | None, generator: torch.Generator) -> Tensor:
        """L_simple per sample (B,): mean over elements of (eps_theta(x_t, t) - noise)^2, x_t = q_sample(x, noise, t).

        Args:
            x: (B, *S) data; noise: (B, *S) unit noise (possibly OT-coupled); cond: condition mapping or None;
            generator: draws the timesteps t (B,).
        """
        t = self.sample_timesteps(x.shape[0], generator, x.device)
        with autocast_off(x.device):
            x_t = self.schedule.q_sample(x.float(), noise.float(), t)
        eps = self.denoiser.raw_net(x_t, t.float(), cond)  # under bf16 autocast the net runs in bf16
        with autocast_off(x.device):  # the error and its reduction in float32
            return reduce((eps.float() - noise.float()) ** 2, "b ... -> b", "mean")

    def sigmas_for(self, spec: SamplerSpec) -> Tensor:
        """Descending levels (N + 1,) ending in 0.

        - "timesteps": DDIM's uniformly spaced discrete timesteps from t_start down to 0, where t_start = T - 1, or
          with ``spec.sigma_max`` the largest discrete level <= sigma_max (the DPM-OT expressway start).
          ``num_steps = T`` gives every level (DDPM's ancestral chain for the "ddpm" sampler).
        - "karras": EDM's rho-schedule between ``spec.sigma_min`` / ``spec.sigma_max`` (default: the model's
          sigma_0 / sigma_{T-1}), both clipped to the discrete model's range [sigma_0, sigma_{T-1}]: outside it the
          network would only see the clamped end timestep.
        """
        sched = self.schedule
        if spec.schedule == "timesteps":
            return self._timestep_sigmas(spec)
        if spec.schedule == "karras":
            lo = max(spec.sigma_min if spec.sigma_min is not None else sched.sigma_min, sched.sigma_min)
            hi = min(spec.sigma_max if spec.sigma_max is not None else sched.sigma_max, sched.sigma_max)
            return karras_sigmas(spec.num_steps, lo, hi, spec.rho)
        raise ValueError(f"DPMModule samples on 'timesteps' or 'karras'; got schedule={spec.schedule!r}")

    def _timestep_sigmas(self, spec: SamplerSpec) -> Tensor:
        """The "timesteps" schedule (N + 1,) float64, with one clear error for every impossible request."""
        sched = self.schedule
        if spec.sigma_min is not None:
            raise ValueError("schedule='timesteps' always ends at timestep 0; sigma_min is not supported")
        available = self.T
        if spec.sigma_max is not None:
            available = int((sched.sigmas <= spec.sigma_max * (1 + 1e-6)).sum())  # VPSchedule's start criterion
            if available == 0:
                raise ValueError(
                    f"sigma_max={spec.sigma_max} is below the model's smallest level sigma_min={sched.sigma_min:.6g}"
                )
        if spec.num_steps > available:
            raise ValueError(
                f"num_steps={spec.num_steps} exceeds the {available} discrete timesteps at or below the start level"
            )
        return sched.timestep_sigmas(spec.num_steps, sigma_max=spec.sigma_max).double()

    def ddpm_spec(self) -> SamplerSpec:
        """DDPM's ancestral sampler: eta = 1 on all T discrete steps (NFE = T)."""
        return SamplerSpec("ddpm", num_steps=self.T, schedule="timesteps")
