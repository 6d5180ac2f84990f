"""Shadow experts: the decision (a pure function of the gathered counts), and the layer with shadows on == the
single-process layer (real processes, gloo): outputs, input gradients, gate gradients and the owners' expert
gradients, with the copies' gradients summed back at the end of the backward."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from dynmoe_dist import MoELayer
from dynmoe_dist.dispatch.expert_parallel import kept_order
from dynmoe_dist.dispatch.shadow import SHADOW_TOLERANCE, plan_shadows, rank_loads
from dynmoe_dist.placement import PlacementTable

import dist_pool


def test_no_shadow_when_the_ranks_are_level() -> None:
    counts = [[10, 10, 10, 10], [10, 10, 10, 10]]
    assert plan_shadows(counts, [0, 2, 4], max_shadows=4, min_rows=1) == []


def test_shadows_level_the_busiest_rank() -> None:
    # rank 0 owns positions 0-1 and computes 160 rows, rank 1 owns 2-3 and computes 40
    counts = [[50, 20, 10, 10], [60, 30, 10, 10]]
    offsets = [0, 2, 4]
    before = rank_loads(counts, offsets)
    shadows = plan_shadows(counts, offsets, max_shadows=2, min_rows=1)
    assert shadows and shadows[0].owner == 0 and shadows[0].position == 0  # the most rows from other ranks
    loads = list(before)
    for sh in shadows:
        assert sh.keep[sh.owner] == 0
        for s, k in enumerate(sh.keep):
            assert 0 <= k <= counts[s][sh.position]
            loads[s] += k
            loads[sh.owner] -= k
    assert max(loads) < max(before) and sum(loads) == sum(before)
    assert max(loads) <= (1 + SHADOW_TOLERANCE) * sum(loads) / 2 + 1


def test_min_rows_and_max_shadows_bound_the_copies() -> None:
    counts = [[50, 20, 10, 10], [60, 30, 10, 10]]
    assert plan_shadows(counts, [0, 2, 4], max_shadows=0, min_rows=1) == []
    assert plan_shadows(counts, [0, 2, 4], max_shadows=3, min_rows=10**6) == []
    assert len(plan_shadows(counts, [0, 2, 4], max_shadows=1, min_rows=1)) == 1


def test_kept_rows_move_behind_the_own_rows() -> None:
    # rank 1 of 3, positions: rank 0 owns 0-1, rank 1 owns 2, rank 2 owns 3-4; send order: own (2), then 0, 1, 3, 4
    counts = [3, 4, 2, 5, 1]
    ranges = kept_order(counts, [0, 2, 3, 5], me=1, n_self=2, kept=[(3, 2), (1, 4)])
    order = [i for s, n in ranges for i in range(s, s + n)]
    assert sorted(order) == list(range(sum(counts)))
    assert order[:2] == [0, 1]  # own rows
    assert order[2:4] == [9, 10]  # first 2 rows of position 3 (send block after 2 + 3 + 4 rows)
    assert order[4:8] == [5, 6, 7, 8]  # all 4 rows of position 1


D, D_FF = 12, 20
TOKENS = [40, 9, 26]


def case_shadowed_layer_equals_single_process(gate: dict, overlap_min_rows: int) -> list[str]:
    world, rank = dist.get_world_size(), dist.get_rank()
    groups = dist_pool.groups(world)
    problems: list[str] = []
    seen_shadows = 0
    for pname, table in {
        "contiguous": PlacementTable.contiguous(list(range(5)), world),
        "lopsided": PlacementTable.from_owners(list(range(5)), [0, 0, 0, world - 1, 0], world),
    }.items():
        for skew in (0.0, 2.0):
            seed = 11
            ref = MoELayer(D, D_FF, 5, gate, seed=seed).double()
            par = MoELayer(
                D, D_FF, 5, gate, groups=groups, placement=table, seed=seed, shadow_experts=2, shadow_min_rows=1
            ).double()
            par.dispatcher.overlap_min_rows = overlap_min_rows
            g = torch.Generator().manual_seed(3)
            w0 = ref.router.weight.detach()[0]
            xs = [
                torch.randn(TOKENS[r], D, generator=g, dtype=torch.float64) + skew * w0 / w0.norm()
                for r in range(world)
            ]
            gys = [torch.randn(TOKENS[r], D, generator=g, dtype=torch.float64) for r in range(world)]
            x_all = torch.cat(xs).requires_grad_()
            y_ref, _ = ref(x_all)
            for _ in range(2):  # two backward passes: gradients accumulate, copies and all
                (y_ref * torch.cat(gys)).sum().backward(retain_graph=True)
            x = xs[rank].clone().requires_grad_()
            shadowed = 0
            for _ in range(2):
                y, aux = par(x)
                (y * gys[rank]).sum().backward()
                shadowed += aux.traffic.experts_shadowed
            lo = sum(TOKENS[:rank])
            where = f"{pname}/skew={skew}/overlap_min_rows={overlap_min_rows}"
            if not torch.allclose(y, y_ref[lo : lo + TOKENS[rank]], atol=1e-10):
                problems.append(f"{where}: output differs")
            if not torch.allclose(x.grad, x_all.grad[lo : lo + TOKENS[rank]], atol=1e-10):
                problems.append(f"{where}: input grad differs")
            for name, p in par.router.named_parameters():
                gr = p.grad.clone()
                dist.all_reduce(gr)
                if not torch.allclose(gr, dict(ref.router.named_parameters())[name].grad, atol=1e-9):
                    problems.append(f"{where}: gate grad {name} differs")
            positions = table.positions_on(rank)
            for name, p in par.experts.weights().items():
                if not torch.allclose(p.grad, ref.experts.weights()[name].grad[positions], atol=1e-9):
                    problems.append(f"{where}: expert grad {name} differs")
            t = aux.traffic
            rows = torch.tensor([t.assignments, t.rows_computed, t.rows_shadowed])
            dist.all_reduce(rows)
            if rows[0] != rows[1]:
                problems.append(f"{where}: rows computed {rows.tolist()} differ from assignments")
            seen_shadows += shadowed
            with torch.no_grad():  # forward only: shadows computed, nothing registered for a backward
                y_eval, _ = par(x)
            if not torch.allclose(y_eval, y_ref[lo : lo + TOKENS[rank]], atol=1e-10):
                problems.append(f"{where}: no-grad output differs")
    if not seen_shadows:
        problems.append("no expert was ever shadowed: the test did not exercise shadows")
    return problems


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("gate", [{"kind": "top_k", "k": 2}, {"kind": "top_any"}], ids=["top_k", "top_any"])
@pytest.mark.parametrize("overlap_min_rows", [0, 10**9], ids=["overlap", "merged"])
def test_shadowed_layer_equals_single_process(world: int, gate: dict, overlap_min_rows: int) -> None:
    problems = dist_pool.pool(world).run(case_shadowed_layer_equals_single_process, gate, overlap_min_rows)
    assert problems == [[] for _ in range(world)]


def case_busiest_rank_computes_fewer_rows(shadow_experts: int) -> int:
    """Every token leans to expert 0 (on rank 0): the busiest rank's rows, with and without shadows."""
    world, rank = dist.get_world_size(), dist.get_rank()
    par = MoELayer(
        D, D_FF, 4, {"kind": "top_k", "k": 2}, groups=dist_pool.groups(world), seed=5,
        shadow_experts=shadow_experts, shadow_min_rows=1,
    ).double()  # fmt: skip
    w0 = par.router.weight.detach()[0]
    x = torch.randn(64, D, generator=torch.Generator().manual_seed(rank), dtype=torch.float64) + 3 * w0 / w0.norm()
    y, aux = par(x.requires_grad_())
    y.sum().backward()
    rows = torch.tensor([aux.traffic.rows_computed])
    dist.all_reduce(rows, op=dist.ReduceOp.MAX)
    return int(rows)


def test_shadows_cut_the_busiest_ranks_rows() -> None:
    pool = dist_pool.pool(2)
    without = pool.run(case_busiest_rank_computes_fewer_rows, 0)[0]
    with_shadows = pool.run(case_busiest_rank_computes_fewer_rows, 2)[0]
    assert with_shadows < 0.75 * without  # 128 tokens x 2 assignments, leaning to rank 0's experts
    assert with_shadows <= (1 + 0.05) * 128
