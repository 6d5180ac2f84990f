"""Variable-size all-to-all with autograd: the backward is the same exchange with the split sizes swapped.

Split sizes come from the real per-destination row counts (exchanged first), so nothing is padded and a zero-size
split is an ordinary case. Every rank enters every exchange, even with no rows at all, so uneven loads never hang.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..parallel.collectives import all_to_all_single


class AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group: dist.ProcessGroup | None, name: str):  # noqa: D102
        ctx.splits, ctx.group, ctx.name = (out_splits, in_splits), group, name
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        return all_to_all_single(out, x.contiguous(), out_splits, in_splits, group, name)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        out_splits, in_splits = ctx.splits
        g = grad.new_empty((sum(in_splits), *grad.shape[1:]))
        all_to_all_single(g, grad.contiguous(), in_splits, out_splits, ctx.group, ctx.name + ".backward")
        return g, None, None, None, None


def all_to_all(
    x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: dist.ProcessGroup | None, name: str
) -> torch.Tensor:
    """Send ``in_splits[r]`` rows of ``x`` to rank r; receive ``out_splits[r]`` rows from rank r."""
    if torch.is_grad_enabled() and not x.requires_grad:
        # record the backward exchange on every rank, or peers whose rows need gradients would wait for us forever
        x = x.detach().requires_grad_()
    return AllToAll.apply(x, out_splits, in_splits, group, name)


def exchange_counts(
    send_counts: torch.Tensor, send_splits: list[int], recv_len: int, world: int, group, name: str
) -> torch.Tensor:
    """Small int64 all-to-all: rank r gets ``send_splits[r]`` counts from each peer, ``recv_len`` from every peer."""
    out = send_counts.new_empty(world * recv_len)
    return all_to_all_single(out, send_counts.contiguous(), [recv_len] * world, send_splits, group, name)
