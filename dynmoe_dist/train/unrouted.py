"""The unrouted-token watch: a gate that sends too few tokens to any expert is a failing run, and must be visible.

A gate whose rule can leave a token with no expert (Top-Any: no threshold passed) hands that token to the residual
alone. A few such tokens are the signal DynMoE's adaptation adds experts for; most of a layer's tokens, step after
step, means the layer has stopped learning (a collapse). Every optimizer step this sums, per MoE layer, the tokens the
gate accepted for no expert over the whole world (one small all-reduce), and keeps the run of consecutive steps above
``share``. A run that reaches ``steps`` is a collapse: it is reported once as a warning, and when it ends (or the
training does) as an ``unrouted`` event with its length. The longest run so far goes into every metrics line.

Only for gates where a token without an expert means failure (``WATCHED``: Top-Any, whose k=0 tokens are what its
collapse is made of). ReLU routing and null experts leave tokens without a real expert by design (ReMoE steers the
average number of active experts, not each token's; AdaMoE's null experts are a token's way to use fewer): their
shares and streaks are still measured and shown, but not called a collapse.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..layer import MoEAux
from ..parallel.collectives import all_reduce

# A layer routing fewer than 90% of its tokens for more than 20 consecutive steps is collapsing.
COLLAPSE_SHARE = 0.10
COLLAPSE_STEPS = 20
WATCHED = frozenset({"top_any"})  # the gate kinds whose unrouted tokens are a failure, not the rule

ADVICE = (
    "for Top-Any keep moe.router.unrouted=top1 with moe.router.route_weight > 0 (the defaults), or lower "
    "moe.router.efficiency_weight; adaptation (adapt=demo) adds experts for the unrouted tokens"
)


@dataclass
class Streak:
    """Consecutive steps one layer spent above the share."""

    start: int = 0  # first step of the current streak
    length: int = 0
    peak: float = 0.0  # highest share in the streak
    warned: bool = False


@dataclass
class UnroutedWatch:
    names: list[str]
    device: torch.device
    share: float = COLLAPSE_SHARE
    steps: int = COLLAPSE_STEPS
    counts: torch.Tensor | None = None  # [L, 2] this rank's (unrouted, tokens) since the last optimizer step
    streaks: list[Streak] = field(default_factory=list)
    last: list[float] = field(default_factory=list)  # every layer's share at the last step, over the world
    longest: list[int] = field(default_factory=list)
    watched: list[bool] | None = None  # per layer: a long streak is a collapse (warning, event); None: every layer

    def __post_init__(self) -> None:
        if self.watched is None:
            self.watched = [True] * len(self.names)
        self.streaks = [Streak() for _ in self.names]
        self.last = [0.0] * len(self.names)
        self.longest = [0] * len(self.names)

    def observe(self, auxes: list) -> None:
        """One forward's routing statistics (every micro-batch of a step adds up)."""
        stats = [a.stats for a in auxes if isinstance(a, MoEAux)]
        if not stats:
            return
        unrouted = torch.stack([s.unrouted_count.reshape(()) for s in stats]).to(self.device, torch.float64)
        tokens = torch.tensor([float(s.k_per_token.numel()) for s in stats], dtype=torch.float64, device=self.device)
        counts = torch.stack([unrouted, tokens], dim=1)
        self.counts = counts if self.counts is None else self.counts + counts

    def step(self, step: int, world_group) -> tuple[list[str], list[dict]]:
        """Close an optimizer step (collective): (warnings to print, events to record)."""
        if self.counts is None:
            return [], []
        counts, self.counts = self.counts, None
        if world_group is not None:
            all_reduce(counts, world_group, "unrouted.watch")
        shares = (counts[:, 0] / counts[:, 1].clamp(min=1)).tolist()
        self.last = shares
        warnings, events = [], []
        for i, (name, share) in enumerate(zip(self.names, shares)):
            s = self.streaks[i]
            if share > self.share:
                if s.length == 0:
                    s.start, s.peak, s.warned = step, 0.0, False
                s.length += 1
                s.peak = max(s.peak, share)
                self.longest[i] = max(self.longest[i], s.length)
                if s.length >= self.steps and not s.warned and self.watched[i]:
                    s.warned = True
                    warnings.append(
                        f"{name} has routed fewer than {1 - self.share:.0%} of its tokens to any expert for "
                        f"{s.length} steps (since step {s.start}; now {share:.0%} unrouted): the gate is collapsing; "
                        f"{ADVICE}"
                    )
            elif s.length:
                if s.length >= self.steps and self.watched[i]:
                    events.append(self._event(name, s, step - 1))
                self.streaks[i] = Streak()
        return warnings, events

    def close(self, step: int) -> list[dict]:
        """Events for the collapses still open at the end of training."""
        return [
            self._event(n, s, step)
            for n, s, watched in zip(self.names, self.streaks, self.watched)
            if watched and s.length >= self.steps
        ]

    def _event(self, name: str, s: Streak, end: int) -> dict:
        return {
            "kind": "unrouted",
            "layer": name,
            "step": end,
            "start": s.start,
            "steps": s.length,
            "peak_share": s.peak,
        }
