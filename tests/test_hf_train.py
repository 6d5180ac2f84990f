"""A converted and an upcycled transformers model train at 2 ranks (experts sharded) with adds, removes and a
rebalance, and end where one process ends that trains on the concatenated batches and applies the same events.

The library's loop (docs/LIBRARY.md): each rank's loss is its share of the global token loss, ``sync_gradients``
sums dense, gate and expert gradients, ``MoEAdam`` steps the MoE side and torch's Adam the pretrained dense side,
``AdaptController`` adapts. Compared in float64, expert id by expert id, to 1e-9.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

pytest.importorskip("transformers")

from dynmoe_dist.adapt import AdaptConfig, AdaptController, PolicyConfig
from dynmoe_dist.hf import convert, moe_aux_loss, moe_blocks, upcycle
from dynmoe_dist.optim import MoEAdam
from dynmoe_dist.parallel import global_count, sync_gradients

import dist_pool
import hf_support

STEPS = 14
# the reference rules (a token no expert accepts goes nowhere, new thresholds at 0) and no batch-statistic balance
# term, so the sharded run can equal the single process exactly
ROUTER = {"kind": "top_any", "balance_weight": 0.0, "unrouted": "drop", "new_threshold": "zero"}


def build(kind: str, folder: Path, groups=None):
    model = hf_support.load(folder).train()
    model = convert(model, ROUTER, groups) if kind == "convert" else upcycle(model, 4, ROUTER, groups=groups)
    model.double()  # the gate too (blocks route in fp32 by default)
    with torch.no_grad():  # many tokens find no expert (adds), the last expert never fires (removed)
        for _, block in moe_blocks(model):
            router = block.moe.router
            router.threshold.fill_(0.3)
            router.threshold[-1] = 9.0
            block.pending_calibration.clear()
    return model


def batches(world: int, step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(900 + step)
    sizes = [(3 * r + step) % 3 + 1 for r in range(world)]  # uneven: 1 to 3 sequences per rank
    return [torch.randint(3, hf_support.VOCAB, (n, 8), generator=g) for n in sizes]


def by_id(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, block in moe_blocks(model):
        layer = block.moe
        for pos, eid in enumerate(layer.router.expert_ids.tolist()):
            for pname, p in layer.router.row_parameters().items():
                out[f"{name}.gate.{pname}[{eid}]"] = p.detach()[pos].clone()
        for slot, eid in enumerate(layer.experts.expert_ids.tolist()):
            for wname, w in layer.experts.weights().items():
                out[f"{name}.{wname}[{eid}]"] = w.detach()[slot].clone()
    for pname, p in model.named_parameters():
        if ".moe.router." not in pname and ".moe.experts." not in pname:
            out[pname] = p.detach().clone()
    return out


def train(kind: str, folder: Path, world: int, rank: int | None, groups=None):
    model = build(kind, folder, groups)
    moe = {id(p) for _, b in moe_blocks(model) for p in b.moe.moe_parameters()}
    dense_opt = torch.optim.Adam([p for p in model.parameters() if id(p) not in moe], lr=1e-2)
    opt = MoEAdam.for_moe(model, lr=1e-2)
    cfg = AdaptConfig(
        record_steps=2,
        idle_steps=1,
        policy=PolicyConfig(max_experts=5, direction="mean"),
        rebalance_threshold=1.01,
        tolerance=0.0,
    )
    ctl = AdaptController(model, opt, groups, cfg)
    events = []
    for step in range(STEPS):
        data = batches(world, step)
        ids = torch.cat(data) if rank is None else data[rank]
        local = ids[:, 1:].numel()
        total = local if rank is None else global_count(local, groups)
        logits = model(ids).logits[:, :-1]
        task = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        loss = task / total + moe_aux_loss(model) * (local / total)
        loss.backward()
        if rank is not None:
            sync_gradients(model, groups, average=False)
        dense_opt.step()
        opt.step()
        dense_opt.zero_grad()
        opt.zero_grad()
        events += ctl.step()
    return model, events


def case_oracle(kind: str, folder: str) -> dict:
    world, rank = dist.get_world_size(), dist.get_rank()
    groups = dist_pool.groups(world)
    ref_model, ref_events = train(kind, Path(folder), world, None)
    model, events = train(kind, Path(folder), world, rank, groups)
    ref, mine = by_id(ref_model), by_id(model)
    start = dict(hf_support.load(Path(folder)).named_parameters())
    diffs = {k: float((v - ref[k]).abs().max()) for k, v in mine.items() if k in ref}
    return {
        "missing": sorted(set(mine) - set(ref)),
        "worst": max(diffs.items(), key=lambda kv: kv[1]),
        "ref_events": [(e.added, e.removed) for e in ref_events if e.added or e.removed],
        "events": [(e.kind, e.added, e.removed, bool(e.moved), e.committed) for e in events],
        "moved_dense": float((ref["lm_head.weight"] - start["lm_head.weight"].double()).abs().max()),
    }


@pytest.mark.parametrize(("kind", "family"), [("convert", "mixtral"), ("upcycle", "qwen3")])
def test_training_at_two_ranks_equals_one_process(tmp_path, kind: str, family: str) -> None:
    folder = hf_support.save_tiny(family, tmp_path / family)
    results = dist_pool.pool(2).run(case_oracle, kind, str(folder))
    first = results[0]
    kinds = {e[0] for e in first["events"]}
    assert {"adapt", "rebalance"} <= kinds, first["events"]
    assert any(e[1] for e in first["events"]) and any(e[2] for e in first["events"]), first["events"]
    assert all(e[4] for e in first["events"])
    adds_removes = [(a, r) for _, a, r, _, _ in first["events"] if a or r]
    assert adds_removes == first["ref_events"]
    for res in results:
        assert res["events"] == first["events"] and res["missing"] == []
        assert res["worst"][1] < 1e-9, res["worst"]
        assert res["moved_dense"] > 1e-3  # the pretrained dense side trained too
