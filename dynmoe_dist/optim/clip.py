"""One gradient norm over the dense and the MoE side, as a chained optimizer computes it (Megatron-Core).

The two sides live in different optimizers (the dense one possibly inside DeepSpeed, partitioned by ZeRO), so the
norm is assembled from squared parts, each counted once over the world:

- dense parameters are replicated after their reduction: the local square counts once (ZeRO partitions are summed
  over the data-parallel group instead: each rank holds a disjoint slice);
- gate rows are replicated over the world: counted once;
- experts are sharded over the expert-parallel group and replicated across it: summed over the EP group only.

Clipping by ``min(1, max_norm / norm)`` then scales both sides alike. A non-finite norm stops the step before any
parameter changes, with the step and the side it came from.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from ..errors import NonFiniteError
from ..parallel.collectives import all_reduce
from ..parallel.grads import moe_parameter_kinds
from ..parallel.groups import ParallelGroups


def squared_norm(params: Iterable[torch.Tensor], device: torch.device | str = "cpu") -> torch.Tensor:
    """Sum of squared gradient entries of ``params`` (float64 scalar on ``device``; parameters without one add 0)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), dtype=torch.float64, device=device)
    # vector_norm accumulates in float64 without a float64 copy of the gradient
    norms = torch.stack([torch.linalg.vector_norm(g.detach(), dtype=torch.float64) for g in grads])
    return norms.square().sum().to(device)


def moe_squared_norm(model: nn.Module, groups: ParallelGroups, device: torch.device | str = "cpu") -> torch.Tensor:
    """Squared norm of the MoE gradients after ``sync_gradients``: gate once, experts summed over the EP group."""
    kinds = moe_parameter_kinds(model)
    expert = squared_norm(kinds["expert"], device)
    if groups.ep_group is not None:
        all_reduce(expert, groups.ep_group, "clip.expert_norm")
    return squared_norm(kinds["gate"], device) + expert


def clip_coefficient(total_norm: float, max_norm: float) -> float:
    """``min(1, max_norm / norm)``; ``max_norm <= 0`` switches clipping off."""
    if max_norm <= 0 or total_norm <= max_norm:
        return 1.0
    return max_norm / (total_norm + 1e-6)


def check_finite_norm(value: float, side: str, step: int) -> None:
    if not math.isfinite(value):
        raise NonFiniteError(
            f"the {side} gradient norm is {value} at step {step}: a NaN or Inf reached the gradients, so no parameter "
            "was updated. Lower optim.lr, check the data, or run with moe.check_finite=true to find the first "
            "MoE layer that saw it"
        )


@torch.no_grad()
def scale_gradients(params: Iterable[torch.Tensor], coef: float) -> None:
    if coef != 1.0:
        for p in params:
            if p.grad is not None:
                p.grad.mul_(coef)
