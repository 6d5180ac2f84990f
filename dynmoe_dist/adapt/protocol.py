"""The migration protocol: apply one adaptation (add, remove, move experts) to a layer on every rank, or on none.

agree    every rank computed the decision and the new placement itself; an all-gathered digest proves they
         are the same before anything changes
exchange expert weights with their optimizer state (moments, per-row step) travel to their new owners, and the
         weights of copied experts to the new experts' owners, in one all-to-all of bytes (bit-exact)
stage    the new gate rows, expert bank and optimizer state are built aside; the old ones are untouched
vote     an all-reduce(MIN) of a success flag over the world
commit   all succeeded: the staged tensors replace the old (memory now follows ownership); else every rank
         keeps the old version and training goes on (abort)
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..layer import MoELayer
from ..optim import STATE_KEYS, MoEAdam
from ..parallel.collectives import CollectiveError, all_reduce, all_to_all_single, guarded
from ..parallel.groups import ParallelGroups
from ..placement import PlacementTable
from .planner import imbalance, moved_experts
from .policy import Decision


@dataclass
class AdaptEvent:
    """One adaptation, as logged: what changed, what it cost, whether it took effect."""

    layer: str
    step: int
    kind: str  # "adapt" (experts added or removed) or "rebalance"
    added: list[int]
    removed: list[int]
    moved: list[tuple[int, int, int]]  # (expert id, from rank, to rank)
    bytes_moved: int
    seconds: float
    imbalance_before: float
    imbalance_after: float
    committed: bool
    version: int
    reason: str = ""

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass
class Transfer:
    kind: str  # "move": weights + optimizer state; "copy": weights only, for a new expert's initial value
    expert_id: int  # the expert whose rows travel
    src: int
    dst: int
    target_id: int  # the expert that receives them (== expert_id for a move)


@dataclass
class Staged:
    router_rows: dict[str, tuple[torch.Tensor, dict[str, torch.Tensor]]] = field(default_factory=dict)
    bank_rows: dict[str, tuple[torch.Tensor, dict[str, torch.Tensor]]] = field(default_factory=dict)


def digest(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:7], "little")


def transfers(decision: Decision, old: PlacementTable, new: PlacementTable) -> list[Transfer]:
    """Every row transfer the event needs, in one global order that every rank computes alike."""
    out = [Transfer("move", i, src, dst, i) for i, src, dst in moved_experts(old, new)]
    for n in decision.add:
        if n.init == "copy" and n.source_id is not None:
            src, dst = old.owner_of(n.source_id), new.owner_of(n.expert_id)
            out.append(Transfer("copy", n.source_id, src, dst, n.expert_id))
    return sorted(out, key=lambda t: (t.kind, t.target_id))


def payload_bytes(layer: MoELayer, kind: str) -> int:
    """Bytes one expert's transfer takes: every weight row, plus both Adam moments and an int64 step for a move."""
    row = sum(w.shape[1:].numel() * w.element_size() for w in layer.experts.weights().values())
    return 3 * row + 8 * len(layer.experts.weights()) if kind == "move" else row


def stack_rows(rows: list[torch.Tensor], shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A fresh [n, ...] tensor from n rows (a fresh empty one for n = 0)."""
    return torch.stack(rows) if rows else torch.zeros(shape, dtype=dtype, device=device)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def from_bytes(buf: torch.Tensor, like: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return buf.view(like.dtype).reshape(shape).clone()


class ExpertMigration:
    """One event on one layer; ``run`` is collective over the layer's groups."""

    def __init__(
        self,
        layer: MoELayer,
        optimizer: MoEAdam,
        groups: ParallelGroups | None,
        dense_init: dict[str, torch.Tensor] | None = None,
        fault: Callable[[str], None] | None = None,
    ) -> None:
        self.layer, self.opt, self.groups = layer, optimizer, groups
        self.dense_init = dense_init
        self.fault = fault

    @property
    def device(self) -> torch.device:
        """Where the layer lives: NCCL collectives need their tensors there, not on the CPU."""
        return self.layer.router.expert_ids.device

    @property
    def ep_rank(self) -> int:
        return self.groups.ep_rank if self.groups is not None else 0

    def world_group(self):
        return self.groups.world_group if self.groups is not None else None

    def run(self, decision: Decision, new: PlacementTable, kind: str, step: int, loads: dict[int, float]) -> AdaptEvent:
        t0 = time.perf_counter()
        layer = self.layer
        old = layer.placement
        moves = transfers(decision, old, new)
        event = AdaptEvent(
            layer=layer.name,
            step=step,
            kind=kind,
            added=[n.expert_id for n in decision.add],
            removed=list(decision.remove),
            moved=moved_experts(old, new),
            bytes_moved=sum(payload_bytes(layer, t.kind) for t in moves if t.src != t.dst),
            seconds=0.0,
            imbalance_before=imbalance(old, {i: loads.get(i, 0.0) for i in old.expert_ids}),
            imbalance_after=imbalance(new, {i: loads.get(i, 0.0) for i in new.expert_ids}),
            committed=False,
            version=old.version,
        )
        if not self.agree(decision, old, new):
            event.reason = "ranks disagree on the decision or the placement"
            event.seconds = time.perf_counter() - t0
            return event
        staged, error = None, ""
        try:
            received = self.exchange(moves)
            staged = self.stage(decision, old, new, moves, received)
            if self.fault is not None:
                self.fault("staged")
        except Exception as exc:  # noqa: BLE001 - any local failure becomes a "no" vote, never a hang
            if isinstance(exc, CollectiveError):
                raise  # the group itself is broken: a vote would only wait for the same dead peer again
            error = f"{type(exc).__name__}: {exc}"
        if self.vote(staged is not None and not error):
            self.commit(staged, new, decision)
            event.committed, event.version = True, new.version
        else:
            event.reason = error or "another rank failed to stage the event; every rank kept the old version"
        event.seconds = time.perf_counter() - t0
        return event

    def agree(self, decision: Decision, old: PlacementTable, new: PlacementTable) -> bool:
        group = self.world_group()
        if group is None:
            return True
        mine = torch.tensor([digest(decision.key(), old.digest(), new.digest())], dtype=torch.int64, device=self.device)
        everyone = [torch.zeros_like(mine) for _ in range(dist.get_world_size(group))]
        guarded("adapt.agree", lambda: dist.all_gather(everyone, mine, group=group))
        return all(int(t) == int(mine) for t in everyone)

    def vote(self, ok: bool) -> bool:
        flag = torch.tensor([1 if ok else 0], dtype=torch.int64, device=self.device)
        group = self.world_group()
        if group is not None:
            all_reduce(flag, group, "adapt.vote", op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def exchange(self, moves: list[Transfer]) -> dict[tuple[str, int], dict[str, torch.Tensor]]:
        """Send this rank's outgoing rows, receive the incoming ones: {(kind, target id): {name: row, ...}}."""
        me = self.ep_rank
        crossing = [t for t in moves if t.src != t.dst]
        if not crossing:
            return {}
        world = self.groups.ep_size
        bank, weights = self.layer.experts, self.layer.experts.weights()
        local = {int(i): s for s, i in enumerate(bank.expert_ids.tolist())}
        send_parts, send_splits = [], [0] * world
        for t in crossing:
            if t.src != me:
                continue
            slot = local[t.expert_id]
            for name in sorted(weights):
                w = weights[name]
                send_parts.append(as_bytes(w.detach()[slot]))
                if t.kind == "move":
                    state = self.opt.rows_of(w, torch.tensor([slot], device=w.device))
                    send_parts += [as_bytes(state["exp_avg"][0]), as_bytes(state["exp_avg_sq"][0])]
                    send_parts.append(as_bytes(state["step"]))
            send_splits[t.dst] += payload_bytes(self.layer, t.kind)
        recv_splits = [0] * world
        for t in crossing:
            if t.dst == me:
                recv_splits[t.src] += payload_bytes(self.layer, t.kind)
        send = torch.cat(send_parts) if send_parts else torch.zeros(0, dtype=torch.uint8, device=self.device)
        recv = torch.empty(sum(recv_splits), dtype=torch.uint8, device=self.device)
        all_to_all_single(recv, send, recv_splits, send_splits, self.groups.ep_group, "adapt.exchange")
        received: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
        offsets = [sum(recv_splits[:r]) for r in range(world)]
        for t in crossing:  # same global order as the senders used
            if t.dst != me:
                continue
            pos = offsets[t.src]
            rows: dict[str, torch.Tensor] = {}
            for name in sorted(weights):
                w = weights[name]
                n = w.shape[1:].numel() * w.element_size()
                rows[name] = from_bytes(recv[pos : pos + n], w, w.shape[1:])
                pos += n
                if t.kind == "move":
                    rows[name + ".exp_avg"] = from_bytes(recv[pos : pos + n], w, w.shape[1:])
                    rows[name + ".exp_avg_sq"] = from_bytes(recv[pos + n : pos + 2 * n], w, w.shape[1:])
                    rows[name + ".step"] = recv[pos + 2 * n : pos + 2 * n + 8].view(torch.int64).clone()
                    pos += 2 * n + 8
            offsets[t.src] = pos
            received[(t.kind, t.target_id)] = rows
        return received

    def stage(
        self,
        decision: Decision,
        old: PlacementTable,
        new: PlacementTable,
        moves: list[Transfer],
        received: dict[tuple[str, int], dict[str, torch.Tensor]],
    ) -> Staged:
        staged = Staged()
        layer, me = self.layer, self.ep_rank
        removed = set(decision.remove)
        old_ids = layer.router.expert_ids.tolist()
        keep = torch.tensor(
            [p for p, i in enumerate(old_ids) if i not in removed], dtype=torch.int64, device=self.device
        )
        n_new = len(decision.add)
        # gate rows: replicated, so every rank edits its own copy the same way; the gate says how new rows start
        fresh_rows = layer.router.new_rows(torch.stack([n.gate_row for n in decision.add]), keep) if n_new else {}
        for name, p in layer.router.row_parameters().items():
            state = self.opt.rows_of(p, keep)
            rows = p.detach().index_select(0, keep)
            if n_new:
                rows = torch.cat([rows, fresh_rows[name].to(p.device, p.dtype)])
                state = {k: torch.cat([v, v.new_zeros((n_new, *v.shape[1:]))]) for k, v in state.items()}
            staged.router_rows[name] = (rows, state)
        # expert bank: the experts this rank owns in the new placement, in slot order
        bank, weights = layer.experts, layer.experts.weights()
        local = {int(i): s for s, i in enumerate(bank.expert_ids.tolist())}
        new_experts = {n.expert_id: n for n in decision.add}
        copies_here = {t.target_id: t.expert_id for t in moves if t.kind == "copy" and t.src == t.dst == me}
        mine = new.experts_on(me)
        for name, w in sorted(weights.items()):
            data, states = [], {k: [] for k in STATE_KEYS}
            full_state = self.opt.state_for(w, True)
            for expert_id in mine:
                if expert_id in local:  # stays here
                    s = local[expert_id]
                    data.append(w.detach()[s])
                    for k in STATE_KEYS:
                        states[k].append(full_state[k][s])
                elif ("move", expert_id) in received:
                    rows = received[("move", expert_id)]
                    data.append(rows[name])
                    states["exp_avg"].append(rows[name + ".exp_avg"])
                    states["exp_avg_sq"].append(rows[name + ".exp_avg_sq"])
                    states["step"].append(rows[name + ".step"][0])
                else:
                    data.append(self.initial_row(new_experts[expert_id], name, w, local, copies_here, received))
                    states["exp_avg"].append(w.new_zeros(w.shape[1:]))
                    states["exp_avg_sq"].append(w.new_zeros(w.shape[1:]))
                    states["step"].append(torch.zeros((), dtype=torch.int64, device=w.device))
            shape = (len(mine), *w.shape[1:])
            state = {
                "exp_avg": stack_rows(states["exp_avg"], shape, w.dtype, w.device),
                "exp_avg_sq": stack_rows(states["exp_avg_sq"], shape, w.dtype, w.device),
                "step": stack_rows(states["step"], (len(mine),), torch.int64, w.device),
            }
            staged.bank_rows[name] = (stack_rows(data, shape, w.dtype, w.device), state)
        return staged

    def initial_row(self, new, name, w, local, copies_here, received) -> torch.Tensor:
        if new.init == "copy":
            if new.expert_id in copies_here:
                return w.detach()[local[copies_here[new.expert_id]]]
            return received[("copy", new.expert_id)][name]
        if new.init == "dense":
            if self.dense_init is None or name not in self.dense_init:
                raise ValueError(f"init='dense' needs dense_init with {name}; give the dense FFN weights")
            return self.dense_init[name].to(w.device, w.dtype)
        return self.layer.experts.fresh_rows(new.expert_id)[name].to(w.device)

    def commit(self, staged: Staged, new: PlacementTable, decision: Decision) -> None:
        layer = self.layer
        for name in layer.router.row_parameters():
            self.opt.install_rows(layer.router, name, *staged.router_rows[name])
        for name in layer.experts.weights():
            self.opt.install_rows(layer.experts, name, *staged.bank_rows[name])
        next_id = max([int(layer.next_expert_id)] + [n.expert_id + 1 for n in decision.add])
        layer.install(new, next_id)
