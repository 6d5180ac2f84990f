"""MoELayer against a naive loop over experts: outputs and every gradient, all gates, both activations, capacity."""

from __future__ import annotations

import math

import pytest
import torch

from dynmoe_dist import MoELayer

D, FF, E = 8, 12, 5
GATE_SPECS = {
    "top_any": {"kind": "top_any"},
    "top_any_reference": {"kind": "top_any", "unrouted": "drop", "efficiency_free": 0, "route_weight": 0.0},
    "top_k": {"kind": "top_k", "k": 2},
    "top_p": {"kind": "top_p", "p": 0.5, "entropy_weight": 0.1},
    "importance_k": {"kind": "importance_k", "k_max": 3},
    "relu": {"kind": "relu", "l1_init": 0.05},
    "null": {"kind": "null", "k": 2, "num_null": 2},
}


def make_layer(spec, seed: int, activation: str = "gelu", capacity_factor=None) -> MoELayer:
    torch.manual_seed(seed)
    layer = MoELayer(D, FF, E, router=spec, activation=activation, capacity_factor=capacity_factor).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        router = layer.router
        if spec["kind"] == "top_any":
            router.threshold.copy_(torch.rand(E, generator=g, dtype=torch.float64) * 0.6 - 0.1)
        else:
            scale = 0.3 if spec["kind"] == "top_p" else 0.7
            router.weight.copy_(torch.randn(router.weight.shape, generator=g, dtype=torch.float64) * scale)
        if spec["kind"] == "null":
            router.null_weight.copy_(torch.randn(router.null_weight.shape, generator=g, dtype=torch.float64) * 0.7)
    return layer.train()


def side_input(spec, x: torch.Tensor, seed: int):
    """importance-k: attention probabilities for [batch, seq, d] input, a per-token vector for [tokens, d]."""
    if spec["kind"] != "importance_k":
        return None
    g = torch.Generator().manual_seed(seed + 77)
    if x.dim() == 3:
        b, s = x.shape[:2]
        return torch.softmax(torch.randn(b, 2, s, s, generator=g, dtype=torch.float64) * 2, dim=-1)
    return torch.rand(x.shape[0], generator=g, dtype=torch.float64)


def naive_layer(layer: MoELayer, x: torch.Tensor, importance, ref, capacity_factor):
    """Plain reference: gate per token, optional capacity, then each expert on its tokens, weighted sum per token."""
    params = {n: p.detach().clone().requires_grad_() for n, p in layer.named_parameters()}
    xr = x.detach().clone().requires_grad_()
    flat = xr.reshape(-1, D)
    router_params = {n.removeprefix("router."): p for n, p in params.items() if n.startswith("router.")}
    route = ref.route(layer.router, flat, importance, params=router_params)
    assignments = route.assignments()
    dropped, cap = 0, None
    if capacity_factor is not None:
        assignments, dropped, cap = ref.capacity(assignments, E, capacity_factor)
    out = [torch.zeros(D, dtype=x.dtype) for _ in range(flat.shape[0])]
    w_gate = params.get("experts.w_gate")
    for e in range(E):
        mine = [(t, w) for t, ex, w in assignments if ex == e]
        if cap is not None:
            assert len(mine) <= cap
        if not mine:
            continue
        rows = torch.stack([flat[t] for t, _ in mine])
        h = ref.ffn(rows, params["experts.w_in"][e], params["experts.w_out"][e], None if w_gate is None else w_gate[e])
        for i, (t, w) in enumerate(mine):
            out[t] = out[t] + w * h[i]
    y = torch.stack(out).reshape(x.shape)
    aux = sum(route.losses.values()) if route.losses else torch.zeros((), dtype=x.dtype)
    return y, aux, xr, params, route, dropped, assignments


def compare_with_naive(layer, x, importance, ref, capacity_factor, seed):
    x = x.clone().requires_grad_()
    y, aux = layer(x, importance)
    g = torch.Generator().manual_seed(seed + 5)
    probe = torch.randn(y.shape, generator=g, dtype=torch.float64)
    ((y * probe).sum() + aux.loss).backward()

    layer_ref = layer  # the reference reads the router config and (cloned) parameters only
    y_ref, aux_ref, xr, params, route, dropped, kept = naive_layer(layer_ref, x, importance, ref, capacity_factor)
    ((y_ref * probe).sum() + aux_ref).backward()

    assert y.shape == x.shape
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    assert float(aux.loss.detach()) == pytest.approx(float(aux_ref.detach()), rel=1e-10, abs=1e-14)
    assert set(aux.losses) == set(route.losses)
    assert aux.stats.dropped == dropped
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-9, atol=1e-11)
    for name, p in layer.named_parameters():
        expected = params[name].grad
        expected = torch.zeros_like(p) if expected is None else expected
        got = torch.zeros_like(p) if p.grad is None else p.grad
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-11, msg=lambda m, n=name: f"grad {n}: {m}")
    return y, aux, route, dropped, kept


@pytest.mark.parametrize("shape", ["batch_seq", "tokens"])
@pytest.mark.parametrize("capacity_factor", [None, 0.6])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("gate", sorted(GATE_SPECS))
def test_layer_matches_naive_loop(gate, activation, capacity_factor, shape, rng, ref):
    spec = GATE_SPECS[gate]
    seed = sorted(GATE_SPECS).index(gate) + 3 * (activation == "swiglu")
    layer = make_layer(spec, seed, activation, capacity_factor)
    assert (layer.experts.w_gate is not None) == (activation == "swiglu")
    x = rng(seed, 2, 12, D) if shape == "batch_seq" else rng(seed, 24, D)
    importance = side_input(spec, x, seed)
    y, aux, route, dropped, kept = compare_with_naive(layer, x, importance, ref, capacity_factor, seed)
    if capacity_factor is not None:
        assert dropped > 0, "the capacity should bind on this data"
    # tokens that end up with no expert output exactly 0
    flat_y = y.detach().reshape(-1, D)
    served = {t for t, _, _ in kept}
    for t in range(flat_y.shape[0]):
        if t not in served:
            assert float(flat_y[t].abs().max()) == 0.0
    if spec["kind"] == "top_any":
        unrouted = route.extra["unrouted"]  # tokens the gate accepted for no expert (default rule: sent to one)
        assert unrouted, "test data should contain tokens with k = 0"
        assert all((route.k()[t] == 0) == (spec.get("unrouted") == "drop") for t in unrouted)
        assert int(aux.stats.unrouted_count) == len(unrouted)
        flat_x = x.reshape(-1, D)
        torch.testing.assert_close(aux.stats.unrouted_sum, flat_x[unrouted].sum(0), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("capacity_factor", [None, 0.6])
def test_layer_top_any_eval_with_temperature(capacity_factor, rng, ref):
    spec = {"kind": "top_any", "trainable_temperature": True}
    layer = make_layer(spec, 11, "swiglu", capacity_factor)
    with torch.no_grad():
        layer.router.tau.fill_(1.3)
    layer.eval()
    x = rng(11, 30, D)
    y, aux, route, dropped, kept = compare_with_naive(layer, x, None, ref, capacity_factor, 11)
    assert layer.router.tau.grad is not None and float(layer.router.tau.grad) != 0.0
    assert min(route.k()) == 1  # evaluation: nobody is left without an expert
    assert aux.stats.unrouted_count == 0


# --------------------------------------------------------------------------------------------------------------------
# capacity, observed from outside: with top-1 renormalised routing every weight is 1, so a token's output is either
# its expert's FFN output (kept) or exactly 0 (dropped)


def top1_layer(tokens: int, seed: int, renormalize: bool = True, capacity_factor=None):
    spec = {"kind": "top_k", "k": 1, "renormalize": renormalize, "balance_weight": 0.0}
    layer = make_layer(spec, seed, "gelu", capacity_factor).eval()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, D, generator=g, dtype=torch.float64)
    return layer, x


def plain_top1(layer, x):
    """(expert, probability) of each token from softmax(W x), computed plainly."""
    w = layer.router.weight.detach()
    out = []
    for t in range(x.shape[0]):
        logits = [float(w[e] @ x[t]) for e in range(E)]
        z = sum(math.exp(v) for v in logits)
        best = max(range(E), key=lambda e: logits[e])
        out.append((best, math.exp(logits[best]) / z))
    return out


@pytest.mark.parametrize(("tokens", "capacity_factor"), [(10, 1.0), (23, 1.0), (23, 0.5), (31, 0.7), (40, 1.3)])
def test_capacity_ties_drop_later_tokens(tokens, capacity_factor):
    layer, x = top1_layer(tokens, tokens, capacity_factor=capacity_factor)
    y, aux = layer(x)
    y = y.detach()
    cap = math.ceil(capacity_factor * tokens / E)  # |A| = tokens with k = 1
    choice = plain_top1(layer, x)
    kept, seen = set(), [0] * E
    for t, (e, _) in enumerate(choice):  # all weights are 1: keep the earliest tokens of each expert
        if seen[e] < cap:
            kept.add(t)
        seen[e] += 1
    assert aux.stats.dropped == tokens - len(kept)
    assert aux.stats.dropped > 0 or capacity_factor > 1
    for t, (e, _) in enumerate(choice):
        if t in kept:
            h = torch.nn.functional.gelu(x[t] @ layer.experts.w_in[e]) @ layer.experts.w_out[e]
            torch.testing.assert_close(y[t], h.detach(), rtol=1e-12, atol=1e-12)
        else:
            assert float(y[t].abs().max()) == 0.0, t


@pytest.mark.parametrize(("tokens", "capacity_factor"), [(20, 0.5), (31, 0.8), (40, 1.0)])
def test_capacity_drops_lowest_weight_first(tokens, capacity_factor):
    layer, x = top1_layer(tokens, 100 + tokens, renormalize=False, capacity_factor=capacity_factor)
    y, aux = layer(x)
    y = y.detach()
    cap = math.ceil(capacity_factor * tokens / E)
    choice = plain_top1(layer, x)
    kept = set()
    for e in range(E):
        mine = sorted((t for t in range(tokens) if choice[t][0] == e), key=lambda t: -choice[t][1])
        kept |= set(mine[:cap])
    assert aux.stats.dropped == tokens - len(kept) > 0
    for t in range(tokens):
        assert (float(y[t].abs().max()) > 0) == (t in kept), t


def test_capacity_large_factor_drops_nothing(rng):
    spec = GATE_SPECS["top_any"]
    x = rng(1, 2, 10, D)
    free = make_layer(spec, 1)
    capped = make_layer(spec, 1, capacity_factor=float(E))  # cap = |A| >= any expert's load
    y_free, aux_free = free(x)
    y_cap, aux_cap = capped(x)
    assert aux_cap.stats.dropped == 0 and aux_free.stats.dropped == 0
    torch.testing.assert_close(y_cap, y_free, rtol=0, atol=0)


def test_float32_layer_close_to_float64_reference(ref):
    """The default dtype path: float32 layer against the float64 naive loop on the same parameters."""
    spec = {"kind": "top_k", "k": 2}
    layer64 = make_layer(spec, 21, "swiglu")
    layer32 = make_layer(spec, 21, "swiglu").float()
    g = torch.Generator().manual_seed(21)
    x = torch.randn(3, 7, D, generator=g, dtype=torch.float64)
    y32, _ = layer32(x.float())
    y_ref, *_ = naive_layer(layer64, x, None, ref, None)
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32.double(), y_ref.detach(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu", "silu", "swiglu", "geglu"])
def test_biased_experts_with_every_activation_match_a_per_token_reference(activation, rng):
    """Experts with biases (the drop-in layers' Linear experts): out_t = sum_e w_te * FFN_e(x_t), written plainly."""
    import torch.nn.functional as F

    torch.manual_seed(5)
    layer = MoELayer(D, FF, E, {"kind": "top_k", "k": 2}, activation=activation, expert_bias=True).double()
    with torch.no_grad():
        for p in layer.experts.parameters():
            p.add_(torch.randn_like(p) * 0.2)  # biases start at zero; make them count
    x = rng(4, 20, D)
    y, _ = layer(x)
    acts = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu, "swiglu": F.silu, "geglu": F.gelu}
    acts["gelu_tanh"] = lambda h: F.gelu(h, approximate="tanh")
    b = layer.experts
    probs = torch.softmax(x @ layer.router.weight.t(), -1)
    want = torch.zeros_like(x)
    for t in range(x.shape[0]):
        top = probs[t].topk(2)
        for w, e in zip(top.values / top.values.sum(), top.indices.tolist()):
            h = x[t] @ b.w_in[e] + b.b_in[e]
            if activation in ("swiglu", "geglu"):
                h = acts[activation](x[t] @ b.w_gate[e] + b.b_gate[e]) * h
            else:
                h = acts[activation](h)
            want[t] += w * (h @ b.w_out[e] + b.b_out[e])
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shared", [0, 2])
def test_layer_under_autocast_computes_its_rows_in_bf16(shared):
    """Under autocast (the torch engine's bf16) the routed rows travel and compute in bf16: the same as feeding the
    experts bf16 rows by hand (bitwise), the layer within bf16 rounding of fp32, and every gradient fp32 and finite."""
    torch.manual_seed(0)
    layer = MoELayer(D, FF, E, router={"kind": "top_k", "k": 2}, num_shared_experts=shared, seed=3)
    x = torch.randn(4, 6, D)
    y32, _ = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        xb = x.clone().requires_grad_()
        y, _ = layer(xb)
        rows, segments = x.reshape(-1, D)[:12], [(0, 7), (3, 5)]
        by_autocast = layer.experts(rows, segments)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), y32, rtol=3e-2, atol=3e-2)
    assert by_autocast.shape == (12, D) and torch.equal(by_autocast, layer.experts(rows.bfloat16(), segments))
    y.float().sum().backward()
    for name, p in [("input", xb), *layer.named_parameters()]:
        g = p.grad
        assert g is not None and g.dtype == torch.float32 and torch.isfinite(g).all(), name
