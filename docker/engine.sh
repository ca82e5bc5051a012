#!/usr/bin/env bash
# A private Docker engine for the CI cluster stage (and for machines without a running dockerd).
#   source docker/engine.sh; docker_engine_start <state dir>; ...; docker_engine_stop
# No bridge network and no iptables (the CI machine allows neither); containers use --network none or host.
# Exports DOCKER_HOST so that the docker CLI, tests and scripts talk to this engine only.

docker_engine_install() {
    command -v dockerd >/dev/null && command -v docker >/dev/null && return 0
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io >/dev/null
}

docker_engine_start() {
    local state="$1"
    mkdir -p "$state"
    state="$(cd "$state" && pwd)"
    export DPMOT_DOCKER_STATE="$state"
    export DOCKER_HOST="unix://$state/docker.sock"
    dockerd --data-root "$state/data" --exec-root "$state/exec" -H "$DOCKER_HOST" -p "$state/dockerd.pid" \
        --bridge=none --iptables=false >"$state/dockerd.log" 2>&1 &
    local i
    for i in $(seq 60); do
        docker version >/dev/null 2>&1 && return 0
        sleep 1
    done
    echo "docker_engine_start: dockerd did not answer in 60 s; log: $state/dockerd.log" >&2
    tail -n 20 "$state/dockerd.log" >&2 || true
    return 1
}

docker_engine_stop() {
    local state="${DPMOT_DOCKER_STATE:-}" pid
    [ -n "$state" ] && [ -s "$state/dockerd.pid" ] || return 0
    docker ps -q 2>/dev/null | xargs -r docker kill >/dev/null 2>&1 || true
    pid="$(cat "$state/dockerd.pid")"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -9 "$pid" 2>/dev/null || true
}
