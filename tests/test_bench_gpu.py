"""``python -m benchmarks gpu`` on the CPU at tiny shapes: the harness the GPU run relies on, not its figures.

What must hold before the command is worth a GPU's time: the peers (transformers' Mixtral block with grouped_mm
experts, DeepSpeed's MoE dropless and at capacity 1.0) are built from our layer's weights and compared with it before
anything is timed, a peer that computes something else is not timed and fails the run, a missing peer leaves its
columns empty with a note, every field the document promises is there, ratios are positive, and host syncs are
counted per module. No figure is asserted: at these shapes they mean nothing.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from benchmarks import gpu

SMOKE = ["--device", "cpu", "--tokens", "128", "--d-model", "32", "--dtype", "float32", "--check-tokens", "128"]
RATIO_FIELDS = ("", "_geomean", "_ci95", "_target", "_verdict")
RATIOS = {
    "top2": ("layer_over_experts", "ours_over_mixtral", "ours_over_ds", "ours_over_ds_cf1"),
    "top_any": ("layer_over_experts",),
}
SHAPE_FIELDS = ("gate", "experts", "d_model", "d_ff", "tokens", "rows", "avg_k", "layer_ms", "experts_ms", "syncs")
TOP2_FIELDS = (
    *SHAPE_FIELDS,
    "syncs_target",
    "peer_syncs",
    "checks",
    "ds_cf1_dropped",
    "mixtral_ms",
    "ds_ms",
    "ds_cf1_ms",
    "verdicts",
    *(f"{r}{f}" for r in RATIOS["top2"] for f in RATIO_FIELDS),
)
TOP_ANY_FIELDS = (*SHAPE_FIELDS, "syncs_target", "verdicts", *(f"layer_over_experts{f}" for f in RATIO_FIELDS))
META_FIELDS = ("device", "dtype", "tokens", "d_model", "k", "rounds", "warmup", "targets", "timing", "syncs", "skipped")


def run(tmp_path, *args: str) -> dict:
    out = tmp_path / "gpu.json"
    gpu.main([*SMOKE, *args, "--json", str(out)])
    return json.loads(out.read_text())


def test_gpu_bench_compares_every_peer_then_reports_every_field(tmp_path):
    doc = run(tmp_path, "--shapes", "4:64,8:32", "--rounds", "2", "--warmup", "0")
    rows = doc["results"]
    assert [(r["gate"], r["experts"], r["d_ff"]) for r in rows] == [
        ("top2", 4, 64),
        ("top_any", 4, 64),
        ("top2", 8, 32),
        ("top_any", 8, 32),
    ]
    meta = doc["meta"]
    for field in META_FIELDS:
        assert field in meta, field
    assert meta["device"] == "cpu" and meta["dtype"] == "float32" and meta["k"] == 2
    assert meta["skipped"] == {} and meta["check_failures"] == []
    assert meta["targets"] == {
        "layer_over_experts": {"top2": 1.15, "top_any": 1.25},
        "ours_over_peer": 0.8,
        "syncs": {"top2": 0, "top_any": 1},
    }
    for field in ("gpu", "gpu_capability", "torch", "cuda", "deepspeed"):
        assert field in meta["machine"], field
    assert meta["transformers"]

    for r in rows:
        fields = TOP2_FIELDS if r["gate"] == "top2" else TOP_ANY_FIELDS
        missing = [f for f in fields if r.get(f) is None]
        assert not missing, (r["gate"], r["experts"], missing)
        assert r["layer_ms"] > 0 and r["experts_ms"] > 0
        for key in RATIOS[r["gate"]]:
            assert r[key] > 0 and r[f"{key}_geomean"] > 0, key
            lo, hi = r[f"{key}_ci95"]
            assert 0 < lo <= hi, key
            assert r[f"{key}_verdict"] in ("met", "missed", "noise"), key

    for r in rows[0::2]:  # top-2: every route of every token, compared with both peers before the timing
        assert r["rows"] == 2 * 128 and r["avg_k"] == 2.0
        assert set(r["checks"]) == {"mixtral", "ds"}
        for peer, check in r["checks"].items():
            assert check["agrees"] and check["tokens"] == 128 and check["tokens_off"] == 0, peer
            assert check["output"] <= gpu.CHECK_TOLERANCE and check["input_grad"] <= gpu.CHECK_TOLERANCE, peer
        assert 0.0 <= r["ds_cf1_dropped"] <= 1.0
        for peer in ("mixtral", "ds", "ds_cf1"):
            assert r[f"{peer}_ms"] > 0
        # syncs are counted per module: none in our top-2 layer, DeepSpeed reads its capacity on the host
        assert r["syncs"] == 0
        assert r["peer_syncs"]["ds"] >= 1 and r["peer_syncs"]["ds_cf1"] >= 1
    for r in rows[1::2]:  # Top-Any calibrated to top-2's loads: two experts a token, plus the few it leaves unrouted
        assert 2.0 <= r["avg_k"] <= 2.25 and r["syncs"] >= 0


def test_a_peer_that_computes_something_else_is_not_timed_and_fails_the_run(tmp_path, monkeypatch):
    build = gpu.build_mixtral

    def off_by_one_weight(ours):
        block = build(ours)
        with torch.no_grad():
            block.experts.down_proj[1].mul_(1.5)  # expert 1's output: a quarter of the routes at 4 experts
        return block

    monkeypatch.setattr(gpu, "build_mixtral", off_by_one_weight)
    with pytest.raises(SystemExit, match="mixtral at 4 experts"):
        run(tmp_path, "--shapes", "4:64", "--rounds", "1", "--warmup", "0", "--peers", "mixtral")
    doc = json.loads((tmp_path / "gpu.json").read_text())
    top2 = doc["results"][0]
    assert not top2["checks"]["mixtral"]["agrees"] and top2["checks"]["mixtral"]["tokens_off"] > 0
    assert top2["mixtral_ms"] is None and top2["ours_over_mixtral"] is None
    assert top2["layer_over_experts"] > 0  # our own figures still come back
    assert doc["meta"]["check_failures"]


def test_a_peer_failing_when_timed_loses_its_column_not_the_run(tmp_path, monkeypatch):
    make = gpu.run_mixtral

    def fails_after_the_check(block):
        run, calls = make(block), []

        def call(x):
            calls.append(x.dtype)
            if len(calls) > 1:
                raise RuntimeError("no kernel for this dtype")
            return run(x)

        return call

    monkeypatch.setattr(gpu, "run_mixtral", fails_after_the_check)
    doc = run(tmp_path, "--shapes", "4:64", "--rounds", "1", "--warmup", "0", "--peers", "mixtral")
    assert "no kernel for this dtype" in doc["meta"]["skipped"]["mixtral"]
    top2 = doc["results"][0]
    assert top2["checks"]["mixtral"]["agrees"] and top2["mixtral_ms"] is None and top2["ours_over_mixtral"] is None
    assert top2["layer_over_experts"] > 0 and doc["results"][1]["layer_over_experts"] > 0


def test_a_missing_peer_leaves_its_columns_empty_with_a_note(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu, "deepspeed_unavailable", lambda: "deepspeed is not installed")
    doc = run(tmp_path, "--shapes", "4:64", "--rounds", "1", "--warmup", "0", "--peers", "deepspeed")
    assert "deepspeed column skipped: deepspeed is not installed" in capsys.readouterr().out
    assert doc["meta"]["skipped"] == {"deepspeed": "deepspeed is not installed"}
    top2 = doc["results"][0]
    assert top2["checks"] == {} and top2["ds_ms"] is None and top2["ours_over_ds_cf1"] is None
    assert top2["layer_over_experts"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_cuda_the_command_stops_at_once_saying_how_to_smoke_test(capsys):
    with pytest.raises(SystemExit, match="--device cpu"):
        gpu.main([])


def test_shapes_are_experts_and_hidden_sizes():
    assert gpu.parse_shapes("8:4096,64:512") == [(8, 4096), (64, 512)]
    for bad in ("8", "8:0", "a:b", ""):
        with pytest.raises(SystemExit, match="--shapes"):
            gpu.parse_shapes(bad)


def test_without_scipy_a_ratio_keeps_its_verdict_from_the_medians(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "scipy" else find_spec(name, *a))
    missed = gpu.ratio_stats([2.0, 2.2, 2.4], [1.0, 1.0, 1.0], 1.15)
    assert missed["value"] == pytest.approx(2.2) and missed["ci95"] is None and missed["verdict"] == "missed"
    assert gpu.ratio_stats([1.0, 1.1, 1.2], [1.0, 1.0, 1.0], 1.15)["verdict"] == "met"


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
    reason="the bf16 grouped GEMM needs a CUDA GPU of compute capability 8.0+",
)
def test_on_a_gpu_the_command_runs_in_bf16_with_cuda_events_and_sync_checks(tmp_path):
    out = tmp_path / "gpu.json"
    args = ["--tokens", "2048", "--d-model", "256", "--shapes", "8:512", "--rounds", "3", "--warmup", "1"]
    # Mixtral's block only: the suite runs DeepSpeed on its CPU accelerator (conftest), the command on a GPU does not
    gpu.main([*args, "--check-tokens", "1024", "--peers", "mixtral", "--json", str(out)])
    doc = json.loads(out.read_text())
    assert doc["meta"]["device"].startswith("cuda") and doc["meta"]["dtype"] == "bfloat16"
    assert doc["meta"]["machine"]["gpu"] and doc["meta"]["check_failures"] == []
    top2, top_any = doc["results"]
    assert top2["layer_over_experts"] > 0 and top_any["layer_over_experts"] > 0
    assert all(c["agrees"] for c in top2["checks"].values())
    assert top2["syncs"] == 0 and top_any["syncs"] <= 1  # set_sync_debug_mode("warn"), counted
