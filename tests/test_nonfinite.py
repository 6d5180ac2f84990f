"""A NaN on one rank skips the optimizer step on every rank (no parameter, no optimizer state, no adaptation
statistic changes), counted in the metrics; ``optim.max_skipped`` in a row stop the run with the step named and
``latest`` the last good checkpoint. Real ranks on gloo; the NaN enters one rank's activations from its data."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from dynmoe_dist.checkpoint import latest
from dynmoe_dist.errors import NonFiniteError
from dynmoe_dist.train.trainer import Trainer

import dist_pool
from train_support import EVENTS, by_id, config, deepspeed_env, seed_events, small_corpus


class Sink:
    def __init__(self) -> None:
        self.records: list[dict] = []

    def metrics(self, record: dict) -> None:
        self.records.append(record)

    def event(self, record: dict) -> None:
        pass


def poison(t: Trainer, when) -> None:
    """On rank 1, multiply the embedding's output by NaN in the training forwards for which ``when()`` is true."""

    def hook(module, args, output):
        return output * math.nan if module.training and when() else output

    if dist.get_rank() == 1:
        t.model.embed.register_forward_hook(hook)


def windows(t: Trainer) -> dict[str, torch.Tensor]:
    return {m.name: torch.cat([m.recorder.tokens, m.recorder.unrouted]).clone() for m in t.model.moe_layers()}


def case_skip(engine: tuple[str, ...]) -> dict:
    deepspeed_env()
    t = Trainer(config(*EVENTS, "steps=20", *engine), small_corpus(), dist_pool.groups(2), torch.device("cpu"))
    seed_events(t.model)
    armed = [False]
    poison(t, lambda: armed[0])
    t.train_step()
    before, window = by_id(t), windows(t)
    armed[0] = True
    bad = t.train_step()
    armed[0] = False
    after, window_after = by_id(t), windows(t)
    good = t.train_step()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    return {
        "skipped": (bad.skipped, good.skipped),
        "changed": changed,
        "window_same": all(torch.equal(window[k], window_after[k]) for k in window),
        "window_grew": any(not torch.equal(window[k], windows(t)[k]) for k in window),
        "good_loss": good.loss,
        "count": t.state.skipped,
        "warning": bad.warnings,
        "moved": [k for k in before if not torch.equal(before[k], by_id(t)[k])],
    }


@pytest.mark.parametrize("engine", [("engine=torch",), ("engine=deepspeed", "engine.zero_stage=2")])
def test_a_nan_on_one_rank_skips_the_step_on_every_rank(engine: tuple[str, ...]) -> None:
    for rank, r in enumerate(dist_pool.pool(2).run(case_skip, engine)):
        assert r["skipped"] == (True, False), rank
        assert r["changed"] == [], f"rank {rank}: a skipped step changed {r['changed'][:5]}"
        assert r["window_same"] and r["window_grew"]  # forgotten by the window; the next step is recorded
        assert math.isfinite(r["good_loss"]) and r["count"] == 1
        assert r["moved"], "the step after it trains again"
        assert r["warning"] == ["skipped: NaN or Inf in the loss on rank(s) [1]"]


def case_stop(root: str) -> dict:
    cfg = config(*EVENTS, "engine=torch", "steps=12", "checkpoint.every=4", "optim.max_skipped=3", "logging.every=1")
    sink = Sink() if dist.get_rank() == 0 else None
    t = Trainer(cfg, small_corpus(), dist_pool.groups(2), torch.device("cpu"), sink, checkpoint_root=Path(root))
    seed_events(t.model)
    poison(t, lambda: t.state.step >= 4)  # steps 5, 6 and 7 are bad
    try:
        t.fit()
    except NonFiniteError as exc:
        error = str(exc)
    else:
        error = ""
    skipped = [r["skipped_steps"] for r in sink.records if r["kind"] == "train"] if sink else []
    return {"error": error, "skipped": skipped, "latest": latest(Path(root)).name}


def test_max_skipped_in_a_row_stop_the_run_and_latest_stays_good(tmp_path: Path) -> None:
    results = dist_pool.pool(2).run(case_stop, str(tmp_path))
    for r in results:
        assert r["error"].startswith("step 7: 3 optimizer steps in a row skipped (optim.max_skipped=3)"), r["error"]
        assert "rank(s) [1]" in r["error"] and "optim.lr" in r["error"] and "(step 4)" in r["error"]
        assert r["latest"] == "step_000004"
    assert results[0]["skipped"] == [0, 0, 0, 0, 1, 2]  # one train record per step, the count through step 6
