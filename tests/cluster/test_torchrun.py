"""`torchrun` with two nodes on loopback (static rendezvous, node ranks 0 and 1) forms one 2-rank group under
Lightning (``num_nodes`` = nnodes, ``devices`` = nproc_per_node), and the OT callback assigns over the global batch."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cluster_utils import job_config, job_env, need
from scipy.optimize import linear_sum_assignment

pytestmark = pytest.mark.cluster


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("rendezvous", ["static", "c10d-elastic"])
def test_two_torchrun_nodes_train_one_global_batch(tmp_path: Path, rendezvous: str) -> None:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    need(torchrun is not None, "torchrun is not installed next to this Python")
    config = job_config(tmp_path, tmp_path / "record", max_steps=3)
    port = free_port()
    procs = []
    for node_rank in (0, 1):
        cmd = [str(torchrun), "--nproc_per_node=1"]
        if rendezvous == "static":
            cmd += ["--nnodes=2", f"--node_rank={node_rank}", "--master_addr=127.0.0.1", f"--master_port={port}"]
        else:  # elastic: 1 to 2 nodes, c10d rendezvous hosted by the first node
            cmd += ["--nnodes=1:2", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=dpmot"]
            cmd += ["--max_restarts=0", "--rdzv_conf=last_call_timeout=5"]
        cmd += ["-m", "lightning_dpmot", "fit", "--config", str(config), "--trainer.num_nodes=2", "--trainer.devices=1"]
        out = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
        procs.append(subprocess.Popen(cmd, env=job_env(), cwd=tmp_path, **out))
    try:
        logs = [proc.communicate(timeout=400)[0] for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    assert [proc.returncode for proc in procs] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    for step in range(3):
        r0, r1 = (torch.load(tmp_path / "record" / f"rank{r}-step{step}.pt", weights_only=True) for r in (0, 1))
        assert r0["world_size"] == 2
        x_all = torch.cat([r0["x"], r1["x"]]).flatten(1).double()
        drawn_all = torch.cat([r0["drawn"], r1["drawn"]]).flatten(1).double()
        _, cols = linear_sum_assignment(torch.cdist(x_all, drawn_all).numpy())
        used_all = torch.cat([r0["used"], r1["used"]]).flatten(1).double()
        assert torch.equal(used_all, drawn_all[torch.as_tensor(cols)])
