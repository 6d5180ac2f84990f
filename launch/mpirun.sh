#!/usr/bin/env bash
# Launch dynmoe_dist training with mpirun: Open MPI or MPICH (Hydra), detected from `mpirun --version`.
#
# Usage:
#   launch/mpirun.sh [hydra overrides...]
#   NP=16 HOSTFILE=hosts launch/mpirun.sh model=small
#   NP=4 OVERSUBSCRIBE=1 launch/mpirun.sh steps=10      # more ranks than cores (Open MPI refuses otherwise)
#
# Environment (defaults in brackets):
#   NP              total number of processes [2]
#   HOSTFILE        MPI hostfile (Open MPI: "node1 slots=8"; MPICH: "node1:8"); unset: this host only [unset]
#   OVERSUBSCRIBE   1: allow more ranks than slots (Open MPI --oversubscribe; MPICH always allows it) [0]
#   MASTER_ADDR     rank-0 address for torch.distributed; unset: rank 0's host name, found through mpi4py [unset]
#   MASTER_PORT     rendezvous port [29500]
#   MPIRUN          the mpirun command [mpirun]
#   PYTHON          Python interpreter with dynmoe_dist installed [python]
#   MPI_EXTRA_ARGS  extra mpirun arguments, split on spaces [empty]
#   MODULE          Python module to run with -m [dynmoe_dist.train]
#
# Open MPI passes only the variables named with -x to remote ranks: this script forwards the rendezvous variables,
# PATH, PYTHONPATH, LD_LIBRARY_PATH and every NCCL_*, UCX_*, OMP_*, CUDA_* and WANDB_* variable that is set.
# DYNMOE_LAUNCHER is set to the MPI flavour so stale Slurm variables (mpirun inside sbatch) are not consulted.
set -euo pipefail

MODULE="${MODULE:-dynmoe_dist.train}"

NP="${NP:-2}"
HOSTFILE="${HOSTFILE:-}"
OVERSUBSCRIBE="${OVERSUBSCRIBE:-0}"
MPIRUN="${MPIRUN:-mpirun}"
PYTHON="${PYTHON:-python}"
export MASTER_PORT="${MASTER_PORT:-29500}"
read -r -a extra_args <<<"${MPI_EXTRA_ARGS:-}"

if [[ -n "${HOSTFILE}" && ! -r "${HOSTFILE}" ]]; then
    echo "mpirun.sh: HOSTFILE=${HOSTFILE} is not a readable file" >&2
    exit 2
fi

if "${MPIRUN}" --version 2>&1 | grep -q 'Open MPI'; then
    export DYNMOE_LAUNCHER="${DYNMOE_LAUNCHER:-openmpi}"
    # --bind-to none: Open MPI binds each rank to one core by default, which starves PyTorch's intra-op threads.
    args=(-np "${NP}" --bind-to none)
    if [[ "$(id -u)" -eq 0 ]]; then
        args+=(--allow-run-as-root)  # containers often run as root; Open MPI refuses root without it
    fi
    if [[ "${OVERSUBSCRIBE}" == "1" ]]; then
        args+=(--oversubscribe)
    fi
    if [[ -n "${HOSTFILE}" ]]; then
        args+=(--hostfile "${HOSTFILE}")
    fi
    for name in MASTER_ADDR MASTER_PORT DYNMOE_LAUNCHER PATH PYTHONPATH LD_LIBRARY_PATH; do
        if [[ -n "${!name+set}" ]]; then
            args+=(-x "${name}")
        fi
    done
    while IFS= read -r name; do
        args+=(-x "${name}")
    done < <(compgen -e | grep -E '^(NCCL|UCX|OMP|CUDA|WANDB)_' || true)
else
    # MPICH / Hydra (and Intel MPI): the whole environment is forwarded by default, oversubscription is allowed.
    export DYNMOE_LAUNCHER="${DYNMOE_LAUNCHER:-mpich}"
    args=(-n "${NP}")
    if [[ -n "${HOSTFILE}" ]]; then
        args+=(-f "${HOSTFILE}")
    fi
fi

exec "${MPIRUN}" "${args[@]}" "${extra_args[@]}" "${PYTHON}" -m "${MODULE}" "$@"
