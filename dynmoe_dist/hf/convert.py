"""convert: every MoE block of a loaded transformers MoE model becomes an ``MoEBlock`` with the same weights.

Experts are taken over by id (expert e of the checkpoint is expert id e, on whichever rank the placement puts it),
shared experts become the layer's shared experts (with Qwen2-MoE's sigmoid gate), the router's rows become the
gate's rows. With ``router=None`` the gate is the family's own rule (families.family_router), so the converted model
computes what the original computes; any other gate takes the router's rows as its embeddings, and Top-Any also gets
thresholds calibrated on the first batch (calibrate.py).
"""

from __future__ import annotations

from dataclasses import asdict

import torch
from torch import nn

from ..errors import ConfigError
from ..parallel.groups import ParallelGroups
from ..routing import RouterConfig, TopKRouter, router_config
from .block import BlockSpec, MoEBlock
from .calibrate import pending_reference
from .families import decoder_layers, expert_activation, family_of, family_router
from .weights import fused_to_rows, load_bank, load_shared


def is_hf_moe_block(module: nn.Module) -> bool:
    """A transformers MoE block: a router ``gate`` with rows and fused ``experts``."""
    experts = getattr(module, "experts", None)
    return hasattr(getattr(module, "gate", None), "weight") and hasattr(experts, "gate_up_proj")


def shared_of(block: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    """(shared MLP, its sigmoid gate) of a block: Qwen2-MoE's ``shared_expert``/``shared_expert_gate``,
    DeepSeek-V3's ``shared_experts`` (no gate)."""
    mlp = getattr(block, "shared_expert", None) or getattr(block, "shared_experts", None)
    return mlp, getattr(block, "shared_expert_gate", None)


def convert(
    model: nn.Module,
    router: str | dict | RouterConfig | None = None,
    groups: ParallelGroups | None = None,
    seed: int = 0,
) -> nn.Module:
    """Replace every MoE block of ``model`` (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3) in place by an
    ``MoEBlock``; returns ``model``.

    ``router=None`` (or ``"top_k"``) keeps the family's routing exactly; a gate name, dict or config switches to that
    rule with the router's rows. ``groups`` (``parallel.build_groups``) shards the experts over the expert-parallel
    group: each rank keeps only its experts' weights. Every rank must convert the same model the same way.
    """
    config = model.config
    family = family_of(config, moe=True)
    activation = expert_activation(config)
    own = family_router(config, family)
    cfg = own if router is None or router == "top_k" else router_config(router)
    converted = 0
    for index, layer in enumerate(decoder_layers(model)):
        old = getattr(layer, "mlp", None)
        if old is None or not is_hf_moe_block(old):
            continue
        gate_weight = old.gate.weight
        gate_up, down = old.experts.gate_up_proj, old.experts.down_proj
        num_experts, d_model = gate_weight.shape
        shared_mlp, shared_gate = shared_of(old)
        spec = BlockSpec(
            d_model=d_model,
            d_ff=down.shape[-1],
            num_experts=num_experts,
            router=asdict(cfg),
            activation=activation,
            num_shared=1 if shared_mlp is not None else 0,
            shared_d_ff=shared_mlp.down_proj.in_features if shared_mlp is not None else None,
            shared_gate=shared_gate is not None,
            origin="convert",
        )
        block = MoEBlock(spec, groups, seed=seed + index, name=f"layers.{index}.mlp")
        with torch.no_grad():
            load_router(block, old)
            rows_of = {e: fused_to_rows(gate_up[e], down[e]) for e in block.moe.experts.expert_ids.tolist()}
            load_bank(block.moe.experts, rows_of)
            if shared_mlp is not None:
                load_shared(block.moe.shared, shared_mlp, shared_gate)
        if cfg.kind == "top_any":
            reference = TopKRouter(d_model, num_experts, own)
            load_router_rows(reference, old)
            pending_reference(block, reference)
        block.to(device=gate_up.device, dtype=gate_up.dtype)
        block.moe.router.float()  # the gate decides in fp32 whatever the model's dtype, as MoELayer routes
        layer.mlp = block
        converted += 1
    if not converted:
        raise ConfigError(
            "model", type(model).__name__, "a model with MoE blocks not converted yet (no MoE block left)"
        )
    # transformers' load-balancing loss reads router logits from its own router modules, which are gone; the blocks'
    # aux losses (moe_aux_loss) replace it
    config.output_router_logits = False
    return model


@torch.no_grad()
def load_router_rows(router: nn.Module, old: nn.Module) -> None:
    """The router's rows (and DeepSeek-V3's selection bias) into a gate whose ``weight`` has one row per expert."""
    weight = old.gate.weight
    router.weight[: weight.shape[0]].copy_(weight)
    bias = getattr(old.gate, "e_score_correction_bias", None)
    if bias is not None and getattr(router, "selection_bias", None) is not None:
        router.selection_bias.copy_(bias)


def load_router(block: MoEBlock, old: nn.Module) -> None:
    router = block.moe.router
    if router.weight.shape != old.gate.weight.shape:
        raise ConfigError("router", router.cfg.kind, f"a gate with one row per expert ({tuple(old.gate.weight.shape)})")
    load_router_rows(router, old)
