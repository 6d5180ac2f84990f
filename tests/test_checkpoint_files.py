"""Checkpoint files: every damage refused with what does not match, nothing written by a refused load, the last K
kept, and a rank killed from outside in the middle of a save leaves the previous checkpoint intact and loadable."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from dynmoe_dist.checkpoint import CheckpointError, Manifest, latest, published, resolve, verify
from dynmoe_dist.parallel.groups import single_process_groups
from dynmoe_dist.train.checkpointing import dense_state, load_checkpoint, save_checkpoint
from dynmoe_dist.train.trainer import Trainer

import dist_pool
from train_support import config, small_corpus


def trainer(*overrides: str) -> Trainer:
    cfg = config("engine=torch", "moe=top_k", "steps=20", *overrides)
    return Trainer(cfg, small_corpus(), single_process_groups(), torch.device("cpu"))


def snapshot(folder: Path) -> dict[str, tuple[int, float]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime) for p in folder.rglob("*") if p.is_file()}


@pytest.fixture()
def saved(tmp_path: Path) -> tuple[Path, Trainer]:
    t = trainer()
    for _ in range(3):
        t.train_step()
    save_checkpoint(t, tmp_path / "checkpoints", keep=3, config={"note": "test"})
    return tmp_path / "checkpoints", t


def shard(root: Path, prefix: str) -> Path:
    return next(p for p in resolve(root).iterdir() if p.name.startswith(prefix))


def refused(root: Path, t: Trainer, *needles: str) -> None:
    before = snapshot(root.parent)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(t, root)
    for needle in needles:
        assert needle in str(err.value), str(err.value)
    assert snapshot(root.parent) == before  # a refused load writes nothing


def test_layout_manifest_and_latest(saved) -> None:
    root, t = saved
    folder = latest(root)
    assert folder.name == "step_000003" and resolve(root) == folder and resolve(root.parent) == folder
    manifest = Manifest.read(folder)
    assert manifest.step == 3 and manifest.config == {"note": "test"} and manifest.world_size == 1
    assert sorted(manifest.files) == ["experts-00000.safetensors", "rank-00000.safetensors", "shared.safetensors"]
    assert verify(folder, manifest, t.model) == []
    for name, entry in manifest.files.items():
        assert (folder / name).stat().st_size == entry["bytes"] and len(entry["sha256"]) == 64
    # no pickle anywhere: the manifest is JSON and every shard is safetensors
    json.loads((folder / "manifest.json").read_text())
    assert all(p.suffix in (".json", ".safetensors") for p in folder.iterdir())


def test_corrupted_byte_is_refused(saved) -> None:
    root, _ = saved
    path = shard(root, "experts")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    refused(root, trainer(), "experts-00000.safetensors does not match its SHA-256")


def test_truncated_and_missing_shards_are_refused(saved) -> None:
    root, _ = saved
    shared = shard(root, "shared")
    shared.write_bytes(shared.read_bytes()[:-100])
    shard(root, "rank").unlink()
    refused(root, trainer(), "shared.safetensors has", "(truncated?)", "rank-00000.safetensors is missing")


def test_damaged_manifest_is_refused(saved) -> None:
    root, _ = saved
    (resolve(root) / "manifest.json").write_text('{"format": "dynmoe_dist.checkpoint/1", "step":')
    refused(root, trainer(), "manifest.json is damaged")


def test_another_model_shape_is_refused_with_every_mismatch(saved) -> None:
    root, _ = saved
    other = trainer("model.d_model=48", "model.n_heads=2", "moe.d_ff=96")
    refused(
        root,
        other,
        "embed.weight: checkpoint [256, 32], model [256, 48]",
        "blocks.1.moe.d_model: checkpoint 32, model 48",
        "blocks.1.moe.d_ff: checkpoint 128, model 96",
    )
    deeper = trainer("model.n_layers=4")
    refused(root, deeper, "the model's parameter blocks.2.attn.qkv.weight is not in the checkpoint")
    gate = trainer("moe=top_any")
    refused(root, gate, "blocks.1.moe.gate: checkpoint 'top_k', model 'top_any'")


def test_keeps_the_last_k_and_never_reads_a_partial_folder(tmp_path: Path) -> None:
    t, root = trainer(), tmp_path / "checkpoints"
    (root / ".partial-step_000009-dead").mkdir(parents=True)  # a save a crash interrupted
    for _ in range(4):
        t.train_step()
        save_checkpoint(t, root, keep=2, config=None)
    assert [p.name for p in published(root)] == ["step_000003", "step_000004"]
    assert latest(root).name == "step_000004" and not list(root.glob(".partial-*"))


# ----------------------------------------------------------------------------------------------------------------------
# a rank killed from outside in the middle of a save


_TRAINERS: dict[str, Trainer] = {}  # per worker process: the trainer the next task goes on with


def case_train_and_save(root: str, steps: int, pause_marker: str | None) -> dict:
    """Train ``steps`` more steps and save; with ``pause_marker``, rank 1 stops between writing and publishing."""
    if root not in _TRAINERS:
        cfg = config("engine=torch", "moe=top_k", "steps=20")
        _TRAINERS[root] = Trainer(cfg, small_corpus(), dist_pool.groups(2), torch.device("cpu"))
    t = _TRAINERS[root]
    for _ in range(steps):
        t.train_step()

    def pause(stage: str) -> None:
        if pause_marker and stage == "written" and dist.get_rank() == 1:
            Path(pause_marker).write_text(str(os.getpid()))
            time.sleep(600)  # killed from outside before this ends

    save_checkpoint(t, Path(root), keep=3, config=None, fault=pause)
    return {k: v.clone() for k, v in dense_state(t).read().items()}


def test_rank_killed_mid_save_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    root, marker = tmp_path / "checkpoints", tmp_path / "paused"
    pool = dist_pool.DistPool(2, collective_timeout_s=5)
    try:
        first = pool.run(case_train_and_save, str(root), 2, None)[0]
        for q in pool.tasks:  # the second save, rank 1 pausing inside it
            q.put((case_train_and_save, (str(root), 2, str(marker))))
        deadline = time.monotonic() + 120
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        os.kill(int(marker.read_text()), signal.SIGKILL)
        rank, ok, value = pool.results.get(timeout=120)  # rank 0 gives up at its collective timeout
        assert (rank, ok) == (0, False) and "CollectiveError" in value and "checkpoint" in value, value
    finally:
        pool.broken = True
        pool.close()
    assert latest(root).name == "step_000002"  # the interrupted step 4 was never published
    assert list(root.glob(".partial-step_000004-*"))  # its half-written folder is still there, and ignored
    assert verify(latest(root), Manifest.read(latest(root))) == []
    resumed = trainer()  # loadable, here on one process (a reshard from 2 ranks)
    load_checkpoint(resumed, root)
    loaded = dense_state(resumed).read()
    assert all(torch.equal(loaded[k], first[k]) for k in first)


@pytest.mark.parametrize("gate", ["relu", "top_any"])
def test_per_gate_state_comes_back(tmp_path: Path, gate: str) -> None:
    """The ReLU gate's adaptive L1 coefficient and Top-Any's trainable temperature (with its optimizer state)."""
    extra = ("moe.router.trainable_temperature=true",) if gate == "top_any" else ()
    first = trainer(f"moe={gate}", *extra)
    for _ in range(4):
        first.train_step()
    save_checkpoint(first, tmp_path, keep=1, config=None)
    expected = [first.train_step().loss for _ in range(4)]
    again = trainer(f"moe={gate}", *extra)
    load_checkpoint(again, tmp_path)
    layer, reference = again.model.moe_layers()[0], first.model.moe_layers()[0]
    assert [again.train_step().loss for _ in range(4)] == expected
    if gate == "relu":
        assert float(layer.router.l1_coef) == float(reference.router.l1_coef) != 1e-8  # it moved, and came back
    else:
        assert torch.equal(layer.router.tau, reference.router.tau)
