"""N optimizer steps at world 2, 3 and 4 give the parameters of single-process training on the concatenated batches.

Uneven token counts per rank (one rank holds none in some steps), two MoE layers, dense layers around them, Adam.
The distributed loss on each rank is its share of the global loss (local sum / global token count), gradients are
summed (dense and gate over the world, experts over their expert-data-parallel group): the result must equal the
single-process gradient of the mean loss, step after step.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from dynmoe_dist import MoELayer
from dynmoe_dist.parallel import global_count, sync_gradients

import dist_pool

D, D_FF, E, STEPS = 10, 16, 5, 4
GATES = {
    # batch-statistics losses (balance) are per rank by design; switch them off so the oracle is exact
    "top_any": {"kind": "top_any", "balance_weight": 0.0},
    "top_k": {"kind": "top_k", "k": 2, "balance_weight": 0.0},
    "relu": {"kind": "relu", "l1_init": 1e-3},
}


class TinyModel(nn.Module):
    def __init__(self, gate: dict, groups=None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(D, D)
        self.moe1 = MoELayer(D, D_FF, E, gate, groups=groups, seed=11)
        self.mid = nn.Linear(D, D)
        self.moe2 = MoELayer(D, D_FF, E, gate, activation="swiglu", groups=groups, seed=12)
        self.head = nn.Linear(D, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.inp(x)
        y, a1 = self.moe1(h)
        h = torch.tanh(self.mid(h + y))
        y, a2 = self.moe2(h)
        return self.head(h + y).squeeze(-1), a1.loss + a2.loss

    def moe_layers(self) -> list[MoELayer]:
        return [self.moe1, self.moe2]


def batches(world: int, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(100 + step)
    sizes = [(7 * r + 3 * step + 5) % 13 for r in range(world)]  # uneven, sometimes 0
    out = []
    for n in sizes:
        x = torch.randn(n, D, generator=g, dtype=torch.float64)
        out.append((x, torch.randn(n, generator=g, dtype=torch.float64)))
    return out


def params_by_name(model: TinyModel) -> dict[str, torch.Tensor]:
    """Dense and gate parameters by name, expert weights by (layer, weight name, expert id)."""
    out = {}
    moe_prefixes = ("moe1.experts.", "moe2.experts.")
    for name, p in model.named_parameters():
        if not name.startswith(moe_prefixes):
            out[name] = p.detach().clone()
    for lname, layer in (("moe1", model.moe1), ("moe2", model.moe2)):
        for wname, w in layer.experts.weights().items():
            for slot, eid in enumerate(layer.experts.expert_ids.tolist()):
                out[f"{lname}.{wname}[{eid}]"] = w.detach()[slot].clone()
    return out


def train(model: TinyModel, world: int, rank: int | None, groups=None) -> dict[str, torch.Tensor]:
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(STEPS):
        data = batches(world, step)
        if rank is None:  # single process: the concatenated batch, mean loss
            x = torch.cat([d[0] for d in data])
            t = torch.cat([d[1] for d in data])
            pred, aux = model(x)
            loss = ((pred - t) ** 2).sum() / max(len(t), 1) + aux
        else:
            x, t = data[rank]
            total = global_count(len(t), groups)
            pred, aux = model(x)
            loss = ((pred - t) ** 2).sum() / max(total, 1) + aux * (len(t) / max(total, 1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if rank is not None:
            sync_gradients(model, groups, average=False)
        opt.step()
        for layer in model.moe_layers():
            layer.on_optimizer_step()
    return params_by_name(model)


def case_training(gate: str, ep_size: int) -> dict[str, float]:
    world, rank = dist.get_world_size(), dist.get_rank()
    groups = dist_pool.groups(ep_size)
    ref = train(TinyModel(GATES[gate]).double(), world, None)
    par = train(TinyModel(GATES[gate], groups).double(), world, rank, groups)
    diffs = {name: float((p - ref[name]).abs().max()) for name, p in par.items()}
    diffs["moved_from_init"] = float(
        (params_by_name(TinyModel(GATES[gate]).double())["inp.weight"] - par["inp.weight"]).abs().max()
    )
    return diffs


@pytest.mark.parametrize(("world", "ep_size"), [(2, 2), (3, 3), (4, 2), (2, 1)])
@pytest.mark.parametrize("gate", list(GATES))
def test_training_equals_single_process(world: int, ep_size: int, gate: str) -> None:
    results = dist_pool.pool(world).run(case_training, gate, ep_size)
    seen = set()
    for diffs in results:
        assert diffs.pop("moved_from_init") > 1e-3  # training really changed the parameters
        bad = {k: v for k, v in diffs.items() if v > 1e-9}
        assert not bad, bad
        seen.update(k for k in diffs if "[" in k)
    # every expert weight of both layers was compared on some rank
    weights = {"moe1": ("w_in", "w_out"), "moe2": ("w_in", "w_gate", "w_out")}
    assert seen == {f"{layer}.{w}[{i}]" for layer, ws in weights.items() for w in ws for i in range(E)}
