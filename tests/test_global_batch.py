"""data.global_batch: one run on 1, 2 or 4 ranks sees the same sequences per optimizer step (gradient accumulation over
micro-batches of data.batch_size per rank) and, with the torch engine, the same losses, events and parameters.

The oracle runs in float64 (engine.precision=fp64; the loss itself is float32) with the balance term off (a
per-micro-batch statistic), so only the order of sums differs between world sizes; adaptation windows count optimizer
steps, so the same events fall at the same steps whether a step is one micro-batch or four.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist

from dynmoe_dist.errors import ConfigError
from dynmoe_dist.parallel.groups import single_process_groups
from dynmoe_dist.train.config import check_config, micro_batches
from dynmoe_dist.train.data import SequenceStream
from dynmoe_dist.train.trainer import Trainer

import dist_pool
from train_support import EVENTS, config, seed_events, small_corpus

GLOBAL = 8
STEPS = 8
OVERRIDES = (
    *EVENTS,
    "moe.router.balance_weight=0.0",
    "engine=torch",
    "engine.precision=fp64",
    "data.batch_size=2",
    f"data.global_batch={GLOBAL}",
    f"steps={STEPS}",
)


def case_losses() -> dict:
    world = dist.get_world_size() if dist.is_initialized() else 1
    # 4 ranks as 2 expert-parallel x 2 data-parallel: at ep_size=4 the losses after the step-3 add already differ from
    # one process's without any accumulation (a placement question of its own, not the global batch's)
    groups = dist_pool.groups(min(world, 2)) if world > 1 else single_process_groups()
    cfg = config(*OVERRIDES)
    t = Trainer(cfg, small_corpus(), groups, torch.device("cpu"))
    seed_events(t.model)
    losses, events = [], []
    for _ in range(STEPS):
        r = t.train_step()
        losses.append(r.loss)
        events += [(e.step, e.kind, e.added, e.removed) for e in r.events if e.committed]
    params = {n: p.detach().clone() for n, p in t.model.named_parameters() if ".moe." not in n}
    return {"micro": t.micro_batches, "losses": losses, "events": events, "dense": params, "tokens": t.state.tokens}


def mean_losses(results: list[dict]) -> list[float]:
    """The global mean loss per step: each rank's loss is the mean over its equal share of the global batch."""
    return [sum(step) / len(step) for step in zip(*(r["losses"] for r in results))]


def test_one_two_and_four_ranks_train_alike() -> None:
    one = [case_losses()]
    two = dist_pool.pool(2).run(case_losses)
    four = dist_pool.pool(4).run(case_losses)
    assert [r["micro"] for r in (one[0], two[0], four[0])] == [4, 2, 1]  # micro-batches per step
    assert one[0]["events"], "the run should see adaptation events"
    for results in (two, four):
        assert results[0]["events"] == one[0]["events"]  # at the same optimizer steps
        assert mean_losses(results) == pytest.approx(one[0]["losses"], rel=1e-6)
        assert results[0]["tokens"] == one[0]["tokens"] == STEPS * GLOBAL * 32
        for name, value in one[0]["dense"].items():
            torch.testing.assert_close(results[0]["dense"][name], value, rtol=1e-6, atol=1e-7)


def test_a_step_holds_the_same_sequences_on_any_world() -> None:
    """Across an epoch's end too: the tail that does not fill a global batch is skipped the same way."""
    tokens = np.arange(101 * 32 + 1)  # sequence i starts with token 32 i: its first token names it
    seen: dict[int, list[list[int]]] = {}
    for world in (1, 2, 4):
        streams = [SequenceStream(tokens, 32, 2, r, world, 7, 10**6, global_batch=GLOBAL) for r in range(world)]
        per_step = []
        for _ in range(3 * streams[0].count // GLOBAL + 2):  # more than an epoch
            step = []
            for _ in range(GLOBAL // (2 * world)):
                step += [int(x) for s in streams for x in s.next_batch()[0][:, 0]]
            per_step.append(sorted(step))
        seen[world] = per_step
    assert seen[1] == seen[2] == seen[4]


def test_a_global_batch_that_no_micro_batch_count_fits_is_refused_with_the_nearest_values() -> None:
    cfg = config("data.batch_size=4", "data.global_batch=20")
    with pytest.raises(ConfigError) as err:
        check_config(cfg, 2)
    message = str(err.value)
    assert "data.global_batch" in message and "data.global_batch=16 or 24" in message
    assert "data.batch_size=2 or 5" in message  # 20 over 2 ranks: 10 per rank, in micro-batches of 2 or 5
    check_config(config("data.batch_size=4", "data.global_batch=24"), 2)
    assert micro_batches(config("data.batch_size=4", "data.global_batch=24").data, 2) == 3
    with pytest.raises(ConfigError, match="data.global_batch=8"):
        check_config(config("data.batch_size=4", "data.global_batch=5"), 2)


def case_engine(engine: str, stage: int) -> list[float]:
    from train_support import deepspeed_env

    deepspeed_env()
    engine_args = (f"engine={engine}", f"engine.zero_stage={stage}", "engine.precision=fp32")
    cfg = config(*EVENTS, "moe.router.balance_weight=0.0", "data.batch_size=2", "data.global_batch=8", *engine_args)
    t = Trainer(cfg, small_corpus(), dist_pool.groups(2), torch.device("cpu"))
    seed_events(t.model)
    return [t.train_step().loss for _ in range(3)]


@pytest.mark.parametrize("stage", [0, 2])
def test_deepspeed_accumulates_like_the_torch_engine(stage: int) -> None:
    """DeepSpeed counts the micro-batches itself (gradient_accumulation_steps): the same losses as the torch engine."""
    pool = dist_pool.pool(2)
    torch_losses = pool.run(case_engine, "torch", 0)
    ds_losses = pool.run(case_engine, "deepspeed", stage)
    assert torch_losses[0] == pytest.approx(ds_losses[0], rel=1e-5)
