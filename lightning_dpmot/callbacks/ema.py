"""EMA of the weights with EDM's parametrisation: a half-life counted in training images.

A thin layer over Lightning's :class:`~lightning.pytorch.callbacks.WeightAveraging` (which keeps the averaged copy,
swaps it in for validation, writes it to the checkpoint's ``state_dict`` — so ``predict``/``test`` and exported
checkpoints use EMA weights — and restores both copies on resume). What it adds:

- the decay per optimizer step is beta = 0.5 ** (images_per_step / halflife), with EDM's ramp-up
  halflife = min(halflife_images, rampup_ratio * images_seen) (Karras et al. 2022, training_loop.py);
- the EMA weights are swapped in from ``on_validation_start`` to ``on_validation_end`` (not just the validation
  *epoch* hooks), so every callback's ``on_validation_epoch_end`` — sample grids, FID — sees EMA weights whatever
  the callback order (lightning-stack.md §7, "ordering trap");
- the EMA weights are copied into the module at ``on_fit_end`` instead of ``on_train_end``: ModelCheckpoint writes
  ``last.ckpt`` in its own ``on_train_end``, which runs after ours, and would otherwise store the EMA weights as
  the "current" (raw) weights, so that a resumed run silently continues from the average.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import WeightAveraging
from torch import Tensor
from typing_extensions import override


def ema_beta(images_per_step: int, halflife_images: float, images_seen: int, rampup_ratio: float | None) -> float:
    """EDM's EMA decay for one optimizer step of ``images_per_step`` images."""
    halflife = halflife_images
    if rampup_ratio is not None:
        halflife = min(halflife, images_seen * rampup_ratio)
    return 0.5 ** (images_per_step / max(halflife, 1e-8))


class EMAHalfLife(WeightAveraging):
    """Exponential moving average of the weights with the decay given as a half-life in images.

    Args:
        halflife_images: EMA half-life in training images (EDM CIFAR-10: 500,000).
        rampup_ratio: during early training use a half-life of at most ``rampup_ratio * images_seen``
            (EDM: 0.05); None disables the ramp-up.
        update_every_n_steps: update the average every n optimizer steps (the half-life stays in images).
        device: where the averaged copy lives (default: the model's device).
    """

    def __init__(
        self,
        halflife_images: float = 500_000,
        rampup_ratio: float | None = 0.05,
        update_every_n_steps: int = 1,
        device: str | None = None,
    ) -> None:
        if halflife_images <= 0:
            raise ValueError(f"halflife_images must be > 0, got {halflife_images}")
        super().__init__(device=device, use_buffers=False, multi_avg_fn=self._lerp)
        self.halflife_images = halflife_images
        self.rampup_ratio = rampup_ratio
        self.update_every_n_steps = update_every_n_steps
        self.beta = 0.0
        self.swapped_in = False  # True while the module holds the EMA weights (during validation)

    def _lerp(self, averaged: list[Tensor], current: list[Tensor], num_averaged: Tensor) -> None:
        torch._foreach_lerp_(averaged, current, 1.0 - self.beta)

    @override
    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return step_idx is not None and (step_idx + 1) % self.update_every_n_steps == 0

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        x = batch["x"] if isinstance(batch, dict) else batch[0]
        images_per_step = x.shape[0] * trainer.world_size * trainer.accumulate_grad_batches
        images_seen = (trainer.global_step - 1) * images_per_step  # before this step, as EDM's cur_nimg
        self.beta = ema_beta(
            images_per_step * self.update_every_n_steps, self.halflife_images, images_seen, self.rampup_ratio
        )
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pass  # see the module docstring: copying here would corrupt last.ckpt

    @override
    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self._average_model is None:
            # validate/test/predict: the checkpoint's state_dict already holds the EMA weights, which is all they use;
            # Lightning's "The WeightAveraging state cannot be restored" warning would be a false alarm on every run
            return
        super().on_load_checkpoint(trainer, pl_module, checkpoint)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._average_model is not None:
            self._copy_average_to_current(pl_module)

    # Swap for the whole validation run instead of the validation epoch (see module docstring).
    @override
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pass

    @override
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pass

    @override
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._average_model is not None and not self.swapped_in:
            self._swap_models(pl_module)
            self.swapped_in = True

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._average_model is not None and self.swapped_in:
            self._swap_models(pl_module)
            self.swapped_in = False

    @contextlib.contextmanager
    def averaged_weights(self, pl_module: L.LightningModule) -> Iterator[None]:
        """The EMA weights in ``pl_module`` for the duration of the block (no-op when they are in already or no
        average exists yet); restored in a ``finally``. Used by the modules' ``sampling_mode``."""
        if self._average_model is None or self.swapped_in:
            yield
            return
        self._swap_models(pl_module)
        self.swapped_in = True
        try:
            yield
        finally:
            self._swap_models(pl_module)
            self.swapped_in = False

    def ema_module(self, pl_module: L.LightningModule) -> L.LightningModule:
        """A module holding the EMA weights right now: ``pl_module`` while swapped in, else the averaged copy."""
        if self._average_model is None or self.swapped_in:
            return pl_module
        return self._average_model.module


def ema_module(trainer: L.Trainer, pl_module: L.LightningModule) -> L.LightningModule:
    """The module with EMA weights if an :class:`EMAHalfLife` callback is active, else ``pl_module``."""
    for callback in trainer.callbacks:
        if isinstance(callback, EMAHalfLife):
            return callback.ema_module(pl_module)
    return pl_module
