"""Attention-importance k (DA-MoE, Aghdam et al., arXiv 2409.06669).

A token's importance is the attention it receives in the preceding attention sublayer: imp_j = mean over heads of
sum over queries i of A[h, i, j], normalised to [0, 1] per sequence (divided by the sequence maximum). Then
k_j = clamp(ceil(imp_j * k_max), 1, k_max) and the token takes its top-k_j experts of softmax(W x), weights
renormalised. The paper's exact normalisation is not public in code: this is the documented reconstruction, and the
importance function is pluggable (``IMPORTANCE_FUNCTIONS`` or any callable).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..errors import ConfigError, ShapeError, check
from .base import Assignments, Router, balance_loss, flatten_mask
from .config import ImportanceKConfig
from .top_k import init_router_weight

ImportanceFn = Callable[[torch.Tensor], torch.Tensor]


def attention_received(attn: torch.Tensor) -> torch.Tensor:
    """[B, H, S, S] attention probabilities (query i, key j) -> [B, S] importance in [0, 1]."""
    received = attn.sum(dim=-2).mean(dim=1)  # sum over queries, mean over heads
    return normalise_per_sequence(received)


def normalise_per_sequence(imp: torch.Tensor) -> torch.Tensor:
    """Scale each row to [0, 1] by its maximum (rows of zeros stay zero)."""
    peak = imp.amax(dim=-1, keepdim=True)
    return imp / torch.where(peak > 0, peak, torch.ones_like(peak))


IMPORTANCE_FUNCTIONS: dict[str, ImportanceFn] = {"attention_received": attention_received}


def check_importance(importance: torch.Tensor) -> None:
    """A NaN, an infinity or a negative value would silently become some k (ceil of NaN is NaN, cast to an integer
    anything): refuse them, naming the argument."""
    allowed = "attention probabilities or per-token importance: a floating-point tensor of finite values >= 0"
    if not importance.is_floating_point():
        raise ConfigError("importance dtype", importance.dtype, allowed)
    bad = ~torch.isfinite(importance) | (importance < 0)
    if bool(bad.any()):
        values = importance.detach()[bad]
        nan, inf = int(values.isnan().sum()), int(values.isinf().sum())
        what = f"{nan} NaN, {inf} infinite, {values.numel() - nan - inf} negative value(s)"
        raise ConfigError("importance", what, allowed)


def k_from_importance(imp: torch.Tensor, k_max: int) -> torch.Tensor:
    return torch.ceil(imp * k_max).clamp(1, k_max).to(torch.int64)


class ImportanceKRouter(Router):
    records_unrouted = False  # k >= 1 by construction

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        cfg: ImportanceKConfig | None = None,
        importance_fn: ImportanceFn | None = None,
    ) -> None:
        super().__init__(d_model, num_experts)
        self.cfg = cfg or ImportanceKConfig()
        check(self.cfg.k_max <= num_experts, "k_max", self.cfg.k_max, f"1..num_experts={num_experts}")
        if importance_fn is None:
            if self.cfg.importance not in IMPORTANCE_FUNCTIONS:
                raise ConfigError("importance", self.cfg.importance, "one of " + ", ".join(IMPORTANCE_FUNCTIONS))
            importance_fn = IMPORTANCE_FUNCTIONS[self.cfg.importance]
        self.importance_fn = importance_fn
        self.weight = init_router_weight(num_experts, d_model)

    def row_parameters(self) -> dict[str, nn.Parameter]:
        return {"weight": self.weight}

    def token_k(self, importance: torch.Tensor | None, num_tokens: int, device: torch.device) -> torch.Tensor:
        """k per token from attention probabilities [B, H, S, S] or an importance vector ([B, S] or [S])."""
        k_max = self.cfg.k_max
        if importance is None:
            fallback = self.cfg.fallback_k or k_max
            return torch.full((num_tokens,), fallback, dtype=torch.int64, device=device)
        check_importance(importance)
        if importance.dim() == 4:
            if importance.shape[-1] != importance.shape[-2]:
                raise ShapeError(
                    f"attention probabilities must be [batch, heads, seq, seq]; got {tuple(importance.shape)}"
                )
            # bf16 attention (mixed-precision training) is read in fp32 at least: k_j rounds imp_j * k_max up
            imp = self.importance_fn(importance.detach().to(torch.promote_types(importance.dtype, torch.float32)))
        elif importance.dim() in (1, 2):
            imp = importance.detach()
        else:
            raise ShapeError(
                "importance must be attention probabilities [batch, heads, seq, seq] or a per-token vector "
                f"[batch, seq] / [tokens]; got shape {tuple(importance.shape)}"
            )
        imp = imp.reshape(-1)
        if imp.numel() != num_tokens:
            raise ShapeError(
                f"importance covers {imp.numel()} tokens but the layer input has {num_tokens}; pass one value "
                "per token (or the attention probabilities of the same batch)"
            )
        return k_from_importance(imp, k_max)

    def route(self, x: torch.Tensor, importance: torch.Tensor | None) -> Assignments:
        probs = torch.softmax(x @ self.weight.t(), dim=-1)
        k = self.token_k(importance, x.shape[0], x.device)
        k_max = self.cfg.k_max
        values, columns = probs.topk(k_max, dim=-1)
        rank = torch.arange(k_max, device=x.device)
        keep = rank[None, :] < k[:, None]
        values = values * keep
        values = values / values.sum(-1, keepdim=True).clamp_min(torch.finfo(values.dtype).tiny)
        token, slot, weight = flatten_mask(keep, values)
        expert = columns[token, slot]
        losses = {}
        if self.cfg.balance_weight:
            losses["balance"] = self.cfg.balance_weight * balance_loss(probs, expert, self.num_experts)
        return Assignments(token, expert, weight, losses)
