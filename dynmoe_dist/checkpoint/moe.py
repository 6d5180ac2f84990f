"""The MoE side of a checkpoint, keyed by stable expert id, and its installation on any placement.

    moe/<layer>/router/<name>        gate rows in router-position order ([E, ...]; positions name ids in the manifest)
    moe/<layer>/router/<name>@exp_avg, @exp_avg_sq, @step   MoEAdam state (per-row step for row-wise parameters)
    moe/<layer>/buffer/<name>        persistent router buffers (the ReLU gate's L1 coefficient)
    moe/<layer>/expert/<id>/<w>      one expert's weight (w_in, w_out, w_gate), with @exp_avg, @exp_avg_sq, @step

Gate rows are replicated, so rank 0 writes them once; each expert is written by its owner in the first
expert-data-parallel replica only. Loading installs the saved expert set into a layer built for any world: new
parameters of the right size (``MoEAdam.install_rows``, the same path an adaptation commit takes) and a placement
table, the saved one when the expert-parallel size is unchanged, otherwise contiguous blocks for the new size.
"""

from __future__ import annotations

import torch

from ..layer import MoELayer
from ..optim import MoEAdam
from ..placement import PlacementTable
from .manifest import LayerRecord

STATE = ("exp_avg", "exp_avg_sq", "step")


def record(layer: MoELayer) -> LayerRecord:
    table = layer.placement
    return LayerRecord(
        expert_ids=list(table.expert_ids),
        owners=list(table.owners),
        slots=list(table.slots),
        ep_size=table.ep_size,
        version=table.version,
        next_expert_id=int(layer.next_expert_id),
        d_model=layer.d_model,
        d_ff=layer.experts.d_ff,
        activation=layer.experts.activation,
        gate=layer.router.cfg.kind,
        expert_bias=layer.experts.bias,
    )


def other_router_parameters(layer: MoELayer) -> dict[str, torch.nn.Parameter]:
    rows = {id(p) for p in layer.router.row_parameters().values()}
    return {n: p for n, p in layer.router.named_parameters() if id(p) not in rows}


def router_buffers(layer: MoELayer) -> dict[str, torch.Tensor]:
    """Persistent buffers of the gate except its expert ids (the manifest holds those)."""
    keep = set(layer.router.state_dict()) - {"expert_ids"}
    return {n: b for n, b in layer.router.named_buffers() if n in keep}


def replicated_tensors(layer: MoELayer, opt: MoEAdam) -> dict[str, torch.Tensor]:
    """Gate rows, other gate parameters and buffers, with their optimizer state."""
    out = {}
    prefix = f"moe/{layer.name}"
    rows = torch.arange(layer.num_experts, device=layer.router.expert_ids.device)
    for name, p in layer.router.row_parameters().items():
        out[f"{prefix}/router/{name}"] = p.detach().cpu()
        for key, value in opt.rows_of(p, rows).items():
            out[f"{prefix}/router/{name}@{key}"] = value.cpu()
    for name, p in other_router_parameters(layer).items():
        out[f"{prefix}/router/{name}"] = p.detach().cpu()
        for key, value in opt.state_for(p, False).items():
            out[f"{prefix}/router/{name}@{key}"] = value.cpu()
    for name, b in router_buffers(layer).items():
        out[f"{prefix}/buffer/{name}"] = b.detach().cpu()
    return out


def expert_tensors(layer: MoELayer, opt: MoEAdam) -> dict[str, torch.Tensor]:
    """This rank's experts, each under its id, with their optimizer state."""
    out = {}
    for name, w in layer.experts.weights().items():
        state = opt.state_for(w, True)
        for slot, expert_id in enumerate(layer.experts.expert_ids.tolist()):
            key = f"moe/{layer.name}/expert/{expert_id}/{name}"
            out[key] = w.detach()[slot].cpu()
            for k in STATE:
                out[f"{key}@{k}"] = state[k][slot].cpu()
    return out


def placement_for(rec: LayerRecord, ep_size: int) -> PlacementTable:
    """The saved placement when the expert-parallel size is unchanged; contiguous blocks for another size."""
    if rec.ep_size == ep_size:
        return PlacementTable(tuple(rec.expert_ids), tuple(rec.owners), tuple(rec.slots), ep_size, rec.version)
    return PlacementTable.contiguous(rec.expert_ids, ep_size, version=rec.version + 1)


@torch.no_grad()
def install(layer: MoELayer, opt: MoEAdam, rec: LayerRecord, tensors: dict[str, torch.Tensor]) -> PlacementTable:
    """Give ``layer`` the saved expert set: gate rows, this rank's experts (from ``tensors``) and a placement."""
    ep_size = layer.groups.ep_size if layer.groups is not None else 1
    ep_rank = layer.groups.ep_rank if layer.groups is not None else 0
    table = placement_for(rec, ep_size)
    prefix = f"moe/{layer.name}"
    device = layer.router.expert_ids.device
    for name, p in layer.router.row_parameters().items():
        key = f"{prefix}/router/{name}"
        state = {k: tensors[f"{key}@{k}"].to(device) for k in STATE}
        opt.install_rows(layer.router, name, tensors[key].to(device, p.dtype), state)
    for name, p in other_router_parameters(layer).items():
        key = f"{prefix}/router/{name}"
        p.copy_(tensors[key].to(device, p.dtype))
        opt.state[p] = {k: tensors[f"{key}@{k}"].to(device).clone() for k in STATE}
    for name, b in router_buffers(layer).items():
        b.copy_(tensors[f"{prefix}/buffer/{name}"].to(b.device, b.dtype))
    mine = table.experts_on(ep_rank)
    for name, w in layer.experts.weights().items():
        keys = [f"{prefix}/expert/{i}/{name}" for i in mine]
        data = _stacked(tensors, keys, "", w.dtype, tuple(w.shape[1:]), device)
        state = {
            "exp_avg": _stacked(tensors, keys, "@exp_avg", w.dtype, tuple(w.shape[1:]), device),
            "exp_avg_sq": _stacked(tensors, keys, "@exp_avg_sq", w.dtype, tuple(w.shape[1:]), device),
            "step": _stacked(tensors, keys, "@step", torch.int64, (), device),
        }
        opt.install_rows(layer.experts, name, data, state)
    layer.install(table, rec.next_expert_id)
    return table


def _stacked(tensors, keys: list[str], suffix: str, dtype, row_shape: tuple, device) -> torch.Tensor:
    """Rows ``key + suffix`` stacked in ``keys`` order (an empty [0, ...] tensor for a rank with no expert)."""
    if not keys:
        return torch.zeros((0, *row_shape), dtype=dtype, device=device)
    return torch.stack([tensors[k + suffix] for k in keys]).to(device, dtype)
