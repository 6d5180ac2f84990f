"""Top-k softmax gate (GShard, arXiv 2006.16668; Switch, arXiv 2101.03961): the baseline every comparison uses.

The optional noises reproduce the conventions of DeepSpeed-MoE (multiplicative input jitter; Gumbel noise on the
selection, for every choice or the second only, with the weights from the clean softmax) and of Tutel (normal noise
on the logits before the softmax), so layers imported from them (dynmoe_dist.compat) train as they did. All are
training-only.

The families of pretrained MoE models differ in a few options, all off by default: sigmoid scores instead of a
softmax, a selection bias that moves the choice but not the weights, grouped top-k, and a scaling factor on the
weights (DeepSeek-V3, arXiv 2412.19437); renormalising the chosen weights or not (Mixtral always, Qwen-MoE and
OLMoE by ``norm_topk_prob``). ``dynmoe_dist.hf`` sets them from a model's config so a converted model routes exactly
as the original.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError, check
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


def grouped_choice(choice: torch.Tensor, num_groups: int, top_groups: int) -> torch.Tensor:
    """``choice`` [S, E] with every expert outside each token's ``top_groups`` best groups set to -inf; a group's
    score is the sum of its two best choice scores (one when a group holds one expert), as DeepSeek-V3 ranks them."""
    tokens, num_experts = choice.shape
    if num_experts % num_groups:
        raise ConfigError(
            "num_groups",
            num_groups,
            f"a divisor of the expert count ({num_experts}): grouped top-k needs equal groups (adaptation that "
            "changes the count breaks them; use num_groups=1 or an adapt policy that keeps the count)",
        )
    per_group = choice.view(tokens, num_groups, num_experts // num_groups)
    group_score = per_group.topk(min(2, per_group.shape[-1]), dim=-1).values.sum(-1)
    keep = torch.zeros_like(group_score, dtype=torch.bool)
    keep.scatter_(1, group_score.topk(top_groups, dim=-1).indices, True)
    return per_group.masked_fill(~keep[..., None], float("-inf")).view(tokens, num_experts)


class TopKRouter(Router):
    """softmax(W x) (or sigmoid), the k largest, weights renormalised over the chosen ones (or raw), optionally
    chosen with a selection bias and within the best expert groups, and scaled (DeepSeek-V3)."""

    records_unrouted = False  # every token takes exactly k experts

    def __init__(self, d_model: int, num_experts: int, cfg: TopKConfig | None = None) -> None:
        super().__init__(d_model, num_experts)
        self.cfg = cfg or TopKConfig()
        check(self.cfg.k <= num_experts, "k", self.cfg.k, f"1..num_experts={num_experts}")
        self.weight = init_router_weight(num_experts, d_model)
        # a row parameter (so adaptation keeps it with its expert) that no gradient reaches
        self.selection_bias = (
            nn.Parameter(torch.zeros(num_experts), requires_grad=False) if self.cfg.selection_bias else None
        )

    def row_parameters(self) -> dict[str, nn.Parameter]:
        rows = {"weight": self.weight}
        if self.selection_bias is not None:
            rows["selection_bias"] = self.selection_bias
        return rows

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Per-expert scores the weights are taken from: softmax over the experts, or independent sigmoids."""
        return torch.sigmoid(logits) if self.cfg.score == "sigmoid" else torch.softmax(logits, dim=-1)

    def choice(self, probs: torch.Tensor, scores: torch.Tensor | None) -> torch.Tensor | None:
        """What the k experts are chosen by, when it differs from the weights: noise, a selection bias, groups."""
        c = self.cfg
        if self.selection_bias is None and c.num_groups == 1:
            return scores
        choice = probs if scores is None else scores
        if self.selection_bias is not None:
            choice = choice + self.selection_bias.to(choice.dtype)
        if c.num_groups > 1:
            choice = grouped_choice(choice, c.num_groups, c.top_groups)
        return choice

    def route(self, x: torch.Tensor, importance: torch.Tensor | None) -> Assignments:
        c = self.cfg
        noisy = self.training
        if noisy and c.input_jitter:
            x = x * torch.empty_like(x).uniform_(1.0 - c.input_jitter, 1.0 + c.input_jitter)
        logits = x @ self.weight.t()
        if noisy and c.logit_noise:
            logits = logits + c.logit_noise * torch.randn_like(logits) / self.num_experts
        probs = self.scores(logits)
        scores = None
        if noisy and c.selection_noise == "gumbel":
            scores = logits + gumbel_like(logits)
        elif noisy and c.selection_noise == "gumbel_second" and c.k > 1:
            # first choice by the clean logits, the rest by the noisy ones (first excluded)
            first = logits.argmax(-1, keepdim=True)
            scores = (logits + gumbel_like(logits)).scatter(-1, first, float("-inf"))
            scores = scores.scatter(-1, first, float("inf"))
        token, expert, weight = top_k_assignments(probs, c.k, c.renormalize, self.choice(probs, scores))
        if c.scaling != 1.0:
            weight = weight * c.scaling
        losses = {}
        if c.balance_weight:
            counted = expert.view(-1, c.k)[:, 0] if c.balance_counts == "first" else expert
            # sigmoid scores do not sum to 1: the balance term takes each token's scores normalised
            share = probs if c.score == "softmax" else probs / probs.sum(-1, keepdim=True).clamp(min=1e-20)
            losses["balance"] = c.balance_weight * balance_loss(share, counted, self.num_experts)
        return Assignments(token, expert, weight, losses)
