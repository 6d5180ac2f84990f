"""ExpertBank: the experts one rank holds, as stacked weight tensors, with stable int64 ids.

Stacked storage ([E_local, ...] per weight) keeps the grouped matmul a slice per expert and lets the control plane
add, remove or move experts by slicing rows of the same tensors (and of their optimizer state). Each expert is
initialised from a generator seeded by (seed, expert id), so its initial weights do not depend on where it lives:
a layer built on 1 rank and the same layer sharded over 3 ranks start from the same experts.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import check
from .activations import ACTIVATIONS, is_gated
from .grouped import GEMMS, grouped_ffn


def expert_generator(seed: int, expert_id: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + expert_id) % (2**63))


class ExpertBank(nn.Module):
    def __init__(
        self,
        d_model: int,
        d_ff: int,
        expert_ids: torch.Tensor | list[int],
        activation: str = "gelu",
        seed: int = 0,
        bias: bool = False,
        gemm: str = "auto",
    ) -> None:
        super().__init__()
        check(activation in ACTIVATIONS, "expert activation", activation, " or ".join(ACTIVATIONS))
        check(gemm in GEMMS, "expert gemm", gemm, " or ".join(GEMMS))
        check(isinstance(d_ff, int) and d_ff >= 1, "d_ff", d_ff, "an integer >= 1")
        ids = torch.as_tensor(expert_ids, dtype=torch.int64).reshape(-1)
        self.d_model, self.d_ff, self.activation, self.bias = d_model, d_ff, activation, bias
        self.gemm = gemm  # auto: CUDA grouped GEMM where it serves (bf16, SM80+), else the segment loop
        self.register_buffer("expert_ids", ids.clone())
        n = ids.numel()
        gated = is_gated(activation)
        self.w_in = nn.Parameter(torch.empty(n, d_model, d_ff))
        self.w_gate = nn.Parameter(torch.empty(n, d_model, d_ff)) if gated else None
        self.w_out = nn.Parameter(torch.empty(n, d_ff, d_model))
        # biases (off by default, as in most LLM FFNs) exist for layers imported from DeepSpeed-MoE and Tutel, whose
        # experts are Linear layers with bias; they are expert rows like the weights, so adaptation moves them too
        self.b_in = nn.Parameter(torch.empty(n, d_ff)) if bias else None
        self.b_gate = nn.Parameter(torch.empty(n, d_ff)) if bias and gated else None
        self.b_out = nn.Parameter(torch.empty(n, d_model)) if bias else None
        self.reset_parameters(seed)

    @property
    def num_experts(self) -> int:
        return int(self.expert_ids.numel())

    def weights(self) -> dict[str, nn.Parameter]:
        """Every stacked weight, by name; leading dimension = local expert slot."""
        named = {"w_in": self.w_in, "w_out": self.w_out}
        for name in ("w_gate", "b_in", "b_gate", "b_out"):
            if getattr(self, name) is not None:
                named[name] = getattr(self, name)
        return named

    @torch.no_grad()
    def reset_parameters(self, seed: int) -> None:
        self.seed = seed
        for slot, expert_id in enumerate(self.expert_ids.tolist()):
            for name, row in self.fresh_rows(expert_id).items():
                self.weights()[name][slot].copy_(row)

    def fresh_rows(self, expert_id: int) -> dict[str, torch.Tensor]:
        """The initial weights of expert ``expert_id``: a function of (seed, id) only, wherever it lives."""
        g = expert_generator(self.seed, expert_id)
        rows = {}
        for name, w in sorted(self.weights().items()):
            if name.startswith("b_"):
                rows[name] = torch.zeros(w.shape[1:], dtype=w.dtype)
            else:
                rows[name] = (torch.randn(w.shape[1:], generator=g) * w.shape[1] ** -0.5).to(w.dtype)
        return rows

    def forward(
        self,
        rows: torch.Tensor,
        segments: list[tuple[int, int]] | torch.Tensor,
        weights: dict[str, torch.Tensor] | None = None,
        token: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``segments`` = [(local slot, rows), ...] in row order, or an [E] int64 tensor of rows per slot with the rows
        in slot order (``grouped_ffn``). ``weights``: stacked weights by name to compute with in place of this bank's
        own (copies of other ranks' experts, ``dispatch/shadow.py``); slots index them. ``token``: ``rows`` are the
        tokens [S, d] and the segments' rows are rows[token] (gathered inside, ``grouped_ffn``)."""
        w = self.weights() if weights is None else weights
        biases = {k: v for k, v in w.items() if k.startswith("b_")}
        return grouped_ffn(
            rows, segments, w["w_in"], w["w_out"], w.get("w_gate"), self.activation, biases, self.gemm, token
        )
