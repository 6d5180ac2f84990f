#!/usr/bin/env bash
# Launch dynmoe_dist training with torchrun (torch.distributed.run), static rendezvous.
#
# Usage:
#   launch/torchrun.sh [hydra overrides...]                                  # one node, all local GPUs (2 on CPU)
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node1 launch/torchrun.sh model=small   # on node1
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node1 launch/torchrun.sh model=small   # on node2
#
# Environment (defaults in brackets):
#   NNODES          number of nodes; run this script once on each [1]
#   NODE_RANK       this node's index in [0, NNODES) [0]
#   NPROC_PER_NODE  processes on this node [number of GPUs, or 2 without GPUs]
#   MASTER_ADDR     address of the NODE_RANK=0 node, reachable from every node [127.0.0.1]
#   MASTER_PORT     rendezvous port on MASTER_ADDR [29500]
#   PYTHON          Python interpreter with dynmoe_dist installed [python]
#   MODULE          Python module to run with -m [dynmoe_dist.train]
set -euo pipefail

MODULE="${MODULE:-dynmoe_dist.train}"

PYTHON="${PYTHON:-python}"
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
        NPROC_PER_NODE="$(nvidia-smi -L | grep -c '^GPU')"
    else
        NPROC_PER_NODE=2
    fi
fi
if [[ "${NNODES}" -gt 1 && "${MASTER_ADDR}" == "127.0.0.1" ]]; then
    echo "torchrun.sh: NNODES=${NNODES} needs MASTER_ADDR set to the NODE_RANK=0 node's address" >&2
    exit 2
fi

exec "${PYTHON}" -m torch.distributed.run \
    --nnodes "${NNODES}" \
    --node_rank "${NODE_RANK}" \
    --nproc_per_node "${NPROC_PER_NODE}" \
    --master_addr "${MASTER_ADDR}" \
    --master_port "${MASTER_PORT}" \
    -m "${MODULE}" "$@"
