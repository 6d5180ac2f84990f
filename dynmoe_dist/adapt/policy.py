"""The DynMoE adaptation rule as a pure function (Guo et al., arXiv 2405.14297; docs/ALGORITHMS.md section 5).

Same window statistics, same expert set, same config -> the same decision on every rank; nothing here touches a
tensor that is not an input. Other policies plug in with the same signature (``POLICIES``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..errors import check
from .recorder import WindowStats

INIT_RULES = ("copy", "random", "dense")
DIRECTIONS = ("centered", "mean")


@dataclass
class PolicyConfig:
    min_experts: int = 1
    max_experts: int = 64
    max_add: int = 1  # experts added per event when tokens went unrouted
    init: str = "copy"  # new expert weights: copy of the most-loaded expert, random, or a given dense FFN
    # The new expert's gate row: "mean", the direction of the unrouted tokens' mean (the reference), or "centered",
    # that mean less the routed tokens' mean. Token embeddings share a common component, so the plain mean points
    # where almost every token is and the new expert takes them all; centred, it points where the unrouted differ.
    direction: str = "centered"
    # Add only when more than this share of the window's tokens went unrouted. The reference adds for a single one;
    # a gate that routes nearly every token then grows to max_experts for noise, and every addition raises k.
    add_min_share: float = 0.01

    def __post_init__(self) -> None:
        check(self.min_experts >= 1, "min_experts", self.min_experts, "an integer >= 1")
        check(
            self.max_experts >= self.min_experts, "max_experts", self.max_experts, f">= min_experts={self.min_experts}"
        )
        check(self.max_add >= 0, "max_add", self.max_add, "an integer >= 0")
        check(self.init in INIT_RULES, "init", self.init, " | ".join(INIT_RULES))
        check(self.direction in DIRECTIONS, "direction", self.direction, " | ".join(DIRECTIONS))
        check(0 <= self.add_min_share < 1, "add_min_share", self.add_min_share, "a share in [0, 1) (0: the reference)")


@dataclass
class NewExpert:
    expert_id: int
    gate_row: torch.Tensor  # [d], unit vector toward the unrouted tokens (PolicyConfig.direction)
    init: str
    source_id: int | None = None  # the expert copied by init="copy"


@dataclass
class Decision:
    remove: list[int] = field(default_factory=list)
    add: list[NewExpert] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.remove and not self.add

    def key(self) -> tuple:
        """Everything that defines the decision, for the agreement digest."""
        return (
            tuple(self.remove),
            tuple((n.expert_id, n.init, n.source_id, tuple(n.gate_row.tolist())) for n in self.add),
        )


def dynmoe_policy(window: WindowStats, next_expert_id: int, cfg: PolicyConfig) -> Decision:
    """Remove experts that got no token (never below min_experts); add up to max_add when more than
    ``add_min_share`` of the tokens went unrouted.

    Removal keeps the lowest ids when the minimum binds. New experts take a unit vector toward the unrouted tokens as
    gate row (``new_direction``); with init="copy" they copy the most-loaded surviving expert (lowest id on ties).
    """
    tokens = window.tokens_by_id()
    idle = sorted(i for i, t in tokens.items() if t == 0)
    removable = max(0, len(tokens) - cfg.min_experts)
    remove = sorted(idle[len(idle) - removable :]) if removable < len(idle) else idle
    survivors = [i for i in window.expert_ids if i not in set(remove)]
    decision = Decision(remove=remove)
    room = cfg.max_experts - len(survivors)
    n_add = min(cfg.max_add, room) if window.unrouted_count > cfg.add_min_share * window.token_count else 0
    row = new_direction(window, cfg.direction)
    if n_add > 0 and row is not None:
        source = max(survivors, key=lambda i: (tokens[i], -i)) if cfg.init == "copy" and survivors else None
        for j in range(n_add):
            decision.add.append(NewExpert(next_expert_id + j, row.clone(), cfg.init, source))
    return decision


def new_direction(window: WindowStats, direction: str) -> torch.Tensor | None:
    """Unit vector toward the window's unrouted tokens (None without any): their mean, or ("centered") their mean less
    the mean of the tokens that were routed."""
    if window.unrouted_count <= 0:
        return None
    vector = window.unrouted_sum / window.unrouted_count
    others = window.token_count - window.unrouted_count
    if direction == "centered" and window.token_sum is not None and others > 0:
        centred = vector - (window.token_sum - window.unrouted_sum) / others
        if centred.norm() > 1e-6 * vector.norm():
            vector = centred
    norm = vector.norm()
    return vector / norm if norm > 0 else None


Policy = Callable[[WindowStats, int, PolicyConfig], Decision]
POLICIES: dict[str, Policy] = {"dynmoe": dynmoe_policy}
