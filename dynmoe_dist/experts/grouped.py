"""Grouped FFN over contiguous segments: each segment of rows is computed by one expert, nothing else.

Rows arrive as contiguous segments, each tagged with its local expert slot (one per expert on a single process; one
per (source rank, expert) after an all-to-all). No padding, no [E, capacity, d] buffer: cost is proportional to the
number of rows, whatever their split. Three ways to compute, the same function (``gemm``):
- ``loop``: a loop over the segments in two autograd functions (segment_ffn.py), aten's ``mm``; any device and dtype;
- ``onednn``: the same loop with oneDNN's GEMMs (cpu_gemm.py), float32 on CPU, faster than aten's on CPUs with
  AVX-512 whose ``mm`` runs AVX2 (AMD's);
- ``grouped_mm``: one grouped GEMM per weight for all experts (grouped_gemm.py), CUDA bf16 on SM80+;
- ``auto`` (the default): ``grouped_mm`` where the CUDA kernel serves the rows; on CPU, ``onednn`` where oneDNN
  serves the rows and was measured clearly faster for the FFN's shape class on this CPU (``cpu_gemm.auto_choice``),
  otherwise ``loop``.
``expert_ffn`` is the plain one-expert form, the reference both are tested against.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import ConfigError, ShapeError
from .activations import ACTIVATIONS, GATED, PLAIN
from .cpu_gemm import ATEN, ONEDNN, Gemm, auto_kernel, onednn_usable
from .grouped_gemm import grouped_gemm_available, grouped_gemm_ffn
from .segment_ffn import merge_by_slot, segment_ffn

__all__ = ["ACTIVATIONS", "GEMMS", "autocast_dtype", "expert_ffn", "grouped_ffn"]

GEMMS = ("auto", "loop", "onednn", "grouped_mm")


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


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast computes matmuls in on this device type, or None where autocast is off."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def cpu_kernel(gemm: str, x: torch.Tensor, d_ff: int | None = None) -> Gemm:
    """The matrix products of the segment loop: oneDNN's where asked for or (``auto``) where it serves and was
    measured faster for this FFN's shape class (``d_ff``: its hidden size; None: rows' width), else aten's."""
    if gemm == "onednn" and not onednn_usable(x):
        raise ConfigError(
            "expert gemm",
            f"onednn for {x.dtype} rows on {x.device.type}",
            "float32 rows on a CPU whose torch build has oneDNN (torch.backends.mkldnn) enabled; "
            "gemm='auto' picks it where it serves",
        )
    if gemm == "onednn":
        return ONEDNN
    return auto_kernel(x, x.shape[-1], d_ff or x.shape[-1]) if gemm == "auto" else ATEN


def uses_grouped_mm(gemm: str, rows: torch.Tensor, w_in: torch.Tensor) -> bool:
    """Whether these rows go through the grouped GEMM (asked for, or ``auto`` where the CUDA kernel serves them)."""
    return gemm == "grouped_mm" or (gemm == "auto" and grouped_gemm_available(rows, w_in))


def grouped_ffn(
    rows: torch.Tensor,
    segments: Sequence[tuple[int, int]] | torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    w_gate: torch.Tensor | None = None,
    activation: str | None = None,
    biases: dict[str, torch.Tensor] | None = None,
    gemm: str = "auto",
    token: torch.Tensor | None = None,
) -> torch.Tensor:
    """``segments`` = [(slot, n), ...] in row order: the next n rows go through expert ``slot``.

    ``activation`` defaults to GELU, or SwiGLU when ``w_gate`` is given; ``biases`` holds stacked b_in/b_gate/b_out.
    A slot's rows spread over several segments are gathered into one, in slot order (a row permutation), before the
    experts run. ``gemm``: see the module docstring.

    ``segments`` may instead be an [E] int64 tensor of rows per slot (rows in slot order, on the rows' device): the
    grouped GEMM then takes it as it is, with no host read (no device sync; their sum is not checked); the segment
    loop reads it once.

    ``token`` ([A] int64): ``rows`` is the source [S, d] and row i of the segments is rows[token[i]]. The segment loop
    gathers each segment's rows itself and adds their input gradient into [S, d] (``ExpertUp``): the [A, d] rows and
    their gradient are never made whole. The grouped GEMM gathers them first.
    """
    activation = activation or ("swiglu" if w_gate is not None else "gelu")
    b = biases or {}
    low = autocast_dtype(rows.device.type)
    if low is not None:  # under autocast: the rows in its dtype, computed as such (out= buffers take no autocast)
        with torch.autocast(rows.device.type, enabled=False):
            return grouped_ffn(rows.to(low), segments, w_in, w_out, w_gate, activation, biases, gemm, token)
    if token is not None and uses_grouped_mm(gemm, rows, w_in):
        rows, token = rows.index_select(0, token), None
    if isinstance(segments, torch.Tensor):
        if segments.shape != (w_in.shape[0],):
            raise ShapeError(f"grouped_ffn: {tuple(segments.shape)} row counts for {w_in.shape[0]} experts")
        if not uses_grouped_mm(gemm, rows, w_in):
            segments = list(enumerate(segments.tolist()))
    given = rows.shape[0] if token is None else token.shape[0]
    covered = given if isinstance(segments, torch.Tensor) else sum(n for _, n in segments)
    if covered != given:  # (device counts are trusted: checking their sum would read it on the host)
        raise ShapeError(
            f"grouped_ffn: the segments cover {covered} rows but {given} were given; "
            "each (slot, n) segment takes the next n rows, and together they must cover every row"
        )

    # Weights follow the rows' dtype: bf16 activations compute in bf16 against fp32 parameters, whose gradients
    # arrive in fp32 through the cast (a no-op when the dtypes already agree).
    def cast(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(rows.dtype)

    weights = (cast(w_in), cast(w_out), cast(w_gate), cast(b.get("b_in")), cast(b.get("b_out")), cast(b.get("b_gate")))
    if isinstance(segments, torch.Tensor):  # rows in slot order already, counts on the device
        return grouped_gemm_ffn(rows, segments, activation, *weights)
    perm, merged = merge_by_slot(segments, rows.device)
    x = rows
    if perm is not None:  # with tokens, the gather and the merge are one row selection
        x, token = (rows.index_select(0, perm), None) if token is None else (rows, token.index_select(0, perm))
    if token is None and uses_grouped_mm(gemm, x, w_in):  # (with tokens here, the segment loop serves the rows)
        counts = [0] * w_in.shape[0]
        for slot, n in merged:
            counts[slot] = n
        y = grouped_gemm_ffn(x, counts, activation, *weights)
    else:
        y = segment_ffn(x, merged, activation, cpu_kernel(gemm, x, w_in.shape[2]), *weights, token)
    return y if perm is None else torch.empty_like(y).index_copy_(0, perm, y)  # back to the callers' row order
