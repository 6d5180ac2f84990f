"""upcycle: a dense Llama, Mistral, Qwen2 or Qwen3 model whose MLPs became MoE layers of copies.

Oracle: at initialisation the upcycled model's logits equal the dense model's to 1e-5 (fp32) for every token, since
each token's expert weights sum to 1 (Top-Any's 1/k in evaluation, where a token no expert accepts takes its most
similar one with weight 1; renormalised top-k in training). Drop-Upcycling and noise make the experts differ, the
same way on every rank; a layer index out of range is refused before anything changes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from dynmoe_dist.errors import ConfigError  # noqa: E402
from dynmoe_dist.hf import DENSE_FAMILIES, MoEBlock, moe_blocks, upcycle  # noqa: E402

import hf_support  # noqa: E402

ATOL = 1e-5


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf_upcycle")
    return {f: hf_support.save_tiny(f, root / f) for f in DENSE_FAMILIES}


@pytest.mark.parametrize("family", DENSE_FAMILIES)
def test_upcycled_top_any_equals_the_dense_model_at_init(folders, family: str) -> None:
    ids = hf_support.tokens(1)
    with torch.no_grad():
        dense = hf_support.load(folders[family])(ids).logits
        model = upcycle(hf_support.load(folders[family]), num_experts=4)
        logits = model(ids).logits
    assert len(moe_blocks(model)) == 2 and model.model.layers[0].mlp.moe.router.cfg.kind == "top_any"
    assert float((logits - dense).abs().max()) < ATOL


def test_upcycled_top_k_equals_the_dense_model_in_training(folders) -> None:
    ids = hf_support.tokens(2)
    dense, dense_grad = hf_support.logits_and_embedding_grad(hf_support.load(folders["qwen2"], train=True), ids)
    model = upcycle(hf_support.load(folders["qwen2"], train=True), 4, router={"kind": "top_k", "k": 2})
    logits, grad = hf_support.logits_and_embedding_grad(model, ids)
    assert float((logits - dense).abs().max()) < ATOL
    assert float((grad - dense_grad).abs().max()) < ATOL


def test_only_the_chosen_layers_are_upcycled(folders) -> None:
    model = upcycle(hf_support.load(folders["llama"]), 3, layers=[1])
    assert not isinstance(model.model.layers[0].mlp, MoEBlock)
    block = model.model.layers[1].mlp
    assert isinstance(block, MoEBlock) and block.moe.num_experts == 3
    dense = hf_support.load(folders["llama"]).model.layers[1].mlp
    for e in range(3):  # every expert a copy of the MLP
        assert torch.equal(block.moe.experts.w_gate[e], dense.gate_proj.weight.t())
        assert torch.equal(block.moe.experts.w_in[e], dense.up_proj.weight.t())
        assert torch.equal(block.moe.experts.w_out[e], dense.down_proj.weight.t())


@pytest.mark.parametrize("layers", [[2], [-1], [0, 5]])
def test_a_layer_index_out_of_range_is_refused(folders, layers) -> None:
    model = hf_support.load(folders["mistral"])
    with pytest.raises(ConfigError, match=r"indices 0\.\.1 of the model's 2 decoder layers"):
        upcycle(model, 4, layers=layers)
    assert not moe_blocks(model)  # nothing changed


def test_unsupported_models_are_refused_naming_the_supported(tmp_path) -> None:
    moe = hf_support.load(hf_support.save_tiny("mixtral", tmp_path / "mixtral"))
    with pytest.raises(ConfigError, match="llama, mistral, qwen2, qwen3"):
        upcycle(moe, 4)
    with pytest.raises(ConfigError, match="num_experts"):
        upcycle(hf_support.load(hf_support.save_tiny("llama", tmp_path / "llama")), 0)


def test_drop_upcycling_reinitialises_a_fraction_of_each_expert(folders) -> None:
    dense = hf_support.load(folders["qwen3"]).model.layers[0].mlp
    model = upcycle(hf_support.load(folders["qwen3"]), 4, drop=0.25, seed=3)
    again = upcycle(hf_support.load(folders["qwen3"]), 4, drop=0.25, seed=3)
    bank = model.model.layers[0].mlp.moe.experts
    inter = bank.w_out.shape[1]
    changed_sets = []
    for e in range(4):
        changed = (bank.w_out[e] != dense.down_proj.weight.t()).any(-1)  # units whose down-projection row changed
        assert int(changed.sum()) == round(0.25 * inter)
        gate_changed = (bank.w_gate[e] != dense.gate_proj.weight.t()).any(0)
        assert torch.equal(gate_changed, changed)  # the same units in the gate projection
        changed_sets.append(changed)
    assert not all(torch.equal(changed_sets[0], c) for c in changed_sets[1:])  # each expert its own units
    assert torch.equal(bank.w_out, again.model.layers[0].mlp.moe.experts.w_out)  # a function of the seed


def test_noise_makes_the_experts_differ(folders) -> None:
    model = upcycle(hf_support.load(folders["llama"]), 2, noise=0.01)
    bank = model.model.layers[0].mlp.moe.experts
    dense = hf_support.load(folders["llama"]).model.layers[0].mlp.up_proj.weight.t()
    assert not torch.equal(bank.w_in[0], bank.w_in[1])
    ratio = (bank.w_in[0] / dense - 1).std().detach()
    assert 0.005 < float(ratio) < 0.02
