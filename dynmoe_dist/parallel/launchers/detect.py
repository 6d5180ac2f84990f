"""Which launcher started this process, and where it sits in the job: one ``DistEnv`` from any launcher's variables.

Launchers are tried in this order: torchrun / DeepSpeed, Slurm, Open MPI, MPICH; nothing set means one process.
Launchers can nest (torchrun inside an ``srun`` task, ``mpirun`` inside an ``sbatch`` script), so the variables of an
outer launcher may be present too. When two launchers report the same world size but different ranks, that is an
error: the outer ones are stale, and ``DYNMOE_LAUNCHER`` (one of ``LAUNCHERS``) names the launcher to trust.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from ...errors import ConfigError
from .common import DEFAULT_PORT, DistEnv, read_addr, read_port
from .mpi import MPI_MARKERS, read_mpi
from .slurm import read_slurm
from .torchrun import read_torch

LAUNCHERS = ("torchrun", "deepspeed", "slurm", "openmpi", "mpich", "mpi4py", "single")
_FAMILY = {
    "torchrun": "torch",
    "deepspeed": "torch",
    "slurm": "slurm",
    "openmpi": "mpi",
    "mpich": "mpi",
    "mpi4py": "mpi",
    "single": "single",
}
# Variables whose presence means an MPI launcher started us, even when the rank/size variables are missing (PMI-2,
# PMIx-only launches); then mpi4py asks the MPI library directly.


def read_single(environ: Mapping[str, str]) -> DistEnv:
    """No launcher: one process, rendezvous on this host."""
    port = read_port(environ, DEFAULT_PORT)
    assert port is not None
    return DistEnv(0, 1, 0, 1, read_addr(environ) or "127.0.0.1", port, "single")


READERS = {"torch": read_torch, "slurm": read_slurm, "mpi": read_mpi, "single": read_single}


def _present(environ: Mapping[str, str]) -> list[str]:
    """Launcher families whose variables are set, in priority order."""
    found = []
    if "RANK" in environ or "WORLD_SIZE" in environ:
        found.append("torch")
    if "SLURM_PROCID" in environ:
        found.append("slurm")
    if any(name in environ for name in MPI_MARKERS):
        found.append("mpi")
    return found


def _claim(environ: Mapping[str, str], family: str) -> tuple[int, int, str, str] | None:
    """(rank, world, rank variable, world variable) that ``family`` claims, if its variables are plain integers."""
    pairs = {
        "torch": [("RANK", "WORLD_SIZE")],
        "slurm": [("SLURM_PROCID", "SLURM_NTASKS")],
        "mpi": [("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"), ("PMI_RANK", "PMI_SIZE")],
    }[family]
    for rank_name, world_name in pairs:
        rank, world = environ.get(rank_name, ""), environ.get(world_name, "")
        if rank.strip().isdigit() and world.strip().isdigit():
            return int(rank), int(world), rank_name, world_name
    return None


def detect_env(environ: Mapping[str, str] = os.environ) -> DistEnv:
    """Read this process's place in the job from the launcher's environment variables.

    Raises ``ConfigError`` naming the variable when the environment is inconsistent: carrying on with a wrong rank or
    world size would hang at the first collective or silently train on the wrong data shard instead of failing.
    """
    forced = environ.get("DYNMOE_LAUNCHER")
    if forced is not None:
        if forced not in LAUNCHERS:
            raise ConfigError("DYNMOE_LAUNCHER", forced, f"one of {', '.join(LAUNCHERS)}")
        return READERS[_FAMILY[forced]](environ)
    present = _present(environ)
    if not present:
        return read_single(environ)
    env = READERS[present[0]](environ)
    # Outer launchers of a nested launch describe a different world size; the same size with another rank means the
    # two launchers disagree about who this process is.
    mine = _claim(environ, present[0])
    for other in present[1:]:
        theirs = _claim(environ, other)
        if mine is None or theirs is None or mine[1] != theirs[1] or mine[0] == theirs[0]:
            continue
        raise ConfigError(
            mine[2],
            mine[0],
            f"equal to {theirs[2]}={theirs[0]}: both launchers report world size {mine[1]} "
            f"({mine[3]}, {theirs[3]}) but disagree on the rank; unset the stale launcher's variables or set "
            f"DYNMOE_LAUNCHER to the launcher that started this process",
        )
    return env
