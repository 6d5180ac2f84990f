"""convert: a transformers MoE model on MoELayer computes what the original computes.

Oracles: for each of the five families (Mixtral, Qwen2-MoE with its gated shared expert, Qwen3-MoE renormalised,
OLMoE not renormalised, DeepSeek-V3 with sigmoid scores, a selection bias, grouped top-k, a scaling factor, a
shared expert and a dense first layer) the converted model's logits and the gradient of a loss with respect to the
input embeddings equal transformers' eager reference to 1e-5 in fp32, at 1 rank and at 2 ranks with the experts
sharded (expert-parallel size 2, each rank its own batch).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from dynmoe_dist.errors import ConfigError  # noqa: E402
from dynmoe_dist.hf import MOE_FAMILIES, MoEBlock, calibrate, convert, moe_aux_loss, moe_blocks  # noqa: E402

import dist_pool  # noqa: E402
import hf_support  # noqa: E402

ATOL = 1e-5


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf_convert")
    return {f: hf_support.save_tiny(f, root / f) for f in MOE_FAMILIES}


def compare(folder: Path, ids: torch.Tensor, groups=None) -> tuple[float, float, int]:
    """(max |logits diff|, max |embedding grad diff|, MoE blocks) of the converted model against the reference."""
    ref_logits, ref_grad = hf_support.logits_and_embedding_grad(hf_support.load(folder, train=True), ids)
    model = convert(hf_support.load(folder, train=True), groups=groups)
    logits, grad = hf_support.logits_and_embedding_grad(model, ids)
    return float((logits - ref_logits).abs().max()), float((grad - ref_grad).abs().max()), len(moe_blocks(model))


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_convert_reproduces_logits_and_embedding_gradients(folders, family: str) -> None:
    logits, grad, blocks = compare(folders[family], hf_support.tokens(1))
    assert logits < ATOL and grad < ATOL, (family, logits, grad)
    assert blocks == (1 if family == "deepseek_v3" else 2)  # DeepSeek-V3's first layer stays dense


def case_expert_parallel(folders: dict[str, str]) -> dict[str, tuple[float, float, int]]:
    """Every family converted with its experts sharded over 2 ranks, each rank its own batch."""
    import torch.distributed as dist

    groups = dist_pool.groups(2)
    return {f: compare(Path(p), hf_support.tokens(10 + dist.get_rank()), groups) for f, p in folders.items()}


def case_sharded_banks(folder: str) -> list[int]:
    model = convert(hf_support.load(Path(folder)), groups=dist_pool.groups(2))
    return [b.moe.experts.expert_ids.tolist() for _, b in moe_blocks(model)]


def test_convert_at_two_ranks_with_experts_sharded(folders) -> None:
    pool = dist_pool.pool(2)
    for rank_result in pool.run(case_expert_parallel, {f: str(p) for f, p in folders.items()}):
        for family, (logits, grad, _) in rank_result.items():
            assert logits < ATOL and grad < ATOL, (family, logits, grad)
    banks = pool.run(case_sharded_banks, str(folders["mixtral"]))
    assert banks == [[[0, 1], [0, 1]], [[2, 3], [2, 3]]]  # each rank holds only its experts


def test_converted_block_takes_the_weights_over_exactly(folders) -> None:
    ref = hf_support.load(folders["qwen2_moe"])
    old = ref.model.layers[0].mlp
    model = convert(hf_support.load(folders["qwen2_moe"]))
    block = model.model.layers[0].mlp
    assert isinstance(block, MoEBlock)
    moe = block.moe
    inter = old.experts.down_proj.shape[-1]
    assert torch.equal(moe.router.weight, old.gate.weight)
    assert torch.equal(moe.experts.w_gate[3], old.experts.gate_up_proj[3, :inter].t())
    assert torch.equal(moe.experts.w_in[3], old.experts.gate_up_proj[3, inter:].t())
    assert torch.equal(moe.experts.w_out[3], old.experts.down_proj[3].t())
    assert torch.equal(moe.shared.w_gate, old.shared_expert.gate_proj.weight.t())
    assert torch.equal(moe.shared.gate, old.shared_expert_gate.weight.t())
    assert moe.router.cfg.renormalize is False  # Qwen2-MoE's norm_topk_prob default
    deepseek = convert(hf_support.load(folders["deepseek_v3"])).model.layers[1].mlp.moe.router
    original = hf_support.load(folders["deepseek_v3"]).model.layers[1].mlp.gate
    assert torch.equal(deepseek.selection_bias, original.e_score_correction_bias)
    assert (deepseek.cfg.score, deepseek.cfg.num_groups, deepseek.cfg.top_groups) == ("sigmoid", 4, 2)
    assert not deepseek.selection_bias.requires_grad


def test_top_any_thresholds_start_at_the_models_top_k(folders) -> None:
    """router="top_any": the rows are the router's, and calibrated on a sample batch the average k is the model's
    top-k (2) on that batch, in training and in evaluation (where the few tokens left with k=0 take their best)."""
    model = convert(hf_support.load(folders["olmoe"]), router="top_any")
    blocks = [b for _, b in moe_blocks(model)]
    ref = hf_support.load(folders["olmoe"])
    assert torch.equal(blocks[0].moe.router.weight, ref.model.layers[0].mlp.gate.weight)
    sample = hf_support.tokens(5, batch=4, seq=16)
    assert calibrate(model, sample) == 2
    assert all(not b.pending_calibration for b in blocks)
    with torch.no_grad():
        model.train()(sample)
        train_k = [b.aux.stats.k_per_token.float().mean().item() for b in blocks]
        model.eval()(sample)
        eval_k = [b.aux.stats.avg_k for b in blocks]
    for k in train_k + eval_k:
        assert 1.5 <= k <= 2.5, (train_k, eval_k)
    assert calibrate(model, sample) == 0  # once only


def test_aux_losses_are_collected_from_the_blocks(folders) -> None:
    model = convert(hf_support.load(folders["mixtral"], train=True))
    assert model.config.output_router_logits is False
    model(hf_support.tokens(2))
    total = moe_aux_loss(model)
    assert torch.is_tensor(total) and total.requires_grad and float(total.detach()) > 0


def test_any_gate_takes_the_router_rows(folders) -> None:
    for gate in ("top_p", {"kind": "top_k", "k": 1}, "relu"):
        model = convert(hf_support.load(folders["mixtral"]), router=gate)
        moe = model.model.layers[1].mlp.moe
        original = hf_support.load(folders["mixtral"]).model.layers[1].mlp.gate.weight
        assert torch.equal(moe.router.weight, original), gate
        assert model(hf_support.tokens(3)).logits.isfinite().all()


def test_unsupported_models_are_refused_naming_the_supported(folders, tmp_path) -> None:
    dense = hf_support.load(hf_support.save_tiny("llama", tmp_path / "llama"))
    with pytest.raises(ConfigError, match="mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v3"):
        convert(dense)
    model = convert(hf_support.load(folders["mixtral"]))
    with pytest.raises(ValueError, match="no MoE block"):
        convert(model)
