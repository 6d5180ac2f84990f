"""Grouped matmul over contiguous segments: expert e computes rows [start_e, start_e + n_e) only.

Rows arrive sorted by local expert, so each expert's work is one dense matmul on a contiguous slice: no padding, no
[E, capacity, d] buffer. Cost is proportional to the number of rows, whatever their split.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

ACTIVATIONS = ("gelu", "swiglu")


def expert_ffn(x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, w_gate: torch.Tensor | None) -> torch.Tensor:
    """One expert: GELU FFN (w_gate None) or SwiGLU, both without bias."""
    h = x @ w_in
    h = F.gelu(h) if w_gate is None else F.silu(x @ w_gate) * h
    return h @ w_out


def grouped_ffn(
    rows: torch.Tensor,
    counts: Sequence[int],
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    w_gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """Apply expert e to the e-th contiguous segment of ``rows`` ([sum(counts), d] -> [sum(counts), d])."""
    outputs = []
    start = 0
    for e, n in enumerate(counts):
        if n:
            seg = rows[start : start + n]
            outputs.append(expert_ffn(seg, w_in[e], w_out[e], None if w_gate is None else w_gate[e]))
            start += n
    if not outputs:
        # no rows at all: stay connected to the inputs and weights, so every rank gets (zero) gradients for them
        touch = sum(w.sum() for w in (w_in, w_out, w_gate) if w is not None)
        return rows * 0.0 + touch * 0.0
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)
