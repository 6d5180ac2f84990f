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

Gradients: the copies are leaf tensors; their gradients are summed over the expert-parallel group in one
all-reduce per layer when the backward pass ends (a callback queued by the layer output's backward, as DDP queues its
own), and each owner adds its experts' sums into their ``.grad``. Every rank registers the same shadows in the same
order (the decision is a function of the gathered counts), so the reductions match across ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..parallel.collectives import all_reduce, guarded

SHADOW_TOLERANCE = 0.02  # the busiest rank within 2% of the mean rows: nothing to shadow
# A shadow moving fewer rows than this in all is not worth its weights' broadcast and gradient all-reduce (2 MB each
# way for a 256x1024 FFN: about 3 ms on loopback gloo, the compute of some 200 rows on one CPU core).
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


@dataclass
class PendingShadows:
    """One layer's shadows of one forward, waiting for the end of the backward to sum their gradients."""

    shadows: list[Shadow]
    copies: dict[str, torch.Tensor]
    owned: dict[str, torch.Tensor]  # the owner's stacked parameters, by the same names
    me: int
    group: object
    name: str

    def reduce(self) -> None:
        names = sorted(self.copies)
        grads = [
            self.copies[n].grad if self.copies[n].grad is not None else torch.zeros_like(self.copies[n]) for n in names
        ]
        flat = torch.cat([g.reshape(-1) for g in grads])
        all_reduce(flat, self.group, f"{self.name}.shadow.grads")
        for n, summed in zip(names, flat.split([g.numel() for g in grads])):
            summed = summed.view_as(self.copies[n])
            p = self.owned[n]
            for i, sh in enumerate(self.shadows):
                if sh.owner == self.me:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    p.grad[sh.slot].add_(summed[i].to(p.grad.dtype))


_pending: list[PendingShadows] = []
_flush_queued = False


def register(entry: PendingShadows) -> None:
    _pending.append(entry)


def _flush() -> None:
    """End of a backward pass: every layer's shadow gradients, in the order their forwards registered them."""
    global _flush_queued
    _flush_queued = False
    entries = list(_pending)
    _pending.clear()
    for entry in entries:
        entry.reduce()


class FlushAfterBackward(torch.autograd.Function):
    """Identity on the layer's output; its backward (the layer's first, on every rank) queues ``_flush`` to run when
    the whole backward pass is done, after every shadow copy's gradient has been accumulated."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: D102
        global _flush_queued
        if not _flush_queued:
            _flush_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(_flush)
        return grad


def flush_after_backward(out: torch.Tensor) -> torch.Tensor:
    return FlushAfterBackward.apply(out) if out.requires_grad else out
