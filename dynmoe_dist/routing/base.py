"""Router base: turns per-token scores into a RoutingPlan with statistics.

A gate implements ``route`` (the rule) and lists its per-expert parameters in ``row_parameters`` (leading dim E), so
the control plane can slice and append gate rows when experts are added or removed without knowing the rule.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError, check
from .plan import RoutingPlan, RoutingStats, count_per


@dataclass
class Assignments:
    """What a rule returns: flat (token, expert position, weight) triples, token-major, and weighted losses."""

    token: torch.Tensor
    expert: torch.Tensor
    weight: torch.Tensor
    losses: dict[str, torch.Tensor]
    # [S] bool: tokens the rule itself accepted for no expert, when it still sends them somewhere (Top-Any's
    # fallback); None: the tokens without an assignment
    unrouted: torch.Tensor | None = None


class Router(nn.Module):
    """Base class of every gate."""

    #: whether tokens with k = 0 count as "unrouted" (a signal to add an expert) or are a deliberate choice
    records_unrouted: bool = True

    def __init__(self, d_model: int, num_experts: int) -> None:
        super().__init__()
        check(isinstance(d_model, int) and d_model >= 1, "d_model", d_model, "an integer >= 1")
        check(isinstance(num_experts, int) and num_experts >= 1, "num_experts", num_experts, "an integer >= 1")
        self.d_model = d_model
        self.register_buffer("expert_ids", torch.arange(num_experts, dtype=torch.int64))

    @property
    def num_experts(self) -> int:
        return int(self.expert_ids.numel())

    def route(self, x: torch.Tensor, importance: torch.Tensor | None) -> Assignments:
        raise NotImplementedError

    def row_parameters(self) -> dict[str, nn.Parameter]:
        """Parameters whose leading dimension is the expert position."""
        raise NotImplementedError

    def new_rows(self, directions: torch.Tensor, survivors: torch.Tensor) -> dict[str, torch.Tensor]:
        """Row-parameter values for experts being added, one per row of ``directions`` ([n, d], unit vectors toward
        the tokens they are for), beside the experts at positions ``survivors``: the gate embedding takes the
        direction, every other row parameter starts at 0."""
        out = {}
        for name, p in self.row_parameters().items():
            rows = directions if name == "weight" else p.new_zeros((directions.shape[0], *p.shape[1:]))
            out[name] = rows.to(p.dtype)
        return out

    def on_optimizer_step(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """Hook for rules with per-step state (ReLU routing's L1 coefficient); ``reduce`` sums over ranks."""

    def forward(self, x: torch.Tensor, importance: torch.Tensor | None = None) -> RoutingPlan:
        if x.dim() != 2 or x.shape[1] != self.d_model:
            raise ConfigError("router input shape", tuple(x.shape), f"[tokens, {self.d_model}]")
        a = self.route(x, importance)
        num_tokens = x.shape[0]
        k = count_per(a.token, num_tokens)
        counts = count_per(a.expert, self.num_experts)  # the statistics' and the dispatcher's (one count)
        with torch.no_grad():
            unrouted = None
            if self.training and self.records_unrouted:
                unrouted = a.unrouted if a.unrouted is not None else k == 0
            # masked sums, not x[unrouted]: a boolean index sizes its result on the host (a device sync)
            stats = RoutingStats(
                tokens_per_expert=counts,
                k_per_token=k,
                unrouted_count=unrouted.sum() if unrouted is not None else k.new_zeros(()),
                unrouted_sum=(
                    torch.where(unrouted[:, None], x.detach(), 0).sum(0)
                    if unrouted is not None
                    else x.new_zeros(self.d_model)
                ),
                token_sum=x.detach().sum(0) if unrouted is not None else None,
            )
        return RoutingPlan(
            token=a.token,
            expert=a.expert,
            weight=a.weight,
            k=k,
            num_experts=self.num_experts,
            expert_ids=self.expert_ids,
            aux_losses=a.losses,
            stats=stats,
            counts=counts,
        )


def flatten_mask(mask: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token, expert, weight) of the true entries of a [S, E] mask, token-major.

    The one host sync of a gate whose k varies per token: the number of assignments sizes everything after it."""
    token, expert = mask.nonzero(as_tuple=True)
    return token, expert, weights[token, expert]


def balance_loss(probs: torch.Tensor, expert: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch/GShard balance loss E * sum_e f_e * P_e; f_e = share of assignments, P_e = mean router probability.

    Equals 1 under perfectly uniform routing.
    """
    if expert.numel() == 0 or probs.shape[0] == 0:
        return probs.sum() * 0.0
    f = count_per(expert, num_experts).to(probs.dtype) / expert.numel()
    return num_experts * (f * probs.mean(0)).sum()
