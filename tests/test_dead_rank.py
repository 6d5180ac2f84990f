"""A rank that dies or hangs mid-step makes the others fail with a clear error naming the collective, in time.

Real processes on gloo with a 5 s collective timeout. Never a silent hang: the parent gives the survivors the timeout
plus a margin, and fails the test if any of them has not reported by then.
"""

from __future__ import annotations

import os
import queue
import time

import pytest
import torch

from dynmoe_dist.parallel.bootstrap import free_port, init_local_rank

import dist_pool

TIMEOUT_S = 5.0
MARGIN_S = 25.0
WORLD = 3


def _worker(rank: int, port: int, mode: str, results) -> None:
    from dynmoe_dist import MoELayer
    from dynmoe_dist.parallel import CollectiveError, build_groups

    init_local_rank(rank, WORLD, port, TIMEOUT_S)
    groups = build_groups(WORLD)
    layer = MoELayer(8, 16, 6, "top_k", groups=groups, seed=0)
    x = torch.randn(32, 8)
    t0 = time.monotonic()
    try:
        for step in range(3):
            if step == 1 and rank == 1:
                if mode == "killed":
                    os._exit(17)  # dies mid-training, no goodbye
                time.sleep(120)  # hung: alive, but never enters the collective
            t0 = time.monotonic()
            y, _ = layer(x)
            y.sum().backward()
        results.put((rank, "finished", 0.0, ""))
    except CollectiveError as exc:
        results.put((rank, "CollectiveError", time.monotonic() - t0, str(exc)))
    except BaseException as exc:  # noqa: BLE001
        results.put((rank, type(exc).__name__, time.monotonic() - t0, str(exc)))
    results.close()
    results.join_thread()  # flush the report before leaving
    os._exit(0)  # the group is broken: leave without a barrier


@pytest.mark.parametrize("mode", ["killed", "hung"])
def test_dead_rank_gives_clear_error_in_time(mode: str) -> None:
    ctx = dist_pool.context()  # forked from a server with torch and dynmoe_dist imported: ranks start at once
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, mode, results), daemon=True) for r in range(WORLD)]
    for p in procs:
        p.start()
    reports = {}
    deadline = time.monotonic() + 60 + TIMEOUT_S + MARGIN_S  # start-up included
    try:
        while len(reports) < WORLD - 1 and time.monotonic() < deadline:
            try:
                rank, kind, elapsed, msg = results.get(timeout=1.0)
                reports[rank] = (kind, elapsed, msg)
            except queue.Empty:
                pass
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()
    survivors = {0, 2}
    assert set(reports) == survivors, f"silent hang: only ranks {sorted(reports)} reported"
    for rank in survivors:
        kind, elapsed, msg = reports[rank]
        assert kind == "CollectiveError", (rank, kind, msg)
        assert "collective 'moe." in msg and "peer rank" in msg, msg
        assert elapsed < TIMEOUT_S + MARGIN_S, f"rank {rank} took {elapsed:.1f} s"
