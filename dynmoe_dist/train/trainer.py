"""The training loop: model, engine, MoE optimizer, adaptation, data stream, metrics, validation.

One step on every rank: for each micro-batch of the global batch, this rank's slice -> engine forward/backward
(gradients reduced after the last) -> one global gradient norm, both optimizers -> routing statistics into the
metrics window -> the adaptation controller (collective; at a window's end it adds, removes or moves experts).
Validation runs the same fixed set of sequences whatever the world size.

The state a run needs beyond parameters and optimizer state is ``TrainState`` plus each component's own
``state_dict`` (data stream position, adaptation controller, engines): the checkpoint package saves exactly these.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..adapt import AdaptController, AdaptEvent
from ..errors import NonFiniteError
from ..optim import MoEAdam
from ..parallel.collectives import all_reduce
from ..parallel.groups import ParallelGroups
from .config import TrainConfig, adapt_config, global_batch_of, micro_batches
from .data import Corpus, SequenceStream, validation_batches
from .engines import DeepSpeedEngine, Engine, TorchEngine, deepspeed_config
from .metrics import MetricsWindow, peak_memory_mb
from .model import build_model
from .preempt import Preemption
from .progress import Progress
from .schedule import learning_rate
from .unrouted import WATCHED, UnroutedWatch


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 on a GPU that has it (A100 and newer), fp32 elsewhere."""
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def rng_cuda(device: torch.device) -> torch.Tensor | None:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else None


@dataclass
class TrainState:
    """Where the run is, beyond parameters and optimizer state."""

    step: int = 0
    tokens: int = 0  # trained on, over the world
    elapsed: float = 0.0  # seconds of training, over every session of the run
    skipped: int = 0  # optimizer steps skipped for a non-finite loss or gradient norm, over the whole run


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    skipped: bool = False  # a non-finite loss or gradient norm somewhere: nothing changed on any rank
    events: list[AdaptEvent] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # a layer collapsing (UnroutedWatch)
    collapses: list[dict] = field(default_factory=list)  # a collapse that ended, for events.jsonl


class Trainer:
    def __init__(
        self,
        cfg: TrainConfig,
        corpus: Corpus,
        groups: ParallelGroups,
        device: torch.device,
        sink: Any = None,
        moe_factory=None,
        checkpoint_root: Path | None = None,
        resolved_config: dict | None = None,
    ) -> None:
        self.cfg, self.corpus, self.groups, self.device, self.sink = cfg, corpus, groups, device, sink
        self.checkpoint_root, self.resolved_config = checkpoint_root, resolved_config
        self.last_checkpoint = -1
        self.rank, self.world = groups.rank, groups.world_size
        self.precision = resolve_precision(cfg.engine.precision, device)
        self.micro_batches = micro_batches(cfg.data, self.world)  # per optimizer step (gradient accumulation)
        self.global_batch = global_batch_of(cfg.data, self.world)
        self.model = build_model(cfg, groups, moe_factory)  # the demo transformer, or model=hf's
        self.model.to(device)  # fp32 parameters for fp32 and bf16 alike: the engine decides what computes in bf16
        if self.precision == "fp64":
            self.model.double()
        o = cfg.optim
        self.moe_opt = MoEAdam.for_moe(
            self.model,
            lr=o.moe_lr or o.lr,
            betas=(o.beta1, o.beta2),
            eps=o.eps,
            threshold_lr_scale=o.threshold_lr_scale,
        )
        self.engine = self._engine()
        self.adapt = None
        if cfg.adapt.enabled and self.model.moe_layers():
            self.adapt = AdaptController(self.model, self.moe_opt, groups, adapt_config(cfg.adapt, cfg.steps))
        d = cfg.data
        self.stream = SequenceStream(
            corpus.train,
            d.seq_len,
            d.batch_size,
            self.rank,
            self.world,
            d.seed,
            self.model.vocab_size,
            global_batch=self.global_batch,
        )
        self.state = TrainState()
        start = max([cfg.moe.num_experts] + [m.num_experts for m in self.model.moe_layers()])
        k_bins = max(start, cfg.adapt.max_experts if cfg.adapt.enabled else 0) + 1
        self.window = MetricsWindow(self.model.moe_layers(), k_bins, device)
        layers = self.model.moe_layers()
        watched = [m.router.cfg.kind in WATCHED for m in layers]
        self.watch = UnroutedWatch([m.name for m in layers], device, watched=watched)
        torch.manual_seed(cfg.seed + 1 + self.rank)  # dropout: its own stream per rank
        self.step_seconds: list[float] = []
        self.consecutive_skips = 0
        self.preemption: Preemption | None = None  # the signals this process watches (the application installs it)
        self.stop_requested = False  # a rank was signalled: every rank checkpoints after this step and stops
        self.preempted = False  # fit() ended early for a signal, its checkpoint written
        self.saving = None  # checkpoint.async: the save a background thread is writing (checkpoint.AsyncSave)
        self.publishing = None  # checkpoint.async: the save rank 0 is renaming into place in the background
        self.saving_held = 0.0  # seconds the training thread spent taking its state
        self.saves_written = False  # every rank's writer had finished at this step's agreement: publish now
        self.checkpoint_fault = None  # tests: called at a save's stages ("writing", "written", then "manifest")

    def _engine(self) -> Engine:
        c = self.cfg
        if c.engine.name == "torch":
            return TorchEngine(self.model, self.groups, self.moe_opt, c.optim, self.precision, self.device)
        ds = deepspeed_config(
            c.data.batch_size, self.world, c.engine.zero_stage, self.precision, c.engine.deepspeed, self.micro_batches
        )
        return DeepSpeedEngine(self.model, self.groups, self.moe_opt, c.optim, ds, self.device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def state_dict(self) -> dict:
        """This rank's training state beyond parameters and optimizer state (which the checkpoint shards by expert
        id): step counters, the data position, the adaptation schedule and windows, and the RNG streams."""
        return {
            "train": dataclasses.asdict(self.state),
            "data": self.stream.state_dict(),
            "adapt": self.adapt.state_dict() if self.adapt is not None else None,
            "rng": {"torch": torch.get_rng_state(), "cuda": rng_cuda(self.device)},
        }

    def load_state_dict(self, state: dict) -> None:
        self.state = TrainState(**{"skipped": 0, **state["train"]})
        self.stream.load_state_dict(state["data"])
        if self.adapt is not None and state["adapt"] is not None:
            self.adapt.load_state_dict(state["adapt"])
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"]["cuda"] is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)

    # ----------------------------------------------------------------------------------------------------------------

    def train_step(self) -> StepResult:
        """One optimizer step: ``micro_batches`` forward/backward passes (gradients reduced once, after the last),
        then both optimizers. Adaptation and every per-step statistic count optimizer steps, not micro-batches."""
        self.model.train()
        window = self.window_snapshot()  # put back if the step is skipped
        n = self.micro_batches
        infos = []
        for i in range(n):
            tokens, targets = (t.to(self.device, non_blocking=True) for t in self.stream.next_batch())
            loss, info = self.engine.forward(tokens, targets)
            self.engine.backward(loss, n, last=i == n - 1)
            infos.append(info)
        task = infos[0].task_loss if n == 1 else torch.stack([i.task_loss for i in infos]).mean()
        aux = infos[0].aux_loss if n == 1 else torch.stack([i.aux_loss for i in infos]).mean()
        tokens_seen = sum(i.tokens for i in infos)
        step = self.state.step + 1
        bad_ranks, self.stop_requested = self.agree_step(float(task) + float(aux))
        o = self.cfg.optim
        lr = learning_rate(step, o, self.cfg.steps)
        moe_lr = learning_rate(step, o, self.cfg.steps, base=o.moe_lr or o.lr)
        norm = self.engine.step(lr, moe_lr, step, skip=bool(bad_ranks))
        self.state.step = step
        if self.engine.skipped:
            return self.skip(step, bad_ranks, norm, window)
        self.consecutive_skips = 0
        for info in infos:
            self.watch.observe(info.moe)
        self.window.observe(task, aux, norm, tokens_seen, [i.moe for i in infos])  # before any event
        self.state.tokens += tokens_seen * self.world
        warnings, collapses = self.watch.step(step, self.groups.world_group)
        events = self.adapt.step() if self.adapt is not None else []
        return StepResult(float(task), norm, events=events, warnings=warnings, collapses=collapses)

    def window_snapshot(self) -> list[tuple[torch.Tensor, ...]] | None:
        """Copies of each layer's open adaptation window (on its device: no host sync)."""
        if self.adapt is None:
            return None
        return [
            (m.recorder.tokens.clone(), m.recorder.unrouted.clone(), m.recorder.seen.clone())
            for m in self.model.moe_layers()
        ]

    def agree_step(self, loss: float) -> tuple[list[int], bool]:
        """(the ranks whose loss is NaN or Inf, whether any rank was signalled to stop), known to every rank after one
        small all-reduce: a step is skipped everywhere or nowhere, and every rank stops after the same step. The same
        all-reduce tells whether every rank's background checkpoint writer has finished (``saves_written``)."""
        flags = torch.zeros(self.world + 2, dtype=torch.float64, device=self.device)
        flags[self.rank] = float(not math.isfinite(loss))
        flags[self.world] = float(self.preemption is not None and self.preemption.requested)
        flags[self.world + 1] = float(self.saving is not None and self.saving.done())  # this rank's writer finished
        if self.groups.world_group is not None:
            all_reduce(flags, self.groups.world_group, "train.step_flags")
        values = flags.tolist()
        self.saves_written = self.saving is not None and values[self.world + 1] == self.world
        return [r for r, flag in enumerate(values[: self.world]) if flag], values[self.world] > 0

    def skip(self, step: int, bad_ranks: list[int], norm: float, window: list | None) -> StepResult:
        """A skipped step: parameters and optimizer states are as before it, the adaptation window forgets it, the
        data stream has moved on. Too many in a row stop the run, before any checkpoint of a bad state."""
        for layer, saved in zip(self.model.moe_layers(), window or []):
            layer.recorder.tokens, layer.recorder.unrouted, layer.recorder.seen = saved
        self.state.skipped += 1
        self.consecutive_skips += 1
        where = f"the loss on rank(s) {bad_ranks}" if bad_ranks else f"the gradient norm ({norm})"
        if self.consecutive_skips >= self.cfg.optim.max_skipped:
            d = self.stream.state
            raise NonFiniteError(
                f"step {step}: {self.consecutive_skips} optimizer steps in a row skipped (optim.max_skipped="
                f"{self.cfg.optim.max_skipped}), last for a NaN or Inf in {where}. Look at the learning rate "
                "(optim.lr, optim.warmup_steps), optim.grad_clip, engine.precision, and the data before epoch "
                f"{d.epoch}, sequence {d.cursor}; moe.check_finite=true names the first MoE layer that sees it. The "
                "run's latest checkpoint is the last good one"
                + (f" (step {self.last_checkpoint})" if self.last_checkpoint >= 0 else "")
            )
        return StepResult(math.nan, norm, skipped=True, warnings=[f"skipped: NaN or Inf in {where}"])

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean cross-entropy over the fixed validation set (collective: every rank runs the same batches)."""
        d = self.cfg.data
        self.model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        batches = validation_batches(
            self.corpus.val, d.seq_len, d.batch_size, self.rank, self.world, d.val_sequences, self.model.vocab_size
        )
        for tokens, targets in batches:
            tokens, targets = tokens.to(self.device), targets.to(self.device)
            with self.engine.autocast():
                logits, _ = self.model.logits(tokens)
            total[0] += F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum").double()
            total[1] += targets.numel()
        if self.groups.world_group is not None:
            all_reduce(total, self.groups.world_group, "validation.loss")
        self.model.train()
        loss = float(total[0] / total[1])
        out = {"loss": loss}
        if self.corpus.byte_level:
            out["bpb"] = loss / math.log(2)
        return out

    # ----------------------------------------------------------------------------------------------------------------

    def fit(self) -> None:
        try:
            self._fit()
        except BaseException:
            if self.saving is not None:  # not published (that is collective): the writer finishes, 'latest' stays
                self.saving.wait()
                self.saving = None
            if self.publishing is not None:  # voted for: rank 0 finishes renaming it into place
                self.publishing.wait_published()
                self.publishing = None
            raise

    def _fit(self) -> None:
        cfg = self.cfg
        progress = Progress(cfg.steps, self.state.step, cfg.logging.progress, self.is_main)
        if self.state.step == 0:
            self.validate(progress)
        while self.state.step < cfg.steps:
            t0 = time.perf_counter()
            result = self.train_step()
            seconds = time.perf_counter() - t0
            self.window.seconds += seconds
            self.state.elapsed += seconds
            self.step_seconds = (self.step_seconds + [seconds])[-20:]
            step = self.state.step
            if self.saves_written:  # every rank's shards are on disk: publish (collective, here on every rank)
                self.finish_checkpoint(progress, wait=False)
            for event in result.events:
                self.record_event(event, progress)
            self.record_unrouted(result.warnings, result.collapses, progress)
            experts = "/".join(str(layer.num_experts) for layer in self.model.moe_layers())
            tokens_per_s = self.global_batch * cfg.data.seq_len * len(self.step_seconds)
            tokens_per_s /= sum(self.step_seconds)
            unrouted = "/".join(f"{share:.2f}" for share in self.watch.last)
            postfix = {"loss": f"{result.loss:.3f}", "tok/s": f"{tokens_per_s:.0f}", "experts": experts}
            progress.update(1, {**postfix, "unrouted": unrouted} if unrouted else postfix)
            if step % cfg.logging.every == 0 or step == cfg.steps:
                self.log_train(progress)
            if step % cfg.logging.val_every == 0 or step == cfg.steps:
                self.validate(progress)
            if self.checkpoint_root is not None and cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
                self.checkpoint(progress)
            if self.stop_requested and step < cfg.steps:
                self.stop(progress)
                return
        self.finish_checkpoint(progress)
        if self.checkpoint_root is not None and cfg.checkpoint.every and self.last_checkpoint != self.state.step:
            self.checkpoint(progress)  # the end of the run, so it can be extended with more steps
            self.finish_checkpoint(progress)
        self.record_unrouted([], self.watch.close(self.state.step), progress)
        progress.close()

    def stop(self, progress: Progress) -> None:
        """A rank was signalled (preemption, a time limit): checkpoint this step, whatever checkpoint.every says, and
        end ``fit`` early; the application then exits with ``preempt.PREEMPTED``. An async save in flight is waited
        for and published first."""
        self.finish_checkpoint(progress)
        if self.checkpoint_root is not None and self.last_checkpoint != self.state.step:
            self.checkpoint(progress)
            self.finish_checkpoint(progress)
        self.preempted = True
        progress.close()

    def checkpoint(self, progress: Progress) -> Path | None:
        """Save a checkpoint of this step (collective) and report it; with ``checkpoint.async``, take the state and
        start its writer (after publishing the one before: one save in flight at a time), and return None."""
        from .checkpointing import begin_checkpoint, save_checkpoint

        c = self.cfg.checkpoint
        if c.in_background:
            self.finish_checkpoint(progress)
            t0 = time.perf_counter()
            self.saving = begin_checkpoint(
                self, self.checkpoint_root, c.keep, self.resolved_config, self.checkpoint_fault
            )
            self.saving_held = time.perf_counter() - t0
            return None
        t0 = time.perf_counter()
        path = save_checkpoint(self, self.checkpoint_root, c.keep, self.resolved_config, self.checkpoint_fault)
        self.last_checkpoint = self.state.step
        size = sum(f.stat().st_size for f in path.iterdir()) if self.is_main else 0
        self.report_checkpoint(progress, path, self.state.step, time.perf_counter() - t0, size)
        return path

    def finish_checkpoint(self, progress: Progress, wait: bool = True) -> Path | None:
        """Publish the async save in flight, if any (collective: every rank calls it at the same step): wait for this
        rank's writer, then the vote. A writer's error on any rank is raised here on every rank, 'latest' unchanged.
        ``wait=False`` (a step boundary): rank 0 renames it into place in the background, and the next call (the next
        checkpoint, the end, a stop) settles that first; ``wait=True``: published when this returns."""
        if self.publishing is not None:
            publishing, self.publishing = self.publishing, None
            publishing.settle()  # a failure to publish raises on every rank
        if self.saving is None:
            return None
        saving, self.saving, self.saves_written = self.saving, None, False
        t0 = time.perf_counter()
        path = saving.commit(background=not wait)
        if not wait:
            self.publishing = saving
        self.last_checkpoint = saving.step
        held = self.saving_held + time.perf_counter() - t0
        size = saving.bytes() if self.is_main else 0
        self.report_checkpoint(progress, path, saving.step, held, size, written=saving.write_seconds)
        return path

    def report_checkpoint(
        self, progress: Progress, path: Path, step: int, seconds: float, size: int, written: float | None = None
    ) -> None:
        """A metrics record and a line on rank 0. ``step``: when it was published (the metrics' steps only grow);
        ``checkpoint_step``: the step it holds (the same, unless async). ``seconds``: what training waited for the
        save; with async, ``write_seconds`` is the background writer's time."""
        if not self.is_main:
            return
        record = {"kind": "checkpoint", "step": self.state.step, "checkpoint_step": step, "path": str(path)}
        record.update(seconds=seconds, bytes=size)
        if written is None:
            progress.line(f"step {step}: checkpoint {path} ({seconds:.1f} s, {size / 1e6:.1f} MB)")
        else:
            record["write_seconds"] = written
            progress.line(
                f"step {self.state.step}: checkpoint {path} of step {step} published ({seconds:.2f} s held, "
                f"{written:.1f} s written in the background, {size / 1e6:.1f} MB)"
            )
        if self.sink is not None:
            self.sink.metrics(record)

    def log_train(self, progress: Progress) -> None:
        """Reduce the window over the world (collective) and write one record on rank 0."""
        numbers = self.window.reduce(self.groups.world_group)
        seconds = max(self.window.seconds, 1e-9)
        step = self.state.step
        record = {
            "kind": "train",
            "step": step,
            "time": round(self.state.elapsed, 3),
            "lr": learning_rate(step, self.cfg.optim, self.cfg.steps),
            **{k: numbers[k] for k in ("loss", "aux_loss", "grad_norm")},
            "tokens_per_s": numbers["tokens"] / seconds,
            "tokens": self.state.tokens,
            "peak_mem_mb": peak_memory_mb(self.device),
            "skipped_steps": self.state.skipped,
            "moe": numbers["moe"],
        }
        for stats, longest in zip(record["moe"].values(), self.watch.longest):
            stats["unrouted_streak"] = longest  # the longest run of steps above the collapse share so far
        self.window.reset()
        if self.sink is not None:
            self.sink.metrics(record)
        if progress.mode == "lines":
            layers = record["moe"].values()
            experts = " ".join(str(m["experts"]) for m in layers)
            avg_k = " ".join(f"{m['avg_k']:.2f}" for m in layers)
            unrouted = " ".join(f"{m['unrouted_share']:.2f}" for m in layers)
            progress.line(
                f"step {step}/{self.cfg.steps}  loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
                f"grad {record['grad_norm']:.3f}  tok/s {record['tokens_per_s']:.0f}  experts {experts}  k {avg_k}  "
                f"unrouted {unrouted}" + (f"  skipped {self.state.skipped}" if self.state.skipped else "")
            )

    def validate(self, progress: Progress) -> dict[str, float]:
        result = self.evaluate()
        record = {"kind": "val", "step": self.state.step, "time": round(self.state.elapsed, 3), **result}
        if self.sink is not None:
            self.sink.metrics(record)
        bpb = f"  ({result['bpb']:.3f} bits/byte)" if "bpb" in result else ""
        progress.line(f"step {self.state.step}: validation loss {result['loss']:.4f}{bpb}")
        return result

    def record_unrouted(self, warnings: list[str], collapses: list[dict], progress: Progress) -> None:
        """A collapsing layer is said in the log (and in the run's summary through events.jsonl), never silently."""
        if not self.is_main:
            return
        for text in warnings:
            progress.line(f"step {self.state.step}: WARNING {text}")
        for record in collapses:
            if self.sink is not None:
                self.sink.event(record)

    def record_event(self, event: AdaptEvent, progress: Progress) -> None:
        layer = next(m for m in self.model.moe_layers() if m.name == event.layer)
        step_s = sum(self.step_seconds) / max(len(self.step_seconds), 1)
        record = {**event.as_dict(), "experts": layer.num_experts, "step_seconds": step_s}
        if self.sink is not None:
            self.sink.event(record)
        if event.committed:
            change = []
            if event.added:
                change.append(f"+{event.added}")
            if event.removed:
                change.append(f"-{event.removed}")
            if event.moved:
                change.append(f"moved {len(event.moved)}")
            progress.line(
                f"step {event.step}: {event.layer} {event.kind} {' '.join(change)} -> {layer.num_experts} experts "
                f"({event.seconds * 1e3:.0f} ms, {event.bytes_moved / 1e6:.2f} MB)"
            )
        else:
            progress.line(f"step {event.step}: {event.layer} {event.kind} aborted: {event.reason}")
