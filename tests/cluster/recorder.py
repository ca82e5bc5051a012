"""A callback the cluster tests put into SLURM/torchrun jobs (on their PYTHONPATH): what each rank trained on.

Per training step and rank it saves ``<out>/rank{r}-step{s}.pt`` with the batch ``x``, the noise the rank drew
(``draw_noise``), the noise the OT callback handed it (``batch["noise"]``), the loss and (rank 0) the weights before
the step. ``stall_at``: at the end of that step, if ``<marker>.rank{r}`` does not exist yet (the first start of a job),
write it and wait for a signal, so that the test preempts the job at a known step.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from lightning_dpmot.callbacks.signals import GracefulShutdown


class Recorder(L.Callback):
    def __init__(self, out: str, stall_at: int | None = None, marker: str | None = None) -> None:
        self.out, self.stall_at, self.marker = Path(out), stall_at, marker
        self._record: dict[str, Any] = {}

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        state = {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in pl_module.state_dict().items()}
        self._record = {
            "global_step": trainer.global_step,
            "epoch": trainer.current_epoch,
            "batch_idx": batch_idx,
            "world_size": trainer.world_size,
            "state": state if trainer.is_global_zero else None,
        }
        if isinstance(batch, dict) and "x" in batch and hasattr(pl_module, "draw_noise"):  # diffusion training
            x = batch["x"]
            self._record.update(
                x=x.detach().clone(),
                label=batch["label"].detach().clone() if "label" in batch else None,
                drawn=pl_module.draw_noise(x, batch_idx),
                used=batch["noise"].detach().clone() if "noise" in batch else None,
            )

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        self._record["loss"] = loss.detach().clone() if isinstance(loss, torch.Tensor) else None
        self.out.mkdir(parents=True, exist_ok=True)
        torch.save(self._record, self.out / f"rank{trainer.global_rank}-step{self._record['global_step']}.pt")
        if self.stall_at is None or trainer.global_step != self.stall_at or self.marker is None:
            return
        marker = Path(f"{self.marker}.rank{trainer.global_rank}")
        if marker.exists():
            return
        marker.write_text(str(os.getpid()))
        shutdown = [c for c in trainer.callbacks if isinstance(c, GracefulShutdown)]
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not any(c.received for c in shutdown):
            time.sleep(0.1)
