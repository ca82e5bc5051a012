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

# Where dpmot asks for a requeue it cannot do itself (no `scontrol` inside a container image): before `srun`,
#   dpmot_requeue_marker <host path> [<the same file as the container sees it>]
# exports DPMOT_REQUEUE_MARKER; after SIGUSR1 and last.ckpt, dpmot's rank 0 writes that file.
dpmot_requeue_marker() {
    DPMOT_HOST_REQUEUE_MARKER="$1"
    export DPMOT_REQUEUE_MARKER="${2:-$1}"
    rm -f "$DPMOT_HOST_REQUEUE_MARKER"
}

# After `srun` returns: requeue from the host when dpmot asked for it (the marker file), else exit with srun's status
# (138 = 128 + SIGUSR1 after a checkpoint and a requeue dpmot did itself; SLURM is restarting the job anyway).
dpmot_requeue_if_interrupted() {
    local rc="$1" job="${SLURM_JOB_ID:-}"
    if [ -n "${SLURM_ARRAY_JOB_ID:-}" ]; then
        job="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
    fi
    if [ -n "${DPMOT_HOST_REQUEUE_MARKER:-}" ] && [ -e "$DPMOT_HOST_REQUEUE_MARKER" ]; then
        rm -f "$DPMOT_HOST_REQUEUE_MARKER"
        echo "[$(date -Is)] dpmot checkpointed after SIGUSR1 (srun status $rc): requeueing job $job from the host"
        scontrol requeue "$job" && exit 0
        echo "[$(date -Is)] scontrol requeue $job failed" >&2
    fi
    echo "[$(date -Is)] srun exited with status $rc"
    exit "$rc"
}
