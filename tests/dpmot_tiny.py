"""A tiny ``dpmot fit`` config (EDM, 8-channel U-Net, digits) for CLI reliability tests, and subprocess helpers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]


def tiny_config(root: Path, *, max_steps: int = 4, last_every_n_steps: int | None = None, **trainer: Any) -> Path:
    """Write ``root/tiny.yaml``: logs under ``root/runs/tiny/version_N``, checkpoints in ``root/ckpt``."""
    callbacks: list[dict[str, Any]] = [
        {
            "class_path": "lightning_dpmot.callbacks.LastCheckpoint",
            "init_args": {
                "dirpath": str(root / "ckpt"),
                "save_last": True,
                "save_top_k": 0,
                "last_every_n_steps": last_every_n_steps,
            },
        }
    ]
    config = {
        "seed_everything": 0,
        "num_threads": 1,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": max_steps,
            "limit_val_batches": 0,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": [
                {
                    "class_path": "lightning.pytorch.loggers.CSVLogger",
                    "init_args": {"save_dir": str(root / "runs"), "name": "tiny"},
                }
            ],
            "callbacks": callbacks,
            **trainer,
        },
        "model": {
            "class_path": "lightning_dpmot.models.EDMModule",
            "init_args": {
                "net": {
                    "class_path": "lightning_dpmot.nets.DDPMppUNet",
                    "init_args": {"model_channels": 8, "channel_mult": [1, 1], "num_blocks": 1, "attn_resolutions": []},
                },
            },
        },
        "data": {"class_path": "lightning_dpmot.data.DigitsDataModule", "init_args": {"batch_size": 16}},
    }
    root.mkdir(parents=True, exist_ok=True)
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def dpmot(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m lightning_dpmot <args>`` with one thread; returns the completed process."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "lightning_dpmot", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=full_env,
    )


def error_lines(stderr: str) -> list[str]:
    """The ``dpmot: error:`` lines of a run's stderr."""
    return [line for line in stderr.splitlines() if line.startswith("dpmot: error:")]
