"""Top-Any gate of DynMoE (Guo et al., arXiv 2405.14297), as docs/ALGORITHMS.md section 1 states it.

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

    def new_rows(self, directions: torch.Tensor, survivors: torch.Tensor) -> dict[str, torch.Tensor]:
        """A new expert's threshold: 0 in the reference (it then accepts every token on its side of the hyperplane,
        about half of them); ``new_threshold="median"`` (or ``"max"``) makes it as selective as the median (or the most
        selective) surviving expert, so an addition serves the unrouted tokens it was made for instead of raising k
        everywhere."""
        rows = super().new_rows(directions, survivors)
        if self.cfg.new_threshold != "zero" and survivors.numel():
            kept = self.threshold.detach().index_select(0, survivors)
            value = kept.median() if self.cfg.new_threshold == "median" else kept.max()
            rows["threshold"] = value.expand(directions.shape[0]).clone()
        return rows

    def scale(self) -> torch.Tensor | float:
        return 1.0 if self.tau is None else torch.exp(self.tau.clamp(max=MAX_LOG_SCALE))

    def activations(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(a, s, margin): the 0/1 straight-through activations, the similarity scores and s - t, all [S, E]."""
        scale = self.scale()
        cos = F.normalize(x, dim=-1) @ F.normalize(self.weight, dim=-1).t()
        s = torch.sigmoid(cos * scale)
        t = torch.sigmoid(self.threshold * scale)
        margin = s - t
        return StepSTE.apply(F.relu(margin)), s, margin

    def route(self, x: torch.Tensor, importance: torch.Tensor | None) -> Assignments:
        c = self.cfg
        a, s, margin = self.activations(x)
        k = a.sum(-1, keepdim=True)
        weights = a / k.clamp(min=1.0)
        mask = a > 0
        empty = ~mask.any(-1)
        if not self.training or c.unrouted == "top1":
            # a token no expert accepted goes to its most similar expert with weight 1 (evaluation in the reference;
            # in training with unrouted="top1", where the weight's gradient goes to that pair's margin s - t, so the
            # task loss can lower the threshold of an expert the token needs)
            # a comparison, not one_hot: one_hot checks its classes on the host where it runs on CPU
            best = (torch.arange(self.num_experts, device=s.device) == s.argmax(-1, keepdim=True)) & empty[:, None]
            one = torch.ones_like(weights)
            if self.training:
                one = one + (margin - margin.detach())  # value 1, gradient of the margin
            mask = mask | best
            weights = torch.where(best, one, weights)
        token, expert, w = flatten_mask(mask, weights)
        unrouted = empty if self.training else None
        losses = self.aux_losses(a, k)
        if c.route_weight and c.aux_weight and self.training:
            best = margin.gather(1, s.argmax(-1, keepdim=True)).squeeze(1)
            losses["route"] = c.aux_weight * c.route_weight * (F.relu(-best) * empty).mean()
        return Assignments(token, expert, w, losses, unrouted=unrouted)

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
            # Switch-style E * sum_e P_e f_e over the routed tokens: P_e the mean 1/k share (its gradient moves tokens
            # from busy to idle experts), f_e the share of tokens that took e, a count without gradient as in the
            # reference code; a differentiable f_e pushes every activation down and makes k = 0 absorbing
            # means over the routed tokens as masked sums (a boolean index would size its result on the host); rows
            # of unrouted tokens are all zero in ``a``, so they add nothing to either sum
            routed = (k > 0).sum().clamp(min=1)
            p = a / k.clamp(min=1.0)
            bal = self.num_experts * ((p.sum(0) / routed) * (a.detach().sum(0) / routed)).sum()
            losses["balance"] = c.aux_weight * c.balance_weight * bal
        if c.efficiency_weight:
            costly = a if c.efficiency_free == 0 else a * (k.detach() > c.efficiency_free)
            eff = costly.mean() if a.numel() else a.sum() * 0.0
            losses["efficiency"] = c.aux_weight * c.efficiency_weight * eff
        return losses
