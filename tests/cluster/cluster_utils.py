"""Cluster tests (marker ``cluster``): a real SLURM cluster, torchrun and a Docker engine.

`.ci/run`'s cluster stage starts a two-node SLURM cluster and a Docker engine on the CI machine and runs
``pytest -m cluster`` with ``DPMOT_REQUIRE_CLUSTER=1`` (a missing service then fails the test instead of skipping it).
Plain ``pytest`` deselects them (pyproject addopts).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def need(condition: bool, reason: str) -> None:
    """Skip without the service; fail instead under ``DPMOT_REQUIRE_CLUSTER=1`` (the CI cluster stage)."""
    if condition:
        return
    if os.environ.get("DPMOT_REQUIRE_CLUSTER") == "1":
        pytest.fail(f"DPMOT_REQUIRE_CLUSTER=1 but {reason}")
    pytest.skip(reason)


def job_env(**extra: str) -> dict[str, str]:
    """Environment of a job: one torch thread (bit-reproducible), the recorder importable, no downloads."""
    env = {k: v for k, v in os.environ.items() if k == "SLURM_CONF" or not k.startswith(("SLURM_", "PMI_"))}
    env.update(
        OMP_NUM_THREADS="1",
        WANDB_MODE="disabled",
        HF_HUB_OFFLINE="1",
        PYTHONPATH=os.pathsep.join(p for p in (str(HERE), env.get("PYTHONPATH", "")) if p),
        PATH=os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", ""))),
    )
    env.update(extra)
    return env


def job_config(
    root: Path,
    record: Path,
    *,
    max_steps: int,
    stall_at: int | None = None,
    ot: dict[str, Any] | None = None,
    requeue: bool = True,
) -> Path:
    """A tiny EDM + OT coupling run on the digits, logging under ``root`` (one file, ``root/job.yaml``).

    ``requeue=False``: ``dpmot`` does not run ``scontrol requeue`` itself (as in an image without ``scontrol``); the
    batch script requeues from the host when ``srun`` returns 138."""
    recorder: dict[str, Any] = {"out": str(record)}
    if stall_at is not None:
        recorder.update(stall_at=stall_at, marker=str(root / "stalled"))
    config = {
        "seed_everything": 7,
        "num_threads": 1,
        "trainer": {
            "accelerator": "cpu",
            "strategy": "ddp",
            "max_steps": max_steps,
            "limit_val_batches": 0,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(root),
            "callbacks": [
                {"class_path": "lightning_dpmot.callbacks.OTCouplingCallback", "init_args": ot or {}},
                {"class_path": "recorder.Recorder", "init_args": recorder},
                {"class_path": "lightning_dpmot.callbacks.GracefulShutdown", "init_args": {"requeue": requeue}},
                {
                    "class_path": "lightning_dpmot.callbacks.LastCheckpoint",
                    "init_args": {"save_last": True, "save_top_k": 0, "last_every_n_steps": 4},
                },
            ],
        },
        "model": {
            "class_path": "lightning_dpmot.models.EDMModule",
            "init_args": {
                "net": {
                    "class_path": "lightning_dpmot.nets.DDPMppUNet",
                    "init_args": {
                        "model_channels": 8,
                        "channel_mult": [1, 1],
                        "num_blocks": 1,
                        "attn_resolutions": [],
                        "dropout": 0.0,
                    },
                },
            },
        },
        "data": {"class_path": "lightning_dpmot.data.DigitsDataModule", "init_args": {"batch_size": 16}},
    }
    root.mkdir(parents=True, exist_ok=True)
    path = root / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def semidiscrete_config(root: Path, record: Path, *, max_steps: int, stall_at: int | None = None) -> Path:
    """configs/dpm_ot/digits_fit.yaml (DPM-OT's semi-discrete OT fit, one OT iteration per step) as a DDP job."""
    config = yaml.safe_load((REPO / "configs" / "dpm_ot" / "digits_fit.yaml").read_text())
    recorder: dict[str, Any] = {"out": str(record)}
    if stall_at is not None:
        recorder.update(stall_at=stall_at, marker=str(root / "stalled"))
    config["num_threads"] = 1
    config["trainer"].update(
        strategy="ddp",
        devices=None,
        max_steps=max_steps,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root),
        callbacks=[
            {"class_path": "recorder.Recorder", "init_args": recorder},
            {
                "class_path": "lightning_dpmot.callbacks.LastCheckpoint",
                "init_args": {"save_last": True, "save_top_k": 0, "last_every_n_steps": 4},
            },
        ],
    )
    del config["trainer"]["devices"]  # from configs/cluster/slurm.yaml
    config["model"]["init_args"]["eval_every"] = 1000
    root.mkdir(parents=True, exist_ok=True)
    path = root / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=False, **kwargs)


def slurm_ready() -> tuple[bool, str]:
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return False, "SLURM client tools (sbatch, sinfo) are not installed"
    out = run(["sinfo", "-h", "-N", "-o", "%N %T"], timeout=30)
    if out.returncode != 0:
        return False, f"no SLURM controller answers: {out.stderr.strip()}"
    nodes = [line.split() for line in out.stdout.splitlines() if line.strip()]
    if len(nodes) < 2:
        return False, f"the SLURM cluster needs 2 nodes, sinfo shows {out.stdout.strip()!r}"
    return True, ""


def job_field(job: str, field: str) -> str | None:
    """A field of ``scontrol show job`` (``JobState``, ``Restarts``, ``Reason``, ...); ``None`` if unknown."""
    out = run(["scontrol", "show", "job", job], timeout=30)
    match = re.search(rf"\b{field}=(\S+)", out.stdout)
    return match.group(1) if match else None


def wait_job(job: str, states: tuple[str, ...], timeout: float, log: Path | None = None) -> str:
    deadline = time.monotonic() + timeout
    state = None
    while time.monotonic() < deadline:
        state = job_field(job, "JobState")
        if state in states:
            return state
        if state in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"):
            break
        time.sleep(1)
    text = log.read_text()[-4000:] if log is not None and log.exists() else ""
    raise AssertionError(f"job {job} is {state}, expected one of {states} within {timeout} s\n{text}")


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(f"{prefix}.{key}", item, out)
    elif isinstance(value, (list, tuple)) and any(isinstance(v, (dict, torch.Tensor)) for v in value):
        for i, item in enumerate(value):
            _flatten(f"{prefix}.{i}", item, out)
    else:
        out[prefix] = value


def final_state(root: Path) -> dict[str, Any]:
    """The run's last.ckpt: weights (and extra state), optimizer states and step, flattened to name → value."""
    (path,) = sorted(root.rglob("last.ckpt"))
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    flat: dict[str, Any] = {}
    _flatten("model", checkpoint["state_dict"], flat)
    _flatten("optimizer", checkpoint["optimizer_states"], flat)
    flat["global_step"] = checkpoint["global_step"]
    return flat


def same(a: Any, b: Any) -> bool:
    """Bit-identical tensors (dtype, shape, values), or equal plain values."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return a == b


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for rendezvous of the torchrun tests)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
