"""dynmoe-export: a checkpoint written on 2 expert-parallel ranks after adaptation becomes one single-process state
dict with every expert, and the model rebuilt from it computes what the distributed checkpoint holds."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from dynmoe_dist.checkpoint import CheckpointError, Manifest, resolve
from dynmoe_dist.checkpoint.export import export, load_exported
from dynmoe_dist.parallel.groups import single_process_groups
from dynmoe_dist.train.checkpointing import load_checkpoint, save_checkpoint
from dynmoe_dist.train.model import Transformer, model_from_export
from dynmoe_dist.train.trainer import Trainer

import dist_pool
from train_support import EVENTS, config, seed_events, small_corpus

OVERRIDES = (*EVENTS, "engine=torch", "steps=20")


def case_save(root: str) -> None:
    cfg = config(*OVERRIDES)
    t = Trainer(cfg, small_corpus(), dist_pool.groups(2), torch.device("cpu"))
    seed_events(t.model)
    for _ in range(13):
        t.train_step()
    save_checkpoint(t, Path(root), keep=2, config=dataclasses.asdict(cfg))  # as the app saves its resolved config


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("export") / "checkpoints"
    dist_pool.pool(2).run(case_save, str(root))
    return root


def test_export_holds_every_expert_and_computes_like_the_checkpoint(checkpoint: Path, tmp_path: Path) -> None:
    manifest = Manifest.read(resolve(checkpoint))
    ((name, rec),) = manifest.layers.items()
    assert rec.expert_ids != list(range(6))  # adaptation changed the expert set before the save
    out = export(checkpoint, tmp_path / "model.safetensors")
    with safe_open(str(out), "pt") as f:
        assert f.get_tensor(f"{name}.experts.w_in").shape[0] == len(rec.expert_ids)
        assert f.get_tensor(f"{name}.router.expert_ids").tolist() == rec.expert_ids
    cfg = config(*OVERRIDES)
    exported = load_exported(out, Transformer(cfg.model, cfg.moe, seed=123)).eval()  # another seed: all overwritten
    reference = Trainer(cfg, small_corpus(), single_process_groups(), torch.device("cpu"))
    load_checkpoint(reference, checkpoint)
    reference.model.eval()
    tokens = torch.randint(0, 256, (3, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(exported.logits(tokens)[0], reference.model.logits(tokens)[0])


def test_cli_and_model_from_export(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli.safetensors"
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "from dynmoe_dist.cli import export; export()",
            str(checkpoint),
            str(out),
        ],  # dynmoe-export
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert str(out) in proc.stdout and "blocks.1.moe:" in proc.stdout
    rebuilt = model_from_export(out).eval()  # the model from the config the export carries
    cfg = config(*OVERRIDES)
    loaded = load_exported(out, Transformer(cfg.model, cfg.moe, seed=5)).eval()
    tokens = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(rebuilt.logits(tokens)[0], loaded.logits(tokens)[0])
    with pytest.raises(CheckpointError, match="carries"):  # model_from_export needs the run's full config
        cfg_less = tmp_path / "no-config.safetensors"
        export_without_config(checkpoint, cfg_less)
        model_from_export(cfg_less)


def export_without_config(checkpoint: Path, out: Path) -> None:
    from safetensors.torch import save_file

    from dynmoe_dist.checkpoint.export import exported_state

    state, meta = exported_state(resolve(checkpoint))
    save_file({k: v.contiguous() for k, v in state.items()}, str(out), metadata={**meta, "config": "null"})


def test_a_damaged_checkpoint_is_not_exported(checkpoint: Path, tmp_path: Path) -> None:
    damaged = tmp_path / "damaged"
    shutil.copytree(resolve(checkpoint), damaged)
    shard = next(damaged.glob("experts-*"))
    shard.write_bytes(shard.read_bytes()[:-1])
    with pytest.raises(CheckpointError, match="truncated"):
        export(damaged, tmp_path / "never.safetensors")
    assert not (tmp_path / "never.safetensors").exists()
