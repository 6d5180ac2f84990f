"""Self-check of the Tutel benchmark peer (``tutel.moe.moe_layer``) at 1 and 2 real gloo ranks.

Dropless (capacity_factor=0): each rank feeds its own tokens through our MoELayer (top-2) and through the Tutel peer
built with the same router and expert weights, and compares outputs, input gradients and the local experts' weight
gradients (which collect every rank's tokens through the all-to-all). The traffic report is checked against counts
recomputed from plain softmax top-2 routing (capacity = world-wide largest per-expert count). With
capacity_factor=1.0 the output is compared against a reference that drops routes the way Tutel's docstring in
``benchmarks.tutel_peer`` says (first choices before second choices, token order), and the capacity and
dropped count against Tutel's formula and an independent count.
"""

from __future__ import annotations

import pytest

pytest.importorskip("tutel.moe", reason="Tutel is not installed (or fails to import); the Tutel peer is untestable")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from dynmoe_dist import MoELayer  # noqa: E402
from dynmoe_dist.experts import ExpertBank  # noqa: E402

import dist_pool  # noqa: E402

D, D_FF, E, K, TOKENS = 16, 32, 4, 2, 48
SEED = 7
CLOSE = dict(atol=2e-5, rtol=1e-5)
ROUTER = {"kind": "top_k", "k": K, "balance_weight": 0.0}


def _tokens(rank: int, skew: float, router_weight: torch.Tensor, uneven: bool) -> torch.Tensor:
    """Rank r's tokens lean toward expert r (more with ``skew``), so counts differ across ranks; ``uneven``: rank r
    also holds 8 * r more tokens."""
    g = torch.Generator().manual_seed(1000 + rank)
    x = torch.randn(TOKENS + 8 * rank * uneven, D, generator=g)
    lean = router_weight[rank % E] / router_weight[rank % E].norm()
    return x + skew * lean * (torch.rand(x.shape[0], 1, generator=g) < 0.6)


def _grad_out(rank: int, n: int) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(2000 + rank))


def _routes(x: torch.Tensor, router_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain top-k of softmax(x W^T), weights renormalised over the k: ([T, K] expert ids, [T, K] weights)."""
    probs = F.softmax(x @ router_weight.t(), dim=-1)
    top_p, top_e = probs.topk(K, dim=-1)
    return top_e, top_p / top_p.sum(dim=-1, keepdim=True)


def _reference(x, router_weight, w_in, w_out, capacity: int | None) -> tuple[torch.Tensor, int]:
    """Top-k MoE; with ``capacity``, each expert keeps its first ``capacity`` routes in the order all first choices
    (by token), then all second choices. Returns (output, number of dropped routes)."""
    top_e, weights = _routes(x, router_weight)
    keep = torch.ones_like(weights, dtype=torch.bool)
    if capacity is not None:
        seen = [0] * E
        for j in range(K):
            for t in range(x.shape[0]):
                e = int(top_e[t, j])
                keep[t, j] = seen[e] < capacity
                seen[e] += 1
    out = torch.zeros_like(x)
    for j in range(K):
        e = top_e[:, j]
        h = F.gelu(torch.einsum("td,tdf->tf", x, w_in[e]))
        y = torch.einsum("tf,tfd->td", h, w_out[e])
        out = out + (weights[:, j : j + 1] * keep[:, j : j + 1]) * y
    return out, int((~keep).sum())


def _setup(skew: float, uneven: bool):
    from benchmarks.tutel_peer import build_tutel_moe  # noqa: F401 - import check on the rank

    world, rank = dist.get_world_size(), dist.get_rank()
    groups = dist_pool.groups(world)
    ours = MoELayer(D, D_FF, E, ROUTER, groups=groups, seed=SEED)
    full = ExpertBank(D, D_FF, list(range(E)), "gelu", seed=SEED)
    router_weight = ours.router.weight.detach().clone()
    xs = [_tokens(r, skew, router_weight, uneven) for r in range(world)]
    return world, rank, groups, ours, full, router_weight, xs


def case_dropless_matches_ours(bias: bool) -> dict:
    from benchmarks.tutel_peer import build_tutel_moe, tutel_local_expert_range, tutel_traffic

    world, rank, groups, ours, full, router_weight, xs = _setup(skew=1.5, uneven=True)
    w_in, w_out = full.w_in.detach(), full.w_out.detach()
    peer = build_tutel_moe(D, D_FF, E, K, router_weight, w_in, w_out, groups.ep_group, capacity_factor=0.0, bias=bias)

    x_ours = xs[rank].clone().requires_grad_()
    x_peer = xs[rank].clone().requires_grad_()
    g = _grad_out(rank, x_ours.shape[0])
    y_ours, _ = ours(x_ours)
    y_ours.backward(g)
    y_peer, traffic = tutel_traffic(peer, x_peer)
    y_peer.backward(g)
    torch.testing.assert_close(y_peer, y_ours, **CLOSE)
    torch.testing.assert_close(x_peer.grad, x_ours.grad, **CLOSE)
    # the function itself, not just agreement with ours: plain top-2 reference
    torch.testing.assert_close(y_peer, _reference(xs[rank], router_weight, w_in, w_out, None)[0], **CLOSE)

    # local experts' weight gradients (every rank's routes to them), matched to ours by global expert id
    local = tutel_local_expert_range(E, groups.ep_group)
    slot = {int(e): i for i, e in enumerate(ours.experts.expert_ids)}
    assert sorted(slot) == list(local), (sorted(slot), local)
    for j, e in enumerate(local):
        torch.testing.assert_close(peer.experts.batched_fc1_w.grad[j], ours.experts.w_in.grad[slot[e]].t(), **CLOSE)
        torch.testing.assert_close(peer.experts.batched_fc2_w.grad[j], ours.experts.w_out.grad[slot[e]], **CLOSE)

    # traffic against an independent count over every rank's tokens
    counts = [torch.bincount(_routes(x, router_weight)[0].reshape(-1), minlength=E) for x in xs]
    capacity = int(max(int(c.max()) for c in counts))
    total = sum(counts)
    assert traffic.capacity == capacity, (traffic.capacity, capacity)
    assert traffic.exp_counts == tuple(counts[rank].tolist())
    assert traffic.global_local_counts == tuple(int(total[e]) for e in local)
    assert traffic.assignments_sent == K * xs[rank].shape[0]
    assert traffic.dropped == 0 and traffic.dropped_fraction == 0.0
    assert traffic.rows_computed == traffic.rows_per_all_to_all == E * capacity
    assert traffic.bytes_per_all_to_all == (E * capacity * D * 4 if world > 1 else 0)
    assert traffic.forward_backward_bytes == 4 * traffic.bytes_per_all_to_all
    assert traffic.send_padding == pytest.approx(E * capacity / (K * xs[rank].shape[0]))
    return traffic.as_dict()


def case_capacity_factor_one() -> dict:
    from benchmarks.tutel_peer import build_tutel_moe, tutel_traffic

    world, rank, groups, _ours, full, router_weight, xs = _setup(skew=3.0, uneven=False)
    w_in, w_out = full.w_in.detach(), full.w_out.detach()
    peer = build_tutel_moe(D, D_FF, E, K, router_weight, w_in, w_out, groups.ep_group, capacity_factor=1.0)

    n = xs[rank].shape[0]
    capacity = K * int(1.0 * -(-n // E))  # Tutel: k * int(cf * ceil(S / E)), from this rank's own token count
    x_peer = xs[rank].clone().requires_grad_()
    x_ref = xs[rank].clone().requires_grad_()
    y_peer, traffic = tutel_traffic(peer, x_peer)
    y_ref, dropped = _reference(x_ref, router_weight, w_in, w_out, capacity)
    g = _grad_out(rank, n)
    y_peer.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(y_peer, y_ref, **CLOSE)
    torch.testing.assert_close(x_peer.grad, x_ref.grad, **CLOSE)

    counts = torch.bincount(_routes(xs[rank], router_weight)[0].reshape(-1), minlength=E)
    assert dropped == int((counts - capacity).clamp(min=0).sum())
    assert dropped > 0, "the skewed tokens must overflow some expert, or this case tests nothing"
    assert traffic.capacity == capacity, (traffic.capacity, capacity)
    assert traffic.dropped == dropped, (traffic.dropped, dropped)
    assert traffic.dropped_fraction == pytest.approx(dropped / (K * n))
    assert traffic.rows_computed == E * capacity
    assert traffic.bytes_per_all_to_all == (E * capacity * D * 4 if world > 1 else 0)
    return traffic.as_dict()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "zero_bias"])
def test_tutel_dropless_matches_ours(world: int, bias: bool):
    reports = dist_pool.pool(world).run(case_dropless_matches_ours, bias)
    assert len({r["capacity"] for r in reports}) == 1  # the all-reduce MAX made it world-wide
    if world > 1:
        assert reports[0]["num_local_experts"] == E // world


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world", [1, 2])
def test_tutel_capacity_factor_one_drops_like_its_rule(world: int):
    # Equal token counts on every rank: with capacity_factor > 0 each rank sizes its [E, C, d] buffer from its own
    # token count (no all-reduce), and Tutel's equal-split all-to-all needs the same C everywhere.
    reports = dist_pool.pool(world).run(case_capacity_factor_one)
    assert len({r["capacity"] for r in reports}) == 1
    assert all(r["dropped"] > 0 for r in reports)
