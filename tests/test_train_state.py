"""The trainer's state is complete: a trainer rebuilt from it (with the parameters and optimizer states) continues
exactly as the original, through the close of an adaptation window that was open at the time."""

from __future__ import annotations

import copy

import torch

from dynmoe_dist.parallel.groups import single_process_groups
from dynmoe_dist.train.trainer import Trainer

from train_support import config, small_corpus


def build() -> Trainer:
    cfg = config(
        "moe=top_any",
        "moe.num_experts=6",
        "adapt.record_steps=6",
        "adapt.idle_steps=2",
        "adapt.min_experts=2",
        "adapt.max_experts=8",
        "engine=torch",
        "model.dropout=0.1",  # the RNG stream matters too
        "steps=20",
    )
    trainer = Trainer(cfg, small_corpus(), single_process_groups(), torch.device("cpu"))
    with torch.no_grad():
        for layer in trainer.model.moe_layers():
            layer.router.threshold.fill_(0.15)  # unrouted tokens: the window's record decides an add
    return trainer


def test_state_dict_resumes_exactly_across_an_adaptation_window() -> None:
    original = build()
    for _ in range(4):  # inside the first recording window (steps 1-6)
        original.train_step()
    saved = {
        "trainer": copy.deepcopy(original.state_dict()),
        "model": copy.deepcopy(original.model.state_dict()),
        "dense": copy.deepcopy(original.engine.dense_opt.state_dict()),
        "moe": copy.deepcopy(original.moe_opt.state_dict()),
    }
    expected = [original.train_step() for _ in range(6)]
    assert any(r.events for r in expected)  # the window that was open at the save closed with an event

    resumed = build()
    resumed.model.load_state_dict(saved["model"])
    resumed.engine.dense_opt.load_state_dict(saved["dense"])
    resumed.moe_opt.load_state_dict(saved["moe"])
    resumed.load_state_dict(saved["trainer"])
    got = [resumed.train_step() for _ in range(6)]
    assert [r.loss for r in got] == [r.loss for r in expected]
    assert [[e.as_dict() | {"seconds": 0} for e in r.events] for r in got] == [
        [e.as_dict() | {"seconds": 0} for e in r.events] for r in expected
    ]
    assert resumed.state_dict()["train"]["step"] == original.state.step == 10
    for (name, a), b in zip(original.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
