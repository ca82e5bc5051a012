"""`torchrun` with two nodes on loopback (static rendezvous, node ranks 0 and 1) forms one 2-rank group under
Lightning (``num_nodes`` = nnodes, ``devices`` = nproc_per_node), and the OT callback assigns over the global batch."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cluster_utils import REPO, free_port, job_config, job_env, need
from scipy.optimize import linear_sum_assignment

pytestmark = pytest.mark.cluster
SCRIPT = REPO / "experiments" / "cluster" / "torchrun_node.sh"


@pytest.mark.parametrize("rendezvous", ["static", "c10d-elastic"])
def test_two_torchrun_nodes_train_one_global_batch(tmp_path: Path, rendezvous: str) -> None:
    """experiments/cluster/torchrun_node.sh, started twice as node 0 and node 1 on loopback."""
    need(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is not None, "torchrun is not installed")
    config = job_config(tmp_path, tmp_path / "record", max_steps=3)
    port = str(free_port())
    procs = []
    for node_rank in (0, 1):
        env = job_env(DPMOT_MASTER_ADDR="127.0.0.1", DPMOT_MASTER_PORT=port, DPMOT_NODE_RANK=str(node_rank))
        env.update(DPMOT_NNODES="2", DPMOT_NPROC="1")
        if rendezvous == "c10d-elastic":
            env.update(DPMOT_NNODES="1:2", DPMOT_ELASTIC="1", DPMOT_RUN_ID=f"dpmot-{port}")
        cmd = ["bash", str(SCRIPT), "--config", str(config)]
        out = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
        procs.append(subprocess.Popen(cmd, env=env, cwd=tmp_path, **out))
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
