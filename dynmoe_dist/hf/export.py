"""export: a converted or upcycled model as a folder that ``AutoModelForCausalLM.from_pretrained`` loads.

Two formats, chosen from the model:

- **the family's own** (plain transformers classes, loadable without dynmoe_dist): a converted model whose every
  block still routes by the family's top-k rule and whose MoE layers all hold the same number of experts. The
  config's expert count becomes what adaptation left, experts are renumbered 0..E-1 in router order, and
  transformers writes its own checkpoint format.
- **ours** (``dynmoe_<family>``, modeling.py): everything else (Top-Any, top-p, DA-MoE, ReLU, null experts, upcycled
  models, per-layer expert counts), loadable after ``import dynmoe_dist.hf``.

Under expert parallelism every rank calls ``export`` (the experts are gathered over the expert-parallel group);
rank 0 writes.
"""

from __future__ import annotations

import copy
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ..routing import router_config
from .block import BlockSpec, MoEBlock, moe_blocks
from .families import FAMILIES, family_router
from .modeling import CONFIGS, MODELS, PREFIX, base_classes, register
from .weights import bank_rows, rows_to_fused

# the routing fields a family's format can hold; the rest (aux weights, noise) is training-only
ROUTING_FIELDS = ("kind", "k", "renormalize", "score", "selection_bias", "num_groups", "top_groups", "scaling")
# the config field holding the expert count, per family
EXPERT_COUNT = {
    "mixtral": "num_local_experts",
    "qwen2_moe": "num_experts",
    "qwen3_moe": "num_experts",
    "olmoe": "num_experts",
    "deepseek_v3": "n_routed_experts",
}
TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "vocab.*", "merges.txt", "generation_config.json")


def expert_rows(block: MoEBlock) -> list[dict[str, torch.Tensor]]:
    """Every expert's rows in router position order, gathered over the expert-parallel group when sharded."""
    rows = {i: {k: v.cpu() for k, v in r.items()} for i, r in bank_rows(block.moe.experts).items()}
    groups = block.moe.groups
    if groups is not None and groups.ep_size > 1:
        parts: list = [None] * groups.ep_size
        dist.all_gather_object(parts, rows, group=groups.ep_group)
        rows = {i: r for part in parts for i, r in part.items()}
    return [rows[i] for i in block.moe.router.expert_ids.tolist()]


def block_state(block: MoEBlock, experts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The block's state dict for a single-process block of ``len(experts)`` experts, ids renumbered 0..E-1."""
    n = len(experts)
    state = {k: v.detach().cpu() for k, v in block.state_dict().items() if not k.startswith("moe.experts.")}
    state["moe.router.expert_ids"] = torch.arange(n, dtype=torch.int64)
    state["moe.next_expert_id"] = torch.tensor(n, dtype=torch.int64)
    state["moe.experts.expert_ids"] = torch.arange(n, dtype=torch.int64)
    for name in experts[0]:
        state[f"moe.experts.{name}"] = torch.stack([r[name] for r in experts])
    return state


def family_format(model: nn.Module, blocks: list[tuple[str, MoEBlock]]) -> bool:
    """Whether the family's own classes can hold this model: converted blocks, the family's rule, equal counts."""
    model_type = model.config.model_type
    family = FAMILIES.get(model_type)
    if family is None or not family.moe:
        return False
    own = asdict(family_router(model.config, family))
    counts = {b.moe.num_experts for _, b in blocks}
    for _, block in blocks:
        cfg = asdict(router_config(dict(block.spec.router)))
        if block.spec.origin != "convert" or any(cfg.get(f) != own[f] for f in ROUTING_FIELDS):
            return False
    (count,) = counts if len(counts) == 1 else (None,)
    return not (count is None or count < own["k"] or count % own["num_groups"])


def family_state(blocks: list[tuple[str, MoEBlock]], rows: dict[str, list]) -> dict[str, torch.Tensor]:
    """The MoE blocks' weights under the family's own names (fused experts, router, shared experts)."""
    state = {}
    for name, block in blocks:
        moe = block.moe
        fused = [rows_to_fused(r) for r in rows[name]]
        state[f"{name}.experts.gate_up_proj"] = torch.stack([g for g, _ in fused])
        state[f"{name}.experts.down_proj"] = torch.stack([d for _, d in fused])
        state[f"{name}.gate.weight"] = moe.router.weight.detach().cpu()
        if getattr(moe.router, "selection_bias", None) is not None:
            state[f"{name}.gate.e_score_correction_bias"] = moe.router.selection_bias.detach().cpu()
        if moe.shared is not None:
            shared = f"{name}.shared_expert" if block.spec.shared_gate else f"{name}.shared_experts"
            state[f"{shared}.gate_proj.weight"] = moe.shared.w_gate.detach().cpu().t()
            state[f"{shared}.up_proj.weight"] = moe.shared.w_in.detach().cpu().t()
            state[f"{shared}.down_proj.weight"] = moe.shared.w_out.detach().cpu().t()
            if moe.shared.gate is not None:
                state[f"{name}.shared_expert_gate.weight"] = moe.shared.gate.detach().cpu().t()
    return state


def outside_blocks(model: nn.Module, blocks: list[tuple[str, MoEBlock]]) -> dict[str, torch.Tensor]:
    prefixes = tuple(name + "." for name, _ in blocks)
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if not k.startswith(prefixes)}


def export(model: nn.Module, out_dir: str | Path) -> Path:
    """Write ``model`` (converted or upcycled by dynmoe_dist.hf, possibly adapted) to ``out_dir`` for
    ``from_pretrained``; returns the folder. Collective under expert parallelism."""
    blocks = moe_blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no MoEBlock: convert or upcycle it first")
    rows = {name: expert_rows(block) for name, block in blocks}
    groups = blocks[0][1].moe.groups
    world = groups.world_group if groups is not None and groups.world_size > 1 else None
    if world is not None and groups.rank != 0:
        dist.barrier(group=world)
        return Path(out_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(model.config)
    state = outside_blocks(model, blocks)
    if family_format(model, blocks):
        setattr(config, EXPERT_COUNT[config.model_type], blocks[0][1].moe.num_experts)
        state.update(family_state(blocks, rows))
        fresh = base_classes(config.model_type)[1](config)
    else:
        register()
        fields = config.to_dict()
        base = fields.pop("model_type")
        base = base.removeprefix(PREFIX)
        layer_of = {name: name.rsplit(".", 2)[-2] for name, _ in blocks}  # "model.layers.3.mlp" -> "3"
        fields["dynmoe"] = {
            "layers": {layer_of[name]: asdict(b.current_spec()) for name, b in blocks},
        }
        config_cls, model_cls = CONFIGS[base], MODELS[base]
        config = config_cls(**fields)
        for name, block in blocks:
            state.update({f"{name}.{k}": v for k, v in block_state(block, rows[name]).items()})
        fresh = model_cls(config)
    fresh.load_state_dict(state, strict=True)
    fresh.save_pretrained(out)
    copy_tokenizer(model, out)
    if world is not None:
        dist.barrier(group=world)
    return out


def copy_tokenizer(model: nn.Module, out: Path) -> None:
    """The tokenizer files of the folder the model was loaded from, if it was loaded from a local folder."""
    source = Path(str(getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "") or ""))
    if not str(source) or not source.is_dir() or source.resolve() == out.resolve():
        return
    for pattern in TOKENIZER_FILES:
        for f in source.glob(pattern):
            if f.is_file() and not (out / f.name).exists():
                shutil.copy2(f, out / f.name)


__all__ = ["BlockSpec", "export"]
