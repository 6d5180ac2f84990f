#!/usr/bin/env bash
# Launch dynmoe_dist training with the DeepSpeed launcher.
#
# Usage:
#   launch/deepspeed.sh [hydra overrides...]                                   # this host: all GPUs (2 ranks on CPU)
#   HOSTFILE=hosts NUM_NODES=2 launch/deepspeed.sh model=small steps=1000      # pdsh/ssh to every host
#   HOSTFILE=hosts NODE_RANK=0 MASTER_ADDR=node1 launch/deepspeed.sh ...      # no ssh: run once on each node,
#   HOSTFILE=hosts NODE_RANK=1 MASTER_ADDR=node1 launch/deepspeed.sh ...      # NODE_RANK 0 on MASTER_ADDR's host
#
# Environment (defaults in brackets):
#   HOSTFILE        DeepSpeed hostfile ("node1 slots=8" lines) for multi-node runs; unset: this host only [unset]
#   NUM_NODES       nodes to use from the hostfile [all of them with HOSTFILE, else 1]
#   NODE_RANK       set: this node's index, and the launcher starts only this node's ranks (--no_ssh) [unset]
#   NPROC_PER_NODE  processes per node: GPUs on a CUDA host, CPU ranks on a CPU host [all GPUs, or 2 on CPU]
#   ACCELERATOR     cuda | cpu | auto (auto: cuda when nvidia-smi lists a GPU) [auto]
#   MASTER_ADDR     rank-0 address; needed with NODE_RANK; unset: DeepSpeed asks the first host over ssh [unset]
#   MASTER_PORT     rendezvous port [29500]
#   DEEPSPEED       the deepspeed launcher command [deepspeed]
#   LAUNCHER_ARGS   extra arguments for the deepspeed launcher, split on spaces [empty]
#   MODULE          Python module to run with -m [dynmoe_dist.train]
#
# A hostfile that names only this machine (localhost) needs no ssh: the ssh check is skipped and the master is
# 127.0.0.1. Multi-node: variables named in a .deepspeed_env file (in the working directory or home) are exported to
# the other nodes; DeepSpeed also forwards NCCL_*, PYTHON* and UCX_* variables by itself.
set -euo pipefail

MODULE="${MODULE:-dynmoe_dist.train}"

HOSTFILE="${HOSTFILE:-}"
NODE_RANK="${NODE_RANK:-}"
ACCELERATOR="${ACCELERATOR:-auto}"
MASTER_ADDR="${MASTER_ADDR:-}"
MASTER_PORT="${MASTER_PORT:-29500}"
DEEPSPEED="${DEEPSPEED:-deepspeed}"
read -r -a launcher_args <<<"${LAUNCHER_ARGS:-}"

fail() { echo "deepspeed.sh: $*" >&2; exit 2; }

if [[ "${ACCELERATOR}" == "auto" ]]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
        ACCELERATOR=cuda
    else
        ACCELERATOR=cpu
    fi
fi
case "${ACCELERATOR}" in
    cuda) NPROC_PER_NODE="${NPROC_PER_NODE:-$(nvidia-smi -L | grep -c '^GPU')}"; count_flag=--num_gpus ;;
    cpu) NPROC_PER_NODE="${NPROC_PER_NODE:-2}"; export DS_ACCELERATOR=cpu; count_flag=--num_accelerators ;;
    *) fail "ACCELERATOR=${ACCELERATOR}: expected cuda, cpu or auto" ;;
esac

args=(--master_port "${MASTER_PORT}" "${count_flag}" "${NPROC_PER_NODE}")
if [[ -n "${HOSTFILE}" ]]; then
    [[ -r "${HOSTFILE}" ]] || fail "HOSTFILE=${HOSTFILE} is not a readable file"
    # "host slots=N" lines, comments and blank lines skipped
    mapfile -t hosts < <(sed -e 's/#.*//' "${HOSTFILE}" | awk 'NF {print $1}')
    mapfile -t slots < <(sed -e 's/#.*//' "${HOSTFILE}" | awk 'NF {n = 0; for (i = 2; i <= NF; i++) if ($i ~ /^slots=/) n = substr($i, 7); print n}')
    [[ "${#hosts[@]}" -gt 0 ]] || fail "HOSTFILE=${HOSTFILE} lists no host ('node1 slots=8' lines)"
    NUM_NODES="${NUM_NODES:-${#hosts[@]}}"
    [[ "${NUM_NODES}" -le "${#hosts[@]}" ]] || fail "NUM_NODES=${NUM_NODES} but HOSTFILE lists ${#hosts[@]} hosts"
    for ((i = 0; i < NUM_NODES; i++)); do
        if [[ "${slots[$i]}" -lt "${NPROC_PER_NODE}" ]]; then
            fail "NPROC_PER_NODE=${NPROC_PER_NODE} ranks per node, but HOSTFILE gives ${hosts[$i]} only ${slots[$i]} slots; lower NPROC_PER_NODE or raise slots= in ${HOSTFILE}"
        fi
    done
    args+=(--hostfile "${HOSTFILE}" --num_nodes "${NUM_NODES}")
    if [[ "${#hosts[@]}" -eq 1 && "${hosts[0]}" =~ ^(localhost|127\.0\.0\.1)$ ]]; then
        args+=(--no_ssh_check)  # this machine only: nothing to reach over ssh
        MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
    fi
else
    NUM_NODES="${NUM_NODES:-1}"
    [[ "${NUM_NODES}" -eq 1 ]] || fail "NUM_NODES=${NUM_NODES} needs HOSTFILE listing the nodes ('node1 slots=8' lines)"
fi
if [[ -n "${NODE_RANK}" ]]; then
    [[ -n "${HOSTFILE}" ]] || fail "NODE_RANK=${NODE_RANK} (one launcher per node, no ssh) needs HOSTFILE listing every node"
    [[ -n "${MASTER_ADDR}" ]] || fail "NODE_RANK=${NODE_RANK} needs MASTER_ADDR set to the NODE_RANK=0 node's address"
    args+=(--no_ssh --node_rank "${NODE_RANK}")
fi
if [[ -n "${MASTER_ADDR}" ]]; then
    args+=(--master_addr "${MASTER_ADDR}")
fi

# --no_local_rank: the entry point reads LOCAL_RANK from the environment (dynmoe_dist.parallel.bootstrap), and a
# --local_rank=N argument would reach Hydra as an unknown override.
exec "${DEEPSPEED}" "${args[@]}" "${launcher_args[@]}" --no_local_rank --module "${MODULE}" "$@"
