"""Shared experts (DeepSeekMoE): always-on FFNs added to the routed output.

Oracles: a per-token reference that runs each shared expert on its own (its own columns of the wide FFN), at one
process and on 2 and 3 real ranks (both dispatcher modes); the parameters are dense (the dense engine owns them, MoEAdam
and adaptation never see them), and an adaptation event leaves them as they were.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from dynmoe_dist import ConfigError, MoELayer
from dynmoe_dist.adapt import AdaptConfig, AdaptController
from dynmoe_dist.optim import MoEAdam
from dynmoe_dist.parallel.grads import moe_parameter_kinds, sync_gradients
from dynmoe_dist.train.engines.dense_view import DenseView

import dist_pool

D, FF, E = 12, 20, 6
ACTS = {"gelu": F.gelu, "silu": F.silu, "swiglu": F.silu, "geglu": F.gelu, "relu": F.relu}


def shared_reference(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    """sum_i FFN_i(x_t), token by token, each shared expert on its own hidden columns."""
    s = layer.shared
    act = ACTS[s.activation]
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for i in range(s.num):
            c = s.columns(i)
            h = x[t] @ s.w_in[:, c] + (s.b_in[c] if s.b_in is not None else 0)
            if s.w_gate is not None:
                h = act(x[t] @ s.w_gate[:, c] + (s.b_gate[c] if s.b_gate is not None else 0)) * h
            else:
                h = act(h)
            out[t] += h @ s.w_out[c]
        if s.b_out is not None:
            out[t] += s.b_out
    return out


def routed_only(layer: MoELayer) -> MoELayer:
    """The same layer without its shared experts (same seed: same gate, same routed experts)."""
    twin = MoELayer(D, FF, E, layer.router.cfg, layer.experts.activation, layer.experts.bias, seed=layer.seed).double()
    twin.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith("shared.")})
    return twin


@pytest.mark.parametrize(
    "activation, num_shared, shared_d_ff, bias",
    [("gelu", 1, None, False), ("swiglu", 2, 8, False), ("geglu", 2, None, True), ("relu", 3, 5, True)],
)
def test_shared_experts_match_a_per_token_reference(activation, num_shared, shared_d_ff, bias, rng):
    layer = MoELayer(
        D, FF, E, "top_any", activation, bias, num_shared_experts=num_shared, shared_d_ff=shared_d_ff, seed=3
    ).double()
    with torch.no_grad():  # biases start at zero: make them count
        for p in layer.shared.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    assert layer.shared.w_in.shape == (D, num_shared * (shared_d_ff or FF))
    x = rng(4, 2, 9, D).requires_grad_()
    y, _ = layer(x)
    y_routed, _ = routed_only(layer)(x)
    want = y_routed + shared_reference(layer, x.reshape(-1, D)).view_as(x)
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-12)

    # gradients of the shared weights and of the input against autograd through the reference
    g = rng(5, *y.shape)
    grads = torch.autograd.grad((y * g).sum(), [x, *layer.shared.parameters()])
    grads_ref = torch.autograd.grad((want * g).sum(), [x, *layer.shared.parameters()])
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_shared_experts_start_from_their_seed_and_differ_from_each_other():
    a = MoELayer(D, FF, E, "top_any", num_shared_experts=2, seed=11)
    b = MoELayer(D, FF, E + 3, "top_k", num_shared_experts=2, seed=11)  # other routed experts, same shared ones
    assert torch.equal(a.shared.w_in, b.shared.w_in) and torch.equal(a.shared.w_out, b.shared.w_out)
    s = a.shared
    assert not torch.equal(s.w_in[:, s.columns(0)], s.w_in[:, s.columns(1)])
    # initialised as a routed expert of the same size is: the same scale
    assert s.w_in.std().item() == pytest.approx(a.experts.w_in.std().item(), rel=0.15)
    assert s.w_out.std().item() == pytest.approx(a.experts.w_out.std().item(), rel=0.15)


@pytest.mark.parametrize("bad", [-1, 1.5, "2"])
def test_bad_shared_expert_count_is_refused(bad):
    with pytest.raises(ConfigError, match="num_shared_experts"):
        MoELayer(D, FF, E, num_shared_experts=bad)


def test_shared_experts_are_dense_parameters():
    layer = MoELayer(D, FF, E, "top_any", num_shared_experts=2, seed=1)
    shared = {id(p) for p in layer.shared.parameters()}
    kinds = moe_parameter_kinds(layer)
    assert shared == {id(p) for p in kinds["dense"]}
    assert not shared & {id(p) for p in layer.moe_parameters()}
    assert not shared & {id(p) for g in MoEAdam.for_moe(layer).param_groups for p in g["params"]}
    # DeepSpeed is handed the shared experts (and nothing else of the layer)
    assert {id(p) for p in DenseView(layer).parameters()} == shared


# ----------------------------------------------------------------------------------------------------------------------
# real ranks

TOKENS = [9, 0, 23]  # uneven, and rank 1 holds none


def case_distributed_equals_single_process(activation: str) -> list[str]:
    world, rank = dist.get_world_size(), dist.get_rank()
    groups = dist_pool.groups(world)
    problems = []
    for overlap_min_rows in (0, 10**9):  # overlapped and merged dispatcher modes
        kw = {"num_shared_experts": 2, "shared_d_ff": 8, "seed": 21}
        ref = MoELayer(D, FF, 5, {"kind": "top_k", "k": 2}, activation, **kw).double()
        par = MoELayer(D, FF, 5, {"kind": "top_k", "k": 2}, activation, groups=groups, **kw).double()
        par.dispatcher.overlap_min_rows = overlap_min_rows
        g = torch.Generator().manual_seed(5)
        xs = [torch.randn(TOKENS[r], D, generator=g, dtype=torch.float64) for r in range(world)]
        gys = [torch.randn(TOKENS[r], D, generator=g, dtype=torch.float64) for r in range(world)]
        x_all = torch.cat(xs).requires_grad_()
        y_ref, _ = ref(x_all)
        (y_ref * torch.cat(gys)).sum().backward()
        x = xs[rank].clone().requires_grad_()
        y, _ = par(x)
        (y * gys[rank]).sum().backward()
        lo, hi = sum(TOKENS[:rank]), sum(TOKENS[: rank + 1])
        where = f"{activation}/overlap_min_rows={overlap_min_rows}"
        if not torch.allclose(y, y_ref[lo:hi], atol=1e-10):
            problems.append(f"{where}: output differs")
        if not torch.allclose(x.grad, x_all.grad[lo:hi], atol=1e-10):
            problems.append(f"{where}: input grad differs")
        sync_gradients(par, groups, average=False)  # dense: summed over the world, like the gate
        for name, p in par.shared.named_parameters():
            if not torch.allclose(p.grad, dict(ref.shared.named_parameters())[name].grad, atol=1e-9):
                problems.append(f"{where}: shared grad {name} differs after the world's sync")
    return problems


@pytest.mark.parametrize("world", [2, 3])
def test_distributed_shared_experts_equal_single_process(world):
    for activation in ("gelu", "swiglu"):
        assert dist_pool.pool(world).run(case_distributed_equals_single_process, activation) == [[]] * world


def case_adaptation_leaves_shared_experts_alone() -> dict:
    world = dist.get_world_size()
    groups = dist_pool.groups(world)
    # the reference's k = 0 rule: with the default top-1 rule, the idle experts would get the unrouted tokens
    router = {"kind": "top_any", "unrouted": "drop"}
    layer = MoELayer(D, FF, 4, router, groups=groups, num_shared_experts=1, seed=8).double()
    with torch.no_grad():
        layer.router.threshold.copy_(torch.tensor([0.1, 50.0, 0.2, 50.0], dtype=torch.float64))  # 1 and 3 idle
    moe_opt = MoEAdam.for_moe(layer, lr=1e-3)
    ctrl = AdaptController(layer, moe_opt, groups, AdaptConfig(record_steps=2, idle_steps=1))
    objects = [id(p) for p in layer.shared.parameters()]
    events, unchanged = [], []
    for step in range(4):
        x = torch.randn(
            16, D, generator=torch.Generator().manual_seed(step * 10 + dist.get_rank()), dtype=torch.float64
        )
        y, aux = layer(x)
        ((y**2).sum() + aux.loss).backward()
        sync_gradients(layer, groups)
        moe_opt.step()
        moe_opt.zero_grad()
        with torch.no_grad():
            for p in layer.shared.parameters():
                p.sub_(1e-3 * p.grad)
                p.grad = None
        before = [p.detach().clone() for p in layer.shared.parameters()]
        committed = [e for e in ctrl.step() if e.committed]
        events += [(e.added, e.removed) for e in committed]
        if committed:
            unchanged.append(all(torch.equal(p, b) for p, b in zip(layer.shared.parameters(), before)))
    return {
        "events": events,
        "unchanged": unchanged,
        "same_objects": objects == [id(p) for p in layer.shared.parameters()],
        "experts": layer.num_experts,
    }


def test_adaptation_never_touches_shared_experts():
    for result in dist_pool.pool(2).run(case_adaptation_leaves_shared_experts_alone):
        assert result["events"] and any(removed for _, removed in result["events"]), result
        assert result["unchanged"] and all(result["unchanged"]) and result["same_objects"]


def case_shared_experts_run_while_rows_travel(overlap_min_rows: int) -> list[str]:
    """The order of events on this rank: exchanges started and waited for (the real ones, logged), shared experts."""
    groups = dist_pool.groups(dist.get_world_size())
    layer = MoELayer(D, FF, 4, {"kind": "top_k", "k": 2}, groups=groups, num_shared_experts=1, seed=2)
    layer.dispatcher.overlap_min_rows = overlap_min_rows
    log: list[str] = []
    layer.shared.register_forward_hook(lambda *_: log.append("shared forward"))
    layer.shared.w_in.register_post_accumulate_grad_hook(lambda _: log.append("shared backward"))
    with dist_pool.logged_exchanges(log):
        y, _ = layer(torch.randn(32, D, generator=torch.Generator().manual_seed(dist.get_rank())))
        y.square().sum().backward()
    return log


@pytest.mark.parametrize("overlap_min_rows", [0, 10**9])
def test_shared_experts_run_while_the_rows_travel(overlap_min_rows):
    """Forward: between the start of the dispatch exchange and its wait. Backward: between the start of the exchange
    of the dispatched rows' gradients and its wait."""
    for log in dist_pool.pool(2).run(case_shared_experts_run_while_rows_travel, overlap_min_rows):
        at = {event: i for i, event in enumerate(log)}
        rows = "moe.dispatch.rows"
        assert at[f"start {rows}"] < at["shared forward"] < at[f"wait {rows}"], log
        assert at[f"start {rows}.backward"] < at["shared backward"] < at[f"wait {rows}.backward"], log
