"""The trainer's checkpoints: its parts handed to the checkpoint package, and its own state around them.

Saved per checkpoint, beside the parameters and optimizer states (``dynmoe_dist.checkpoint``): ``Trainer.state_dict()``
split into plain values (the manifest: step, tokens, time, data position, adaptation schedule) and tensors (each rank's
own file: its RNG streams and its part of the open recording window). On a different world size the window's parts
are summed onto rank 0 (the window is only ever used summed over the world), and ranks beyond the saved world start
RNG streams of their own.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import (
    AsyncSave,
    DenseState,
    UnfusedMasters,
    ZeroPartitions,
    load,
    read_rank_tensors,
    save,
    save_async,
)
from ..checkpoint.manifest import Manifest
from ..parallel.grads import moe_parameter_kinds


def dense_state(trainer) -> DenseState:
    """The adapter for whatever holds the trainer's dense parameters."""
    dense_ids = {id(p) for p in moe_parameter_kinds(trainer.model)["dense"]}
    named = [(n, p) for n, p in trainer.model.named_parameters() if id(p) in dense_ids]
    engine = trainer.engine
    if engine.name == "torch":
        return DenseState(named, engine.dense_opt)
    wrapper = engine.engine.optimizer
    if wrapper is engine.client:
        return DenseState(named, engine.client)
    if hasattr(wrapper, "fp32_groups") and hasattr(wrapper, "fp16_groups"):
        return UnfusedMasters(named, wrapper)
    if hasattr(wrapper, "single_partition_of_fp32_groups"):
        return ZeroPartitions(named, wrapper)
    raise TypeError(f"no checkpoint adapter for DeepSpeed's {type(wrapper).__name__}")


def split_state(state: Any, prefix: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """A nested state with tensors -> (the same structure with tensors replaced by their keys, the tensors)."""
    if isinstance(state, torch.Tensor):
        return {"tensor": prefix}, {prefix: state}
    if isinstance(state, dict):
        plain, tensors = {}, {}
        for key, value in state.items():
            plain[key], more = split_state(value, f"{prefix}.{key}" if prefix else str(key))
            tensors.update(more)
        return plain, tensors
    return state, {}


def join_state(plain: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(plain, dict):
        if set(plain) == {"tensor"}:
            return tensors[plain["tensor"]]
        return {key: join_state(value, tensors) for key, value in plain.items()}
    return plain


def save_checkpoint(trainer, root: Path, keep: int, config: dict | None, fault: Callable | None = None) -> Path:
    """The state of this step, written and published before this returns (collective)."""
    return _save(save, trainer, root, keep, config, fault)


def begin_checkpoint(trainer, root: Path, keep: int, config: dict | None, fault: Callable | None = None) -> AsyncSave:
    """The state of this step taken now (collective), written by a background thread; ``commit()`` publishes it."""
    return _save(save_async, trainer, root, keep, config, fault)


def _save(how: Callable, trainer, root: Path, keep: int, config: dict | None, fault: Callable | None):
    plain, tensors = split_state(trainer.state_dict())
    state = (trainer.state.step, trainer.groups, trainer.model, trainer.moe_opt, dense_state(trainer), plain, tensors)
    return how(root, *state, config=config, keep=keep, fault=fault)


def load_checkpoint(trainer, path: Path) -> Manifest:
    """Load a checkpoint into ``trainer`` on whatever world it runs (collective)."""
    manifest, folder = load(path, trainer.groups, trainer.model, trainer.moe_opt, dense_state(trainer))
    rank, world = trainer.rank, trainer.world
    if world == manifest.world_size:
        tensors = read_rank_tensors(folder, manifest, rank)
    else:
        tensors = resharded_rank_tensors(folder, manifest, rank, trainer.cfg.seed + 1 + rank)
    trainer.load_state_dict(join_state(manifest.state, tensors))
    return manifest


def resharded_rank_tensors(folder: Path, manifest: Manifest, rank: int, seed: int) -> dict[str, torch.Tensor]:
    """Per-rank tensors for a world of another size: windows summed onto rank 0, RNG streams kept where they exist."""
    saved = [read_rank_tensors(folder, manifest, r) for r in range(manifest.world_size)]
    own = saved[rank] if rank < len(saved) else None
    out = {}
    for key, value in saved[0].items():
        if key.startswith("adapt."):
            out[key] = sum(s[key] for s in saved) if rank == 0 else torch.zeros_like(value)
        elif own is not None:
            out[key] = own[key]
        elif key == "rng.torch":
            out[key] = torch.Generator().manual_seed(seed).get_state()
        else:
            out[key] = value
    return out
