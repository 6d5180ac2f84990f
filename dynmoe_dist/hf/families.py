"""Per-family facts about Hugging Face decoder models: where the MLP lives, how the MoE families route, their shared
experts.

Every supported family keeps its decoder layers at ``model.model.layers`` and each layer's feed-forward block at
``layer.mlp``. An MoE block there holds ``gate.weight`` [E, d] and fused experts ``experts.gate_up_proj`` [E, 2I, d]
(rows [:I] gate, [I:] up) and ``experts.down_proj`` [E, d, I]; a dense block holds ``gate_proj``, ``up_proj`` and
``down_proj`` Linear layers (SwiGLU). Which layers are MoE is read from the model itself (a block with ``experts``),
so each family's dense-first rule (``mlp_only_layers``, ``decoder_sparse_step``, ``first_k_dense_replace``) needs
no code here.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from ..routing import TopKConfig


@dataclass(frozen=True)
class Family:
    """What differs between families: the routing rule's options and the shared experts."""

    model_type: str
    moe: bool  # an MoE family (convert) or a dense one (upcycle)
    score: str = "softmax"
    renormalize: str = "always"  # 'always' (Mixtral), 'config' (norm_topk_prob), 'never'
    grouped: bool = False  # DeepSeek-V3: selection bias, grouped top-k, routed scaling factor
    shared: str = "none"  # 'none', 'gated' (Qwen2-MoE: one shared MLP times a sigmoid gate), 'plain' (DeepSeek-V3)


FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family("mixtral", moe=True),
        Family("qwen2_moe", moe=True, renormalize="config", shared="gated"),
        Family("qwen3_moe", moe=True, renormalize="config"),
        Family("olmoe", moe=True, renormalize="config"),
        Family("deepseek_v3", moe=True, score="sigmoid", renormalize="config", grouped=True, shared="plain"),
        Family("llama", moe=False),
        Family("mistral", moe=False),
        Family("qwen2", moe=False),
        Family("qwen3", moe=False),
    )
}
MOE_FAMILIES = tuple(name for name, f in FAMILIES.items() if f.moe)
DENSE_FAMILIES = tuple(name for name, f in FAMILIES.items() if not f.moe)

# hidden_act -> the gated expert activation of dynmoe_dist.experts (gate act(x W_gate) times x W_in)
GATED_ACTIVATIONS = {"silu": "swiglu", "swish": "swiglu", "gelu": "geglu"}


def family_of(config, moe: bool) -> Family:
    """The family of a transformers config, refusing what ``convert`` (moe=True) or ``upcycle`` cannot take."""
    model_type = getattr(config, "model_type", None)
    allowed = MOE_FAMILIES if moe else DENSE_FAMILIES
    if model_type not in allowed:
        what = "convert (MoE models)" if moe else "upcycle (dense models)"
        raise ConfigError(f"model_type for {what}", model_type, "one of " + ", ".join(allowed))
    return FAMILIES[model_type]


def expert_activation(config) -> str:
    act = getattr(config, "hidden_act", "silu")
    if act not in GATED_ACTIVATIONS:
        raise ConfigError("hidden_act", act, "one of " + ", ".join(GATED_ACTIVATIONS) + " (a gated MLP)")
    return GATED_ACTIVATIONS[act]


def num_experts(config) -> int:
    for name in ("num_local_experts", "num_experts", "n_routed_experts"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ConfigError("config", type(config).__name__, "a config with num_experts or num_local_experts")


def family_router(config, family: Family) -> TopKConfig:
    """The family's own top-k rule as a ``TopKConfig``: the converted model routes exactly as the original.

    The balance loss takes the model's ``router_aux_loss_coef`` times k: transformers' load-balancing loss counts
    each token's k choices as k (fractions summing to k), ours as shares summing to 1. DeepSeek-V3 balances through
    its selection bias and has no such loss.
    """
    k = int(config.num_experts_per_tok)
    renormalize = family.renormalize == "always" or (
        family.renormalize == "config" and bool(getattr(config, "norm_topk_prob", False))
    )
    balance = 0.0 if family.grouped else float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0) * k
    options: dict = {"k": k, "renormalize": renormalize, "balance_weight": balance, "score": family.score}
    if family.grouped:
        options.update(
            selection_bias=True,
            num_groups=int(getattr(config, "n_group", 1) or 1),
            top_groups=int(getattr(config, "topk_group", 1) or 1),
            scaling=float(getattr(config, "routed_scaling_factor", 1.0) or 1.0),
        )
    # Mixtral's training-only jitter: ours multiplies the gate's input only, transformers' the experts' input too
    jitter = float(getattr(config, "router_jitter_noise", 0.0) or 0.0)
    if jitter:
        options["input_jitter"] = jitter
    return TopKConfig(**options)


def decoder_layers(model):
    """The decoder layers of a causal LM (``model.model.layers``) or of a bare base model (``model.layers``)."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ConfigError("model", type(model).__name__, "a transformers decoder model with model.layers")
    return layers
