"""What every launcher reader shares: the environment's shape (``DistEnv``) and parsers that name the variable.

A wrong rank or world size otherwise shows up as a silent hang at the first collective, so every value read from the
environment is checked, and an error says which variable to fix.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ...errors import ConfigError

DEFAULT_PORT = 29500


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


def read_int(environ: Mapping[str, str], name: str, minimum: int = 0) -> int | None:
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


def require(value: int | None, name: str, why: str) -> int:
    """``value`` if it was set; otherwise an error saying why ``name`` is needed."""
    if value is None:
        raise ConfigError(name, None, f"an integer; it is unset but {why}")
    return value


def read_port(environ: Mapping[str, str], default: int | None) -> int | None:
    """``MASTER_PORT`` as a TCP port number, or ``default`` when unset."""
    port = read_int(environ, "MASTER_PORT", minimum=1)
    if port is None:
        return default
    if port > 65535:
        raise ConfigError("MASTER_PORT", environ["MASTER_PORT"], "a TCP port in [1, 65535]")
    return port


def read_addr(environ: Mapping[str, str]) -> str | None:
    """``MASTER_ADDR`` stripped, or None when unset; an empty value is an error, not 'unset'."""
    raw = environ.get("MASTER_ADDR")
    if raw is None:
        return None
    if not raw.strip():
        raise ConfigError("MASTER_ADDR", raw, "a host name or IP address of the rank-0 node")
    return raw.strip()


def check_ranks(rank: int, world: int, local_rank: int, local_world: int, names: tuple[str, str, str, str]) -> None:
    """Reject positions outside their range; ``names`` are the variables the four values came from."""
    rank_name, world_name, local_rank_name, local_world_name = names
    if rank >= world:
        raise ConfigError(rank_name, rank, f"an integer in [0, {world_name}={world})")
    if local_rank >= local_world:
        raise ConfigError(local_rank_name, local_rank, f"an integer in [0, {local_world_name}={local_world})")
    if local_world > world:
        raise ConfigError(local_world_name, local_world, f"at most {world_name}={world}")
