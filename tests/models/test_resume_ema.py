"""EMA with a half-life in images, and exact resume from last.ckpt (step, optimizer, EMA, data order, noise)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import quiet_trainer, tiny_edm
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_dpmot.callbacks import EMAHalfLife, LastCheckpoint, ema_beta
from lightning_dpmot.data import DigitsDataModule


def test_ema_beta_matches_edm_formula() -> None:
    # EDM: ema_nimg = min(500k, 0.05 * cur_nimg); beta = 0.5 ** (batch / ema_nimg)
    assert ema_beta(512, 500_000, 20_000_000, 0.05) == pytest.approx(0.5 ** (512 / 500_000))
    assert ema_beta(512, 500_000, 1_000_000, 0.05) == pytest.approx(0.5 ** (512 / 50_000))
    assert ema_beta(512, 500_000, 1_000_000, None) == pytest.approx(0.5 ** (512 / 500_000))
    assert ema_beta(512, 500_000, 0, 0.05) == 0.0  # first step: copy


class Record(L.Callback):
    def __init__(self) -> None:
        self.params: list[list[torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.params.append([p.detach().clone() for p in pl_module.parameters()])


def test_ema_callback_equals_manual_average(tmp_path: Path) -> None:
    ema, rec = EMAHalfLife(halflife_images=64, rampup_ratio=0.5), Record()
    model = tiny_edm()
    L.Trainer(
        accelerator="cpu",
        max_steps=5,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[rec, ema],
        default_root_dir=tmp_path,
    ).fit(model, DigitsDataModule(batch_size=16))
    expected = [p.clone() for p in rec.params[0]]  # first update copies
    for step in range(1, 5):
        beta = ema_beta(16, 64, step * 16, 0.5)
        expected = [beta * e + (1 - beta) * p for e, p in zip(expected, rec.params[step])]
    for e, a in zip(expected, ema._average_model.module.parameters()):
        assert torch.allclose(e, a, atol=1e-6)
    for e, p in zip(expected, model.parameters()):  # after fit the module holds the EMA weights
        assert torch.allclose(e, p, atol=1e-6)


def fit(tmp_path: Path, max_epochs: int, ckpt_path: str | None = None) -> Path:
    torch.manual_seed(123)  # network init; the trained state must not depend on anything else
    model = tiny_edm(class_conditional=True, label_dropout=0.2, lr_warmup_images=200, seed=5)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    trainer = quiet_trainer(
        tmp_path,
        max_epochs=max_epochs,
        limit_train_batches=3,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        callbacks=[EMAHalfLife(halflife_images=100, rampup_ratio=0.1), ckpt],
    )
    trainer.fit(model, DigitsDataModule(batch_size=32, x_flip=True), ckpt_path=ckpt_path)
    return tmp_path / "last.ckpt"


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path: Path) -> None:
    straight = torch.load(fit(tmp_path / "a", max_epochs=4), weights_only=True)
    first = fit(tmp_path / "b", max_epochs=2)
    resumed = torch.load(fit(tmp_path / "b", max_epochs=4, ckpt_path=str(first)), weights_only=True)
    assert straight["global_step"] == resumed["global_step"] == 12
    for key in ("state_dict", "current_model_state"):  # EMA weights and raw weights
        assert straight[key].keys() == resumed[key].keys()
        for name in straight[key]:
            assert torch.equal(straight[key][name], resumed[key][name]), (key, name)
    opt_a, opt_b = straight["optimizer_states"][0]["state"], resumed["optimizer_states"][0]["state"]
    for i in opt_a:
        assert opt_a[i]["step"] == opt_b[i]["step"] == 12
        assert torch.equal(opt_a[i]["exp_avg"], opt_b[i]["exp_avg"])
        assert torch.equal(opt_a[i]["exp_avg_sq"], opt_b[i]["exp_avg_sq"])
    assert straight["lr_schedulers"][0]["last_epoch"] == resumed["lr_schedulers"][0]["last_epoch"] == 12
    assert straight["averaging_state"]["n_averaged"] == resumed["averaging_state"]["n_averaged"] == 12


@pytest.mark.parametrize("checkpoint_cls", [ModelCheckpoint, LastCheckpoint])
def test_last_ckpt_holds_the_final_step_when_training_ends_between_validations(
    tmp_path: Path, checkpoint_cls: type[ModelCheckpoint]
) -> None:
    """max_steps = 7, validation (and a best-checkpoint save) every 2 epochs of 3 steps: the last one at step 6.

    Lightning's ModelCheckpoint leaves last.ckpt there; LastCheckpoint writes step 7 with the final EMA weights.
    """
    torch.manual_seed(0)
    model, ema = tiny_edm(), EMAHalfLife(halflife_images=100, rampup_ratio=0.1)
    trainer = quiet_trainer(
        tmp_path,
        max_steps=7,
        limit_train_batches=3,
        limit_val_batches=1,
        check_val_every_n_epoch=2,
        num_sanity_val_steps=0,
        callbacks=[ema, checkpoint_cls(dirpath=tmp_path, save_last=True, monitor="val/loss", save_top_k=1)],
    )
    trainer.fit(model, DigitsDataModule(batch_size=32))
    last = torch.load(tmp_path / "last.ckpt", weights_only=True)
    if checkpoint_cls is ModelCheckpoint:
        assert last["global_step"] == 6  # the behaviour LastCheckpoint exists to fix
        return
    assert last["global_step"] == 7
    for name, p in model.state_dict().items():  # after fit the module holds the final EMA weights
        assert torch.equal(last["state_dict"][name], p), name
