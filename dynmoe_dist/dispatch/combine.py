"""The weighted combine as one autograd function: ``out[t] = base[t] + sum of weight[a] * y[a]`` over the assignments
``a`` of token ``t``.

Why one function: written as autograd ops (a ``cat`` of the dispatcher's pieces, ``y * weight``, ``index_add``), a
layer's combine makes four fresh [A, d] temporaries per step, each written once and read once: the cat, the weighted
rows, and in backward the gathered output gradient and its weighted copy. Here the pieces are read where they lie
(own rows, received rows: no cat) and the rows go in chunks small enough to stay in cache: forward adds each chunk's
weighted rows into the output; backward gathers each chunk's output gradient once and writes from it both the rows'
gradient (one buffer per piece, which the all-to-all's backward sends as is) and the weights' gradient (a row-wise
dot product). The arithmetic is autograd's, in the same order, so results are bitwise those of the plain ops
(``tests/test_combine.py``); ``bench row_ops`` measures the difference.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# rows per chunk on CPU: about this many bytes of rows, so a chunk and its temporaries stay in L2. On a GPU the whole
# piece is one chunk (each chunk is a kernel launch there).
CHUNK_BYTES = 1 << 19


def chunk_rows(x: torch.Tensor) -> int:
    if x.device.type != "cpu":
        return 1 << 62  # any piece in one go
    return max(CHUNK_BYTES // max(x.shape[1] * x.element_size(), 1), 1)


def accumulator(like: torch.Tensor, num_tokens: int, base: torch.Tensor | None = None) -> torch.Tensor:
    """The [S, d] tensor rows are index_added into: zeros, or a copy of ``base``. On CPU bf16/fp16 rows add up in
    fp32 (the caller rounds once at the end), as one ``index_add`` over all rows does there: adding chunk by chunk in
    the rows' own dtype would round after each chunk. On a GPU ``index_add`` adds atomically in the rows' dtype, one
    piece per call, as the plain op does."""
    acc = torch.float32 if like.element_size() < 4 and like.device.type == "cpu" else like.dtype
    if base is None:
        return like.new_zeros((num_tokens, like.shape[1]), dtype=acc)
    return base.to(acc, copy=True)


class WeightedCombine(torch.autograd.Function):
    """Pieces of [rows, d] in assignment order (their row counts add up to A), ``token`` and ``weight`` [A]."""

    @staticmethod
    def forward(ctx, token, weight, base, num_tokens: int, *pieces):  # noqa: D102
        first = pieces[0]
        out = accumulator(first, num_tokens, base)
        step = chunk_rows(first)
        scratch = first.new_empty(min(step, max(p.shape[0] for p in pieces)), first.shape[1])
        start = 0
        for piece in pieces:
            for s in range(0, piece.shape[0], step):
                e = min(s + step, piece.shape[0])
                a, b = start + s, start + e
                weighted = torch.mul(piece[s:e], weight[a:b, None], out=scratch[: e - s])
                out.index_add_(0, token[a:b], weighted.to(out.dtype))
            start += piece.shape[0]
        ctx.save_for_backward(token, weight, *pieces)
        ctx.has_base = base is not None
        return out.to(first.dtype)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        token, weight, *pieces = ctx.saved_tensors
        need = ctx.needs_input_grad
        grad = grad.contiguous()
        d_weight = torch.empty_like(weight) if need[1] else None
        d_pieces = [torch.empty_like(p) if need[4 + i] else None for i, p in enumerate(pieces)]
        step = chunk_rows(grad)
        scratch = grad.new_empty(min(step, max(p.shape[0] for p in pieces)), grad.shape[1])
        start = 0
        for piece, d_piece in zip(pieces, d_pieces, strict=True):
            for s in range(0, piece.shape[0], step):
                e = min(s + step, piece.shape[0])
                a, b = start + s, start + e
                rows = grad.index_select(0, token[a:b])  # the backward of index_add: each row's output gradient
                if d_piece is not None:
                    torch.mul(rows, weight[a:b, None], out=d_piece[s:e])
                if d_weight is not None:
                    torch.sum(torch.mul(rows, piece[s:e], out=scratch[: e - s]), -1, out=d_weight[a:b])
            start += piece.shape[0]
        d_base = grad if ctx.has_base and need[2] else None
        return None, d_weight, d_base, None, *d_pieces


def combine_rows(
    pieces: Sequence[torch.Tensor] | torch.Tensor,
    token: torch.Tensor,
    weight: torch.Tensor,
    num_tokens: int,
    base: torch.Tensor | None = None,
) -> torch.Tensor:
    """[A, d] expert outputs (one tensor, or pieces in assignment order) -> [S, d]: the weighted sum per token, added
    to ``base`` ([S, d], e.g. the shared experts' output) or to zeros; tokens with k = 0 get ``base`` (or 0)."""
    pieces = [pieces] if isinstance(pieces, torch.Tensor) else list(pieces)
    dtype = pieces[0].dtype
    base = None if base is None else base.to(dtype)
    return WeightedCombine.apply(token, weight.to(dtype), base, num_tokens, *pieces)


def combine_rows_reference(
    pieces: Sequence[torch.Tensor], token: torch.Tensor, weight: torch.Tensor, num_tokens: int, base=None
) -> torch.Tensor:
    """The same combine in plain autograd ops (cat, weighted rows, index_add): the oracle ``combine_rows`` is tested
    against bitwise, and the baseline ``bench row_ops`` times it against."""
    y = torch.cat(list(pieces))
    out = y.new_zeros(num_tokens, y.shape[1]) if base is None else base.to(y.dtype)
    return out.index_add(0, token, y * weight.to(y.dtype).unsqueeze(-1))
