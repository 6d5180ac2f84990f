"""The distributed layer equals the single-process layer on the gathered tokens (real processes, gloo).

Every rank builds the reference layer (all experts, one process) and the expert-parallel layer from the same seed,
generates every rank's tokens from a shared seed, and compares its own slice: outputs, input gradients, gate
gradients (summed over ranks) and the gradients of the experts it owns (by expert id).
"""

from __future__ import annotations

import ast
import collections
import importlib
import inspect
import pkgutil
import sys

import pytest
import torch
import torch.distributed as dist

from dynmoe_dist import MoELayer
from dynmoe_dist.placement import PlacementTable

import dist_pool

D, D_FF = 12, 20
GATES = {
    "top_any": {"kind": "top_any"},
    "top_k": {"kind": "top_k", "k": 2},
    "top_p": {"kind": "top_p", "p": 0.5},
    "importance_k": {"kind": "importance_k", "k_max": 3},
    "relu": {"kind": "relu"},
    "null": {"kind": "null", "k": 2, "num_null": 2},
}
# tokens per rank: uneven, and rank 1 holds none at all
TOKENS = [9, 0, 23, 14]


def placements(num_experts: int, world: int) -> dict[str, PlacementTable]:
    ids = list(range(num_experts))
    g = torch.Generator().manual_seed(num_experts * 10 + world)
    scattered = torch.randint(world, (num_experts,), generator=g).tolist()
    scattered[0] = world - 1  # keep it uneven
    lopsided = [0] * (num_experts - 1) + [world - 1]  # rank 0 holds almost all, middle ranks none
    return {
        "contiguous": PlacementTable.contiguous(ids, world),
        "scattered": PlacementTable.from_owners(ids, scattered, world),
        "lopsided": PlacementTable.from_owners(ids, lopsided, world),
    }


def make_inputs(world: int, seed: int, skew: float, router_row: torch.Tensor):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(TOKENS[r], D, generator=g, dtype=torch.float64) for r in range(world)]
    if skew:
        direction = router_row / router_row.norm()
        xs = [x + skew * D**0.5 * direction for x in xs]
    gys = [torch.randn(TOKENS[r], D, generator=g, dtype=torch.float64) for r in range(world)]
    imps = [torch.rand(TOKENS[r], generator=g, dtype=torch.float64) for r in range(world)]
    return xs, gys, imps


def case_layer_equivalence(gate: str, num_experts: int) -> list[str]:
    """Returns descriptions of every mismatch on this rank (empty when all match)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    groups = dist_pool.groups(world)
    problems: list[str] = []
    for activation, overlap_min_rows in (("gelu", 0), ("swiglu", 0), ("gelu", 10**9)):  # overlap; merged experts
        for pname, table in placements(num_experts, world).items():
            for skew in (0.0, 3.0):
                seed = 1000 + num_experts
                ref = MoELayer(D, D_FF, num_experts, GATES[gate], activation, seed=seed).double()
                par = MoELayer(
                    D, D_FF, num_experts, GATES[gate], activation, groups=groups, placement=table, seed=seed
                ).double()
                par.dispatcher.overlap_min_rows = overlap_min_rows
                xs, gys, imps = make_inputs(world, seed, skew, ref.router.weight.detach()[0])
                x_all = torch.cat(xs).requires_grad_()
                y_ref, _ = ref(x_all, torch.cat(imps) if gate == "importance_k" else None)
                (y_ref * torch.cat(gys)).sum().backward()

                x = xs[rank].clone().requires_grad_()
                y, aux = par(x, imps[rank] if gate == "importance_k" else None)
                (y * gys[rank]).sum().backward()

                lo = sum(TOKENS[:rank])
                hi = lo + TOKENS[rank]
                where = f"{gate}/{activation}/{pname}/skew={skew}/overlap_min_rows={overlap_min_rows}"
                if not torch.allclose(y, y_ref[lo:hi], atol=1e-10):
                    problems.append(f"{where}: output differs by {(y - y_ref[lo:hi]).abs().max():.3g}")
                if not torch.allclose(x.grad, x_all.grad[lo:hi], atol=1e-10):
                    problems.append(f"{where}: input grad differs")
                for name, p in par.router.named_parameters():
                    g = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                    dist.all_reduce(g)
                    if not torch.allclose(g, dict(ref.router.named_parameters())[name].grad, atol=1e-9):
                        problems.append(f"{where}: gate grad {name} differs")
                positions = table.positions_on(rank)
                assert par.experts.expert_ids.tolist() == [table.expert_ids[p] for p in positions]
                for name, p in par.experts.weights().items():
                    expected = ref.experts.weights()[name]
                    if not torch.equal(p.detach(), expected.detach()[positions]):
                        problems.append(f"{where}: expert weight {name} not initialised by id")
                    if not torch.allclose(p.grad, expected.grad[positions], atol=1e-9):
                        problems.append(f"{where}: expert grad {name} differs")
                t = aux.traffic
                if t.rows_sent != t.assignments or t.padding_ratio != 1.0:
                    problems.append(f"{where}: sent {t.rows_sent} rows for {t.assignments} assignments")
                rows = torch.tensor([t.assignments, t.rows_computed])
                dist.all_reduce(rows)
                if rows[0] != rows[1] or t.assignments != int((aux.stats.k_per_token).sum()):
                    problems.append(f"{where}: rows computed {rows.tolist()} differ from assignments")
                if skew:  # the skew really sends (nearly) every token to expert 0
                    load = aux.stats.tokens_per_expert.clone()
                    dist.all_reduce(load)
                    if load[0] < 0.8 * sum(TOKENS[:world]):
                        problems.append(f"{where}: skew did not concentrate load ({load.tolist()})")
    return problems


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("gate", list(GATES))
def test_distributed_layer_equals_single_process(world: int, gate: str) -> None:
    num_experts = {2: 4, 3: 7, 4: 5}[world]  # 7 on 3 and 5 on 4: not divisible
    problems = dist_pool.pool(world).run(case_layer_equivalence, gate, num_experts)
    assert problems == [[] for _ in range(world)]


def case_all_to_one(tokens: int) -> tuple[float, list[int]]:
    """Every token of every rank goes to expert 0 (top-1 with an overwhelming skew)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    groups = dist_pool.groups(world)
    ref = MoELayer(D, D_FF, 4, {"kind": "top_k", "k": 1}, seed=7).double()
    par = MoELayer(D, D_FF, 4, {"kind": "top_k", "k": 1}, groups=groups, seed=7).double()
    w0 = ref.router.weight.detach()[0]
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(tokens, D, generator=g, dtype=torch.float64) + 50 * w0 / w0.norm() for _ in range(world)]
    y_ref, _ = ref(torch.cat(xs))
    y, aux = par(xs[rank])
    y.sum().backward()
    return float((y - y_ref[rank * tokens : (rank + 1) * tokens]).abs().max()), aux.stats.tokens_per_expert.tolist()


def test_all_tokens_to_one_expert() -> None:
    results = dist_pool.pool(3).run(case_all_to_one, 16)
    for err, load in results:
        assert err < 1e-10
        assert load == [16, 0, 0, 0]


def case_no_tokens_anywhere() -> list[int]:
    world = dist.get_world_size()
    par = MoELayer(D, D_FF, 5, "top_any", groups=dist_pool.groups(world), seed=1)
    x = torch.zeros(0, D, requires_grad=True)
    y, aux = par(x)
    (y.sum() + aux.loss).backward()
    return [tuple(y.shape), int(par.experts.w_in.grad.abs().sum() == 0)]


def test_every_rank_empty_does_not_hang() -> None:
    assert dist_pool.pool(2).run(case_no_tokens_anywhere) == [[(0, D), 1], [(0, D), 1]]


def case_counts_travel_while_rows_are_gathered(overlap_min_rows: int) -> list[str]:
    """This rank's order of events: the real collectives started and waited for (logged), and the row gather."""
    from dynmoe_dist.dispatch import expert_parallel as ep

    layer = MoELayer(D, D_FF, 4, {"kind": "top_k", "k": 2}, groups=dist_pool.groups(dist.get_world_size()), seed=3)
    layer.dispatcher.overlap_min_rows = overlap_min_rows
    log: list[str] = []
    gather = ep.start_gather  # issues the gather of the rows (their pieces are cut once the counts are read)

    def logged_gather(*args, **kwargs):
        log.append("gather")
        return gather(*args, **kwargs)

    ep.start_gather = logged_gather
    try:
        with dist_pool.logged_exchanges(log):
            layer(torch.randn(16, D, generator=torch.Generator().manual_seed(dist.get_rank())))
    finally:
        ep.start_gather = gather
    return log


@pytest.mark.parametrize("overlap_min_rows", [0, 10**9])
def test_counts_travel_while_the_rows_are_gathered(overlap_min_rows: int) -> None:
    """The counts exchange is started before the rows are sorted and gathered and waited for after, in both modes."""
    for log in dist_pool.pool(2).run(case_counts_travel_while_rows_are_gathered, overlap_min_rows):
        at = {event: i for i, event in enumerate(log)}
        counts = "moe.dispatch.counts"
        assert at[f"start {counts}"] < at["gather"] < at[f"wait {counts}"] < at["start moe.dispatch.rows"], log


MUTABLE = (list, dict, set, bytearray, collections.deque)


def test_dispatch_keeps_no_process_wide_state() -> None:
    """The data plane keeps nothing between calls outside the objects a call makes (the dispatcher, what ``run``
    builds, the autograd graph): no module or class holds a mutable container, and no function rebinds a global."""
    import dynmoe_dist.dispatch as package

    found = []
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        tree = ast.parse(inspect.getsource(module))
        found += [f"{info.name}: global {', '.join(n.names)}" for n in ast.walk(tree) if isinstance(n, ast.Global)]
        for name, value in vars(module).items():
            if name.startswith("__"):
                continue
            if isinstance(value, MUTABLE):
                found.append(f"{info.name}.{name}: a module-level {type(value).__name__}")
            if inspect.isclass(value) and value.__module__ == module.__name__:
                found += [
                    f"{info.name}.{name}.{attr}: a class-level {type(v).__name__}"
                    for attr, v in vars(value).items()
                    if not attr.startswith("__") and isinstance(v, MUTABLE)
                ]
    assert not found, "process-wide state in dispatch/:\n" + "\n".join(found)


def test_the_state_check_sees_module_state(tmp_path, monkeypatch) -> None:
    """The check above can fail: a module with a pending list and a flag rebound by ``global`` is reported."""
    import dynmoe_dist.dispatch as package

    (tmp_path / "stateful.py").write_text(
        "_pending = []\n_queued = False\n\n\ndef register(x):\n    global _queued\n    _pending.append(x)\n"
        "    _queued = True\n"
    )
    monkeypatch.setattr(package, "__path__", [*package.__path__, str(tmp_path)])
    try:
        with pytest.raises(AssertionError, match=r"(?s)global _queued.*stateful._pending: a module-level list"):
            test_dispatch_keeps_no_process_wide_state()
    finally:
        sys.modules.pop(f"{package.__name__}.stateful", None)
        vars(package).pop("stateful", None)
