#!/usr/bin/env bash
# Launch dynmoe_dist training with torchrun (torch.distributed.run): static rendezvous, or elastic with NNODES=MIN:MAX.
#
# Usage:
#   launch/torchrun.sh [hydra overrides...]                                  # one node, all local GPUs (2 on CPU)
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node1 launch/torchrun.sh model=small   # on node1
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node1 launch/torchrun.sh model=small   # on node2
#   NNODES=1:2 MASTER_ADDR=node1 RDZV_ID=job42 launch/torchrun.sh model=small   # elastic: on each node, 1 to 2 nodes
#
# A worker that dies (a crash, a SIGKILL, a lost GPU) makes torchrun stop the others and start them all again, up to
# MAX_RESTARTS times; the application resumes from the run's latest checkpoint (resume=auto, the default). With
# NNODES=MIN:MAX the nodes meet in a c10d rendezvous at MASTER_ADDR:MASTER_PORT instead: the run goes on as long as
# MIN nodes are left, on the world they make (experts re-placed from the checkpoint), and grows again at the next
# restart when a node comes back. docs/LAUNCH.md has what elastic runs need on a cluster.
#
# Environment (defaults in brackets):
#   NNODES          number of nodes, run this script once on each [1]; MIN:MAX (e.g. 1:4) for an elastic run
#   NODE_RANK       this node's index in [0, NNODES) [0]; not used by elastic runs (ranks follow the rendezvous)
#   NPROC_PER_NODE  processes on this node [number of GPUs, or 2 without GPUs]
#   MASTER_ADDR     address of the NODE_RANK=0 node (elastic: the rendezvous host), reachable from every node
#                   [127.0.0.1]
#   MASTER_PORT     rendezvous port on MASTER_ADDR [29500]
#   MAX_RESTARTS    worker-group restarts before the job fails; 0 stops at the first failure [3]
#   RDZV_ID         elastic runs: the job's id, the same on every node [SLURM_JOB_ID, else dynmoe]
#   RDZV_CONF       elastic runs: rendezvous settings (seconds) [join_timeout=600,last_call_timeout=5,close_timeout=30]
#   PYTHON          Python interpreter with dynmoe_dist installed [python]
#   MODULE          Python module to run with -m [dynmoe_dist.train]
set -euo pipefail

MODULE="${MODULE:-dynmoe_dist.train}"

PYTHON="${PYTHON:-python}"
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
MAX_RESTARTS="${MAX_RESTARTS:-3}"
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
        NPROC_PER_NODE="$(nvidia-smi -L | grep -c '^GPU')"
    else
        NPROC_PER_NODE=2
    fi
fi
if ! [[ "${MAX_RESTARTS}" =~ ^[0-9]+$ ]]; then
    echo "torchrun.sh: MAX_RESTARTS=${MAX_RESTARTS} must be a number >= 0" >&2
    exit 2
fi

if [[ "${NNODES}" == *:* ]]; then
    # Elastic: c10d rendezvous hosted by the agent on MASTER_ADDR (keep that node up: its store is the rendezvous).
    if ! [[ "${NNODES}" =~ ^[0-9]+:[0-9]+$ ]]; then
        echo "torchrun.sh: NNODES=${NNODES} must be a number or MIN:MAX (e.g. 1:4)" >&2
        exit 2
    fi
    if [[ "${NNODES#*:}" -gt 1 && "${MASTER_ADDR}" == "127.0.0.1" ]]; then
        echo "torchrun.sh: NNODES=${NNODES} needs MASTER_ADDR set to the rendezvous host's address" >&2
        exit 2
    fi
    # Each rendezvous round gives the workers a store of its own (hosted by the new rank 0) rather than the agent's,
    # whose keys outlive the round: a world that changed size must not read the last world's addresses.
    export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
    exec "${PYTHON}" -m torch.distributed.run \
        --nnodes "${NNODES}" \
        --nproc-per-node "${NPROC_PER_NODE}" \
        --rdzv-backend c10d \
        --rdzv-endpoint "${MASTER_ADDR}:${MASTER_PORT}" \
        --rdzv-id "${RDZV_ID:-${SLURM_JOB_ID:-dynmoe}}" \
        --rdzv-conf "${RDZV_CONF:-join_timeout=600,last_call_timeout=5,close_timeout=30}" \
        --max-restarts "${MAX_RESTARTS}" \
        -m "${MODULE}" "$@"
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
    --max-restarts "${MAX_RESTARTS}" \
    -m "${MODULE}" "$@"
