"""Timing helpers: medians over repeats, baselines measured interleaved in the same process, and the confidence
interval of a ratio measured over rounds.

Interleaving (A, B, A, B, ...) puts both sides under the same machine noise, so their ratio is stable even when the
absolute times drift.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable

from scipy import stats


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each function, measured round-robin."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    return {name: statistics.median(s) for name, s in samples.items()}


def t95(df: int) -> float:
    """Student's t two-sided 95% quantile at ``df`` degrees of freedom (scipy.stats)."""
    if df < 1:
        raise ValueError(f"t quantile needs at least 1 degree of freedom, got {df}")
    return float(stats.t.ppf(0.975, df))


def ratio_interval(ratios: list[float]) -> tuple[float, float, float] | None:
    """Geometric mean of paired ratios and its 95% confidence interval (t interval on the log ratios), or None with
    fewer than two.

    Why: on a shared machine one round's ratio moves by several percent, so a best round or a median alone cannot say
    whether a target of 1.0 is met; the interval over the rounds can (met: all of it at or below the target). Logs, so
    that a/b and b/a get reciprocal intervals.
    """
    if len(ratios) < 2:
        return None
    logs = [math.log(r) for r in ratios]
    mean, sd = statistics.fmean(logs), statistics.stdev(logs)
    half = t95(len(logs) - 1) * sd / math.sqrt(len(logs))
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half)


def verdict(interval: tuple[float, float, float] | None, target: float | None) -> str:
    """``met`` when the whole interval is at or below the target, ``missed`` when all of it is above, else ``noise``
    (``-`` without a target or an interval)."""
    if target is None or interval is None:
        return "-"
    _, lo, hi = interval
    return "met" if hi <= target else "missed" if lo > target else "noise"
