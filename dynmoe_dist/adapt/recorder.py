"""Recorder: what the routers did over a window of optimizer steps, per MoE layer (docs/ALGORITHMS.md section 5).

Tokens per expert and the sum and count of unrouted-token embeddings (k = 0), accumulated over every training
forward of the window, then summed over the whole world so every rank decides on the same numbers. A forward that
autograd replays during backward (activation recompute) is not counted again, and gradient accumulation just adds
its micro-batches: the window sees each token once whatever the schedule.

The sums live on the routers' device and are only added to there: ``observe`` never reads a value back (no host sync
per layer call); the host sees them once per window, in ``reduce`` (and in a checkpoint's ``state_dict``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..parallel.collectives import all_reduce
from ..routing.plan import RoutingStats


@dataclass
class WindowStats:
    """One layer's record over a window, identical on every rank after ``reduce``."""

    expert_ids: list[int]  # router positions -> ids, at the time of recording
    tokens: torch.Tensor  # [E] float64, assignments per expert (position order)
    unrouted_count: float
    unrouted_sum: torch.Tensor  # [d] float64
    token_count: float = 0.0  # every token the window saw (gates that can leave tokens unrouted)
    token_sum: torch.Tensor | None = None  # [d] float64, their embeddings' sum

    def tokens_by_id(self) -> dict[int, float]:
        return dict(zip(self.expert_ids, self.tokens.tolist()))


def inside_backward() -> bool:
    """True while autograd runs a backward pass, which is where activation recompute replays forwards."""
    return torch._C._current_autograd_node() is not None


class RoutingRecorder:
    def __init__(self, num_experts: int, d_model: int) -> None:
        self.d_model = d_model
        self.active = False
        self.reset(num_experts)

    def reset(self, num_experts: int) -> None:
        self.tokens = torch.zeros(num_experts, dtype=torch.float64)
        self.unrouted = torch.zeros(self.d_model + 1, dtype=torch.float64)  # [sum..., count]
        self.seen = torch.zeros(self.d_model + 1, dtype=torch.float64)  # every token: [sum..., count]

    def to(self, device: torch.device) -> None:
        """Keep the sums on ``device`` (once per window at most; a move from the host does not wait for the device)."""
        if self.tokens.device != device:
            self.tokens, self.unrouted, self.seen = (
                t.to(device, non_blocking=True) for t in (self.tokens, self.unrouted, self.seen)
            )

    def observe(self, stats: RoutingStats) -> None:
        """Called by the layer on each training forward; counts only inside an active window, on the device."""
        if not self.active or inside_backward():
            return
        self.to(stats.tokens_per_expert.device)
        self.tokens += stats.tokens_per_expert.detach()
        self.unrouted[:-1] += stats.unrouted_sum.detach()
        self.unrouted[-1] += stats.unrouted_count.detach()
        if stats.token_sum is not None:
            self.seen[:-1] += stats.token_sum.detach()
            self.seen[-1] += stats.k_per_token.numel()

    def state_dict(self) -> dict:
        """This rank's open window (by router position, matching the layer's ``expert_ids``): part of a checkpoint,
        on the host."""
        return {
            "tokens": self.tokens.cpu().clone(),
            "unrouted": self.unrouted.cpu().clone(),
            "seen": self.seen.cpu().clone(),
            "active": self.active,
        }

    def load_state_dict(self, state: dict) -> None:
        self.tokens = state["tokens"].to(torch.float64).clone()
        self.unrouted = state["unrouted"].to(torch.float64).clone()
        # checkpoints written before the window kept every token's sum: the window goes on without it
        seen = state.get("seen")
        self.seen = seen.to(torch.float64).clone() if seen is not None else torch.zeros(self.d_model + 1)
        self.active = bool(state["active"])

    def reduce(self, expert_ids: list[int], world_group, device: torch.device | str = "cpu") -> WindowStats:
        """Sum this window over the world (one all-reduce) and return it; every rank gets the same numbers.

        ``device``: where the all-reduce runs (the layer's device: NCCL needs CUDA tensors); the result is on the CPU.
        """
        flat = torch.cat([self.tokens, self.unrouted, self.seen])
        if world_group is not None:
            flat = all_reduce(flat.to(device), world_group, "adapt.recorder.reduce")
        flat = flat.cpu()
        e, d = self.tokens.numel(), self.d_model
        unrouted, seen = flat[e : e + d + 1], flat[e + d + 1 :]
        return WindowStats(list(expert_ids), flat[:e], float(unrouted[-1]), unrouted[:-1], float(seen[-1]), seen[:-1])
