"""A transformers MoE model's training step, as transformers runs it and converted by ``dynmoe_dist.hf.convert``.

Two small models with random weights from a config (seed 0): a Mixtral-shaped one (softmax top-2, renormalised) and a
Qwen2-MoE-shaped one (softmax top-2, not renormalised, a shared expert behind its sigmoid gate); by default d=512,
8 experts, 4 layers, a vocabulary of 8192, batches of 2 x 256 tokens per rank. One training step is forward,
backward and optimizer step:

* ``transformers``: the model as ``from_config`` builds it, with transformers' default experts implementation
  (``grouped_mm``), trained by one torch AdamW on its fused kernel (the optimizer transformers' Trainer defaults to);
  at 2 ranks plain data parallel (``DistributedDataParallel``), every rank holding every expert;
* ``ours``: the same weights after ``convert(model)`` (the family's own routing, ``router=None``), the dense side on
  the same fused AdamW and the MoE side on ``MoEAdam`` (fused too); at 2 ranks the experts sharded over the
  expert-parallel group (``convert(model, groups=...)``) and the gradients reduced by ``sync_gradients``.

The objective is the language-model loss alone (transformers' ``output_router_logits`` off, our blocks' balance loss
not added), so both sides compute the same function: the losses of the first two steps (before and after one
optimizer step) must agree to ``LOSS_TOLERANCE`` on every rank before anything is timed. Each rank gets its own batch,
the same on both sides.

Reported, per family and world size: ms per step (interleaved medians over ``--repeats`` steps, the slowest rank's)
and peak memory: the most tensor bytes alive at once during two training steps (the first makes the optimizer state),
counting everything the variant allocated since it began to be built (weights, gradients, optimizer state,
activations, data-parallel buckets), from torch's allocation events (``torch.profiler``, ``profile_memory``), the
largest rank's; the CPU counterpart of CUDA's ``max_memory_allocated``, independent of other processes and of the C
allocator's caching. Ratios are ours / transformers. Target: time ratio <= 0.8 and memory ratio <= 1.0 at 1 rank.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from .ranks import run_ranks
from .report import emit
from .timing import interleaved_medians

FAMILIES = ("mixtral", "qwen2_moe")
LOSS_TOLERANCE = 1e-4  # relative; fp32, the same sums in another order
TARGETS = {"time_ratio": 0.8, "mem_ratio": 1.0}  # at 1 rank


def hf_config(family: str, a: argparse.Namespace):
    """The small config of ``family`` at the benchmark's shapes."""
    import transformers as tf

    common = {
        "vocab_size": a.vocab,
        "hidden_size": a.d_model,
        "num_hidden_layers": a.layers,
        "num_attention_heads": a.heads,
        "num_key_value_heads": max(1, a.heads // 4),
        "max_position_embeddings": max(a.seq, 64),
        "tie_word_embeddings": False,
        "output_router_logits": False,
    }
    if family == "mixtral":
        return tf.MixtralConfig(
            **common, intermediate_size=a.d_ff, num_local_experts=a.experts, num_experts_per_tok=a.top_k
        )
    if family == "qwen2_moe":
        return tf.Qwen2MoeConfig(
            **common,
            intermediate_size=a.d_ff,
            moe_intermediate_size=a.d_ff // 2,
            shared_expert_intermediate_size=a.d_ff,
            num_experts=a.experts,
            num_experts_per_tok=a.top_k,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        )
    raise ValueError(f"family {family!r}: expected one of {FAMILIES}")


def build_transformers(family: str, a: argparse.Namespace):
    """The model ``from_config`` builds (seed 0: the same weights on every rank and for both sides), training mode."""
    import transformers as tf

    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(hf_config(family, a)).train()


def experts_implementation(model) -> str:
    return str(getattr(model.config, "_experts_implementation_internal", model.config._experts_implementation))


class Stepper:
    """One side's training step on a batch: the loss before the update."""

    def __init__(self, model, world: int, groups, ours: bool, lr: float) -> None:
        self.model = model
        self.groups = groups if ours and world > 1 else None
        if ours:
            from dynmoe_dist.hf import moe_blocks
            from dynmoe_dist.optim import MoEAdam, dense_adamw

            moe = {id(p) for _, b in moe_blocks(model) for p in b.moe.moe_parameters()}
            dense = [p for p in model.parameters() if id(p) not in moe]
            self.optimizers = [dense_adamw(dense, lr=lr, weight_decay=0.0), MoEAdam.for_moe(model, lr=lr)]
            self.forward = model
        else:
            from dynmoe_dist.optim import dense_adamw

            self.optimizers = [dense_adamw(model.parameters(), lr=lr, weight_decay=0.0)]
            self.forward = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model

    def __call__(self, ids: torch.Tensor) -> float:
        loss = self.forward(input_ids=ids, labels=ids).loss
        loss.backward()
        if self.groups is not None:
            from dynmoe_dist.parallel import sync_gradients

            sync_gradients(self.model, self.groups)  # equal batches per rank: the mean over the world
        for opt in self.optimizers:
            opt.step()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        return float(loss.detach())


def peak_bytes(prof, since_ns: int) -> int:
    """The most tensor bytes alive at once from ``since_ns`` on, counting every allocation and free the profile saw
    (all of them since it started)."""
    events = sorted(
        ((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
    )
    alive = peak = 0
    for start, nbytes in events:
        alive += nbytes
        if start >= since_ns:
            peak = max(peak, alive)
    return peak


def built_and_measured(make: Callable[[], Stepper], batches: list[torch.Tensor]) -> tuple[Stepper, list[float], int]:
    """Build one side under the profiler and run its first steps there: (stepper, their losses, peak bytes)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        stepper = make()
        since = time.time_ns()  # kineto's clock: unix time in ns
        losses = [stepper(ids) for ids in batches]
    return stepper, losses, peak_bytes(prof, since)


def max_over_ranks(values: list[float], world: int) -> list[float]:
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def family_row(family: str, rank: int, world: int, a: argparse.Namespace) -> dict:
    from dynmoe_dist.hf import convert
    from dynmoe_dist.parallel import build_groups

    groups = build_groups(world) if world > 1 else None
    g = torch.Generator().manual_seed(1000 + rank)
    batches = [torch.randint(0, a.vocab, (a.batch, a.seq), generator=g) for _ in range(2 + a.warmup + a.repeats)]
    checked, timed = batches[:2], batches[2:]

    def make_theirs() -> Stepper:
        return Stepper(build_transformers(family, a), world, groups, ours=False, lr=a.lr)

    def make_ours() -> Stepper:
        return Stepper(convert(build_transformers(family, a), groups=groups), world, groups, ours=True, lr=a.lr)

    theirs, their_losses, their_peak = built_and_measured(make_theirs, checked)
    ours, our_losses, our_peak = built_and_measured(make_ours, checked)
    diff = max(abs(x - y) / abs(y) for x, y in zip(our_losses, their_losses))
    diff, their_peak, our_peak = max_over_ranks([diff, float(their_peak), float(our_peak)], world)
    if not diff <= LOSS_TOLERANCE:
        raise RuntimeError(
            f"{family}: the converted model's losses {our_losses} differ from transformers' {their_losses} "
            f"(relative {diff:.2g} > {LOSS_TOLERANCE}): the timing would compare different computations"
        )
    cursor = {"theirs": 0, "ours": 0}

    def step(side: str, stepper: Stepper) -> Callable[[], float]:
        def run() -> float:
            ids = timed[cursor[side] % len(timed)]
            cursor[side] += 1
            return stepper(ids)

        return run

    times = interleaved_medians({"theirs": step("theirs", theirs), "ours": step("ours", ours)}, a.repeats, a.warmup)
    their_ms, our_ms = (v * 1e3 for v in max_over_ranks([times["theirs"], times["ours"]], world))
    config = theirs.model.config
    first = next(m for m in ours.model.modules() if type(m).__name__ == "MoEBlock")
    return {
        "family": family,
        "world": world,
        "transformers_ms": their_ms,
        "ours_ms": our_ms,
        "time_ratio": our_ms / their_ms,
        "transformers_peak_mb": their_peak / 2**20,
        "ours_peak_mb": our_peak / 2**20,
        "mem_ratio": our_peak / their_peak,
        "tokens_per_rank": a.batch * a.seq,
        "experts": config.num_local_experts if family == "mixtral" else config.num_experts,
        "experts_per_rank": len(first.moe.experts.expert_ids),
        "loss_rel_diff": diff,
        "losses_compared": len(checked),
        "transformers_experts_impl": experts_implementation(theirs.model),
    }


def body(rank: int, world: int, a: argparse.Namespace) -> list[dict]:
    return [family_row(family, rank, world, a) for family in a.families]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks hf", description=__doc__)
    p.add_argument("--families", default=",".join(FAMILIES), help="comma-separated, of " + ", ".join(FAMILIES))
    p.add_argument("--worlds", default="1,2", help="world sizes to run (1: this process; more: spawned ranks)")
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--d-ff", type=int, default=1024, help="Mixtral's expert width; Qwen2-MoE: half per expert")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=2, help="sequences per rank")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--repeats", type=int, default=8, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per side before them")
    p.add_argument("--threads", type=int, default=None, help="torch threads per rank (default: cores / world)")
    p.add_argument("--json", default=None, help="also write the JSON document here")
    a = p.parse_args(argv)
    a.families = [f for f in a.families.split(",") if f]
    for family in a.families:
        if family not in FAMILIES:
            p.error(f"--families: {family!r} is not one of {', '.join(FAMILIES)}")
    worlds = [int(w) for w in a.worlds.split(",") if w]
    cores = os.cpu_count() or 1
    rows, threads = [], {}
    for world in worlds:
        run = argparse.Namespace(**vars(a), world=world)
        run.threads = a.threads or max(1, cores // world)
        threads[world] = run.threads
        if world == 1:
            previous = torch.get_num_threads()
            torch.set_num_threads(run.threads)
            try:
                rows += body(0, 1, run)
            finally:
                torch.set_num_threads(previous)
        else:
            rows += run_ranks(body, run)
    meta = {
        "threads_per_rank": threads[worlds[0]],
        "threads_by_world": {str(w): t for w, t in threads.items()},
        "world": max(worlds),
        "worlds": worlds,
        "families": a.families,
        "d_model": a.d_model,
        "d_ff": a.d_ff,
        "experts": a.experts,
        "top_k": a.top_k,
        "layers": a.layers,
        "heads": a.heads,
        "vocab": a.vocab,
        "seq": a.seq,
        "batch_per_rank": a.batch,
        "repeats": a.repeats,
        "warmup": a.warmup,
        "loss_tolerance": LOSS_TOLERANCE,
        "transformers": _version("transformers"),
        "peak_memory": "most tensor bytes alive during two training steps, from torch's allocation events",
        "targets": "time_ratio <= 0.8 and mem_ratio <= 1.0 at 1 rank (ours / transformers)",
    }
    cols = [
        "family",
        "world",
        "transformers_ms",
        "ours_ms",
        "time_ratio",
        "transformers_peak_mb",
        "ours_peak_mb",
        "mem_ratio",
        "experts_per_rank",
        "loss_rel_diff",
    ]
    emit("hf", rows, cols, meta, a.json)


def _version(name: str) -> str | None:
    from .machine import package_version

    return package_version(name)
