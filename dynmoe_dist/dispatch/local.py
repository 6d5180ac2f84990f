"""Single-process dispatcher: every expert lives here, so dispatch is a permutation and combine its weighted inverse."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..experts import ExpertBank
from ..placement import PlacementTable
from ..routing.plan import RoutingPlan
from .combine import combine_rows
from .permute import gather_rows, sort_by_expert
from .traffic import Traffic


class LocalDispatcher:
    def __init__(self, placement: PlacementTable) -> None:
        self.placement = placement  # every expert on this process (ep_size 1); versioned like any placement

    def segments(self, x: torch.Tensor, plan: RoutingPlan):
        """(rows in expert order, their (slot, rows) segments, the permutation): what the experts see."""
        perm = sort_by_expert(plan.token, plan.expert, plan.weight, plan.num_experts, plan.expert_counts())
        return gather_rows(x, perm), list(enumerate(perm.counts_list())), perm

    def run(
        self,
        x: torch.Tensor,
        plan: RoutingPlan,
        experts: ExpertBank,
        alongside: Callable[[], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, Traffic]:
        """``alongside``: the [S, d] output of an undispatched FFN of the same tokens (shared experts), added."""
        # the experts take the per-expert counts as a device tensor: the grouped GEMM never reads them on the host
        # (no sync), the segment loop reads them once; and the tokens with the rows each expert takes from them, so
        # that the segment loop gathers each expert's rows itself (no [A, d] copy of the rows, nor of their gradient)
        perm = sort_by_expert(plan.token, plan.expert, plan.weight, plan.num_experts, plan.expert_counts())
        base = alongside() if alongside is not None else None
        y = experts(x, perm.counts, token=perm.token)
        out = combine_rows(y, perm.token, perm.weight, x.shape[0], base)
        a = plan.num_assignments
        return out, Traffic(a, a, 0, a, x.shape[1] * x.element_size())
