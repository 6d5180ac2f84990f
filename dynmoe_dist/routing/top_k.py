"""Top-k softmax gate (GShard, arXiv 2006.16668; Switch, arXiv 2101.03961): the baseline every comparison uses.

The optional noises reproduce the conventions of DeepSpeed-MoE (multiplicative input jitter; Gumbel noise on the
selection, for every choice or the second only, with the weights from the clean softmax) and of Tutel (normal noise
on the logits before the softmax), so layers imported from them (dynmoe_dist.compat) train as they did. All are
training-only.
"""

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
    probs: torch.Tensor, k: int, renormalize: bool, scores: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token-major (token, column, weight) of the k largest entries of each row of ``scores`` (default ``probs``),
    weighted by ``probs``."""
    if scores is None:
        values, columns = probs.topk(k, dim=-1)
    else:
        columns = scores.topk(k, dim=-1).indices
        values = probs.gather(-1, columns)
    if renormalize:
        values = values / values.sum(-1, keepdim=True).clamp(min=torch.finfo(values.dtype).eps)
    token = torch.arange(probs.shape[0], device=probs.device).repeat_interleave(k)
    return token, columns.reshape(-1), values.reshape(-1)


def gumbel_like(t: torch.Tensor) -> torch.Tensor:
    u = torch.rand_like(t).clamp(min=1e-20, max=1.0 - 1e-7)
    return -torch.log(-torch.log(u))


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
        c = self.cfg
        noisy = self.training
        if noisy and c.input_jitter:
            x = x * torch.empty_like(x).uniform_(1.0 - c.input_jitter, 1.0 + c.input_jitter)
        logits = x @ self.weight.t()
        if noisy and c.logit_noise:
            logits = logits + c.logit_noise * torch.randn_like(logits) / self.num_experts
        probs = torch.softmax(logits, dim=-1)
        scores = None
        if noisy and c.selection_noise == "gumbel":
            scores = logits + gumbel_like(logits)
        elif noisy and c.selection_noise == "gumbel_second" and c.k > 1:
            # first choice by the clean logits, the rest by the noisy ones (first excluded)
            first = logits.argmax(-1, keepdim=True)
            scores = (logits + gumbel_like(logits)).scatter(-1, first, float("-inf"))
            scores = scores.scatter(-1, first, float("inf"))
        token, expert, weight = top_k_assignments(probs, c.k, c.renormalize, scores)
        losses = {}
        if c.balance_weight:
            counted = expert.view(-1, c.k)[:, 0] if c.balance_counts == "first" else expert
            losses["balance"] = c.balance_weight * balance_loss(probs, counted, self.num_experts)
        return Assignments(token, expert, weight, losses)
