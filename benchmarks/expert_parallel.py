"""Expert-parallel layer against deepspeed.moe.layer.MoE and tutel.moe.moe_layer: same ranks, same weights, one job.

Scenarios at 2 ranks (4096 tokens per rank, d=256, d_ff=1024, 8 experts, top-2, DeepSpeed dropless):
(a) balanced routing; (b) skewed routing, where most tokens pick the same two experts; (c) skewed with our layer on
the placement the planner picks; (d) skewed with our layer copying the busiest rank's two hottest experts to the other
rank each step (``shadow_experts=2``, dispatch/shadow.py). Reported: forward+backward time of each and their ratio
(interleaved in the same processes), rows moved per assignment (padding ratio: ours is exactly 1.0), rows computed per
assignment, and all-to-all bytes per forward+backward.
Outputs are compared first, so the timing compares the same computation.

Shared experts (DeepSeekMoE): in the balanced scenario our layer also runs with ``--shared-experts`` always-on
experts (each of d_ff), timed beside the same layer without them and the shared FFN alone. ``shared_cost_ratio`` =
(with shared - without) / shared alone: 1.0 when they cost their full time, less when part of it hides behind the
exchanges they overlap. On loopback with every core computing, the exchanges are short and there is little to hide.

Tutel runs in two settings: capacity_factor=0 (its dropless mode; must equal ours) and capacity_factor=1.0 (drops
routes past k * ceil(S / E) per expert; reported as the fraction of assignments dropped). Without an importable
Tutel the Tutel columns are left out and meta says why.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

from dynmoe_dist.adapt.planner import plan_placement
from dynmoe_dist.dispatch.shadow import SHADOW_MIN_ROWS
from dynmoe_dist.experts import ExpertBank
from dynmoe_dist.layer import MoELayer
from dynmoe_dist.parallel import build_groups

from .deepspeed_peer import build_deepspeed_moe, deepspeed_traffic, init_deepspeed_groups
from .layer import sweep_shapes
from .ranks import add_shape_args, run_ranks, shape_meta
from .report import emit
from .timing import interleaved_medians
from .tutel_peer import build_tutel_moe, tutel_available, tutel_traffic

# Dropless Tutel computes the same function as ours; a larger gap means the timing compares different things.
TUTEL_DROPLESS_TOLERANCE = 1e-3
TUTEL_COLUMNS = [
    "tutel_ms",
    "ours_tutel_ratio",
    "tutel_cf1_ms",
    "ours_tutel_cf1_ratio",
    "tutel_rows_sent_per_assignment",
    "tutel_rows_computed",
    "tutel_a2a_MB",
    "tutel_cf1_dropped",
    "tutel_max_abs_diff",
]


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


def scenario(
    name: str,
    skew: float,
    a: argparse.Namespace,
    rank: int,
    world: int,
    rebalance: bool = False,
    shared: int = 0,
    shadows: int = 0,
) -> dict:
    groups = build_groups(world)
    router = {"kind": "top_k", "k": 2, "balance_weight": 0.0}
    ours = MoELayer(
        a.d_model, a.d_ff, a.experts, router, groups=groups, seed=0,
        shadow_experts=shadows, shadow_min_rows=a.shadow_min_rows,
    )  # fmt: skip
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
    max_diff = float((y_ours - y_peer).detach().abs().max())
    fns = {}
    if a.tutel:
        w_in, w_out = full.w_in.detach(), full.w_out.detach()
        tutels = {
            cf: build_tutel_moe(
                a.d_model, a.d_ff, a.experts, 2, router_weight, w_in, w_out, groups.ep_group, capacity_factor=cf
            )
            for cf in (0.0, 1.0)
        }
        y_tutel, tutel = tutel_traffic(tutels[0.0], x)
        _, tutel_cf1 = tutel_traffic(tutels[1.0], x)
        tutel_diff = (y_ours - y_tutel).detach().abs().max().to(torch.float64)
        dist.all_reduce(tutel_diff, op=dist.ReduceOp.MAX)
        if not float(tutel_diff) <= TUTEL_DROPLESS_TOLERANCE:
            raise RuntimeError(f"{name}: dropless Tutel differs from ours by {float(tutel_diff):.3g}")
        dropped = torch.tensor([tutel_cf1.dropped, tutel_cf1.assignments_sent], dtype=torch.float64)
        dist.all_reduce(dropped)  # world-wide fraction of assignments dropped

        def run_tutel(layer=tutels[0.0]) -> None:
            layer(x).backward(grad)

        def run_tutel_cf1(layer=tutels[1.0]) -> None:
            layer(x).backward(grad)

        fns = {"tutel": run_tutel, "tutel_cf1": run_tutel_cf1}

    def run_ours() -> None:
        y, _ = ours(x)
        y.backward(grad)

    def run_peer() -> None:
        y, _, _ = peer(x)
        y.backward(grad)

    if shared:
        with_shared = MoELayer(a.d_model, a.d_ff, a.experts, router, groups=groups, seed=0, num_shared_experts=shared)

        def run_ours_shared() -> None:
            y, _ = with_shared(x)
            y.backward(grad)

        def run_shared_alone() -> None:
            with_shared.shared(x).backward(grad)

        fns.update({"ours_shared": run_ours_shared, "shared_alone": run_shared_alone})

    names = ["ours", "deepspeed", *fns]
    times = interleaved_medians({"ours": run_ours, "deepspeed": run_peer, **fns}, a.repeats)
    slowest = torch.tensor([times[n] for n in names], dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)  # a step is as slow as its slowest rank
    ms = dict(zip(names, (float(v) * 1e3 for v in slowest)))
    rows_computed = [aux.traffic.rows_computed, traffic.rows_computed]
    if a.tutel:
        rows_computed.append(tutel.rows_computed)
    busiest = torch.tensor(rows_computed)
    dist.all_reduce(busiest, op=dist.ReduceOp.MAX)
    t = aux.traffic
    load = aux.stats.tokens_per_expert.clone()
    dist.all_reduce(load)
    row = {
        "scenario": name,
        "experts": a.experts,
        "d_model": a.d_model,
        "d_ff": a.d_ff,
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
    if shared:
        added = ms["ours_shared"] - ms["ours"]
        row.update(
            {
                "shared_experts": shared,
                "shared_alone_ms": ms["shared_alone"],
                "ours_shared_ms": ms["ours_shared"],
                "shared_cost_ratio": added / ms["shared_alone"],
            }
        )
    if a.tutel:
        row.update(
            {
                "tutel_ms": ms["tutel"],
                "ours_tutel_ratio": ms["ours"] / ms["tutel"],
                "tutel_cf1_ms": ms["tutel_cf1"],
                "ours_tutel_cf1_ratio": ms["ours"] / ms["tutel_cf1"],
                "tutel_rows_sent_per_assignment": tutel.send_padding,
                "tutel_rows_computed": int(busiest[2]),  # on the busiest rank
                "tutel_a2a_MB": tutel.forward_backward_bytes / 1e6,
                "tutel_cf1_dropped": float(dropped[0] / dropped[1]),
                "tutel_max_abs_diff": float(tutel_diff),
                "tutel_capacity": tutel.capacity,
                "tutel_cf1_capacity": tutel_cf1.capacity,
                "tutel_cf1_rows_computed": tutel_cf1.rows_computed,
                "tutel_cf1_a2a_MB": tutel_cf1.forward_backward_bytes / 1e6,
            }
        )
    return row


def body(rank: int, world: int, a: argparse.Namespace) -> list[dict]:
    init_deepspeed_groups(world)
    if a.sweep:  # granularity sweep: balanced routing at every shape
        shapes = [
            argparse.Namespace(**{**vars(a), "experts": e, "d_model": d, "d_ff": f}) for e, d, f in sweep_shapes()
        ]
        return [scenario("balanced", 0.0, s, rank, world) for s in shapes]
    return [
        scenario("balanced", 0.0, a, rank, world, shared=a.shared_experts),
        scenario("skewed", a.skew, a, rank, world),
        scenario("skewed+rebalanced", a.skew, a, rank, world, rebalance=True),
        scenario("skewed+shadows", a.skew, a, rank, world, shadows=2),
    ]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks expert_parallel", description=__doc__)
    add_shape_args(p, repeats=20)
    p.add_argument("--no-tutel", dest="tutel", action="store_false", help="leave the Tutel peer out")
    p.add_argument("--shared-experts", type=int, default=1, help="shared experts timed in the balanced scenario")
    p.add_argument(
        "--shadow-min-rows",
        type=int,
        default=SHADOW_MIN_ROWS,
        help="fewest rows a shadow must move in the skewed+shadows scenario (MoELayer's shadow_min_rows)",
    )
    p.add_argument(
        "--sweep", action="store_true", help="balanced routing at 8-128 experts, d 256 and 512 (bench layer)"
    )
    a = p.parse_args(argv)
    tutel_ok, tutel_why = tutel_available() if a.tutel else (False, "left out (--no-tutel)")
    a.tutel = tutel_ok
    rows = run_ranks(body, a)
    meta = {
        **shape_meta(a),
        "router": "top-2 softmax; DeepSpeed drop_tokens=False; Tutel capacity_factor=0 (dropless) and 1.0",
        "targets": "time_ratio <= 0.85 balanced, <= 0.5 skewed; ours rows sent per assignment == 1.0",
        "tutel_targets": "ours/Tutel dropless <= 0.85 balanced, <= 0.5 skewed",
        "tutel": (
            "tutel.moe.moe_layer, gate top k=2 fp32, bias-free GELU FFN experts; ratios are ours / Tutel"
            if tutel_ok
            else f"Tutel columns absent: {tutel_why}"
        ),
    }
    cols = [
        "scenario",
        *(["experts", "d_model", "d_ff"] if a.sweep else []),
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
        *(TUTEL_COLUMNS if tutel_ok else []),
        *(["shared_alone_ms", "ours_shared_ms", "shared_cost_ratio"] if a.shared_experts and not a.sweep else []),
    ]
    emit("expert_parallel_sweep" if a.sweep else "expert_parallel", rows, cols, meta, a.json)
