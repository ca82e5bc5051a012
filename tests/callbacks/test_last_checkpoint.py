"""LastCheckpoint: last.ckpt on a step cadence (before any monitored metric exists) and after a crash in training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import quiet_trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.demos.boring_classes import BoringModel

from lightning_dpmot.callbacks import LastCheckpoint, NonFiniteGuard
from lightning_dpmot.errors import NonFiniteError
from lightning_dpmot.utils.checkpoint_io import SafeCheckpointIO


class Crash(Callback):
    def __init__(self, at_step: int, exception: type[BaseException] = RuntimeError) -> None:
        self.at_step, self.exception = at_step, exception

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        if trainer.global_step == self.at_step:
            raise self.exception(f"crash at step {trainer.global_step}")


class Model(BoringModel):
    """BoringModel whose validation logs ``val/loss`` (monitored by the checkpoint)."""

    def validation_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        loss = self.step(batch)
        self.log("val/loss", loss)
        return {"x": loss}


def step_of(path: Path) -> int:
    return int(torch.load(path, weights_only=True)["global_step"])


def trainer(tmp_path: Path, *callbacks: Callback, **kwargs: object):
    return quiet_trainer(tmp_path, callbacks=list(callbacks), plugins=[SafeCheckpointIO()], **kwargs)


def monitored(tmp_path: Path, **kwargs: object) -> LastCheckpoint:
    return LastCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, monitor="val/loss", save_top_k=1, **kwargs)


def test_cadence_writes_last_before_the_monitored_key_exists(tmp_path: Path) -> None:
    """Validation (val/loss) only every 4 epochs of 64 steps: without the cadence nothing exists at step 10."""
    ckpt = monitored(tmp_path, last_every_n_steps=5, every_n_train_steps=5, save_last_on_exception=False)
    with pytest.raises(RuntimeError, match="crash at step 12"):
        trainer(tmp_path, ckpt, Crash(12), max_steps=100, check_val_every_n_epoch=4).fit(Model())
    assert step_of(tmp_path / "ckpt" / "last.ckpt") == 10
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["last.ckpt"]  # no top-k without val/loss


def test_without_cadence_nothing_is_saved_before_validation(tmp_path: Path) -> None:
    """The behaviour LastCheckpoint's cadence fixes (Lightning's ModelCheckpoint defers to validation)."""
    ckpt = monitored(tmp_path, every_n_train_steps=5, save_last_on_exception=False)
    with pytest.raises(RuntimeError):
        trainer(tmp_path, ckpt, Crash(12), max_steps=100, check_val_every_n_epoch=4).fit(Model())
    assert not (tmp_path / "ckpt" / "last.ckpt").exists()


def test_top_k_still_saved_when_validation_falls_on_a_cadence_step(tmp_path: Path) -> None:
    ckpt = monitored(tmp_path, last_every_n_steps=64, filename="best-{step}")
    trainer(tmp_path, ckpt, max_steps=64, limit_val_batches=2).fit(Model())  # 64 steps = 1 epoch, val at its end
    assert (tmp_path / "ckpt" / "best-step=64.ckpt").is_file()
    assert step_of(tmp_path / "ckpt" / "last.ckpt") == 64


def test_final_step_is_saved(tmp_path: Path) -> None:
    ckpt = monitored(tmp_path, last_every_n_steps=5)
    trainer(tmp_path, ckpt, max_steps=7, limit_val_batches=0).fit(Model())
    assert step_of(tmp_path / "ckpt" / "last.ckpt") == 7


def test_exception_in_training_leaves_last_of_the_last_completed_step(tmp_path: Path) -> None:
    ckpt = monitored(tmp_path, last_every_n_steps=5)
    model = Model()
    with pytest.raises(RuntimeError, match="crash at step 7"):
        trainer(tmp_path, ckpt, Crash(7), max_steps=100, limit_val_batches=0).fit(model)
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 7
    assert torch.equal(saved["state_dict"]["layer.weight"], model.layer.weight.detach())


def test_non_finite_stop_keeps_the_last_finite_checkpoint(tmp_path: Path) -> None:
    class NaNFrom(Model):
        def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
            out = super().training_step(batch, batch_idx)
            if self.trainer.global_step >= 6:
                with torch.no_grad():
                    self.layer.weight.fill_(float("nan"))
            return out

    ckpt = monitored(tmp_path, last_every_n_steps=5)
    with pytest.raises(NonFiniteError, match="step 7: the weights are NaN/inf"):
        trainer(tmp_path, ckpt, NonFiniteGuard(), max_steps=100, limit_val_batches=0).fit(NaNFrom())
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 5 and torch.isfinite(saved["state_dict"]["layer.weight"]).all()


def test_keyboard_interrupt_saves_nothing_new(tmp_path: Path) -> None:
    ckpt = monitored(tmp_path, last_every_n_steps=5)
    with pytest.raises(SystemExit):  # Lightning turns KeyboardInterrupt into exit 1
        trainer(tmp_path, ckpt, Crash(7, KeyboardInterrupt), max_steps=100, limit_val_batches=0).fit(Model())
    assert step_of(tmp_path / "ckpt" / "last.ckpt") == 5


def test_cadence_needs_save_last() -> None:
    with pytest.raises(ValueError, match="save_last"):
        LastCheckpoint(last_every_n_steps=5)
