"""Process groups for expert parallelism.

World W, expert-parallel size P (W divisible by P). Ranks are laid out as W/P consecutive expert-parallel groups
[0..P-1], [P..2P-1], ...: experts are sharded inside an EP group and replicated across groups; the ranks holding the
same experts (equal rank mod P) form an expert-data-parallel (EDP) group. Dense and gate parameters are data-parallel
over the whole world. This is DeepSpeed's layout, so a hostfile that suits one suits the other.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import ConfigError


@dataclass
class ParallelGroups:
    world_size: int
    rank: int
    ep_size: int
    ep_group: dist.ProcessGroup | None  # None when ep_size == 1
    edp_group: dist.ProcessGroup | None  # None when world_size == ep_size
    world_group: dist.ProcessGroup | None  # None when world_size == 1

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep_size

    @property
    def edp_size(self) -> int:
        return self.world_size // self.ep_size

    @property
    def edp_rank(self) -> int:
        return self.rank // self.ep_size

    def ep_global_rank(self, ep_rank: int) -> int:
        """Global rank of member ``ep_rank`` of this rank's EP group."""
        return self.edp_rank * self.ep_size + ep_rank


def single_process_groups() -> ParallelGroups:
    return ParallelGroups(1, 0, 1, None, None, None)


def world_timeout() -> datetime.timedelta | None:
    """The collective timeout of the default group, so subgroups inherit it.

    ``new_group`` otherwise falls back to torch's 30-minute default, and a dead peer inside an expert-parallel group
    would stall the others for half an hour instead of ``init_distributed(timeout_s=...)``.
    """
    try:
        pg = dist.distributed_c10d._get_default_group()
        backend = pg._get_backend(torch.device("cuda" if dist.get_backend() == "nccl" else "cpu"))
        return backend.options._timeout
    except (AttributeError, RuntimeError, ValueError):
        return None


def build_groups(ep_size: int, timeout_s: float | None = None) -> ParallelGroups:
    """Create the EP and EDP groups; every rank must call this, in the same order (it creates groups collectively).

    ``timeout_s`` bounds every collective of the new groups; by default the world group's timeout.
    """
    if not dist.is_initialized():
        if ep_size == 1:
            return single_process_groups()
        raise ConfigError("ep_size", ep_size, "1 unless torch.distributed is initialised (call init_distributed first)")
    world, rank = dist.get_world_size(), dist.get_rank()
    if ep_size < 1 or world % ep_size:
        raise ConfigError("ep_size", ep_size, f"a divisor of the world size {world}")
    timeout = datetime.timedelta(seconds=timeout_s) if timeout_s is not None else world_timeout()
    ep_group = edp_group = None
    for start in range(0, world, ep_size):
        ranks = list(range(start, start + ep_size))
        g = dist.new_group(ranks, timeout=timeout) if ep_size > 1 else None
        if rank in ranks:
            ep_group = g
    if world > ep_size:
        for first in range(ep_size):
            ranks = list(range(first, world, ep_size))
            g = dist.new_group(ranks, timeout=timeout)
            if rank in ranks:
                edp_group = g
    world_group = dist.group.WORLD if world > 1 else None
    return ParallelGroups(world, rank, ep_size, ep_group, edp_group, world_group)
