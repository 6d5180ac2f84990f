"""The whole grouped expert FFN as one autograd function: no per-segment graph nodes, no cat, weight gradients
written straight into their stacked tensors.

Why: with many small experts (DeepSeekMoE-style 64+ per layer) a loop of autograd ops pays, per segment, three graph
nodes, a split and a cat of the rows, and an ``unbind`` whose backward stacks every expert's weight gradient into a
new tensor (a full copy of the bank's gradients per step). Here forward writes each segment's output into one
preallocated buffer, and backward writes each expert's weight gradient into its row of the stacked gradient (``mm``
with ``out=`` the first time an expert is seen, ``addmm_`` after). Each segment is still computed whole (matmul,
activation, matmul) while its rows are hot in cache, which is why this beats one activation over all rows on CPU.
Activations and their derivatives are aten's own (``gelu_backward``, ``silu_backward``), so results match autograd's.
Backward recomputes each segment's activation output from the saved pre-activations (one elementwise op) rather than
keeping it: a third of the FFN's saved activations, at a cost far below the segment's GEMMs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .activations import DERIVATIVES, GATE_OF, PLAIN
from .cpu_gemm import Gemm


class GroupedFFN(torch.autograd.Function):
    """y[seg] = FFN_slot(x[seg]) for each (slot, n) segment; weights stacked [E, ...], biases optional (None).
    ``gemm`` computes every matrix product, forward and backward (cpu_gemm.py: aten's or oneDNN's)."""

    @staticmethod
    def forward(ctx, x, segments, activation, gemm: Gemm, w_in, w_out, w_gate, b_in, b_out, b_gate):  # noqa: D102
        gated = activation in GATE_OF
        act = PLAIN[GATE_OF.get(activation, activation)]
        rows = x.shape[0]
        index, padded = pad_segments(segments, gemm)
        if index is not None:  # each segment's rows followed by zero rows, up to a size the kernel has seen before
            x = x.new_zeros(sum(p for _, p in padded), x.shape[1]).index_copy_(0, index, x)
        y = x.new_empty(rows, w_out.shape[2])
        saved = []  # per non-empty segment: pre-activation and gate pre-activation (or None); backward recomputes the
        # activation output from them (one elementwise op per segment) instead of keeping a third rows x d_ff tensor
        start = pstart = 0  # of the segment in y (the given rows) and in x (the padded rows)
        for (slot, n), (_, p) in zip(segments, padded):
            if n:
                xs = x[pstart : pstart + p]
                h = gemm.addmm(None if b_in is None else b_in[slot], xs, w_in[slot])
                if gated:
                    hg = gemm.addmm(None if b_gate is None else b_gate[slot], xs, w_gate[slot])
                    a = act(hg) * h
                else:
                    hg, a = None, act(h)
                gemm.addmm(None if b_out is None else b_out[slot], a, w_out[slot], out=y[start : start + n])
                saved += [h, hg]
            start, pstart = start + n, pstart + p
        # through save_for_backward, so that saved-tensor hooks (activation checkpointing, offload) see them all
        ctx.save_for_backward(x, w_in, w_out, w_gate, *saved)
        ctx.segments, ctx.padded, ctx.activation, ctx.gemm, ctx.index = segments, padded, activation, gemm, index
        ctx.has_bias = (b_in is not None, b_out is not None, b_gate is not None)
        return y

    @staticmethod
    def backward(ctx, dy):  # noqa: D102
        x, w_in, w_out, w_gate, *saved = ctx.saved_tensors
        gated = ctx.activation in GATE_OF
        name = GATE_OF.get(ctx.activation, ctx.activation)
        act, act_backward = PLAIN[name], DERIVATIVES[name]
        need = ctx.needs_input_grad
        gemm, index = ctx.gemm, ctx.index
        # zero gradients on the padding rows: they add nothing to the weight and bias gradients
        dy = dy.contiguous() if index is None else dy.new_zeros(x.shape[0], dy.shape[1]).index_copy_(0, index, dy)
        rows = sum(n for _, n in ctx.segments)
        dx = x.new_empty(rows, x.shape[1]) if need[0] else None

        def stacked(w, i):
            return torch.empty_like(w) if w is not None and need[i] else None

        dw_in, dw_out, dw_gate = stacked(w_in, 4), stacked(w_out, 5), stacked(w_gate, 6)
        db_in = torch.empty(w_in.shape[0], w_in.shape[2], dtype=x.dtype, device=x.device) if need[7] else None
        db_out = torch.empty(w_out.shape[0], w_out.shape[2], dtype=x.dtype, device=x.device) if need[8] else None
        db_gate = torch.empty(w_in.shape[0], w_in.shape[2], dtype=x.dtype, device=x.device) if need[9] else None
        seen: set[int] = set()

        def accumulate(grad: torch.Tensor | None, slot: int, first: bool, a: torch.Tensor, b: torch.Tensor) -> None:
            if grad is not None:
                if first:
                    gemm.mm(a, b, out=grad[slot])
                else:
                    gemm.addmm_(grad[slot], a, b)

        def accumulate_bias(grad: torch.Tensor | None, slot: int, first: bool, g: torch.Tensor) -> None:
            if grad is not None:
                if first:
                    torch.sum(g, 0, out=grad[slot])
                else:
                    grad[slot].add_(g.sum(0))

        start = pstart = 0
        kept = iter(saved)
        for (slot, n), (_, p) in zip(ctx.segments, ctx.padded):
            if n:
                h, hg = next(kept), next(kept)
                first = slot not in seen
                seen.add(slot)
                g = dy[pstart : pstart + p]
                xs = x[pstart : pstart + p]
                s = act(hg) if gated else None
                if dw_out is not None:  # the activation output, recomputed: bit for bit forward's
                    accumulate(dw_out, slot, first, (s * h if gated else act(h)).t(), g)
                accumulate_bias(db_out, slot, first, g)
                da = gemm.mm(g, w_out[slot].t())
                if gated:  # da is not needed after: the gate's gradient is written over it
                    dh = s.mul_(da)
                    dhg = act_backward(da.mul_(h), hg)
                    accumulate(dw_gate, slot, first, xs.t(), dhg)
                    accumulate_bias(db_gate, slot, first, dhg)
                else:
                    dh, dhg = act_backward(da, h), None
                accumulate(dw_in, slot, first, xs.t(), dh)
                accumulate_bias(db_in, slot, first, dh)
                if dx is not None:  # the given rows only: the padding rows' input gradients are dropped
                    gemm.mm(dh, w_in[slot].t(), out=dx[start : start + n])
                    if dhg is not None:
                        gemm.addmm_(dx[start : start + n], dhg, w_gate[slot].t())
            start, pstart = start + n, pstart + p
        unseen = [s for s in range(w_in.shape[0]) if s not in seen]
        for grad in (dw_in, dw_out, dw_gate, db_in, db_out, db_gate):
            if grad is not None and unseen:
                grad[unseen] = 0
        has_b_in, has_b_out, has_b_gate = ctx.has_bias
        return (
            dx,
            None,
            None,
            None,
            dw_in,
            dw_out,
            dw_gate,
            db_in if has_b_in else None,
            db_out if has_b_out else None,
            db_gate if has_b_gate else None,
        )


def pad_segments(segments: Sequence[tuple[int, int]], gemm: Gemm) -> tuple[torch.Tensor | None, list[tuple[int, int]]]:
    """The segments with the row counts ``gemm`` wants (``Gemm.rows``), and the positions of the given rows among the
    padded ones (None where nothing is padded). Padding rows are zero, and so are their output gradients: they add
    nothing to any weight or bias gradient."""
    padded = [(slot, gemm.rows(n) if n else 0) for slot, n in segments]
    if all(p == n for (_, p), (_, n) in zip(padded, segments)):
        return None, list(segments)
    lengths = torch.tensor([n for _, n in segments], dtype=torch.int64)
    sizes = torch.tensor([p for _, p in padded], dtype=torch.int64)
    shift = (torch.cumsum(sizes, 0) - sizes) - (torch.cumsum(lengths, 0) - lengths)
    return torch.repeat_interleave(shift, lengths) + torch.arange(int(lengths.sum())), padded


def merge_by_slot(
    segments: Sequence[tuple[int, int]], device: torch.device | str = "cpu"
) -> tuple[torch.Tensor | None, list[tuple[int, int]]]:
    """A row permutation that makes each slot's rows one segment, in slot order (None when they already are), and
    those segments.

    After an all-to-all an expert's rows come in one segment per source rank; one GEMM over all of them is cheaper
    than several (the weight-gradient GEMM's inner dimension is the segment's row count), and a grouped GEMM takes
    the groups in slot order. ``rows[perm]`` is in merged order; the permutation is built with a handful of tensor
    ops, whatever the number of segments.
    """
    kept = [(s, n) for s, n in segments if n]
    slots = [s for s, _ in kept]
    if all(a < b for a, b in zip(slots, slots[1:])):
        return None, kept
    lengths = torch.tensor([n for _, n in segments], dtype=torch.int64)
    starts = torch.cumsum(lengths, 0) - lengths
    order = torch.argsort(torch.tensor([s for s, _ in segments]), stable=True)
    sel_len, sel_start = lengths[order], starts[order]
    # row j of the merged order is source row sel_start[seg(j)] + (j - first row of seg(j) in merged order)
    shift = sel_start - (torch.cumsum(sel_len, 0) - sel_len)
    perm = torch.repeat_interleave(shift, sel_len) + torch.arange(int(lengths.sum()))
    merged: dict[int, int] = {}
    for s, n in sorted(kept, key=lambda seg: seg[0]):
        merged[s] = merged.get(s, 0) + n
    return perm.to(device, non_blocking=True), list(merged.items())  # (a blocking copy would sync the device)
