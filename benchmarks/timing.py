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


# Two-sided 95% quantiles of Student's t for 1-30 degrees of freedom (standard tables).
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131)
_T95 += (2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t95(df: int) -> float:
    """Student's t two-sided 95% quantile; past the table, its expansion to second order in 1/df (Cornish-Fisher:
    2.0394 at df 31, 2.0210 at 40, as tabulated)."""
    if df < 1:
        raise ValueError(f"t quantile needs at least 1 degree of freedom, got {df}")
    if df <= len(_T95):
        return _T95[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


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
