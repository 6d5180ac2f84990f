"""torchrun and the DeepSpeed launcher: ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` plus ``MASTER_ADDR``/``MASTER_PORT``."""

from __future__ import annotations

from collections.abc import Mapping

from ...errors import ConfigError
from .common import DEFAULT_PORT, DistEnv, check_ranks, read_addr, read_int, read_port, require


def read_torch(environ: Mapping[str, str]) -> DistEnv:
    """torchrun and the DeepSpeed launcher: ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` plus ``MASTER_ADDR``/``PORT``."""
    rank = read_int(environ, "RANK")
    world = read_int(environ, "WORLD_SIZE", minimum=1)
    both = "(torchrun and the DeepSpeed launcher set both)"
    world = require(world, "WORLD_SIZE", f"RANK={environ.get('RANK')} is set {both}")
    rank = require(rank, "RANK", f"WORLD_SIZE={world} is set {both}")
    # The DeepSpeed launcher calls the per-node count LOCAL_SIZE; without either, assume one node.
    local_world_name = "LOCAL_WORLD_SIZE" if "LOCAL_WORLD_SIZE" in environ else "LOCAL_SIZE"
    local_world = read_int(environ, local_world_name, minimum=1)
    if local_world is None:
        local_world_name, local_world = "WORLD_SIZE", world
    local_rank = read_int(environ, "LOCAL_RANK")
    if local_rank is None:
        local_rank = rank % local_world
    check_ranks(rank, world, local_rank, local_world, ("RANK", "WORLD_SIZE", "LOCAL_RANK", local_world_name))
    addr = read_addr(environ)
    port = read_port(environ, None)
    if world > 1:
        why = f"WORLD_SIZE={world} needs the rank-0 rendezvous address (torchrun and the DeepSpeed launcher set it)"
        if addr is None:
            raise ConfigError("MASTER_ADDR", None, f"a host name or IP address; it is unset but {why}")
        if port is None:
            raise ConfigError("MASTER_PORT", None, f"a TCP port; it is unset but {why}")
    launcher = "deepspeed" if "CROSS_RANK" in environ or "LOCAL_SIZE" in environ else "torchrun"
    return DistEnv(rank, world, local_rank, local_world, addr or "127.0.0.1", port or DEFAULT_PORT, launcher)
