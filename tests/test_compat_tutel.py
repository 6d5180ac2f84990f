"""The Tutel drop-in against the real ``tutel.moe.moe_layer`` (Tutel 0.3, CPU build), in real gloo processes.

Oracle: build Tutel's layer, run forward and backward, take its state dicts (every rank's), load them into
``compat.tutel_moe.moe_layer`` at another expert-parallel size, and compare output, l_aux and the input gradient.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from dynmoe_dist.errors import ConfigError

import dist_pool

tutel = pytest.importorskip(
    "tutel", reason="Tutel is not installed (make venv installs it from ../shared/wheels where that folder exists)"
)

D, F_, TOKENS = 16, 24, 48


def tutel_layer(k: int, local: int, capacity: float, activation, bias: bool = True):
    from tutel import moe as tutel_moe

    layer = tutel_moe.moe_layer(
        gate_type={"type": "top", "k": k, "capacity_factor": capacity},
        model_dim=D,
        experts={"type": "ffn", "count_per_node": local, "hidden_size_per_expert": F_, "activation_fn": activation,
                 "has_fc1_bias": bias, "has_fc2_bias": bias},
        seeds=(1, 2 + dist.get_rank(), 3),
    )  # fmt: skip
    return layer


def ours_layer(k: int, local: int, capacity: float, activation, group=None, bias: bool = True, **kw):
    from dynmoe_dist.compat import tutel_moe

    return tutel_moe.moe_layer(
        gate_type={"type": "top", "k": k, "capacity_factor": capacity},
        model_dim=D,
        experts={"type": "ffn", "count_per_node": local, "hidden_size_per_expert": F_, "activation_fn": activation,
                 "has_fc1_bias": bias, "has_fc2_bias": bias},
        group=group,
        **kw,
    )  # fmt: skip


def run(layer, rank: int):
    x = torch.randn(2, TOKENS // 2, D, generator=torch.Generator().manual_seed(50 + rank)).requires_grad_()
    y = layer(x)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(60 + rank)))
    return y.detach(), float(y.l_aux), x.grad


def case_state_dicts(k: int, world_theirs: int, world_ours: int, act: str, bias: bool) -> dict:
    """Tutel on all ranks (E = 2 per rank); ours on a group of ``world_ours`` ranks holding the same experts."""
    rank, world = dist.get_rank(), dist.get_world_size()
    activation = {"gelu": F.gelu, "relu": F.relu}[act]
    theirs = tutel_layer(k, 2, 0.0, activation, bias)
    with torch.no_grad():  # a trained-looking gate (Tutel's is random per seed; make it shared and sharp)
        theirs.gates[0].wg.weight.copy_(
            torch.randn(theirs.gates[0].wg.weight.shape, generator=torch.Generator().manual_seed(9))
        )
    dicts = [None] * world
    dist.all_gather_object(dicts, theirs.state_dict())
    E = 2 * world_theirs
    group = None
    if world_ours != world:  # one group per rank: each rank holds every expert
        for r in range(world):
            g = dist.new_group([r])
            if r == rank:
                group = g
    ours = ours_layer(k, E // world_ours, 0.0, activation, group=group, bias=bias)
    if world_theirs == 1:
        ours.load_state_dict(dicts[0])
    else:
        ours.load_tutel_state_dicts(dicts)
    a, b = run(theirs, rank), run(ours, rank)
    return {"y": float((a[0] - b[0]).abs().max()), "l_aux": abs(a[1] - b[1]), "grad": float((a[2] - b[2]).abs().max())}


@pytest.mark.parametrize(
    "k,world,world_ours,act,bias",
    [(1, 1, 1, "gelu", True), (2, 1, 1, "relu", False), (2, 2, 2, "gelu", True), (2, 2, 1, "gelu", True)],
)
def test_outputs_equal_tutel_after_import(k, world, world_ours, act, bias):
    for r in dist_pool.pool(world).run(case_state_dicts, k, world, world_ours, act, bias):
        assert r["y"] < 1e-5 and r["grad"] < 1e-5 and r["l_aux"] < 1e-6, r


def test_dynmoe_reference_gate_names_map_to_top_any():
    """gated_multi_gate: Top-Any with scale 1; gated_multi_gate_t: trainable temperature from 10, clamped at 100."""
    from dynmoe_dist.compat import tutel_moe

    experts = {"type": "ffn", "count_per_node": 4, "hidden_size_per_expert": F_, "activation_fn": F.gelu}
    fixed = tutel_moe.moe_layer(gate_type={"type": "gated_multi_gate"}, model_dim=D, experts=dict(experts))
    trained = tutel_moe.moe_layer(gate_type={"type": "gated_multi_gate_t", "k": 2}, model_dim=D, experts=dict(experts))
    assert fixed.moe.router.cfg.kind == trained.moe.router.cfg.kind == "top_any"
    assert fixed.moe.router.scale() == 1.0
    assert float(trained.moe.router.scale().detach()) == pytest.approx(10.0)
    with torch.no_grad():
        trained.moe.router.tau.fill_(10.0)
    assert float(trained.moe.router.scale().detach()) == pytest.approx(100.0)
    y = trained(torch.randn(TOKENS, D))
    assert y.shape == (TOKENS, D) and torch.isfinite(y.l_aux)


def case_router_override() -> dict:
    theirs = tutel_layer(2, 4, 0.0, F.relu)
    ours = ours_layer(2, 4, 0.0, F.relu, router={"kind": "top_p", "p": 0.5})
    ours.load_state_dict(theirs.state_dict())  # Tutel's format, converted on load
    y = ours(torch.randn(TOKENS, D))
    return {
        "gate_equal": bool(torch.equal(ours.moe.router.weight, theirs.gates[0].wg.weight)),
        "expert_equal": bool(torch.equal(ours.moe.experts.w_in[1], theirs.experts.batched_fc1_w[1].t())),
        "kind": ours.moe.router.cfg.kind,
        "finite": bool(torch.isfinite(y).all()),
    }


def test_router_override_keeps_the_trained_gate_weight():
    (r,) = dist_pool.pool(1).run(case_router_override)
    assert r == {"gate_equal": True, "expert_equal": True, "kind": "top_p", "finite": True}


@pytest.mark.parametrize(
    "change,words",
    [
        ({"experts": {"type": "custom"}}, "custom experts"),
        ({"activation_fn": torch.tanh}, "ReLU, GELU"),
        ({"gate_type": {"type": "cosine_top", "k": 2}}, "gated_multi_gate"),
        ({"gate_type": {"type": "top", "k": 2, "proj_dim": 8}}, "only type, k"),
        ({"is_postscore": False}, "after the experts"),
        ({"count_per_node": -2}, "no sharding"),
    ],
)
def test_unsupported_tutel_arguments_are_refused_with_a_reason(change, words):
    from dynmoe_dist.compat import tutel_moe

    experts = {"type": "ffn", "count_per_node": 2, "hidden_size_per_expert": F_, "activation_fn": F.gelu}
    args = {"gate_type": {"type": "top", "k": 2}, "model_dim": D, "experts": experts}
    for key in ("activation_fn", "count_per_node"):
        if key in change:
            experts[key] = change.pop(key)
    args.update(change)
    with pytest.raises(ConfigError, match=words):
        tutel_moe.moe_layer(**args)
