"""Shadow experts: a hot expert's rows computed where they come from, with a copy of its weights, for one step.

Why: a dropless layer computes every assignment, so the rank holding this batch's hottest experts computes more rows
than the others and every rank waits for it at the next exchange (DeepSpeed at capacity 1.0 drops those rows
instead). Placement (adapt/) follows the load over a window, but the load moves from batch to batch. FasterMoE's
"shadowing" (He et al., PPoPP'22) removes the per-step imbalance: the owner broadcasts the hot expert's weights, the
other ranks compute some of their own rows for it locally instead of sending them, and the weights' gradients
from those rows are summed back into the owner's gradient after the backward. The owner keeps the only real copy
(optimizer state, checkpoints and adaptation never see a shadow), so nothing outside the dispatcher changes.

Per step and layer, from the [source rank, expert] counts every rank holds after the counts all-gather, every rank
computes the same decision (``plan_shadows``): while the busiest rank computes more than ``1 + SHADOW_TOLERANCE``
times the mean rows, its expert with the most rows from other ranks is shadowed, and each other rank, least loaded
first, keeps up to half its gap to the busiest rank of its rows for it; a shadow that keeps fewer than ``min_rows``
rows in all is not worth its weight transfer, and ends the search.

Gradients: the copies are leaf tensors, made per dispatch in a ``ShadowCopies`` that only that forward's autograd
graph holds (through an identity node on the layer's output). When a backward pass reaches that node, it queues the
reduction of exactly these copies' gradients to run when that backward pass ends (as DDP queues its own): one
all-reduce over the expert-parallel group per layer and backward, then each owner adds its experts' sums into their
``.grad``. Nothing is kept anywhere else, so two layers or models whose forwards interleave, a backward nested in
another, a recomputed forward or a forward that never sees a backward (its copies go with its graph) cannot reduce
each other's copies. Every rank makes the same shadows (the decision is a function of the gathered counts) and runs
the same backward graph, so the reductions are queued, and run, in the same order on every rank.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..parallel.collectives import all_reduce, guarded

SHADOW_TOLERANCE = 0.02  # the busiest rank within 2% of the mean rows: nothing to shadow
# A shadow moving fewer rows than this in all is not worth its weights' broadcast and gradient all-reduce: moving an
# expert's weights each way costs as much as computing a good number of rows with them, and this is of that order
# (measured: docs/BENCHMARKS.md, expert_parallel).
SHADOW_MIN_ROWS = 256


@dataclass(frozen=True)
class Shadow:
    """One expert, copied for one step: its owner, its slot there, its rank-order position, and the rows each
    source rank keeps and computes itself (0 for the owner)."""

    owner: int
    slot: int
    position: int
    keep: tuple[int, ...]


def rank_loads(counts: list[list[int]], offsets: list[int]) -> list[int]:
    """Rows each rank computes: ``counts[source][position]`` in rank order, ``offsets`` the ranks' position blocks."""
    world = len(offsets) - 1
    return [sum(sum(row[offsets[r] : offsets[r + 1]]) for row in counts) for r in range(world)]


def plan_shadows(
    counts: list[list[int]], offsets: list[int], max_shadows: int, min_rows: int, tolerance: float = SHADOW_TOLERANCE
) -> list[Shadow]:
    """The shadows of one step (module docstring); the same on every rank for the same counts."""
    world = len(offsets) - 1
    loads = rank_loads(counts, offsets)
    mean = sum(loads) / max(world, 1)
    shadows: list[Shadow] = []
    taken: set[int] = set()
    while len(shadows) < max_shadows and world > 1:
        busiest = max(range(world), key=lambda r: (loads[r], -r))
        if loads[busiest] <= mean * (1 + tolerance):
            break
        others = [s for s in range(world) if s != busiest]
        candidates = [p for p in range(offsets[busiest], offsets[busiest + 1]) if p not in taken]
        if not candidates:
            break
        hot = max(candidates, key=lambda p: (sum(counts[s][p] for s in others), -p))
        keep = [0] * world
        trial = list(loads)
        for s in sorted(others, key=lambda s: (trial[s], s)):
            k = min(counts[s][hot], max((trial[busiest] - trial[s]) // 2, 0))
            keep[s] = k
            trial[busiest] -= k
            trial[s] += k
        if sum(keep) < max(min_rows, 1):
            break
        loads = trial
        taken.add(hot)
        shadows.append(Shadow(busiest, hot - offsets[busiest], hot, tuple(keep)))
    return shadows


@dataclass
class ShadowRows:
    """One step's shadows as rank ``me`` sees them: the rows it receives per (source rank, its slot), the rows it
    keeps per shadow ((rank-order position, rows)), and per owner rank the rows it keeps instead of sending them."""

    received: list[list[int]]
    kept: list[tuple[int, int]]
    kept_from: list[int]


def shadow_rows(counts: list[list[int]], offsets: list[int], me: int, shadows: list[Shadow]) -> ShadowRows:
    """``counts``: the gathered [source rank][rank-order position] counts the shadows were planned from."""
    received = [row[offsets[me] : offsets[me + 1]] for row in counts]
    kept_from = [0] * (len(offsets) - 1)
    for sh in shadows:
        kept_from[sh.owner] += sh.keep[me]
        if sh.owner == me:  # rows a source keeps for a shadow are not sent to the owner
            for s, k in enumerate(sh.keep):
                received[s][sh.slot] -= k
    return ShadowRows(received, [(sh.position, sh.keep[me]) for sh in shadows if sh.keep[me]], kept_from)


def broadcast_weights(
    shadows: list[Shadow], weights: dict[str, torch.Tensor], me: int, group, name: str
) -> dict[str, torch.Tensor]:
    """Each shadow's weights from its owner to every rank of ``group``: {name: [len(shadows), ...]} leaf tensors
    that collect the gradient of the rows computed with them."""
    names = sorted(weights)
    shapes = [weights[n].shape[1:] for n in names]
    sizes = [s.numel() for s in shapes]
    any_w = weights[names[0]]
    copies = {n: any_w.new_empty((len(shadows), *shape)) for n, shape in zip(names, shapes)}
    for i, sh in enumerate(shadows):
        if sh.owner == me:
            flat = torch.cat([weights[n].detach()[sh.slot].reshape(-1) for n in names])
        else:
            flat = any_w.new_empty(sum(sizes))
        guarded(
            f"{name}.shadow.weights", lambda flat=flat, sh=sh: dist.broadcast(flat, group=group, group_src=sh.owner)
        )
        for n, part, shape in zip(names, flat.split(sizes), shapes):
            copies[n][i].copy_(part.view(shape))
    return {n: c.requires_grad_(torch.is_grad_enabled()) for n, c in copies.items()}


def kept_order(
    counts: list[int], bounds: list[int], me: int, n_self: int, kept: list[tuple[int, int]]
) -> list[tuple[int, int]]:
    """(start, length) ranges of the send order, reordered: own rows, then the rows this rank keeps for each shadow
    ((rank-order position, rows): the first rows of that expert's block), then the rest of the outgoing rows."""
    start, p_start = n_self, {}
    for p in [p for p in range(len(counts)) if not bounds[me] <= p < bounds[me + 1]]:
        p_start[p] = start
        start += counts[p]
    ranges, cut = [(0, n_self)], {}
    for p, k in kept:
        ranges.append((p_start[p], k))
        cut[p_start[p]] = k
    for p in sorted(p_start, key=p_start.get):
        skip = cut.get(p_start[p], 0)
        if counts[p] - skip:
            ranges.append((p_start[p] + skip, counts[p] - skip))
    return [(s, n) for s, n in ranges if n]


@dataclass(eq=False)
class ShadowCopies:
    """One forward's copies of its shadowed experts, and the reduction of their gradients into the owners'.

    Made per dispatch; after the forward only the node ``attach`` puts on the layer output refers to it, so it lives
    exactly as long as that forward's graph, and only a backward through that graph reduces its gradients."""

    shadows: list[Shadow]
    weights: dict[str, torch.Tensor]  # {name: [len(shadows), ...]} leaf copies, broadcast from the owners
    owned: dict[str, torch.Tensor]  # this rank's stacked parameters, by the same names
    me: int
    group: object
    name: str

    @classmethod
    def broadcast(
        cls, shadows: list[Shadow], owned: dict[str, torch.Tensor], me: int, group, name: str
    ) -> ShadowCopies:
        return cls(shadows, broadcast_weights(shadows, owned, me, group, name), owned, me, group, name)

    def compute(self, experts: Callable[..., torch.Tensor], kept: torch.Tensor) -> torch.Tensor:
        """The rows this rank keeps (in shadow order) through ``experts`` with the copies' weights."""
        if not kept.shape[0]:
            return kept.new_zeros(0, kept.shape[1])
        segments = [(i, sh.keep[self.me]) for i, sh in enumerate(self.shadows) if sh.keep[self.me]]
        return experts(kept, segments, self.weights)

    def attach(self, out: torch.Tensor) -> torch.Tensor:
        """``out`` through an identity node that holds these copies; its backward queues ``reduce_grads``."""
        return ReduceAfterBackward.apply(out, self) if out.requires_grad else out

    def reduce_grads(self) -> None:
        """Sum the copies' gradients over the group into the owners' ``.grad``. The copies' ``.grad`` is cleared, so
        a second backward through a retained graph adds its own gradients only."""
        names = sorted(self.weights)
        grads = [
            self.weights[n].grad if self.weights[n].grad is not None else torch.zeros_like(self.weights[n])
            for n in names
        ]
        flat = torch.cat([g.reshape(-1) for g in grads])
        all_reduce(flat, self.group, f"{self.name}.shadow.grads")
        for n, summed in zip(names, flat.split([g.numel() for g in grads])):
            self.weights[n].grad = None
            summed = summed.view_as(self.weights[n])
            p = self.owned[n]
            for i, sh in enumerate(self.shadows):
                if sh.owner == self.me:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    p.grad[sh.slot].add_(summed[i].to(p.grad.dtype))


class ReduceAfterBackward(torch.autograd.Function):
    """Identity on a layer's output that carries its forward's ``ShadowCopies``. Its backward runs before any of the
    layer's other backward nodes and queues the copies' reduction on the backward pass running it, to run when that
    pass is done, after every copy's gradient has been accumulated."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, copies: ShadowCopies) -> torch.Tensor:  # noqa: D102
        ctx.copies = copies
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: D102
        torch.autograd.Variable._execution_engine.queue_callback(ctx.copies.reduce_grads)
        return grad, None
