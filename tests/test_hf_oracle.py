"""The distributed == single-process oracle for Hugging Face models in the training application: a converted Mixtral
and an upcycled Qwen3 (tiny random models, Top-Any) trained by the ``Trainer`` at 2 ranks (experts sharded) end where
one process ends that takes the whole global batch, through adds, removes and a rebalance.

The torch engine in float64 to 1e-9 (only the order of sums differs), DeepSpeed (ZeRO 1 and 2, float32) against the
single process in float32 to float tolerance. The global batch is fixed (2 ranks x 4 sequences, 1 x 8), so both see
the same sequences per step; the balance term, a per-rank batch statistic, is off (as in test_training_oracle.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("transformers")

from test_hf_app import MODELS, make_folders, overrides, steps, trainer

import dist_pool
from train_support import by_id

GLOBAL = 8


def values(t) -> dict[str, torch.Tensor]:
    """Parameters and optimizer moments, MoE ones by expert id (placement and step counters left out)."""
    return {k: v for k, v in by_id(t).items() if not k.startswith(("placement/", "ids/")) and not k.endswith("@step")}


def run(args: tuple[str, ...], world: int) -> dict:
    t = trainer((*args, f"data.batch_size={GLOBAL // world}", f"data.global_batch={GLOBAL}"), world)
    history = steps(t, 12)
    return {"history": history, "values": values(t)}


def case_run(args: tuple[str, ...]) -> dict:
    return run(args, dist.get_world_size())


def compare(one: dict, two: list[dict], rel: float, tol: float) -> None:
    """Losses, norms, the same adds and removes (one process has no rebalance to make), every value by expert id."""
    changes = [[(a, r) for _, a, r, _ in step if a or r] for *_, step in one["history"]]
    assert any(changes), changes
    for r in two:
        events = [e for *_, step in r["history"] for e in step]
        assert any(e[0] == "rebalance" and e[3] for e in events), events
        assert [[(a, r) for _, a, r, _ in step if a or r] for *_, step in r["history"]] == changes
    # each rank's loss is the mean over its half of the global batch: their mean is the global mean loss
    for step, (a, *ranks) in enumerate(zip(one["history"], *(r["history"] for r in two))):
        assert sum(r[0] for r in ranks) / len(ranks) == pytest.approx(a[0], rel=rel), f"step {step + 1}"
        assert all(r[1] == pytest.approx(a[1], rel=rel) for r in ranks), f"step {step + 1}"
    held = {k: v for r in two for k, v in r["values"].items()}
    assert set(held) == set(one["values"])
    diffs = {k: float((held[k].double() - v.double()).abs().max()) for k, v in one["values"].items() if v.numel()}
    worst = max(diffs.items(), key=lambda kv: kv[1])
    assert worst[1] < tol, worst


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    return make_folders(tmp_path_factory.mktemp("hf_oracle"))


@pytest.mark.parametrize("kind", list(MODELS))
def test_torch_engine_at_two_ranks_equals_one_process(folders, tmp_path: Path, kind: str) -> None:
    args = overrides(kind, folders, str(tmp_path), "engine=torch", "engine.precision=fp64")
    compare(run(args, 1), dist_pool.pool(2).run(case_run, args), rel=1e-9, tol=1e-9)


@pytest.mark.parametrize(("kind", "stage"), [("convert", 2), ("upcycle", 1)])
def test_deepspeed_at_two_ranks_equals_one_process(folders, tmp_path: Path, kind: str, stage: int) -> None:
    one = run(overrides(kind, folders, str(tmp_path), "engine=torch"), 1)
    args = overrides(kind, folders, str(tmp_path), "engine=deepspeed", f"engine.zero_stage={stage}")
    compare(one, dist_pool.pool(2).run(case_run, args), rel=1e-5, tol=1e-5)
