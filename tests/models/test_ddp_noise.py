"""Per-rank noise under 2-process DDP on CPU (gloo, ddp_spawn): seed_everything alone would make it identical."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import quiet_trainer, tiny_edm

from lightning_dpmot.data import DigitsDataModule
from lightning_dpmot.utils.random import make_generator

pytestmark = pytest.mark.slow


class CheckNoise(L.Callback):
    """Gathers every rank's noise for the step and asserts the ranks differ (failures propagate from workers)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        noise = pl_module.draw_noise(batch["x"], batch_idx)
        expected = torch.randn(
            batch["x"].shape,
            generator=make_generator(pl_module.base_seed, trainer.global_rank, trainer.current_epoch, batch_idx, 1, 0),
        )
        assert torch.equal(noise, expected)
        gathered = pl_module.all_gather(noise)
        assert gathered.shape[0] == 2
        assert not torch.allclose(gathered[0], gathered[1]), "ranks drew the same noise"
        same_global = pl_module.all_gather(torch.randn(3))  # what seed_everything alone gives
        assert torch.equal(same_global[0], same_global[1])
        pl_module.log("checked_ranks", float(gathered.shape[0]))


def test_ranks_draw_different_noise(tmp_path: Path) -> None:
    L.seed_everything(0)
    trainer = quiet_trainer(
        tmp_path,
        devices=2,
        strategy="ddp_spawn",
        max_steps=2,
        limit_val_batches=0,
        enable_checkpointing=False,
        callbacks=[CheckNoise()],
    )
    trainer.fit(tiny_edm(), DigitsDataModule(batch_size=8))
    assert trainer.callback_metrics["checked_ranks"].item() == 2.0  # the workers ran the checks
