"""Single-process dispatcher: every expert lives here, so dispatch is a permutation and combine its weighted inverse."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..routing.plan import RoutingPlan
from .permute import Permutation, combine_rows, gather_rows, sort_by_expert
from .traffic import Traffic


@dataclass
class LocalState:
    perm: Permutation
    num_tokens: int
    traffic: Traffic


class LocalDispatcher:
    def dispatch(self, x: torch.Tensor, plan: RoutingPlan) -> tuple[torch.Tensor, list[int], LocalState]:
        """Rows grouped by expert slot, rows per slot, and what the combine needs."""
        perm = sort_by_expert(plan.token, plan.expert, plan.weight, plan.num_experts)
        a = plan.num_assignments
        traffic = Traffic(a, 0, 0, a, x.shape[1] * x.element_size())
        return gather_rows(x, perm), perm.counts_list(), LocalState(perm, x.shape[0], traffic)

    def combine(self, y: torch.Tensor, state: LocalState) -> torch.Tensor:
        return combine_rows(y, state.perm, state.num_tokens)
