"""Self-check of the DeepSpeed-MoE benchmark peer on 2 real gloo processes over loopback.

Each rank feeds its own tokens through ``build_deepspeed_moe`` and compares, against a plain single-process
reference (softmax top-2, renormalised weights, bias-free GELU experts): the output, the input gradient, the router
gradient and its local experts' weight gradients (which collect both ranks' tokens through the all-to-all). It also
checks the traffic report (capacity = world-wide maximum per-expert count, rows computed, padding) against counts
recomputed from the reference routing. Runs standalone too: ``python tests/test_deepspeed_peer.py``.
"""

from __future__ import annotations

import importlib.util
import os
import queue
import sys
import time
import traceback

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from dynmoe_dist.parallel.bootstrap import free_port, init_local_rank

WORLD = 2
EP = 2
D, D_FF, E, K, TOKENS = 16, 32, 4, 2, 64
PROCESS_TIMEOUT_S = 90.0
COLLECTIVE_TIMEOUT_S = 45.0


def _weights(requires_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    router = torch.randn(E, D, generator=g)
    w_in = torch.randn(E, D, D_FF, generator=g) / D**0.5
    w_out = torch.randn(E, D_FF, D, generator=g) / D_FF**0.5
    return tuple(t.requires_grad_(requires_grad) for t in (router, w_in, w_out))


def _tokens(rank: int) -> torch.Tensor:
    return torch.randn(TOKENS, D, generator=torch.Generator().manual_seed(1000 + rank))


def _grad_out(rank: int) -> torch.Tensor:
    return torch.randn(TOKENS, D, generator=torch.Generator().manual_seed(2000 + rank))


def reference_moe(
    x: torch.Tensor, router: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of softmax(x W^T), weights renormalised over the k, sum of weight * gelu(x @ w_in[e]) @ w_out[e]."""
    probs = F.softmax(x @ router.t(), dim=-1)
    top_p, top_e = probs.topk(k, dim=-1)
    weights = top_p / top_p.sum(dim=-1, keepdim=True)
    out = torch.zeros_like(x)
    for j in range(k):
        e = top_e[:, j]
        h = F.gelu(torch.einsum("td,tdf->tf", x, w_in[e]))
        out = out + weights[:, j : j + 1] * torch.einsum("tf,tfd->td", h, w_out[e])
    return out, top_e


def _check_rank(rank: int) -> dict:
    from benchmarks.deepspeed_peer import (
        build_deepspeed_moe,
        deepspeed_traffic,
        init_deepspeed_groups,
        local_expert_range,
    )

    close = dict(atol=1e-5, rtol=1e-5)
    init_deepspeed_groups(EP)
    router, w_in, w_out = _weights()
    moe = build_deepspeed_moe(D, D_FF, E, EP, K, router, w_in, w_out, drop_tokens=False)
    local = local_expert_range(E, EP)
    assert local == range(rank * E // EP, (rank + 1) * E // EP), local

    x = _tokens(rank).requires_grad_(True)
    out, traffic = deepspeed_traffic(moe, x)
    out.backward(_grad_out(rank))

    # Reference over both ranks' tokens: output and input grad for ours, expert grads summed over both.
    r_router, r_in, r_out = _weights(requires_grad=True)
    outs, tops, xs = {}, {}, {}
    for r in range(WORLD):
        xs[r] = _tokens(r).requires_grad_(True)
        outs[r], tops[r] = reference_moe(xs[r], r_router, r_in, r_out, K)
    torch.testing.assert_close(out, outs[rank], **close)

    # The router is not expert-parallel: DeepSpeed leaves its gradient local (the engine would all-reduce it).
    (router_grad,) = torch.autograd.grad((outs[rank] * _grad_out(rank)).sum(), r_router, retain_graph=True)
    sum((outs[r] * _grad_out(r)).sum() for r in range(WORLD)).backward()
    torch.testing.assert_close(x.grad, xs[rank].grad, **close)
    torch.testing.assert_close(moe.deepspeed_moe.gate.wg.weight.grad, router_grad, **close)
    for expert, e in zip(moe.deepspeed_moe.experts.deepspeed_experts, local):
        torch.testing.assert_close(expert.fc_in.weight.grad, r_in.grad[e].t(), **close)
        torch.testing.assert_close(expert.fc_out.weight.grad, r_out.grad[e].t(), **close)

    counts = {r: torch.bincount(tops[r].reshape(-1), minlength=E) for r in range(WORLD)}
    capacity = int(max(c.max() for c in counts.values()))
    total = sum(counts.values())
    assert traffic.capacity == capacity, (traffic.capacity, capacity)
    assert traffic.exp_counts == tuple(counts[rank].tolist())
    assert traffic.assignments_sent == TOKENS * K
    assert traffic.global_local_counts == tuple(int(total[e]) for e in local)
    assert traffic.rows_computed == E * capacity  # EP source ranks x E/EP local experts x capacity
    assert traffic.rows_per_all_to_all == E * capacity
    assert traffic.rows_off_rank_per_all_to_all == (E - E // EP) * capacity
    assert traffic.bytes_per_all_to_all == E * capacity * D * 4
    assert traffic.forward_backward_bytes == 2 * traffic.forward_bytes == 4 * traffic.bytes_per_all_to_all
    assert traffic.compute_padding >= 1.0 and traffic.send_padding >= 1.0
    assert traffic.compute_padding == pytest.approx(E * capacity / int(total[list(local)].sum()))
    assert traffic.send_padding == pytest.approx(E * capacity / (TOKENS * K))
    return traffic.as_dict()


def _worker(rank: int, port: int, results) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    import torch.distributed as dist

    init_local_rank(rank, WORLD, port, COLLECTIVE_TIMEOUT_S)
    try:
        results.put((rank, None, _check_rank(rank)))
    except BaseException:  # noqa: BLE001 - every failure goes back to the parent
        results.put((rank, traceback.format_exc(), None))
    finally:
        dist.barrier()
        dist.destroy_process_group()


def run_two_ranks() -> dict[int, dict]:
    """Start both ranks, collect their reports; any failure, crash or hang raises."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, results), daemon=True) for r in range(WORLD)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + PROCESS_TIMEOUT_S
    reports: dict[int, dict] = {}
    errors: list[str] = []
    try:
        while len(reports) + len(errors) < WORLD:
            try:
                rank, err, report = results.get(timeout=max(deadline - time.monotonic(), 0.1))
            except queue.Empty:
                dead = [f"rank {r} exit code {p.exitcode}" for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
                if dead or time.monotonic() >= deadline:
                    raise AssertionError(f"ranks did not report within {PROCESS_TIMEOUT_S}s; {dead}") from None
                continue
            if err is None:
                reports[rank] = report
            else:
                errors.append(f"rank {rank}:\n{err}")
        for p in procs:
            p.join(timeout=max(deadline - time.monotonic(), 1.0))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        assert not hung, f"ranks {hung} did not exit (teardown hang)"
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    assert not errors, "\n".join(errors)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return reports


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")
@pytest.mark.timeout(180)
def test_deepspeed_moe_matches_reference_on_two_ranks():
    reports = run_two_ranks()
    assert sorted(reports) == list(range(WORLD))
    assert reports[0]["capacity"] == reports[1]["capacity"]  # the all-reduce MAX made it world-wide


if __name__ == "__main__":
    for rank, report in sorted(run_two_ranks().items()):
        print(f"rank {rank}: {report}")
