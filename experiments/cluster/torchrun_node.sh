#!/bin/bash
# Multi-node training without SLURM: run this on every node (same command, its own DPMOT_NODE_RANK).
#   DPMOT_NNODES=2 DPMOT_NODE_RANK=0 DPMOT_MASTER_ADDR=10.0.0.1 DPMOT_NPROC=8 \
#       bash experiments/cluster/torchrun_node.sh --config configs/edm/cifar10_ddpmpp.yaml
# Elastic (nodes may join late or be replaced; c10d rendezvous on the first node): DPMOT_NNODES=1:2 DPMOT_ELASTIC=1.
# Lightning needs num_nodes = nnodes and devices = nproc_per_node; this script passes both. In a container:
#   docker run --gpus all --network host --ipc=host --entrypoint torchrun dpmot <the same torchrun arguments>
set -euo pipefail
nnodes="${DPMOT_NNODES:?number of nodes, e.g. 2 (elastic: 1:2)}"
nproc="${DPMOT_NPROC:-1}"
addr="${DPMOT_MASTER_ADDR:?address of node 0}"
port="${DPMOT_MASTER_PORT:-29500}"
if [ "${DPMOT_ELASTIC:-0}" = "1" ]; then
    rdzv=(--nnodes="$nnodes" --rdzv_backend=c10d --rdzv_endpoint="$addr:$port" --rdzv_id="${DPMOT_RUN_ID:-dpmot}")
    num_nodes="${nnodes##*:}"
else
    rdzv=(--nnodes="$nnodes" --node_rank="${DPMOT_NODE_RANK:?the rank of this node}" --master_addr="$addr" --master_port="$port")
    num_nodes="$nnodes"
fi
exec torchrun "${rdzv[@]}" --nproc_per_node="$nproc" -m lightning_dpmot fit "$@" \
    --trainer.num_nodes="$num_nodes" --trainer.devices="$nproc" --trainer.strategy=ddp
