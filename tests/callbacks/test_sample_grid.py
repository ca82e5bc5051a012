"""SampleGrid writes grids during validation and a final grid with EMA weights; make_grid geometry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from conftest import quiet_trainer, tiny_edm
from lightning.pytorch.loggers import CSVLogger
from PIL import Image

from lightning_dpmot.callbacks import EMAHalfLife, SampleGrid
from lightning_dpmot.callbacks.ema import ema_module
from lightning_dpmot.data import DigitsDataModule
from lightning_dpmot.sampling import SamplerSpec
from lightning_dpmot.utils.images import make_grid


def test_make_grid_layout() -> None:
    x = torch.stack([torch.full((1, 2, 3), float(i) / 10) for i in range(5)])
    grid = make_grid(x, nrow=3, padding=1)
    assert grid.shape == (1, 2 * 3 + 1, 3 * 4 + 1)
    assert torch.allclose(grid[0, [1, 1, 4], [1, 5, 5]], torch.tensor([0.0, 0.1, 0.4]))
    assert grid[0, 4, 9].item() == -1.0  # empty slot and padding are background


def test_grids_during_training_and_final_grid_uses_ema(tmp_path: Path) -> None:
    ema = EMAHalfLife(halflife_images=10)
    grid = SampleGrid(num_samples=4, sampler=SamplerSpec("euler", num_steps=2))
    trainer = quiet_trainer(
        tmp_path,
        max_steps=4,
        limit_train_batches=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=CSVLogger(tmp_path),
        enable_checkpointing=False,
        callbacks=[grid, ema],
    )
    model = tiny_edm()
    trainer.fit(model, DigitsDataModule(batch_size=16))
    samples_dir = Path(trainer.log_dir) / "samples"
    names = sorted(p.name for p in samples_dir.glob("*.png"))
    assert names == ["final.png", "latest.png", "step=00000002.png", "step=00000004.png"]
    final = np.asarray(Image.open(samples_dir / "final.png"))
    # the 19 x 19 px grid of 8 x 8 tiles, enlarged 16x (nearest neighbour) under a white caption strip
    assert final.shape[1:] == (16 * 19, 3) and final.shape[0] > 16 * 19
    strip = final.shape[0] - 16 * 19
    assert (final[: strip // 4] == 255).all() and (final[:strip] < 128).any()  # white strip with dark text
    tiles = final[strip:, :, 0]
    assert (tiles.reshape(19, 16, 19, 16) == tiles[::16, ::16][:, None, :, None]).all()  # 16 x 16 pixel blocks
    # after training the average copy (not the raw weights) is what ema_module hands out
    assert not ema.swapped_in and ema_module(trainer, model) is ema._average_model.module
    for p_model, p_ema in zip(model.parameters(), ema._average_model.module.parameters()):
        assert torch.equal(p_model, p_ema)  # on_fit_end copied the EMA weights into the module
