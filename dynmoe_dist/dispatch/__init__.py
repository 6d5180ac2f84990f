"""Token movement: permutation into expert order, (distributed) exchange, weighted combine."""

from .capacity import apply_capacity, capacity_keep_mask, check_capacity_factor, expert_capacity
from .combine import combine_rows
from .local import LocalDispatcher
from .permute import Permutation, gather_pieces, gather_rows, sort_by_expert

__all__ = [
    "LocalDispatcher",
    "Permutation",
    "apply_capacity",
    "capacity_keep_mask",
    "check_capacity_factor",
    "combine_rows",
    "expert_capacity",
    "gather_pieces",
    "gather_rows",
    "sort_by_expert",
]
