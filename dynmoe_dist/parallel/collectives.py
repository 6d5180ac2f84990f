"""Collectives that fail loudly: a dead or stuck peer becomes an error naming the collective, never a silent hang.

The process group's timeout (``init_distributed(timeout_s=...)``) bounds every wait; this wrapper turns the backend's
error into one that says which collective, in which layer, on which group, and what to check.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist

from ..errors import DynMoEError

T = TypeVar("T")


class CollectiveError(DynMoEError, RuntimeError):
    """A collective failed or timed out: usually a peer rank died, hung, or took a different code path."""


def guarded(name: str, fn: Callable[[], T]) -> T:
    """Run one collective; re-raise any backend failure as a CollectiveError naming it."""
    try:
        return fn()
    except (RuntimeError, dist.DistError) as exc:  # DistBackendError and gloo's timeout both land here
        if isinstance(exc, DynMoEError):
            raise
        rank = dist.get_rank() if dist.is_initialized() else 0
        raise CollectiveError(
            f"collective '{name}' failed on rank {rank}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}. "
            "A peer rank most likely died, hung, or is running a different step; check the other ranks' logs. "
            "The wait is bounded by init_distributed(timeout_s=...)."
        ) from exc


def all_to_all_single(
    output: torch.Tensor,
    input: torch.Tensor,
    output_splits: list[int],
    input_splits: list[int],
    group: dist.ProcessGroup | None,
    name: str,
    async_op: bool = False,
):
    """Uneven all-to-all; returns ``output``, or with ``async_op`` a handle whose ``wait()`` is guarded too."""
    work = guarded(
        name,
        lambda: dist.all_to_all_single(output, input, output_splits, input_splits, group=group, async_op=async_op),
    )
    return GuardedWork(work, name) if async_op else output


class GuardedWork:
    """An in-flight collective; waiting on it fails like ``guarded`` does."""

    def __init__(self, work, name: str) -> None:
        self.work, self.name = work, name

    def wait(self) -> None:
        guarded(self.name, self.work.wait)


def all_reduce(t: torch.Tensor, group: dist.ProcessGroup | None, name: str, op=dist.ReduceOp.SUM) -> torch.Tensor:
    guarded(name, lambda: dist.all_reduce(t, op=op, group=group))
    return t
