"""The transformer the application trains: causal, tied, rotary, MoE every n-th block, DA-MoE's attention input,
auxiliary losses in the loss; the dense/MoE split DeepSpeed is given; bf16 activations against fp32 MoE parameters."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dynmoe_dist import MoELayer
from dynmoe_dist.train.engines import DenseView, dense_submodules
from dynmoe_dist.train.model import Attention, Transformer, apply_rotary, rotary_tables

from train_support import config


def model(*overrides: str) -> Transformer:
    cfg = config(*overrides)
    torch.manual_seed(0)
    return Transformer(cfg.model, cfg.moe, seed=3)


def tokens(b: int = 2, s: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (b, s), generator=torch.Generator().manual_seed(seed))


def test_moe_every_nth_block_and_dense_elsewhere() -> None:
    m = model("model.n_layers=6", "model.moe_every=3")
    assert [b.is_moe for b in m.blocks] == [False, False, True, False, False, True]
    assert all(isinstance(b.moe, MoELayer) for b in m.blocks if b.is_moe)
    assert [layer.name for layer in m.moe_layers()] == ["blocks.2.moe", "blocks.5.moe"]


@pytest.mark.parametrize("positions", ["rotary", "learned"])
def test_causal_and_tied(positions: str) -> None:
    m = model(f"model.positions={positions}", "moe=top_k", "moe.router.balance_weight=0").eval()
    x = tokens()
    y = x.clone()
    y[:, 15] = (y[:, 15] + 1) % 256
    with torch.no_grad():
        a, _ = m.logits(x)
        b, _ = m.logits(y)
    assert torch.allclose(a[:, :15], b[:, :15], atol=1e-6)  # nothing looks ahead
    assert not torch.allclose(a[:, 15:], b[:, 15:])
    names = [n for n, _ in m.named_parameters()]
    assert not any("head" in n for n in names)  # the output projection is the embedding
    assert ("pos.weight" in names) == (positions == "learned")


def test_rotary_scores_depend_on_relative_position_only() -> None:
    cos, sin = rotary_tables(32, 8)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(i: int, j: int) -> torch.Tensor:
        qi = apply_rotary(q.expand(1, 1, 32, 8), cos, sin)[0, 0, i]
        kj = apply_rotary(k.expand(1, 1, 32, 8), cos, sin)[0, 0, j]
        return qi @ kj

    assert torch.allclose(score(5, 2), score(20, 17), atol=1e-5)
    assert not torch.allclose(score(5, 2), score(5, 4), atol=1e-3)


def test_explicit_attention_equals_the_fused_kernel() -> None:
    torch.manual_seed(1)
    attn = Attention(32, 4, 0.0)
    x = torch.randn(2, 10, 32)
    cos, sin = rotary_tables(10, 8)
    fused, none = attn(x, (cos, sin), want_probs=False)
    explicit, probs = attn(x, (cos, sin), want_probs=True)
    assert none is None and torch.allclose(fused, explicit, atol=1e-5)
    assert torch.allclose(probs.sum(-1), torch.ones(2, 4, 10), atol=1e-6)
    assert float(probs.detach().triu(1).abs().max()) == 0.0  # causal


def test_importance_gate_gets_its_own_blocks_attention_probabilities() -> None:
    m = model("model.n_layers=4", "model.moe_every=2", "moe=importance_k").eval()
    seen = {}
    hooks = [
        layer.register_forward_pre_hook(
            lambda mod, args, kw: seen.__setitem__(mod.name, kw["importance"]), with_kwargs=True
        )
        for layer in m.moe_layers()
    ]
    explicit = []
    for block in m.blocks:
        original = block.attn.forward
        block.attn.forward = lambda x, r, want, f=original, b=block: explicit.append((b.is_moe, want)) or f(x, r, want)
    with torch.no_grad():
        m.logits(tokens())
    for h in hooks:
        h.remove()
    assert explicit == [(False, False), (True, True), (False, False), (True, True)]  # only where a gate needs it
    for i, block in enumerate(m.blocks):
        if block.is_moe:
            probs = seen[f"blocks.{i}.moe"]
            assert probs.shape == (2, block.attn.n_heads, 24, 24)
            assert torch.allclose(probs.sum(-1), torch.ones(2, block.attn.n_heads, 24), atol=1e-5)


def test_other_gates_get_no_attention_input() -> None:
    m = model("moe=top_any").eval()
    seen = []
    for layer in m.moe_layers():
        layer.register_forward_pre_hook(lambda mod, args, kw: seen.append(kw["importance"]), with_kwargs=True)
    with torch.no_grad():
        m.logits(tokens())
    assert seen == [None]


def test_every_moe_layers_aux_loss_enters_the_loss() -> None:
    m = model("model.n_layers=4", "model.moe_every=1", "moe=top_any")
    x = tokens()
    loss, info = m(x[:, :-1], x[:, 1:])
    assert len(info.moe) == 4 and all(float(a.loss.detach()) > 0 for a in info.moe)
    assert torch.allclose(loss, info.task_loss + sum(a.loss for a in info.moe))
    logits, _ = m.logits(x[:, :-1])
    assert torch.allclose(info.task_loss, F.cross_entropy(logits.reshape(-1, 256), x[:, 1:].reshape(-1)))
    loss.backward()  # the aux terms reach the gate parameters
    assert all(float(layer.router.weight.grad.abs().sum()) > 0 for layer in m.moe_layers())


def test_dense_view_holds_every_dense_parameter_and_no_moe_parameter() -> None:
    m = model("model.n_layers=4", "model.moe_every=2")
    view = DenseView(m)
    moe = {id(p) for layer in m.moe_layers() for p in layer.parameters()}
    dense = {id(p) for p in view.parameters()}
    assert dense.isdisjoint(moe) and dense | moe == {id(p) for p in m.parameters()}
    names = [name for name, _ in dense_submodules(m)]
    assert "embed" in names and "blocks.1.attn" in names and "blocks.0" in names
    x = tokens()
    assert torch.equal(view(x[:, :-1], x[:, 1:])[0], m(x[:, :-1], x[:, 1:])[0])  # the view runs the whole model


def test_bf16_activations_with_fp32_moe_parameters() -> None:
    """The MoE side under bf16 training: the gate routes in fp32, experts compute in bf16, gradients land in fp32."""
    torch.manual_seed(0)
    layer = MoELayer(32, 64, 4, router={"kind": "top_k", "k": 2})
    x = torch.randn(50, 32)
    ref, _ = layer(x)
    y, aux = layer(x.bfloat16())
    assert y.dtype == torch.bfloat16 and aux.stats.tokens_per_expert.sum() == 100
    assert torch.allclose(y.float(), ref, atol=0.05, rtol=0.05)
    plan32 = layer.route(x, None)
    plan16 = layer.route(x.bfloat16(), None)
    assert plan16.weight.dtype == torch.float32
    same = (plan16.expert == plan32.expert).float().mean()
    assert same > 0.97  # the same picks up to bf16 rounding of the input itself
    y.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in layer.parameters() if p.requires_grad)
