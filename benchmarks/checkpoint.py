"""Checkpoint save and load at 2 ranks for the demo model: seconds, bytes, and bytes written against the state.

The state is counted from the live objects, independently of the writer: every dense parameter with its AdamW moments
and step, every gate row and expert (each expert once over the world, however many replicas hold it) with its
MoEAdam moments and per-row steps, each rank's RNG and recording window. Reported: the tensor bytes the shards hold
over that count (exactly 1.0 when nothing is written twice and nothing is missing), the file bytes over it (headers
and the manifest on top), and save / load seconds (median of ``--repeats``; load includes verification of every
checksum) against one training step. DeepSpeed engine; ZeRO 0 and 2 (ZeRO 2 gathers partitioned state to save).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from dynmoe_dist.parallel import build_groups

from .ranks import run_ranks
from .report import emit

BYTES = {"F32": 4, "F64": 8, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "U8": 1, "BOOL": 1}


def state_bytes(trainer) -> int:
    """This rank's share of the state a checkpoint must hold, counted from the objects themselves."""
    from dynmoe_dist.parallel.grads import moe_parameter_kinds

    kinds = moe_parameter_kinds(trainer.model)
    total = 0
    if trainer.rank == 0:
        total += sum(p.numel() * 4 * 3 + 4 for p in kinds["dense"])  # fp32 value + two moments, a float32 step
        for layer in trainer.model.moe_layers():
            rows = layer.router.row_parameters().values()
            total += sum(p.numel() * p.element_size() * 3 + p.shape[0] * 8 for p in rows)  # per-row int64 steps
            ids = {id(p) for p in rows}
            total += sum(p.numel() * p.element_size() * 3 + 8 for p in layer.router.parameters() if id(p) not in ids)
            total += sum(b.numel() * b.element_size() for n, b in layer.router.named_buffers() if n == "l1_coef")
    if trainer.groups.edp_rank == 0:  # each expert once: the first replica's owner
        for layer in trainer.model.moe_layers():
            total += sum(w.numel() * w.element_size() * 3 + w.shape[0] * 8 for w in layer.experts.weights().values())
    total += torch.get_rng_state().numel()
    for layer in trainer.model.moe_layers():
        total += (layer.recorder.tokens.numel() + layer.recorder.unrouted.numel()) * 8
    return total


def body(rank: int, world: int, a: argparse.Namespace) -> list[dict]:
    from dynmoe_dist.checkpoint import Manifest
    from dynmoe_dist.train.checkpointing import load_checkpoint, save_checkpoint
    from dynmoe_dist.train.config import load_config
    from dynmoe_dist.train.data import load_corpus
    from dynmoe_dist.train.engines.deepspeed_engine import import_deepspeed
    from dynmoe_dist.train.trainer import Trainer

    import_deepspeed()
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    rows = []
    for stage in a.stages:
        cfg = load_config([f"engine.zero_stage={stage}", "engine.precision=fp32", "logging.wandb=disabled"])
        trainer = Trainer(cfg, load_corpus(cfg.data), build_groups(world), torch.device("cpu"))
        step_s = []
        for _ in range(a.steps):  # Adam state everywhere, and adaptation windows under way
            t0 = time.perf_counter()
            trainer.train_step()
            step_s.append(time.perf_counter() - t0)
        root = Path(a.dir) / f"stage{stage}"
        saves, loads = [], []
        for _ in range(a.repeats):
            dist.barrier()
            t0 = time.perf_counter()
            folder = save_checkpoint(trainer, root, keep=1, config=None)
            saves.append(time.perf_counter() - t0)
            dist.barrier()
            t0 = time.perf_counter()
            load_checkpoint(trainer, root)
            loads.append(time.perf_counter() - t0)
        times = torch.tensor([statistics.median(saves), statistics.median(loads)], dtype=torch.float64)
        dist.all_reduce(times, op=dist.ReduceOp.MAX)  # as slow as the slowest rank
        state = torch.tensor([state_bytes(trainer)], dtype=torch.int64)
        dist.all_reduce(state)
        manifest = Manifest.read(folder)
        tensor_bytes = sum(
            BYTES[t["dtype"]] * int(torch.tensor(t["shape"], dtype=torch.int64).prod())
            for t in manifest.tensors.values()
        )
        file_bytes = sum(f["bytes"] for f in manifest.files.values()) + (folder / "manifest.json").stat().st_size
        rows.append(
            {
                "zero_stage": stage,
                "save_s": float(times[0]),
                "load_s": float(times[1]),
                "step_s": statistics.median(step_s[1:]),
                "state_MB": int(state) / 1e6,
                "written_MB": file_bytes / 1e6,
                "tensor_bytes_over_state": tensor_bytes / int(state),
                "file_bytes_over_state": file_bytes / int(state),
                "save_MB_per_s": file_bytes / 1e6 / float(times[0]),
                "shards": len(manifest.files),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks checkpoint", description=__doc__)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=25, help="training steps before the first save")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--stages", default="0,2")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        a.stages = [int(s) for s in a.stages.split(",")]
        rows = run_ranks(body, argparse.Namespace(**vars(a), dir=folder))
    meta = {"world": a.world, "threads_per_rank": a.threads, "model": "the demo (configs/config.yaml), DeepSpeed fp32"}
    cols = [
        "zero_stage",
        "save_s",
        "load_s",
        "step_s",
        "state_MB",
        "written_MB",
        "tensor_bytes_over_state",
        "file_bytes_over_state",
        "save_MB_per_s",
        "shards",
    ]
    emit("checkpoint", rows, cols, meta, a.json)
