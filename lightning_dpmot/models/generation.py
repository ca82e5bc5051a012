"""The generation protocol: everything callbacks (sample grids, FID, NFE sweeps, prediction writers) may use.

A :class:`GenerativeModule` offers

- ``data_shape``, ``sampler`` (:class:`SamplerSpec`), ``guidance`` (:class:`GuidanceSpec`) and ``conditioner``;
- :meth:`generation_conditions` — the condition mapping for per-sample seeds (the DataModule's rule);
- :meth:`generate` — samples for per-sample seeds (EDM's protocol: sample i depends only on ``seeds[i]``), with an
  optional sampler step callback (trajectory recording, progress);
- :meth:`generate_many` — the same over many seeds in batches;
- :meth:`sampling_mode` — the context every generation runs in: EMA weights swapped in (when an EMA callback
  is active and they are not in already), eval mode, gradients off (or on, outside inference mode, when the
  guidance needs them); everything restored in a ``finally``.

Callbacks use nothing else of a module, so diffusion models (:class:`~lightning_dpmot.models.base.DiffusionModule`)
and pure samplers such as :class:`~lightning_dpmot.models.dpm_ot.DPMOTModule` serve them alike.
"""

from __future__ import annotations

import contextlib
from abc import abstractmethod
from collections.abc import Iterator, Mapping
from typing import Any

import lightning as L
import torch
from torch import Tensor
from typing_extensions import override

from lightning_dpmot.data.base import generation_conditions
from lightning_dpmot.diffusion.conditioning import Cond, Conditioner, cond_to
from lightning_dpmot.diffusion.guidance import GuidanceSpec
from lightning_dpmot.sampling.samplers import SampleResult, StepCallback
from lightning_dpmot.sampling.spec import SamplerSpec

#: Per-seed stream tag of the sampler's fresh noise (stochastic samplers), apart from the start noise.
PREDICT_STREAM = 1_000_003


class GenerativeModule(L.LightningModule):
    """Base class of every module that generates samples from per-sample seeds.

    Args:
        data_shape: shape of one sample, linked from the DataModule by the CLI.
        num_classes: number of classes of the data, linked from the DataModule.
        sampler: sampler for validation grids and ``dpmot predict`` (not saved as a hyperparameter, so
            ``predict --ckpt_path`` can change it).
        guidance: guidance for validation grids and ``dpmot predict`` (default: none); not saved either.
    """

    conditioner: Conditioner

    def __init__(
        self,
        *,
        data_shape: tuple[int, ...] = (1, 8, 8),
        num_classes: int = 0,
        sampler: SamplerSpec | None = None,
        guidance: GuidanceSpec | None = None,
    ) -> None:
        super().__init__()
        self.data_shape = tuple(data_shape)
        self.num_classes = num_classes
        self.sampler = sampler or SamplerSpec()
        self.guidance = guidance or GuidanceSpec()

    # ---------------------------------------------------------------------------------------------- protocol
    def generation_conditions(self, seeds: Tensor) -> dict[str, Any]:
        """What to generate for ``seeds`` (B,): the DataModule's rule when a trainer with one is attached (class labels
        ``{"label": (B,)}``, prompts ``{"caption_en": [B strings], ...}``), else the class-label rule."""
        trainer = self._trainer
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
        if datamodule is not None and hasattr(datamodule, "generation_conditions"):
            return datamodule.generation_conditions(seeds)
        return generation_conditions(seeds, self.num_classes)

    @contextlib.contextmanager
    def sampling_mode(self, grad: bool = False) -> Iterator[None]:
        """EMA weights in, eval mode, gradients off (``grad=False``) or on outside inference mode with the weights'
        ``requires_grad`` off (gradients w.r.t. samples only); everything restored after."""
        was_training = self.training
        with contextlib.ExitStack() as stack:
            trainer = self._trainer
            for callback in trainer.callbacks if trainer is not None else []:
                averaged = getattr(callback, "averaged_weights", None)
                if averaged is not None:
                    stack.enter_context(averaged(self))
            trainable = [p for p in self.parameters() if p.requires_grad]
            if grad:
                stack.enter_context(torch.inference_mode(False))
                stack.enter_context(torch.enable_grad())
                for p in trainable:  # guidance differentiates w.r.t. the sample only: keep no weight-grad graph
                    p.requires_grad_(False)
            else:
                stack.enter_context(torch.no_grad())
            self.eval()  # no dropout while sampling, whoever calls
            try:
                yield
            finally:
                self.train(was_training)
                for p in trainable:
                    p.requires_grad_(True)

    def generate(
        self,
        seeds: Tensor | list[int],
        cond: Mapping[str, Any] | None = None,
        spec: SamplerSpec | None = None,
        guidance: GuidanceSpec | None = None,
        callback: StepCallback | None = None,
    ) -> SampleResult:
        """Samples for per-sample seeds (B,) under :meth:`sampling_mode`.

        Args:
            seeds: (B,) int64 seeds; cond: the request's conditions, e.g. ``{"label": (B,)}`` or ``{"caption_en":
                [B prompts]}`` (None = unconditional; entries the model does not use are ignored; the model's
                conditioner turns raw entries such as prompts into tensors); spec: sampler (default
                ``self.sampler``); guidance: default ``self.guidance``; callback: the sampler's step callback.
        Returns:
            SampleResult with x: (B, *data_shape) float32 and the NFE used.
        """
        seeds = torch.as_tensor(seeds, dtype=torch.long)
        guidance = guidance or self.guidance
        with self.sampling_mode(grad=guidance.needs_grad):
            # prepared inside sampling mode: under Lightning's inference mode, tensors made outside it could not
            # take part in the guided pass's autograd graph
            prepared = {**(self.conditioner.prepare(cond) or {}), **guidance.prepare(cond, seeds, self.device)}
            if guidance.needs_grad:
                prepared = {k: v.clone() for k, v in prepared.items()}
            return self.sample(
                seeds.clone(), cond_to(prepared or None, self.device), spec or self.sampler, guidance, callback
            )

    @abstractmethod
    def sample(
        self,
        seeds: Tensor,
        cond: Cond | None,
        spec: SamplerSpec,
        guidance: GuidanceSpec,
        callback: StepCallback | None,
    ) -> SampleResult:
        """The model's generation for :meth:`generate` (already in sampling mode, ``cond`` on the device)."""

    def generate_many(
        self,
        seeds: Tensor,
        batch_size: int = 256,
        spec: SamplerSpec | None = None,
        guidance: GuidanceSpec | None = None,
    ) -> Iterator[tuple[Tensor, dict[str, Any], SampleResult]]:
        """:meth:`generate` over many seeds in batches, conditions from :meth:`generation_conditions`.

        Yields ``(seeds (b,), cond, result)`` per batch.
        """
        for chunk in torch.as_tensor(seeds, dtype=torch.long).split(batch_size):
            cond = self.generation_conditions(chunk)
            yield chunk, cond, self.generate(chunk, cond, spec, guidance)

    @override
    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Any]:
        """``batch = {"seed": (B,), **conditions}`` -> ``{"x", "seed", **conditions, "nfe"}`` for the writer."""
        cond = {k: v for k, v in batch.items() if k != "seed"}
        result = self.generate(batch["seed"], cond)
        return {"x": result.x, "seed": batch["seed"], **cond, "nfe": torch.tensor(result.nfe)}


__all__ = ["PREDICT_STREAM", "GenerativeModule"]
