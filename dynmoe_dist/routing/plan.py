"""RoutingPlan: the one object every gate returns and every later stage reads.

Assignments are flat (token, expert, weight) triples, |A| = sum of k over tokens, so everything downstream is sized
by the real number of assignments, never by experts x capacity (docs/ALGORITHMS.md section 3).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def count_per(index: torch.Tensor, n: int) -> torch.Tensor:
    """[n] int64: how often each value 0..n-1 occurs in ``index``. ``bincount`` would do, but on a GPU it reads the
    largest value back to the host to size its result (a sync per call); here the size is given."""
    return torch.zeros(n, dtype=torch.int64, device=index.device).scatter_add_(0, index, torch.ones_like(index))


@dataclass
class RoutingStats:
    """Per-batch routing statistics (detached); what the adaptation recorder accumulates."""

    tokens_per_expert: torch.Tensor  # [E] int64, assignments per expert position
    k_per_token: torch.Tensor  # [S] int64
    unrouted_count: torch.Tensor  # [] int64, tokens with k = 0 in training
    unrouted_sum: torch.Tensor  # [d] float, sum of their embeddings
    dropped: int = 0  # assignments removed by a capacity limit
    token_sum: torch.Tensor | None = None  # [d] float, sum of every token's embedding (training, gates with unrouted)

    @property
    def avg_k(self) -> float:
        return float(self.k_per_token.float().mean()) if self.k_per_token.numel() else 0.0


@dataclass
class RoutingPlan:
    """Who goes where, with which weight.

    ``expert`` holds expert *positions* (row indices of the gate, 0..E-1); ``expert_ids`` maps positions to the
    stable global ids, so a plan can always be read in terms of ids (``assigned_ids``).
    """

    token: torch.Tensor  # [A] int64
    expert: torch.Tensor  # [A] int64, position in 0..E-1
    weight: torch.Tensor  # [A] float, differentiable w.r.t. the gate parameters
    k: torch.Tensor  # [S] int64, experts per token
    num_experts: int
    expert_ids: torch.Tensor  # [E] int64
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)  # weighted terms
    stats: RoutingStats | None = None
    counts: torch.Tensor | None = None  # [E] int64 assignments per position, when the gate counted them already

    def expert_counts(self) -> torch.Tensor:
        """[E] assignments per expert position (counted once, whoever asks first)."""
        if self.counts is None:
            self.counts = count_per(self.expert, self.num_experts)
        return self.counts

    @property
    def num_assignments(self) -> int:
        return int(self.token.numel())

    @property
    def num_tokens(self) -> int:
        return int(self.k.numel())

    @property
    def assigned_ids(self) -> torch.Tensor:
        return self.expert_ids[self.expert]

    def aux_loss(self) -> torch.Tensor:
        """Sum of the weighted auxiliary terms (a zero scalar when there are none)."""
        if not self.aux_losses:
            return self.weight.new_zeros(())
        return torch.stack(list(self.aux_losses.values())).sum()

    def select(self, keep: torch.Tensor) -> RoutingPlan:
        """The plan restricted to the assignments where ``keep`` is true (capacity drops use this)."""
        k = count_per(self.token[keep], self.num_tokens)
        return RoutingPlan(
            token=self.token[keep],
            expert=self.expert[keep],
            weight=self.weight[keep],
            k=k,
            num_experts=self.num_experts,
            expert_ids=self.expert_ids,
            aux_losses=self.aux_losses,
            stats=self.stats,
        )
