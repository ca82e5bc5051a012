#!/usr/bin/env bash
# CI cluster stage: a real two-node SLURM cluster, torchrun nodes and a Docker engine on this (2-core, root) machine,
# then `pytest -m cluster` with DPMOT_REQUIRE_CLUSTER=1 (a missing service fails instead of skipping).
# Run from .ci/run with the project's venv active. Every daemon started here is stopped by PID on exit (trap).
# Recipes: ../shared/notes/cluster.md; what each test proves: tests/cluster/*.py; README "Cluster".
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ]; then
    . .venv/bin/activate  # the README test command's venv
fi
export WANDB_MODE=disabled HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 DPMOT_REQUIRE_CLUSTER=1
image="${DPMOT_DOCKER_IMAGE:-local/dpmot:cpu}"
export DPMOT_DOCKER_IMAGE="$image"
state="$(mktemp -d /tmp/dpmot-cluster.XXXXXX)"
if [ "$(id -u)" -ne 0 ]; then
    echo "cluster stage: needs root (apt-get, slurmd, dockerd); running as $(id -un)" >&2
    exit 1
fi

# shellcheck source=/dev/null
source .ci/cluster/slurm.sh
# shellcheck source=/dev/null
source docker/engine.sh
build_pid=""
cleanup() {
    [ -n "$build_pid" ] && kill "$build_pid" 2>/dev/null
    slurm_stop
    docker_engine_stop
}
trap cleanup EXIT

stamp() { echo "[cluster stage $(date +%T)] $*"; }
stamp "installing slurm, munge, docker.io, debootstrap"
apt-get update -qq >/dev/null
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge docker.io debootstrap \
    >/dev/null
slurm_start "$state/slurm"
docker_engine_start "$state/docker"
stamp "slurm and dockerd up; building $image in the background (log: $state/build.log)"
bash docker/build_cpu_image.sh "$image" >"$state/build.log" 2>&1 &
build_pid=$!

stamp "SLURM and torchrun tests"
python -m pytest -m cluster -p no:cacheprovider tests/cluster/test_slurm.py tests/cluster/test_torchrun.py

stamp "waiting for the image build"
if ! wait "$build_pid"; then
    build_pid=""
    tail -n 40 "$state/build.log" >&2
    echo "cluster stage: docker/build_cpu_image.sh failed (log above)" >&2
    exit 1
fi
build_pid=""
tail -n 3 "$state/build.log"
stamp "Docker tests"
python -m pytest -m cluster -p no:cacheprovider tests/cluster/test_docker.py
stamp "done"
