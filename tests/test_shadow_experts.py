"""Shadow experts: the decision (a pure function of the gathered counts), and the layer with shadows on == the
single-process layer (real processes, gloo): outputs, input gradients, gate gradients and the owners' expert
gradients, with the copies' gradients summed back at the end of the backward; each backward sums exactly the copies
of the forward it runs through (interleaved forwards, nested backwards, retained graphs, recompute, a forward with no
backward); and the shadow path's order of collectives, gather and compute."""

from __future__ import annotations

import gc

import pytest
import torch
import torch.distributed as dist

from dynmoe_dist import MoELayer
from dynmoe_dist.dispatch.shadow import SHADOW_TOLERANCE, kept_order, plan_shadows, rank_loads
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


# --------------------------------------------------------------------------------------------------------------------
# the copies' gradients belong to the forward that made them: every backward reduces its own forward's, and only those


def shadowed_layer(seed: int) -> MoELayer:
    world = dist.get_world_size()
    return MoELayer(
        D, D_FF, 4, {"kind": "top_k", "k": 2}, groups=dist_pool.groups(world), seed=seed, shadow_experts=2,
        shadow_min_rows=1,
    ).double()  # fmt: skip


def leaning_input(layer: MoELayer, seed: int) -> torch.Tensor:
    """Tokens leaning to expert 0 (on rank 0), so that shadows are made every step."""
    w0 = layer.router.weight.detach()[0]
    g = torch.Generator().manual_seed(100 * seed + dist.get_rank())
    return (torch.randn(48, D, generator=g, dtype=torch.float64) + 3 * w0 / w0.norm()).requires_grad_()


def output_grad(seed: int) -> torch.Tensor:
    return torch.randn(48, D, generator=torch.Generator().manual_seed(7 + seed), dtype=torch.float64)


def grads_of(layer: MoELayer, x: torch.Tensor) -> dict[str, torch.Tensor]:
    named = {"input": x.grad, **{n: p.grad for n, p in layer.named_parameters()}}
    return {n: (g.clone() if g is not None else None) for n, g in named.items()}


def differences(where: str, got: dict, want: dict) -> list[str]:
    out = []
    for n, g in want.items():
        if g is None or got[n] is None:
            if (g is None) != (got[n] is None):
                out.append(f"{where}: {n} grad is {'missing' if got[n] is None else 'unexpected'}")
        elif not torch.allclose(got[n], g, rtol=0, atol=1e-12):
            out.append(f"{where}: {n} grad differs by {(got[n] - g).abs().max():.3g}")
    return out


def live_shadow_copies() -> int:
    from dynmoe_dist.dispatch.shadow import ShadowCopies

    gc.collect()
    return sum(type(o) is ShadowCopies for o in gc.get_objects())


def one_after_another(seeds: tuple[int, ...]) -> tuple[list[dict], int]:
    """The reference: each layer's forward and backward before the next layer's forward."""
    out, shadowed = [], 0
    for seed in seeds:
        layer = shadowed_layer(seed)
        x = leaning_input(layer, seed)
        y, aux = layer(x)
        (y * output_grad(seed)).sum().backward()
        shadowed += aux.traffic.experts_shadowed
        out.append(grads_of(layer, x))
    return out, shadowed


def case_interleaved_forwards(backward_order: tuple[int, int]) -> list[str]:
    """Two layers (two models: they share nothing) run both forwards, then both backwards."""
    want, shadowed = one_after_another((1, 2))
    layers = [shadowed_layer(seed) for seed in (1, 2)]
    xs = [leaning_input(layer, seed) for layer, seed in zip(layers, (1, 2))]
    ys = [layer(x)[0] for layer, x in zip(layers, xs)]
    for i in backward_order:
        (ys[i] * output_grad(i + 1)).sum().backward()
    problems = [] if shadowed else ["no expert was shadowed: the test did not exercise shadows"]
    for i, layer in enumerate(layers):
        problems += differences(f"layer {i}, backwards {backward_order}", grads_of(layer, xs[i]), want[i])
    del ys
    if live_shadow_copies():
        problems.append(f"{live_shadow_copies()} shadow copies alive after the outputs were dropped")
    return problems


@pytest.mark.parametrize("backward_order", [(0, 1), (1, 0)], ids=["forward_order", "reverse_order"])
def test_interleaved_forwards_reduce_their_own_shadows(backward_order: tuple[int, int]) -> None:
    assert dist_pool.pool(2).run(case_interleaved_forwards, backward_order) == [[], []]


def case_backward_inside_a_backward() -> list[str]:
    """Layer 1's forward and backward run inside layer 0's backward (a hook on its output): a nested backward."""
    want, _ = one_after_another((1, 2))
    layers = [shadowed_layer(seed) for seed in (1, 2)]
    xs = [leaning_input(layer, seed) for layer, seed in zip(layers, (1, 2))]
    y0, _ = layers[0](xs[0])

    def inner(grad: torch.Tensor) -> None:
        with torch.enable_grad():  # a backward runs its hooks without grad
            y1, _ = layers[1](xs[1])
            (y1 * output_grad(2)).sum().backward()

    y0.register_hook(inner)
    (y0 * output_grad(1)).sum().backward()
    problems = []
    for i, layer in enumerate(layers):
        problems += differences(f"layer {i}, nested", grads_of(layer, xs[i]), want[i])
    return problems


def test_a_nested_backward_reduces_only_its_own_shadows() -> None:
    assert dist_pool.pool(2).run(case_backward_inside_a_backward) == [[], []]


def case_forward_without_backward() -> list[str]:
    """A forward under grad whose output is dropped, then a forward and backward: the same gradients as the second
    alone, and nothing of the first left behind."""
    (want,), _ = one_after_another((1,))
    layer = shadowed_layer(1)
    x = leaning_input(layer, 1)
    y, aux = layer(x)
    problems = [] if aux.traffic.experts_shadowed else ["no expert was shadowed"]
    del y, aux
    if live_shadow_copies():
        problems.append("a forward without backward left its shadow copies alive")
    y, _ = layer(x)
    (y * output_grad(1)).sum().backward()
    problems += differences("after a forward without backward", grads_of(layer, x), want)
    del y
    if live_shadow_copies():
        problems.append("shadow copies alive after the backward and the output are gone")
    return problems


def test_a_forward_without_backward_leaves_nothing_pending() -> None:
    assert dist_pool.pool(2).run(case_forward_without_backward) == [[], []]


def case_backward_twice_through_one_graph() -> list[str]:
    """``retain_graph``: two backwards of one forward accumulate twice its gradients, the copies' included."""
    (once,), _ = one_after_another((1,))
    layer = shadowed_layer(1)
    x = leaning_input(layer, 1)
    y, _ = layer(x)
    loss = (y * output_grad(1)).sum()
    loss.backward(retain_graph=True)
    loss.backward()
    twice = {n: None if g is None else 2 * g for n, g in once.items()}
    return differences("two backwards", grads_of(layer, x), twice)


def test_each_backward_reduces_the_copies_gradients_it_made() -> None:
    assert dist_pool.pool(2).run(case_backward_twice_through_one_graph) == [[], []]


def case_activation_recompute(use_reentrant: bool) -> list[str]:
    """The layer under ``torch.utils.checkpoint``: the forward is run again in the backward (copies broadcast again);
    the gradients are those of the plain forward and backward."""
    from torch.utils.checkpoint import checkpoint

    (want,), _ = one_after_another((1,))
    layer = shadowed_layer(1)
    x = leaning_input(layer, 1)
    y = checkpoint(lambda t: layer(t)[0], x, use_reentrant=use_reentrant)
    (y * output_grad(1)).sum().backward()
    problems = differences(f"checkpoint(use_reentrant={use_reentrant})", grads_of(layer, x), want)
    del y
    if live_shadow_copies():
        problems.append("shadow copies alive after a recomputed backward")
    return problems


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_activation_recompute_gives_the_plain_gradients(use_reentrant: bool) -> None:
    assert dist_pool.pool(2).run(case_activation_recompute, use_reentrant) == [[], []]


def case_shadow_dispatch_order(overlap_min_rows: int) -> list[str]:
    """This rank's order of events in one shadowed forward: the real collectives (logged as they start and as they are
    waited for), the row gather and the expert calls (with copies or not)."""
    from dynmoe_dist.dispatch import expert_parallel as ep
    from dynmoe_dist.experts import ExpertBank

    layer = shadowed_layer(1)
    layer.dispatcher.overlap_min_rows = overlap_min_rows
    x = leaning_input(layer, 1)
    log: list[str] = []
    gather, all_gather, broadcast, experts = (
        ep.gather_pieces,
        dist.all_gather_single,
        dist.broadcast,
        ExpertBank.forward,
    )

    def logged(what: str, fn):
        def call(*args, **kwargs):
            log.append(what)
            return fn(*args, **kwargs)

        return call

    def logged_experts(bank, rows, segments, weights=None):
        log.append("experts on copies" if weights is not None else "experts")
        return experts(bank, rows, segments, weights)

    ep.gather_pieces, dist.all_gather_single = logged("gather", gather), logged("start counts", all_gather)
    dist.broadcast, ExpertBank.forward = logged("broadcast", broadcast), logged_experts
    try:
        with dist_pool.logged_exchanges(log):
            _, aux = layer(x)
    finally:
        ep.gather_pieces, dist.all_gather_single, dist.broadcast, ExpertBank.forward = (
            gather, all_gather, broadcast, experts
        )  # fmt: skip
    return log


@pytest.mark.parametrize("overlap_min_rows", [0, 10**9], ids=["overlap", "merged"])
def test_shadow_path_order(overlap_min_rows: int) -> None:
    """Counts all-gathered, then (they are needed to plan) rows gathered and weights broadcast before the rows leave;
    the kept rows are computed while the dispatch exchange travels, on the copies."""
    logs = dist_pool.pool(2).run(case_shadow_dispatch_order, overlap_min_rows)
    for log in logs:
        first = {
            event: log.index(event) for event in ["start counts", "wait moe.dispatch.counts", "gather", "broadcast"]
        }
        assert list(first.values()) == sorted(first.values()), log
        last_broadcast = len(log) - 1 - log[::-1].index("broadcast")
        assert last_broadcast < log.index("start moe.dispatch.rows"), log
        assert log.count("start counts") == 1 and log.count("gather") == 1, log
    kept_here = [log for log in logs if "experts on copies" in log]
    assert kept_here, logs  # the owner keeps nothing, the other rank computes rows on the copies
    for log in kept_here:
        copies = log.index("experts on copies")
        assert log.index("start moe.dispatch.rows") < copies < log.index("wait moe.dispatch.rows"), log
