"""Failures the job survives by itself, end to end, with the torch engine on CPU ranks.

A dead rank: SIGKILL to one rank of a 2-rank ``launch/torchrun.sh`` run at a random step. torchrun (``MAX_RESTARTS``,
3 by default) starts both ranks again, they resume from ``latest`` and the run ends with the parameters, optimizer
states, RNG states and metrics of an uninterrupted run, bit for bit.

A lost node: two torchrun agents on this machine as two nodes of an elastic run (``NNODES=1:2``, c10d rendezvous on
loopback), one rank each. SIGKILL to one node, its agent and its rank, at a random step: the other node meets the
rendezvous again alone, reloads ``latest`` at world size 1 (experts re-placed, data.global_batch kept by two
micro-batches) and trains to the end, ending exactly where a run resumed by hand from the same checkpoint at world
size 1 ends.

The launches run in the background of the suite (launch_support); tests/signal_driver.py kills from outside, the real
processes, and says when the run came back.
"""

from __future__ import annotations

import json
import os
import random
import re
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from launch_support import Commands, Done, Runs
from safetensors.torch import load_file

from dynmoe_dist.parallel.bootstrap import free_port

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DRIVER = HERE / "signal_driver.py"
STEPS = 16
EVERY = 4
ARGS = (
    "model=tiny",
    "parallel.device=cpu",
    "data=text",
    "data.val_fraction=0.1",
    "data.seq_len=32",
    "data.batch_size=4",
    "data.global_batch=8",  # one micro-batch per rank on 2 ranks, two on 1: the same sequences per step
    f"steps={STEPS}",
    "engine=torch",
    "logging.every=1",  # every step logged: the driver watches the steps, and the metrics compare step by step
    "logging.val_every=8",
    "logging.wandb=disabled",
    "logging.progress=lines",
    f"checkpoint.every={EVERY}",
    "checkpoint.keep=100",  # the checkpoint a restart resumed from stays for the run resumed by hand
    "adapt.record_steps=3",
    "adapt.idle_steps=1",
    "adapt.min_experts=2",
)
TIMEOUT_S = 300
# Short rendezvous timings for one machine: a node without a heartbeat for 3 s is gone, a round with fewer than the
# most nodes closes 5 s after the fewest joined. A cluster keeps torchrun's (5 s x 3) and the script's defaults.
RDZV = "last_call_timeout=5,keep_alive_interval=1,keep_alive_max_attempt=3,join_timeout=120"


def args(out: Path, name: str) -> list[str]:
    return [*ARGS, f"data.path={out / 'corpus.txt'}", f"out_dir={out}", f"name={name}"]


def env(**extra: str) -> dict[str, str]:
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK")
    base = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    return {**base, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, **extra}


def driver(metrics: Path, step: int, ranks: str) -> list[str]:
    cmd = [sys.executable, str(DRIVER), "--metrics", str(metrics), "--step", str(step), "--signal", "KILL"]
    return [*cmd, "--ranks", ranks, "--recovery", "--"]


def static(out: Path, name: str) -> list[str]:
    return ["launch/torchrun.sh", *args(out, name)]


def whole(out: Path) -> Commands:
    return [(static(out, "whole"), env(NPROC_PER_NODE="2", MASTER_PORT=str(free_port())))]


def killed(out: Path, step: int) -> Commands:
    """A rank killed at ``step``; MAX_RESTARTS left to the script's default."""
    cmd = [*driver(out / "killed" / "metrics.jsonl", step, "1"), *static(out, "killed")]
    return [(cmd, env(NPROC_PER_NODE="2", MASTER_PORT=str(free_port())))]


def elastic(out: Path, step: int) -> Commands:
    """Node 0 hosts the rendezvous (is_host=1) and stays; node 1 is killed at ``step``, its agent and its rank."""
    port = str(free_port())
    cmd = ["launch/torchrun.sh", *args(out, "elastic")]
    # The host starts 3 s later, so the other node already waits for its store: both join the first round at once
    # (a node later than last_call_timeout would make the first round a world of 1).
    later = ["sh", "-c", 'sleep 3 && exec "$0" "$@"', *cmd]
    nodes = []
    for host in (1, 0):
        node = env(NNODES="1:2", NPROC_PER_NODE="1", MASTER_ADDR="localhost", MASTER_PORT=port, RDZV_ID="restart-test")
        node["RDZV_CONF"] = f"is_host={host},{RDZV}"
        nodes.append((later if host else [*driver(out / "elastic" / "metrics.jsonl", step, "tree"), *cmd], node))
    return nodes


def resumed_from(output: str) -> Path:
    return Path(re.search(r"resumed from (\S+) \(step \d+, saved on 2 ranks\)", output).group(1))


def queue_launches(runs: Runs, wanted: set[str], tmp_path_factory: pytest.TempPathFactory) -> None:
    if not wanted:
        return
    out = runs.notes["out"] = tmp_path_factory.mktemp("restart")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    (out / "corpus.txt").write_bytes(b"".join((stdlib / n).read_bytes() for n in ("textwrap.py", "string.py")))
    pick = random.SystemRandom()
    if "test_a_dead_rank_restarts_by_itself_and_ends_bit_for_bit" in wanted:
        step = runs.notes["rank_step"] = pick.randint(EVERY + 1, STEPS - 3)
        runs.submit("whole", lambda: whole(out), TIMEOUT_S, cwd=REPO)
        runs.submit("killed", lambda: killed(out, step), TIMEOUT_S, cwd=REPO)
    if "test_a_lost_node_and_the_run_goes_on_at_world_size_1" in wanted:
        node_step = runs.notes["node_step"] = pick.randint(EVERY + 1, STEPS - 5)
        runs.submit("elastic", lambda: elastic(out, node_step), TIMEOUT_S, cwd=REPO)

        def by_hand() -> Commands:
            (survivor, _) = runs.result("elastic")
            start = resumed_from(survivor.output)
            cmd = [sys.executable, "-m", "dynmoe_dist.train", *args(out, "by_hand"), f"resume={start}"]
            return [(cmd, env())]

        runs.submit("by_hand", by_hand, TIMEOUT_S, cwd=REPO)


@pytest.fixture(scope="module")
def launches(background) -> Runs:
    return background.module(__name__)


def succeeded(launches: Runs, name: str) -> list[Done]:
    done = launches.result(name)
    for d in done:
        assert d.returncode == 0, d.output[-4000:]
    return done


def records(folder: Path, after: int = -1) -> list[dict]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    drop = ("time", "tokens_per_s", "peak_mem_mb")
    rows = [r for r in rows if r["kind"] in ("train", "val") and r["step"] > after]
    return [{k: v for k, v in r.items() if k not in drop} for r in rows]


def assert_same_checkpoint(a: Path, b: Path) -> None:
    files = sorted(p.name for p in a.glob("*.safetensors"))
    assert files and files == sorted(p.name for p in b.glob("*.safetensors")), (a, b)
    for name in files:  # parameters, Adam moments, expert ids, RNG states, adaptation windows
        x, y = load_file(a / name), load_file(b / name)
        assert set(x) == set(y), name
        for key in x:
            assert torch.equal(x[key], y[key]), f"{name}: {key}"


def recovery_seconds(output: str) -> float:
    return float(re.search(r"driver: back at step \d+ ([\d.]+) s after the signal", output).group(1))


def test_a_dead_rank_restarts_by_itself_and_ends_bit_for_bit(launches: Runs) -> None:
    out = launches.notes["out"]
    succeeded(launches, "whole")
    (done,) = succeeded(launches, "killed")  # no second launch: torchrun restarted the ranks
    output = done.output
    at = int(re.search(r"driver: SIGKILL to ranks \[1\] \(pids \[\d+\]\) at step (\d+)", output).group(1))
    assert at >= launches.notes["rank_step"]
    assert re.search(r"failed \(exitcode: -9\) local_rank: 1", output), output[-3000:]  # the kill, seen by torchrun
    start = resumed_from(output)
    assert start.parent == out / "killed" / "checkpoints"
    resumed = int(start.name.removeprefix("step_"))
    assert EVERY <= resumed <= at + 1 and at - resumed <= EVERY, (resumed, at)  # steps lost: those since the checkpoint
    assert recovery_seconds(output) < 120
    final = f"step_{STEPS:06d}"
    assert_same_checkpoint(out / "whole" / "checkpoints" / final, out / "killed" / "checkpoints" / final)
    assert records(out / "killed") == records(out / "whole")  # every step's loss, norm, routing; none twice


def test_a_lost_node_and_the_run_goes_on_at_world_size_1(launches: Runs) -> None:
    out = launches.notes["out"]
    survivor, lost = launches.result("elastic")
    assert survivor.returncode == 0, survivor.output[-4000:]
    assert "driver: SIGKILL to the launch's" in lost.output, lost.output[-3000:]
    at = int(re.search(r"processes \(pids \[[\d, ]+\]\) at step (\d+)", lost.output).group(1))
    assert at >= launches.notes["node_step"]
    # a world of 2 (its rank 0 on either node), then one of 1 on the node left, from a checkpoint the world of 2 wrote
    assert "training elastic: 2 ranks" in survivor.output + lost.output, survivor.output[-4000:]
    assert re.findall(r"training elastic: (\d+) ranks", survivor.output)[-1:] == ["1"], survivor.output[-4000:]
    assert survivor.output.count("resumed from") == 1
    start = resumed_from(survivor.output)
    resumed = int(start.name.removeprefix("step_"))
    assert EVERY <= resumed <= at + 1, (resumed, at)
    assert recovery_seconds(lost.output) < 150  # rendezvous, the new rank's start, the steps since the checkpoint
    (hand,) = succeeded(launches, "by_hand")
    assert f"resumed from {start} (step {resumed}, saved on 2 ranks)" in hand.output
    final = f"step_{STEPS:06d}"
    assert_same_checkpoint(out / "elastic" / "checkpoints" / final, out / "by_hand" / "checkpoints" / final)
    assert records(out / "elastic", after=resumed) == records(out / "by_hand", after=resumed)
    assert len(records(out / "by_hand", after=resumed)) > STEPS - resumed  # every step after it, and a validation


def test_a_restart_before_the_first_checkpoint_starts_the_run_over(tmp_path: Path, monkeypatch) -> None:
    """A worker torchrun restarted finds its own run folder without a checkpoint: it starts over (resume=auto would
    otherwise refuse to overwrite it on every restart); another configuration, or a first attempt, still refuses."""
    from dynmoe_dist.train.app import restarted_before_a_checkpoint

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("steps: 16\n")
    (run / "metrics.jsonl").write_text("")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert not restarted_before_a_checkpoint(run, "steps: 16\n")  # a first attempt: someone else's run
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert restarted_before_a_checkpoint(run, "steps: 16\n")
    assert not restarted_before_a_checkpoint(run, "steps: 17\n")  # another configuration
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "latest").write_text("step_000004\n")
    assert not restarted_before_a_checkpoint(run, "steps: 16\n")  # a checkpoint: resume=auto resumes from it
