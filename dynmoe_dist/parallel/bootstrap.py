"""Start ``torch.distributed`` for this launch: ``init_distributed`` turns the launcher's environment (read by
``launchers.detect_env``: torchrun, DeepSpeed, Slurm, Open MPI, MPICH) into a process group; ``shutdown`` tears it
down cleanly.
"""

from __future__ import annotations

import datetime
import math
import os
import socket
from dataclasses import replace

from dynmoe_dist.errors import ConfigError, DynMoEError

from .launchers import DistEnv, detect_env

__all__ = ["free_port", "init_distributed", "init_local_rank", "shutdown"]

BACKENDS = ("nccl", "gloo")


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
    store = agent_store(env, timeout_s)
    # Explicit tcp:// (or the agent's store) rather than env:// so the group follows ``env`` whatever os.environ holds.
    dist.init_process_group(
        backend=backend,
        init_method=None if store is not None else f"tcp://{host}:{env.master_port}",
        store=store,
        rank=env.rank,
        world_size=env.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    if backend == "nccl" and env.world_size > 1:
        gpu = (socket.gethostname(), str(torch.cuda.get_device_properties(device).uuid))
        check_one_gpu_per_rank(gpu, visible, timeout_s)
    return env


def agent_store(env: DistEnv, timeout_s: float):
    """Under torchrun with its agent's store (``TORCHELASTIC_USE_AGENT_STORE``), that store, keyed by restart.

    The agent keeps one store for the whole job and torch keys the process group's bootstrap by rank only, so after a
    restart (``--max-restarts``) a rank could read the address a dead rank of the previous attempt left there and fail
    to connect (or wait for it). The attempt in the keys keeps each restart to its own. None outside torchrun's agent
    store: then ``init_process_group`` makes its own (rank 0 hosts it).
    """
    import torch.distributed as dist

    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.TCPStore(
        env.master_addr,
        env.master_port,
        env.world_size,
        is_master=False,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    return dist.PrefixStore(f"dynmoe/attempt_{attempt}", store)


def shared_gpus(gpus: list[tuple[str, str]]) -> dict[tuple[str, str], list[int]]:
    """(host, GPU UUID) per rank -> the GPUs more than one rank landed on, with those ranks."""
    ranks: dict[tuple[str, str], list[int]] = {}
    for rank, gpu in enumerate(gpus):
        ranks.setdefault(gpu, []).append(rank)
    return {gpu: r for gpu, r in ranks.items() if len(r) > 1}


def check_one_gpu_per_rank(gpu: tuple[str, str], visible: int, timeout_s: float = 600.0) -> None:
    """Two ranks on one GPU make NCCL fail at its first collective with "invalid usage", naming neither the ranks nor
    the fix (e.g. 2 ranks per node on a 1-GPU host, where one visible GPU reads like a per-task binding). So the ranks
    compare their (host, GPU UUID) over a gloo side group first, and a shared one is an error that says what to
    change, on every rank alike."""
    import torch.distributed as dist

    from .collectives import guarded

    side = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))  # not torch's 30 minutes
    gpus: list = [None] * dist.get_world_size()
    guarded("bootstrap.gpus", lambda: dist.all_gather_object(gpus, gpu, side))
    dist.destroy_process_group(side)
    shared = shared_gpus(gpus)
    if shared:
        (host, uuid), ranks = next(iter(shared.items()))
        raise DynMoEError(
            f"ranks {ranks} all run on GPU {uuid} of {host} ({visible} visible there): NCCL needs one GPU per rank. "
            "Start at most one rank per GPU on each node (torchrun --nproc_per_node, deepspeed --num_gpus), give each "
            "task its own GPU (srun --gpus-per-task=1), or train on CPU (parallel.device=cpu, backend gloo)"
        )


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

    # CPU ranks by design: DeepSpeed, if a body imports it, takes its CPU accelerator even on a GPU host
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(threads)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
