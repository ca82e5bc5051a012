"""benchmarks/gpu_check.sh: one clear error without a GPU; its dry mode runs the same commands on the CPU."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
ALL_STEPS = ["ot_assignment", "semidiscrete_10k", "semidiscrete_50k", "train_step_cifar10_bf16", "guidance_cost"]


def run(out: Path, timeout: float = 600, **env: str) -> subprocess.CompletedProcess[str]:
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("DPMOT_GPU_CHECK")}
    full_env = {**inherited, "OMP_NUM_THREADS": "1", "OUT": str(out), **env}
    return subprocess.run(
        ["bash", str(SCRIPT)], cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout
    )


def summary(out: Path) -> dict[str, str]:
    rows = [line.split() for line in (out / "summary.txt").read_text().splitlines()]
    return {row[0]: row[1] for row in rows}


def test_script_is_valid_bash() -> None:
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_without_a_gpu_it_stops_with_one_clear_error(tmp_path: Path) -> None:
    result = run(tmp_path / "out")
    assert result.returncode == 2
    assert "gpu_check: error: no CUDA GPU" in result.stderr
    assert "DPMOT_GPU_CHECK_DRY=1" in result.stderr
    assert not (tmp_path / "out" / "summary.txt").exists()  # nothing was run


def test_unknown_step_name_is_an_error(tmp_path: Path) -> None:
    result = run(tmp_path / "out", DPMOT_GPU_CHECK_DRY="1", DPMOT_GPU_CHECK_ONLY="ot_assignment typo_step")
    assert result.returncode == 2
    assert "unknown step 'typo_step'" in result.stderr


def test_dry_run_of_two_steps_writes_their_outputs(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run(out, DPMOT_GPU_CHECK_DRY="1", DPMOT_GPU_CHECK_ONLY="ot_assignment semidiscrete_10k")
    assert result.returncode == 0, result.stdout + result.stderr
    assert summary(out) == {"ot_assignment": "ok", "semidiscrete_10k": "ok"}
    assert "device cpu" in (out / "ot_assignment.txt").read_text()
    assert "throughput ratio" in (out / "semidiscrete_10k.txt").read_text()
    assert not (out / "guidance_cost.txt").exists()
    assert "DRY RUN" in (out / "device.txt").read_text()


def test_a_failing_step_is_recorded_and_the_exit_status_is_nonzero(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run(out, DPMOT_GPU_CHECK_DRY="1", DPMOT_GPU_CHECK_ONLY="semidiscrete_10k", PYTHON="false")
    assert result.returncode == 1
    assert summary(out) == {"semidiscrete_10k": "FAILED(rc=1)"}


@pytest.mark.slow
def test_full_dry_run_runs_every_step(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run(out, DPMOT_GPU_CHECK_DRY="1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert summary(out) == dict.fromkeys(ALL_STEPS, "ok")
    train = (out / "train_step_cifar10_bf16.txt").read_text()
    assert "EDMModule ddpmpp-cifar10" in train and "bf16-mixed" in train and "images/s" in train
    assert "clip_stopgrad" in (out / "guidance_cost.txt").read_text()
    assert "== summary" in result.stdout
