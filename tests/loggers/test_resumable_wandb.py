"""ResumableWandbLogger: one wandb run across a requeue (same save_dir), a new run for a new save_dir, precedence."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from conftest import quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel

from lightning_dpmot.loggers import ResumableWandbLogger, read_or_create_id

wandb = pytest.importorskip("wandb")
REPO = Path(__file__).resolve().parents[2]


class LoggingModel(BoringModel):
    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        out = super().training_step(batch, batch_idx)
        self.log("train/loss", out["loss"])
        return out


class SpyLogger(ResumableWandbLogger):
    """Records the steps at which metrics reached wandb."""

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        super().__init__(*args, **kwargs)
        self.steps: list[int] = []

    def log_metrics(self, metrics, step=None) -> None:  # noqa: ANN001
        if "train/loss" in metrics:
            self.steps.append(int(step))
        super().log_metrics(metrics, step)


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    yield
    wandb.finish()


def start(run_dir: Path, max_steps: int, ckpt_path: str | None = None) -> SpyLogger:
    """One job start (a fresh process would create a fresh logger): fit up to ``max_steps``, then end the run."""
    torch.manual_seed(0)
    logger = SpyLogger(save_dir=run_dir, project="requeue-test", offline=True)
    trainer = quiet_trainer(
        run_dir,
        logger=logger,
        max_steps=max_steps,
        log_every_n_steps=1,
        limit_val_batches=0,
        callbacks=[ModelCheckpoint(dirpath=run_dir / "ckpt", save_last=True, save_top_k=0)],
    )
    trainer.fit(LoggingModel(), ckpt_path=ckpt_path)
    assert logger.experiment.id == logger.version
    wandb.finish()  # the process ends here in a real requeue
    return logger


def test_requeue_continues_the_same_wandb_run(tmp_path: Path, offline: None) -> None:
    run_dir = tmp_path / "job"
    first = start(run_dir, max_steps=3)
    id_file = run_dir / "requeue-test" / "wandb_run_id"
    run_id = id_file.read_text().strip()
    second = start(run_dir, max_steps=6, ckpt_path="last")
    assert first.version == second.version == run_id
    assert id_file.read_text().strip() == run_id
    assert first.steps == [0, 1, 2]
    assert second.steps == [3, 4, 5]  # continues after the first start, in the same run
    folders = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(folders) == 2
    assert all(f.name.endswith(f"-{run_id}") for f in folders)


def test_new_run_dir_new_id_explicit_id_and_env_win(tmp_path: Path, offline: None, monkeypatch) -> None:  # noqa: ANN001
    a = ResumableWandbLogger(save_dir=tmp_path / "a", project="p")
    b = ResumableWandbLogger(save_dir=tmp_path / "b", project="p")
    id_a, id_b = a.resolve_id(), b.resolve_id()
    assert id_a and id_b and id_a != id_b
    assert ResumableWandbLogger(save_dir=tmp_path / "a", project="p").resolve_id() == id_a  # restart: same id
    assert ResumableWandbLogger(save_dir=tmp_path / "a", project="q").resolve_id() != id_a  # other project
    explicit = ResumableWandbLogger(save_dir=tmp_path / "a", project="p", id="chosen1")
    assert explicit.resolve_id() == "chosen1"
    monkeypatch.setenv("WANDB_RUN_ID", "fromenv1")
    assert ResumableWandbLogger(save_dir=tmp_path / "a", project="p").resolve_id() == "fromenv1"
    assert ResumableWandbLogger(save_dir=tmp_path / "c", project="p").resolve_id() == "fromenv1"
    assert not (tmp_path / "c" / "p" / "wandb_run_id").exists()  # WANDB_RUN_ID: no id file written
    assert ResumableWandbLogger(save_dir=tmp_path / "a", project="p", id="chosen1").resolve_id() == "chosen1"
    monkeypatch.delenv("WANDB_RUN_ID")
    off = ResumableWandbLogger(save_dir=tmp_path / "d", project="p", persist_id=False)
    assert off.resolve_id() is None and not (tmp_path / "d" / "p").exists()
    custom = ResumableWandbLogger(save_dir=tmp_path / "e", project="p", id_file=tmp_path / "ids" / "job7")
    assert custom.resolve_id() == (tmp_path / "ids" / "job7").read_text().strip()


def test_id_file_first_writer_wins_and_empty_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "run" / "wandb_run_id"
    path.parent.mkdir()
    path.write_text("winner12\n")  # another process created it first
    assert read_or_create_id(path) == "winner12"
    assert [p.name for p in path.parent.iterdir()] == ["wandb_run_id"]  # no temporary left behind
    path.write_text("")
    with pytest.raises(ValueError, match="empty"):
        read_or_create_id(path)


def test_wandb_config_under_slurm_requeue_keeps_one_run(
    tmp_path: Path, offline: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """configs/cluster/slurm.yaml + configs/loggers/wandb_slurm.yaml through ``dpmot fit``: a start and a requeued
    start (``--ckpt_path last``) of SLURM job 77 share runs/slurm/job-77 and one wandb run id."""
    from dpmot_tiny import tiny_config

    from lightning_dpmot.cli import main
    from lightning_dpmot.models.base import DiffusionModule

    monkeypatch.chdir(tmp_path)  # the config's save_dir is the relative runs/
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    config = tiny_config(tmp_path, max_steps=4, last_every_n_steps=1)
    args = ["--config", str(config), "--config", str(REPO / "configs" / "cluster" / "slurm.yaml")]
    args += ["--config", str(REPO / "configs" / "loggers" / "wandb_slurm.yaml")]
    args += ["--trainer.logger.init_args.offline=true"]  # the same command line for every start of the job

    step = DiffusionModule.training_step

    def preempted(self: DiffusionModule, batch: dict, batch_idx: int):  # noqa: ANN202
        if self.trainer.global_step == 2:
            raise RuntimeError("preempted")
        return step(self, batch, batch_idx)

    with monkeypatch.context() as patch:
        patch.setattr(DiffusionModule, "training_step", preempted)
        with pytest.raises(RuntimeError, match="preempted"):
            main(["fit", *args])
    wandb.finish()
    main(["fit", *args])  # the requeued start
    wandb.finish()
    run_dir = tmp_path / "runs" / "slurm" / "job-77"
    run_id = (run_dir / "lightning_dpmot" / "wandb_run_id").read_text().strip()
    folders = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(folders) == 2 and all(f.name.endswith(f"-{run_id}") for f in folders)
    steps = sorted({int(row["step"]) for row in csv.DictReader((run_dir / "metrics.csv").open()) if row["step"]})
    assert steps == [0, 1, 2, 3]  # the requeued start resumed at step 2 and appended to the same CSV
