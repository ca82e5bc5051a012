#!/bin/bash
# Shared by the sbatch templates (sourced inside the batch script, on the host side of any container).

# MASTER_ADDR: Lightning derives it from SLURM_NODELIST; DPMOT_MASTER_ADDR overrides it (nodes whose names do not
# resolve, e.g. the two-node CI cluster on 127.0.0.1).
if [ -n "${DPMOT_MASTER_ADDR:-}" ]; then
    export MASTER_ADDR="$DPMOT_MASTER_ADDR"
fi
export PYTHONUNBUFFERED=1

dpmot_job_banner() {
    echo "[$(date -Is)] job ${SLURM_JOB_ID:-?} on ${SLURM_JOB_NODELIST:-?}: start $(( ${SLURM_RESTART_COUNT:-0} + 1 ))" \
        "(restarts so far: ${SLURM_RESTART_COUNT:-0})"
}

# After `srun` returns: exit status 138 (128 + SIGUSR1) means dpmot saved last.ckpt after a requeue signal but could
# not requeue the job itself (no `scontrol` inside a container image): requeue it from the host. Any other status is
# the job's result.
dpmot_requeue_if_interrupted() {
    local rc="$1" job="${SLURM_JOB_ID:-}"
    if [ -n "${SLURM_ARRAY_JOB_ID:-}" ]; then
        job="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
    fi
    if [ "$rc" -eq 138 ]; then
        echo "[$(date -Is)] interrupted by SIGUSR1 after a checkpoint: requeueing job $job from the host"
        scontrol requeue "$job" && exit 0
    fi
    echo "[$(date -Is)] srun exited with status $rc"
    exit "$rc"
}
