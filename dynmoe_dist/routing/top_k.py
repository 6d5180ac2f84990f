"""Top-k softmax gate (GShard, arXiv 2006.16668; Switch, arXiv 2101.03961): the baseline every comparison uses."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import check
from .base import Assignments, Router, balance_loss
from .config import TopKConfig


def init_router_weight(num_experts: int, d_model: int) -> nn.Parameter:
    """Small normal init for a linear router (std 0.02, as GPT-style models)."""
    return nn.Parameter(torch.randn(num_experts, d_model) * 0.02)


def top_k_assignments(
    probs: torch.Tensor, k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token-major (token, column, weight) of the k largest entries of each row of ``probs``."""
    values, columns = probs.topk(k, dim=-1)
    if renormalize:
        values = values / values.sum(-1, keepdim=True)
    token = torch.arange(probs.shape[0], device=probs.device).repeat_interleave(k)
    return token, columns.reshape(-1), values.reshape(-1)


class TopKRouter(Router):
    """softmax(W x), the k largest, weights renormalised over the chosen ones (or raw)."""

    records_unrouted = False  # every token takes exactly k experts

    def __init__(self, d_model: int, num_experts: int, cfg: TopKConfig | None = None) -> None:
        super().__init__(d_model, num_experts)
        self.cfg = cfg or TopKConfig()
        check(self.cfg.k <= num_experts, "k", self.cfg.k, f"1..num_experts={num_experts}")
        self.weight = init_router_weight(num_experts, d_model)

    def row_parameters(self) -> dict[str, nn.Parameter]:
        return {"weight": self.weight}

    def route(self, x: torch.Tensor, importance: torch.Tensor | None) -> Assignments:
        probs = torch.softmax(x @ self.weight.t(), dim=-1)
        token, expert, weight = top_k_assignments(probs, self.cfg.k, self.cfg.renormalize)
        losses = {}
        if self.cfg.balance_weight:
            losses["balance"] = self.cfg.balance_weight * balance_loss(probs, expert, self.num_experts)
        return Assignments(token, expert, weight, losses)
