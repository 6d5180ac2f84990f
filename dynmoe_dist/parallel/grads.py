"""Gradient synchronisation for a model with MoE layers.

Three kinds of parameters, three reductions:
- dense (everything outside MoE layers) and gate (router) parameters: replicated, reduced over the whole world;
- expert parameters: each expert's owner already holds the gradient from every token of its expert-parallel group
  (the backward all-to-all brought it), so it is reduced only over its expert-data-parallel replicas.
Every reduction uses the same scale, so the result is the gradient of one global loss:
- ``average=True``: each rank's loss is the mean over its own tokens and the world's gradients are averaged (1/W),
  right when every rank holds the same number of tokens;
- ``average=False``: each rank's loss is already its share of the global loss (local sum / global token count, see
  ``global_count``): right with uneven token counts.
Parameters without a gradient contribute zeros, so every rank enters the same collectives.
"""

from __future__ import annotations

import torch
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from .collectives import all_reduce, guarded
from .groups import ParallelGroups


def moe_parameter_kinds(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """{'dense': [...], 'gate': [...], 'expert': [...]}, each parameter once, in module order.

    A module that owns MoE parameters says which through ``moe_parameter_groups() -> (gate, expert)`` (MoELayer
    does); asking the module keeps this package below the layer, which needs parallel/ for its collectives.
    """
    gate, expert = set(), set()
    for m in model.modules():
        groups = getattr(m, "moe_parameter_groups", None)
        if callable(groups):
            gates, experts = groups()
            gate.update(id(p) for p in gates)
            expert.update(id(p) for p in experts)
    kinds: dict[str, list[nn.Parameter]] = {"dense": [], "gate": [], "expert": []}
    for p in model.parameters():
        if p.requires_grad:
            kinds["gate" if id(p) in gate else "expert" if id(p) in expert else "dense"].append(p)
    return kinds


def reduce_grads(params: list[nn.Parameter], group, scale: float, name: str) -> None:
    """Scale and sum-reduce the gradients of ``params`` over ``group`` as one flat buffer."""
    if not params:
        return
    if group is None:  # nothing to exchange (no replicas): scale in place, no flat copy
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            elif scale != 1.0:
                p.grad.mul_(scale)
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = _flatten_dense_tensors(grads)
    if scale != 1.0:
        flat.mul_(scale)
    all_reduce(flat, group, name)
    for p, g in zip(params, _unflatten_dense_tensors(flat, grads)):
        if p.grad is None:
            p.grad = g
        else:
            p.grad.copy_(g)


def sync_gradients(model: nn.Module, groups: ParallelGroups, average: bool = True, dense: bool = True) -> None:
    """Reduce every gradient once, with one scale. ``dense=False`` leaves the dense parameters to an engine that
    reduces them itself (DeepSpeed), and syncs only the gate and expert gradients."""
    kinds = moe_parameter_kinds(model)
    scale = 1.0 / groups.world_size if average else 1.0
    replicated = kinds["dense"] + kinds["gate"] if dense else kinds["gate"]
    reduce_grads(replicated, groups.world_group, scale, "grads.dense+gate" if dense else "grads.gate")
    reduce_grads(kinds["expert"], groups.edp_group, scale, "grads.expert")


def global_count(local: int, groups: ParallelGroups, device: torch.device | str = "cpu") -> int:
    """Sum of ``local`` over the world (e.g. tokens), for losses normalised by the global count.

    ``device``: where the collective runs (NCCL needs a CUDA tensor).
    """
    t = torch.tensor([local], dtype=torch.int64, device=device)
    if groups.world_group is not None:
        all_reduce(t, groups.world_group, "global_count")
    return int(t.item())


@torch.no_grad()
def broadcast_dense(model: nn.Module, groups: ParallelGroups, src: int = 0) -> None:
    """Copy rank ``src``'s dense and gate parameters to every rank (for models not built from a shared seed)."""
    if groups.world_group is None:
        return
    kinds = moe_parameter_kinds(model)
    params = kinds["dense"] + kinds["gate"]
    if not params:
        return
    flat = _flatten_dense_tensors([p.data for p in params])
    guarded("broadcast.dense", lambda: torch.distributed.broadcast(flat, src, group=groups.world_group))
    for p, v in zip(params, _unflatten_dense_tensors(flat, [p.data for p in params])):
        p.copy_(v)
