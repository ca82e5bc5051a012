"""NaN/inf: NonFiniteGuard stops training with one clear error (exit 3); predict writes no non-finite samples."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from conftest import quiet_trainer
from dpmot_tiny import error_lines, tiny_config
from lightning.pytorch.demos.boring_classes import BoringModel
from torch.utils.data import DataLoader

from lightning_dpmot.callbacks import NonFiniteGuard, SampleWriter
from lightning_dpmot.callbacks.nonfinite import nonfinite_parameters
from lightning_dpmot.cli import main
from lightning_dpmot.errors import NonFiniteError
from lightning_dpmot.utils.images import to_uint8


class NaNLoss(BoringModel):
    """Loss NaN at the listed steps, with zero (finite) gradients, so the weights stay finite."""

    def __init__(self, bad_steps: set[int]) -> None:
        super().__init__()
        self.bad_steps = bad_steps

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        loss = self.step(batch)
        if self.trainer.global_step in self.bad_steps:
            loss = loss * 0.0 + float("nan")
        return {"loss": loss}


def fit(tmp_path: Path, model: L.LightningModule, guard: NonFiniteGuard, max_steps: int = 20) -> L.Trainer:
    trainer = quiet_trainer(tmp_path, callbacks=[guard], max_steps=max_steps, limit_val_batches=0)
    trainer.fit(model)
    return trainer


def test_tolerates_up_to_max_consecutive(tmp_path: Path) -> None:
    trainer = fit(tmp_path, NaNLoss({3, 4, 10, 11}), NonFiniteGuard(max_consecutive=2))
    assert trainer.global_step == 20


def test_stops_after_max_consecutive_naming_step_and_loss(tmp_path: Path) -> None:
    with pytest.raises(NonFiniteError) as err:
        fit(tmp_path, NaNLoss(set(range(5, 100))), NonFiniteGuard(max_consecutive=2))
    message = str(err.value)
    # the losses of steps 6, 7, 8 (global_step after them) are NaN; the third in a row stops
    assert "training stopped at step 8" in message and "train/loss" in message and "3 consecutive" in message
    assert "max_consecutive=2" in message


def test_zero_tolerance_stops_at_the_first(tmp_path: Path) -> None:
    with pytest.raises(NonFiniteError, match="step 4:"):
        fit(tmp_path, NaNLoss({3}), NonFiniteGuard(max_consecutive=0))


def test_nonfinite_parameters_names_them() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    assert nonfinite_parameters(model) == []
    with torch.no_grad():
        model[1].bias[0] = float("inf")
    assert nonfinite_parameters(model) == ["1.bias"]


def test_huge_learning_rate_exits_3_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--model.init_args.optimizer.init_args.lr 1e6` used to run to completion with exit 0."""
    config = tiny_config(tmp_path, max_steps=200, last_every_n_steps=1)
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(config), "--model.init_args.optimizer=torch.optim.Adam",
              "--model.init_args.optimizer.init_args.lr=1e6"])  # fmt: skip
    err = capsys.readouterr().err
    lines = error_lines(err)
    assert exc.value.code == 3 and len(lines) == 1, err
    assert "NonFiniteError: training stopped at step" in lines[0]
    assert "the last finite checkpoint is" in lines[0]
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert saved["global_step"] < 200
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values() if v.is_floating_point())


def test_to_uint8_refuses_nan() -> None:
    x = torch.zeros(2, 1, 2, 2)
    assert to_uint8(x).dtype == torch.uint8
    x[1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="1 of 8 values are NaN/inf"):
        to_uint8(x)


class Generator(L.LightningModule):
    """predict_step → SampleWriter's dict; samples of the seeds in ``bad`` are NaN."""

    def __init__(self, bad: set[int]) -> None:
        super().__init__()
        self.bad = bad

    def predict_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        seeds = batch
        x = torch.zeros(len(seeds), 1, 4, 4)
        for i, seed in enumerate(seeds.tolist()):
            if seed in self.bad:
                x[i] = float("nan")
        return {"x": x, "seed": seeds, "nfe": torch.tensor(1)}


def predict(tmp_path: Path, bad: set[int]) -> Path:
    out = tmp_path / "pred"
    trainer = quiet_trainer(tmp_path, callbacks=[SampleWriter(output_dir=str(out))])
    trainer.predict(Generator(bad), DataLoader(torch.arange(10), batch_size=4), return_predictions=False)
    return out


def test_sample_writer_writes_finite_samples(tmp_path: Path) -> None:
    out = predict(tmp_path, set())
    assert len(list(out.glob("0*.png"))) == 10 and len(np.load(out / "samples.npz")["x"]) == 10


def test_sample_writer_refuses_nonfinite_samples(tmp_path: Path) -> None:
    with pytest.raises(NonFiniteError) as err:
        predict(tmp_path, {2, 7})
    assert "2 of 10 generated samples are NaN/inf (seeds 2, 7)" in str(err.value)
    out = tmp_path / "pred"
    assert not (out / "samples.npz").exists()
    assert not (out / "000002.png").exists() and not (out / "000007.png").exists()
    assert (out / "000003.png").exists()


def test_zero_sigma_data_is_refused_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--model.init_args.sigma_data 0` used to train with an infinite loss and exit 0."""
    config = tiny_config(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(config), "--model.init_args.sigma_data=0"])
    lines = error_lines(capsys.readouterr().err)
    assert exc.value.code == 2 and len(lines) == 1 and "sigma_data must be a finite positive number" in lines[0]
    assert not (tmp_path / "ckpt" / "last.ckpt").exists()


def test_toy2d_at_scale_1e30_exits_3(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Toy2D data of scale 1e30 used to train to completion on inf/NaN losses with exit 0."""
    repo = Path(__file__).resolve().parents[2]
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(repo / "configs/edm/toy2d.yaml"), "--data.init_args.scale=1e30",
              "--trainer.max_steps=20", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
              f"--trainer.default_root_dir={tmp_path}", "--data.init_args.batch_size=64"])  # fmt: skip
    lines = error_lines(capsys.readouterr().err)
    assert exc.value.code == 3 and len(lines) == 1 and "NonFiniteError" in lines[0], lines
