"""Expert-parallel groups by size, created once per process like DeepSpeed's named groups (``ep_size_<n>``).

Drop-in layers take ``ep_size`` where our MoELayer takes ParallelGroups; a model with one layer per block must not
create a new set of process groups per layer (every creation is a collective, and groups are never freed).
"""

from __future__ import annotations

import torch.distributed as dist

from ..parallel.groups import ParallelGroups, build_groups

_CACHE: dict[tuple[int, int], ParallelGroups] = {}


def groups_for(ep_size: int, timeout_s: float | None = None) -> ParallelGroups:
    """The groups for ``ep_size`` on the current world (every rank must ask in the same order, as for any group)."""
    if not dist.is_initialized():
        return build_groups(ep_size, timeout_s)  # ep_size 1: single-process groups; else a ConfigError naming the fix
    key = (id(dist.group.WORLD), ep_size)
    if key not in _CACHE:
        _CACHE[key] = build_groups(ep_size, timeout_s)
    return _CACHE[key]
