"""Shared fixtures and plain reference gates for the single-process MoE tests.

The reference gates (``ref``) restate docs/ALGORITHMS.md sections 1-2 as per-token loops over Python lists and scalar
ops: no call into dynmoe_dist. They are differentiable with respect to the tensors passed in, so the layer tests can
compare gradients as well as outputs.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from types import SimpleNamespace

import launch_support
import pytest
import torch

# One intra-op thread: the suite's tensors are tiny, and two OpenMP threads on a busy 2-core machine (worker ranks,
# launches, other jobs) wait on each other at every op: a tiny model's training step took 1.2 s instead of 0.02 s.
torch.set_num_threads(1)
# The suite runs DeepSpeed on CPU ranks over gloo; on a GPU host DeepSpeed would otherwise pick its CUDA accelerator at
# import (test_train_cuda takes it back for its own runs).
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# The benchmarks package lives at the repository root, outside the installed wheel: put the root on the path whatever
# the working directory (plain `pytest` does not add it). Workers the tests spawn inherit this sys.path.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

SEEDS = (0, 1, 2)
GATES = ("top_any", "top_k", "top_p", "importance_k", "relu", "null")


@pytest.fixture
def rng():
    """A seeded float64 normal sampler: ``rng(seed, *shape)``."""

    def sample(seed: int, *shape: int, scale: float = 1.0) -> torch.Tensor:
        g = torch.Generator().manual_seed(1000 + seed)
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    return sample


# --------------------------------------------------------------------------------------------------------------------
# plain reference gates


@dataclass
class RefRoute:
    """Per token: {expert position: weight tensor}; weighted aux losses; extra per-gate details."""

    choice: list[dict[int, torch.Tensor]]
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def k(self) -> list[int]:
        return [len(c) for c in self.choice]

    def assignments(self) -> list[tuple[int, int, torch.Tensor]]:
        """Token-major (token, expert, weight)."""
        return [(t, e, w) for t, c in enumerate(self.choice) for e, w in sorted(c.items())]


def _val(v) -> float:
    return float(v.detach()) if isinstance(v, torch.Tensor) else float(v)


def _softmax_row(logits: list[torch.Tensor]) -> list[torch.Tensor]:
    top = max(_val(v) for v in logits)
    exps = [torch.exp(v - top) for v in logits]
    total = sum(exps)
    return [v / total for v in exps]


def _descending(values: list[torch.Tensor]) -> list[int]:
    """Positions by value, largest first; ties keep the lower position first."""
    return sorted(range(len(values)), key=lambda e: -_val(values[e]))


def _switch_balance(probs: list[list[torch.Tensor]], choice: list[list[int]], num: int) -> torch.Tensor:
    """num * sum_e f_e * P_e; f_e = share of assignments to e, P_e = mean over tokens of the router probability."""
    total = sum(len(c) for c in choice)
    out = 0.0
    for e in range(num):
        f = sum(c.count(e) for c in choice) / total
        p_mean = sum(row[e] for row in probs) / len(probs)
        out = out + f * p_mean
    return num * out


def ref_top_k(x: torch.Tensor, w: torch.Tensor, k: int, renormalize: bool = True, balance_weight: float = 0.01):
    return _ref_softmax_top(x, w, [k] * x.shape[0], renormalize, balance_weight)


def _ref_softmax_top(x: torch.Tensor, w: torch.Tensor, ks: list[int], renormalize: bool, balance_weight: float):
    """Token t takes the ks[t] most probable experts of softmax(w x_t); shared by top-k and importance-k."""
    probs, choice, chosen_lists = [], [], []
    for t in range(x.shape[0]):
        p = _softmax_row([w[e] @ x[t] for e in range(w.shape[0])])
        chosen = _descending(p)[: ks[t]]
        norm = sum(p[e] for e in chosen) if renormalize else 1.0
        choice.append({e: p[e] / norm for e in chosen})
        probs.append(p)
        chosen_lists.append(chosen)
    losses = {}
    if balance_weight:
        losses["balance"] = balance_weight * _switch_balance(probs, chosen_lists, w.shape[0])
    return RefRoute(choice, losses, {"probs": probs})


def ref_top_p(x: torch.Tensor, w: torch.Tensor, p: float, balance_weight: float = 0.01, entropy_weight: float = 1e-4):
    probs, choice, chosen_lists = [], [], []
    entropy = 0.0
    for t in range(x.shape[0]):
        q = _softmax_row([w[e] @ x[t] for e in range(w.shape[0])])
        chosen, cumulative = [], 0.0
        for e in _descending(q):
            chosen.append(e)  # the crossing expert is included
            cumulative += _val(q[e])
            if cumulative > p:
                break
        choice.append({e: q[e] for e in chosen})  # raw probabilities, not renormalised
        probs.append(q)
        chosen_lists.append(chosen)
        entropy = entropy - sum(v * torch.log(v) for v in q)
    losses = {}
    if balance_weight:
        losses["balance"] = balance_weight * _switch_balance(probs, chosen_lists, w.shape[0])
    if entropy_weight:
        losses["entropy"] = entropy_weight * entropy / x.shape[0]
    return RefRoute(choice, losses, {"probs": probs})


def ref_attention_importance(attn: torch.Tensor) -> list[float]:
    """[B, H, S, S] (query i, key j) -> per token (batch-major) mean_h sum_i A[h, i, j] / max over the sequence."""
    a = attn.tolist()
    out = []
    for b in range(len(a)):
        heads, seq = len(a[b]), len(a[b][0])
        received = []
        for j in range(seq):
            total = 0.0
            for h in range(heads):
                for i in range(seq):
                    total += a[b][h][i][j]
            received.append(total / heads)
        peak = max(received)
        out.extend(r / peak for r in received)
    return out


def ref_k_from_importance(imp: list[float], k_max: int) -> list[int]:
    return [min(max(math.ceil(v * k_max), 1), k_max) for v in imp]


def ref_importance_k(x: torch.Tensor, w: torch.Tensor, ks: list[int], balance_weight: float = 0.01):
    return _ref_softmax_top(x, w, ks, True, balance_weight)


def ref_relu(x: torch.Tensor, w: torch.Tensor, l1_coef: float):
    choice, l1 = [], 0.0
    for t in range(x.shape[0]):
        g = [torch.clamp(w[e] @ x[t], min=0.0) for e in range(w.shape[0])]
        choice.append({e: g[e] for e in range(w.shape[0]) if _val(g[e]) > 0})
        l1 = l1 + sum(g)
    return RefRoute(choice, {"l1": l1_coef * l1 / x.shape[0]})


def ref_null(
    x: torch.Tensor, w: torch.Tensor, w_null: torch.Tensor, k: int, renormalize: bool = True, balance_weight=0.01
):
    num_real, num_null = w.shape[0], w_null.shape[0]
    rows = [w[e] for e in range(num_real)] + [w_null[n] for n in range(num_null)]
    total = num_real + num_null
    probs, choice, columns = [], [], []
    for t in range(x.shape[0]):
        p = _softmax_row([r @ x[t] for r in rows])
        chosen = _descending(p)[:k]
        norm = sum(p[e] for e in chosen) if renormalize else 1.0
        choice.append({e: p[e] / norm for e in chosen if e < num_real})  # null choices leave the plan
        probs.append(p)
        columns.append(chosen)
    losses = {}
    if balance_weight:
        count = sum(len(c) for c in columns)
        f = [sum(c.count(e) for c in columns) / count for e in range(total)]
        pm = [sum(row[e] for row in probs) / len(probs) for e in range(total)]
        f_null = sum(f[num_real:]) / num_null
        p_null = sum(pm[num_real:]) / num_null
        pooled = sum(f[e] * pm[e] for e in range(num_real)) + num_null * f_null * p_null
        losses["balance"] = balance_weight * total * pooled
    return RefRoute(choice, losses)


def ref_top_any(
    x: torch.Tensor,
    w: torch.Tensor,
    g: torch.Tensor,
    scale,
    training: bool,
    aux_weight: float = 0.01,
    diverse_weight: float = 1.0,
    simple_weight: float = 1.0,
    balance_weight: float = 1.0,
    efficiency_weight: float = 1.0,
    unrouted_rule: str = "drop",
    efficiency_free: int = 0,
    route_weight: float = 0.0,
):
    """DynMoE Top-Any, token by token. ``a`` uses the straight-through trick step + (r - r.detach()).

    ``unrouted_rule="top1"``: in training too, a token no expert accepted goes to its most similar expert with weight
    1 whose gradient is that pair's margin s - t; ``efficiency_free=1``: tokens with k <= 1 cost no efficiency loss;
    ``route_weight``: the hinge relu(t - s) of the most similar expert, averaged over all tokens, for unrouted ones.
    """
    num = w.shape[0]
    w_norm = [torch.sqrt((w[e] * w[e]).sum()) for e in range(num)]
    w_unit = [w[e] / w_norm[e] for e in range(num)]
    thresholds = [torch.sigmoid(g[e] * scale) for e in range(num)]
    choice, a_rows, s_rows, unrouted, margins = [], [], [], [], []
    for t in range(x.shape[0]):
        xu = x[t] / torch.sqrt((x[t] * x[t]).sum())
        s = [torch.sigmoid((xu @ w_unit[e]) * scale) for e in range(num)]
        a = []
        for e in range(num):
            r = torch.clamp(s[e] - thresholds[e], min=0.0)
            a.append((1.0 if _val(r) > 0 else 0.0) + (r - r.detach()))
        k = sum(_val(v) for v in a)
        best = max(range(num), key=lambda e: _val(s[e]))
        if k >= 1:
            ksum = sum(a)
            choice.append({e: a[e] / ksum for e in range(num) if _val(a[e]) > 0})
        elif training and unrouted_rule == "drop":
            choice.append({})
        elif training:
            margin = s[best] - thresholds[best]
            choice.append({best: 1.0 + (margin - margin.detach())})
        else:
            choice.append({best: torch.ones((), dtype=x.dtype)})
        if k == 0 and training:
            unrouted.append(t)
            margins.append(s[best] - thresholds[best])
        a_rows.append(a)
        s_rows.append(s)
    losses = {}
    if aux_weight:
        if diverse_weight:
            sq = 0.0
            for i in range(num):
                for j in range(num):
                    sq = sq + (w_unit[i] @ w_unit[j] - (1.0 if i == j else 0.0)) ** 2
            losses["diverse"] = aux_weight * diverse_weight * torch.sqrt(sq)
        if simple_weight:
            losses["simple"] = aux_weight * simple_weight * sum(w_norm) / num
        if balance_weight:
            routed = [a for a in a_rows if sum(_val(v) for v in a) >= 1]
            bal = 0.0
            if routed:
                for e in range(num):
                    p_mean = sum(a[e] / sum(a) for a in routed) / len(routed)
                    f_share = sum(_val(a[e]) for a in routed) / len(routed)  # a count: no gradient
                    bal = bal + p_mean * f_share
                bal = num * bal
            losses["balance"] = aux_weight * balance_weight * bal
        if efficiency_weight:
            costly = [a for a in a_rows if sum(_val(v) for v in a) > efficiency_free]
            eff = sum(sum(a) for a in costly) / (len(a_rows) * num) if costly else a_rows[0][0] * 0.0
            losses["efficiency"] = aux_weight * efficiency_weight * eff
        if route_weight and training:
            hinge = sum(torch.clamp(-m, min=0.0) for m in margins) / len(a_rows) if margins else x.sum() * 0.0
            losses["route"] = aux_weight * route_weight * hinge
    return RefRoute(choice, losses, {"a": a_rows, "s": s_rows, "unrouted": unrouted})


def ref_capacity(assignments: list[tuple[int, int, torch.Tensor]], num_experts: int, capacity_factor: float):
    """Keep at most ceil(cf * A / E) per expert: highest weight first, ties by earlier token."""
    cap = math.ceil(capacity_factor * len(assignments) / num_experts)
    kept = []
    for e in range(num_experts):
        mine = [a for a in assignments if a[1] == e]
        mine.sort(key=lambda a: (-_val(a[2]), a[0]))
        kept.extend(mine[:cap])
    kept.sort(key=lambda a: (a[0], a[1]))
    return kept, len(assignments) - len(kept), cap


def ref_ffn(x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, w_gate: torch.Tensor | None) -> torch.Tensor:
    """GELU FFN gelu(x w_in) w_out, or SwiGLU (silu(x w_gate) * (x w_in)) w_out; no biases."""
    h = x @ w_in
    if w_gate is None:
        h = 0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))
    else:
        z = x @ w_gate
        h = z * torch.sigmoid(z) * h
    return h @ w_out


def ref_route(router, x: torch.Tensor, importance: torch.Tensor | None = None, params=None, ks=None) -> RefRoute:
    """The plain reference of ``router``'s rule, read from its config and parameters (or ``params`` overrides)."""
    p = {name: t for name, t in router.named_parameters()}
    p.update(params or {})
    cfg = router.cfg
    kind = cfg.kind
    if kind == "top_any":
        tau = p.get("tau")
        scale = 1.0 if tau is None else torch.exp(torch.clamp(tau, max=math.log(100.0)))
        return ref_top_any(
            x,
            p["weight"],
            p["threshold"],
            scale,
            router.training,
            cfg.aux_weight,
            cfg.diverse_weight,
            cfg.simple_weight,
            cfg.balance_weight,
            cfg.efficiency_weight,
            cfg.unrouted,
            cfg.efficiency_free,
            cfg.route_weight,
        )
    if kind == "top_k":
        return ref_top_k(x, p["weight"], cfg.k, cfg.renormalize, cfg.balance_weight)
    if kind == "top_p":
        return ref_top_p(x, p["weight"], cfg.p, cfg.balance_weight, cfg.entropy_weight)
    if kind == "importance_k":
        if ks is None:
            if importance is None:
                ks = [cfg.fallback_k or cfg.k_max] * x.shape[0]
            elif importance.dim() == 4:
                ks = ref_k_from_importance(ref_attention_importance(importance), cfg.k_max)
            else:
                ks = ref_k_from_importance(importance.reshape(-1).tolist(), cfg.k_max)
        return ref_importance_k(x, p["weight"], ks, cfg.balance_weight)
    if kind == "relu":
        return ref_relu(x, p["weight"], float(router.l1_coef))
    if kind == "null":
        return ref_null(x, p["weight"], p["null_weight"], cfg.k, cfg.renormalize, cfg.balance_weight)
    raise AssertionError(f"no reference for {kind}")


@pytest.fixture(scope="session")
def ref():
    """The plain reference implementations, as a namespace."""
    return SimpleNamespace(
        top_k=ref_top_k,
        top_p=ref_top_p,
        importance_k=ref_importance_k,
        attention_importance=ref_attention_importance,
        k_from_importance=ref_k_from_importance,
        relu=ref_relu,
        null=ref_null,
        top_any=ref_top_any,
        capacity=ref_capacity,
        ffn=ref_ffn,
        route=ref_route,
        Route=RefRoute,
    )


# --------------------------------------------------------------------------------------------------------------------
# launches in the background of the suite (launch_support)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    launch_support.modules_with_launches_last(items)


@pytest.fixture(scope="session", autouse=True)
def background(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """The session's launches: queued at its start by the modules that read them, killed at its end if still running."""
    runs = launch_support.start_background(request.session, tmp_path_factory)
    request.config.stash[TIMELINE] = runs
    yield runs
    runs.close()


TIMELINE = pytest.StashKey[launch_support.Launches]()


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    """With -v (or more): when each background launch ran."""
    runs = config.stash.get(TIMELINE, None)
    if runs is not None and config.get_verbosity() > 0:
        terminalreporter.write_sep("-", "background launches")
        for line in launch_support.timeline_lines(runs):
            terminalreporter.write_line(line)
