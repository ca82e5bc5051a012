"""Shared LightningModule plumbing for every diffusion model of the project.

The data flow of one training step, in named steps:

1. ``batch = {"x": (B, *S) data in [-1, 1], "label": (B,), ...}`` from a DataModule.
2. **noise**: ``batch["noise"]`` if a coupling callback (e.g. :class:`~lightning_dpmot.callbacks.OTCouplingCallback`)
   supplied it, else :meth:`DiffusionModule.draw_noise` — unit Gaussian noise from this rank's own generator.
3. **labels**: class labels with classifier-free-guidance dropout (label -1 = unconditional).
4. **loss**: the subclass's per-sample objective (EDM, DDPM, ...).

Randomness is counter-based (:mod:`lightning_dpmot.utils.random`): every step derives its generators from
(seed, global rank, epoch, batch index, purpose), so ranks draw different noise and a resumed run continues exactly.
"""

from __future__ import annotations

import functools
import math
from abc import abstractmethod
from collections.abc import Callable, Iterator
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn
from typing_extensions import override

from lightning_dpmot.diffusion.denoiser import Denoiser
from lightning_dpmot.sampling.samplers import NoiseSource, SampleResult, StepCallback
from lightning_dpmot.sampling.spec import SamplerSpec, run_sampler
from lightning_dpmot.utils.random import StackedGenerator, global_seed, make_generator

NetFactory = Callable[[tuple[int, ...], int], nn.Module]
"""A network built by ``net(data_shape, num_classes)``; in YAML a ``class_path`` with ``init_args``."""

# Purpose tags that keep the generators of one step independent of each other.
NOISE, SIGMA, LABEL_DROP, VAL = 1, 2, 3, 4
_PREDICT_STREAM = 1_000_003


def rank_seeds(num_samples: int, rank: int, world_size: int, offset: int = 0) -> Tensor:
    """This rank's share of the seeds ``offset .. offset + num_samples - 1`` (every world_size-th one)."""
    return torch.arange(offset + rank, offset + num_samples, world_size, dtype=torch.long)


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


class DiffusionModule(L.LightningModule):
    """Base class: noise hook, label dropout, optimisation with warm-up, validation loss, generation.

    Args:
        data_shape: shape of one sample, linked from the DataModule by the CLI.
        num_classes: number of classes of the data, linked from the DataModule.
        class_conditional: condition the network on class labels (needs ``num_classes > 0``).
        label_dropout: probability of replacing a label by the null label -1 during training (for CFG).
        optimizer: optimizer factory (``class_path`` of a ``torch.optim`` class with ``init_args``).
        lr_warmup_images: linear learning-rate warm-up over this many training images (EDM: 10 M); 0 disables it.
        sampler: sampler used for validation grids and ``dpmot predict`` (not saved as a hyperparameter, so
            ``predict --ckpt_path`` can change it).
        seed: base seed of the per-rank generators (default: the run's ``seed_everything`` value).
        nan_to_num_grads: replace NaN/inf gradients by 0/finite values before each step (as EDM does).
    """

    def __init__(
        self,
        data_shape: tuple[int, ...] = (1, 8, 8),
        num_classes: int = 0,
        class_conditional: bool = False,
        label_dropout: float = 0.0,
        optimizer: OptimizerCallable = adam,
        lr_warmup_images: int = 0,
        sampler: SamplerSpec | None = None,
        seed: int | None = None,
        nan_to_num_grads: bool = True,
    ) -> None:
        super().__init__()
        if class_conditional and num_classes < 1:
            raise ValueError("class_conditional=True needs a dataset with classes (num_classes >= 1)")
        if not 0.0 <= label_dropout < 1.0:
            raise ValueError(f"label_dropout must be in [0, 1), got {label_dropout}")
        self.data_shape = tuple(data_shape)
        self.num_classes = num_classes
        self.class_conditional = class_conditional
        self.label_dropout = label_dropout
        self.optimizer_factory = standalone_factory(optimizer)
        self.lr_warmup_images = lr_warmup_images
        self.sampler = sampler or SamplerSpec()
        self.seed = seed
        self.nan_to_num_grads = nan_to_num_grads

    # ----------------------------------------------------------------------------------------------- subclass API
    @property
    @abstractmethod
    def denoiser(self) -> Denoiser:
        """The model as a sigma-space denoiser D(x, sigma, class_labels)."""

    @abstractmethod
    def loss(self, x: Tensor, noise: Tensor, labels: Tensor | None, generator: torch.Generator) -> Tensor:
        """Per-sample training loss (B,) for data x (B, *S), unit noise (B, *S) and labels (B,) or None."""

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

    # -------------------------------------------------------------------------------------------------- training
    def class_labels(self, batch: dict[str, Tensor], generator: torch.Generator | None = None) -> Tensor | None:
        """Labels for the network: None if unconditional; with dropout to -1 when a generator is given."""
        if not self.class_conditional:
            return None
        if "label" not in batch:
            raise KeyError("class_conditional=True but the batch has no 'label' entry")
        labels = batch["label"]
        if generator is not None and self.label_dropout > 0:
            drop = torch.rand(labels.shape, generator=generator, device=labels.device) < self.label_dropout
            labels = torch.where(drop, torch.full_like(labels, -1), labels)
        return labels

    @override
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        x = batch["x"]
        noise = batch.get("noise")
        if noise is None:
            noise = self.draw_noise(x, batch_idx)
        elif noise.shape != x.shape:
            raise ValueError(f"batch['noise'] has shape {tuple(noise.shape)}, expected {tuple(x.shape)}")
        labels = self.class_labels(batch, self.step_generator(LABEL_DROP, batch_idx))
        loss = self.loss(x, noise, labels, self.step_generator(SIGMA, batch_idx)).mean()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def _eval_loss(self, batch: dict[str, Tensor], batch_idx: int, stage: str) -> None:
        """Loss on held-out data with noise fixed per batch (comparable across evaluations)."""
        x = batch["x"]
        gen_noise = make_generator(self.base_seed, VAL, batch_idx, NOISE, device=self.device)
        gen_sigma = make_generator(self.base_seed, VAL, batch_idx, SIGMA, device=self.device)
        noise = torch.randn(x.shape, generator=gen_noise, device=x.device)
        loss = self.loss(x, noise, self.class_labels(batch), gen_sigma).mean()
        self.log(f"{stage}/loss", loss, prog_bar=True, sync_dist=True, batch_size=x.shape[0])

    @override
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_loss(batch, batch_idx, "val")

    @override
    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_loss(batch, batch_idx, "test")

    def images_seen(self) -> int:
        """Training images consumed so far over all ranks (EDM's ``cur_nimg``)."""
        return self.trainer.global_step * self.global_batch_size()

    def global_batch_size(self) -> int:
        dm = getattr(self.trainer, "datamodule", None)
        per_device = getattr(dm, "batch_size", None) or 1
        return int(per_device) * self.trainer.world_size * self.trainer.accumulate_grad_batches

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

    # ------------------------------------------------------------------------------------------------ generation
    def sample_from(
        self,
        x: Tensor,
        sigmas: Tensor,
        *,
        labels: Tensor | None = None,
        spec: SamplerSpec | None = None,
        generator: torch.Generator | NoiseSource | None = None,
        callback: StepCallback | None = None,
    ) -> SampleResult:
        """Run the reverse process from ``x`` (B, *S) at level ``sigmas[0]`` down to 0."""
        spec = spec or self.sampler
        labels = labels if self.class_conditional else None
        return run_sampler(spec, self.denoiser, x, sigmas, class_labels=labels, generator=generator, callback=callback)

    @torch.no_grad()
    def generate(
        self,
        seeds: Tensor | list[int],
        labels: Tensor | None = None,
        spec: SamplerSpec | None = None,
        callback: StepCallback | None = None,
    ) -> SampleResult:
        """Samples from per-sample seeds (EDM protocol: sample i depends only on seeds[i]).

        Args:
            seeds: (B,) int64 seeds; labels: (B,) class labels (-1 or None = unconditional).
            spec: sampler (default: ``self.sampler``).
        Returns:
            SampleResult with x: (B, *data_shape) float32; images are clamped to [-1, 1], other data is not.
        """
        spec = spec or self.sampler
        seeds = torch.as_tensor(seeds, dtype=torch.long)
        sigmas = self.sigmas_for(spec).to(self.device)
        noise = StackedGenerator(seeds, device=self.device).randn(self.data_shape)
        churn = StackedGenerator(seeds + _PREDICT_STREAM, device=self.device)
        if labels is not None:
            labels = labels.to(self.device)
        was_training = self.training
        self.eval()  # no dropout while sampling, whoever calls
        try:
            result = self.sample_from(
                noise.double() * sigmas[0], sigmas, labels=labels, spec=spec, generator=churn, callback=callback
            )
        finally:
            self.train(was_training)
        x = result.x.float()
        return SampleResult(x.clamp(-1, 1) if len(self.data_shape) == 3 else x, result.nfe)  # clamp images only

    def generate_many(
        self, seeds: Tensor, batch_size: int = 256, spec: SamplerSpec | None = None
    ) -> Iterator[tuple[Tensor, SampleResult]]:
        """:meth:`generate` over many seeds in batches; class labels (if conditional) are ``seed % num_classes``."""
        for chunk in torch.as_tensor(seeds, dtype=torch.long).split(batch_size):
            labels = chunk % self.num_classes if self.class_conditional else None
            yield chunk, self.generate(chunk, labels, spec)

    @override
    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        labels = batch.get("label")
        result = self.generate(batch["seed"], labels if self.class_conditional else None)
        return {"x": result.x, "seed": batch["seed"], "label": batch.get("label"), "nfe": torch.tensor(result.nfe)}
