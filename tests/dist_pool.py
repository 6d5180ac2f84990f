"""A pool of real worker processes on gloo over loopback, started once and reused by many tests.

Starting a process group costs seconds (torch import, rendezvous); tests send picklable module-level functions to
the ranks instead, and each rank returns its result. A failure on any rank fails the test with that rank's traceback;
a rank that does not answer in time fails it too (and the pool is rebuilt), so a hang can never block the suite.

Workers are forked from one server process (multiprocessing's forkserver) that imported torch, torch._dynamo (which
every torch optimizer imports on first use), DeepSpeed and dynmoe_dist once: a rank starts in a fraction of a second
instead of paying those imports (several CPU seconds) again in every worker of every pool. ``context()`` gives that
start method to tests that start their own processes.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import queue
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import torch.multiprocessing as mp

from dynmoe_dist.parallel.bootstrap import free_port, init_local_rank

COLLECTIVE_TIMEOUT_S = 60.0
_GROUPS: dict[int, Any] = {}
# What the fork server imports before it forks any worker (a module that fails to import is skipped by multiprocessing).
# dynmoe_dist.hf brings transformers (seconds of imports that every rank of every Hugging Face case would pay again).
PRELOAD = (
    "torch",
    "torch._dynamo",
    "torch.distributed",
    "deepspeed",
    "dynmoe_dist",
    "dynmoe_dist.hf",
    "dist_pool",
    "train_support",
)


def context():
    """The start method for test worker processes: forked from a server that has the heavy imports done."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(list(PRELOAD))
    return ctx


def groups(ep_size: int):
    """This worker's ParallelGroups for ``ep_size``, created once (group creation is collective)."""
    from dynmoe_dist.parallel import build_groups

    if ep_size not in _GROUPS:
        _GROUPS[ep_size] = build_groups(ep_size)
    return _GROUPS[ep_size]


@contextlib.contextmanager
def logged_exchanges(log: list[str]) -> Iterator[None]:
    """Within: every all-to-all the dispatcher starts ("start NAME") and every async wait ("wait NAME") is appended to
    ``log`` while the real collective runs, so tests can check what overlaps what."""
    from dynmoe_dist.dispatch import all_to_all as a2a
    from dynmoe_dist.parallel import collectives

    start, wait = a2a.all_to_all_single, collectives.GuardedWork.wait

    def logged_start(*args, **kwargs):
        log.append(f"start {args[5]}")
        return start(*args, **kwargs)

    def logged_wait(self):
        log.append(f"wait {self.name}")
        return wait(self)

    a2a.all_to_all_single, collectives.GuardedWork.wait = logged_start, logged_wait
    try:
        yield
    finally:
        a2a.all_to_all_single, collectives.GuardedWork.wait = start, wait


def _worker(rank: int, world: int, port: int, tasks, results, timeout_s: float) -> None:

    import torch.distributed as dist

    os.environ.setdefault("WANDB_MODE", "offline")
    init_local_rank(rank, world, port, timeout_s)
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args = task
        try:
            results.put((rank, True, fn(*args)))
        except BaseException:  # noqa: BLE001 - report everything to the parent
            results.put((rank, False, traceback.format_exc()))
    dist.barrier()
    dist.destroy_process_group()


class DistPool:
    def __init__(self, world: int, collective_timeout_s: float = COLLECTIVE_TIMEOUT_S) -> None:
        ctx = context()
        self.world = world
        self.results = ctx.Queue()
        self.tasks = [ctx.Queue() for _ in range(world)]
        port = free_port()
        self.procs = [
            ctx.Process(
                target=_worker,
                args=(r, world, port, self.tasks[r], self.results, collective_timeout_s),
                daemon=True,
            )
            for r in range(world)
        ]
        for p in self.procs:
            p.start()
        self.broken = False

    def run(self, fn: Callable, *args: Any, timeout_s: float = 180.0) -> list[Any]:
        """Run ``fn(*args)`` on every rank; return the results in rank order."""
        for q in self.tasks:
            q.put((fn, args))
        out: dict[int, Any] = {}
        errors: list[str] = []
        while len(out) + len(errors) < self.world:
            try:
                rank, ok, value = self.results.get(timeout=timeout_s)
            except queue.Empty:
                self.broken = True
                raise AssertionError(
                    f"{fn.__name__}: ranks {sorted(set(range(self.world)) - set(out))} gave no answer "
                    f"within {timeout_s} s"
                ) from None
            if ok:
                out[rank] = value
            else:
                errors.append(f"--- rank {rank} ---\n{value}")
        if errors:
            self.broken = True
            raise AssertionError(f"{fn.__name__} failed:\n" + "\n".join(errors))
        return [out[r] for r in range(self.world)]

    def close(self) -> None:
        if not self.broken:
            for q in self.tasks:
                q.put(None)
            for p in self.procs:
                p.join(timeout=20)
        for p in self.procs:
            if p.is_alive():
                p.kill()
                p.join()


_POOLS: dict[int, DistPool] = {}


def pool(world: int) -> DistPool:
    """A shared pool of ``world`` ranks (rebuilt if a previous test broke it)."""
    p = _POOLS.get(world)
    if p is None or p.broken:
        if p is not None:
            p.close()
        p = _POOLS[world] = DistPool(world)
    return p


def close_pools() -> None:
    for p in _POOLS.values():
        p.close()
    _POOLS.clear()
    # then the fork server itself, waited for: no process is left behind, and the CPU time of every worker it forked
    # counts in this process's children (what `time pytest` reports)
    from multiprocessing import forkserver

    forkserver._forkserver._stop()


atexit.register(close_pools)
