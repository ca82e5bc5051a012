"""A closing summary of ``dpmot fit/validate/test/predict``: where the outputs went and the final metrics.

:class:`RunSummary` (added to every trainer by the CLI) prints, on global rank 0 after a successful run, the run
folder (``trainer.log_dir``), the checkpoints of every ``ModelCheckpoint`` (best and last), the last value of each
logged metric (``trainer.callback_metrics`` and ``metrics.csv`` of a CSV logger) and the files written under the run
folder since the run started (folders with many new files are shown as one line with a count). A failed run prints
nothing (Lightning calls ``teardown`` only after a stage completes).
"""

from __future__ import annotations

import csv
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger

__all__ = ["RunSummary", "final_metrics", "new_files"]

# metrics whose names contain these come first when there are more than ``max_metrics``
_IMPORTANT = ("loss", "fid", "acc", "score", "clip", "recall", "precision", "nll", "bpd")
_SKIPPED = {"epoch", "step"}


def _scalar(value: Any) -> float | None:
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().item()) if value.numel() == 1 else None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _csv_last_values(path: Path) -> dict[str, float]:
    """The last non-empty value of each column of a Lightning ``metrics.csv``."""
    last: dict[str, float] = {}
    try:
        with path.open(newline="") as f:
            for row in csv.DictReader(f):
                for key, raw in row.items():
                    value = _scalar(raw) if raw not in (None, "") else None
                    if key and value is not None:
                        last[key] = value
    except OSError:
        return {}
    return last


def final_metrics(trainer: L.Trainer) -> dict[str, float]:
    """The last value of every logged scalar metric (CSV loggers' ``metrics.csv``, then ``callback_metrics``)."""
    metrics: dict[str, float] = {}
    for logger in trainer.loggers:
        if isinstance(logger, CSVLogger):
            metrics.update(_csv_last_values(Path(logger.log_dir) / "metrics.csv"))
    for source in (trainer.logged_metrics, trainer.callback_metrics):
        for key, value in (source or {}).items():
            scalar = _scalar(value)
            if scalar is not None:
                metrics[str(key)] = scalar
    return {k: v for k, v in metrics.items() if k not in _SKIPPED}


def new_files(root: Path, since: float, *, group_over: int = 3) -> list[tuple[Path, int]]:
    """Files under ``root`` modified at or after ``since``: ``(path, 1)``, or ``(folder, n)`` for a folder with more
    than ``group_over`` new files directly inside it."""
    by_folder: dict[Path, list[Path]] = {}
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = Path(dirpath) / name
            try:
                if path.stat().st_mtime >= since:
                    by_folder.setdefault(Path(dirpath), []).append(path)
            except OSError:
                continue
    out: list[tuple[Path, int]] = []
    for folder in sorted(by_folder):
        files = sorted(by_folder[folder])
        out.extend([(folder, len(files))] if len(files) > group_over else [(p, 1) for p in files])
    return out


def _shown(path: str | os.PathLike[str]) -> str:
    rel = os.path.relpath(path)
    return rel if not rel.startswith("..") else str(Path(path).absolute())


def _number(value: float) -> str:
    if math.isfinite(value) and value == int(value) and abs(value) < 1e12:
        return str(int(value))
    return f"{value:.6g}"


class RunSummary(Callback):
    """Print where a run's outputs went and its final metrics, on global rank 0 at the end of each stage.

    Args:
        max_metrics: most metrics shown (losses, FIDs, accuracies and scores first, then alphabetical).
        max_files: most new files (or folders of new files) shown.
        stream: where to print (default ``sys.stderr``, beside Lightning's messages; stdout stays for data).
    """

    def __init__(self, max_metrics: int = 16, max_files: int = 20, stream: TextIO | None = None) -> None:
        self.max_metrics = max_metrics
        self.max_files = max_files
        self.stream = stream
        self._started = time.time()

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Remember when the stage started (files modified since then are the run's outputs)."""
        self._started = time.time() - 1.0  # file systems with coarse timestamps

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Print the summary (rank 0; Lightning calls this only after the stage completed)."""
        log_dir = trainer.log_dir  # a broadcast: every rank takes part
        if trainer.is_global_zero:
            self.print_summary(trainer, stage, log_dir)

    def lines(self, trainer: L.Trainer, stage: str, log_dir: str | None) -> list[str]:
        """The summary's lines (``log_dir``: ``trainer.log_dir``, read on every rank before)."""
        out = [f"dpmot {_stage_name(stage)} finished"]
        if log_dir:
            out.append(f"  run folder: {_shown(log_dir)}")
        for callback in trainer.checkpoint_callbacks:
            for label in ("best", "last"):
                path = getattr(callback, f"{label}_model_path", "")
                if path and Path(path).is_file():
                    out.append(f"  {label} checkpoint: {_shown(path)}")
        metrics = final_metrics(trainer)
        if metrics:
            important = sorted(k for k in metrics if any(word in k.lower() for word in _IMPORTANT))
            ordered = important + sorted(k for k in metrics if k not in important)
            out.append("  metrics (last value):")
            out.extend(f"    {key} = {_number(metrics[key])}" for key in ordered[: self.max_metrics])
            if len(ordered) > self.max_metrics:
                out.append(f"    ... and {len(ordered) - self.max_metrics} more")
        if log_dir and Path(log_dir).is_dir():
            files = new_files(Path(log_dir), self._started)
            if files:
                out.append("  files written:")
                for path, count in files[: self.max_files]:
                    out.append(f"    {_shown(path)}" + (f"/ ({count} files)" if count > 1 else ""))
                if len(files) > self.max_files:
                    out.append(f"    ... and {len(files) - self.max_files} more")
        return out

    def print_summary(self, trainer: L.Trainer, stage: str, log_dir: str | None) -> None:
        """Write :meth:`lines` to the stream."""
        stream = self.stream or sys.stderr
        stream.write("\n".join(self.lines(trainer, stage, log_dir)) + "\n")
        stream.flush()


def _stage_name(stage: Any) -> str:
    return str(getattr(stage, "value", stage))
