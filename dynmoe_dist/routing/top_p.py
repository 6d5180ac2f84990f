"""Top-p gate ("Harder Tasks Need More Experts: Dynamic Routing in MoE Models", Huang et al., arXiv 2403.07652).

Experts are taken in order of probability until the cumulative probability first exceeds p; the crossing expert is
included, so k >= 1. Weights are the raw probabilities (not renormalised). A routing-entropy loss pushes the
distribution to be peaked, which lowers k.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Assignments, Router, balance_loss, flatten_mask
from .config import TopPConfig
from .top_k import init_router_weight


def top_p_mask(probs: torch.Tensor, p: float) -> torch.Tensor:
    """[S, E] bool: the experts whose preceding cumulative probability (in descending order) is at most p.

    p = 1 takes every expert: the exact cumulative probability never exceeds 1, but a rounded cumsum can.
    """
    if p >= 1.0:
        return torch.ones_like(probs, dtype=torch.bool)
    sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
    before = sorted_probs.cumsum(-1) - sorted_probs
    keep_sorted = before <= p
    keep_sorted[:, 0].fill_(True)  # (an assignment of True would copy a host-made tensor to the device)
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


class TopPRouter(Router):
    records_unrouted = False  # k >= 1 by construction

    def __init__(self, d_model: int, num_experts: int, cfg: TopPConfig | None = None) -> None:
        super().__init__(d_model, num_experts)
        self.cfg = cfg or TopPConfig()
        self.weight = init_router_weight(num_experts, d_model)

    def row_parameters(self) -> dict[str, nn.Parameter]:
        return {"weight": self.weight}

    def route(self, x: torch.Tensor, importance: torch.Tensor | None) -> Assignments:
        logits = x @ self.weight.t()
        probs = torch.softmax(logits, dim=-1)
        token, expert, weight = flatten_mask(top_p_mask(probs.detach(), self.cfg.p), probs)
        losses = {}
        if self.cfg.balance_weight:
            losses["balance"] = self.cfg.balance_weight * balance_loss(probs, expert, self.num_experts)
        if self.cfg.entropy_weight:
            entropy = -(probs * torch.log_softmax(logits, dim=-1)).sum(-1)
            ent = entropy.mean() if entropy.numel() else entropy.sum()
            losses["entropy"] = self.cfg.entropy_weight * ent
        return Assignments(token, expert, weight, losses)
