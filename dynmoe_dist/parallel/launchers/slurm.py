"""Slurm: an ``srun`` task's ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``; rank 0's host: the node list's first.

Slurm compresses node lists (``gpu[001-003,007],login1``) and per-node task counts (``8(x2),4``); python-hostlist,
the library Slurm sites use, expands both. Computed here rather than with ``scontrol show hostnames`` because tasks
(containers) need not have Slurm's client tools.
"""

from __future__ import annotations

from collections.abc import Mapping

from ...errors import ConfigError
from ...extras import require_extra
from .common import DEFAULT_PORT, DistEnv, check_ranks, read_addr, read_int, read_port, require

SLURM_PORT_BASE = 20000
SLURM_PORT_SPAN = 10000


def _hostlist():
    """python-hostlist, imported when a Slurm job is read (the [slurm] extra; the core needs torch alone)."""
    require_extra("slurm", "reading a Slurm job's node list")
    import hostlist

    return hostlist


def expand_hostlist(text: str, what: str = "SLURM_JOB_NODELIST") -> list[str]:
    """``gpu[001-003,007],login1`` -> host names in Slurm's order (several bracket groups: the first varies slowest)."""
    hostlist = _hostlist()
    normalised = ",".join((text or "").split())  # whitespace separates hosts too
    try:
        hosts = hostlist.expand_hostlist(normalised)
    except hostlist.BadHostlist as exc:
        raise ConfigError(what, text, f"a Slurm host list like 'gpu[001-003,007],login1' ({exc})") from None
    if not hosts:
        raise ConfigError(what, text, "a non-empty Slurm host list, e.g. 'gpu[001-003,007],login1'")
    return hosts


def expand_tasks_per_node(text: str, what: str = "SLURM_TASKS_PER_NODE") -> list[int]:
    """Slurm's per-node task counts, e.g. ``2(x3),1`` -> ``[2, 2, 2, 1]``."""
    allowed = "per-node task counts like '8(x2),4' (each at least 1)"
    hostlist = _hostlist()
    try:
        counts = hostlist.parse_slurm_tasks_per_node(text)
    except hostlist.BadHostlist:
        raise ConfigError(what, text, allowed) from None
    if not counts or min(counts) < 1:
        raise ConfigError(what, text, allowed)
    return counts


def slurm_port(job_id: int) -> int:
    """A port derived from the job id, so all tasks agree on it without talking and concurrent jobs rarely clash."""
    return SLURM_PORT_BASE + job_id % SLURM_PORT_SPAN


def read_slurm(environ: Mapping[str, str]) -> DistEnv:
    """An ``srun`` task: ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``; master = first host of the node list.

    Start one process per task with ``srun``: a process started directly in the batch script may also see
    ``SLURM_PROCID=0`` with the job's task count, and would wait for peers that never come (until ``timeout_s``).
    """
    rank = require(read_int(environ, "SLURM_PROCID"), "SLURM_PROCID", "Slurm variables are present")
    world = require(
        read_int(environ, "SLURM_NTASKS", minimum=1), "SLURM_NTASKS", f"SLURM_PROCID={rank} is set (srun sets both)"
    )
    local_rank = require(read_int(environ, "SLURM_LOCALID"), "SLURM_LOCALID", f"SLURM_PROCID={rank} is set")
    local_world, local_world_name = _slurm_local_world(environ)
    names = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", local_world_name)
    check_ranks(rank, world, local_rank, local_world, names)

    addr = read_addr(environ)
    if addr is None:
        # The step's node list, when srun runs on a subset of the job's nodes, holds rank 0 first.
        for name in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"):
            if environ.get(name):
                addr = expand_hostlist(environ[name], name)[0]
                break
    if addr is None:
        if world > 1:
            raise ConfigError(
                "SLURM_JOB_NODELIST", None, f"a Slurm host list (or set MASTER_ADDR); both are unset with {world} tasks"
            )
        addr = "127.0.0.1"
    job_name = "SLURM_JOB_ID" if "SLURM_JOB_ID" in environ else "SLURM_JOBID"
    job_id = read_int(environ, job_name)
    port = read_port(environ, DEFAULT_PORT if job_id is None else slurm_port(job_id))
    assert port is not None
    return DistEnv(rank, world, local_rank, local_world, addr, port, "slurm")


def _slurm_local_world(environ: Mapping[str, str]) -> tuple[int, str]:
    """Tasks on this node: this node's entry of the per-node counts, else ``SLURM_NTASKS_PER_NODE``."""
    for name in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        if environ.get(name):
            counts = expand_tasks_per_node(environ[name], name)
            node = read_int(environ, "SLURM_NODEID")
            if node is None:
                if len(set(counts)) == 1:
                    return counts[0], name
                raise ConfigError("SLURM_NODEID", None, f"an integer; it is unset but {name}={environ[name]!r} varies")
            if node >= len(counts):
                raise ConfigError("SLURM_NODEID", node, f"an integer in [0, {len(counts)}) (nodes in {name})")
            return counts[node], name
    per_node = read_int(environ, "SLURM_NTASKS_PER_NODE", minimum=1)
    if per_node is None:
        raise ConfigError(
            "SLURM_TASKS_PER_NODE", None, "per-node task counts; neither it nor SLURM_NTASKS_PER_NODE is set"
        )
    return per_node, "SLURM_NTASKS_PER_NODE"
