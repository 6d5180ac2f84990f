"""Shared experts (DeepSeekMoE, arXiv 2401.06066, section 3.2): always-on FFNs that every token passes through.

Their output is added to the routed experts' output. They hold the common knowledge, so routed experts can
specialise. ``n`` shared experts of hidden size ``d_ff`` are stored as one FFN of hidden size ``n * d_ff``:
a sum of FFNs is one FFN whose hidden units are theirs side by side, so expert ``i`` owns hidden columns
``[i * d_ff, (i + 1) * d_ff)``. One wide GEMM replaces ``n`` narrow ones, and the output biases add up to one.

They are dense parameters. They are replicated on every rank and data-parallel over the world. The dense engine
(DeepSpeed) owns them. Adaptation never adds, removes or moves them. Under expert parallelism they run while the
routed rows are in flight (``ExpertParallelDispatcher``'s ``alongside``).

``gated=True`` scales their output per token by a sigmoid gate, as Qwen2-MoE does.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import check
from .activations import ACTIVATIONS, is_gated
from .bank import expert_generator
from .grouped import expert_ffn


class SharedExperts(nn.Module):
    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num: int,
        activation: str = "gelu",
        seed: int = 0,
        bias: bool = False,
        gated: bool = False,
    ) -> None:
        super().__init__()
        check(isinstance(num, int) and num >= 1, "num_shared_experts", num, "an integer >= 1 (0: no shared experts)")
        check(isinstance(d_ff, int) and d_ff >= 1, "shared d_ff", d_ff, "an integer >= 1")
        check(activation in ACTIVATIONS, "shared expert activation", activation, " or ".join(ACTIVATIONS))
        self.d_model, self.d_ff, self.num, self.activation = d_model, d_ff, num, activation
        wide = num * d_ff
        self.w_in = nn.Parameter(torch.empty(d_model, wide))
        self.w_gate = nn.Parameter(torch.empty(d_model, wide)) if is_gated(activation) else None
        self.w_out = nn.Parameter(torch.empty(wide, d_model))
        self.b_in = nn.Parameter(torch.zeros(wide)) if bias else None
        self.b_gate = nn.Parameter(torch.zeros(wide)) if bias and is_gated(activation) else None
        self.b_out = nn.Parameter(torch.zeros(d_model)) if bias else None
        # Qwen2-MoE's shared-expert gate: the output times sigmoid(x . g), one scalar per token; g starts at 0 (a
        # factor of 1/2) and is set from the checkpoint when a model is converted
        self.gate = nn.Parameter(torch.zeros(d_model, 1)) if gated else None
        self.reset_parameters(seed)

    def weights(self) -> dict[str, nn.Parameter]:
        names = ("w_in", "w_gate", "w_out", "b_in", "b_gate", "b_out")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def columns(self, i: int) -> slice:
        """Hidden units of shared expert ``i``."""
        return slice(i * self.d_ff, (i + 1) * self.d_ff)

    @torch.no_grad()
    def reset_parameters(self, seed: int) -> None:
        """Each shared expert initialised as a routed expert would be, from (seed, -1 - i): routed ids are >= 0."""
        for i in range(self.num):
            g = expert_generator(seed, -1 - i)
            cols = self.columns(i)
            for name in ("w_gate", "w_in"):
                w = getattr(self, name)
                if w is not None:
                    w[:, cols].copy_(torch.randn(self.d_model, self.d_ff, generator=g) * self.d_model**-0.5)
            self.w_out[cols].copy_(torch.randn(self.d_ff, self.d_model, generator=g) * self.d_ff**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = expert_ffn(x, self.weights(), self.activation)
        if self.gate is not None:
            out = out * torch.sigmoid(x @ self.gate.to(x.dtype))
        return out
