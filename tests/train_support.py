"""Shared pieces of the training-application tests: a small real corpus, tiny configs, DeepSpeed's environment."""

from __future__ import annotations

import copy
import functools
import os
import sysconfig
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from dynmoe_dist.train.config import TrainConfig, load_config
from dynmoe_dist.train.data import Corpus

# A model of a few thousand parameters, short sequences, few steps, no wandb: seconds per run.
TINY = (
    "model=tiny",
    "parallel.device=cpu",
    "data.seq_len=32",
    "data.batch_size=4",
    "logging.wandb=disabled",
    "logging.progress=none",
)

# Top-Any with windows of 3 steps + 1 idle, one expert slot to grow into and a low rebalance threshold; with
# ``seed_events`` below, 20 steps see adds, removes and rebalances (checked by the tests that use it). The gate and the
# add rule of the reference code: their events come early and often on a tiny model (with the default top-1 rule for
# unrouted tokens the idle expert would get tokens; the default 1% add bound waits for more unrouted tokens).
EVENTS = (
    "moe=top_any_reference",
    "adapt.direction=mean",
    "adapt.add_min_share=0",
    "moe.num_experts=6",
    "adapt.record_steps=3",
    "adapt.idle_steps=1",
    "adapt.min_experts=2",
    "adapt.max_experts=7",
    "adapt.rebalance_threshold=1.01",
    "adapt.tolerance=0.0",
)


def config(*overrides: str) -> TrainConfig:
    """The composed config, a copy of its own: hydra composes each set of overrides once per process (~0.2 s)."""
    return copy.deepcopy(_composed(overrides))


@functools.cache
def _composed(overrides: tuple[str, ...]) -> TrainConfig:
    return load_config([*TINY, *overrides])


def small_corpus() -> Corpus:
    """About 60 KB of real Python source from the standard library (bytes), split 56 KB / 4 KB."""
    root = Path(sysconfig.get_paths()["stdlib"])
    data = b"".join((root / name).read_bytes() for name in ("textwrap.py", "string.py", "bisect.py", "heapq.py"))
    tokens = np.frombuffer(data, dtype=np.uint8)
    return Corpus(tokens[:-4000], tokens[-4000:], True, "test corpus")


def seed_events(model: torch.nn.Module) -> None:
    """Thresholds that leave expert 5 idle (removed at the first window) and some tokens unrouted (adds)."""
    with torch.no_grad():
        for layer in model.moe_layers():
            layer.router.threshold.fill_(0.1)
            layer.router.threshold[5] = 9.0


def deepspeed_env() -> None:
    """What a launcher would have exported; DeepSpeed reads LOCAL_RANK even when torch.distributed is up."""
    if not dist.is_initialized():
        return
    rank, world = dist.get_rank(), dist.get_world_size()
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))


def by_id(t) -> dict[str, torch.Tensor]:
    """Every tensor this rank holds that matters, MoE ones keyed by expert id: values and optimizer state."""
    from dynmoe_dist.checkpoint import moe as ckpt_moe
    from dynmoe_dist.train.checkpointing import dense_state

    out = dict(dense_state(t).read())
    for layer in t.model.moe_layers():
        out.update(ckpt_moe.replicated_tensors(layer, t.moe_opt))
        out.update(ckpt_moe.expert_tensors(layer, t.moe_opt))
        out[f"placement/{layer.name}"] = torch.tensor([layer.placement.owners, layer.placement.slots])
        out[f"ids/{layer.name}"] = layer.router.expert_ids
    return {k: v.clone() for k, v in out.items()}  # a snapshot: training goes on after it
