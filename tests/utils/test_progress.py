"""utils.progress: bars on a terminal, one line per phase off it, nothing under enable_progress_bar=False."""

from __future__ import annotations

import io
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.demos.boring_classes import BoringModel

from lightning_dpmot.utils.progress import progress, progress_enabled


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_off_a_terminal_one_line_per_phase_and_no_carriage_returns() -> None:
    out = io.StringIO()
    with progress(True, 3, "FID heun@5", stream=out) as bar:
        for _ in range(3):
            bar.advance()
        bar.result("FID 12.3")
    with progress(True, 2, "short phase", stream=out) as bar:  # no result, under min_line_seconds: silent
        bar.advance(2)
    with progress(True, 2, "long phase", min_line_seconds=0.0, stream=out) as bar:
        bar()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and "\r" not in out.getvalue()
    assert lines[0].startswith("FID heun@5: FID 12.3 (3/3, ") and lines[1].startswith("long phase: done (1/2, ")


def test_disabled_sources_print_nothing(tmp_path: Path) -> None:
    out = io.StringIO()
    trainer = L.Trainer(enable_progress_bar=False, logger=False, default_root_dir=tmp_path)
    assert not progress_enabled(trainer) and not progress_enabled(False) and progress_enabled(None)
    for source in (trainer, False):
        with progress(source, 4, "sample grid", min_line_seconds=0.0, stream=out) as bar:
            bar.advance(4)
            bar.result("written")
        assert bar.count == 4  # the handle still counts
    assert out.getvalue() == ""


def test_no_line_when_the_phase_is_interrupted() -> None:
    out = io.StringIO()
    try:
        with progress(True, 3, "sweep", min_line_seconds=0.0, stream=out) as bar:
            bar.result("never finished")
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    assert out.getvalue() == ""


def test_tqdm_bar_on_a_terminal_ends_with_the_result(tmp_path: Path) -> None:
    out = _Terminal()
    trainer = L.Trainer(callbacks=[TQDMProgressBar()], logger=False, default_root_dir=tmp_path)
    with progress(trainer, 5, "NFE sweep euler", stream=out) as bar:
        for _ in range(5):
            bar.advance(loss=0.5)
        bar.result("FID 3.2")
    text = out.getvalue()
    assert "NFE sweep euler" in text and "\r" in text  # a drawn bar
    assert text.rstrip().splitlines()[-1].startswith("NFE sweep euler: FID 3.2 (5/5, ")


class _UsesProgress(L.Callback):
    def __init__(self) -> None:
        self.tasks_during: list[str] = []

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        with progress(trainer, 2, "sample grid") as bar:
            live = trainer.progress_bar_callback.progress
            self.tasks_during = [str(t.description) for t in live.tasks]
            bar.advance(2)
            bar.result("done right")


def test_rich_progress_bar_gets_a_task_in_its_live_display(tmp_path: Path) -> None:
    console_out = io.StringIO()
    rich_bar = RichProgressBar(console_kwargs={"force_terminal": True, "file": console_out, "width": 120})
    probe = _UsesProgress()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        limit_train_batches=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        callbacks=[rich_bar, probe],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    torch.manual_seed(0)
    trainer.fit(BoringModel())
    assert "sample grid" in probe.tasks_during  # drawn in Lightning's own live display
    assert all("sample grid" not in str(t.description) for t in rich_bar.progress.tasks)  # removed when done
    assert "sample grid: done right (2/2, " in console_out.getvalue()
