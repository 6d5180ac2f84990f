"""Dynamic experts across ranks (real processes, gloo): adaptation events end where a single process ends.

Oracle: training with several events (adds, removes, rebalances) at world 2 and 3 gives, expert id by expert id, the
same parameters and optimizer state as one process that trains on the concatenated batches and applies the same
events. Also: moves are bit-exact, a failure on one rank aborts the event everywhere and training goes on, memory
follows ownership, and ranks with different local data still take identical decisions.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from dynmoe_dist import MoELayer
from dynmoe_dist.adapt import AdaptConfig, AdaptController, Decision, ExpertMigration, PolicyConfig, plan_placement
from dynmoe_dist.optim import MoEAdam
from dynmoe_dist.parallel import global_count, sync_gradients
from dynmoe_dist.placement import PlacementTable

import dist_pool

D, D_FF, E, STEPS = 8, 12, 6, 18
# The reference rules (k = 0 tokens go nowhere, new thresholds at 0): this data then sees adds, removes and rebalances
ROUTER = {"kind": "top_any", "balance_weight": 0.0, "unrouted": "drop", "new_threshold": "zero"}


class Model(nn.Module):
    def __init__(self, groups=None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(D, D)
        self.moe = MoELayer(D, D_FF, E, ROUTER, groups=groups, seed=5)
        self.head = nn.Linear(D, 1)
        with torch.no_grad():  # expert 5 never fires (removed), many tokens fire nothing (adds)
            self.moe.router.threshold.fill_(0.35)
            self.moe.router.threshold[5] = 9.0

    def forward(self, x):
        h = self.inp(x)
        y, aux = self.moe(h)
        return self.head(h + y).squeeze(-1), aux.loss


def batches(world: int, step: int):
    g = torch.Generator().manual_seed(500 + step)
    sizes = [(5 * r + 2 * step + 7) % 11 + 2 for r in range(world)]
    return [
        (torch.randn(n, D, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64))
        for n in sizes
    ]


def by_id(model: Model, opt: MoEAdam) -> dict[str, torch.Tensor]:
    """Every MoE tensor that matters, keyed by expert id: gate rows, expert weights, their optimizer state."""
    out = {}
    layer = model.moe
    for pos, eid in enumerate(layer.router.expert_ids.tolist()):
        for name, p in layer.router.row_parameters().items():
            out[f"gate.{name}[{eid}]"] = p.detach()[pos].clone()
            for k, v in opt.rows_of(p, torch.tensor([pos])).items():
                out[f"gate.{name}.{k}[{eid}]"] = v[0].clone()
    for slot, eid in enumerate(layer.experts.expert_ids.tolist()):
        for name, w in layer.experts.weights().items():
            out[f"{name}[{eid}]"] = w.detach()[slot].clone()
            for k, v in opt.rows_of(w, torch.tensor([slot])).items():
                out[f"{name}.{k}[{eid}]"] = v[0].clone()
    for name, p in model.named_parameters():
        if not name.startswith("moe."):
            out[name] = p.detach().clone()
    return out


def train(world: int, rank: int | None, groups=None, threshold: float | None = 1.01):
    model = Model(groups).double()
    dense = [p for n, p in model.named_parameters() if not n.startswith("moe.")]
    dense_opt = torch.optim.Adam(dense, lr=1e-2)
    opt = MoEAdam.for_moe(model, lr=1e-2)
    cfg = AdaptConfig(
        record_steps=2,
        idle_steps=1,
        policy=PolicyConfig(max_experts=9, direction="mean"),
        rebalance_threshold=threshold,
        tolerance=0.0,
    )
    ctl = AdaptController(model, opt, groups, cfg)
    events = []
    for step in range(STEPS):
        data = batches(world, step)
        if rank is None:
            x, t = torch.cat([d[0] for d in data]), torch.cat([d[1] for d in data])
            total = len(t)
        else:
            x, t = data[rank]
            total = global_count(len(t), groups)
        pred, aux = model(x)
        loss = ((pred - t) ** 2).sum() / total + aux * (len(t) / total)
        loss.backward()
        if rank is not None:
            sync_gradients(model, groups, average=False)
        dense_opt.step()
        opt.step()
        dense_opt.zero_grad()
        opt.zero_grad()
        events += ctl.step()
    return model, opt, events


def case_oracle(world: int, ep_size: int) -> dict:
    rank = dist.get_rank()
    groups = dist_pool.groups(ep_size)
    ref_model, ref_opt, ref_events = train(world, None)
    model, opt, events = train(world, rank, groups)
    ref, mine = by_id(ref_model, ref_opt), by_id(model, opt)
    missing = sorted(set(mine) - set(ref))
    diffs = {k: float((v.double() - ref[k].double()).abs().max()) for k, v in mine.items() if k in ref}
    return {
        "missing": missing,
        "worst": max(diffs.items(), key=lambda kv: kv[1]),
        "ref_events": [(e.added, e.removed, e.committed) for e in ref_events],
        "events": [(e.kind, e.added, e.removed, e.moved, e.committed, e.version) for e in events],
        "ids": model.moe.router.expert_ids.tolist(),
        "local": model.moe.experts.expert_ids.tolist(),
    }


@pytest.mark.parametrize(("world", "ep_size"), [(2, 2), (3, 3), (4, 2)])
def test_adaptation_oracle(world: int, ep_size: int) -> None:
    """(4, 2): two expert-parallel groups migrate side by side and must stay identical replicas."""
    results = dist_pool.pool(world).run(case_oracle, world, ep_size)
    first = results[0]
    kinds = {e[0] for e in first["events"]}
    assert {"adapt", "rebalance"} <= kinds, first["events"]  # the run really added/removed and rebalanced
    assert any(e[1] for e in first["events"]) and any(e[2] for e in first["events"])  # adds and removes
    assert any(e[3] for e in first["events"]), "no expert ever moved"
    assert all(e[4] for e in first["events"])  # every event committed
    # same events as the single process (adds / removes), and identical on every rank
    assert [(a, r) for _, a, r, *_ in first["events"] if a or r] == [(a, r) for a, r, _ in first["ref_events"]]
    for res in results:
        assert res["events"] == first["events"] and res["ids"] == first["ids"]
        assert res["missing"] == []
        assert res["worst"][1] < 1e-9, res["worst"]
    for group_start in range(0, world, ep_size):  # every expert lives on exactly one rank of each EP group
        owned = sorted(i for res in results[group_start : group_start + ep_size] for i in res["local"])
        assert owned == sorted(first["ids"])
    for r in range(ep_size, world):  # expert-data-parallel replicas hold the same experts
        assert results[r]["local"] == results[r % ep_size]["local"]


def snapshot(layer: MoELayer, opt: MoEAdam) -> dict[int, list[torch.Tensor]]:
    out = {}
    for slot, eid in enumerate(layer.experts.expert_ids.tolist()):
        rows = []
        for _, w in sorted(layer.experts.weights().items()):
            rows.append(w.detach()[slot].clone())
            rows += [v[0].clone() for v in opt.rows_of(w, torch.tensor([slot])).values()]
        out[eid] = rows
    return out


def expert_bytes(layer: MoELayer, opt: MoEAdam) -> int:
    total = 0
    for w in layer.experts.weights().values():
        total += w.numel() * w.element_size()
        total += sum(t.numel() * t.element_size() for t in opt.state_for(w, True).values())
    return total


def step_once(layer: MoELayer, opt: MoEAdam, groups, seed: int) -> None:
    x = torch.randn(20, 16, generator=torch.Generator().manual_seed(seed + dist.get_rank()))
    y, aux = layer(x)
    (y.pow(2).mean() + aux.loss).backward()
    sync_gradients(layer, groups)
    opt.step()
    opt.zero_grad()


def case_migration() -> dict:
    """Bit-exact moves, abort on a failure, memory following ownership, digest agreement."""
    world, rank = dist.get_world_size(), dist.get_rank()
    groups = dist_pool.groups(world)
    layer = MoELayer(16, 32, 8, {"kind": "top_k", "k": 2}, groups=groups, seed=3)
    opt = MoEAdam.for_moe(layer, lr=1e-2)
    for s in range(3):
        step_once(layer, opt, groups, s)
    report: dict = {}
    per_expert = expert_bytes(layer, opt) // layer.experts.num_experts

    # 1. a rebalance that moves experts: bit-exact on the new owner, weights and Adam state
    old = layer.placement
    ids = list(old.expert_ids)
    owners = [(o + 1) % world for o in old.owners]  # every expert moves
    new = PlacementTable.from_owners(ids, owners, world, old.version + 1)
    before = {}
    gathered = [None] * world
    dist.all_gather_object(gathered, snapshot(layer, opt))
    for g in gathered:
        before.update(g)
    event = ExpertMigration(layer, opt, groups).run(Decision(), new, "rebalance", 3, {i: 1.0 for i in ids})
    after = snapshot(layer, opt)
    report["moved"] = len(event.moved)
    report["bit_exact"] = all(
        all(torch.equal(a, b) for a, b in zip(rows, before[eid], strict=True)) for eid, rows in after.items()
    )
    report["bytes_follow"] = expert_bytes(layer, opt) == per_expert * len(new.experts_on(rank))
    step_once(layer, opt, groups, 10)

    # 2. abort: rank 1 fails after staging; everyone keeps the old version and trains on
    snap = snapshot(layer, opt)
    version = layer.placement.version
    fault = (lambda stage: (_ for _ in ()).throw(RuntimeError("injected"))) if rank == 1 else None
    remove = Decision(remove=[ids[0]])
    survivors = [i for i in layer.router.expert_ids.tolist() if i != ids[0]]
    table = plan_placement(survivors, {i: 1.0 for i in survivors}, world, current=layer.placement)
    aborted = ExpertMigration(layer, opt, groups, fault=fault).run(remove, table, "adapt", 11, {})
    report["abort_committed"] = aborted.committed
    report["abort_reason"] = aborted.reason
    report["abort_unchanged"] = layer.placement.version == version and all(
        all(torch.equal(a, b) for a, b in zip(rows, snap[eid], strict=True))
        for eid, rows in snapshot(layer, opt).items()
    )
    step_once(layer, opt, groups, 20)  # trains normally after an abort

    # 3. disagreement: one rank computed another decision -> nothing changes anywhere
    other = Decision(remove=[ids[1]]) if rank == 0 else remove
    survivors_other = [i for i in layer.router.expert_ids.tolist() if i not in other.remove]
    table_other = plan_placement(survivors_other, {i: 1.0 for i in survivors_other}, world, current=layer.placement)
    disagreed = ExpertMigration(layer, opt, groups).run(other, table_other, "adapt", 21, {})
    report["disagree_committed"] = disagreed.committed
    report["disagree_reason"] = disagreed.reason

    # 4. memory follows ownership: remove half the experts, bytes halve (placement kept balanced)
    full_bytes = expert_bytes(layer, opt)
    current = layer.router.expert_ids.tolist()
    half = Decision(remove=current[: len(current) // 2])
    keep = current[len(current) // 2 :]
    table_half = plan_placement(keep, {i: 1.0 for i in keep}, world, current=layer.placement)
    done = ExpertMigration(layer, opt, groups).run(half, table_half, "adapt", 22, {})
    report["half_committed"] = done.committed
    report["bytes_ratio"] = expert_bytes(layer, opt) / full_bytes
    report["bytes_exact"] = expert_bytes(layer, opt) == per_expert * len(table_half.experts_on(rank))
    step_once(layer, opt, groups, 30)
    report["final_ids"] = layer.router.expert_ids.tolist()
    return report


def test_migration_protocol() -> None:
    results = dist_pool.pool(2).run(case_migration)
    for r in results:
        assert r["moved"] == 8
        assert r["bit_exact"] and r["bytes_follow"]
        assert r["abort_committed"] is False and r["abort_unchanged"], r
        assert r["disagree_committed"] is False and "disagree" in r["disagree_reason"]
        assert r["half_committed"] and r["bytes_exact"] and r["bytes_ratio"] == pytest.approx(0.5)
    assert "injected" in results[1]["abort_reason"]
    assert "another rank" in results[0]["abort_reason"]
    assert results[0]["final_ids"] == results[1]["final_ids"]
