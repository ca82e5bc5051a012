"""EDMModule: the noise hook, per-step generators, label dropout, training signal, generation and predict."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from conftest import tiny_edm
from PIL import Image

from lightning_dpmot.callbacks import SampleWriter
from lightning_dpmot.data import DigitsDataModule
from lightning_dpmot.diffusion import edm_precond
from lightning_dpmot.sampling import SamplerSpec


def trainer(tmp_path: Path, **kwargs: object) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


class SpyNet(torch.nn.Module):
    """Records the network input; returns zeros."""

    def __init__(self, data_shape, num_classes=0):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.inputs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x, noise_labels, cond=None):
        self.inputs.append((x.detach().clone(), noise_labels.detach().clone()))
        return torch.zeros_like(x) + self.w


class ZeroNoise(L.Callback):
    """Supplies batch['noise'] = 0, as a coupling callback would supply assigned noise."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        batch["noise"] = torch.zeros_like(batch["x"])
        self.x = batch["x"].clone()


def test_training_step_uses_noise_supplied_in_the_batch(tmp_path: Path) -> None:
    model = tiny_edm(net=SpyNet)
    cb = ZeroNoise()
    trainer(tmp_path, max_steps=1, limit_val_batches=0, callbacks=[cb]).fit(model, DigitsDataModule(batch_size=16))
    net_in, c_noise = model.denoiser.raw_net.inputs[0]
    sigma = (4 * c_noise).exp()
    expected = cb.x * edm_precond(sigma).c_in.reshape(-1, 1, 1, 1)  # x = y + sigma * 0
    assert torch.allclose(net_in, expected, atol=1e-6)


def test_noise_hook_differs_by_rank_step_and_epoch_and_is_reproducible() -> None:
    model = tiny_edm(seed=7)
    x = torch.zeros(4, 1, 8, 8)
    a, b = model.draw_noise(x, batch_idx=0), model.draw_noise(x, batch_idx=0)
    assert torch.equal(a, b)
    assert not torch.equal(a, model.draw_noise(x, batch_idx=1))
    gen_rank1 = model.step_generator(1, 0)  # same keys ...
    assert torch.equal(torch.randn(x.shape, generator=gen_rank1), a)
    from lightning_dpmot.utils.random import make_generator

    other_rank = torch.randn(x.shape, generator=make_generator(7, 1, 0, 0, 1, 0))  # ... but global_rank = 1
    assert not torch.equal(other_rank, a)
    assert a.mean().abs() < 0.3 and 0.7 < a.std() < 1.3


def test_label_dropout_rate_and_null_label() -> None:
    model = tiny_edm(class_conditional=True, label_dropout=0.25)
    cond = model.conditioner.from_batch({"label": torch.arange(10).repeat(400), "x": torch.zeros(4000)})
    labels = model.conditioner.drop(cond, torch.Generator().manual_seed(0))["label"]
    dropped = labels == -1
    assert 0.22 < dropped.float().mean().item() < 0.28
    assert torch.equal(labels[~dropped], torch.arange(10).repeat(400)[~dropped])
    assert tiny_edm().conditioner.from_batch({"label": torch.arange(3)}) is None  # unconditional: labels ignored
    with pytest.raises(ValueError, match="num_classes >= 1"):
        tiny_edm(num_classes=0, class_conditional=True)


def test_loss_falls_on_digits(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = tiny_edm(optimizer=lambda p: torch.optim.Adam(p, lr=2e-3))
    dm = DigitsDataModule(batch_size=64)
    t = trainer(tmp_path, max_steps=80, limit_val_batches=2, num_sanity_val_steps=0, check_val_every_n_epoch=1000)
    before = t.validate(model, dm, verbose=False)[0]["val/loss"]
    t.fit(model, dm)
    after = t.validate(model, dm, verbose=False)[0]["val/loss"]
    assert after < 0.6 * before, (before, after)


def test_generate_depends_only_on_each_seed() -> None:
    model = tiny_edm().eval()
    spec = SamplerSpec("heun", num_steps=3)
    together = model.generate(torch.tensor([3, 4, 5, 6]), spec=spec)
    apart = [model.generate(torch.tensor([s]), spec=spec).x for s in (5, 3)]
    assert together.nfe == 5 and together.x.shape == (4, 1, 8, 8)
    assert torch.allclose(together.x[2], apart[0][0], atol=1e-6)
    assert torch.allclose(together.x[0], apart[1][0], atol=1e-6)
    assert together.x.min() >= -1 and together.x.max() <= 1


def test_predict_writes_pngs_and_one_npz(tmp_path: Path) -> None:
    model = tiny_edm(class_conditional=True, sampler=SamplerSpec("euler", num_steps=2))
    dm = DigitsDataModule(predict_num_samples=10, predict_batch_size=4, predict_seed_offset=100)
    out = tmp_path / "samples"
    trainer(tmp_path, callbacks=[SampleWriter(str(out))]).predict(model, dm, return_predictions=False)
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == [f"{s:06d}.png" for s in range(100, 110)] + ["grid.png"]
    grid = Image.open(out / "grid.png")  # 4 x 3 tiles of 8 px (37 x 28 px) enlarged 14x to >= 512 px, + a caption
    assert grid.width == 14 * (4 * 9 + 1) and grid.height > 14 * (3 * 9 + 1)
    data = np.load(out / "samples.npz")
    assert data["x"].shape == (10, 1, 8, 8) and data["images"].shape == (10, 8, 8, 1)
    assert data["seeds"].tolist() == list(range(100, 110)) and data["labels"].tolist() == [
        s % 10 for s in range(100, 110)
    ]
    assert int(data["nfe"]) == 2
    assert np.array_equal(np.asarray(Image.open(out / "000103.png")), data["images"][3, ..., 0])
    with pytest.raises(FileExistsError, match="not empty"):
        trainer(tmp_path, callbacks=[SampleWriter(str(out))]).predict(model, dm, return_predictions=False)
