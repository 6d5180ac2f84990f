"""Optional expert capacity: deterministic drops, counted.

Dropless is the default. With a capacity factor c, each expert keeps at most ceil(c * |A| / E) assignments; the
ones it drops are the lowest-weight first, ties broken by token order (later tokens dropped first), so the result
is the same on every run and every rank count.
"""

from __future__ import annotations

import math

import torch

from ..errors import check
from ..routing.plan import RoutingPlan, count_per


def check_capacity_factor(capacity_factor: float | None) -> None:
    if capacity_factor is not None:
        check(
            capacity_factor > 0,
            "capacity_factor",
            capacity_factor,
            "None (dropless) or a number > 0 (each expert keeps ceil(factor * assignments / experts))",
        )


def expert_capacity(num_assignments: int, num_experts: int, capacity_factor: float, min_capacity: int = 0) -> int:
    return max(math.ceil(capacity_factor * num_assignments / max(num_experts, 1)), min_capacity)


def capacity_keep_mask(plan: RoutingPlan, capacity: int) -> torch.Tensor:
    """[A] bool: which assignments survive a per-expert capacity."""
    num = plan.num_assignments
    device = plan.token.device
    # lexicographic order (expert, -weight, token) by stable sorts from the last key to the first
    order = torch.argsort(plan.token, stable=True)
    order = order[torch.argsort(-plan.weight.detach()[order], stable=True)]
    order = order[torch.argsort(plan.expert[order], stable=True)]
    counts = count_per(plan.expert, plan.num_experts)
    starts = torch.cumsum(counts, 0) - counts
    rank_in_expert = torch.arange(num, device=device) - starts[plan.expert[order]]
    keep = torch.zeros(num, dtype=torch.bool, device=device)
    keep[order] = rank_in_expert < capacity
    return keep


def apply_capacity(plan: RoutingPlan, capacity_factor: float | None, min_capacity: int = 0) -> tuple[RoutingPlan, int]:
    """The plan after capacity drops, and how many assignments were dropped."""
    if capacity_factor is None or plan.num_assignments == 0:
        return plan, 0
    capacity = expert_capacity(plan.num_assignments, plan.num_experts, capacity_factor, min_capacity)
    keep = capacity_keep_mask(plan, capacity)
    dropped = int((~keep).sum())
    return (plan.select(keep) if dropped else plan), dropped
