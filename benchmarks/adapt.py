"""Adaptation events against a training step: add one expert, remove one, rebalance, at 2 expert-parallel ranks.

Layer d=256, d_ff=1024, 8 experts, 4096 tokens per rank, MoEAdam with Adam state from a few warm-up steps. A step is
forward + backward + gradient sync + optimizer step (median of several). Each event is built explicitly (a Decision and
a new PlacementTable) and applied with ExpertMigration.run, timed by wall clock on each rank (the slowest rank counts):

(a) add one: a new expert copying the most-loaded one, placed by plan_placement (Top-Any);
(b) remove one: the least-loaded expert, the rest placed by plan_placement (Top-Any);
(c) rebalance: no expert added or removed, a new table moving at least 2 experts (Top-Any; top-2 on skewed tokens).

Reported: event time / step time (target < 1); the bytes the protocol moved against the bytes that had to move,
computed here from the tensors themselves (a moved expert: every stacked weight with exp_avg, exp_avg_sq and the int64
step; an expert copied to another rank: its weights), and their ratio (target exactly 1.0; 1.0 when both are 0); and
whether every moved expert (weights and optimizer state) and every copied expert (weights) is bit-identical on its
new owner. After every event the layer trains one more step (finite loss, or the benchmark fails).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist

from dynmoe_dist.adapt import Decision, ExpertMigration, NewExpert, moved_experts, plan_placement
from dynmoe_dist.adapt.protocol import payload_bytes
from dynmoe_dist.layer import MoELayer
from dynmoe_dist.optim import MoEAdam
from dynmoe_dist.parallel import build_groups, sync_gradients
from dynmoe_dist.placement import PlacementTable

from .ranks import add_shape_args, run_ranks, shape_meta
from .report import emit
from .timing import interleaved_medians

ROUTERS = {"top_any": {"kind": "top_any"}, "top2": {"kind": "top_k", "k": 2}}


class Trainer:
    """One layer, its optimizer and a fixed batch on this rank; ``step`` is one full training step."""

    def __init__(self, router: str, a: argparse.Namespace, rank: int, skew: float) -> None:
        self.groups = build_groups(dist.get_world_size())
        self.layer = MoELayer(a.d_model, a.d_ff, a.experts, ROUTERS[router], groups=self.groups, seed=0)
        self.opt = MoEAdam.for_moe(self.layer, lr=1e-3)
        g = torch.Generator().manual_seed(1234 + rank)
        self.x = torch.randn(a.tokens, a.d_model, generator=g)
        if skew:
            # 80% of the tokens lean toward experts 0 and 1 (both on rank 0): a load imbalance to rebalance
            w = self.layer.router.weight.detach()[:2]
            unit = (w / w.norm(dim=-1, keepdim=True)).sum(0) / 2**0.5
            lean = torch.rand(a.tokens, generator=g) < 0.8
            self.x[lean] += skew * a.d_model**0.5 * unit
        self.grad_out = torch.randn(a.tokens, a.d_model, generator=g) / a.tokens
        self.loads: dict[int, float] = {}
        self.unrouted = 0

    def step(self) -> float:
        self.opt.zero_grad(set_to_none=True)
        y, aux = self.layer(self.x)
        loss = (y * self.grad_out).sum() + aux.loss
        loss.backward()
        sync_gradients(self.layer, self.groups)
        self.opt.step()
        self.layer.on_optimizer_step()
        self.stats = aux.stats
        return float(loss.detach())

    def reduce_loads(self) -> None:
        """Tokens per expert id and unrouted tokens of the last step, summed over the world (the same on every rank)."""
        t = torch.cat([self.stats.tokens_per_expert.to(torch.int64), self.stats.unrouted_count.reshape(1)])
        dist.all_reduce(t)
        ids = self.layer.router.expert_ids.tolist()
        self.loads = {i: float(v) for i, v in zip(ids, t[:-1].tolist())}
        self.unrouted = int(t[-1])


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def expert_rows(tr: Trainer, expert_id: int) -> dict[str, torch.Tensor]:
    """This rank's copy of one expert: every stacked weight and its optimizer state (exp_avg, exp_avg_sq, step)."""
    bank = tr.layer.experts
    slot = bank.expert_ids.tolist().index(expert_id)
    rows = {}
    for name, w in sorted(bank.weights().items()):
        state = tr.opt.state_for(w, True)
        rows[name] = w.detach()[slot].clone()
        for k in ("exp_avg", "exp_avg_sq", "step"):
            rows[f"{name}.{k}"] = state[k][slot].clone()
    return rows


def bytes_needed(tr: Trainer, decision: Decision, old: PlacementTable, new: PlacementTable) -> tuple[int, int, int]:
    """(bytes, experts moved, experts copied to another rank), from the tensors' own sizes and the two tables."""
    before = dict(zip(old.expert_ids, old.owners))
    after = dict(zip(new.expert_ids, new.owners))
    moved = [i for i in after if i in before and before[i] != after[i]]
    copied = [n for n in decision.add if n.init == "copy" and before[n.source_id] != after[n.expert_id]]
    weight_bytes = move_bytes = 0
    for w in tr.layer.experts.weights().values():
        state = tr.opt.state_for(w, True)
        row = w.shape[1:].numel() * w.element_size()
        weight_bytes += row
        move_bytes += row
        move_bytes += sum(state[k].shape[1:].numel() * state[k].element_size() for k in ("exp_avg", "exp_avg_sq"))
        move_bytes += state["step"].element_size()  # one int64 step per expert row of this weight
    return len(moved) * move_bytes + len(copied) * weight_bytes, len(moved), len(copied)


def run_event(name: str, tr: Trainer, decision: Decision, new: PlacementTable, kind: str, step_s: float) -> dict:
    layer = tr.layer
    old = layer.placement
    rank = tr.groups.ep_rank
    needed, n_moved, n_copied = bytes_needed(tr, decision, old, new)
    # snapshot the experts that travel (moved, or copied into a new expert), gathered so the new owner can compare
    before, after = dict(zip(old.expert_ids, old.owners)), dict(zip(new.expert_ids, new.owners))
    moved = sorted(i for i in after if i in before and before[i] != after[i])
    sources = sorted({n.source_id for n in decision.add if n.init == "copy"})
    mine = {i: expert_rows(tr, i) for i in sorted(set(moved) | set(sources)) if before[i] == rank}
    gathered: list[dict] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    snap = {i: rows for part in gathered for i, rows in part.items()}

    dist.barrier()
    t0 = time.perf_counter()
    event = ExpertMigration(layer, tr.opt, tr.groups).run(decision, new, kind, step=0, loads=tr.loads)
    elapsed = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    if not event.committed:
        raise RuntimeError(f"{name}: the event did not commit: {event.reason}")

    ok = layer.placement.digest() == new.digest() and len(event.moved) == n_moved
    for i in moved:
        if after[i] == rank:
            now = expert_rows(tr, i)
            ok &= all(same_bits(now[k], v) for k, v in snap[i].items())
    for n in decision.add:
        if n.init == "copy" and after[n.expert_id] == rank:
            now = expert_rows(tr, n.expert_id)
            ok &= all(same_bits(now[k], snap[n.source_id][k]) for k in layer.experts.weights())
    flag = torch.tensor([int(ok)], dtype=torch.int64)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)

    loss = tr.step()  # the layer still trains on the new placement
    finite = torch.tensor([int(torch.isfinite(torch.tensor(loss)))], dtype=torch.int64)
    dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if not finite.item():
        raise RuntimeError(f"{name}: the training step after the event gave a non-finite loss")
    tr.reduce_loads()

    event_s = float(elapsed)
    ratio = event.bytes_moved / needed if needed else (1.0 if event.bytes_moved == 0 else float("inf"))
    return {
        "event": name,
        "experts_moved": n_moved,
        "experts_copied_cross_rank": n_copied,
        "bytes_moved": event.bytes_moved,
        "bytes_needed": needed,
        "bytes_ratio": ratio,
        "event_ms": event_s * 1e3,
        "protocol_ms": event.seconds * 1e3,
        "step_ms": step_s * 1e3,
        "event_per_step": event_s / step_s,
        "bit_exact": bool(flag.item()),
        "trains": True,
        "moved": event.moved,
        "added": event.added,
        "removed": event.removed,
        "imbalance_before": event.imbalance_before,
        "imbalance_after": event.imbalance_after,
        "experts_per_rank": list(new.counts_per_rank()),
    }


def measure_step(tr: Trainer, repeats: int) -> float:
    t = torch.tensor([interleaved_medians({"step": tr.step}, repeats, warmup=0)["step"]], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # a step is as slow as its slowest rank
    tr.reduce_loads()
    return float(t)


def rebalance_table(tr: Trainer) -> tuple[PlacementTable, str]:
    """plan_placement on the measured loads; if it moves fewer than 2 experts, swap one expert of each rank."""
    old = tr.layer.placement
    ids = list(old.expert_ids)
    new = plan_placement(
        ids, tr.loads, old.ep_size, current=old, expert_bytes=payload_bytes(tr.layer, "move"), tolerance=0.0
    )
    if len(moved_experts(old, new)) >= 2:
        return new, "plan_placement"
    owners = list(old.owners)
    a = max((i for i, o in zip(ids, owners) if o == 0), key=lambda i: (tr.loads[i], -i))
    b = min((i for i, o in zip(ids, owners) if o == 1), key=lambda i: (tr.loads[i], i))
    owners[ids.index(a)], owners[ids.index(b)] = 1, 0
    return PlacementTable.from_owners(ids, owners, old.ep_size, old.version + 1), "swap"


def top_any_events(a: argparse.Namespace, rank: int) -> list[dict]:
    tr = Trainer("top_any", a, rank, skew=0.0)
    for _ in range(a.warmup):
        tr.step()
    step_s = measure_step(tr, a.repeats)
    rows = []

    # (a) add one: copy of the most-loaded expert, a unit gate row (the same on every rank), placed by the planner
    old = tr.layer.placement
    new_id = int(tr.layer.next_expert_id)
    source = max(old.expert_ids, key=lambda i: (tr.loads[i], -i))
    gate = torch.randn(a.d_model, generator=torch.Generator().manual_seed(7))
    decision = Decision(add=[NewExpert(new_id, gate / gate.norm(), "copy", source_id=source)])
    expected = {**tr.loads, new_id: float(max(tr.unrouted, 1))}
    ids = [*old.expert_ids, new_id]
    new = plan_placement(ids, expected, old.ep_size, current=old, expert_bytes=payload_bytes(tr.layer, "move"))
    rows.append(run_event("add_one", tr, decision, new, "adapt", step_s))

    # (b) remove one: the least-loaded expert; the survivors placed by the planner
    old = tr.layer.placement
    gone = min(old.expert_ids, key=lambda i: (tr.loads[i], i))
    ids = [i for i in old.expert_ids if i != gone]
    new = plan_placement(ids, tr.loads, old.ep_size, current=old, expert_bytes=payload_bytes(tr.layer, "move"))
    rows.append(run_event("remove_one", tr, Decision(remove=[gone]), new, "adapt", step_s))

    # (c) rebalance on the same layer
    new, how = rebalance_table(tr)
    rows.append(run_event("rebalance", tr, Decision(), new, "rebalance", step_s) | {"table": how})
    return [r | {"router": "top_any"} for r in rows]


def top2_rebalance(a: argparse.Namespace, rank: int) -> list[dict]:
    tr = Trainer("top2", a, rank, skew=a.skew)
    for _ in range(a.warmup):
        tr.step()
    step_s = measure_step(tr, a.repeats)
    new, how = rebalance_table(tr)
    row = run_event("rebalance_top2", tr, Decision(), new, "rebalance", step_s)
    return [row | {"table": how, "router": "top2"}]


def body(rank: int, world: int, a: argparse.Namespace) -> list[dict]:
    return top_any_events(a, rank) + top2_rebalance(a, rank)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks adapt", description=__doc__)
    add_shape_args(p, repeats=5)
    p.add_argument("--warmup", type=int, default=2, help="training steps before measuring (Adam state exists)")
    a = p.parse_args(argv)
    rows = run_ranks(body, a)
    meta = {
        **shape_meta(a),
        "optimizer": "MoEAdam lr=1e-3",
        "step": "forward + backward + sync_gradients + optimizer step, median, slowest rank",
        "event_ms": "ExpertMigration.run wall clock, slowest rank",
        "targets": "event_per_step < 1; bytes_ratio == 1.0; bit_exact true",
    }
    cols = [
        "event",
        "experts_moved",
        "bytes_moved",
        "bytes_needed",
        "bytes_ratio",
        "event_ms",
        "step_ms",
        "event_per_step",
        "bit_exact",
    ]
    emit("adapt", rows, cols, meta, a.json)
