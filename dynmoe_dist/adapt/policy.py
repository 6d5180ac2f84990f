"""The DynMoE adaptation rule as a pure function (Guo et al., arXiv 2405.14297; ALGORITHMS.md section 5).

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


@dataclass
class PolicyConfig:
    min_experts: int = 1
    max_experts: int = 64
    max_add: int = 1  # experts added per event when tokens went unrouted
    init: str = "copy"  # new expert weights: copy of the most-loaded expert, random, or a given dense FFN

    def __post_init__(self) -> None:
        check(self.min_experts >= 1, "min_experts", self.min_experts, "an integer >= 1")
        check(
            self.max_experts >= self.min_experts, "max_experts", self.max_experts, f">= min_experts={self.min_experts}"
        )
        check(self.max_add >= 0, "max_add", self.max_add, "an integer >= 0")
        check(self.init in INIT_RULES, "init", self.init, " | ".join(INIT_RULES))


@dataclass
class NewExpert:
    expert_id: int
    gate_row: torch.Tensor  # [d], the normalised unrouted sum; the threshold starts at 0
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
    """Remove experts that got no token (never below min_experts); add up to max_add when tokens went unrouted.

    Removal keeps the lowest ids when the minimum binds. New experts take the normalised unrouted sum as gate row;
    with init="copy" they copy the most-loaded surviving expert (lowest id on ties).
    """
    tokens = window.tokens_by_id()
    idle = sorted(i for i, t in tokens.items() if t == 0)
    removable = max(0, len(tokens) - cfg.min_experts)
    remove = sorted(idle[len(idle) - removable :]) if removable < len(idle) else idle
    survivors = [i for i in window.expert_ids if i not in set(remove)]
    decision = Decision(remove=remove)
    room = cfg.max_experts - len(survivors)
    n_add = min(cfg.max_add, room) if window.unrouted_count > 0 else 0
    norm = window.unrouted_sum.norm()
    if n_add > 0 and norm > 0:
        row = window.unrouted_sum / norm
        source = max(survivors, key=lambda i: (tokens[i], -i)) if cfg.init == "copy" and survivors else None
        for j in range(n_add):
            decision.add.append(NewExpert(next_expert_id + j, row.clone(), cfg.init, source))
    return decision


Policy = Callable[[WindowStats, int, PolicyConfig], Decision]
POLICIES: dict[str, Policy] = {"dynmoe": dynmoe_policy}
