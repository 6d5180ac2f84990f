"""Open MPI and MPICH (Hydra) variables; whatever they lack (and rank 0's host name) comes from mpi4py."""

from __future__ import annotations

import functools
import socket
from collections.abc import Mapping

from ...errors import DynMoEError
from .common import DEFAULT_PORT, DistEnv, check_ranks, read_addr, read_int, read_port

MPI_MARKERS = (
    "OMPI_COMM_WORLD_RANK",
    "OMPI_COMM_WORLD_SIZE",
    "OMPI_COMM_WORLD_LOCAL_RANK",
    "PMI_RANK",
    "PMI_SIZE",
    "PMI_FD",
    "PMI_PORT",
    "PMIX_RANK",
    "MPI_LOCALRANKID",
    "HYDI_CONTROL_FD",
)


def read_mpi(environ: Mapping[str, str]) -> DistEnv:
    """Open MPI or MPICH/Hydra variables; whatever they lack (and the master address) comes from mpi4py."""
    if "OMPI_COMM_WORLD_RANK" in environ or "OMPI_COMM_WORLD_SIZE" in environ:
        launcher = "openmpi"
        names = tuple(f"OMPI_COMM_WORLD_{part}" for part in ("RANK", "SIZE", "LOCAL_RANK", "LOCAL_SIZE"))
    elif "PMI_RANK" in environ or "PMI_SIZE" in environ:
        launcher = "mpich"
        names = ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS")
    else:  # an MPI launch without rank variables (PMI-2, PMIx): only the library knows
        launcher = "mpi4py"
        names = ("MPI rank", "MPI size", "MPI local rank", "MPI local size")
    known = launcher != "mpi4py"
    minimums = (0, 1, 0, 1)  # sizes are at least 1
    values = [read_int(environ, name, low) if known else None for name, low in zip(names, minimums)]
    addr = read_addr(environ)
    if None in values or (addr is None and (values[1] is None or values[1] > 1)):
        queried = _mpi4py_query()
        values = [value if value is not None else asked for value, asked in zip(values, queried[:4])]
        addr = addr or queried[4]
    rank, world, local_rank, local_world = (int(value) for value in values)
    check_ranks(rank, world, local_rank, local_world, names)
    port = read_port(environ, DEFAULT_PORT)
    assert port is not None
    return DistEnv(rank, world, local_rank, local_world, addr or "127.0.0.1", port, launcher)


@functools.lru_cache(maxsize=1)
def _mpi4py_query() -> tuple[int, int, int, int, str]:
    """(rank, world size, local rank, local world size, rank 0's host name) from the MPI library itself.

    Cached because the host-name broadcast is a collective: every rank must make the same calls, so a second
    ``detect_env`` must not broadcast again.
    """
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise DynMoEError(
            "an MPI launcher started this process but its rank variables (OMPI_COMM_WORLD_RANK or PMI_RANK, "
            "local rank, local size) or MASTER_ADDR are missing, and mpi4py is not installed to ask MPI directly: "
            "install mpi4py or export MASTER_ADDR and the rank variables"
        ) from exc
    comm = MPI.COMM_WORLD
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        master = comm.bcast(socket.gethostname() if comm.Get_rank() == 0 else None, root=0)
        return comm.Get_rank(), comm.Get_size(), node.Get_rank(), node.Get_size(), master
    finally:
        node.Free()
