"""Bad settings and bad inputs raise errors that name the setting, the value and what is allowed."""

from __future__ import annotations

import re

import pytest
import torch

from dynmoe_dist import ConfigError, DynMoEError, MoELayer, NonFiniteError, ShapeError
from dynmoe_dist.routing import build_router

D, FF, E = 8, 16, 4
ALL_KINDS = ("importance_k", "null", "relu", "top_any", "top_k", "top_p")


def raises_config(match_parts: list[str]):
    """pytest.raises(ConfigError) whose message must contain every part (checked after the block)."""
    return _ConfigCheck(match_parts)


class _ConfigCheck:
    def __init__(self, parts):
        self.parts = parts
        self.ctx = pytest.raises(ConfigError)

    def __enter__(self):
        self.info = self.ctx.__enter__()
        return self.info

    def __exit__(self, *exc):
        suppressed = self.ctx.__exit__(*exc)
        message = str(self.info.value)
        for part in self.parts:
            assert part in message, f"{part!r} not in {message!r}"
        assert isinstance(self.info.value, (DynMoEError, ValueError))
        return suppressed


@pytest.mark.parametrize(
    ("router", "experts", "parts"),
    [
        ({"kind": "top_k", "k": 5}, 4, ["k=5", "num_experts=4"]),
        ({"kind": "top_k", "k": 9}, 8, ["k=9", "num_experts=8"]),
        ({"kind": "top_k", "k": 0}, 4, ["k=0", ">= 1"]),
        ({"kind": "importance_k", "k_max": 5}, 4, ["k_max=5", "num_experts=4"]),
        ({"kind": "null", "k": 7, "num_null": 2}, 4, ["k=7", "num_experts+num_null=6"]),
    ],
)
def test_k_larger_than_expert_count(router, experts, parts):
    with raises_config(parts):
        MoELayer(D, FF, experts, router=router)


@pytest.mark.parametrize("p", [0.0, -0.2, 1.5, 1.0000001])
def test_p_outside_unit_interval(p):
    with raises_config([f"p={p!r}", "(0, 1]"]) as info:
        MoELayer(D, FF, E, router={"kind": "top_p", "p": p})
    assert info.value.setting == "p" and info.value.value == p


@pytest.mark.parametrize("p", [1e-6, 0.4, 1.0])
def test_p_inside_unit_interval_is_accepted(p):
    MoELayer(D, FF, E, router={"kind": "top_p", "p": p})


@pytest.mark.parametrize("factor", [0, 0.0, -1.0, -0.5])
def test_capacity_factor_must_be_positive(factor):
    with raises_config(["capacity_factor", repr(factor), "> 0", "None"]):
        MoELayer(D, FF, E, capacity_factor=factor)


@pytest.mark.parametrize("experts", [0, -2])
def test_num_experts_at_least_one(experts):
    with raises_config(["num_experts", repr(experts), ">= 1"]):
        MoELayer(D, FF, experts)


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_router_num_experts_zero(kind):
    with raises_config(["num_experts=0", ">= 1"]):
        build_router(kind, D, 0)


@pytest.mark.parametrize("shape", [(2, 5, D + 1), (10, D - 1), (10,), (1, 2, 3, D)])
def test_hidden_size_mismatch(shape):
    layer = MoELayer(D, FF, E)
    with pytest.raises(ShapeError) as info:
        layer(torch.randn(*shape))
    message = str(info.value)
    assert f"d_model={D}" in message
    assert str(tuple(shape)) in message
    assert f"[batch, seq, {D}]" in message and f"[tokens, {D}]" in message


@pytest.mark.parametrize(
    ("importance", "parts"),
    [
        (torch.rand(11), ["11 tokens", "12"]),
        (torch.rand(2, 7), ["14 tokens", "12"]),
        (torch.softmax(torch.randn(2, 2, 5, 5), -1), ["10 tokens", "12"]),
        (torch.rand(2, 2, 6, 5), ["[batch, heads, seq, seq]", "(2, 2, 6, 5)"]),
        (torch.rand(2, 2, 3), ["(2, 2, 3)", "[batch, seq]"]),
    ],
)
def test_importance_of_wrong_shape(importance, parts):
    layer = MoELayer(D, FF, E, router={"kind": "importance_k", "k_max": 2})
    with pytest.raises(ShapeError) as info:
        layer(torch.randn(2, 6, D), importance)
    for part in parts:
        assert part in str(info.value), (part, str(info.value))


def bad_values(kind: str) -> torch.Tensor:
    importance = torch.rand(12)
    importance[3] = {"nan": float("nan"), "inf": float("inf"), "negative": -0.25}[kind]
    return importance


@pytest.mark.parametrize(
    ("importance", "parts"),
    [
        (bad_values("nan"), ["importance", "1 NaN", "finite values >= 0"]),
        (bad_values("inf"), ["importance", "1 infinite", "finite values >= 0"]),
        (bad_values("negative"), ["importance", "1 negative", "finite values >= 0"]),
        (torch.ones(12, dtype=torch.int64), ["importance dtype", "torch.int64", "floating-point"]),
        (torch.full((2, 2, 6, 6), float("nan")), ["importance", "144 NaN"]),
    ],
)
def test_importance_values_outside_the_allowed_range_are_refused(importance, parts):
    """NaN, infinite or negative importance would silently become some k: refused, naming the argument."""
    layer = MoELayer(D, FF, E, router={"kind": "importance_k", "k_max": 2})
    with raises_config(parts):
        layer(torch.randn(2, 6, D), importance)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
@pytest.mark.parametrize("gate", ["top_any", "top_k", "importance_k"])
def test_non_float_input_is_refused_naming_the_dtype(dtype, gate):
    layer = MoELayer(D, FF, E, router=gate, activation="gelu")
    with raises_config(["MoELayer input dtype", str(dtype), "floating-point", "embed token ids"]):
        layer(torch.ones(4, D, dtype=dtype))


def test_unknown_router_kind():
    with raises_config(["router.kind", "'top_q'", *ALL_KINDS]):
        MoELayer(D, FF, E, router="top_q")
    with raises_config(["router.kind", "'switch'"]):
        MoELayer(D, FF, E, router={"kind": "switch", "k": 1})


@pytest.mark.parametrize(
    ("router", "field", "known"),
    [
        ({"kind": "top_k", "topk": 2}, "topk", "renormalize"),
        ({"kind": "top_p", "threshold": 0.4}, "threshold", "entropy_weight"),
        ({"kind": "top_any", "temperature": 2.0}, "temperature", "trainable_temperature"),
        ({"kind": "null", "null_experts": 2}, "null_experts", "num_null"),
    ],
)
def test_unknown_router_field(router, field, known):
    with raises_config([f"router.{field}", "a field of", known]):
        MoELayer(D, FF, E, router=router)


def test_unknown_importance_function():
    with raises_config(["importance", "'attention_paid'", "attention_received"]):
        MoELayer(D, FF, E, router={"kind": "importance_k", "importance": "attention_paid"})


def test_unknown_activation():
    with raises_config(["activation", "'tanh'", "gelu", "relu", "swiglu"]):
        MoELayer(D, FF, E, activation="tanh")


@pytest.mark.parametrize(
    ("router", "parts"),
    [
        ({"kind": "top_any", "aux_weight": -1.0}, ["aux_weight=-1.0", ">= 0"]),
        ({"kind": "top_any", "balance_weight": -0.1}, ["balance_weight=-0.1", ">= 0"]),
        ({"kind": "relu", "l1_factor": 1.0}, ["l1_factor=1.0", "> 1"]),
        ({"kind": "relu", "target_active": 0.0}, ["target_active=0.0", "> 0"]),
        ({"kind": "importance_k", "k_max": 3, "fallback_k": 4}, ["fallback_k=4", "k_max=3"]),
    ],
)
def test_other_bad_router_settings(router, parts):
    with raises_config(parts):
        MoELayer(D, FF, E, router=router)


# --------------------------------------------------------------------------------------------------------------------
# non-finite values


def poisoned(value: float, token: int, shape=(3, 5, D)) -> torch.Tensor:
    x = torch.randn(*shape)
    x.view(-1, D)[token, 2] = value
    return x


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_non_finite_input_raises_when_checked(kind, value):
    torch.manual_seed(0)
    layer = MoELayer(D, FF, E, router=kind, check_finite=True)
    x = poisoned(value, token=7)
    x.view(-1, D)[11, 0] = value
    with pytest.raises(NonFiniteError) as info:
        layer(x)
    message = str(info.value)
    assert "input" in message
    assert "2 non-finite values" in message
    assert "NaN/Inf" in message
    assert "2 of 15 tokens" in message
    assert "first at token 7" in message
    assert "check_finite=False" in message
    assert isinstance(info.value, DynMoEError) and isinstance(info.value, FloatingPointError)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_non_finite_input_passes_when_unchecked(kind, value):
    torch.manual_seed(0)
    layer = MoELayer(D, FF, E, router=kind, check_finite=False)
    x = poisoned(value, token=3)
    y, aux = layer(x)  # no exception; the caller opted out of the check
    assert y.shape == x.shape


def test_non_finite_output_raises_when_checked():
    torch.manual_seed(0)
    layer = MoELayer(D, FF, E, router={"kind": "top_k", "k": E}, check_finite=True)
    with torch.no_grad():
        layer.experts.w_out[1, 0, 3] = float("inf")
    x = torch.randn(6, D)
    with pytest.raises(NonFiniteError, match=re.escape("MoE layer output has")) as info:
        layer(x)
    assert "of 6 tokens" in str(info.value)
    layer.check_finite = False
    y, _ = layer(x)
    assert not torch.isfinite(y).all()


def test_finite_input_passes_check():
    torch.manual_seed(0)
    layer = MoELayer(D, FF, E, check_finite=True)
    y, _ = layer(torch.randn(2, 5, D))
    assert torch.isfinite(y).all()
