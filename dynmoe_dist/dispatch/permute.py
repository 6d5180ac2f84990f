"""Permutation of assignments into expert order (its weighted inverse is ``combine.py``).

A stable sort by expert position keeps token order inside each expert's segment, so results do not depend on
how the sort breaks ties. Sized by |A| (the number of assignments), never by experts x capacity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..routing.plan import count_per
from .combine import accumulator, chunk_rows


@dataclass
class Permutation:
    """Assignments sorted by expert: ``counts[e]`` rows per expert, then each sorted row's token and weight."""

    counts: torch.Tensor  # [E] int64
    token: torch.Tensor  # [A] int64, token of each sorted row
    weight: torch.Tensor  # [A] float, combine weight of each sorted row

    def counts_list(self) -> list[int]:
        return self.counts.tolist()


def sort_by_expert(
    token: torch.Tensor,
    expert: torch.Tensor,
    weight: torch.Tensor,
    num_experts: int,
    counts: torch.Tensor | None = None,
) -> Permutation:
    """Everything on the device: no host read (the counts stay a tensor until someone asks for ``counts_list``).
    ``counts``: the assignments per expert, where the caller has them already."""
    order = torch.argsort(expert, stable=True)
    counts = count_per(expert, num_experts) if counts is None else counts
    return Permutation(counts=counts, token=token.index_select(0, order), weight=weight.index_select(0, order))


class GatherPieces(torch.autograd.Function):
    """Rows of ``x`` by ``token``, cut into pieces of ``sizes`` rows (each its own tensor).

    The backward adds each piece's gradient into [S, d] where it lies: what ``index_select`` followed by ``split``
    computes, without the backward of ``split`` (a ``cat`` of all the pieces' gradients into a fresh [A, d]).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, token: torch.Tensor, sizes: list[int], gathered: torch.Tensor | None):  # noqa: D102
        ctx.set_materialize_grads(False)  # a piece nobody used adds nothing
        ctx.save_for_backward(token)
        ctx.sizes, ctx.num_tokens = sizes, x.shape[0]
        if gathered is not None:  # gathered already (``EarlyGather``): the pieces are views of those rows
            return tuple(gathered.split(sizes))
        return tuple(x.index_select(0, t) for t in token.split(sizes))

    @staticmethod
    def backward(ctx, *grads):  # noqa: D102
        (token,) = ctx.saved_tensors
        used = [g for g in grads if g is not None]
        if not used:
            return None, None, None, None
        dx = accumulator(used[0], ctx.num_tokens)
        cast = dx.dtype != used[0].dtype  # bf16/fp16 on CPU: chunks, so each chunk's cast copy stays small
        for t, g in zip(token.split(ctx.sizes), grads, strict=True):
            if g is None:
                continue
            if not cast:
                dx.index_add_(0, t, g)
                continue
            step = chunk_rows(g)
            for s in range(0, g.shape[0], step):
                dx.index_add_(0, t[s : s + step], g[s : s + step].to(dx.dtype))
        return dx.to(used[0].dtype), None, None, None


def gather_pieces(x: torch.Tensor, token: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """[S, d] -> pieces of [sizes[i], d]: one row per assignment, in ``token`` order."""
    return list(GatherPieces.apply(x, token, list(sizes), None))


@dataclass
class EarlyGather:
    """The rows gathered before their piece sizes are known on the host.

    Why: under expert parallelism the sizes come from the counts exchange, and reading them is the dispatch's one
    host sync; the gather is issued before it, so it runs while the counts travel. ``pieces`` then cuts the gathered
    rows into views, with ``gather_pieces``' backward (each piece's gradient added into [S, d] where it lies)."""

    x: torch.Tensor
    token: torch.Tensor
    rows: torch.Tensor

    def pieces(self, sizes: list[int]) -> list[torch.Tensor]:
        return list(GatherPieces.apply(self.x, self.token, list(sizes), self.rows))


def start_gather(x: torch.Tensor, token: torch.Tensor) -> EarlyGather:
    """Gather the rows of ``token`` now (no autograd record yet: ``EarlyGather.pieces`` makes it)."""
    with torch.no_grad():
        return EarlyGather(x, token, x.index_select(0, token))


def gather_rows(x: torch.Tensor, perm: Permutation) -> torch.Tensor:
    """[S, d] -> [A, d]: one row per assignment, in expert order."""
    return x.index_select(0, perm.token)
