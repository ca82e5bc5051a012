"""Shared LightningModule plumbing for every diffusion model of the project.

The data flow of one training step, in named steps:

1. ``batch = {"x": (B, *S) data in [-1, 1], "label": (B,), ...}`` from a DataModule.
2. **noise**: ``batch["noise"]`` if a coupling callback (e.g. :class:`~lightning_dpmot.callbacks.OTCouplingCallback`)
   supplied it, else :meth:`DiffusionModule.draw_noise` — unit Gaussian noise from this rank's own generator.
3. **condition**: ``self.conditioner.from_batch(batch)`` — the condition mapping (``{"label": (B,)}``, text states,
   or None), with classifier-free-guidance dropout to the conditioner's null condition.
4. **loss**: the subclass's per-sample objective (EDM, DDPM, ...) of ``(x, noise, cond)``.

Randomness is counter-based (:mod:`lightning_dpmot.utils.random`): every step derives its generators from
(seed, global rank, epoch, batch index, purpose) — the network's dropout too, through a per-step seeded fork of the
global RNG — so ranks draw different noise and a resumed run continues exactly, even from the middle of an epoch.

Hyperparameters are owned here (torchgeo's ``BaseTask`` pattern): subclasses take their own arguments plus
``**kwargs`` for this class, and the base saves them all.
"""

from __future__ import annotations

import contextlib
import functools
import math
from abc import abstractmethod
from collections.abc import Callable, Iterator
from typing import Any

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn
from typing_extensions import override

from lightning_dpmot.diffusion.conditioning import ClassConditioner, Cond, Conditioner
from lightning_dpmot.diffusion.guidance import GuidanceSpec
from lightning_dpmot.models.generation import PREDICT_STREAM, GenerativeModule
from lightning_dpmot.sampling.samplers import NoiseSource, SampleResult, StepCallback
from lightning_dpmot.sampling.spec import SamplerSpec, run_sampler
from lightning_dpmot.utils.distributed import global_batch_size
from lightning_dpmot.utils.random import StackedGenerator, global_seed, make_generator, mix_seed

NetFactory = Callable[..., nn.Module]
"""A raw network built by ``net(data_shape, **conditioner.net_kwargs())``; in YAML a ``class_path`` with
``init_args``."""

# Purpose tags that keep the generators of one step independent of each other.
NOISE, SIGMA, LABEL_DROP, VAL, DROPOUT = 1, 2, 3, 4, 5

#: Renamed state-dict prefixes (old -> new): the preconditioned denoiser was ``net``, its raw network ``net.net``.
LEGACY_PREFIXES = (("net.net.", "denoiser.raw_net."), ("net.", "denoiser."))


def upgrade_state_dict(state: dict[str, Any]) -> dict[str, Any]:
    """A state dict written before the ``net`` -> ``denoiser`` / ``net.net`` -> ``denoiser.raw_net`` rename, upgraded
    (other keys untouched; an up-to-date state dict is returned as is)."""
    out = {}
    for key, value in state.items():
        for old, new in LEGACY_PREFIXES:
            if key.startswith(old):
                key = new + key.removeprefix(old)
                break
        out[key] = value
    return out


def plain_data(value: Any) -> Any:
    """``value`` with everything but containers, strings, numbers, booleans, None and tensors replaced by repr."""
    if isinstance(value, dict):
        return {str(k): plain_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain_data(v) for v in value)
    if value is None or isinstance(value, (str, int, float, bool, Tensor)):
        return value
    return repr(value)


def adam(params: Iterator[nn.Parameter]) -> torch.optim.Optimizer:
    """EDM's optimizer: Adam(lr=1e-3, betas=(0.9, 0.999), eps=1e-8)."""
    return torch.optim.Adam(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8)


def standalone_factory(factory: OptimizerCallable) -> OptimizerCallable:
    """``factory`` without references to the CLI that built it.

    jsonargparse hands LightningCLI's callable arguments over as a partial of an instantiator and the optimizer class
    (``partial(call_in_context, instantiator, OptimizerClass, **init_args)``), and the instantiator holds the whole
    CLI (parser, config, datamodule, trainer). Kept on the module, every ``deepcopy`` of it (EMA's averaged copy) or
    pickle (``ddp_spawn``) would drag all of that along; under DDP it fails outright on the launcher's process
    handles. The instantiator only matters for linked arguments, which optimizers have none of, so
    ``partial(OptimizerClass, **init_args)`` is equivalent.
    """
    if isinstance(factory, functools.partial):  # nested partials are flattened: (context fn, instantiator, cls, ...)
        for i, arg in enumerate(factory.args):
            if isinstance(arg, type) and issubclass(arg, torch.optim.Optimizer):
                return functools.partial(arg, *factory.args[i + 1 :], **factory.keywords)
    return factory


class DiffusionModule(GenerativeModule):
    """Base class: noise hook, conditioning with CFG dropout, optimisation with warm-up, validation loss, generation.

    Subclasses set ``self.denoiser`` (the preconditioned sigma-space denoiser D(x, sigma, cond), holding the raw
    network as ``denoiser.raw_net``) and implement :meth:`loss` and :meth:`sigmas_for`.

    Args:
        data_shape: shape of one sample, linked from the DataModule by the CLI.
        num_classes: number of classes of the data, linked from the DataModule.
        class_conditional: condition the network on class labels (needs ``num_classes > 0``).
        label_dropout: probability of replacing a label by the null label during training (for CFG).
        optimizer: optimizer factory (``class_path`` of a ``torch.optim`` class with ``init_args``).
        lr_warmup_images: linear learning-rate warm-up over this many training images (EDM: 10 M); 0 disables it.
        sampler: sampler used for validation grids and ``dpmot predict`` (not saved as a hyperparameter, so
            ``predict --ckpt_path`` can change it).
        guidance: guidance for validation grids and ``dpmot predict`` (default none; not saved either).
        seed: base seed of the per-rank generators (default: the run's ``seed_everything`` value).
        nan_to_num_grads: replace NaN/inf gradients by 0/finite values before each step (as EDM does).
        conditioner: what the model is conditioned on, for subclasses that bring their own (text); default: class
            labels when ``class_conditional``, else none.
    """

    denoiser: nn.Module

    def __init__(
        self,
        *,
        data_shape: tuple[int, ...] = (1, 8, 8),
        num_classes: int = 0,
        class_conditional: bool = False,
        label_dropout: float = 0.0,
        optimizer: OptimizerCallable = adam,
        lr_warmup_images: int = 0,
        sampler: SamplerSpec | None = None,
        guidance: GuidanceSpec | None = None,
        seed: int | None = None,
        nan_to_num_grads: bool = True,
        conditioner: Conditioner | None = None,
    ) -> None:
        super().__init__(data_shape=data_shape, num_classes=num_classes, sampler=sampler, guidance=guidance)
        if class_conditional and num_classes < 1:
            raise ValueError("class_conditional=True needs a dataset with classes (num_classes >= 1)")
        if not 0.0 <= label_dropout < 1.0:
            raise ValueError(f"label_dropout must be in [0, 1), got {label_dropout}")
        if lr_warmup_images < 0:
            raise ValueError(f"lr_warmup_images must be >= 0, got {lr_warmup_images}")
        if conditioner is not None and class_conditional:
            raise ValueError("give either class_conditional=True or a conditioner, not both")
        self.save_hyperparameters(ignore=["sampler", "guidance", "conditioner"])  # the subclass's arguments too
        self.class_conditional = class_conditional
        self.label_dropout = label_dropout
        if conditioner is None:
            conditioner = ClassConditioner(num_classes, label_dropout) if class_conditional else Conditioner()
        self.conditioner = conditioner
        self.optimizer_factory = standalone_factory(optimizer)
        self.lr_warmup_images = lr_warmup_images
        self.seed = seed
        self.nan_to_num_grads = nan_to_num_grads

    def build_net(self, net: NetFactory) -> nn.Module:
        """The raw network for this data and conditioning: ``net(data_shape, **conditioner.net_kwargs())``."""
        return net(self.data_shape, **self.conditioner.net_kwargs())

    # ----------------------------------------------------------------------------------------------- subclass API
    @abstractmethod
    def loss(self, x: Tensor, noise: Tensor, cond: Cond | None, generator: torch.Generator) -> Tensor:
        """Per-sample training loss (B,) for data x (B, *S), unit noise (B, *S) and the condition mapping."""

    @abstractmethod
    def sigmas_for(self, spec: SamplerSpec) -> Tensor:
        """The descending noise levels (N + 1,) ending in 0 that ``spec`` asks for on this model."""

    # ------------------------------------------------------------------------------------------------ randomness
    @property
    def base_seed(self) -> int:
        return self.seed if self.seed is not None else global_seed()

    def step_generator(self, purpose: int, batch_idx: int, stream: int = 0) -> torch.Generator:
        """Generator for one purpose in one training step of this rank (epoch, batch index, global rank)."""
        return make_generator(
            self.base_seed, self.global_rank, self.current_epoch, batch_idx, purpose, stream, device=self.device
        )

    def draw_noise(self, x: Tensor, batch_idx: int) -> Tensor:
        """The noise hook: unit Gaussian noise shaped like ``x`` (B, *S) from this rank's generator for this step.

        Couplings call it to obtain the rank's noise, re-assign it, and hand it back as ``batch["noise"]``.
        """
        return torch.randn(x.shape, generator=self.step_generator(NOISE, batch_idx), device=x.device)

    @contextlib.contextmanager
    def step_rng(self, batch_idx: int) -> Iterator[None]:
        """The global RNG (the network's dropout) seeded from (seed, rank, epoch, batch index) for one step, and
        restored afterwards, so a run resumed mid-epoch draws the same dropout masks as the uninterrupted one."""
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, device_type=self.device.type if devices else "cuda"):
            torch.manual_seed(mix_seed(self.base_seed, self.global_rank, self.current_epoch, batch_idx, DROPOUT))
            yield

    # -------------------------------------------------------------------------------------------------- training
    def training_condition(self, batch: dict[str, Tensor], batch_idx: int) -> Cond | None:
        """The batch's condition mapping with CFG dropout to the null condition (None if unconditional)."""
        return self.conditioner.drop(self.conditioner.from_batch(batch), self.step_generator(LABEL_DROP, batch_idx))

    @override
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        x = batch["x"]
        noise = batch.get("noise")
        if noise is None:
            noise = self.draw_noise(x, batch_idx)
        elif noise.shape != x.shape:
            raise ValueError(f"batch['noise'] has shape {tuple(noise.shape)}, expected {tuple(x.shape)}")
        cond = self.training_condition(batch, batch_idx)
        with self.step_rng(batch_idx):
            loss = self.loss(x, noise, cond, self.step_generator(SIGMA, batch_idx)).mean()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def eval_loss(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """Mean loss on held-out data with noise fixed per batch (comparable across evaluations)."""
        x = batch["x"]
        gen_noise = make_generator(self.base_seed, VAL, batch_idx, NOISE, device=self.device)
        gen_sigma = make_generator(self.base_seed, VAL, batch_idx, SIGMA, device=self.device)
        noise = torch.randn(x.shape, generator=gen_noise, device=x.device)
        return self.loss(x, noise, self.conditioner.from_batch(batch), gen_sigma).mean()

    @override
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.log(
            "val/loss", self.eval_loss(batch, batch_idx), prog_bar=True, sync_dist=True, batch_size=len(batch["x"])
        )

    @override
    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.log(
            "test/loss", self.eval_loss(batch, batch_idx), prog_bar=True, sync_dist=True, batch_size=len(batch["x"])
        )

    def images_seen(self) -> int:
        """Training images consumed so far over all ranks (EDM's ``cur_nimg``)."""
        return self.trainer.global_step * self.global_batch_size()

    def global_batch_size(self) -> int:
        return global_batch_size(self.trainer)

    @override
    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.optimizer_factory(self.parameters())
        warmup_steps = math.ceil(self.lr_warmup_images / self.global_batch_size()) if self.lr_warmup_images else 0

        def warmup(step: int) -> float:
            return min((step + 1) / warmup_steps, 1.0) if warmup_steps else 1.0

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    @override
    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.nan_to_num_grads:
            for p in self.parameters():
                if p.grad is not None:
                    torch.nan_to_num(p.grad, nan=0.0, posinf=1e5, neginf=-1e5, out=p.grad)

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Objects passed directly (a partial net factory, a lambda optimizer) would make the checkpoint need
        # pickle; keep their repr so that checkpoints always load with torch.load(weights_only=True).
        if "hyper_parameters" in checkpoint:
            checkpoint["hyper_parameters"] = plain_data(checkpoint["hyper_parameters"])

    @override
    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """Also takes state dicts written before the ``denoiser`` / ``raw_net`` rename (keys upgraded)."""
        return super().load_state_dict(upgrade_state_dict(dict(state_dict)), strict=strict, assign=assign)

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Checkpoints written before the ``denoiser`` / ``raw_net`` rename load with their keys upgraded (the EMA
        callback's averaged copy too)."""
        if "state_dict" in checkpoint:
            checkpoint["state_dict"] = upgrade_state_dict(checkpoint["state_dict"])
        for state in (checkpoint.get("callbacks") or {}).values():
            if isinstance(state, dict) and isinstance(state.get("average_model_state"), dict):
                state["average_model_state"] = upgrade_state_dict(state["average_model_state"])

    # ------------------------------------------------------------------------------------------------ generation
    def sample_from(
        self,
        x: Tensor,
        sigmas: Tensor,
        *,
        cond: Cond | None = None,
        spec: SamplerSpec | None = None,
        guidance: GuidanceSpec | None = None,
        generator: torch.Generator | NoiseSource | None = None,
        callback: StepCallback | None = None,
    ) -> SampleResult:
        """Run the reverse process from ``x`` (B, *S) at level ``sigmas[0]`` down to 0 (guided denoiser)."""
        null = self.conditioner.null if self.conditioner.conditional else None
        denoiser = (guidance or self.guidance).wrap(self.denoiser, null, sigmas)
        return run_sampler(spec or self.sampler, denoiser, x, sigmas, cond=cond, generator=generator, callback=callback)

    def sample(
        self,
        seeds: Tensor,
        cond: Cond | None,
        spec: SamplerSpec,
        guidance: GuidanceSpec,
        callback: StepCallback | None,
    ) -> SampleResult:
        """Start noise ``sigma_max * n(seed)``, the sampler down to 0; images are clamped to [-1, 1], points not."""
        sigmas = self.sigmas_for(spec).to(self.device)
        noise = StackedGenerator(seeds, device=self.device).randn(self.data_shape)
        churn = StackedGenerator(seeds + PREDICT_STREAM, device=self.device)
        result = self.sample_from(
            noise.double() * sigmas[0],
            sigmas,
            cond=cond,
            spec=spec,
            guidance=guidance,
            generator=churn,
            callback=callback,
        )
        x = result.x.float()
        return SampleResult(x.clamp(-1, 1) if len(self.data_shape) == 3 else x, result.nfe)
