"""Single-process dispatcher: every expert lives here, so dispatch is a permutation and combine its weighted inverse."""

from __future__ import annotations

import torch

from ..experts import ExpertBank
from ..placement import PlacementTable
from ..routing.plan import RoutingPlan
from .permute import combine_rows, gather_rows, sort_by_expert
from .traffic import Traffic


class LocalDispatcher:
    def __init__(self, placement: PlacementTable) -> None:
        self.placement = placement  # every expert on this process (ep_size 1); versioned like any placement

    def segments(self, x: torch.Tensor, plan: RoutingPlan):
        """(rows in expert order, their (slot, rows) segments, the permutation): what the experts see."""
        perm = sort_by_expert(plan.token, plan.expert, plan.weight, plan.num_experts)
        return gather_rows(x, perm), list(enumerate(perm.counts_list())), perm

    def run(self, x: torch.Tensor, plan: RoutingPlan, experts: ExpertBank) -> tuple[torch.Tensor, Traffic]:
        rows, segments, perm = self.segments(x, plan)
        out = combine_rows(experts(rows, segments), perm, x.shape[0])
        a = plan.num_assignments
        return out, Traffic(a, a, 0, a, x.shape[1] * x.element_size())
