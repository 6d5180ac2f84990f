"""upcycle: the dense MLP of chosen decoder layers becomes an MoE layer whose experts start as copies of it.

Sparse upcycling (Komatsuzaki et al., arXiv 2212.05055): every expert is the pretrained SwiGLU MLP, so while the
weights of each token's experts sum to 1 (renormalised top-k, Top-Any's 1/k) the model computes exactly what the
dense one did, and training makes the copies diverge. Two ways to start them apart, both off by default:

- ``drop`` (Drop-Upcycling, Nakamura et al., arXiv 2502.19261): in each expert a random fraction of the
  intermediate units (a column of the gate and up projections and the row of the down projection) is drawn afresh
  from a normal with the mean and standard deviation of that pretrained matrix;
- ``noise``: every weight times (1 + noise * N(0, 1)).

Both are drawn from a generator seeded by (seed, layer, expert id), so every rank builds the same experts wherever
the placement puts them. The router is new (built from ``seed``, the same on every rank).
"""

from __future__ import annotations

from dataclasses import asdict

import torch
from torch import nn

from ..errors import ConfigError, check
from ..parallel.groups import ParallelGroups
from ..routing import RouterConfig, router_config
from .block import BlockSpec, MoEBlock
from .families import decoder_layers, expert_activation, family_of
from .weights import load_bank, mlp_rows


def chosen_layers(layers: list[int] | tuple[int, ...] | None, count: int) -> list[int]:
    """The layer indices to upcycle (all when None), refusing an index outside the model."""
    if layers is None:
        return list(range(count))
    chosen = []
    for i in layers:
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < count:
            raise ConfigError("layers", i, f"indices 0..{count - 1} of the model's {count} decoder layers")
        if i not in chosen:
            chosen.append(i)
    check(bool(chosen), "layers", layers, "at least one decoder layer index (None: all)")
    return sorted(chosen)


@torch.no_grad()
def expert_rows(
    base: dict[str, torch.Tensor], generator: torch.Generator, noise: float, drop: float
) -> dict[str, torch.Tensor]:
    """One expert's rows from the dense MLP's rows, perturbed by ``drop`` and ``noise``."""
    rows = {name: w.detach().float().clone() for name, w in base.items()}
    inter = rows["w_out"].shape[0]
    n_drop = int(round(drop * inter))
    if n_drop:
        units = torch.randperm(inter, generator=generator)[:n_drop]
        for name in ("w_gate", "w_in"):  # [d, I]: columns are units
            w = rows[name]
            w[:, units] = torch.randn(w.shape[0], n_drop, generator=generator) * w.std() + w.mean()
        w = rows["w_out"]  # [I, d]: rows are units
        w[units] = torch.randn(n_drop, w.shape[1], generator=generator) * w.std() + w.mean()
    if noise:
        for w in rows.values():
            w.mul_(1.0 + noise * torch.randn(w.shape, generator=generator))
    return {name: rows[name].to(base[name].dtype) for name in rows}


def upcycle(
    model: nn.Module,
    num_experts: int,
    router: str | dict | RouterConfig = "top_any",
    layers: list[int] | tuple[int, ...] | None = None,
    noise: float = 0.0,
    groups: ParallelGroups | None = None,
    drop: float = 0.0,
    seed: int = 0,
) -> nn.Module:
    """Replace the MLP of the chosen decoder layers (all by default) of a Llama, Mistral, Qwen2 or Qwen3 model in
    place by an ``MoEBlock`` of ``num_experts`` copies; returns ``model``."""
    config = model.config
    family_of(config, moe=False)
    activation = expert_activation(config)
    check(isinstance(num_experts, int) and num_experts >= 1, "num_experts", num_experts, "an integer >= 1")
    check(noise >= 0, "noise", noise, "a scale >= 0 (0: exact copies)")
    check(0 <= drop <= 1, "drop", drop, "a fraction of each expert's units in [0, 1]")
    cfg = router_config(router)
    all_layers = decoder_layers(model)
    for index in chosen_layers(layers, len(all_layers)):
        layer = all_layers[index]
        mlp = layer.mlp
        if not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
            raise ConfigError(f"layers[{index}].mlp", type(mlp).__name__, "a dense SwiGLU MLP (not upcycled yet)")
        if any(getattr(mlp, n).bias is not None for n in ("gate_proj", "up_proj", "down_proj")):
            raise ConfigError("mlp_bias", True, "False: experts are upcycled from bias-free MLPs")
        weight = mlp.gate_proj.weight
        spec = BlockSpec(
            d_model=weight.shape[1],
            d_ff=weight.shape[0],
            num_experts=num_experts,
            router=asdict(cfg),
            activation=activation,
            origin="upcycle",
        )
        block = MoEBlock(spec, groups, seed=seed + index, name=f"layers.{index}.mlp")
        base = {k: v.detach().cpu() for k, v in mlp_rows(mlp).items()}
        rows_of = {}
        for expert_id in block.moe.experts.expert_ids.tolist():
            g = torch.Generator().manual_seed((seed * 1_000_003 + index * 10_007 + expert_id) % (2**63))
            rows_of[expert_id] = expert_rows(base, g, noise, drop)
        load_bank(block.moe.experts, rows_of)
        block.to(device=weight.device, dtype=weight.dtype)
        block.moe.router.float()  # the gate decides in fp32 whatever the model's dtype, as MoELayer routes
        layer.mlp = block
    return model
