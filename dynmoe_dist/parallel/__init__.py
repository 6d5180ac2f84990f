"""Process groups (EP, expert-DP, DP), bootstrap from launcher environments, guarded collectives, gradient sync."""

from .collectives import CollectiveError
from .grads import broadcast_dense, global_count, moe_parameter_kinds, sync_gradients
from .groups import ParallelGroups, build_groups, single_process_groups

__all__ = [
    "CollectiveError",
    "ParallelGroups",
    "broadcast_dense",
    "build_groups",
    "global_count",
    "moe_parameter_kinds",
    "single_process_groups",
    "sync_gradients",
]
