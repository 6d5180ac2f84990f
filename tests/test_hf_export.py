"""export -> from_pretrained: the loaded model computes what the exported one computed, to 1e-5 in fp32.

Two formats: a converted model that keeps its family's top-k rule goes out in the family's own format and classes
(transformers' own class loads every tensor of the folder, missing none), with the expert count
adaptation left and ids renumbered; an upcycled Top-Any model (and any other dynamic rule) goes out as our registered
``dynmoe_<family>`` type, which ``from_pretrained`` and ``generate()`` take after ``import dynmoe_dist.hf``. Both
after adaptation removed an expert and added one; with the experts sharded over 2 ranks, every rank exports and the
experts are gathered.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

pytest.importorskip("transformers")

import transformers  # noqa: E402

from dynmoe_dist.adapt import Decision, ExpertMigration, NewExpert  # noqa: E402
from dynmoe_dist.hf import convert, export, moe_blocks, shard, upcycle  # noqa: E402
from dynmoe_dist.layer import MoELayer  # noqa: E402
from dynmoe_dist.optim import MoEAdam  # noqa: E402
from dynmoe_dist.placement import PlacementTable  # noqa: E402

import dist_pool  # noqa: E402
import hf_support  # noqa: E402

ATOL = 1e-5


def adapt(layer: MoELayer, remove: list[int], source: int) -> None:
    """One committed adaptation: ``remove`` these ids, add one expert copied from ``source``."""
    opt = MoEAdam.for_moe(layer, lr=1e-3)
    new_id = int(layer.next_expert_id)
    row = F.normalize(torch.randn(layer.d_model, generator=torch.Generator().manual_seed(new_id)), dim=0)
    decision = Decision(remove=remove, add=[NewExpert(new_id, row, "copy", source)])
    ids = [i for i in layer.router.expert_ids.tolist() if i not in remove] + [new_id]
    table = PlacementTable.contiguous(ids, 1, version=layer.placement.version + 1)
    event = ExpertMigration(layer, opt, None).run(decision, table, "adapt", 1, dict.fromkeys(ids, 1.0))
    assert event.committed, event.reason


def load_exported(folder: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        folder, local_files_only=True, experts_implementation="eager", dtype=torch.float32
    ).eval()


def test_converted_top_k_model_exports_in_its_family_format(tmp_path) -> None:
    model = convert(hf_support.load(hf_support.save_tiny("qwen2_moe", tmp_path / "src"))).eval()
    for _, block in moe_blocks(model):
        adapt(block.moe, remove=[1], source=2)  # ids 0, 2, 3, 4
    assert model.model.layers[0].mlp.moe.router.expert_ids.tolist() == [0, 2, 3, 4]
    ids = hf_support.tokens(4)
    with torch.no_grad():
        want = model(ids).logits
    out = export(model, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen2_moe" and config["num_experts"] == 4 and "dynmoe" not in config
    back = load_exported(out)
    assert type(back) is transformers.Qwen2MoeForCausalLM
    with torch.no_grad():
        assert float((back(ids).logits - want).abs().max()) < ATOL
    # transformers' own class takes every tensor of the folder and needs no other: nothing of ours is in it
    _, info = transformers.Qwen2MoeForCausalLM.from_pretrained(out, local_files_only=True, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info


def test_upcycled_top_any_model_exports_as_our_registered_type(tmp_path) -> None:
    model = upcycle(hf_support.load(hf_support.save_tiny("llama", tmp_path / "src")), 4, noise=0.05).eval()
    for _, block in moe_blocks(model):
        adapt(block.moe, remove=[0, 2], source=3)  # ids 1, 3, 4
        with torch.no_grad():  # thresholds that differ by expert, so a wrong row shows
            block.moe.router.threshold.copy_(torch.tensor([0.05, -0.1, 0.2]))
    ids = hf_support.tokens(5)
    with torch.no_grad():
        want = model(ids).logits
    out = export(model, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "dynmoe_llama"
    assert {k: v["num_experts"] for k, v in config["dynmoe"]["layers"].items()} == {"0": 3, "1": 3}
    back = load_exported(out)
    assert type(back).__name__ == "DynMoELlamaForCausalLM"
    moe = back.model.layers[0].mlp.moe
    assert moe.router.expert_ids.tolist() == [0, 1, 2] and int(moe.next_expert_id) == 3  # renumbered
    with torch.no_grad():
        assert float((back(ids).logits - want).abs().max()) < ATOL
    generated = back.generate(ids[:1, :4], max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, 7)


def test_converted_dynamic_model_exports_as_our_type(tmp_path) -> None:
    """A DeepSeek-V3 model made Top-Any (a dense first layer, a shared expert, calibrated thresholds) round trips."""
    model = convert(hf_support.load(hf_support.save_tiny("deepseek_v3", tmp_path / "src")), router="top_any")
    ids = hf_support.tokens(6)
    with torch.no_grad():
        model.eval()(ids)  # calibrates the thresholds
        want = model(ids).logits
    back = load_exported(export(model, tmp_path / "out"))
    assert type(back).__name__ == "DynMoEDeepseekV3ForCausalLM"
    with torch.no_grad():
        assert float((back(ids).logits - want).abs().max()) < ATOL


def test_export_refuses_a_model_without_moe_blocks(tmp_path) -> None:
    with pytest.raises(ValueError, match="convert or upcycle it first"):
        export(hf_support.load(hf_support.save_tiny("llama", tmp_path / "src")), tmp_path / "out")


def case_export_sharded(folder: str, out: str) -> tuple[float, list[list[int]]]:
    """Experts sharded over 2 ranks, one removed and one added on every rank together; every rank calls export,
    rank 0 writes, and the single-process model loaded back computes what the sharded one did on this rank's batch."""
    groups = dist_pool.groups(2)
    model = convert(hf_support.load(Path(folder)), groups=groups).eval()
    for _, block in moe_blocks(model):
        layer = block.moe
        opt = MoEAdam.for_moe(layer, lr=1e-3)
        new_id = int(layer.next_expert_id)
        row = F.normalize(torch.randn(layer.d_model, generator=torch.Generator().manual_seed(new_id)), dim=0)
        decision = Decision(remove=[0], add=[NewExpert(new_id, row, "copy", 3)])
        ids = [1, 2, 3, new_id]
        table = PlacementTable.from_owners(ids, [1, 0, 0, 1], 2, version=1)  # 3 moves to rank 0
        assert ExpertMigration(layer, opt, groups).run(decision, table, "adapt", 1, dict.fromkeys(ids, 1.0)).committed
    ids = hf_support.tokens(20 + dist.get_rank())
    with torch.no_grad():
        want = model(ids).logits
    export(model, out)
    back = load_exported(Path(out))
    with torch.no_grad():
        single = float((back(ids).logits - want).abs().max())
    # our format: a Top-Any model exported from 2 ranks, loaded back and sharded again with ``shard``
    dynamic = convert(hf_support.load(Path(folder)), router="top_any", groups=groups).eval()
    with torch.no_grad():
        dynamic(hf_support.tokens(30 + dist.get_rank()))  # calibrates (thresholds averaged over the ranks)
        want = dynamic(ids).logits
    export(dynamic, out + "_top_any")
    back = shard(load_exported(Path(out + "_top_any")), groups)
    local = [b.moe.experts.expert_ids.tolist() for _, b in moe_blocks(back)]
    with torch.no_grad():
        resharded = float((back(ids).logits - want).abs().max())
    return max(single, resharded), local


def test_export_gathers_sharded_experts(tmp_path) -> None:
    folder = hf_support.save_tiny("mixtral", tmp_path / "src")
    results = dist_pool.pool(2).run(case_export_sharded, str(folder), str(tmp_path / "out"))
    assert all(diff < ATOL for diff, _ in results), results
    assert [local for _, local in results] == [[[0, 1], [0, 1]], [[2, 3], [2, 3]]]  # resharded by id
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_local_experts"] == 4
