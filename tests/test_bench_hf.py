"""``python -m benchmarks hf`` runs at tiny shapes on 1 rank: both sides of both families trained, their losses
compared before timing, every documented field written. No figure is asserted: at these shapes they mean nothing."""

from __future__ import annotations

import argparse
import json
import time

import pytest
import torch

pytest.importorskip("transformers")

from benchmarks import hf

TINY = ["--d-model", "16", "--d-ff", "32", "--experts", "4", "--layers", "1", "--heads", "2", "--vocab", "64"]
TINY += ["--seq", "8", "--batch", "2", "--repeats", "1", "--warmup", "0", "--worlds", "1"]
FIELDS = (
    "transformers_ms",
    "ours_ms",
    "time_ratio",
    "transformers_peak_mb",
    "ours_peak_mb",
    "mem_ratio",
    "loss_rel_diff",
    "experts_per_rank",
)


def test_bench_hf_compares_then_reports_every_field(tmp_path):
    out = tmp_path / "hf.json"
    hf.main([*TINY, "--json", str(out)])
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "hf" and doc["meta"]["worlds"] == [1]
    assert doc["meta"]["machine"]["processes"] == 1 and doc["meta"]["transformers"]
    assert [r["family"] for r in doc["results"]] == list(hf.FAMILIES)
    for r in doc["results"]:
        assert all(r[k] > 0 for k in FIELDS if k != "loss_rel_diff"), r
        # the losses of two steps were compared, and agreed, before anything was timed
        assert r["losses_compared"] == 2 and r["loss_rel_diff"] <= hf.LOSS_TOLERANCE
        assert r["time_ratio"] == pytest.approx(r["ours_ms"] / r["transformers_ms"])
        assert r["mem_ratio"] == pytest.approx(r["ours_peak_mb"] / r["transformers_peak_mb"])
        assert r["experts_per_rank"] == r["experts"] == 4 and r["transformers_experts_impl"] == "grouped_mm"
        # the peak counts at least the weights and AdamW's two moments of the model (4 bytes each, fp32)
        params = sum(p.numel() for p in hf.build_transformers(r["family"], doc_shapes(doc)).parameters())
        assert r["transformers_peak_mb"] * 2**20 >= 3 * 4 * params


def doc_shapes(doc: dict):
    m = doc["meta"]
    return argparse.Namespace(
        vocab=m["vocab"], d_model=m["d_model"], layers=m["layers"], heads=m["heads"], seq=m["seq"], d_ff=m["d_ff"],
        experts=m["experts"], top_k=m["top_k"],
    )  # fmt: skip


def test_bench_hf_refuses_to_time_different_computations(monkeypatch):
    """Losses that differ by more than the tolerance stop the run before any timing (sides faked: no model built)."""
    losses = iter([[2.0, 1.5], [2.0, 1.5 * (1 + 2 * hf.LOSS_TOLERANCE)]])  # transformers', then ours
    monkeypatch.setattr(hf, "built_and_measured", lambda make, batches: (None, next(losses), 1))
    monkeypatch.setattr(hf, "interleaved_medians", lambda *args: pytest.fail("timed after a disagreement"))
    shapes = argparse.Namespace(vocab=8, batch=1, seq=4, warmup=0, repeats=1, lr=1e-3)
    with pytest.raises(RuntimeError, match="differ from transformers'"):
        hf.family_row("mixtral", 0, 1, shapes)


def test_peak_bytes_counts_what_is_alive_at_once():
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        kept = torch.zeros(1000, 100)  # 400 kB, alive throughout
        since = time.time_ns()
        a = torch.zeros(2000, 100)  # 800 kB
        del a
        b = torch.zeros(500, 100)  # 200 kB, alive with the kept one
        del b
    assert hf.peak_bytes(prof, since) == 400_000 + 800_000
    assert kept.numel()
