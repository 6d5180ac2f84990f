"""The grouped expert FFN as two autograd functions, each over every segment: no per-segment graph nodes, no cat,
weight gradients written straight into their stacked tensors.

Why: with many small experts (DeepSeekMoE-style 64+ per layer) a loop of autograd ops pays, per segment, three graph
nodes, a split and a cat of the rows, and an ``unbind`` whose backward stacks every expert's weight gradient into a
new tensor (a full copy of the bank's gradients per step). Here forward writes each segment's result into one
preallocated buffer, and backward writes each expert's weight gradient into its row of the stacked gradient (``mm``
with ``out=`` the first time an expert is seen, ``addmm_`` after). Activations and their derivatives are aten's own
(``gelu_backward``, ``silu_backward``), so results match autograd's.

Why two (``ExpertUp``: the input projections, x -> pre-activations; ``ExpertDown``: activation and output
projection): memory at the end of backward, where a training step peaks (every weight gradient exists by then). A
function's saved tensors and incoming gradient live until its backward returns; as one function, the output gradient
and the pre-activations stayed alive while the input projections' gradients were made. Split, the second half's
backward frees them first, and turns the pre-activations' buffers' worth into their gradients, as autograd's own op by
op graph does (a 4-layer Mixtral's training step peaked 4.9 MB above transformers' as one function, at its bytes as
two; ``ExpertUp`` gathering its own rows took it below: docs/BENCHMARKS.md, hf).

Nothing is kept that backward can recompute cheaply: ``ExpertDown`` saves the pre-activations (and the gate's) only and
recomputes the activation output from them (one elementwise op per segment), a third of the FFN's saved activations.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .activations import DERIVATIVES, GATE_OF, PLAIN
from .cpu_gemm import Gemm


@dataclass(frozen=True)
class Layout:
    """Where each segment's rows lie: ``segments`` [(slot, n)] over the given rows, ``padded`` [(slot, p)] over the
    computed ones (p >= n: the row counts ``gemm`` wants, ``pad_segments``), ``index`` the given rows' positions among
    the computed ones (None where nothing is padded)."""

    segments: list[tuple[int, int]]
    padded: list[tuple[int, int]]
    index: torch.Tensor | None

    @staticmethod
    def of(segments: Sequence[tuple[int, int]], gemm: Gemm) -> Layout:
        index, padded = pad_segments(segments, gemm)
        return Layout(list(segments), padded, index)

    @property
    def rows(self) -> int:
        """Given rows."""
        return sum(n for _, n in self.segments)

    @property
    def computed(self) -> int:
        """Computed rows (padding included)."""
        return sum(p for _, p in self.padded)

    def spans(self):
        """(slot, start among the given rows, n, start among the computed rows, p) of each non-empty segment."""
        start = pstart = 0
        for (slot, n), (_, p) in zip(self.segments, self.padded):
            if n:
                yield slot, start, n, pstart, p
            start, pstart = start + n, pstart + p

    def pad(self, t: torch.Tensor) -> torch.Tensor:
        """Given rows -> computed rows, the padding rows zero (they then add nothing to any weight gradient)."""
        if self.index is None:
            return t.contiguous()
        return t.new_zeros(self.computed, t.shape[1]).index_copy_(0, self.index, t)


class Stacked:
    """One stacked weight's gradient, written per slot: ``mm`` into a slot's row the first time it is seen,
    ``addmm_`` after; slots never seen are zeroed at the end."""

    def __init__(self, w: torch.Tensor | None, needed: bool, gemm: Gemm, bias: bool = False) -> None:
        """``w``: the stacked weight [E, k, m]; ``bias``: the gradient of its bias [E, m] instead."""
        shape = None if w is None or not needed else ((w.shape[0], w.shape[2]) if bias else w.shape)
        self.grad = None if shape is None else torch.empty(shape, dtype=w.dtype, device=w.device)
        self.gemm, self.seen = gemm, set()

    def add(self, slot: int, a: torch.Tensor, b: torch.Tensor) -> None:
        """grad[slot] += a @ b."""
        if self.grad is not None:
            if slot in self.seen:
                self.gemm.addmm_(self.grad[slot], a, b)
            else:
                self.gemm.mm(a, b, out=self.grad[slot])
                self.seen.add(slot)

    def add_rows(self, slot: int, g: torch.Tensor) -> None:
        """grad[slot] += the sum of g's rows (a bias's gradient)."""
        if self.grad is not None:
            if slot in self.seen:
                self.grad[slot].add_(g.sum(0))
            else:
                torch.sum(g, 0, out=self.grad[slot])
                self.seen.add(slot)

    def result(self) -> torch.Tensor | None:
        if self.grad is not None:
            unseen = [s for s in range(self.grad.shape[0]) if s not in self.seen]
            if unseen:
                self.grad[unseen] = 0
        return self.grad


class ExpertUp(torch.autograd.Function):
    """x -> h = x w_in[slot] + b_in[slot] per segment, and for gated activations hg = x w_gate[slot] + b_gate[slot]
    too; over the computed rows (``Layout``). Weights stacked [E, d, d_ff], biases [E, d_ff] or None.

    With ``token`` ([rows] int64) x is the source [S, d] and the segments' row i is x[token[i]]: the gather is done
    segment by segment inside, in forward and again in backward, and the input gradient is added into [S, d] where the
    rows came from. The whole [rows, d] input is then never saved, nor its [rows, d] gradient made (the gather fused
    into the expert GEMMs, as ScatterMoE does: Tan et al. 2024); x itself is kept alive by the router anyway."""

    @staticmethod
    def forward(ctx, x, token, layout: Layout, gemm: Gemm, w_in, w_gate, b_in, b_gate):  # noqa: D102
        x = layout.pad(x) if token is None else x
        h = x.new_empty(layout.computed, w_in.shape[2])
        hg = None if w_gate is None else torch.empty_like(h)
        for slot, start, n, ps, p in layout.spans():
            xs = segment_rows(x, token, start, n, ps, p)
            gemm.addmm(None if b_in is None else b_in[slot], xs, w_in[slot], out=h[ps : ps + p])
            if hg is not None:
                gemm.addmm(None if b_gate is None else b_gate[slot], xs, w_gate[slot], out=hg[ps : ps + p])
        # through save_for_backward, so that saved-tensor hooks (activation checkpointing, offload) see them all
        ctx.save_for_backward(x, token, w_in, w_gate)
        ctx.layout, ctx.gemm = layout, gemm
        ctx.has_bias = (b_in is not None, b_gate is not None)
        return h if hg is None else (h, hg)

    @staticmethod
    def backward(ctx, dh, dhg=None):  # noqa: D102
        x, token, w_in, w_gate = ctx.saved_tensors
        need, gemm = ctx.needs_input_grad, ctx.gemm
        dx = None
        if need[0]:  # the given rows', or (token) the source's: each row's gradient added where it came from
            dx = x.new_empty(ctx.layout.rows, x.shape[1]) if token is None else torch.zeros_like(x)
        dw_in, dw_gate = Stacked(w_in, need[4], gemm), Stacked(w_gate, need[5], gemm)
        db_in, db_gate = Stacked(w_in, need[6], gemm, bias=True), Stacked(w_gate, need[7], gemm, bias=True)
        for slot, start, n, ps, p in ctx.layout.spans():
            xs, g = segment_rows(x, token, start, n, ps, p), dh[ps : ps + p]
            dw_in.add(slot, xs.t(), g)
            db_in.add_rows(slot, g)
            if w_gate is not None:
                gg = dhg[ps : ps + p]
                dw_gate.add(slot, xs.t(), gg)
                db_gate.add_rows(slot, gg)
            if dx is None:
                continue
            # the given rows only: the padding rows' input gradients are dropped
            d_rows = dx[start : start + n] if token is None else x.new_empty(n, x.shape[1])
            gemm.mm(g, w_in[slot].t(), out=d_rows)
            if w_gate is not None:
                gemm.addmm_(d_rows, dhg[ps : ps + p], w_gate[slot].t())
            if token is not None:
                dx.index_add_(0, token[start : start + n], d_rows)
        has_b_in, has_b_gate = ctx.has_bias
        return (
            dx,
            None,
            None,
            None,
            dw_in.result(),
            dw_gate.result(),
            db_in.result() if has_b_in else None,
            db_gate.result() if has_b_gate else None,
        )


def segment_rows(x: torch.Tensor, token: torch.Tensor | None, start: int, n: int, ps: int, p: int) -> torch.Tensor:
    """One segment's p computed rows: a slice of the (padded) rows, or gathered from the source by ``token``, then
    zero rows up to p."""
    if token is None:
        return x[ps : ps + p]
    t = token[start : start + n]
    if p == n:
        return x.index_select(0, t)
    rows = x.new_zeros(p, x.shape[1])
    torch.index_select(x, 0, t, out=rows[:n])
    return rows


class ExpertDown(torch.autograd.Function):
    """(h, hg) -> y = act(hg) * h w_out[slot] + b_out[slot] per segment (act(h) w_out + b_out where hg is None),
    for the given rows. ``w_out`` [E, d_ff, d], ``b_out`` [E, d] or None."""

    @staticmethod
    def forward(ctx, h, hg, layout: Layout, activation: str, gemm: Gemm, w_out, b_out):  # noqa: D102
        act = PLAIN[GATE_OF.get(activation, activation)]
        y = h.new_empty(layout.rows, w_out.shape[2])
        for slot, start, n, ps, p in layout.spans():
            a = act(hg[ps : ps + p]) * h[ps : ps + p] if hg is not None else act(h[ps : ps + p])
            gemm.addmm(None if b_out is None else b_out[slot], a, w_out[slot], out=y[start : start + n])
        ctx.save_for_backward(h, hg, w_out)
        ctx.layout, ctx.activation, ctx.gemm = layout, activation, gemm
        ctx.has_bias = b_out is not None
        return y

    @staticmethod
    def backward(ctx, dy):  # noqa: D102
        h, hg, w_out = ctx.saved_tensors
        name = GATE_OF.get(ctx.activation, ctx.activation)
        act, act_backward = PLAIN[name], DERIVATIVES[name]
        need, gemm = ctx.needs_input_grad, ctx.gemm
        dy = ctx.layout.pad(dy)  # zero gradients on the padding rows: they add nothing to the weight gradients
        dw_out, db_out = Stacked(w_out, need[5], gemm), Stacked(w_out, need[6], gemm, bias=True)
        inputs = need[0] or need[1]
        dh = torch.empty_like(h) if inputs else None
        dhg = torch.empty_like(hg) if inputs and hg is not None else None
        for slot, _, _, ps, p in ctx.layout.spans():
            g, hs = dy[ps : ps + p], h[ps : ps + p]
            s = act(hg[ps : ps + p]) if hg is not None else None
            if dw_out.grad is not None:  # the activation output, recomputed: bit for bit forward's
                dw_out.add(slot, (s * hs if s is not None else act(hs)).t(), g)
            db_out.add_rows(slot, g)
            if not inputs:
                continue
            if s is None:
                act_backward(gemm.mm(g, w_out[slot].t(), out=dh[ps : ps + p]), hs)
                continue
            da = gemm.mm(g, w_out[slot].t(), out=dhg[ps : ps + p])  # becomes the gate's gradient, in place
            torch.mul(s, da, out=dh[ps : ps + p])
            act_backward(da.mul_(hs), hg[ps : ps + p])
        return dh, dhg, None, None, None, dw_out.result(), db_out.result() if ctx.has_bias else None


def segment_ffn(
    x: torch.Tensor,
    segments: Sequence[tuple[int, int]],
    activation: str,
    gemm: Gemm,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    w_gate: torch.Tensor | None,
    b_in: torch.Tensor | None,
    b_out: torch.Tensor | None,
    b_gate: torch.Tensor | None,
    token: torch.Tensor | None = None,
) -> torch.Tensor:
    """y[seg] = FFN_slot(x[seg]) for each (slot, n) segment, in row order; weights stacked [E, ...], biases optional
    (None). ``gemm`` computes every matrix product, forward and backward (cpu_gemm.py: aten's or oneDNN's).
    ``token``: x is the source [S, d] and row i of the segments is x[token[i]] (``ExpertUp``)."""
    layout = Layout.of(segments, gemm)
    gated = activation in GATE_OF
    up = ExpertUp.apply(x, token, layout, gemm, w_in, w_gate if gated else None, b_in, b_gate if gated else None)
    h, hg = up if gated else (up, None)
    return ExpertDown.apply(h, hg, layout, activation, gemm, w_out, b_out)


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
