"""Expert-parallel layer against deepspeed.moe.layer.MoE: same ranks, same router and expert weights, one job.

Two scenarios at 2 ranks (4096 tokens per rank, d=256, d_ff=1024, 8 experts, top-2, DeepSpeed dropless):
(a) balanced routing; (b) skewed routing, where most tokens pick the same two experts. Reported: forward+backward
time of each and their ratio (interleaved in the same processes), rows moved per assignment (padding ratio: ours is
exactly 1.0), rows computed per assignment, and all-to-all bytes per forward+backward. Both layers' outputs are
compared first, so the timing compares the same computation.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

from ..adapt.planner import plan_placement
from ..experts import ExpertBank
from ..layer import MoELayer
from ..parallel import build_groups
from .deepspeed_peer import build_deepspeed_moe, deepspeed_traffic, init_deepspeed_groups
from .ranks import add_shape_args, run_ranks, shape_meta
from .report import emit
from .timing import interleaved_medians


def make_tokens(n: int, d: int, rank: int, skew: float, router_weight: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234 + rank)
    x = torch.randn(n, d, generator=g)
    if skew:
        # 80% of the tokens lean toward experts 0 and 1: with top-2 they take both
        unit = router_weight[:2] / router_weight[:2].norm(dim=-1, keepdim=True)
        lean = torch.rand(n, generator=g) < 0.8
        x[lean] += skew * d**0.5 * unit.sum(0) / 2**0.5
    return x


def rebalanced(layer: MoELayer, x: torch.Tensor, groups, a: argparse.Namespace) -> MoELayer:
    """The same layer (same seed, same weights by id) on the placement the planner picks for the observed load."""
    with torch.no_grad():
        _, aux = layer(x)
    load = aux.stats.tokens_per_expert.to(torch.float64)
    dist.all_reduce(load)
    ids = layer.router.expert_ids.tolist()
    table = plan_placement(ids, dict(zip(ids, load.tolist())), groups.ep_size, current=layer.placement)
    router = {"kind": "top_k", "k": 2, "balance_weight": 0.0}
    return MoELayer(a.d_model, a.d_ff, a.experts, router, groups=groups, placement=table, seed=0)


def scenario(name: str, skew: float, a: argparse.Namespace, rank: int, world: int, rebalance: bool = False) -> dict:
    groups = build_groups(world)
    router = {"kind": "top_k", "k": 2, "balance_weight": 0.0}
    ours = MoELayer(a.d_model, a.d_ff, a.experts, router, groups=groups, seed=0)
    full = ExpertBank(a.d_model, a.d_ff, list(range(a.experts)), "gelu", seed=0)
    router_weight = ours.router.weight.detach()
    peer = build_deepspeed_moe(
        a.d_model, a.d_ff, a.experts, world, 2, router_weight, full.w_in.detach(), full.w_out.detach()
    )
    x = make_tokens(a.tokens, a.d_model, rank, skew, router_weight).requires_grad_()
    if rebalance:
        ours = rebalanced(ours, x, groups, a)
    grad = torch.randn(a.tokens, a.d_model, generator=torch.Generator().manual_seed(rank))

    y_ours, aux = ours(x)
    y_peer, traffic = deepspeed_traffic(peer, x)
    max_diff = float((y_ours - y_peer).abs().max())

    def run_ours() -> None:
        y, _ = ours(x)
        y.backward(grad)

    def run_peer() -> None:
        y, _, _ = peer(x)
        y.backward(grad)

    times = interleaved_medians({"ours": run_ours, "deepspeed": run_peer}, a.repeats)
    slowest = torch.tensor([times["ours"], times["deepspeed"]], dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)  # a step is as slow as its slowest rank
    busiest = torch.tensor([aux.traffic.rows_computed, traffic.rows_computed])
    dist.all_reduce(busiest, op=dist.ReduceOp.MAX)
    t = aux.traffic
    load = aux.stats.tokens_per_expert.clone()
    dist.all_reduce(load)
    return {
        "scenario": name,
        "ours_ms": float(slowest[0]) * 1e3,
        "deepspeed_ms": float(slowest[1]) * 1e3,
        "time_ratio": float(slowest[0] / slowest[1]),
        "top2_expert_share": float(load.sort(descending=True).values[:2].sum() / load.sum()),
        "ours_rows_sent_per_assignment": t.padding_ratio,
        "ds_rows_sent_per_assignment": traffic.send_padding,
        "ours_rows_computed": int(busiest[0]),  # on the busiest rank
        "ds_rows_computed": int(busiest[1]),
        "ours_a2a_MB": 2 * t.exchange_bytes / 1e6,
        "ds_a2a_MB": traffic.forward_backward_bytes / 1e6,
        "ds_capacity": traffic.capacity,
        "max_abs_diff": max_diff,
    }


def body(rank: int, world: int, a: argparse.Namespace) -> list[dict]:
    init_deepspeed_groups(world)
    return [
        scenario("balanced", 0.0, a, rank, world),
        scenario("skewed", a.skew, a, rank, world),
        scenario("skewed+rebalanced", a.skew, a, rank, world, rebalance=True),
    ]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m dynmoe_dist.bench expert_parallel", description=__doc__)
    add_shape_args(p, repeats=20)
    a = p.parse_args(argv)
    rows = run_ranks(body, a)
    meta = {
        **shape_meta(a),
        "router": "top-2 softmax; DeepSpeed drop_tokens=False",
        "targets": "time_ratio <= 0.85 balanced, <= 0.5 skewed; ours rows sent per assignment == 1.0",
    }
    cols = [
        "scenario",
        "ours_ms",
        "deepspeed_ms",
        "time_ratio",
        "top2_expert_share",
        "ours_rows_sent_per_assignment",
        "ds_rows_sent_per_assignment",
        "ours_rows_computed",
        "ds_rows_computed",
        "ours_a2a_MB",
        "ds_a2a_MB",
        "max_abs_diff",
    ]
    emit("expert_parallel", rows, cols, meta, a.json)
