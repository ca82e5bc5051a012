"""FIDCallback: keys, values consistent with an offline computation, CSV/PNG curve, and 2-process DDP."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import quiet_trainer, tiny_edm
from lightning.pytorch.loggers import CSVLogger

from lightning_dpmot.callbacks import EMAHalfLife
from lightning_dpmot.callbacks.fid import FIDCallback, curve_ylabel, metric_key
from lightning_dpmot.data import DigitsDataModule
from lightning_dpmot.metrics import frechet_distance
from lightning_dpmot.metrics.extractors import build_feature_extractor, resolve_feature_kind
from lightning_dpmot.metrics.frechet import feature_statistics
from lightning_dpmot.sampling import SamplerSpec

SPECS = [SamplerSpec("euler", num_steps=2), SamplerSpec("euler", num_steps=4)]


def test_metric_keys() -> None:
    assert [metric_key("fid", s, SPECS) for s in SPECS] == ["val/fid@nfe=2", "val/fid@nfe=4"]
    mixed = [SamplerSpec("heun", 3), SamplerSpec("euler", 5)]
    assert metric_key("fid", mixed[0], mixed) == "val/fid_heun-karras-rho7@nfe=5"


def test_feature_kind_resolution() -> None:
    assert resolve_feature_kind("auto", (3, 32, 32)) == "inception"
    assert resolve_feature_kind("auto", (1, 16, 16)) == "classifier"
    assert resolve_feature_kind("auto", (3, 16, 16)) == "classifier"
    with pytest.raises(ValueError, match="feature must be"):
        resolve_feature_kind("dino", (3, 32, 32))  # type: ignore[arg-type]


def test_fid_callback_logs_curve_and_matches_offline_fid(tmp_path: Path) -> None:
    fid = FIDCallback(samplers=SPECS, num_samples=64, batch_size=32, cache_dir=str(tmp_path / "cache"))
    model, dm = tiny_edm(), DigitsDataModule(batch_size=32)
    trainer = quiet_trainer(
        tmp_path,
        max_steps=4,
        limit_train_batches=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=CSVLogger(tmp_path),
        enable_checkpointing=False,
        callbacks=[EMAHalfLife(halflife_images=50), fid],
    )
    trainer.fit(model, dm)
    keys = {h["key"] for h in fid.history}
    assert keys == {"val/fid@nfe=2", "val/fid@nfe=4"} and len(fid.history) == 4  # 2 evaluations x 2 settings
    assert all(h["value"] > 0 for h in fid.history)
    rows = list(csv.DictReader(open(Path(trainer.log_dir) / "fid_curve.csv")))
    assert [r["key"] for r in rows] == [h["key"] for h in fid.history]
    assert (Path(trainer.log_dir) / "fid_curve.png").stat().st_size > 1000
    assert trainer.callback_metrics["val/fid@nfe=4"].item() == pytest.approx(fid.history[-1]["value"])
    # The same number computed offline from the same seeds, features and reference statistics.
    feature = build_feature_extractor("classifier", (1, 8, 8), dm.dataset("train"), tmp_path / "cache")
    x_train = torch.stack([dm.dataset("train")[i]["x"] for i in range(len(dm.dataset("train")))])
    mu_r, sig_r = feature_statistics(feature((x_train + 1) / 2))
    samples = model.generate(torch.arange(1_000_000, 1_000_064), spec=SPECS[1]).x  # module holds EMA after fit
    mu_f, sig_f = feature_statistics(feature((samples + 1) / 2))
    assert frechet_distance(mu_r, sig_r, mu_f, sig_f) == pytest.approx(fid.history[-1]["value"], rel=1e-3)


def test_fid_on_points_is_rejected(tmp_path: Path) -> None:
    from lightning_dpmot.data import Toy2DDataModule
    from lightning_dpmot.nets import MLPDenoiserNet

    model = tiny_edm(net=MLPDenoiserNet, data_shape=(2,), num_classes=8)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        callbacks=[FIDCallback(cache_dir=str(tmp_path))],
    )
    with pytest.raises(ValueError, match="need image data"):
        trainer.fit(model, Toy2DDataModule(num_train=512, num_val=64))


class CheckedFID(FIDCallback):
    """Asserts inside the workers that every rank computed the same FID."""

    def on_validation_epoch_end(self, trainer, pl_module):
        super().on_validation_epoch_end(trainer, pl_module)
        value = torch.tensor(self.history[-1]["value"])
        both = pl_module.all_gather(value)
        assert both.shape == (2,) and torch.equal(both[0], both[1]), both
        log_dir = Path(trainer.log_dir)  # a collective: every rank calls it
        if trainer.is_global_zero:
            assert (log_dir / "fid_curve.csv").is_file(), list(log_dir.iterdir())
        pl_module.log("fid_checked", 1.0)


@pytest.mark.slow
def test_fid_callback_under_two_process_ddp(tmp_path: Path) -> None:
    fid = CheckedFID(samplers=SPECS[:1], num_samples=40, batch_size=16, cache_dir=str(tmp_path / "cache"))
    trainer = quiet_trainer(
        tmp_path,
        devices=2,
        strategy="ddp_spawn",
        max_steps=2,
        limit_train_batches=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=CSVLogger(tmp_path),
        enable_checkpointing=False,
        callbacks=[fid],
    )
    trainer.fit(tiny_edm(), DigitsDataModule(batch_size=16))
    assert trainer.callback_metrics["fid_checked"].item() == 1.0
    assert trainer.callback_metrics["val/fid@nfe=2"].item() > 0


def test_the_curve_names_its_metrics_on_the_y_axis() -> None:
    history = [{"key": "val/fid@nfe=9"}, {"key": "val/fid@nfe=35"}]
    assert curve_ylabel(history) == "FID"
    assert curve_ylabel([*history, {"key": "val/kid_heun-karras-rho7@nfe=9"}]) == "FID / KID"
