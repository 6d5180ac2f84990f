"""Null experts (AdaMoE, Zeng et al., arXiv 2406.13233).

``num_null`` extra router logits stand for experts that return 0. Top-k runs over real + null; a null choice is
dropped from the plan, so it costs no compute and no communication, and the number of real experts per token varies
from 0 to k. In the balance loss the null experts share their load evenly (they are one pool), as in AdaMoE.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import check
from .base import Assignments, Router
from .config import NullExpertConfig
from .plan import count_per
from .top_k import init_router_weight, top_k_assignments


class NullExpertRouter(Router):
    records_unrouted = False  # choosing only null experts is a decision, not a miss

    def __init__(self, d_model: int, num_experts: int, cfg: NullExpertConfig | None = None) -> None:
        super().__init__(d_model, num_experts)
        self.cfg = cfg or NullExpertConfig()
        total = num_experts + self.cfg.num_null
        check(self.cfg.k <= total, "k", self.cfg.k, f"1..num_experts+num_null={total}")
        self.weight = init_router_weight(num_experts, d_model)
        self.null_weight = init_router_weight(self.cfg.num_null, d_model)

    def row_parameters(self) -> dict[str, nn.Parameter]:
        return {"weight": self.weight}

    def route(self, x: torch.Tensor, importance: torch.Tensor | None) -> Assignments:
        logits = x @ torch.cat([self.weight, self.null_weight]).t()
        probs = torch.softmax(logits, dim=-1)
        token, column, weight = top_k_assignments(probs, self.cfg.k, self.cfg.renormalize)
        real = (column < self.num_experts).nonzero().squeeze(1)  # the one host sync: how many choices were real
        losses = {}
        if self.cfg.balance_weight:
            losses["balance"] = self.cfg.balance_weight * self.pooled_balance(probs, column)
        return Assignments(token[real], column[real], weight.index_select(0, real), losses)

    def pooled_balance(self, probs: torch.Tensor, column: torch.Tensor) -> torch.Tensor:
        """(E + N) * sum f_e P_e over real and null slots, null slots replaced by their mean."""
        total = probs.shape[1]
        if column.numel() == 0:
            return probs.sum() * 0.0
        f = count_per(column, total).to(probs.dtype) / column.numel()
        p = probs.mean(0)
        e = self.num_experts
        f = torch.cat([f[:e], f[e:].mean().expand(total - e)])
        p = torch.cat([p[:e], p[e:].mean().expand(total - e)])
        return total * (f * p).sum()
