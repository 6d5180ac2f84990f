"""Grouped matmul over contiguous segments: each segment of rows is computed by one expert, nothing else.

Rows arrive as contiguous segments, each tagged with its local expert slot (one per expert on a single process; one
per (source rank, expert) after an all-to-all, which saves reordering the received rows: splitting an expert's rows
in two segments costs nothing measurable). No padding, no [E, capacity, d] buffer: cost is proportional to the
number of rows, whatever their split.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

# plain FFNs: act(x W_in + b_in) W_out + b_out; gated ones: (act(x W_gate + b_gate) * (x W_in + b_in)) W_out + b_out
PLAIN: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}
GATED: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"swiglu": F.silu, "geglu": F.gelu}
ACTIVATIONS = (*PLAIN, *GATED)


def is_gated(activation: str) -> bool:
    return activation in GATED


def expert_ffn(
    x: torch.Tensor,
    w: dict[str, torch.Tensor | None],
    activation: str = "gelu",
) -> torch.Tensor:
    """One expert's FFN from its rows: w_in, w_out, and where present w_gate, b_in, b_gate, b_out."""

    def linear(t: torch.Tensor, weight: str, bias: str) -> torch.Tensor:
        b = w.get(bias)
        return t @ w[weight] if b is None else torch.addmm(b, t, w[weight])

    h = linear(x, "w_in", "b_in")
    h = GATED[activation](linear(x, "w_gate", "b_gate")) * h if activation in GATED else PLAIN[activation](h)
    return linear(h, "w_out", "b_out")


def grouped_ffn(
    rows: torch.Tensor,
    segments: Sequence[tuple[int, int]],
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    w_gate: torch.Tensor | None = None,
    activation: str | None = None,
    biases: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``segments`` = [(slot, n), ...] in row order: the next n rows go through expert ``slot``.

    ``activation`` defaults to GELU, or SwiGLU when ``w_gate`` is given; ``biases`` holds stacked b_in/b_gate/b_out.
    """
    activation = activation or ("swiglu" if w_gate is not None else "gelu")
    stacked = {"w_in": w_in, "w_out": w_out, **({"w_gate": w_gate} if w_gate is not None else {}), **(biases or {})}
    # one unbind per stacked tensor: its backward stacks the per-expert gradients once, where indexing w[e] per
    # segment would allocate and add a full-size zero gradient for every segment
    # Weights follow the rows' dtype: bf16 activations compute in bf16 against fp32 parameters, whose gradients
    # arrive in fp32 through the cast (a no-op when the dtypes already agree).
    per_expert = {name: t.to(rows.dtype).unbind(0) for name, t in stacked.items()}
    outputs = []
    # split, not one slice per segment: a slice's backward writes its gradient into a zero-filled buffer of all the
    # rows (one fill per segment), where split's backward is one cat
    pieces = rows.split([n for _, n in segments]) if segments else ()
    for (slot, n), piece in zip(segments, pieces):
        if n:
            outputs.append(expert_ffn(piece, {k: v[slot] for k, v in per_expert.items()}, activation))
    if not outputs:
        # no rows at all: stay connected to the inputs and weights, so every rank gets (zero) gradients for them
        touch = sum(t.sum() for t in stacked.values())
        return rows * 0.0 + touch * 0.0
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)
