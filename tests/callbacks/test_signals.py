"""SIGTERM/SIGINT during `dpmot fit`: checkpoint of the current step, metrics on disk, exit 143/130; resumable.

Lightning alone logs "Received SIGTERM", exits 0 and writes nothing. Single process and 2-process DDP (gloo, only
rank 0 signalled: the ranks agree on the step through an all-reduce).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from dpmot_tiny import dpmot, tiny_config

INTERRUPTED = re.compile(r"dpmot: interrupted by (SIG\w+) at step (\d+); checkpoint (\S+) ")


def start(config: Path, *extra: str) -> subprocess.Popen[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-m", "lightning_dpmot", "fit", "--config", str(config), *extra]
    return subprocess.Popen(
        cmd,
        cwd=config.parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def wait_for(path: Path, proc: subprocess.Popen[str], timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(
                f"run ended early ({proc.returncode}): {proc.stderr.read()[-3000:] if proc.stderr else ''}"
            )
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear in {timeout} s")
        time.sleep(0.2)


def interrupt(tmp_path: Path, signum: int, *extra: str) -> tuple[int, str, int, Path]:
    """Train, signal the main process once last.ckpt exists: (exit status, stderr, reported step, checkpoint)."""
    config = tiny_config(tmp_path, max_steps=100_000, last_every_n_steps=5)
    proc = start(config, *extra)
    try:
        wait_for(tmp_path / "ckpt" / "last.ckpt", proc)
        time.sleep(0.5)
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=180)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # nothing should be left; never leave a stray rank behind
        except ProcessLookupError:
            pass
    match = INTERRUPTED.search(stderr)
    assert match, stderr[-3000:]
    return proc.returncode, stderr, int(match.group(2)), Path(match.group(3))


def check_checkpoint(path: Path, step: int, tmp_path: Path) -> None:
    assert path == tmp_path / "ckpt" / "last.ckpt"
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["global_step"] == step > 5
    assert not list(path.parent.glob(".*.partial"))
    metrics = (tmp_path / "runs" / "tiny" / "version_0" / "metrics.csv").read_text().splitlines()
    logged_steps = [int(line.split(",")[1]) for line in metrics[1:] if line.split(",")[1].isdigit()]
    assert logged_steps and max(logged_steps) >= step - 2  # flushed up to the interrupted step


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_143_then_resumes(tmp_path: Path) -> None:
    code, stderr, step, path = interrupt(tmp_path, signal.SIGTERM)
    assert code == 143, stderr[-3000:]
    check_checkpoint(path, step, tmp_path)
    resumed = dpmot("fit", "--config", str(tmp_path / "tiny.yaml"), f"--ckpt_path={path}",
                    f"--trainer.max_steps={step + 2}", cwd=tmp_path)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert torch.load(path, weights_only=True)["global_step"] == step + 2


@pytest.mark.slow
def test_sigint_checkpoints_and_exits_130(tmp_path: Path) -> None:
    code, stderr, step, path = interrupt(tmp_path, signal.SIGINT)
    assert code == 130 and "SIGINT" in stderr, stderr[-3000:]
    check_checkpoint(path, step, tmp_path)


@pytest.mark.slow
def test_sigterm_under_two_process_ddp(tmp_path: Path) -> None:
    """Only rank 0 gets SIGTERM; both ranks checkpoint the same step and exit 143; no process is left."""
    extra = ["--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.accelerator=cpu"]
    code, stderr, step, path = interrupt(tmp_path, signal.SIGTERM, *extra)
    assert code == 143, stderr[-3000:]
    check_checkpoint(path, step, tmp_path)
    assert "Traceback" not in stderr


def test_requeue_runs_scontrol_for_the_job_and_else_asks_the_batch_script(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGUSR1 in a SLURM job: ``scontrol requeue <job>`` (array tasks as ``<array>_<task>``) when scontrol exists;
    otherwise the marker file the sbatch templates watch (``$DPMOT_REQUEUE_MARKER``), written whole."""
    from lightning_dpmot.callbacks.signals import request_host_requeue, requeue_slurm_job

    for name in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "DPMOT_REQUEUE_MARKER"):
        monkeypatch.delenv(name, raising=False)
    assert requeue_slurm_job() == (False, "not a SLURM job: nothing to requeue")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    done, message = requeue_slurm_job()
    assert not done and "scontrol not found" in message and "42" in message
    calls = tmp_path / "calls.txt"
    fake = bin_dir / "scontrol"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    fake.chmod(0o755)
    assert requeue_slurm_job()[0] and calls.read_text() == "requeue 42\n"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "7")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert requeue_slurm_job()[0] and calls.read_text().splitlines()[-1] == "requeue 7_3"
    fake.write_text("#!/bin/sh\necho 'Invalid job id' >&2\nexit 1\n")
    done, message = requeue_slurm_job()
    assert not done and "failed (1): Invalid job id" in message

    assert "DPMOT_REQUEUE_MARKER is not set" in request_host_requeue()
    marker = tmp_path / "runs" / ".dpmot-requeue-7"
    monkeypatch.setenv("DPMOT_REQUEUE_MARKER", str(marker))
    assert str(marker) in request_host_requeue()
    assert marker.read_text() == "7_3\n" and not list(marker.parent.glob(".*.partial"))
