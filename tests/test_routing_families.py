"""The top-k gate's options for pretrained families (sigmoid scores, selection bias, grouped top-k, scaling), against
a plain restatement of each rule; the defaults route as before."""

from __future__ import annotations

import pytest
import torch

from dynmoe_dist.errors import ConfigError
from dynmoe_dist.routing import TopKConfig, TopKRouter, router_config

D, E = 8, 8


def router(**options) -> TopKRouter:
    torch.manual_seed(0)
    r = TopKRouter(D, E, TopKConfig(balance_weight=0.0, **options))
    with torch.no_grad():
        r.weight.normal_()
    return r


def pairs(r: TopKRouter, x: torch.Tensor) -> dict[tuple[int, int], float]:
    with torch.no_grad():
        a = r.route(x, None)
    return {(int(t), int(e)): float(w) for t, e, w in zip(a.token, a.expert, a.weight)}


def test_sigmoid_scores_with_selection_bias_groups_and_scaling() -> None:
    r = router(k=2, score="sigmoid", selection_bias=True, num_groups=4, top_groups=2, scaling=2.5)
    with torch.no_grad():
        r.selection_bias.copy_(torch.linspace(-0.3, 0.3, E))
    x = torch.randn(16, D, generator=torch.Generator().manual_seed(1))
    got = pairs(r, x)
    scores = torch.sigmoid(x @ r.weight.detach().t())
    choice = scores + r.selection_bias
    want = {}
    for t in range(16):
        groups = choice[t].view(4, 2).sum(-1)  # two experts a group: the sum of its two best is the sum
        kept = groups.topk(2).indices.tolist()
        allowed = [e for e in range(E) if e // 2 in kept]
        chosen = sorted(allowed, key=lambda e: -float(choice[t, e]))[:2]
        total = sum(float(scores[t, e]) for e in chosen)
        want.update({(t, e): 2.5 * float(scores[t, e]) / total for e in chosen})
    assert got.keys() == want.keys()
    for key, w in want.items():
        assert abs(got[key] - w) < 1e-6


def test_the_selection_bias_moves_the_choice_not_the_weight() -> None:
    r = router(k=1, renormalize=False, selection_bias=True)
    x = torch.randn(4, D, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        r.selection_bias.copy_(torch.tensor([0.0, 0.0, 5.0, 0, 0, 0, 0, 0]))  # expert 2 always chosen
    a = r.route(x, None)
    assert a.expert.tolist() == [2, 2, 2, 2]
    probs = torch.softmax(x @ r.weight.detach().t(), -1)
    assert torch.allclose(a.weight, probs[:, 2])
    assert "selection_bias" in r.row_parameters() and not r.selection_bias.requires_grad


def test_defaults_route_as_before() -> None:
    x = torch.randn(10, D, generator=torch.Generator().manual_seed(3))
    r = router(k=2)
    probs = torch.softmax(x @ r.weight.detach().t(), -1)
    values, columns = probs.topk(2)
    a = r.route(x, None)
    assert a.expert.tolist() == columns.reshape(-1).tolist()
    assert torch.allclose(a.weight, (values / values.sum(-1, keepdim=True)).reshape(-1))
    assert r.row_parameters().keys() == {"weight"}


def test_groups_must_divide_the_expert_count() -> None:
    r = TopKRouter(D, 6, TopKConfig(num_groups=4, top_groups=2))
    with pytest.raises(ConfigError, match="a divisor of the expert count"):
        r.route(torch.randn(3, D), None)


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"score": "tanh"}, "score"),
        ({"num_groups": 0}, "num_groups"),
        ({"num_groups": 2, "top_groups": 3}, "top_groups"),
    ],
)
def test_bad_options_name_the_field(options, field) -> None:
    with pytest.raises(ConfigError, match=field):
        router_config({"kind": "top_k", **options})
