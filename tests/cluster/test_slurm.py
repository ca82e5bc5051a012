"""`dpmot fit` as a 2-node SLURM job (sbatch + srun, Lightning's SLURM environment, gloo), for real.

1. The global OT assignment and the loss of the 2-node job are those of one process over the same global batch.
2. Preemption: ``scancel --signal=USR1`` mid-epoch → last.ckpt at the batch boundary → ``scontrol requeue`` (by
   dpmot's rank 0, or by the batch script from the host after exit status 138, as in a container) → the job
   restarts (same id, same log directory, ``--ckpt_path last``) → final weights and Adam moments bit-identical to the
   uninterrupted job; with the OT callback coupling each batch and with AOT's pool (the pool's position resumes).
All six jobs are submitted at once (``--oversubscribe``) so the requeue wait overlaps the other jobs' training.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from cluster_utils import (
    REPO,
    final_state,
    job_config,
    job_env,
    job_field,
    need,
    run,
    same,
    semidiscrete_config,
    slurm_ready,
    wait_job,
)
from scipy.optimize import linear_sum_assignment

from lightning_dpmot.models.base import LABEL_DROP, SIGMA
from lightning_dpmot.utils.checkpoint_io import load_lightning_module
from lightning_dpmot.utils.random import make_generator

pytestmark = pytest.mark.cluster

SBATCH = REPO / "experiments" / "cluster" / "native.sbatch"
FRAGMENT = REPO / "configs" / "cluster" / "slurm.yaml"
STEPS, STALL_AT = 10, 5  # digits: 1617 training images, global batch 32 → 50 steps per epoch: step 5 is mid-epoch
# EDM + OT coupling of each batch, EDM + AOT's pool (48 per rank = 3 steps: step 5 is inside a pool), and DPM-OT's
# semi-discrete OT fit (configs/dpm_ot/digits_fit.yaml: the dual potential h and its optimizer state)
OT_MODES = {"batch": {}, "pool": {"pool_size": 48}, "semidiscrete": None}
# who requeues the preempted job: dpmot's rank 0 (native) or the batch script from the host (as for containers)
REQUEUE_BY = {"batch": "dpmot", "pool": "host", "semidiscrete": "dpmot"}


def submit(root: Path, config: Path) -> str:
    log = root / "slurm.out"
    cmd = ["sbatch", "--parsable", "--oversubscribe", "--job-name", root.name, "-D", str(root), "-o", str(log)]
    cmd += [str(SBATCH), "--config", str(config), "--config", str(FRAGMENT)]
    env = job_env(DPMOT_MASTER_ADDR="127.0.0.1", DPMOT_CLUSTER_LIB=str(REPO / "experiments/cluster/common.sh"))
    env["DPMOT_RUN_ROOT"] = str(root)  # where the requeue marker goes
    out = run(cmd, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0]


@pytest.fixture(scope="module")
def jobs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, Path]]:
    """Submit an uninterrupted and a preempted job per OT mode; preempt; wait for all four to complete."""
    ready, reason = slurm_ready()
    need(ready, reason)
    base = tmp_path_factory.mktemp("slurm")
    submitted: dict[str, tuple[str, Path]] = {}
    for mode, ot in OT_MODES.items():
        for kind in ("whole", "preempted"):
            root = base / f"{mode}-{kind}"
            stall = STALL_AT if kind == "preempted" else None
            requeue = REQUEUE_BY[mode] == "dpmot"
            if mode == "semidiscrete":
                config = semidiscrete_config(root, root / "record", max_steps=STEPS, stall_at=stall)
            else:
                config = job_config(root, root / "record", max_steps=STEPS, stall_at=stall, ot=ot, requeue=requeue)
            submitted[f"{mode}-{kind}"] = (submit(root, config), root)
    try:
        for mode in OT_MODES:
            job, root = submitted[f"{mode}-preempted"]
            deadline = time.monotonic() + 600
            while not all((root / f"stalled.rank{r}").exists() for r in (0, 1)):
                assert time.monotonic() < deadline, (root / "slurm.out").read_text()[-4000:]
                state = job_field(job, "JobState")
                assert state in ("PENDING", "RUNNING", "CONFIGURING"), (root / "slurm.out").read_text()[-4000:]
                time.sleep(0.5)
            out = run(["scancel", "--signal=USR1", job], timeout=30)
            assert out.returncode == 0, out.stderr
            # requeued: SLURM holds the job (BeginTime, ~2 min); start it now rather than wait in CI
            wait_job(job, ("PENDING",), 300, root / "slurm.out")
            run(["scontrol", "update", f"JobId={job}", "StartTime=now"], timeout=30)
        for job, root in submitted.values():
            wait_job(job, ("COMPLETED",), 900, root / "slurm.out")
    finally:
        for job, _ in submitted.values():
            run(["scancel", job], timeout=30)
    return submitted


def records(root: Path, step: int) -> list[dict]:
    return [torch.load(root / "record" / f"rank{r}-step{step}.pt", weights_only=True) for r in (0, 1)]


def test_two_node_job_assigns_and_trains_like_one_process(jobs: dict[str, tuple[str, Path]]) -> None:
    _, root = jobs["batch-whole"]
    log = (root / "slurm.out").read_text()
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in log, log[-3000:]
    module = load_lightning_module(next(root.rglob("last.ckpt")))  # the job's model class and hyperparameters
    torch.set_num_threads(1)  # as in the job: floating-point sums in the same order
    for step in range(STEPS):
        r0, r1 = records(root, step)
        assert r0["world_size"] == r1["world_size"] == 2 and r0["batch_idx"] == r1["batch_idx"]
        x_all = torch.cat([r0["x"], r1["x"]]).flatten(1).double()
        drawn_all = torch.cat([r0["drawn"], r1["drawn"]]).flatten(1).double()
        used_all = torch.cat([r0["used"], r1["used"]]).flatten(1).double()
        assert not torch.equal(r0["drawn"], r1["drawn"])  # the two nodes drew their own noise
        # one process, the global batch: the exact Euclidean assignment (scipy, independent of the project's solver)
        rows, cols = linear_sum_assignment(torch.cdist(x_all, drawn_all).numpy())
        assert torch.equal(torch.as_tensor(rows), torch.arange(32))
        assert torch.equal(used_all, drawn_all[torch.as_tensor(cols)]), f"step {step}: not the global optimum"
        # the DDP loss (mean of the ranks' losses) = one process's loss over the global batch, same weights and sigmas
        module.load_state_dict(r0["state"])
        losses = []
        for rank, r in enumerate((r0, r1)):  # each half with its rank's generators (seed, rank, epoch, step, purpose)
            keys = (7, rank, r["epoch"], r["batch_idx"])
            batch = {"x": r["x"], "label": r["label"]}
            cond = module.conditioner.drop(module.conditioner.from_batch(batch), make_generator(*keys, LABEL_DROP, 0))
            losses.append(module.loss(r["x"], r["used"], cond, make_generator(*keys, SIGMA, 0)))
        single = torch.cat([loss.flatten() for loss in losses]).mean()
        ddp = (r0["loss"] + r1["loss"]) / 2
        torch.testing.assert_close(ddp, single.detach(), rtol=1e-5, atol=0.0)


@pytest.mark.parametrize("mode", list(OT_MODES))
def test_preempted_job_requeues_and_ends_bit_identical(jobs: dict[str, tuple[str, Path]], mode: str) -> None:
    job, root = jobs[f"{mode}-preempted"]
    _, whole_root = jobs[f"{mode}-whole"]
    log = (root / "slurm.out").read_text()
    assert job_field(job, "Restarts") == "1", log[-3000:]
    assert f"interrupted by SIGUSR1 at step {STALL_AT}" in log, log[-3000:]
    if REQUEUE_BY[mode] == "dpmot":
        assert f"scontrol requeue {job}" in log or f"requeued SLURM job {job}" in log, log[-3000:]
    else:  # exit status 138 → experiments/cluster/common.sh requeued the job from the host
        assert "requeue left to the batch script" in log, log[-3000:]
        assert f"asked the batch script to requeue the job ({root}/.dpmot-requeue-{job})" in log, log[-3000:]
        assert f"requeueing job {job} from the host" in log, log[-3000:]
        assert not (root / f".dpmot-requeue-{job}").exists()
    assert "start 2 (restarts so far: 1)" in log, log[-3000:]
    assert f"Restoring states from the checkpoint path at {root}" in log, log[-3000:]
    # one log directory for both starts of the job
    assert [p.name for p in (root / "runs" / "slurm").iterdir()] == [f"job-{job}"]
    whole, preempted = final_state(whole_root), final_state(root)
    assert preempted["global_step"] == STEPS and whole.keys() == preempted.keys()
    assert sum(isinstance(v, torch.Tensor) for v in whole.values()) >= 2  # weights and optimizer state compared
    different = [k for k in whole if not same(whole[k], preempted[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:5]}"
    if mode == "semidiscrete":
        return
    # and the steps after the restart trained on the same assignment as the uninterrupted job
    for step in range(STALL_AT + 1, STEPS):
        for a, b in zip(records(root, step), records(whole_root, step), strict=True):
            assert torch.equal(a["used"], b["used"]) and torch.equal(a["x"], b["x"])
