"""ExpertBank: the experts one rank holds, as stacked weight tensors, with stable int64 ids.

Stacked storage ([E_local, ...] per weight) keeps the grouped matmul a slice per expert and lets the control plane
add, remove or move experts by slicing rows of the same tensors (and of their optimizer state).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import check
from .grouped import ACTIVATIONS, grouped_ffn


class ExpertBank(nn.Module):
    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int,
        activation: str = "gelu",
        expert_ids: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        check(activation in ACTIVATIONS, "expert activation", activation, " or ".join(ACTIVATIONS))
        check(isinstance(d_ff, int) and d_ff >= 1, "d_ff", d_ff, "an integer >= 1")
        check(isinstance(num_experts, int) and num_experts >= 0, "num_experts", num_experts, "an integer >= 0")
        self.d_model, self.d_ff, self.activation = d_model, d_ff, activation
        ids = torch.arange(num_experts, dtype=torch.int64) if expert_ids is None else expert_ids.to(torch.int64)
        check(ids.numel() == num_experts, "expert_ids", tuple(ids.shape), f"{num_experts} ids")
        self.register_buffer("expert_ids", ids.clone())
        self.w_in = nn.Parameter(torch.randn(num_experts, d_model, d_ff) * d_model**-0.5)
        self.w_gate = (
            nn.Parameter(torch.randn(num_experts, d_model, d_ff) * d_model**-0.5) if activation == "swiglu" else None
        )
        self.w_out = nn.Parameter(torch.randn(num_experts, d_ff, d_model) * d_ff**-0.5)

    @property
    def num_experts(self) -> int:
        return int(self.expert_ids.numel())

    def weights(self) -> dict[str, nn.Parameter]:
        """Every stacked weight, by name; leading dimension = local expert slot."""
        named = {"w_in": self.w_in, "w_out": self.w_out}
        if self.w_gate is not None:
            named["w_gate"] = self.w_gate
        return named

    def forward(self, rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Rows sorted by local slot, ``counts[slot]`` rows each."""
        return grouped_ffn(rows, counts, self.w_in, self.w_out, self.w_gate)
