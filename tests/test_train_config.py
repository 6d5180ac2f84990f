"""The hydra application's configuration: every preset composes and passes its checks; every bad key, type or
combination is refused with a message naming it, before any process group starts."""

from __future__ import annotations

import os
import sys

import pytest
from hydra.errors import ConfigCompositionException
from launch_support import Commands, Launches, Runs
from omegaconf.errors import ConfigKeyError, ValidationError

from dynmoe_dist.errors import ConfigError
from dynmoe_dist.parallel.bootstrap import free_port
from dynmoe_dist.train.config import CONFIG_DIR, adapt_config, check_config, load_config, router_spec

GROUPS = ("model", "moe", "adapt", "parallel", "engine", "optim", "data", "logging")


def presets(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def test_every_group_the_issue_names_exists_with_presets() -> None:
    for group in GROUPS:
        assert presets(group), group
    assert {"top_any", "top_k", "top_p", "importance_k", "relu", "null_experts", "demo"} <= set(presets("moe"))
    assert {"demo", "dynmoe_paper", "off"} <= set(presets("adapt"))


@pytest.mark.parametrize("gate", ["top_any", "top_k", "top_p", "importance_k", "relu", "null_experts"])
def test_each_gate_preset_is_valid_and_selects_its_gate(gate: str) -> None:
    cfg = load_config([f"moe={gate}"])
    check_config(cfg, world_size=2)
    assert router_spec(cfg.moe)["kind"] == {"null_experts": "null"}.get(gate, gate)


def test_deepseek_preset_has_fine_grained_and_shared_experts() -> None:
    cfg = load_config(["moe=deepseek"])
    check_config(cfg, world_size=2)
    assert (cfg.moe.num_experts, cfg.moe.num_shared_experts, router_spec(cfg.moe)["kind"]) == (16, 2, "top_k")


def test_default_demo_and_paper_schedule() -> None:
    demo = load_config([])
    check_config(demo, world_size=2)
    assert (demo.engine.name, demo.moe.router.kind, demo.adapt.enabled) == ("deepspeed", "top_any", True)
    paper = load_config(["adapt=dynmoe_paper"])
    check_config(paper, world_size=8)
    assert (paper.adapt.record_steps, paper.adapt.idle_steps, paper.adapt.init) == (300, 600, "copy")


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        (["model.foo=1"], "model.foo"),
        (["moe.router.temperature=2"], "temperature"),
        (["model.d_model=wide"], "model.d_model"),
        (["optim.lr=fast"], "optim.lr"),
        (["adapt.enabled=maybe"], "adapt.enabled"),
        (["moe=no_such_gate"], "no_such_gate"),
    ],
)
def test_unknown_keys_and_wrong_types_are_named_by_hydra(overrides: list[str], names: str) -> None:
    with pytest.raises((ConfigCompositionException, ConfigKeyError, ValidationError)) as err:
        load_config(overrides)
    text = f"{err.value} {err.value.__cause__ or ''}"
    assert names in text, text


@pytest.mark.parametrize(
    ("overrides", "world", "setting", "hint"),
    [
        (["parallel.ep_size=3"], 2, "parallel.ep_size", "divisor of the world size 2"),
        (["adapt.min_experts=9", "adapt.max_experts=8"], 2, "max_experts", "min_experts"),
        (["data.seq_len=512"], 2, "data.seq_len", "model.max_seq_len=256"),
        (["moe.router.p=0.5"], 2, "moe.router.p", "top_p"),
        (["moe=top_k", "moe.router.trainable_temperature=true"], 2, "moe.router.trainable_temperature", "top_any"),
        (["moe=top_p", "moe.router.p=1.5"], 2, "moe.router.p", "(0, 1]"),
        (["moe=top_k", "moe.router.k=3", "adapt.min_experts=2"], 2, "moe.router.k", "adapt.min_experts"),
        (["moe.num_experts=20"], 2, "moe.num_experts", "adapt.max_experts=16"),
        (["moe.shadow_experts=-1"], 2, "moe.shadow_experts", "0: no shadows"),
        (["moe.shadow_min_rows=0"], 2, "moe.shadow_min_rows", "an integer >= 1"),
        (["engine=torch", "engine.zero_stage=2"], 2, "engine.zero_stage", "engine=torch"),
        (["engine.zero_stage=3"], 2, "engine.zero_stage", "0, 1 or 2"),
        (["+engine.deepspeed.gradient_clipping=1.0"], 2, "engine.deepspeed.gradient_clipping", "optim.grad_clip"),
        (["model.n_heads=3"], 2, "model.n_heads", "divisor of model.d_model"),
        (["model.moe_every=5"], 2, "model.moe_every", "model.n_layers=4"),
        (["adapt.init=dense"], 2, "adapt.init", "copy | random"),
        (["moe.gemm=mkl"], 2, "moe.gemm", "auto | loop | onednn | grouped_mm"),
        (["adapt.max_experts_per_rank=4"], 2, "adapt.max_experts_per_rank", "so that 16 experts fit"),
        (["data=text"], 2, "data.path", "text"),
        (["engine.precision=fp16"], 2, "engine.precision", "bf16"),
        (["engine.precision=fp64"], 2, "engine.precision", "fp64: torch"),
    ],
)
def test_combinations_that_cannot_work_are_refused(overrides, world, setting, hint) -> None:
    cfg = load_config(overrides) if "data=text" not in overrides else load_config([*overrides, "data.path=null"])
    with pytest.raises(ConfigError) as err:
        check_config(cfg, world_size=world)
    assert err.value.setting == setting, str(err.value)
    assert hint in str(err.value), str(err.value)


def queue_launches(runs: Runs, wanted: set[str], tmp_path_factory: pytest.TempPathFactory) -> None:
    """At the start of the session (launch_support): the two command-line runs, which run beside the other tests."""
    if "test_cli_refuses_before_any_process_group_starts" in wanted:
        out = runs.notes["refuses"] = tmp_path_factory.mktemp("refuses")

        def refuses() -> Commands:
            env = {
                **os.environ,
                "RANK": "0",
                "WORLD_SIZE": "2",
                "LOCAL_RANK": "0",
                "LOCAL_WORLD_SIZE": "2",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(free_port()),
            }
            return [([sys.executable, "-m", "dynmoe_dist.train", "parallel.ep_size=3", f"out_dir={out}"], env)]

        runs.submit("refuses", refuses, 120, split=True)
    if "test_cli_names_an_unknown_key" in wanted:
        out = tmp_path_factory.mktemp("unknown")
        cmd = [sys.executable, "-m", "dynmoe_dist.train", "model.layers=4", f"out_dir={out}"]
        runs.submit("unknown", lambda: [(cmd, dict(os.environ))], 120, split=True)


@pytest.fixture(scope="module")
def launches(background: Launches) -> Runs:
    return background.module(__name__)


def test_cli_refuses_before_any_process_group_starts(launches: Runs) -> None:
    """Rank 0 of a 2-rank launch whose peer never comes: a bad combination must end it at once, not at a timeout."""
    (proc,) = launches.result("refuses")
    assert proc.returncode == 2, proc.stderr
    assert "parallel.ep_size=3" in proc.stderr and "divisor of the world size 2" in proc.stderr
    assert proc.seconds < 60  # no rendezvous wait (the collective timeout is 600 s)
    assert not any(launches.notes["refuses"].iterdir())  # nothing written


def test_cli_names_an_unknown_key(launches: Runs) -> None:
    (proc,) = launches.result("unknown")
    assert proc.returncode != 0
    assert "model.layers" in proc.stderr and "not in 'ModelConfig'" in proc.stderr, proc.stderr


def test_adaptation_knows_the_end_of_the_run_unless_told_to_act_at_every_window():
    cfg = load_config(["steps=300"])
    assert adapt_config(cfg.adapt, cfg.steps).end_step == 300
    reference = load_config(["steps=300", "adapt=dynmoe_paper", "adapt.skip_near_end=false"])
    assert adapt_config(reference.adapt, reference.steps).end_step is None
