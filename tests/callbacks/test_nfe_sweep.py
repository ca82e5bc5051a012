"""NFESweep: the table's rows, FID consistent with FIDCallback's definition, P/R, MMR, curvature, no overwrite."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import tiny_edm

from lightning_dpmot.callbacks import NFESweep
from lightning_dpmot.callbacks.nfe_sweep import sweep_specs
from lightning_dpmot.data import DigitsDataModule
from lightning_dpmot.metrics import frechet_distance
from lightning_dpmot.metrics.extractors import build_feature_extractor
from lightning_dpmot.metrics.frechet import feature_statistics


def test_sweep_specs_skip_even_nfe_for_heun() -> None:
    with pytest.warns(UserWarning, match="skipping heun at NFE 4"):
        specs = sweep_specs(["heun", "euler"], [3, 4], [7.0, 90.0])
    assert [(s.name, s.nfe, s.rho) for s in specs] == [
        ("heun", 3, 7.0),
        ("heun", 3, 90.0),
        ("euler", 3, 7.0),
        ("euler", 4, 7.0),
        ("euler", 3, 90.0),
        ("euler", 4, 90.0),
    ]


def test_sweep_writes_table_plot_and_curvature(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    sweep = NFESweep(
        samplers=["heun", "euler"],
        nfe=[3, 5],
        num_samples=48,
        seed_ranges=2,
        batch_size=24,
        curvature_samples=4,
        curvature_steps=6,
        output_dir=str(out),
        cache_dir=str(tmp_path / "cache"),
    )
    model, dm = tiny_edm(class_conditional=True), DigitsDataModule(batch_size=64)
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        limit_test_batches=1,
        callbacks=[sweep],
        default_root_dir=tmp_path,
    )
    trainer.test(model, dm, verbose=False)
    rows = list(csv.DictReader(open(out / "fid_vs_nfe.csv")))
    assert [(r["sampler"], int(r["nfe"])) for r in rows] == [("heun", 3), ("heun", 5), ("euler", 3), ("euler", 5)]
    for r in rows:
        assert float(r["fid"]) <= float(r["fid_mean"]) and float(r["fid_std"]) >= 0
        assert 0 <= float(r["precision"]) <= 1 and 0 <= float(r["recall"]) <= 1
        assert 0 <= float(r["mmr@0.1"]) <= 1 and float(r["mmr@0.4"]) <= float(r["mmr@0.1"])
        assert r["seeds"] == "0-95"
        assert 0 <= float(r["copy_rate"]) <= 1 and float(r["copy_ratio_median"]) > 0
        assert 0 <= float(r["copy_rate_nn2"]) <= 1
    assert (out / "fid_vs_nfe.png").stat().st_size > 1000
    curv = json.loads((out / "curvature.json").read_text())
    assert curv["curvature"] > 0 and curv["num_samples"] == 4
    # the first seed range of heun@3 by hand: seeds 0..47, labels seed % 10, train-split reference statistics
    feature = build_feature_extractor("classifier", (1, 8, 8), dm.dataset("train"), tmp_path / "cache")
    x_train = torch.stack([dm.dataset("train")[i]["x"] for i in range(len(dm.dataset("train")))])
    mu_r, s_r = feature_statistics(feature((x_train + 1) / 2))
    seeds = torch.arange(48)
    x = model.generate(seeds, {"label": seeds % 10}, sweep.specs[0]).x
    mu_f, s_f = feature_statistics(feature((x + 1) / 2))
    first_range = frechet_distance(mu_r, s_r, mu_f, s_f)
    assert first_range >= float(rows[0]["fid"]) - 1e-3 * first_range  # min over ranges <= this range
    assert trainer.callback_metrics["test/fid_heun-karras-rho7@nfe=3"].item() == pytest.approx(float(rows[0]["fid"]))
    trainer.test(model, dm, verbose=False)  # a rerun into the same folder recomputes nothing
    assert list(csv.DictReader(open(out / "fid_vs_nfe.csv"))) == rows


def test_timestep_schedule_uses_one_rho() -> None:
    specs = sweep_specs(["ddim"], [5, 10], [7.0, 90.0], schedule="timesteps")
    assert [(s.name, s.nfe, s.schedule) for s in specs] == [("ddim", 5, "timesteps"), ("ddim", 10, "timesteps")]


def test_interrupted_sweep_keeps_finished_settings_and_a_rerun_skips_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sweep"

    def make_sweep() -> NFESweep:
        return NFESweep(
            samplers=["euler"],
            nfe=[2, 3, 4],
            num_samples=16,
            batch_size=16,
            precision_recall=False,
            copy_threshold=0.0,
            curvature_samples=0,
            output_dir=str(out),
            cache_dir=str(tmp_path / "cache"),
        )

    model, dm = tiny_edm(class_conditional=True), DigitsDataModule(batch_size=64)
    generate, calls = model.generate, []

    def failing_generate(seeds, cond=None, spec=None, *args, **kwargs):
        calls.append(spec.nfe)
        if len(calls) == 2:
            raise RuntimeError("stopped on the second setting")
        return generate(seeds, cond, spec, *args, **kwargs)

    monkeypatch.setattr(model, "generate", failing_generate)
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        limit_test_batches=1,
        default_root_dir=tmp_path,
        callbacks=[make_sweep()],
    )
    with pytest.raises(RuntimeError, match="second setting"):
        trainer.test(model, dm, verbose=False)
    rows = list(csv.DictReader(open(out / "fid_vs_nfe.csv")))
    assert [int(r["nfe"]) for r in rows] == [2] and (out / "fid_vs_nfe.png").is_file()

    calls.clear()
    capsys.readouterr()
    monkeypatch.setattr(model, "generate", lambda *a, **k: calls.append(a[2].nfe) or generate(*a, **k))
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=True,  # off a terminal: one line per computed setting, with its FID
        limit_test_batches=1,
        default_root_dir=tmp_path,
        callbacks=[make_sweep()],
    )
    trainer.test(model, dm, verbose=False)
    assert calls == [3, 4]  # NFE 2 was done: not recomputed
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("NFE sweep")]
    assert [line.split(":")[0] for line in lines] == ["NFE sweep euler NFE 3 rho 7", "NFE sweep euler NFE 4 rho 7"]
    assert all(": FID " in line for line in lines)
    rows_after = list(csv.DictReader(open(out / "fid_vs_nfe.csv")))
    assert [int(r["nfe"]) for r in rows_after] == [2, 3, 4] and rows_after[0] == rows[0]
    for nfe, row in zip((2, 3, 4), rows_after, strict=True):  # logged from all rows, the old one included
        logged = trainer.callback_metrics[f"test/fid_euler-karras-rho7@nfe={nfe}"].item()
        assert logged == pytest.approx(float(row["fid"]))
