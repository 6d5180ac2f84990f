"""Peer weights (DeepSpeed-MoE, Tutel) by global expert id, and their load into our layer at any expert-parallel size.

Both peers place global expert ``g`` on rank ``g // (E / ep)`` as local slot ``g % (E / ep)``; a state dict saved at
expert-parallel size ep therefore comes as ep per-rank dicts (or DeepSpeed's one file per expert), which the readers
merge by global id. Our bank keeps global ids itself, so loading at another ep size is a lookup.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..layer import MoELayer


@dataclass
class PeerWeights:
    """A peer layer's routing weight [E, d] and every expert's rows in our layout (ExpertBank names)."""

    gate: torch.Tensor
    experts: dict[int, dict[str, torch.Tensor]]
    source: str  # for messages: "DeepSpeed-MoE state dict", ...


def as_rank_list(state_dicts) -> list[dict]:
    return [state_dicts] if isinstance(state_dicts, dict) else list(state_dicts)


@torch.no_grad()
def load_peer_weights(layer: MoELayer, w: PeerWeights) -> None:
    """Copy ``w`` into ``layer``: the gate row weight everywhere, each rank's own experts by id."""
    E = layer.num_experts
    if sorted(w.experts) != list(range(E)):
        have = sorted(w.experts)
        raise ConfigError(
            "experts",
            f"{w.source} with experts {have[:3]}..{have[-3:]} ({len(have)})" if have else f"{w.source} with none",
            f"all {E} experts 0..{E - 1}: a dict saved at expert-parallel size > 1 holds one rank's share; pass every "
            "rank's dict in rank order (a list), or the checkpoint folder",
        )
    if layer.router.expert_ids.tolist() != list(range(E)):
        raise ConfigError("layer", "a layer whose experts were already adapted", "a freshly built layer")
    gate = layer.router.row_parameters().get("weight")
    if gate is None or gate.shape != w.gate.shape:
        shape = None if gate is None else tuple(gate.shape)
        raise ConfigError("router", f"a router weight of shape {shape}", f"{tuple(w.gate.shape)} from the {w.source}")
    gate.copy_(w.gate)
    bank = layer.experts
    for slot, expert_id in enumerate(bank.expert_ids.tolist()):
        rows = w.experts[expert_id]
        for name, p in bank.weights().items():
            if name not in rows:
                raise ConfigError(f"expert {expert_id}", f"no {name} in the {w.source}", f"the layer's {name}")
            if rows[name].shape != p.shape[1:]:
                raise ConfigError(
                    f"expert {expert_id}.{name}",
                    f"shape {tuple(rows[name].shape)} in the {w.source}",
                    f"{tuple(p.shape[1:])} (hidden size and expert width must match)",
                )
            p[slot].copy_(rows[name])
