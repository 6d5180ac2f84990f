"""Training metrics: accumulated locally every step, reduced over the world once per log line, written on rank 0.

Per step the trainer hands over the step's loss, gradient norm and each MoE layer's routing statistics. Between two
log lines they are summed on the device (no host sync per step, except when an adaptation changed a layer's expert
ids); at a log line one all-reduce brings every rank's sums together, and rank 0 writes one JSON line (and a wandb
row). Per MoE layer: experts, average k, the distribution of k, tokens per expert id and their imbalance (max/mean),
unrouted tokens (k = 0 in training) and capacity drops.
"""

from __future__ import annotations

import json
import math
import resource
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..layer import MoEAux, MoELayer
from ..parallel.collectives import all_reduce
from ..routing.plan import count_per


@dataclass
class LayerWindow:
    """One MoE layer's sums since the last log line. Loads go by expert id: ids can change between two lines."""

    k_bins: int
    version: int | None = None  # placement version the position-order sums belong to
    ids: tuple[int, ...] = ()
    tokens_by_pos: torch.Tensor | None = None  # [E] for ``ids``, on the device
    k_hist: torch.Tensor | None = None  # [k_bins]
    counts: torch.Tensor | None = None  # [3] tokens, unrouted, dropped
    load: dict[int, float] = field(default_factory=dict)  # flushed per-id loads

    def observe(self, aux: MoEAux, layer: MoELayer) -> None:
        stats = aux.stats
        if layer.placement.version != self.version:  # a committed event: positions now name other ids
            self.flush()
            self.version, self.ids = layer.placement.version, tuple(layer.router.expert_ids.tolist())
        per_pos = stats.tokens_per_expert.to(torch.float64)
        self.tokens_by_pos = per_pos if self.tokens_by_pos is None else self.tokens_by_pos + per_pos
        # made on the device (no bincount, no host-made tensor): nothing here waits for it
        hist = count_per(stats.k_per_token.clamp(max=self.k_bins - 1), self.k_bins).to(torch.float64)
        self.k_hist = hist if self.k_hist is None else self.k_hist + hist
        unrouted = stats.unrouted_count.to(torch.float64).reshape(())
        tokens, dropped = float(stats.k_per_token.numel()), float(stats.dropped)
        counts = torch.stack([unrouted.new_full((), tokens), unrouted, unrouted.new_full((), dropped)])
        self.counts = counts if self.counts is None else self.counts + counts

    def flush(self) -> None:
        if self.tokens_by_pos is not None:
            for i, v in zip(self.ids, self.tokens_by_pos.tolist()):
                self.load[i] = self.load.get(i, 0.0) + v
        self.tokens_by_pos = None


class MetricsWindow:
    """Everything reported on one log line, summed since the previous one."""

    def __init__(self, layers: list[MoELayer], k_bins: int, device: torch.device) -> None:
        self.layers, self.k_bins, self.device = layers, k_bins, device
        self.reset()

    def reset(self) -> None:
        self.train = torch.zeros(4, dtype=torch.float64, device=self.device)  # task loss, aux loss, grad norm, steps
        self.tokens = 0  # this rank's
        self.seconds = 0.0
        self.windows = [LayerWindow(self.k_bins) for _ in self.layers]

    def observe(
        self, task: torch.Tensor, aux: torch.Tensor, grad_norm: float, tokens: int, micro_auxes: list[list]
    ) -> None:
        """One optimizer step: its mean losses, norm and tokens, and each micro-batch's per-layer routing aux."""
        step = torch.stack([task.double(), aux.double()])
        self.train[:2] += step
        self.train[2] += grad_norm
        self.train[3] += 1
        self.tokens += tokens
        for auxes in micro_auxes:
            for window, layer, a in zip(self.windows, self.layers, [a for a in auxes if isinstance(a, MoEAux)]):
                window.observe(a, layer)

    def reduce(self, world_group) -> dict[str, Any]:
        """Sum over the world (one all-reduce; collective) and return the log record's numbers."""
        for w in self.windows:
            w.flush()
        id_lists = [sorted(w.load) for w in self.windows]
        parts = [self.train, torch.tensor([float(self.tokens)], dtype=torch.float64, device=self.device)]
        for w, ids in zip(self.windows, id_lists):
            zeros = torch.zeros(3, dtype=torch.float64, device=self.device)
            parts.append(w.counts if w.counts is not None else zeros)
            parts.append(
                w.k_hist if w.k_hist is not None else torch.zeros(self.k_bins, dtype=torch.float64, device=self.device)
            )
            parts.append(torch.tensor([w.load[i] for i in ids], dtype=torch.float64, device=self.device))
        flat = torch.cat(parts)
        if world_group is not None:
            all_reduce(flat, world_group, "metrics.reduce")
        values = flat.tolist()
        task, aux, norm, steps, tokens = values[:5]
        steps = max(steps, 1.0)
        out: dict[str, Any] = {
            "loss": task / steps,
            "aux_loss": aux / steps,
            "grad_norm": norm / steps,
            "tokens": int(tokens),
            "moe": {},
        }
        pos = 5
        for layer, ids in zip(self.layers, id_lists):
            count, unrouted, dropped = values[pos : pos + 3]
            hist = values[pos + 3 : pos + 3 + self.k_bins]
            load = values[pos + 3 + self.k_bins : pos + 3 + self.k_bins + len(ids)]
            pos += 3 + self.k_bins + len(ids)
            present = set(layer.router.expert_ids.tolist())
            live = [v for i, v in zip(ids, load) if i in present] or [0.0]
            mean = sum(live) / len(live)
            out["moe"][layer.name] = {
                "experts": layer.num_experts,
                "avg_k": sum(k * h for k, h in enumerate(hist)) / max(count, 1.0),
                "k_hist": [int(h) for h in hist],
                "load": {str(i): int(v) for i, v in zip(ids, load)},
                "load_imbalance": max(live) / mean if mean > 0 else 1.0,
                "unrouted": int(unrouted),
                "unrouted_share": unrouted / max(count, 1.0),
                "dropped": int(dropped),
            }
        return out


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this rank: CUDA allocations on a GPU, else the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class JsonLines:
    """Append-only JSON-lines file, flushed per record so a crash keeps everything written so far."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = path.open("a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record, allow_nan=True) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def wandb_row(record: dict) -> dict[str, float]:
    """A metrics record as flat wandb keys: train/loss, val/loss, moe/<layer>/avg_k, ..."""
    row: dict[str, float] = {}
    kind = record.get("kind", "train")
    for key, value in record.items():
        if (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and key not in ("step", "kind")
            and math.isfinite(value)
        ):
            row[f"{kind}/{key}"] = value
    for layer, stats in record.get("moe", {}).items():
        for key in ("experts", "avg_k", "load_imbalance", "unrouted", "unrouted_share", "unrouted_streak", "dropped"):
            if key in stats:
                row[f"moe/{layer}/{key}"] = stats[key]
    return row
