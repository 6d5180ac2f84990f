"""Checkpoint oracles on real ranks (gloo): resume == uninterrupted, reshard == no reshard, and the expert set,
placement and optimizer state that adaptation produced come back."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from dynmoe_dist.parallel.groups import single_process_groups
from dynmoe_dist.train.checkpointing import load_checkpoint, save_checkpoint
from dynmoe_dist.train.trainer import Trainer

import dist_pool
from train_support import EVENTS, by_id, config, deepspeed_env, seed_events, small_corpus

GLOBAL_BATCH = 12  # sequences per step over the world: 2 x 6, 3 x 4, 4 x 3, 1 x 12 see the same batches
NO_BATCH_STATS = ("moe.router.balance_weight=0.0",)  # the balance term is a per-rank batch statistic


def trainer(world: int, ep: int, *overrides: str) -> Trainer:
    deepspeed_env()
    cfg = config(*EVENTS, *NO_BATCH_STATS, f"data.batch_size={GLOBAL_BATCH // world}", "steps=40", *overrides)
    groups = dist_pool.groups(ep) if world > 1 else single_process_groups()
    t = Trainer(cfg, small_corpus(), groups, torch.device("cpu"))
    seed_events(t.model)
    return t


def window(t: Trainer) -> dict[str, torch.Tensor]:
    """This rank's part of each layer's open recording window (tokens per expert, unrouted sum and count)."""
    return {m.name: torch.cat([m.recorder.tokens, m.recorder.unrouted]).clone() for m in t.model.moe_layers()}


def steps(t: Trainer, n: int) -> list[tuple]:
    out = []
    for _ in range(n):
        r = t.train_step()
        out.append((r.loss, r.grad_norm, [(e.kind, e.added, e.removed, e.moved) for e in r.events if e.committed]))
    return out


def case_resume(root: str, engine: tuple[str, ...], save_at: int, more: int) -> dict:
    t = trainer(dist.get_world_size(), dist.get_world_size(), *engine)
    steps(t, save_at)
    save_checkpoint(t, Path(root), keep=2, config=None)
    expected = steps(t, more)
    resumed = trainer(dist.get_world_size(), dist.get_world_size(), *engine)
    load_checkpoint(resumed, Path(root))
    got = steps(resumed, more)
    a, b = by_id(t), by_id(resumed)
    diff = max(float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0 for k in a)
    shared = sum(".shared." in k for k in a)
    return {"expected": expected, "got": got, "same_keys": set(a) == set(b), "max_param_diff": diff, "shared": shared}


def test_resume_is_bit_identical_with_the_torch_engine_across_an_event(tmp_path: Path) -> None:
    results = dist_pool.pool(2).run(case_resume, str(tmp_path), ("engine=torch",), 5, 8)
    for r in results:
        assert any(events for _, _, events in r["expected"])  # an adaptation event fell between save and end
        assert r["got"] == r["expected"]  # losses, norms and events, exactly
        assert r["same_keys"] and r["max_param_diff"] == 0.0


@pytest.mark.parametrize(("stage", "precision"), [(0, "fp32"), (1, "fp32"), (2, "fp32"), (0, "bf16"), (2, "bf16")])
def test_resume_with_deepspeed_to_float_tolerance(tmp_path: Path, stage: int, precision: str) -> None:
    engine = ("engine=deepspeed", f"engine.zero_stage={stage}", f"engine.precision={precision}")
    results = dist_pool.pool(2).run(case_resume, str(tmp_path), engine, 5, 8)
    for r in results:
        assert [e for *_, e in r["got"]] == [e for *_, e in r["expected"]]
        for (la, na, _), (lb, nb, _) in zip(r["got"], r["expected"]):
            assert la == pytest.approx(lb, rel=1e-5) and na == pytest.approx(nb, rel=1e-5)
        assert r["same_keys"] and r["max_param_diff"] < 1e-5


@pytest.mark.parametrize("engine", ["torch", "deepspeed"])
def test_resume_with_shared_experts(tmp_path: Path, engine: str) -> None:
    """Shared experts are dense state: saved and restored (with their optimizer state) by the dense side."""
    stage = ("engine.zero_stage=2",) if engine == "deepspeed" else ()
    overrides = (f"engine={engine}", *stage, "moe.num_shared_experts=2")
    for r in dist_pool.pool(2).run(case_resume, str(tmp_path), overrides, 5, 8):
        assert r["shared"] >= 2  # the shared weights (and their Adam moments) are among the compared tensors
        assert [e for *_, e in r["got"]] == [e for *_, e in r["expected"]]
        for (la, na, _), (lb, nb, _) in zip(r["got"], r["expected"]):
            assert la == pytest.approx(lb, rel=1e-6) and na == pytest.approx(nb, rel=1e-6)
        assert r["same_keys"] and r["max_param_diff"] < 1e-6


# ----------------------------------------------------------------------------------------------------------------------
# reshard


def case_save(root: str, save_at: int, more: int) -> dict:
    t = trainer(2, 2, "engine=torch")
    history = steps(t, save_at)
    save_checkpoint(t, Path(root), keep=2, config=None)
    saved, open_window = by_id(t), window(t)
    continued = [loss for loss, *_ in steps(t, more)]
    return {"saved": saved, "continued": continued, "events": [e for *_, e in history if e], "window": open_window}


def case_load(root: str, ep: int, more: int) -> dict:
    t = trainer(dist.get_world_size() if dist.is_initialized() else 1, ep, "engine=torch")
    load_checkpoint(t, Path(root))
    loaded, open_window = by_id(t), window(t)
    tables = {m.name: m.placement for m in t.model.moe_layers()}  # as loaded, before training moves experts again
    continued = [loss for loss, *_ in steps(t, more)]
    return {"loaded": loaded, "continued": continued, "ids": tables, "window": open_window}


def global_losses(results: list[dict]) -> list[float]:
    """The mean of the ranks' losses: the global mean loss, every rank holding the same number of tokens."""
    return [sum(step) / len(step) for step in zip(*(r["continued"] for r in results))]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp("reshard")
    return root, dist_pool.pool(2).run(case_save, str(root), 13, 4)  # step 13: inside a recording window


@pytest.mark.parametrize(("world", "ep"), [(3, 3), (4, 2), (1, 1), (2, 2)])
def test_reshard_equals_no_reshard(saved, world: int, ep: int) -> None:
    root, before = saved
    history = [e for step in before[0]["events"] for e in step]  # (kind, added, removed, moved) before the save
    assert any(e[1] for e in history) and any(e[2] for e in history) and any(e[0] == "rebalance" for e in history)
    after = [case_load(str(root), 1, 4)] if world == 1 else dist_pool.pool(world).run(case_load, str(root), ep, 4)
    # every tensor, MoE ones by expert id: exactly what the saving ranks held
    saved_all = {k: v for r in before for k, v in r["saved"].items() if not k.startswith("placement/")}
    loaded_all = {k: v for r in after for k, v in r["loaded"].items() if not k.startswith("placement/")}
    assert set(loaded_all) == set(saved_all)
    for key, value in saved_all.items():
        assert torch.equal(loaded_all[key], value), key
    # the open recording window: the same world-wide sums (it was partly filled at the save)
    for name in before[0]["window"]:
        summed = sum(r["window"][name] for r in before)
        assert summed.sum() > 0 and torch.equal(sum(r["window"][name] for r in after), summed)
    # continued training matches the continuation without reshard (the same global batches, float tolerance)
    assert global_losses(after) == pytest.approx(global_losses(before), rel=1e-5)
    # placement: the saved one where the expert-parallel size is unchanged, else contiguous blocks
    for name, table in after[0]["ids"].items():
        saved_owners = before[0]["saved"][f"placement/{name}"][0].tolist()
        if ep == 2:
            assert list(table.owners) == saved_owners
        else:
            assert table.ep_size == ep and table.counts_per_rank() == [
                len(table.expert_ids) // ep + (r < len(table.expert_ids) % ep) for r in range(ep)
            ]


def case_cross_engine(root: str) -> dict:
    """Saved by DeepSpeed at ZeRO 2 (partitioned state), loaded by the torch engine: the same values by name and id."""
    t = trainer(2, 2, "engine=deepspeed", "engine.zero_stage=2")
    steps(t, 5)
    save_checkpoint(t, Path(root), keep=2, config=None)
    other = trainer(2, 2, "engine=torch")
    load_checkpoint(other, Path(root))
    a, b = by_id(t), by_id(other)
    return {"same_keys": set(a) == set(b), "equal": all(torch.equal(a[k], b[k]) for k in a)}


def test_checkpoint_moves_between_engines(tmp_path: Path) -> None:
    for r in dist_pool.pool(2).run(case_cross_engine, str(tmp_path)):
        assert r["same_keys"] and r["equal"]


def case_save_with_replicas(root: str) -> None:
    t = trainer(4, 2, "engine=torch")
    steps(t, 3)
    save_checkpoint(t, Path(root), keep=1, config=None)


def test_each_expert_is_written_once_with_replicas(tmp_path: Path) -> None:
    """(4, 2): every expert lives on two ranks; only the first replica's owner writes it, dense state only rank 0."""
    from dynmoe_dist.checkpoint import Manifest, resolve

    dist_pool.pool(4).run(case_save_with_replicas, str(tmp_path))
    manifest = Manifest.read(resolve(tmp_path))
    writers = {name: entry["rank"] for name, entry in manifest.files.items()}
    assert writers == {
        "shared.safetensors": 0,
        "experts-00000.safetensors": 0,
        "experts-00001.safetensors": 1,
        **{f"rank-{r:05d}.safetensors": r for r in range(4)},
    }
    ((name, rec),) = manifest.layers.items()
    for expert_id in rec.expert_ids:
        keys = [k for k in manifest.tensors if k.startswith(f"moe/{name}/expert/{expert_id}/") and "@" not in k]
        assert len(keys) == 2  # w_in and w_out, once each
