"""Router settings, one dataclass per gate, each validated on construction.

Defaults follow docs/ALGORITHMS.md sections 1-2. The ``kind`` field selects the gate, so a plain dict (a hydra config
group, a JSON file) turns into the right dataclass through ``router_config``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from ..errors import ConfigError, check

NEW_THRESHOLDS = ("median", "max", "zero")


@dataclass
class TopAnyConfig:
    """DynMoE Top-Any gate (arXiv 2405.14297). Term weights multiply ``aux_weight``; 0 switches a term off."""

    kind: str = "top_any"
    trainable_temperature: bool = False
    aux_weight: float = 0.01
    diverse_weight: float = 1.0
    simple_weight: float = 1.0
    balance_weight: float = 1.0
    efficiency_weight: float = 1.0
    # Where dynmoe_dist departs from the reference code, each a measured fix for the collapse of k to 0 in training
    # (docs/ALGORITHMS.md, "Top-Any without collapse"); unrouted="drop", efficiency_free=0, route_weight=0,
    # new_threshold="zero" is the reference (the `moe=top_any_reference` preset).
    # A token no expert accepted, in training: "top1" goes to its most similar expert with weight 1, as in
    # evaluation, and that pair's gradient reaches its threshold; "drop" (the reference) leaves its MoE output at 0.
    unrouted: str = "top1"
    # Activations per token the efficiency loss leaves alone: 1 lowers k toward 1 but never pushes a token off its
    # last expert; 0 (the reference) makes every activation cost.
    efficiency_free: int = 1
    # A hinge that lifts a token no expert accepted toward its most similar expert's threshold; 0 (the reference)
    # leaves such a token without a gradient toward any expert.
    route_weight: float = 10.0
    # A new expert's threshold (adaptation): the "median" or the "max" of the layer's thresholds, or "zero" (the
    # reference).
    new_threshold: str = "median"

    def __post_init__(self) -> None:
        weights = (
            "aux_weight",
            "diverse_weight",
            "simple_weight",
            "balance_weight",
            "efficiency_weight",
            "route_weight",
        )
        for name in weights:
            value = getattr(self, name)
            check(value >= 0, name, value, "a weight >= 0 (0 switches the term off)")
        check(self.efficiency_free in (0, 1), "efficiency_free", self.efficiency_free, "0 (reference) or 1")
        check(self.new_threshold in NEW_THRESHOLDS, "new_threshold", self.new_threshold, " | ".join(NEW_THRESHOLDS))
        check(self.unrouted in ("drop", "top1"), "unrouted", self.unrouted, "'drop' (reference) or 'top1'")


@dataclass
class TopKConfig:
    """Top-k softmax gate (GShard/Switch baseline)."""

    kind: str = "top_k"
    k: int = 2
    renormalize: bool = True
    balance_weight: float = 0.01
    # f_e in the balance loss counts every assignment ("all") or only first choices ("first": GShard, DeepSpeed top-1/2
    # and Tutel's gshard_loss)
    balance_counts: str = "all"
    # Training-time noise, off by default; each is one peer's convention, kept so imported models train as before.
    input_jitter: float = 0.0  # DeepSpeed 'Jitter': the gate input times uniform(1 - eps, 1 + eps)
    selection_noise: str = "none"  # 'gumbel': DeepSpeed 'RSample'; 'gumbel_second': its top2_2nd_expert_sampling
    logit_noise: float = 0.0  # Tutel gate_noise: logits + noise * N(0, 1) / E, before the softmax
    # Pretrained families' rules (dynmoe_dist.hf reproduces them exactly); the defaults are GShard's softmax top-k.
    score: str = "softmax"  # 'sigmoid': independent per-expert scores (DeepSeek-V3)
    # A per-expert bias added to the scores for choosing only, never for weighting (DeepSeek-V3's
    # e_score_correction_bias); a gate row that adaptation slices and moves, not trained by the gradient.
    selection_bias: bool = False
    # Grouped top-k (DeepSeek-V3's device-limited routing): experts in ``num_groups`` equal groups, each group scored
    # by the sum of its two best choice scores, the ``top_groups`` best groups kept, the k experts chosen among them.
    num_groups: int = 1
    top_groups: int = 1
    scaling: float = 1.0  # every routed weight times this (DeepSeek-V3's routed_scaling_factor)

    def __post_init__(self) -> None:
        check(isinstance(self.k, int) and self.k >= 1, "k", self.k, "an integer >= 1")
        check(self.score in ("softmax", "sigmoid"), "score", self.score, "'softmax' or 'sigmoid'")
        groups_ok = isinstance(self.num_groups, int) and self.num_groups >= 1
        check(groups_ok, "num_groups", self.num_groups, "an integer >= 1")
        check(
            isinstance(self.top_groups, int) and 1 <= self.top_groups <= self.num_groups,
            "top_groups",
            self.top_groups,
            f"an integer in 1..num_groups={self.num_groups}",
        )
        check(self.scaling > 0, "scaling", self.scaling, "a factor > 0")
        check(self.balance_weight >= 0, "balance_weight", self.balance_weight, "a weight >= 0")
        check(self.balance_counts in ("all", "first"), "balance_counts", self.balance_counts, "'all' or 'first'")
        check(0 <= self.input_jitter < 1, "input_jitter", self.input_jitter, "a fraction in [0, 1)")
        check(
            self.selection_noise in ("none", "gumbel", "gumbel_second"),
            "selection_noise",
            self.selection_noise,
            "'none', 'gumbel' (every choice) or 'gumbel_second' (the second choice of top-2)",
        )
        check(self.logit_noise >= 0, "logit_noise", self.logit_noise, "a noise scale >= 0")


@dataclass
class TopPConfig:
    """Top-p gate ("Harder Tasks Need More Experts", arXiv 2403.07652)."""

    kind: str = "top_p"
    p: float = 0.4
    balance_weight: float = 0.01
    entropy_weight: float = 1e-4

    def __post_init__(self) -> None:
        check(0.0 < self.p <= 1.0, "p", self.p, "a probability in (0, 1]")
        check(self.balance_weight >= 0, "balance_weight", self.balance_weight, "a weight >= 0")
        check(self.entropy_weight >= 0, "entropy_weight", self.entropy_weight, "a weight >= 0")


@dataclass
class ImportanceKConfig:
    """Attention-importance k (DA-MoE, arXiv 2409.06669): k_j = clamp(ceil(imp_j * k_max), 1, k_max).

    ``importance`` names a registered importance function; ``fallback_k`` is used for every token when the layer gets
    no attention probabilities or importance vector (None means k_max).
    """

    kind: str = "importance_k"
    k_max: int = 4
    importance: str = "attention_received"
    fallback_k: int | None = None
    balance_weight: float = 0.01

    def __post_init__(self) -> None:
        check(isinstance(self.k_max, int) and self.k_max >= 1, "k_max", self.k_max, "an integer >= 1")
        if self.fallback_k is not None:
            check(1 <= self.fallback_k <= self.k_max, "fallback_k", self.fallback_k, f"1..k_max={self.k_max}")
        check(self.balance_weight >= 0, "balance_weight", self.balance_weight, "a weight >= 0")


@dataclass
class ReLUConfig:
    """ReLU routing (ReMoE, arXiv 2412.14711) with an L1 coefficient steered toward ``target_active`` experts."""

    kind: str = "relu"
    target_active: float = 2.0
    l1_init: float = 1e-8
    l1_factor: float = 1.2

    def __post_init__(self) -> None:
        check(self.target_active > 0, "target_active", self.target_active, "a number of experts > 0")
        check(self.l1_init > 0, "l1_init", self.l1_init, "a coefficient > 0")
        check(self.l1_factor > 1, "l1_factor", self.l1_factor, "a factor > 1")


@dataclass
class NullExpertConfig:
    """Top-k over real plus null experts (AdaMoE, arXiv 2406.13233); a null choice costs no compute or traffic."""

    kind: str = "null"
    k: int = 2
    num_null: int = 2
    renormalize: bool = True
    balance_weight: float = 0.01

    def __post_init__(self) -> None:
        check(isinstance(self.k, int) and self.k >= 1, "k", self.k, "an integer >= 1")
        check(isinstance(self.num_null, int) and self.num_null >= 1, "num_null", self.num_null, "an integer >= 1")
        check(self.balance_weight >= 0, "balance_weight", self.balance_weight, "a weight >= 0")


RouterConfig = TopAnyConfig | TopKConfig | TopPConfig | ImportanceKConfig | ReLUConfig | NullExpertConfig

CONFIGS: dict[str, type] = {
    c.kind: c  # dataclass defaults are class attributes
    for c in (TopAnyConfig, TopKConfig, TopPConfig, ImportanceKConfig, ReLUConfig, NullExpertConfig)
}


def router_config(spec: str | dict[str, Any] | RouterConfig) -> RouterConfig:
    """A router config from a gate name, a mapping with ``kind``, or an existing config."""
    if isinstance(spec, str):
        spec = {"kind": spec}
    if not isinstance(spec, dict):
        return spec
    spec = dict(spec)
    kind = spec.get("kind", "top_any")
    if kind not in CONFIGS:
        raise ConfigError("router.kind", kind, "one of " + ", ".join(sorted(CONFIGS)))
    cls = CONFIGS[kind]
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise ConfigError(f"router.{unknown[0]}", spec[unknown[0]], f"a field of {cls.__name__}: {sorted(known)}")
    return cls(**spec)
