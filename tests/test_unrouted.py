"""The unrouted-token watch: a collapsing layer is warned about once, named, and recorded with its length."""

from __future__ import annotations

import torch

from dynmoe_dist import MoELayer
from dynmoe_dist.train.unrouted import COLLAPSE_STEPS, WATCHED, UnroutedWatch


def top_any_layer(threshold: float) -> MoELayer:
    """A Top-Any layer whose thresholds decide how many tokens pass: high thresholds route nothing."""
    layer = MoELayer(16, 32, 4, router={"kind": "top_any", "unrouted": "drop"}, name="blocks.1.moe", seed=3)
    with torch.no_grad():
        layer.router.threshold.fill_(threshold)
    return layer.train()


def auxes(layers: list[MoELayer], tokens: int = 64) -> list:
    x = torch.randn(tokens, 16, generator=torch.Generator().manual_seed(tokens))
    return [layer(x)[1] for layer in layers]


def test_a_layer_routing_nothing_is_warned_once_and_recorded_with_its_length() -> None:
    dead, alive = top_any_layer(10.0), top_any_layer(-10.0)
    alive.name = "blocks.3.moe"
    watch = UnroutedWatch([dead.name, alive.name], torch.device("cpu"))
    warnings = []
    for step in range(1, COLLAPSE_STEPS + 6):
        watch.observe(auxes([dead, alive]))
        said, ended = watch.step(step, None)
        warnings += [(step, text) for text in said]
        assert ended == []  # still collapsed: nothing has ended
    assert len(warnings) == 1
    step, text = warnings[0]
    assert step == COLLAPSE_STEPS and "blocks.1.moe" in text and "blocks.3.moe" not in text
    assert "100% unrouted" in text and "moe.router" in text  # says what to change
    assert watch.last == [1.0, 0.0]
    assert watch.longest == [COLLAPSE_STEPS + 5, 0]
    (event,) = watch.close(COLLAPSE_STEPS + 5)
    assert event == {
        "kind": "unrouted",
        "layer": "blocks.1.moe",
        "step": COLLAPSE_STEPS + 5,
        "start": 1,
        "steps": COLLAPSE_STEPS + 5,
        "peak_share": 1.0,
    }


def test_short_spells_are_counted_but_not_reported() -> None:
    dead, alive = top_any_layer(10.0), top_any_layer(-10.0)
    watch = UnroutedWatch([dead.name], torch.device("cpu"))
    said_all, ended_all = [], []
    for step in range(1, 41):  # alternate: 5 steps routing nothing, 5 routing everything
        layer = dead if (step - 1) // 5 % 2 == 0 else alive
        watch.observe(auxes([layer]))
        said, ended = watch.step(step, None)
        said_all += said
        ended_all += ended
    assert said_all == [] and ended_all == [] and watch.close(40) == []
    assert watch.longest == [5]


def test_micro_batches_of_one_step_add_up() -> None:
    """Two forwards before a step: the share is over both (a token count, not a mean of shares)."""
    dead, alive = top_any_layer(10.0), top_any_layer(-10.0)
    watch = UnroutedWatch([dead.name], torch.device("cpu"))
    watch.observe(auxes([dead], tokens=30))
    watch.observe(auxes([alive], tokens=90))
    watch.step(1, None)
    assert watch.last == [30 / 120]
    assert watch.step(2, None) == ([], [])  # nothing observed since: no step to close


def test_a_gate_that_leaves_tokens_out_by_design_is_measured_but_not_called_a_collapse() -> None:
    """ReLU routing and null experts give some tokens no real expert by their rule: the watch counts their streaks
    (metrics, the quality table) without a warning or an event; the trainer watches Top-Any layers only."""
    dead = top_any_layer(10.0)
    watch = UnroutedWatch([dead.name], torch.device("cpu"), watched=[False])
    for step in range(1, COLLAPSE_STEPS + 6):
        watch.observe(auxes([dead]))
        assert watch.step(step, None) == ([], [])
    assert watch.longest == [COLLAPSE_STEPS + 5] and watch.last == [1.0]
    assert watch.close(COLLAPSE_STEPS + 5) == []
    assert "top_any" in WATCHED and not {"relu", "null"} & WATCHED
