"""ReLU routing (ReMoE, Wang et al., arXiv 2412.14711).

g = relu(W x); a token uses every expert with g_e > 0, weight g_e. An L1 penalty on g controls sparsity: once per
optimizer step its coefficient is multiplied by ``l1_factor`` when the measured sparsity is below the target
(1 - target_active / E) and divided by it otherwise.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .base import Assignments, Router, flatten_mask
from .config import ReLUConfig
from .top_k import init_router_weight


class ReLURouter(Router):
    def __init__(self, d_model: int, num_experts: int, cfg: ReLUConfig | None = None) -> None:
        super().__init__(d_model, num_experts)
        self.cfg = cfg or ReLUConfig()
        self.weight = init_router_weight(num_experts, d_model)
        self.register_buffer("l1_coef", torch.tensor(self.cfg.l1_init, dtype=torch.float64))
        # active entries and all entries of g since the last optimizer step
        self.register_buffer("activity", torch.zeros(2, dtype=torch.float64), persistent=False)

    def row_parameters(self) -> dict[str, nn.Parameter]:
        return {"weight": self.weight}

    def route(self, x: torch.Tensor, importance: torch.Tensor | None) -> Assignments:
        g = torch.relu(x @ self.weight.t())
        mask = g > 0
        if self.training:
            self.activity[0] += mask.sum()  # stays on the device: no host sync per forward
            self.activity[1] += mask.numel()
        token, expert, weight = flatten_mask(mask, g)
        l1 = g.sum(-1).mean() if g.numel() else g.sum()
        return Assignments(token, expert, weight, {"l1": self.l1_coef.to(g.dtype) * l1})

    def sparsity_target(self) -> float:
        return max(0.0, 1.0 - self.cfg.target_active / self.num_experts)

    def on_optimizer_step(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """Steer the L1 coefficient; ``reduce`` sums the activity over ranks so every rank moves it alike."""
        activity = reduce(self.activity.clone()) if reduce is not None else self.activity
        active, total = activity.tolist()
        self.activity.zero_()
        if total == 0:
            return
        sparsity = 1.0 - active / total
        if sparsity < self.sparsity_target():
            self.l1_coef *= self.cfg.l1_factor
        else:
            self.l1_coef /= self.cfg.l1_factor
