#!/usr/bin/env bash
# Launch dynmoe_dist training with the DeepSpeed launcher.
#
# Usage:
#   launch/deepspeed.sh [hydra overrides...]
#   HOSTFILE=launch/hostfile NUM_NODES=2 NPROC_PER_NODE=8 launch/deepspeed.sh model=small steps=1000
#
# Environment (defaults in brackets):
#   HOSTFILE        DeepSpeed hostfile ("node1 slots=8" lines) for multi-node runs; unset: this host only [unset]
#   NUM_NODES       nodes to use from the hostfile [1]
#   NPROC_PER_NODE  processes per node: GPUs on a CUDA host, CPU ranks on a CPU host [all GPUs, or 2 on CPU]
#   ACCELERATOR     cuda | cpu | auto (auto: cuda when nvidia-smi lists a GPU) [auto]
#   MASTER_ADDR     rank-0 address; unset: DeepSpeed picks it (127.0.0.1, or the first hostfile host) [unset]
#   MASTER_PORT     rendezvous port [29500]
#   DEEPSPEED       the deepspeed launcher command [deepspeed]
#   LAUNCHER_ARGS   extra arguments for the deepspeed launcher, split on spaces [empty]
#   MODULE          Python module to run with -m [dynmoe_dist.train]
#
# Multi-node: variables named in a .deepspeed_env file (in the working directory or home) are exported to the
# other nodes; DeepSpeed also forwards NCCL_*, PYTHON* and UCX_* variables by itself.
set -euo pipefail

MODULE="${MODULE:-dynmoe_dist.train}"

HOSTFILE="${HOSTFILE:-}"
NUM_NODES="${NUM_NODES:-1}"
ACCELERATOR="${ACCELERATOR:-auto}"
MASTER_ADDR="${MASTER_ADDR:-}"
MASTER_PORT="${MASTER_PORT:-29500}"
DEEPSPEED="${DEEPSPEED:-deepspeed}"
read -r -a launcher_args <<<"${LAUNCHER_ARGS:-}"

if [[ "${ACCELERATOR}" == "auto" ]]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
        ACCELERATOR=cuda
    else
        ACCELERATOR=cpu
    fi
fi

args=(--num_nodes "${NUM_NODES}" --master_port "${MASTER_PORT}")
if [[ -n "${HOSTFILE}" ]]; then
    [[ -r "${HOSTFILE}" ]] || { echo "deepspeed.sh: HOSTFILE=${HOSTFILE} is not a readable file" >&2; exit 2; }
    args+=(--hostfile "${HOSTFILE}")
fi
if [[ -n "${MASTER_ADDR}" ]]; then
    args+=(--master_addr "${MASTER_ADDR}")
fi
case "${ACCELERATOR}" in
    cuda)
        NPROC_PER_NODE="${NPROC_PER_NODE:-$(nvidia-smi -L | grep -c '^GPU')}"
        args+=(--num_gpus "${NPROC_PER_NODE}")
        ;;
    cpu)
        NPROC_PER_NODE="${NPROC_PER_NODE:-2}"
        export DS_ACCELERATOR=cpu
        args+=(--num_accelerators "${NPROC_PER_NODE}")
        ;;
    *)
        echo "deepspeed.sh: ACCELERATOR=${ACCELERATOR}: expected cuda, cpu or auto" >&2
        exit 2
        ;;
esac

# --no_local_rank: the entry point reads LOCAL_RANK from the environment (dynmoe_dist.parallel.bootstrap), and a
# --local_rank=N argument would reach Hydra as an unknown override.
exec "${DEEPSPEED}" "${args[@]}" "${launcher_args[@]}" --no_local_rank --module "${MODULE}" "$@"
