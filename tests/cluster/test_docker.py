"""The Docker image, built offline by docker/build_cpu_image.sh (the CI cluster stage builds it first), runs
`dpmot fit` as a non-root user, and two containers train as two torchrun nodes over the host network."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from cluster_utils import free_port, need, run

pytestmark = pytest.mark.cluster

IMAGE = os.environ.get("DPMOT_DOCKER_IMAGE", "local/dpmot:cpu")
QUICK = ["--config", "configs/quickstart.yaml", "--trainer.max_steps=3", "--trainer.default_root_dir=/workspace/runs"]


@pytest.fixture(scope="module")
def image() -> str:
    need(shutil.which("docker") is not None, "the docker CLI is not installed")
    info = run(["docker", "version", "--format", "{{.Server.Version}}"], timeout=60)
    need(info.returncode == 0, f"no Docker engine answers: {info.stderr.strip()}")
    found = run(["docker", "image", "inspect", IMAGE], timeout=60)
    need(found.returncode == 0, f"image {IMAGE} is not built (bash docker/build_cpu_image.sh)")
    return IMAGE


def mounted(tmp_path: Path) -> Path:
    runs = tmp_path / "runs"
    runs.mkdir()
    runs.chmod(0o777)  # the image runs as uid 1000
    return runs


def docker_run(image: str, runs: Path, *args: str, network: str = "none", entrypoint: str | None = None) -> list[str]:
    cmd = ["docker", "run", "--rm", f"--network={network}", "-e", "OMP_NUM_THREADS=1", "-v", f"{runs}:/workspace/runs"]
    if entrypoint is not None:
        cmd += ["--entrypoint", entrypoint]
    return [*cmd, image, *args]


def test_image_runs_dpmot_fit_as_a_non_root_user(image: str, tmp_path: Path) -> None:
    help_text = run(["docker", "run", "--rm", "--network=none", image, "--help"], timeout=120)
    assert help_text.returncode == 0 and "fit" in help_text.stdout, help_text.stderr
    runs = mounted(tmp_path)
    out = run(docker_run(image, runs, "fit", *QUICK), timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    (ckpt,) = runs.rglob("last.ckpt")
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"] == 3
    assert ckpt.stat().st_uid == 1000  # written by the image's non-root user
    assert (ckpt.parent.parent / "samples" / "final.png").is_file()


def test_two_containers_train_as_two_torchrun_nodes(image: str, tmp_path: Path) -> None:
    runs = mounted(tmp_path)
    port = free_port()
    procs = []
    for node_rank in (0, 1):
        torchrun = ["--nnodes=2", "--nproc_per_node=1", f"--node_rank={node_rank}", "--master_addr=127.0.0.1"]
        torchrun += [f"--master_port={port}", "-m", "lightning_dpmot", "fit", *QUICK]
        torchrun += ["--trainer.num_nodes=2", "--trainer.devices=1", "--trainer.strategy=ddp"]
        cmd = docker_run(image, runs, *torchrun, network="host", entrypoint="torchrun")
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        logs = [proc.communicate(timeout=600)[0] for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    assert [proc.returncode for proc in procs] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert "MEMBER: 2/2" in logs[1] or "MEMBER: 2/2" in logs[0], logs[0][-3000:]
    (ckpt,) = runs.rglob("last.ckpt")  # one run directory, written by global rank 0
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 3
