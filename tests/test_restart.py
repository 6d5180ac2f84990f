"""Failures the job survives by itself, end to end, with the torch engine on CPU ranks.

A dead rank: SIGKILL to one rank of a 2-rank ``launch/torchrun.sh`` run at a random step. torchrun (``MAX_RESTARTS``,
3 by default) starts both ranks again, they resume from ``latest`` and the run ends with the parameters, optimizer
states, RNG states and metrics of an uninterrupted run, bit for bit.

A lost node: two torchrun agents on this machine as two nodes of an elastic run (``NNODES=1:2``, c10d rendezvous on
loopback), one rank each. SIGKILL to one node, its agent and its rank, at a random step: the other node meets the
rendezvous again alone, reloads ``latest`` at world size 1 (experts re-placed, data.global_batch kept by two
micro-batches) and trains on, step for step as a run resumed by hand from the same checkpoint at world size 1. Then
the node comes back (its agent started again): the agent left asks its rank to stop, the rank checkpoints (SIGTERM is
a preemption) and the next round is a world of 2 again, which resumes from that checkpoint and ends the run.

The launches run in the background of the suite (launch_support); tests/signal_driver.py kills from outside, the real
processes, and says when the run came back.
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

import pytest
from failure_runs import (
    EVERY,
    FINAL,
    REPO,
    STEPS,
    TIMEOUT_S,
    args,
    assert_same_checkpoint,
    driver,
    env,
    folder,
    records,
    torchrun,
    uninterrupted,
)
from launch_support import Commands, Done, Runs

from dynmoe_dist.checkpoint.manifest import MANIFEST
from dynmoe_dist.parallel.bootstrap import free_port

# Short rendezvous timings for one machine: a node without a heartbeat for 3 s is gone, a round with fewer than the
# most nodes closes 5 s after the fewest joined. A cluster keeps torchrun's (5 s x 3) and the script's defaults.
RDZV = "last_call_timeout=5,keep_alive_interval=1,keep_alive_max_attempt=3,join_timeout=120"


def killed(out: Path, step: int) -> Commands:
    """A rank killed at ``step``; MAX_RESTARTS left to the script's default."""
    cmd = [*driver(out / "killed" / "metrics.jsonl", step, "KILL", "1", "--recovery"), *torchrun(out, "killed")]
    return [(cmd, env(NPROC_PER_NODE="2", MASTER_PORT=str(free_port())))]


def elastic(out: Path, step: int) -> Commands:
    """Node 0 hosts the rendezvous (is_host=1) and stays; node 1 is killed at ``step``, its agent and its rank, and
    comes back once the run goes on at world size 1."""
    port = str(free_port())
    cmd = torchrun(out, "elastic")
    # The host starts 3 s later, so the other node already waits for its store: both join the first round at once
    # (a node later than last_call_timeout would make the first round a world of 1).
    later = ["sh", "-c", 'sleep 3 && exec "$0" "$@"', *cmd]
    nodes = []
    for host in (1, 0):
        node = env(NNODES="1:2", NPROC_PER_NODE="1", MASTER_ADDR="localhost", MASTER_PORT=port, RDZV_ID="restart-test")
        node["RDZV_CONF"] = f"is_host={host},{RDZV}"
        kill = driver(out / "elastic" / "metrics.jsonl", step, "KILL", "tree", "--recovery", "--rejoin")
        nodes.append((later if host else [*kill, *cmd], node))
    return nodes


LOST_NODE = "test_a_lost_node_and_the_run_goes_on_at_world_size_1_then_2_when_it_returns"


def resumed_from(output: str) -> Path:
    return Path(re.search(r"resumed from (\S+) \(step \d+, saved on 2 ranks\)", output).group(1))


def queue_launches(runs: Runs, wanted: set[str], tmp_path_factory: pytest.TempPathFactory) -> None:
    if not wanted & {"test_a_dead_rank_restarts_by_itself_and_ends_bit_for_bit", LOST_NODE}:
        return
    out = runs.notes["out"] = folder(runs, tmp_path_factory)
    pick = random.SystemRandom()
    if "test_a_dead_rank_restarts_by_itself_and_ends_bit_for_bit" in wanted:
        step = runs.notes["rank_step"] = pick.randint(EVERY + 1, STEPS - 3)
        runs.submit("killed", lambda: killed(out, step), TIMEOUT_S, cwd=REPO)
    if LOST_NODE in wanted:
        node_step = runs.notes["node_step"] = pick.randint(EVERY + 1, STEPS - 5)
        runs.submit("elastic", lambda: elastic(out, node_step), TIMEOUT_S, cwd=REPO)

        def by_hand() -> Commands:
            """At world size 1 from the checkpoint the world of 1 resumed from, with a checkpoint where that world
            stopped for the node that came back."""
            (survivor, lost) = runs.result("elastic")
            start = resumed_from(survivor.output)
            back = re.search(r"\(step (\d+), saved on 1 ranks\)", survivor.output + lost.output)
            every = [f"checkpoint.every={back.group(1) if back else EVERY}"]
            argv = [a for a in args(out, "by_hand") if not a.startswith("checkpoint.every=")] + every
            return [([sys.executable, "-m", "dynmoe_dist.train", *argv, f"resume={start}"], env())]

        runs.submit("by_hand", by_hand, TIMEOUT_S, cwd=REPO)


@pytest.fixture(scope="module")
def launches(background) -> Runs:
    return background.module(__name__)


def succeeded(launches: Runs, name: str) -> list[Done]:
    done = launches.result(name)
    for d in done:
        assert d.returncode == 0, d.output[-4000:]
    return done


def recovery_seconds(output: str) -> float:
    return float(re.search(r"driver: back at step \d+ ([\d.]+) s after the signal", output).group(1))


def test_a_dead_rank_restarts_by_itself_and_ends_bit_for_bit(launches: Runs) -> None:
    out = launches.notes["out"]
    whole = uninterrupted(launches)
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
    assert_same_checkpoint(whole / "checkpoints" / FINAL, out / "killed" / "checkpoints" / FINAL)
    assert records(out / "killed") == records(whole)  # every step's loss, norm, routing; none twice


def test_a_lost_node_and_the_run_goes_on_at_world_size_1_then_2_when_it_returns(launches: Runs) -> None:
    out = launches.notes["out"]
    survivor, lost = launches.result("elastic")
    both = survivor.output + lost.output
    assert survivor.returncode == 0, survivor.output[-4000:]
    assert lost.returncode == 0, lost.output[-4000:]  # the node that came back ended the run with the other
    assert "driver: SIGKILL to the launch's" in lost.output, lost.output[-3000:]
    at = int(re.search(r"processes \(pids \[[\d, ]+\]\) at step (\d+)", lost.output).group(1))
    assert at >= launches.notes["node_step"]
    # a world of 2 (its rank 0 on either node), then one of 1 on the node left, from a checkpoint the world of 2 wrote
    assert re.findall(r"training elastic: (\d+) ranks", survivor.output)[:1] in (["2"], []), survivor.output[-4000:]
    assert "training elastic: 1 ranks" in survivor.output, survivor.output[-4000:]
    start = resumed_from(survivor.output)
    resumed = int(start.name.removeprefix("step_"))
    assert EVERY <= resumed <= at + 1, (resumed, at)
    again = re.search(r"driver: training again at step \d+ ([\d.]+) s after the signal", lost.output)
    assert again and float(again.group(1)) < 150, lost.output[-3000:]  # rendezvous, the new rank's start, one step
    # the node back: the world of 1 checkpointed when its agent stopped it, and a world of 2 went on from there
    assert "driver: the run's launcher stopped its ranks" in lost.output, lost.output[-3000:]
    back = re.search(r"resumed from (\S+) \(step (\d+), saved on 1 ranks\)", both)
    assert back, both[-4000:]
    returned = int(back.group(2))
    assert Path(back.group(1)).parent == out / "elastic" / "checkpoints" and resumed < returned < STEPS, returned
    assert "training elastic: 2 ranks" in both[both.index(back.group(0)) :]
    final = json.loads((out / "elastic" / "checkpoints" / FINAL / MANIFEST).read_text())
    assert final["world_size"] == 2
    steps = [r["step"] for r in records(out / "elastic") if r["kind"] == "train"]
    assert steps == list(range(1, STEPS + 1))  # every step once, whichever world ran it
    # the world of 1, step for step as the run resumed by hand at world size 1 from the same checkpoint
    (hand,) = succeeded(launches, "by_hand")
    assert f"resumed from {start} (step {resumed}, saved on 2 ranks)" in hand.output

    def alone(run: Path) -> list[dict]:
        return [r for r in records(run, after=resumed) if r["step"] <= returned]

    assert alone(out / "elastic") == alone(out / "by_hand")
    assert len(alone(out / "by_hand")) >= returned - resumed > 0
    there = f"step_{returned:06d}"  # parameters, Adam moments, expert ids and RNG states where the world of 1 stopped
    assert_same_checkpoint(out / "elastic" / "checkpoints" / there, out / "by_hand" / "checkpoints" / there)


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
