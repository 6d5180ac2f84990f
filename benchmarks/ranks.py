"""Run a benchmark body on N local ranks (spawned processes, gloo over loopback) and collect rank 0's rows."""

from __future__ import annotations

import argparse
import queue
from collections.abc import Callable

import torch.distributed as dist
import torch.multiprocessing as mp

from dynmoe_dist.parallel.bootstrap import free_port, init_local_rank

Body = Callable[[int, int, argparse.Namespace], list[dict]]


def add_shape_args(p: argparse.ArgumentParser, repeats: int) -> None:
    """The layer shapes every multi-rank benchmark shares (the runtime issue's: 2 ranks, 4096 tokens, d=256...)."""
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--tokens", type=int, default=4096, help="tokens per rank")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--d-ff", type=int, default=1024)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--skew", type=float, default=2.0, help="how far skewed tokens lean toward experts 0 and 1")
    p.add_argument("--repeats", type=int, default=repeats)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--json", default=None, help="also write the JSON document here")


def shape_meta(a: argparse.Namespace) -> dict:
    """What every multi-rank benchmark's JSON records about where and at which shapes it ran."""
    return {
        "threads_per_rank": a.threads,
        "world": a.world,
        "tokens_per_rank": a.tokens,
        "d_model": a.d_model,
        "d_ff": a.d_ff,
        "experts": a.experts,
    }


def _rank(rank: int, world: int, port: int, body: Body, a: argparse.Namespace, out) -> None:
    init_local_rank(rank, world, port, timeout_s=600, threads=a.threads)
    rows = body(rank, world, a)
    if rank == 0:
        out.put(rows)
    dist.barrier()
    dist.destroy_process_group()


def run_ranks(body: Body, a: argparse.Namespace) -> list[dict]:
    """``body(rank, world, args)`` on every rank; rank 0's rows. A rank that dies fails the run instead of hanging."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, a.world, port, body, a, out)) for r in range(a.world)]
    for proc in procs:
        proc.start()
    while True:
        try:
            rows = out.get(timeout=2)
            break
        except queue.Empty:
            failed = [proc.exitcode for proc in procs if proc.exitcode not in (None, 0)]
            if failed:
                for proc in procs:
                    proc.kill()
                raise SystemExit(f"a benchmark rank failed (exit code {failed[0]})") from None
    for proc in procs:
        proc.join()
    return rows
