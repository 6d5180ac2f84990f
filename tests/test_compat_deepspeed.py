"""The DeepSpeed-MoE drop-in against the real ``deepspeed.moe.layer.MoE``, in real gloo processes.

Oracle: build DeepSpeed's layer, train-mode forward and backward, take its weights (state dicts of every rank, or a
checkpoint folder written by DeepSpeed's engine with its per-expert files), load them into ``compat.deepspeed_moe.MoE``
at another expert-parallel size, and compare output, l_aux, exp_counts and the input gradient.
"""

from __future__ import annotations

import os
import zlib

import pytest
import torch
import torch.distributed as dist
from torch import nn

from dynmoe_dist.errors import ConfigError

import dist_pool

os.environ.setdefault("DS_ACCELERATOR", "cpu")

D, F_, E, TOKENS = 16, 24, 4, 48


def make_expert(kind: str) -> nn.Module:
    torch.manual_seed(7)
    if kind == "gelu":
        return nn.Sequential(nn.Linear(D, F_), nn.GELU(), nn.Linear(F_, D))
    if kind == "relu_nobias":
        return nn.Sequential(nn.Linear(D, F_, bias=False), nn.ReLU(), nn.Linear(F_, D, bias=False))
    if kind == "swiglu":
        return GatedMLP()
    raise ValueError(kind)


class GatedMLP(nn.Module):
    """LLaMA-style expert: w2(silu(w1 x) * w3 x)."""

    def __init__(self) -> None:
        super().__init__()
        self.w1, self.w2, self.w3 = (
            nn.Linear(D, F_, bias=False),
            nn.Linear(F_, D, bias=False),
            nn.Linear(D, F_, bias=False),
        )

    def forward(self, x):
        return self.w2(nn.functional.silu(self.w1(x)) * self.w3(x))


def deepspeed_layer(kind: str, k: int, ep: int, residual: bool = False, engine: bool = False):
    from deepspeed.moe.layer import MoE as DeepSpeedMoE

    from benchmarks.deepspeed_peer import init_deepspeed_groups

    init_deepspeed_groups(ep)
    layer = DeepSpeedMoE(
        D, make_expert(kind), num_experts=E, ep_size=ep, k=k, drop_tokens=False, use_rts=False,
        top2_2nd_expert_sampling=False, use_residual=residual,
    )  # fmt: skip
    if not engine:  # DeepSpeed's engine makes this call itself, and only once is allowed
        layer.set_deepspeed_parallelism()
    with torch.no_grad():  # experts differ from each other (DeepSpeed starts them as copies) and from the default init
        rank = dist.get_rank() % ep  # expert-parallel rank: its local experts are global ones of its own
        for name, p in layer.named_parameters():
            local = "deepspeed_experts." in name
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()) % 1000 + (100 * (1 + rank) if local else 0))
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return layer


def ours_layer(kind: str, k: int, ep: int, residual: bool = False, **kw):
    from dynmoe_dist.compat.deepspeed_moe import MoE

    return MoE(
        D, make_expert(kind), num_experts=E, ep_size=ep, k=k, drop_tokens=False, top2_2nd_expert_sampling=False,
        use_residual=residual, seed=3, **kw,
    )  # fmt: skip


def run(layer, rank: int):
    x = torch.randn(2, TOKENS // 2, D, generator=torch.Generator().manual_seed(50 + rank)).requires_grad_()
    y, l_aux, counts = layer(x)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(60 + rank)))
    return y.detach(), float(l_aux), counts.tolist(), x.grad


def compare(a, b) -> dict:
    return {
        "y": float((a[0] - b[0]).abs().max()),
        "l_aux": abs(a[1] - b[1]),
        "counts_equal": a[2] == b[2],
        "grad": float((a[3] - b[3]).abs().max()),
    }


def case_state_dicts(kind: str, k: int, ep_theirs: int, ep_ours: int, residual: bool) -> dict:
    rank = dist.get_rank()
    theirs = deepspeed_layer(kind, k, ep_theirs, residual)
    dicts = [None] * dist.get_world_size()
    dist.all_gather_object(dicts, theirs.state_dict())
    ours = ours_layer(kind, k, ep_ours, residual)
    if ep_theirs == 1:
        ours.load_state_dict(dicts[0])  # a dict holding every expert: the plain torch way
    else:
        ours.load_deepspeed_state_dicts(dicts[:ep_theirs])  # one expert-parallel group's dicts, rank order
    return compare(run(theirs, rank), run(ours, rank))


@pytest.mark.parametrize(
    "kind,k,world,ep_theirs,ep_ours,residual",
    [
        ("gelu", 1, 1, 1, 1, False),
        ("gelu", 2, 1, 1, 1, True),
        ("swiglu", 2, 1, 1, 1, False),
        ("relu_nobias", 3, 1, 1, 1, False),
        ("gelu", 2, 2, 2, 2, False),
        ("gelu", 2, 2, 2, 1, False),
        ("gelu", 1, 2, 1, 2, False),
    ],
)
def test_outputs_equal_deepspeed_after_import(kind, k, world, ep_theirs, ep_ours, residual):
    for r in dist_pool.pool(world).run(case_state_dicts, kind, k, ep_theirs, ep_ours, residual):
        assert r["counts_equal"], r
        assert r["y"] < 1e-5 and r["grad"] < 1e-5 and r["l_aux"] < 1e-6, r


class Net(nn.Module):
    def __init__(self, moe: nn.Module) -> None:
        super().__init__()
        self.inp, self.moe, self.out = nn.Linear(D, D), moe, nn.Linear(D, D)

    def forward(self, x):
        y, l_aux, _ = self.moe(self.inp(x))
        return self.out(y), l_aux


def case_checkpoint_folder(folder: str, ep_ours: int) -> float:
    import deepspeed
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    from dynmoe_dist.compat import load_deepspeed_checkpoint

    rank = dist.get_rank()
    os.environ["LOCAL_RANK"] = str(rank)  # what a launcher would set; DeepSpeed's engine insists
    torch.manual_seed(0)
    theirs = Net(deepspeed_layer("gelu", 2, 2, engine=True))
    groups = split_params_into_different_moe_groups_for_optimizer({"params": list(theirs.parameters()), "name": "p"})
    engine, *_ = deepspeed.initialize(
        model=theirs,
        optimizer=torch.optim.SGD(groups, lr=0.1),
        config={"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 0}},
    )
    x = torch.randn(8, D, generator=torch.Generator().manual_seed(rank))
    y, l_aux = engine(x)
    engine.backward(y.square().mean() + l_aux)
    engine.step()  # the saved weights are trained ones, not the initial ones
    engine.save_checkpoint(folder, tag="step1")
    dist.barrier()
    with torch.no_grad():
        want, _ = theirs(x)
    torch.manual_seed(1)  # our model starts elsewhere: everything must come from the checkpoint
    ours = Net(ours_layer("gelu", 2, ep_ours))
    load_deepspeed_checkpoint(ours, folder)
    with torch.no_grad():
        got, _ = ours(x)
    return float((want - got).abs().max())


@pytest.mark.parametrize("ep_ours", [1, 2])
def test_deepspeed_checkpoint_folder_with_per_expert_files(tmp_path, ep_ours):
    diffs = dist_pool.pool(2).run(case_checkpoint_folder, str(tmp_path / "ckpt"), ep_ours)
    assert (tmp_path / "ckpt" / "step1" / "layer_0_expert_3_mp_rank_00_model_states.pt").exists()
    assert max(diffs) < 1e-5, diffs


def case_router_override() -> dict:
    theirs = deepspeed_layer("gelu", 2, 1)
    ours = ours_layer("gelu", 2, 1, router={"kind": "top_any", "trainable_temperature": True})
    ours.load_state_dict(theirs.state_dict())
    y, l_aux, counts = ours(torch.randn(TOKENS, D))
    return {
        "gate_equal": bool(torch.equal(ours.moe.router.weight, theirs.deepspeed_moe.gate.wg.weight)),
        "finite": bool(torch.isfinite(y).all()) and bool(torch.isfinite(l_aux)),
        "gate_kind": ours.moe.router.cfg.kind,
    }


def test_router_override_keeps_the_trained_gate_weight():
    (r,) = dist_pool.pool(1).run(case_router_override)
    assert r["gate_equal"] and r["finite"] and r["gate_kind"] == "top_any", r


def case_one_rank_of_two_is_refused() -> str:
    theirs = deepspeed_layer("gelu", 2, 2)
    dicts = [None] * 2
    dist.all_gather_object(dicts, theirs.state_dict())
    ours = ours_layer("gelu", 2, 1)
    try:
        ours.load_state_dict(dicts[0])
    except ConfigError as e:
        return str(e)
    return "loaded"


def test_a_single_rank_dict_of_a_sharded_layer_names_the_fix():
    for message in dist_pool.pool(2).run(case_one_rank_of_two_is_refused):
        assert "every rank's dict in rank order" in message, message


class Odd(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(D, D)

    def forward(self, x):
        return self.fc(x).tanh()


class LiesAboutItsForward(GatedMLP):
    def forward(self, x):
        return self.w2(torch.relu(self.w1(x)) * self.w3(x))


@pytest.mark.parametrize(
    "expert,words",
    [
        (Odd(), "gated MLP"),
        (nn.Sequential(nn.Linear(D, F_), nn.Tanh(), nn.Linear(F_, D)), "Tanh"),
        (nn.Sequential(nn.Linear(D, F_), nn.GELU(), nn.Dropout(0.1), nn.Linear(F_, D)), "dropout"),
        (LiesAboutItsForward(), "forward differs"),
    ],
)
def test_unsupported_experts_are_refused_with_the_accepted_forms(expert, words):
    from dynmoe_dist.compat.deepspeed_moe import MoE

    with pytest.raises(ConfigError, match=words):
        MoE(D, expert, num_experts=E, k=2)


def test_unsupported_arguments_are_refused_with_a_reason():
    from dynmoe_dist.compat.deepspeed_moe import MoE

    with pytest.raises(ConfigError, match="tensor parallelism"):
        MoE(D, make_expert("gelu"), num_experts=E, enable_expert_tensor_parallelism=True)
    with pytest.raises(ConfigError, match="Jitter"):
        MoE(D, make_expert("gelu"), num_experts=E, noisy_gate_policy="Gaussian")
    with pytest.raises(ConfigError, match="multiple of"):
        MoE(D, make_expert("gelu"), num_experts=3, ep_size=2)


def test_capacity_drops_follow_deepspeed_capacity_and_eval_factor():
    """drop_tokens=True: training keeps max(ceil(cf * k * S / E), min_capacity) per expert, eval uses its factor."""
    from dynmoe_dist.compat.deepspeed_moe import MoE

    moe = MoE(D, make_expert("gelu"), num_experts=E, k=1, capacity_factor=0.5, eval_capacity_factor=4.0, seed=1)
    x = torch.randn(TOKENS, D, generator=torch.Generator().manual_seed(0))
    _, _, counts = moe(x)
    cap = max(-(-TOKENS * 0.5 // E), 4)
    assert moe.last_aux.stats.dropped == int((counts - cap).clamp(min=0).sum()) > 0
    moe.eval()
    moe(x)
    assert moe.last_aux.stats.dropped == 0
