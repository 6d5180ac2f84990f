"""Variable-size all-to-all with autograd: the backward is the same exchange with the split sizes swapped.

Split sizes come from the real per-destination row counts (exchanged first), so nothing is padded and a zero-size
split is an ordinary case. Every rank enters every exchange, even with no rows at all, so uneven loads never hang.

Two forms: ``all_to_all`` (blocking), and ``start_all_to_all`` / ``finish_all_to_all`` (the rows travel while the
caller computes something else; the backward overlaps the same way, see ``ExpertParallelDispatcher``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..parallel.collectives import GuardedWork, all_to_all_single, guarded


def _requiring_grad(x: torch.Tensor) -> torch.Tensor:
    # record the backward exchange on every rank, or peers whose rows need gradients would wait for us forever
    if torch.is_grad_enabled() and not x.requires_grad:
        return x.detach().requires_grad_()
    return x


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
    return AllToAll.apply(_requiring_grad(x), out_splits, in_splits, group, name)


@dataclass
class InFlight:
    """An exchange between its start and its finish, forward or backward."""

    out_splits: list[int]
    in_splits: list[int]
    group: dist.ProcessGroup | None
    name: str
    work: GuardedWork | None = None
    send: torch.Tensor | None = None  # kept alive until the exchange is done
    grad: torch.Tensor | None = None  # the backward exchange's result


class StartAllToAll(torch.autograd.Function):
    """Forward: start the exchange, return the (not yet filled) receive buffer. Backward: wait for the reverse
    exchange that ``FinishAllToAll.backward`` started, and return its result."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, flight: InFlight):  # noqa: D102
        ctx.flight = flight
        out = x.new_empty((sum(flight.out_splits), *x.shape[1:]))
        flight.send = x.contiguous()
        flight.work = all_to_all_single(
            out, flight.send, flight.out_splits, flight.in_splits, flight.group, flight.name, async_op=True
        )
        return out

    @staticmethod
    def backward(ctx, _unused):  # noqa: D102
        flight = ctx.flight
        flight.work.wait()
        grad, flight.grad, flight.send = flight.grad, None, None
        return grad, None


class FinishAllToAll(torch.autograd.Function):
    """Forward: wait until the rows have arrived. Backward: start the reverse exchange of their gradients."""

    @staticmethod
    def forward(ctx, buf: torch.Tensor, flight: InFlight):  # noqa: D102
        ctx.flight = flight
        flight.work.wait()
        flight.send = None
        return buf.view_as(buf)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        flight = ctx.flight
        flight.send = grad.contiguous()
        flight.grad = grad.new_empty((sum(flight.in_splits), *grad.shape[1:]))
        flight.work = all_to_all_single(
            flight.grad,
            flight.send,
            flight.in_splits,
            flight.out_splits,
            flight.group,
            flight.name + ".backward",
            async_op=True,
        )
        return grad, None  # a placeholder: StartAllToAll.backward returns the exchanged gradient


def start_all_to_all(
    x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: dist.ProcessGroup | None, name: str
) -> tuple[torch.Tensor, InFlight]:
    """Begin an exchange; the returned buffer may be read only after ``finish_all_to_all``."""
    flight = InFlight(out_splits, in_splits, group, name)
    return StartAllToAll.apply(_requiring_grad(x), flight), flight


def finish_all_to_all(buf: torch.Tensor, flight: InFlight) -> torch.Tensor:
    return FinishAllToAll.apply(buf, flight)


def exchange_counts(
    send_counts: torch.Tensor,
    send_splits: list[int],
    recv_len: int,
    world: int,
    group,
    name: str,
    async_op: bool = False,
):
    """Small int64 all-to-all: rank r gets ``send_splits[r]`` counts from each peer, ``recv_len`` from every peer.

    With ``async_op``: (the receive buffer, a handle to ``wait()`` on before reading it), so that work which needs
    only this rank's own counts runs while the counts travel.
    """
    out = send_counts.new_empty(world * recv_len)
    sent = all_to_all_single(out, send_counts.contiguous(), [recv_len] * world, send_splits, group, name, async_op)
    return (out, sent) if async_op else out


def gather_counts(counts: torch.Tensor, world: int, group, name: str) -> tuple[torch.Tensor, GuardedWork]:
    """Every rank's whole count vector, started: ([world * len(counts)] buffer, handle). Shadow experts need the
    world's loads on every rank (``shadow.plan_shadows``); the all-to-all above sends each rank only its own column."""
    out = counts.new_empty(world * counts.numel())
    work = guarded(name, lambda: dist.all_gather_single(out, counts.contiguous(), group=group, async_op=True))
    return out, GuardedWork(work, name)
