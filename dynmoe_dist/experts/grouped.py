"""Grouped matmul over contiguous segments: each segment of rows is computed by one expert, nothing else.

Rows arrive as contiguous segments, each tagged with its local expert slot (one per expert on a single process; one
per (source rank, expert) after an all-to-all, which saves reordering the received rows: splitting an expert's rows
in two segments costs nothing measurable). No padding, no [E, capacity, d] buffer: cost is proportional to the
number of rows, whatever their split.
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
    segments: Sequence[tuple[int, int]],
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    w_gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """``segments`` = [(slot, n), ...] in row order: the next n rows go through expert ``slot``."""
    outputs = []
    # one unbind per stacked weight: its backward stacks the per-expert gradients once, where indexing w[e] per
    # segment would allocate and add a full-size zero gradient for every segment
    # Weights follow the rows' dtype: bf16 activations compute in bf16 against fp32 parameters, whose gradients
    # arrive in fp32 through the cast (a no-op when the dtypes already agree).
    w_ins, w_outs = w_in.to(rows.dtype).unbind(0), w_out.to(rows.dtype).unbind(0)
    w_gates = w_gate.to(rows.dtype).unbind(0) if w_gate is not None else [None] * len(w_ins)
    # split, not one slice per segment: a slice's backward writes its gradient into a zero-filled buffer of all the
    # rows (one fill per segment), where split's backward is one cat
    pieces = rows.split([n for _, n in segments]) if segments else ()
    for (slot, n), piece in zip(segments, pieces):
        if n:
            outputs.append(expert_ffn(piece, w_ins[slot], w_outs[slot], w_gates[slot]))
    if not outputs:
        # no rows at all: stay connected to the inputs and weights, so every rank gets (zero) gradients for them
        touch = sum(w.sum() for w in (w_in, w_out, w_gate) if w is not None)
        return rows * 0.0 + touch * 0.0
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)
