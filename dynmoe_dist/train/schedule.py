"""Learning rate per optimizer step: linear warm-up, then cosine, linear or constant decay to ``min_lr_ratio * lr``.

A pure function of the step, so the schedule needs no state of its own to save or restore.
"""

from __future__ import annotations

import math

from .config import OptimConfig


def learning_rate(step: int, cfg: OptimConfig, total_steps: int, base: float | None = None) -> float:
    """The rate for optimizer step ``step`` (1-based) of ``total_steps``; ``base`` overrides ``cfg.lr`` (moe_lr)."""
    peak = cfg.lr if base is None else base
    if cfg.warmup_steps and step <= cfg.warmup_steps:
        return peak * step / cfg.warmup_steps
    floor = peak * cfg.min_lr_ratio
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    if cfg.schedule == "cosine":
        return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if cfg.schedule == "linear":
        return peak - (peak - floor) * progress
    return peak
