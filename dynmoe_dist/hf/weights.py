"""Weight layouts: transformers' fused experts and SwiGLU MLPs <-> dynmoe_dist's stacked expert rows.

transformers stores expert e as ``gate_up_proj[e]`` [2I, d] (rows [:I] gate, [I:] up) and ``down_proj[e]`` [d, I],
and an MLP as Linear weights [out, in]. An ``ExpertBank`` row is ``w_gate[slot]``, ``w_in[slot]`` [d, I] and
``w_out[slot]`` [I, d]: the same numbers transposed, so a conversion is exact.
"""

from __future__ import annotations

import torch
from torch import nn

from ..experts import ExpertBank, SharedExperts


def fused_to_rows(gate_up: torch.Tensor, down: torch.Tensor) -> dict[str, torch.Tensor]:
    """One expert's fused weights ([2I, d], [d, I]) as bank rows."""
    inter = down.shape[-1]
    return {"w_gate": gate_up[:inter].t(), "w_in": gate_up[inter:].t(), "w_out": down.t()}


def rows_to_fused(rows: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Bank rows of one expert as transformers' (gate_up [2I, d], down [d, I])."""
    return torch.cat([rows["w_gate"].t(), rows["w_in"].t()], 0), rows["w_out"].t()


def mlp_rows(mlp: nn.Module) -> dict[str, torch.Tensor]:
    """A SwiGLU MLP (gate_proj, up_proj, down_proj) as the rows of one expert."""
    return {"w_gate": mlp.gate_proj.weight.t(), "w_in": mlp.up_proj.weight.t(), "w_out": mlp.down_proj.weight.t()}


@torch.no_grad()
def load_bank(bank: ExpertBank, rows_of: dict[int, dict[str, torch.Tensor]]) -> None:
    """Write each expert the bank holds (by id) from ``rows_of[id]``."""
    weights = bank.weights()
    for slot, expert_id in enumerate(bank.expert_ids.tolist()):
        for name, value in rows_of[expert_id].items():
            weights[name][slot].copy_(value)


@torch.no_grad()
def load_shared(shared: SharedExperts, mlp: nn.Module, gate: nn.Module | None = None) -> None:
    """A shared expert MLP (and Qwen2-MoE's ``shared_expert_gate``, Linear(d, 1)) into ``SharedExperts``."""
    for name, value in mlp_rows(mlp).items():
        getattr(shared, name).copy_(value)
    if gate is not None:
        shared.gate.copy_(gate.weight.t())


def bank_rows(bank: ExpertBank) -> dict[int, dict[str, torch.Tensor]]:
    """Every expert this bank holds, by id, as detached rows."""
    weights = bank.weights()
    return {
        expert_id: {name: w[slot].detach() for name, w in weights.items()}
        for slot, expert_id in enumerate(bank.expert_ids.tolist())
    }
