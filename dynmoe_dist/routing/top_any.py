"""Top-Any gate of DynMoE (Guo et al., arXiv 2405.14297), as ALGORITHMS.md section 1 states it.

s_e(x) = sigmoid(cos(x, W_e) * scale), t_e = sigmoid(G_e * scale), a_e = STE(relu(s_e - t_e)) in {0, 1}; every
activated expert gets weight 1/k(x). The straight-through estimator passes the gradient of a_e through unchanged to
relu(s_e - t_e), so only activated pairs send gradient to W_e and (negatively) to G_e.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import Assignments, Router, flatten_mask
from .config import TopAnyConfig

MAX_LOG_SCALE = math.log(100.0)


class StepSTE(torch.autograd.Function):
    """Forward: 1 where the input is positive, else 0. Backward: the identity."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return (x > 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return grad


class TopAnyRouter(Router):
    """Each token takes every expert whose similarity passes that expert's trainable threshold."""

    def __init__(self, d_model: int, num_experts: int, cfg: TopAnyConfig | None = None) -> None:
        super().__init__(d_model, num_experts)
        self.cfg = cfg or TopAnyConfig()
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))
        self.threshold = nn.Parameter(torch.zeros(num_experts))
        if num_experts <= d_model:
            nn.init.orthogonal_(self.weight)  # orthonormal rows
        else:
            nn.init.normal_(self.weight, std=d_model**-0.5)
        self.tau = nn.Parameter(torch.tensor(math.log(10.0))) if self.cfg.trainable_temperature else None

    def row_parameters(self) -> dict[str, nn.Parameter]:
        return {"weight": self.weight, "threshold": self.threshold}

    def scale(self) -> torch.Tensor | float:
        return 1.0 if self.tau is None else torch.exp(self.tau.clamp(max=MAX_LOG_SCALE))

    def activations(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, s): the 0/1 straight-through activations and the similarity scores, both [S, E]."""
        scale = self.scale()
        cos = F.normalize(x, dim=-1) @ F.normalize(self.weight, dim=-1).t()
        s = torch.sigmoid(cos * scale)
        t = torch.sigmoid(self.threshold * scale)
        return StepSTE.apply(F.relu(s - t)), s

    def route(self, x: torch.Tensor, importance: torch.Tensor | None) -> Assignments:
        a, s = self.activations(x)
        k = a.sum(-1, keepdim=True)
        weights = a / k.clamp(min=1.0)
        mask = a > 0
        if not self.training:
            # evaluation: a token no expert accepted goes to its most similar expert with weight 1
            empty = ~mask.any(-1)
            if bool(empty.any()):
                best = s.argmax(-1)
                fallback = F.one_hot(best, self.num_experts).bool() & empty[:, None]
                mask = mask | fallback
                weights = torch.where(fallback, torch.ones_like(weights), weights)
        token, expert, w = flatten_mask(mask, weights)
        return Assignments(token, expert, w, self.aux_losses(a, k))

    def aux_losses(self, a: torch.Tensor, k: torch.Tensor) -> dict[str, torch.Tensor]:
        c = self.cfg
        losses: dict[str, torch.Tensor] = {}
        if c.aux_weight == 0:
            return losses
        if c.diverse_weight:
            wn = F.normalize(self.weight, dim=-1)
            eye = torch.eye(self.num_experts, dtype=wn.dtype, device=wn.device)
            losses["diverse"] = c.aux_weight * c.diverse_weight * torch.linalg.matrix_norm(wn @ wn.t() - eye)
        if c.simple_weight:
            losses["simple"] = c.aux_weight * c.simple_weight * self.weight.norm(dim=-1).mean()
        if c.balance_weight:
            routed = k.squeeze(-1) > 0
            if bool(routed.any()):
                ar = a[routed]
                p = ar / k[routed]
                bal = self.num_experts * (p.mean(0) * ar.mean(0)).sum()
            else:
                bal = a.sum() * 0.0
            losses["balance"] = c.aux_weight * c.balance_weight * bal
        if c.efficiency_weight:
            eff = a.mean() if a.numel() else a.sum() * 0.0
            losses["efficiency"] = c.aux_weight * c.efficiency_weight * eff
        return losses
