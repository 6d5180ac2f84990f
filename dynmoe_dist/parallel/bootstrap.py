"""Find out who this process is in a distributed launch, and start ``torch.distributed`` from it.

Every launcher announces rank and world size differently (torchrun and the DeepSpeed launcher: ``RANK``; Slurm:
``SLURM_PROCID``; Open MPI: ``OMPI_COMM_WORLD_RANK``; MPICH/Hydra and Intel MPI: ``PMI_RANK``). ``detect_env`` reads
them into one ``DistEnv`` and refuses inconsistent environments with an error naming the variable, because a wrong
rank or world size otherwise shows up as a silent hang at the first collective. ``init_distributed`` turns a
``DistEnv`` into a process group; ``shutdown`` tears it down cleanly.

Launchers are tried in this order: torchrun / DeepSpeed, Slurm, Open MPI, MPICH; nothing set means one process.
Launchers can nest (torchrun inside an ``srun`` task, ``mpirun`` inside an ``sbatch`` script), so the variables of an
outer launcher may be present too. When two launchers report the same world size but different ranks, that is an
error: the outer ones are stale, and ``DYNMOE_LAUNCHER`` (one of ``LAUNCHERS``) names the launcher to trust.
"""

from __future__ import annotations

import datetime
import functools
import itertools
import math
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, replace

from dynmoe_dist.errors import ConfigError, DynMoEError

__all__ = [
    "DEFAULT_PORT",
    "LAUNCHERS",
    "DistEnv",
    "detect_env",
    "expand_hostlist",
    "expand_tasks_per_node",
    "init_distributed",
    "shutdown",
    "slurm_port",
]

DEFAULT_PORT = 29500
SLURM_PORT_BASE = 20000
SLURM_PORT_SPAN = 10000
BACKENDS = ("nccl", "gloo")
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
_MPI_MARKERS = (
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


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job: global and per-node position, rendezvous address, and who launched it."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str

    @property
    def is_distributed(self) -> bool:
        """True when there is more than one process, i.e. collectives actually communicate."""
        return self.world_size > 1


# ---------------------------------------------------------------------------------------------------------------------
# Parsing helpers: every one names the variable it read, so the error says what to fix.


def _int(environ: Mapping[str, str], name: str, minimum: int = 0) -> int | None:
    """The integer value of ``name``, or None when unset; non-integers and values below ``minimum`` are errors."""
    raw = environ.get(name)
    if raw is None:
        return None
    try:
        value = int(raw.strip())
    except ValueError:
        raise ConfigError(name, raw, f"an integer >= {minimum}") from None
    if value < minimum:
        raise ConfigError(name, raw, f"an integer >= {minimum}")
    return value


def _require(value: int | None, name: str, why: str) -> int:
    """``value`` if it was set; otherwise an error saying why ``name`` is needed."""
    if value is None:
        raise ConfigError(name, None, f"an integer; it is unset but {why}")
    return value


def _port(environ: Mapping[str, str], default: int | None) -> int | None:
    """``MASTER_PORT`` as a TCP port number, or ``default`` when unset."""
    port = _int(environ, "MASTER_PORT", minimum=1)
    if port is None:
        return default
    if port > 65535:
        raise ConfigError("MASTER_PORT", environ["MASTER_PORT"], "a TCP port in [1, 65535]")
    return port


def _addr(environ: Mapping[str, str]) -> str | None:
    """``MASTER_ADDR`` stripped, or None when unset; an empty value is an error, not 'unset'."""
    raw = environ.get("MASTER_ADDR")
    if raw is None:
        return None
    if not raw.strip():
        raise ConfigError("MASTER_ADDR", raw, "a host name or IP address of the rank-0 node")
    return raw.strip()


def _check_ranks(rank: int, world: int, local_rank: int, local_world: int, names: tuple[str, str, str, str]) -> None:
    """Reject positions outside their range; ``names`` are the variables the four values came from."""
    rank_name, world_name, local_rank_name, local_world_name = names
    if rank >= world:
        raise ConfigError(rank_name, rank, f"an integer in [0, {world_name}={world})")
    if local_rank >= local_world:
        raise ConfigError(local_rank_name, local_rank, f"an integer in [0, {local_world_name}={local_world})")
    if local_world > world:
        raise ConfigError(local_world_name, local_world, f"at most {world_name}={world}")


# ---------------------------------------------------------------------------------------------------------------------
# Slurm's compressed lists.

_HOST_TOKEN = re.compile(r"\[([^\[\]]*)\]")


def _split_top_level(text: str, what: str) -> list[str]:
    """Split on commas (and whitespace) outside brackets; unbalanced or nested brackets are errors."""
    parts: list[str] = []
    depth = 0
    current: list[str] = []
    for char in text:
        if char == "[":
            depth += 1
            if depth > 1:
                raise ConfigError(what, text, "a Slurm host list without nested brackets, e.g. 'gpu[001-003,007]'")
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise ConfigError(what, text, "a Slurm host list with balanced brackets, e.g. 'gpu[001-003,007]'")
        if depth == 0 and (char == "," or char.isspace()):
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if depth != 0:
        raise ConfigError(what, text, "a Slurm host list with balanced brackets, e.g. 'gpu[001-003,007]'")
    parts.append("".join(current))
    return [part for part in parts if part]


def _expand_range_list(body: str, text: str, what: str) -> list[str]:
    """Expand the inside of one bracket, e.g. ``001-003,007``, keeping each range's zero padding."""
    allowed = "bracket ranges like '[001-003,007]' (digits, '-', ',')"
    out: list[str] = []
    for item in body.split(","):
        low, sep, high = item.strip().partition("-")
        if not low.isdigit() or (sep and not high.isdigit()):
            raise ConfigError(what, text, allowed)
        if not sep:
            out.append(low)
            continue
        if int(high) < int(low):
            raise ConfigError(what, text, f"ascending ranges ('{item}' runs backwards)")
        width = len(low) if low.startswith("0") else 1  # Slurm pads to the width of the lower bound
        out.extend(str(n).zfill(width) for n in range(int(low), int(high) + 1))
    return out


def expand_hostlist(text: str, what: str = "SLURM_JOB_NODELIST") -> list[str]:
    """Expand a Slurm host list such as ``gpu[001-003,007],login1`` into host names, in Slurm's order.

    Written here rather than calling ``scontrol show hostnames`` because compute tasks need not have the Slurm client
    tools on their PATH (containers). Several bracket groups in one name (``rack[1-2]-n[01-02]``) expand as a product,
    the first group varying slowest. ``what`` names the variable in error messages.
    """
    if not text or not text.strip():
        raise ConfigError(what, text, "a non-empty Slurm host list, e.g. 'gpu[001-003,007],login1'")
    hosts: list[str] = []
    for pattern in _split_top_level(text.strip(), what):
        pieces = _HOST_TOKEN.split(pattern)  # literal, range, literal, range, ..., literal
        literals, ranges = pieces[0::2], pieces[1::2]
        if any("[" in lit or "]" in lit for lit in literals):
            raise ConfigError(what, text, "a Slurm host list with balanced brackets, e.g. 'gpu[001-003,007]'")
        choices = [_expand_range_list(body, text, what) for body in ranges]
        for combo in itertools.product(*choices):
            name = literals[0] + "".join(num + lit for num, lit in zip(combo, literals[1:]))
            hosts.append(name)
    if not hosts:
        raise ConfigError(what, text, "a non-empty Slurm host list, e.g. 'gpu[001-003,007],login1'")
    return hosts


def expand_tasks_per_node(text: str, what: str = "SLURM_TASKS_PER_NODE") -> list[int]:
    """Expand Slurm's per-node task counts, e.g. ``2(x3),1`` -> ``[2, 2, 2, 1]``."""
    counts: list[int] = []
    for item in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:\(x(\d+)\))?\s*", item)
        if match is None or int(match.group(1)) < 1 or (match.group(2) is not None and int(match.group(2)) < 1):
            raise ConfigError(what, text, "per-node task counts like '8(x2),4'")
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    return counts


def slurm_port(job_id: int) -> int:
    """A port derived from the job id, so all tasks agree on it without talking and concurrent jobs rarely clash."""
    return SLURM_PORT_BASE + job_id % SLURM_PORT_SPAN


# ---------------------------------------------------------------------------------------------------------------------
# One reader per launcher family.


def _read_torch(environ: Mapping[str, str]) -> DistEnv:
    """torchrun and the DeepSpeed launcher: ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` plus ``MASTER_ADDR``/``PORT``."""
    rank = _int(environ, "RANK")
    world = _int(environ, "WORLD_SIZE", minimum=1)
    both = "(torchrun and the DeepSpeed launcher set both)"
    world = _require(world, "WORLD_SIZE", f"RANK={environ.get('RANK')} is set {both}")
    rank = _require(rank, "RANK", f"WORLD_SIZE={world} is set {both}")
    # The DeepSpeed launcher calls the per-node count LOCAL_SIZE; without either, assume one node.
    local_world_name = "LOCAL_WORLD_SIZE" if "LOCAL_WORLD_SIZE" in environ else "LOCAL_SIZE"
    local_world = _int(environ, local_world_name, minimum=1)
    if local_world is None:
        local_world_name, local_world = "WORLD_SIZE", world
    local_rank = _int(environ, "LOCAL_RANK")
    if local_rank is None:
        local_rank = rank % local_world
    _check_ranks(rank, world, local_rank, local_world, ("RANK", "WORLD_SIZE", "LOCAL_RANK", local_world_name))
    addr = _addr(environ)
    port = _port(environ, None)
    if world > 1:
        why = f"WORLD_SIZE={world} needs the rank-0 rendezvous address (torchrun and the DeepSpeed launcher set it)"
        if addr is None:
            raise ConfigError("MASTER_ADDR", None, f"a host name or IP address; it is unset but {why}")
        if port is None:
            raise ConfigError("MASTER_PORT", None, f"a TCP port; it is unset but {why}")
    launcher = "deepspeed" if "CROSS_RANK" in environ or "LOCAL_SIZE" in environ else "torchrun"
    return DistEnv(rank, world, local_rank, local_world, addr or "127.0.0.1", port or DEFAULT_PORT, launcher)


def _read_slurm(environ: Mapping[str, str]) -> DistEnv:
    """An ``srun`` task: ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``; master = first host of the node list.

    Start one process per task with ``srun``: a process started directly in the batch script may also see
    ``SLURM_PROCID=0`` with the job's task count, and would wait for peers that never come (until ``timeout_s``).
    """
    rank = _require(_int(environ, "SLURM_PROCID"), "SLURM_PROCID", "Slurm variables are present")
    world = _require(
        _int(environ, "SLURM_NTASKS", minimum=1), "SLURM_NTASKS", f"SLURM_PROCID={rank} is set (srun sets both)"
    )
    local_rank = _require(_int(environ, "SLURM_LOCALID"), "SLURM_LOCALID", f"SLURM_PROCID={rank} is set")
    local_world, local_world_name = _slurm_local_world(environ)
    names = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", local_world_name)
    _check_ranks(rank, world, local_rank, local_world, names)

    addr = _addr(environ)
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
    job_id = _int(environ, job_name)
    port = _port(environ, DEFAULT_PORT if job_id is None else slurm_port(job_id))
    assert port is not None
    return DistEnv(rank, world, local_rank, local_world, addr, port, "slurm")


def _slurm_local_world(environ: Mapping[str, str]) -> tuple[int, str]:
    """Tasks on this node: this node's entry of the per-node counts, else ``SLURM_NTASKS_PER_NODE``."""
    for name in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        if environ.get(name):
            counts = expand_tasks_per_node(environ[name], name)
            node = _int(environ, "SLURM_NODEID")
            if node is None:
                if len(set(counts)) == 1:
                    return counts[0], name
                raise ConfigError("SLURM_NODEID", None, f"an integer; it is unset but {name}={environ[name]!r} varies")
            if node >= len(counts):
                raise ConfigError("SLURM_NODEID", node, f"an integer in [0, {len(counts)}) (nodes in {name})")
            return counts[node], name
    per_node = _int(environ, "SLURM_NTASKS_PER_NODE", minimum=1)
    if per_node is None:
        raise ConfigError(
            "SLURM_TASKS_PER_NODE", None, "per-node task counts; neither it nor SLURM_NTASKS_PER_NODE is set"
        )
    return per_node, "SLURM_NTASKS_PER_NODE"


def _read_mpi(environ: Mapping[str, str]) -> DistEnv:
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
    values = [_int(environ, name, low) if known else None for name, low in zip(names, minimums)]
    addr = _addr(environ)
    if None in values or (addr is None and (values[1] is None or values[1] > 1)):
        queried = _mpi4py_query()
        values = [value if value is not None else asked for value, asked in zip(values, queried[:4])]
        addr = addr or queried[4]
    rank, world, local_rank, local_world = (int(value) for value in values)
    _check_ranks(rank, world, local_rank, local_world, names)
    port = _port(environ, DEFAULT_PORT)
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


def _read_single(environ: Mapping[str, str]) -> DistEnv:
    """No launcher: one process, rendezvous on this host."""
    port = _port(environ, DEFAULT_PORT)
    assert port is not None
    return DistEnv(0, 1, 0, 1, _addr(environ) or "127.0.0.1", port, "single")


_READERS = {"torch": _read_torch, "slurm": _read_slurm, "mpi": _read_mpi, "single": _read_single}


def _present(environ: Mapping[str, str]) -> list[str]:
    """Launcher families whose variables are set, in priority order."""
    found = []
    if "RANK" in environ or "WORLD_SIZE" in environ:
        found.append("torch")
    if "SLURM_PROCID" in environ:
        found.append("slurm")
    if any(name in environ for name in _MPI_MARKERS):
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
        return _READERS[_FAMILY[forced]](environ)
    present = _present(environ)
    if not present:
        return _read_single(environ)
    env = _READERS[present[0]](environ)
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


# ---------------------------------------------------------------------------------------------------------------------
# Process group.


def free_port() -> int:
    """A port the OS says is free now (single-process runs, tests and benchmarks that spawn their own ranks)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def init_distributed(timeout_s: float = 600.0, backend: str | None = None, env: DistEnv | None = None) -> DistEnv:
    """Start the default process group for this launch and return where this process sits in it.

    Also exports ``MASTER_ADDR``/``MASTER_PORT``/``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``LOCAL_WORLD_SIZE`` when
    missing, so libraries that read them later (DeepSpeed) agree with us. Backend: nccl with CUDA, gloo without.
    Calling it again once initialised returns the environment without re-initialising.
    """
    import torch
    import torch.distributed as dist

    if not (isinstance(timeout_s, (int, float)) and math.isfinite(timeout_s) and timeout_s > 0):
        raise ConfigError("timeout_s", timeout_s, "a finite number of seconds > 0")
    if backend is not None and backend not in BACKENDS:
        raise ConfigError("backend", backend, f"one of {', '.join(BACKENDS)} or None (nccl with CUDA, else gloo)")
    if backend == "nccl" and not torch.cuda.is_available():
        raise ConfigError("backend", backend, "gloo on a host without CUDA (nccl needs GPUs)")
    env = env if env is not None else detect_env()

    if dist.is_initialized():
        if (dist.get_rank(), dist.get_world_size()) != (env.rank, env.world_size):
            raise DynMoEError(
                f"torch.distributed is already initialised as rank {dist.get_rank()} of {dist.get_world_size()}, "
                f"but the launch environment says rank {env.rank} of {env.world_size} ({env.launcher})"
            )
        return env

    if env.world_size == 1 and "MASTER_PORT" not in os.environ:
        # Two single-process runs on one host would otherwise race for the default port.
        env = replace(env, master_port=free_port())
    exported = {
        "MASTER_ADDR": env.master_addr,
        "MASTER_PORT": str(env.master_port),
        "RANK": str(env.rank),
        "WORLD_SIZE": str(env.world_size),
        "LOCAL_RANK": str(env.local_rank),
        "LOCAL_WORLD_SIZE": str(env.local_world_size),
    }
    for name, value in exported.items():
        os.environ.setdefault(name, value)

    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        visible = torch.cuda.device_count()
        # One visible GPU means the launcher already bound a GPU per task (srun --gpus-per-task=1): use it.
        device = env.local_rank if env.local_rank < visible else 0
        if env.local_rank >= visible and visible != 1:
            raise ConfigError("LOCAL_RANK", env.local_rank, f"below the {visible} visible CUDA devices, or exactly one")
        # Before the group exists, so each rank's NCCL communicator lands on its own GPU rather than all on GPU 0.
        torch.cuda.set_device(device)
    host = f"[{env.master_addr}]" if ":" in env.master_addr else env.master_addr
    # Explicit tcp:// rather than env:// so the group follows ``env`` even if os.environ held other values.
    dist.init_process_group(
        backend=backend,
        init_method=f"tcp://{host}:{env.master_port}",
        rank=env.rank,
        world_size=env.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    return env


def shutdown() -> None:
    """Barrier, then destroy the default group: exiting with a live gloo group can abort the interpreter, and the
    barrier keeps a fast rank from tearing down while slower ones still talk to it."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    try:
        dist.barrier()
    finally:
        dist.destroy_process_group()


def init_local_rank(rank: int, world_size: int, port: int, timeout_s: float = 600.0, threads: int = 1) -> None:
    """Join a gloo group of processes spawned on this machine (tests, benchmarks): loopback, one port, a timeout."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
