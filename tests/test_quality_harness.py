"""`python -m benchmarks quality`, the harness only: tiny runs of the real training application, read back, cached,
refused when a variant changed. The figures themselves come from `make quality` (docs/BENCHMARKS.md)."""

from __future__ import annotations

import json

import pytest

from benchmarks import quality
from dynmoe_dist.train.model import Transformer
from tests.train_support import config

TINY = ["model=tiny", "parallel.device=cpu", "data.seq_len=32", "data.batch_size=4"]


def run_harness(tmp_path, *extra: str) -> dict:
    out = tmp_path / "quality.json"
    argv = ["--variants", "top2,top_any_t", "--steps", "20", "--seeds", "0", "1", "--nproc", "1"]
    argv += ["--runs-dir", str(tmp_path / "runs"), "--json", str(out), "--tag", "t"]
    for o in TINY:
        argv += ["--override", o]
    quality.main([*argv, *extra])
    return json.loads(out.read_text())


def test_quality_harness_trains_reads_back_and_caches(tmp_path, capsys):
    doc = run_harness(tmp_path)
    rows = {r["variant"]: r for r in doc["results"]}
    assert set(rows) == {"top2", "top_any_t"} and all(r["seeds"] == 2 and r["steps"] == 20 for r in rows.values())
    assert doc["meta"]["machine"]["cpu"] and doc["meta"]["world"] == 1

    # per expert: the model the run trained, counted by torch, against the harness's count from the resolved config
    cfg = config("moe=top_k", "adapt=off")
    model = Transformer(cfg.model, cfg.moe, seed=0)
    layer = model.moe_layers()[0]
    counted = sum(p.numel() for p in layer.experts.parameters()) // layer.num_experts
    top2 = rows["top2"]
    assert top2["avg_k"] == pytest.approx(2.0)  # top-2 runs exactly two experts per token
    assert top2["active_params"] == pytest.approx(2.0 * counted * len(model.moe_layers()))
    assert top2["loss_vs_top2"] == pytest.approx(1.0)
    for row in rows.values():
        losses = [r["val_loss"] for r in row["runs"]]
        assert row["val_loss_min"] == min(losses) and row["val_loss_max"] == max(losses)
        assert losses[0] != losses[1]  # the seeds really differ
        assert all(len(r["unrouted_over_time"]) == len(model.moe_layers()) for r in row["runs"])
    assert (tmp_path / "quality.png").exists() and (tmp_path / "quality_over_time.png").exists()

    # a second call trains nothing and reads the same figures back
    capsys.readouterr()
    again = run_harness(tmp_path, "--no-train")
    assert "4 cached" in capsys.readouterr().out
    assert [r["val_loss"] for r in again["results"]] == [r["val_loss"] for r in doc["results"]]

    # a run folder trained with other settings is refused, naming the folder and the fix
    with pytest.raises(SystemExit, match="remove the folder"):
        run_harness(tmp_path, "--override", "optim.lr=0.5")


def test_quality_harness_refuses_unknown_variants_and_missing_data(tmp_path):
    with pytest.raises(SystemExit, match="unknown variant.*top_any_demo"):
        quality.main(["--variants", "top3", "--runs-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="no such file or folder"):
        quality.main(["--data", str(tmp_path / "absent"), "--runs-dir", str(tmp_path)])
