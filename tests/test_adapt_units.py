"""Single-process tests of adaptation (docs/ALGORITHMS.md section 5): recorder, policy, MoEAdam, controller.

Oracles are written out here: a plain Top-Any recount (s = sigmoid(cos(x, W_e)) > t = sigmoid(G_e)) for the recorder,
hand-built windows for the policy, torch.optim.Adam for MoEAdam, and before/after snapshots by expert id for the
controller.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from dynmoe_dist import ConfigError, MoELayer
from dynmoe_dist.adapt import AdaptConfig, AdaptController, PolicyConfig, WindowStats, dynmoe_policy
from dynmoe_dist.optim import STATE_KEYS, MoEAdam

D, FF, E = 8, 6, 4
IDLE = 50.0  # a threshold whose sigmoid rounds to 1: no similarity (at most sigmoid(1)) passes it
MIXED = [0.1, 0.4, 0.2, 0.6]  # thresholds that leave some tokens unrouted and spread the rest


# The control plane's mechanics are tested on Top-Any with the reference rules: a token no expert accepts goes nowhere
# (so an expert behind an IDLE threshold receives nothing) and a new expert's threshold starts at 0.
ROUTER = {"kind": "top_any", "unrouted": "drop", "new_threshold": "zero"}


def make_layer(seed: int, thresholds=None, num_experts: int = E, expert_bias: bool = False) -> MoELayer:
    layer = MoELayer(D, FF, num_experts, router=ROUTER, seed=seed, expert_bias=expert_bias).double().train()
    if thresholds is not None:
        with torch.no_grad():
            layer.router.threshold.copy_(torch.tensor(thresholds, dtype=torch.float64))
    return layer


def make_tokens(seed: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g, dtype=torch.float64)


def recount(layer: MoELayer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Plain Top-Any routing from the current parameters: (tokens per position, unrouted sum, unrouted count). A token
    no expert accepted is unrouted, and by the default rule it still goes to its most similar expert, which counts."""
    x = x.reshape(-1, D)
    w = layer.router.weight.detach()
    cos = (x / x.norm(dim=-1, keepdim=True)) @ (w / w.norm(dim=-1, keepdim=True)).T
    active = torch.sigmoid(cos) > torch.sigmoid(layer.router.threshold.detach())
    unrouted = active.sum(-1) == 0
    if layer.router.cfg.unrouted == "top1":
        active |= torch.nn.functional.one_hot(cos.argmax(-1), cos.shape[1]).bool() & unrouted[:, None]
    return active.sum(0).to(torch.float64), x[unrouted].sum(0), float(unrouted.sum())


def controller(layer: MoELayer, lr: float = 1e-2, dense_init=None, **cfg) -> tuple[MoEAdam, AdaptController]:
    opt = MoEAdam.for_moe(layer, lr=lr)
    return opt, AdaptController(layer, opt, cfg=AdaptConfig(**cfg), dense_init=dense_init)


def forward(layer: MoELayer, x: torch.Tensor, recompute: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    def layer_fn(inp):
        y, aux = layer(inp)
        return y, aux.loss

    if recompute is None:
        return layer_fn(x)
    return checkpoint(layer_fn, x.clone().requires_grad_(), use_reentrant=recompute == "reentrant")


def train_step(layer, opt, ctrl, micro_batches, recompute=None):
    """Forward/backward each micro-batch, one optimizer step, then the controller: (last loss, events)."""
    opt.zero_grad()
    loss = None
    for x in micro_batches:
        y, aux_loss = forward(layer, x, recompute)
        loss = (y**2).sum() + aux_loss
        loss.backward()
    opt.step()
    return loss, ctrl.step()


def window(layer: MoELayer) -> WindowStats:
    return layer.recorder.reduce(layer.router.expert_ids.tolist(), None)


def assert_window(got: WindowStats, tokens: torch.Tensor, unrouted_sum: torch.Tensor, unrouted_count: float) -> None:
    assert got.tokens.tolist() == tokens.tolist()
    assert got.unrouted_count == unrouted_count
    torch.testing.assert_close(got.unrouted_sum, unrouted_sum, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------------------------------------------------
# recorder


def test_recorder_window_equals_plain_recount():
    layer = make_layer(0, MIXED)
    opt, ctrl = controller(layer, record_steps=1000, idle_steps=0)
    want = [torch.zeros(E, dtype=torch.float64), torch.zeros(D, dtype=torch.float64), 0.0]
    for step in range(4):
        x = make_tokens(step, 48)
        if step % 2:
            x = x.view(6, 8, D)  # [batch, seq, d] input counts the same tokens
        tokens, unrouted_sum, unrouted_count = recount(layer, x)  # parameters move every step: count before it
        want = [want[0] + tokens, want[1] + unrouted_sum, want[2] + unrouted_count]
        _, events = train_step(layer, opt, ctrl, [x])
        assert events == []
    assert want[2] > 0 and (want[0] > 0).sum() >= 2  # both signals are present, so the comparison means something
    got = window(layer)
    assert got.expert_ids == [0, 1, 2, 3]
    assert_window(got, *want)
    assert got.tokens_by_id() == dict(enumerate(want[0].tolist()))


def test_recorder_gradient_accumulation_records_like_one_big_batch():
    x = make_tokens(10, 64)
    want = recount(make_layer(1, MIXED), x)
    assert want[2] > 0
    got = {}
    for name, micro in (("accumulated", list(x.chunk(4))), ("big", [x])):
        layer = make_layer(1, MIXED)
        opt, ctrl = controller(layer, record_steps=1000, idle_steps=0)
        train_step(layer, opt, ctrl, micro)
        got[name] = window(layer)
    assert_window(got["accumulated"], *want)
    assert_window(got["big"], *want)


@pytest.mark.parametrize("recompute", ["non_reentrant", "reentrant"])
def test_recorder_does_not_count_activation_recompute(recompute):
    windows, grads = {}, {}
    want = [torch.zeros(E, dtype=torch.float64), torch.zeros(D, dtype=torch.float64), 0.0]
    for mode in (None, recompute):
        layer = make_layer(2, MIXED)
        opt, ctrl = controller(layer, record_steps=1000, idle_steps=0)
        for step in range(2):
            x = make_tokens(20 + step, 40)
            if mode is not None:
                tokens, unrouted_sum, unrouted_count = recount(layer, x)
                want = [want[0] + tokens, want[1] + unrouted_sum, want[2] + unrouted_count]
            train_step(layer, opt, ctrl, [x], recompute=mode)
        windows[mode] = window(layer)
        grads[mode] = layer.router.weight.grad.clone()
    assert want[2] > 0
    assert_window(windows[recompute], *want)
    assert_window(windows[None], *want)
    torch.testing.assert_close(grads[recompute], grads[None], rtol=0, atol=1e-12)  # the recompute did run backward


def test_recorder_ignores_evaluation_forwards():
    layer = make_layer(3, MIXED)
    controller(layer, record_steps=1000, idle_steps=0)
    x = make_tokens(30, 32)
    layer.eval()
    with torch.no_grad():
        layer(x)
    layer(x)  # evaluation with autograd on records nothing either
    assert layer.recorder.active
    assert_window(window(layer), torch.zeros(E), torch.zeros(D, dtype=torch.float64), 0.0)
    layer.train()
    want = recount(layer, x)
    layer(x)
    assert_window(window(layer), *want)


def test_recorder_records_nothing_in_idle_steps():
    layer = make_layer(4, [-5.0] * E)  # every token takes every expert: the boundary makes no event
    opt, ctrl = controller(layer, record_steps=2, idle_steps=3)
    for step in range(2):
        assert layer.recorder.active
        _, events = train_step(layer, opt, ctrl, [make_tokens(40 + step, 16)])
    assert events == [] and ctrl.events == []
    zeros = (torch.zeros(E), torch.zeros(D, dtype=torch.float64), 0.0)
    for step in range(3):
        assert not layer.recorder.active
        assert_window(window(layer), *zeros)
        train_step(layer, opt, ctrl, [make_tokens(50 + step, 16)])
        assert_window(window(layer), *zeros)
    assert layer.recorder.active  # the next window opens after idle_steps
    x = make_tokens(60, 16)
    want = recount(layer, x)
    train_step(layer, opt, ctrl, [x])
    assert want[0].tolist() == [16.0] * E
    assert_window(window(layer), *want)


# --------------------------------------------------------------------------------------------------------------------
# policy


def stats(ids, tokens, unrouted_count=0.0, unrouted_sum=None) -> WindowStats:
    s = torch.zeros(D, dtype=torch.float64) if unrouted_sum is None else torch.tensor(unrouted_sum, dtype=torch.float64)
    return WindowStats(list(ids), torch.tensor(tokens, dtype=torch.float64), float(unrouted_count), s)


UNROUTED = [3.0, 0.0, -4.0, 0.0, 0.0, 0.0, 0.0, 12.0]  # norm 13


def test_policy_removes_exactly_the_idle_experts():
    d = dynmoe_policy(stats([0, 2, 5, 7], [3, 0, 5, 0]), 8, PolicyConfig())
    assert d.remove == [2, 7] and d.add == []
    d = dynmoe_policy(stats([0, 2, 5, 7], [3, 1, 5, 2]), 8, PolicyConfig())
    assert d.empty


@pytest.mark.parametrize(
    ("ids", "tokens", "min_experts", "remove"),
    [
        ([3, 4, 5, 6], [0, 0, 0, 7], 3, [5]),  # 4 experts, min 3: one goes, the highest idle id
        ([6, 1, 4], [0, 0, 0], 2, [6]),  # all idle: the lowest ids stay
        ([6, 1, 4], [0, 0, 0], 1, [4, 6]),
        ([2], [0], 1, []),  # the last expert stays
        ([2, 9], [0, 0], 3, []),  # already below the minimum: nothing goes
    ],
)
def test_policy_never_goes_below_min_experts(ids, tokens, min_experts, remove):
    d = dynmoe_policy(stats(ids, tokens), 10, PolicyConfig(min_experts=min_experts, max_experts=max(min_experts, 8)))
    assert d.remove == remove


@pytest.mark.parametrize(
    ("tokens", "count", "max_add", "max_experts", "added"),
    [
        ([1, 2, 3], 5, 3, 10, [11, 12, 13]),
        ([1, 2, 3], 5, 3, 4, [11]),  # capped by max_experts
        ([1, 2, 3], 5, 3, 3, []),  # already full
        ([1, 2, 3], 0, 3, 10, []),  # nothing unrouted: nothing to add
        ([1, 2, 3], 5, 0, 10, []),
        ([1, 0, 0], 5, 3, 3, [11, 12]),  # removing two idle experts makes room for two
    ],
)
def test_policy_adds_up_to_max_add_and_max_experts(tokens, count, max_add, max_experts, added):
    w = stats([0, 4, 9], tokens, count, UNROUTED)
    cfg = PolicyConfig(max_add=max_add, max_experts=max_experts, min_experts=1)
    d = dynmoe_policy(w, 11, cfg)
    assert [n.expert_id for n in d.add] == added
    survivors = 3 - len(d.remove)
    assert survivors + len(d.add) <= max_experts
    for n in d.add:
        assert n.expert_id >= 11 and n.expert_id not in w.expert_ids
        assert n.init == "copy"


def test_policy_gate_row_is_the_normalised_unrouted_sum():
    d = dynmoe_policy(stats([0, 1], [2, 2], 4, UNROUTED), 2, PolicyConfig(max_add=2, max_experts=8))
    want = torch.tensor(UNROUTED, dtype=torch.float64) / 13.0
    assert len(d.add) == 2
    for n in d.add:
        torch.testing.assert_close(n.gate_row, want, rtol=0, atol=1e-15)
    assert d.add[0].gate_row.data_ptr() != d.add[1].gate_row.data_ptr()


@pytest.mark.parametrize(("unrouted", "min_share", "adds"), [(5, 0.01, 0), (20, 0.01, 1), (1, 0.0, 1), (10, 0.01, 0)])
def test_policy_adds_only_above_the_unrouted_share(unrouted, min_share, adds):
    """add_min_share (default 1%): a window of 1000 tokens with a handful unrouted adds nothing; the reference
    (add_min_share=0) adds for a single token."""
    window = stats([0, 1], [2, 2], unrouted, UNROUTED)
    window.token_count, window.token_sum = 1000.0, torch.zeros(D, dtype=torch.float64)
    assert len(dynmoe_policy(window, 2, PolicyConfig(add_min_share=min_share)).add) == adds


def test_policy_centered_gate_row_points_where_the_unrouted_tokens_differ():
    """direction="centered" (the default): the unrouted mean less the routed tokens' mean, normalised; the plain
    mean ("mean", the reference) when the window has no token sum."""
    common = torch.tensor([5.0, 5.0, 0, 0, 0, 0, 0, 0], dtype=torch.float64)  # every token's shared component
    unrouted = common + torch.tensor([0, 0, 1.0, 0, 0, 0, 0, 0], dtype=torch.float64)
    routed = common + torch.tensor([0, 0, 0, 0, 0, 0, 0, 2.0], dtype=torch.float64)
    window = stats([0, 1], [2, 2], 4, (4 * unrouted).tolist())
    window.token_count, window.token_sum = 10.0, 4 * unrouted + 6 * routed
    (new,) = dynmoe_policy(window, 2, PolicyConfig()).add
    want = torch.tensor([0, 0, 1.0, 0, 0, 0, 0, -2.0], dtype=torch.float64) / math.sqrt(5.0)
    torch.testing.assert_close(new.gate_row, want, rtol=0, atol=1e-12)
    (plain,) = dynmoe_policy(window, 2, PolicyConfig(direction="mean")).add
    torch.testing.assert_close(plain.gate_row, unrouted / unrouted.norm(), rtol=0, atol=1e-12)
    assert float(plain.gate_row @ common) > 0.9 * float(common.norm())  # the plain mean points at the shared part


@pytest.mark.parametrize(
    ("ids", "tokens", "source"),
    [
        ([6, 1, 4], [7, 7, 5], 1),  # tie: the lowest id, not the first position
        ([6, 1, 4], [7, 3, 9], 4),
        ([6, 1, 4], [0, 3, 0], 1),  # idle experts are removed, so never the source
        ([5, 2], [0, 0], 2),  # all idle, min 1 keeps id 2, which is then the most loaded survivor
    ],
)
def test_policy_copy_source_is_the_most_loaded_survivor(ids, tokens, source):
    d = dynmoe_policy(stats(ids, tokens, 1, UNROUTED), 10, PolicyConfig())
    assert [n.source_id for n in d.add] == [source]
    assert source not in d.remove


def test_policy_other_init_rules_have_no_source():
    for init in ("random", "dense"):
        d = dynmoe_policy(stats([0, 1], [4, 2], 1, UNROUTED), 2, PolicyConfig(init=init))
        assert [(n.init, n.source_id) for n in d.add] == [(init, None)]


def test_policy_is_pure_and_deterministic():
    w = stats([6, 1, 4, 3], [7, 0, 5, 0], 3, UNROUTED)
    copy = (list(w.expert_ids), w.tokens.clone(), w.unrouted_count, w.unrouted_sum.clone())
    cfg = PolicyConfig(max_add=2)
    first = dynmoe_policy(w, 7, cfg)
    second = dynmoe_policy(w, 7, cfg)
    assert first.key() == second.key()
    assert first.remove == [1, 3] and [n.expert_id for n in first.add] == [7, 8]
    first.add[0].gate_row.zero_()  # the decision shares no storage with the window
    assert w.expert_ids == copy[0]
    assert torch.equal(w.tokens, copy[1]) and w.unrouted_count == copy[2] and torch.equal(w.unrouted_sum, copy[3])
    assert cfg == PolicyConfig(max_add=2)


@pytest.mark.parametrize(
    ("cls", "kwargs", "field"),
    [
        (PolicyConfig, {"min_experts": 0}, "min_experts"),
        (PolicyConfig, {"min_experts": 4, "max_experts": 3}, "max_experts"),
        (PolicyConfig, {"max_add": -1}, "max_add"),
        (PolicyConfig, {"init": "zeros"}, "init"),
        (AdaptConfig, {"record_steps": 0}, "record_steps"),
        (AdaptConfig, {"idle_steps": -1}, "idle_steps"),
        (AdaptConfig, {"policy_name": "nope"}, "policy_name"),
        (AdaptConfig, {"rebalance_threshold": 0.5}, "rebalance_threshold"),
    ],
)
def test_bad_config_names_the_field(cls, kwargs, field):
    with pytest.raises(ConfigError) as info:
        cls(**kwargs)
    assert info.value.setting == field
    assert field in str(info.value)


# --------------------------------------------------------------------------------------------------------------------
# MoEAdam

LR, BETAS, EPS = 0.05, (0.8, 0.95), 1e-6


def random_tensor(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_moe_adam_matches_torch_adam_when_all_rows_start_together(weight_decay):
    row_shapes, other_shapes = [(4, 3, 2), (4, 5), (4,)], [(3,), ()]
    shapes = row_shapes + other_shapes
    mine = [nn.Parameter(random_tensor(i, *s)) for i, s in enumerate(shapes)]
    ref = [nn.Parameter(p.detach().clone()) for p in mine]
    opt = MoEAdam(mine[:3], mine[3:], lr=LR, betas=BETAS, eps=EPS, weight_decay=weight_decay)
    ref_cls = torch.optim.Adam if weight_decay == 0 else torch.optim.AdamW
    ref_opt = ref_cls(ref, lr=LR, betas=BETAS, eps=EPS, weight_decay=weight_decay)
    for step in range(6):
        for i, (p, q) in enumerate(zip(mine, ref)):
            g = random_tensor(100 * step + i, *p.shape)
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
        for p, q in zip(mine, ref):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-12)
            torch.testing.assert_close(opt.state[p]["exp_avg"], ref_opt.state[q]["exp_avg"], rtol=0, atol=1e-12)
    assert [g["rowwise"] for g in opt.param_groups] == [True, False]
    for p in mine[:3]:
        assert opt.state[p]["step"].tolist() == [6] * 4
    for p in mine[3:]:
        assert opt.state[p]["step"].shape == () and int(opt.state[p]["step"]) == 6
    assert not torch.equal(mine[0].detach(), random_tensor(0, 4, 3, 2))  # it did move


def test_moe_adam_installed_row_starts_its_own_bias_correction():
    holder = nn.Module()
    holder.w = nn.Parameter(random_tensor(1, 3, 4))
    opt = MoEAdam([holder.w], lr=LR, betas=BETAS, eps=EPS)
    old_ref = nn.Parameter(holder.w.detach().clone())
    old_opt = torch.optim.Adam([old_ref], lr=LR, betas=BETAS, eps=EPS)
    for step in range(3):
        g = random_tensor(10 + step, 3, 4)
        holder.w.grad, old_ref.grad = g.clone(), g.clone()
        opt.step()
        old_opt.step()
    new_row = random_tensor(20, 4)
    state = opt.rows_of(holder.w, torch.arange(3))
    state = {k: torch.cat([v, torch.zeros((1, *v.shape[1:]), dtype=v.dtype)]) for k, v in state.items()}
    old_param = holder.w
    opt.install_rows(holder, "w", torch.cat([holder.w.detach(), new_row[None]]), state)
    assert holder.w is not old_param and holder.w.shape == (4, 4)
    assert len(opt.param_groups[0]["params"]) == 1 and opt.param_groups[0]["params"][0] is holder.w
    assert old_param not in opt.state
    fresh = nn.Parameter(new_row.clone())
    fresh_opt = torch.optim.Adam([fresh], lr=LR, betas=BETAS, eps=EPS)
    g = random_tensor(30, 4, 4)
    holder.w.grad, old_ref.grad, fresh.grad = g.clone(), g[:3].clone(), g[3].clone()
    opt.step()
    old_opt.step()
    fresh_opt.step()
    torch.testing.assert_close(holder.w.detach()[:3], old_ref.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(holder.w.detach()[3], fresh.detach(), rtol=0, atol=1e-12)
    assert opt.state[holder.w]["step"].tolist() == [4, 4, 4, 1]


def test_rows_of_never_stepped_parameter_is_zero_state():
    w = nn.Parameter(random_tensor(2, 3, 2, 5))
    opt = MoEAdam([w])
    rows = opt.rows_of(w, torch.tensor([2, 0]))
    for key in ("exp_avg", "exp_avg_sq"):
        assert rows[key].shape == (2, 2, 5) and rows[key].dtype == w.dtype
        assert not rows[key].any()
    assert rows["step"].dtype == torch.int64 and rows["step"].tolist() == [0, 0]
    assert torch.equal(w.detach(), random_tensor(2, 3, 2, 5))


# --------------------------------------------------------------------------------------------------------------------
# controller


def rows_by_id(layer: MoELayer, opt: MoEAdam) -> dict[tuple[str, int], tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """Every row-wise parameter row and its optimizer state rows, keyed by (parameter name, expert id)."""
    out = {}
    params = [(layer.router.expert_ids, "router." + n, p) for n, p in layer.router.row_parameters().items()]
    params += [(layer.experts.expert_ids, "experts." + n, p) for n, p in layer.experts.weights().items()]
    for ids, name, p in params:
        state = opt.state[p]
        for pos, i in enumerate(ids.tolist()):
            out[(name, i)] = (p.detach()[pos].clone(), {k: state[k][pos].clone() for k in STATE_KEYS})
    return out


def run_to_first_event(init: str, dense_init=None, expert_bias: bool = False, **cfg):
    """Experts 1 and 3 never fire, 0 and 2 leave tokens unrouted; the window of 3 steps closes at step 3."""
    layer = make_layer(5, [0.3, IDLE, 0.1, IDLE], expert_bias=expert_bias)
    policy = PolicyConfig(init=init, direction="mean")  # the reference's gate row: the unrouted tokens' mean
    opt, ctrl = controller(layer, 1e-3, dense_init, record_steps=3, idle_steps=2, policy=policy, **cfg)
    loss = None
    for step in range(3):
        opt.zero_grad()
        y, aux = layer(make_tokens(70 + step, 32))
        loss = (y**2).sum() + aux.loss
        loss.backward()
        opt.step()
        if step < 2:
            assert ctrl.step() == []
    before = {
        "ids": layer.router.expert_ids.tolist(),
        "rows": rows_by_id(layer, opt),
        "tokens": dict(zip(layer.router.expert_ids.tolist(), layer.recorder.tokens.tolist())),
        "unrouted_sum": layer.recorder.unrouted[:-1].clone(),
        "unrouted_count": float(layer.recorder.unrouted[-1]),
    }
    return layer, opt, ctrl, before, ctrl.step(), loss


@pytest.mark.parametrize("end_step", [None, 5, 4, 3])
def test_no_event_closer_to_the_end_than_an_idle_window(end_step):
    """``AdaptConfig.end_step``: the window closing at step 3 acts when the run goes on for at least ``idle_steps``
    (2) more steps, or when no end is known; with 1 or 0 steps left it takes no event and starts a fresh window."""
    layer, _, ctrl, before, events, _ = run_to_first_event("copy", end_step=end_step)
    if end_step in (None, 5):
        assert [e.kind for e in events] == ["adapt"] and layer.router.expert_ids.tolist() == [0, 2, 4]
    else:
        assert events == [] and ctrl.events == []
        assert layer.router.expert_ids.tolist() == before["ids"] == [0, 1, 2, 3]
        assert not layer.recorder.tokens.any() and float(layer.recorder.unrouted[-1]) == 0.0


def test_new_expert_threshold_is_the_median_by_default():
    """Top-Any's default new_threshold="median": an added expert is as selective as the layer's median expert (the
    reference's 0 would accept every token on its side of the hyperplane)."""
    layer = MoELayer(D, FF, E, router={"kind": "top_any", "unrouted": "drop"}, seed=5).double().train()
    thresholds = torch.tensor([0.3, IDLE, 0.1, IDLE], dtype=torch.float64)
    with torch.no_grad():
        layer.router.threshold.copy_(thresholds)
    opt, ctrl = controller(layer, 1e-3, record_steps=3, idle_steps=2)
    events = []
    for step in range(3):
        opt.zero_grad()
        y, aux = layer(make_tokens(70 + step, 32))
        ((y**2).sum() + aux.loss).backward()
        opt.step()
        kept = layer.router.threshold.detach().clone()
        events = ctrl.step()
    (ev,) = events
    assert ev.added == [4] and ev.removed == [1, 3]
    new_threshold = float(layer.router.threshold.detach()[-1])
    assert new_threshold == float(kept[[0, 2]].median())  # the median of the experts that stay
    assert new_threshold != 0.0


@pytest.mark.parametrize("init", ["copy", "random", "dense"])
def test_controller_event_removes_idle_and_adds_one(init):
    dense = {"w_in": random_tensor(3, D, FF), "w_out": random_tensor(4, FF, D)} if init == "dense" else None
    layer, opt, ctrl, before, events, _ = run_to_first_event(init, dense)
    assert before["ids"] == [0, 1, 2, 3] and before["unrouted_count"] > 0
    assert sorted(i for i, t in before["tokens"].items() if t == 0) == [1, 3]
    assert before["tokens"][0] > 0 and before["tokens"][2] > 0

    assert len(events) == 1 and ctrl.events == events
    ev = events[0]
    assert (ev.kind, ev.added, ev.removed, ev.committed, ev.version, ev.step) == ("adapt", [4], [1, 3], True, 1, 3)
    assert ev.moved == [] and ev.bytes_moved == 0 and ev.layer == layer.name and ev.reason == ""

    assert layer.router.expert_ids.tolist() == [0, 2, 4] and layer.experts.expert_ids.tolist() == [0, 2, 4]
    assert layer.placement.expert_ids == (0, 2, 4) and layer.placement.version == 1
    assert layer.num_experts == 3 and int(layer.next_expert_id) == 5
    assert layer.recorder.tokens.shape == (3,) and not layer.recorder.tokens.any()
    group = opt.param_groups[0]["params"]
    for p in layer.row_parameters():
        assert p.shape[0] == 3
        assert any(p is q for q in group)
        state = opt.state[p]
        assert state["exp_avg"].shape == p.shape and state["exp_avg_sq"].shape == p.shape
        assert state["step"].shape == (3,)

    after = rows_by_id(layer, opt)
    names = ["router.weight", "router.threshold", "experts.w_in", "experts.w_out"]
    assert sorted({name for name, _ in after}) == sorted(names)
    for i in (0, 2):  # survivors: bit-exact weights and optimizer state
        for name in names:
            row, state = after[(name, i)]
            old_row, old_state = before["rows"][(name, i)]
            assert torch.equal(row, old_row), (name, i)
            for k in STATE_KEYS:
                assert torch.equal(state[k], old_state[k]), (name, i, k)
        assert int(after[("router.weight", i)][1]["step"]) == 3

    s = before["unrouted_sum"]
    torch.testing.assert_close(after[("router.weight", 4)][0], s / s.pow(2).sum().sqrt(), rtol=0, atol=1e-12)
    assert float(after[("router.threshold", 4)][0]) == 0.0
    for name in names:
        state = after[(name, 4)][1]
        assert not state["exp_avg"].any() and not state["exp_avg_sq"].any() and int(state["step"]) == 0

    if init == "copy":
        source = max((0, 2), key=lambda i: (before["tokens"][i], -i))
        assert source == 2  # not the first slot, so a copy from the wrong slot shows
        want = {n: before["rows"][("experts." + n, source)][0] for n in ("w_in", "w_out")}
    elif init == "random":
        want = layer.experts.fresh_rows(4)
    else:
        want = dense
    for n in ("w_in", "w_out"):
        assert torch.equal(after[("experts." + n, 4)][0], want[n]), n
    for n in ("w_in", "w_out"):  # the new expert's weights are not one of the removed or other experts' by accident
        others = [before["rows"][("experts." + n, i)][0] for i in (0, 1, 2, 3)]
        assert sum(torch.equal(after[("experts." + n, 4)][0], o) for o in others) == (1 if init == "copy" else 0)


def test_training_continues_after_an_event():
    layer, opt, ctrl, before, events, old_loss = run_to_first_event("copy")
    assert [e.committed for e in events] == [True] and old_loss.grad_fn is not None  # the old graph stays referenced
    for k in (1, 2):  # the two idle steps after the event
        opt.zero_grad()
        y, aux = layer(make_tokens(80 + k, 32).view(4, 8, D))
        loss = (y**2).sum() + aux.loss
        loss.backward()
        assert layer.router.weight.grad.shape == (3, D) and layer.router.threshold.grad.shape == (3,)
        assert layer.experts.w_in.grad.shape == (3, D, FF) and layer.experts.w_out.grad.shape == (3, FF, D)
        opt.step()
        assert ctrl.step() == []
        assert torch.isfinite(loss)
        assert opt.state[layer.router.weight]["step"].tolist() == [3 + k, 3 + k, k]
    assert layer.recorder.active  # the next window is open, sized for the new experts
    layer(make_tokens(90, 16))
    assert layer.recorder.tokens.shape == (3,)


def test_expert_ids_are_never_reused():
    layer = make_layer(6, [IDLE] * 3, num_experts=3)
    opt, ctrl = controller(layer, 1e-3, record_steps=1, idle_steps=0, policy=PolicyConfig(init="random"))
    used = {0, 1, 2}
    for step in range(4):
        with torch.no_grad():
            layer.router.threshold.fill_(IDLE)  # nothing fires: every expert idle, every token unrouted
        ids = layer.router.expert_ids.tolist()
        next_id = int(layer.next_expert_id)
        _, events = train_step(layer, opt, ctrl, [make_tokens(100 + step, 16)])
        assert len(events) == 1
        assert events[0].removed == sorted(ids)[1:]  # min_experts=1 keeps the lowest id
        assert events[0].added == [next_id] and next_id not in used
        used.add(next_id)
        assert int(layer.next_expert_id) == next_id + 1
        assert layer.router.expert_ids.tolist() == [0, next_id]
    assert sorted(used) == [0, 1, 2, 3, 4, 5, 6]


def test_no_event_without_a_decision_at_ep_size_1():
    layer = make_layer(7, [-5.0, 0.4, 0.4, 0.4])  # expert 0 takes every token, the others a few: skewed, none idle
    opt, ctrl = controller(layer, record_steps=2, idle_steps=1, rebalance_threshold=1.0)
    for step in range(2):
        opt.zero_grad()
        y, aux = layer(make_tokens(110 + step, 64))
        ((y**2).sum() + aux.loss).backward()
        opt.step()
        if step == 0:
            assert ctrl.step() == []
    tokens = layer.recorder.tokens.clone()
    assert (tokens > 0).all() and float(layer.recorder.unrouted[-1]) == 0.0
    assert float(tokens.max() / tokens.mean()) > 1.25  # a rebalance would trigger at ep_size > 1
    weights = {n: p.detach().clone() for n, p in layer.named_parameters()}
    assert ctrl.step() == [] and ctrl.events == []
    assert layer.router.expert_ids.tolist() == [0, 1, 2, 3] and layer.placement.version == 0
    assert int(layer.next_expert_id) == 4
    for n, p in layer.named_parameters():
        assert torch.equal(p.detach(), weights[n]), n
    assert not layer.recorder.tokens.any() and not layer.recorder.active


def test_expert_biases_are_rows_that_events_keep_copy_and_reset():
    """Biased experts (the drop-in layers'): survivors keep bias and state bit-exact, a copy takes its source's bias."""
    layer, opt, ctrl, before, events, _ = run_to_first_event("copy", expert_bias=True)
    assert events and layer.experts.expert_ids.tolist() == [0, 2, 4]
    after = rows_by_id(layer, opt)
    for name in ("experts.b_in", "experts.b_out"):
        for i in (0, 2):
            assert torch.equal(after[(name, i)][0], before["rows"][(name, i)][0]), (name, i)
            assert torch.equal(after[(name, i)][1]["exp_avg"], before["rows"][(name, i)][1]["exp_avg"]), (name, i)
        assert before["rows"][(name, 2)][0].abs().sum() > 0  # trained away from zero, so a wrong copy shows
        assert torch.equal(after[(name, 4)][0], before["rows"][(name, 2)][0])  # copied from the busiest survivor
        assert not after[(name, 4)][1]["exp_avg"].any()


def test_thresholds_train_at_their_own_rate_and_keep_it_through_an_event():
    """``optim.threshold_lr_scale``: Top-Any's thresholds in a group of their own at the scaled rate, the rest at the
    rate set; a committed event's new threshold parameter stays in that group."""
    layer = MoELayer(8, 16, 4, {"kind": "top_any"}, seed=0)
    opt = MoEAdam.for_moe(layer, lr=0.1, threshold_lr_scale=0.25)
    by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
    assert by_param[id(layer.router.threshold)]["lr"] == pytest.approx(0.025)
    assert by_param[id(layer.router.weight)]["lr"] == pytest.approx(0.1)
    opt.set_lr(0.2)
    assert by_param[id(layer.router.threshold)]["lr"] == pytest.approx(0.05)
    assert by_param[id(layer.router.weight)]["lr"] == by_param[id(layer.experts.w_in)]["lr"] == 0.2
    old = layer.router.threshold
    state = opt.rows_of(old, torch.arange(3))
    opt.install_rows(layer.router, "threshold", old.detach()[:3].clone(), state)
    group = next(g for g in opt.param_groups if any(p is layer.router.threshold for p in g["params"]))
    assert group["lr_scale"] == 0.25 and all(p is not old for g in opt.param_groups for p in g["params"])
    # at the default the thresholds share the rows' group, as before the option existed
    plain = MoELayer(8, 16, 4, {"kind": "top_any"}, seed=0)
    (rows,) = MoEAdam.for_moe(plain, lr=0.1).param_groups
    assert any(p is plain.router.threshold for p in rows["params"]) and rows["lr_scale"] == 1.0
