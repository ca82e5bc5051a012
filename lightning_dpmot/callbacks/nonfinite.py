"""Stop training on NaN/inf with one clear error instead of running to completion with exit status 0.

``nan_to_num_grads`` keeps the weights finite when the loss is NaN (EDM's choice), so a diverged run (learning rate
1e6, ``sigma_data`` 0, data of scale 1e30) used to train for the full budget, write checkpoints and exit 0.
:class:`NonFiniteGuard` checks the training loss and the weights after every optimizer step:

- a non-finite loss is tolerated for up to ``max_consecutive`` steps in a row (one bad batch need not end a run);
  one more and training stops;
- non-finite weights stop training at once (they never recover).

It raises :class:`~lightning_dpmot.errors.NonFiniteError` naming the step and the quantity (``dpmot`` prints one line
and exits 3). It runs before the checkpoint callbacks of the same step (Lightning orders checkpoint callbacks last),
and :class:`~lightning_dpmot.utils.checkpoint_io.SafeCheckpointIO` refuses to write NaN weights, so the last
``last.ckpt`` on disk is the last finite one. The decision is all-reduced: every DDP rank stops at the same step.
The ``dpmot`` CLI adds this callback to every run that does not configure one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_dpmot.errors import NonFiniteError


def nonfinite_parameters(module: torch.nn.Module) -> list[str]:
    """Names of floating-point parameters holding NaN/inf (one fused max-abs reduction, one host sync)."""
    named = [(name, p.detach()) for name, p in module.named_parameters() if p.is_floating_point() and p.numel()]
    if not named:
        return []
    maxabs = torch.stack([n.float() for n in torch._foreach_norm([p for _, p in named], math.inf)])
    bad = (~torch.isfinite(maxabs)).nonzero().flatten().tolist()
    return [named[i][0] for i in bad]


class NonFiniteGuard(Callback):
    """Stop training with a clear error when the loss or the weights become NaN/inf.

    Args:
        max_consecutive: non-finite losses tolerated in a row before stopping (0 = stop at the first).
        check_weights: also check every parameter after each optimizer step.
        loss_key: the logged metric to read when ``training_step`` returns no loss (manual optimisation).
    """

    def __init__(self, max_consecutive: int = 3, check_weights: bool = True, loss_key: str = "train/loss") -> None:
        super().__init__()
        if max_consecutive < 0:
            raise ValueError(f"NonFiniteGuard: max_consecutive must be >= 0, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.check_weights = check_weights
        self.loss_key = loss_key
        self.consecutive = 0

    def _loss(self, trainer: L.Trainer, outputs: Any) -> Tensor | None:
        if isinstance(outputs, Mapping) and isinstance(outputs.get("loss"), Tensor):
            return outputs["loss"]
        if isinstance(outputs, Tensor):
            return outputs
        value = trainer.callback_metrics.get(self.loss_key)
        return value if isinstance(value, Tensor) else None

    @staticmethod
    def _last_checkpoint(trainer: L.Trainer) -> str:
        for callback in trainer.checkpoint_callbacks:
            path = getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "")
            if path:
                return f"the last finite checkpoint is {path}"
        return "no checkpoint was written before it"

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = self._loss(trainer, outputs)
        bad_loss = loss is not None and not bool(torch.isfinite(loss.detach()).all())
        bad_params = nonfinite_parameters(pl_module) if self.check_weights else []
        flags = torch.tensor([float(bad_loss), float(bool(bad_params))], device=pl_module.device)
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        bad_loss, bad_weights = bool(flags[0]), bool(flags[1])
        step = trainer.global_step
        self.consecutive = self.consecutive + 1 if bad_loss else 0
        if bad_weights:
            names = ", ".join(bad_params[:3]) if bad_params else "on another rank"
            raise NonFiniteError(
                f"training stopped at step {step}: the weights are NaN/inf after the optimizer step ({names}); "
                f"{self._last_checkpoint(trainer)}"
            )
        if self.consecutive > self.max_consecutive:
            value = float(loss.detach().float().mean()) if loss is not None else float("nan")
            raise NonFiniteError(
                f"training stopped at step {step}: the training loss ({self.loss_key}) was {value} for "
                f"{self.consecutive} consecutive step(s) (NonFiniteGuard max_consecutive={self.max_consecutive}); "
                f"{self._last_checkpoint(trainer)}"
            )
        if bad_loss:
            rank_zero_warn(
                f"NonFiniteGuard: non-finite training loss at step {step} "
                f"({self.consecutive}/{self.max_consecutive} tolerated in a row)"
            )
