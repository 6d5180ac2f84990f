"""The block that takes an MoE or MLP block's place in a transformers decoder layer, backed by ``MoELayer``.

A decoder layer calls ``self.mlp(hidden_states)`` and adds the result to its residual stream, so the block returns
the layer's output alone. The auxiliary losses and routing statistics of its last forward stay on the block
(``aux``); ``moe_aux_loss(model)`` sums them for the training loss, since transformers' own load-balancing loss reads
router logits this block does not produce.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ..layer import MoEAux, MoELayer
from ..parallel.groups import ParallelGroups
from ..placement import PlacementTable
from ..routing import Router, router_config


@dataclass
class BlockSpec:
    """Everything needed to rebuild a block's shape: stored in an exported config, read back by ``modeling``."""

    d_model: int
    d_ff: int
    num_experts: int
    router: dict[str, Any]
    activation: str = "swiglu"
    num_shared: int = 0
    shared_d_ff: int | None = None
    shared_gate: bool = False
    origin: str = "convert"  # 'convert' (an MoE family's block) or 'upcycle' (a dense MLP copied into experts)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BlockSpec:
        return cls(**d)


class MoEBlock(nn.Module):
    """``mlp`` of one decoder layer: hidden states [B, S, d] -> [B, S, d] through an ``MoELayer``."""

    def __init__(self, spec: BlockSpec, groups: ParallelGroups | None = None, seed: int = 0, name: str = "moe") -> None:
        super().__init__()
        self.spec = spec
        self.moe = MoELayer(
            spec.d_model,
            spec.d_ff,
            spec.num_experts,
            router=router_config(dict(spec.router)),
            activation=spec.activation,
            num_shared_experts=spec.num_shared,
            shared_d_ff=spec.shared_d_ff,
            shared_gate=spec.shared_gate,
            groups=groups,
            seed=seed,
            name=name,
        )
        self.aux: MoEAux | None = None
        # Top-Any after convert: the model's own top-k router, used once to set the thresholds from the first batch
        # (calibrate.py); a plain list so it is neither a submodule nor saved
        self.pending_calibration: list[Router] = []

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.pending_calibration:
            from .calibrate import calibrate_block

            calibrate_block(self, hidden_states)
        out, self.aux = self.moe(hidden_states)
        return out

    def current_spec(self) -> BlockSpec:
        """The spec with the expert count adaptation left."""
        d = self.spec.to_dict()
        d["num_experts"] = self.moe.num_experts
        return BlockSpec.from_dict(d)


@torch.no_grad()
def shard(model: nn.Module, groups: ParallelGroups) -> nn.Module:
    """Shard the experts of every single-process ``MoEBlock`` of ``model`` (one loaded with ``from_pretrained`` from
    our format, say) over ``groups``' expert-parallel group, in place: each rank keeps its experts, by id."""
    for name, block in moe_blocks(model):
        if block.moe.groups is not None and block.moe.groups.ep_size > 1:
            continue
        layer = block.moe
        spec = block.current_spec()
        new = MoEBlock(spec, groups, seed=layer.seed, name=layer.name)
        ids = layer.router.expert_ids.tolist()
        new.moe.install(
            PlacementTable.contiguous(ids, groups.ep_size, version=layer.placement.version), int(layer.next_expert_id)
        )
        for pname, p in layer.router.named_parameters():
            new.moe.router.get_parameter(pname).copy_(p)
        if layer.shared is not None:
            new.moe.shared.load_state_dict(layer.shared.state_dict())
        slot_of = {e: s for s, e in enumerate(layer.experts.expert_ids.tolist())}
        mine = new.moe.experts.weights()
        for slot, expert_id in enumerate(new.moe.experts.expert_ids.tolist()):
            for wname, w in layer.experts.weights().items():
                mine[wname][slot].copy_(w[slot_of[expert_id]])
        new.to(device=layer.router.weight.device)
        new.moe.experts.to(dtype=layer.experts.w_in.dtype)
        model.get_submodule(name.rsplit(".", 1)[0]).register_module(name.rsplit(".", 1)[1], new)
    return model


def moe_blocks(model: nn.Module) -> list[tuple[str, MoEBlock]]:
    """(qualified name, block) of every ``MoEBlock`` in ``model``, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoEBlock)]


def moe_aux_loss(model: nn.Module) -> torch.Tensor | float:
    """The sum of every MoE block's auxiliary loss from the last forward (0.0 before any)."""
    total: torch.Tensor | float = 0.0
    for _, block in moe_blocks(model):
        if block.aux is not None:
            total = total + block.aux.loss
    return total
