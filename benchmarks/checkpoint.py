"""Checkpoint save and load at 2 ranks for the demo model: seconds, bytes, and bytes written against the state.

The state is counted from the live objects, independently of the writer: every dense parameter with its AdamW moments
and step, every gate row and expert (each expert once over the world, however many replicas hold it) with its
MoEAdam moments and per-row steps, each rank's RNG and recording window. Reported: the tensor bytes the shards hold
over that count (exactly 1.0 when nothing is written twice and nothing is missing), the file bytes over it (headers
and the manifest on top), and save / load seconds (median of ``--repeats``; load includes verification of every
checksum) against one training step. DeepSpeed engine; ZeRO 0 and 2 (ZeRO 2 gathers partitioned state to save).

Then what a save costs training: a training step with a save in flight over one without (the median over
``--repeats`` of each repeat's ratio to its own plain steps, interleaved; the slower rank's). Synchronous: the save and
the step after it, over a step. ``checkpoint.async``: from taking the state through the steps trained while the
background writer runs until the checkpoint is published at a step boundary (the trainer's own path:
``Trainer.checkpoint``, the writers' agreement in the step's flags, ``finish_checkpoint``), per step, over a step.
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
        overrides = [
            f"engine.zero_stage={stage}",
            "engine.precision=fp32",
            "logging.wandb=disabled",
            "checkpoint.async=true",
        ]
        cfg = load_config(overrides)
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
        costs = in_flight_steps(trainer, Path(a.dir) / f"costs{stage}", a)
        medians = [statistics.median(v) for v in (saves, loads, *(costs[k] for k in COSTS))]  # ratios: per repeat
        times = torch.tensor(medians, dtype=torch.float64)
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
                "plain_step_s": float(times[2]),
                "sync_save_step_over_plain": float(times[3]),
                "async_save_step_over_plain": float(times[4]),
                "async_take_s": float(times[5]),
                "async_publish_s": float(times[6]),
                "in_flight_step_over_plain": float(times[7]),
                "async_steps_in_flight": statistics.mean(costs["in_flight"]),
            }
        )
    return rows


COSTS = ("plain", "sync_ratio", "async_ratio", "take", "publish", "in_flight_ratio")


def in_flight_steps(trainer, root: Path, a: argparse.Namespace) -> dict[str, list[float]]:
    """Per repeat, interleaved: two plain steps; a synchronous save and the step after it; an async save and the steps
    until it is published, per step. Each over the repeat's plain step (the machine's load drifts less within a
    repeat). Also, of the async save: seconds taking the state (with settling the previous one's publication) and
    publishing it (the final wait, the vote; rank 0 then renames it into place in a thread), the steps trained while
    it was written over a plain step, and how many there were."""
    from dynmoe_dist.train.checkpointing import save_checkpoint
    from dynmoe_dist.train.progress import Progress

    progress = Progress(1, 0, "none", False)
    trainer.checkpoint_root = root / "async"
    out: dict[str, list[float]] = {k: [] for k in (*COSTS, "in_flight")}
    for _ in range(a.repeats):
        plain = []
        for _ in range(2):
            dist.barrier()
            t0 = time.perf_counter()
            trainer.train_step()
            plain.append(time.perf_counter() - t0)
        step = statistics.mean(plain)
        out["plain"].append(step)
        dist.barrier()
        t0 = time.perf_counter()
        save_checkpoint(trainer, root / "sync", keep=1, config=None)
        trainer.train_step()
        out["sync_ratio"].append((time.perf_counter() - t0) / step)
        dist.barrier()
        t0 = time.perf_counter()
        trainer.checkpoint(progress)
        t1 = time.perf_counter()
        steps = 0
        while not trainer.saves_written:  # set by the step's agreement once every rank's writer has finished
            trainer.train_step()
            steps += 1
        t2 = time.perf_counter()
        trainer.finish_checkpoint(progress, wait=False)  # as at a step boundary in fit: rank 0 renames in a thread
        t3 = time.perf_counter()
        out["async_ratio"].append((t3 - t0) / steps / step)
        out["take"].append(t1 - t0)
        out["publish"].append(t3 - t2)
        out["in_flight_ratio"].append((t2 - t1) / steps / step)
        out["in_flight"].append(steps)
    trainer.finish_checkpoint(progress)
    return out


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
        "plain_step_s",
        "sync_save_step_over_plain",
        "async_save_step_over_plain",
        "async_take_s",
        "async_publish_s",
        "in_flight_step_over_plain",
        "async_steps_in_flight",
    ]
    emit("checkpoint", rows, cols, meta, a.json)
