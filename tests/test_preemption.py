"""Preemption end to end: torchrun, 2 CPU ranks, the torch engine. SIGUSR1 reaches one rank at a random step (then
SIGTERM to every rank every 50 ms until they are gone, a second signal while the checkpoint is written); every rank
checkpoints at the same step and exits with status 75. A second launch of the same command resumes there and ends
with the parameters, optimizer states, RNG states and metrics of an uninterrupted run, bit for bit.

The launches run in the background of the suite (launch_support); tests/signal_driver.py sends the signals from
outside, to the real rank processes.
"""

from __future__ import annotations

import os
import random
import re
import sys
from functools import partial
from pathlib import Path

import pytest
from failure_runs import (
    FINAL,
    HERE,
    REPO,
    STEPS,
    TIMEOUT_S,
    args,
    assert_same_checkpoint,
    driver,
    env,
    folder,
    records,
    uninterrupted,
)
from launch_support import Commands, Done, Launches, Runs

from dynmoe_dist.parallel.bootstrap import free_port
from dynmoe_dist.train.preempt import PREEMPTED

CUT = "test_a_signal_on_one_rank_checkpoints_every_rank_at_one_step_and_exits_75"
RELAUNCH = "test_the_relaunch_ends_bit_for_bit_where_the_uninterrupted_run_ends"
SLURM = "test_slurm_requeues_a_preempted_job"


def train(out: Path) -> list[str]:
    """torchrun without restarts: a preempted rank ends the launch, and a second launch goes on."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    return [*cmd, "-m", "dynmoe_dist.train", *args(out, "cut")]


def preempted(out: Path, step: int) -> Commands:
    """SIGUSR1 to rank 1 at ``step``, then SIGTERM to every rank every 50 ms until they are gone."""
    return [([*driver(out / "cut" / "metrics.jsonl", step, "USR1", "1", "--repeat", "TERM"), *train(out)], env())]


def slurm(out: Path) -> Commands:
    """launch/slurm.sbatch under the sbatch, srun and scontrol doubles; SIGUSR1 to one rank, as --signal sends it."""
    slurm_env = {k: v for k, v in env().items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "MASTER_"))}
    slurm_env.update(
        PATH=f"{HERE / 'slurm_doubles'}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        RDZV_PORT=str(free_port()),
        SCONTROL_LOG=str(out / "scontrol.log"),
    )
    sbatch = ["sbatch", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "launch/slurm.sbatch"]
    return [([*driver(out / "slurm" / "metrics.jsonl", 3, "USR1", "1"), *sbatch, *args(out, "slurm")], slurm_env)]


def queue_launches(runs: Runs, wanted: set[str], tmp_path_factory: pytest.TempPathFactory) -> None:
    if not wanted & {CUT, RELAUNCH, SLURM}:
        return
    out = runs.notes["out"] = folder(runs, tmp_path_factory)
    step = runs.notes["step"] = random.SystemRandom().randint(3, STEPS - 6)
    if wanted & {CUT, RELAUNCH}:
        runs.submit("cut", partial(preempted, out, step), TIMEOUT_S, split=True)
    if RELAUNCH in wanted:

        def again() -> Commands:
            runs.result("cut")
            return [(train(out), env())]

        runs.submit("again", again, TIMEOUT_S, split=True)
    if SLURM in wanted:
        runs.submit("slurm", partial(slurm, out), TIMEOUT_S, split=True, cwd=REPO)


@pytest.fixture(scope="module")
def launches(background: Launches) -> Runs:
    return background.module(__name__)


def one(launches: Runs, name: str) -> Done:
    (done,) = launches.result(name)
    return done


def test_a_signal_on_one_rank_checkpoints_every_rank_at_one_step_and_exits_75(launches: Runs) -> None:
    done = one(launches, "cut")
    step = launches.notes["step"]
    output = done.output
    assert "driver: SIGUSR1 to ranks [1]" in output, output[-3000:]
    signalled = int(re.search(r"driver: SIGUSR1 to ranks \[1\] .* at step (\d+)", output).group(1))
    assert signalled >= step
    assert output.count(f"exitcode  : {PREEMPTED}") == 2, output[-3000:]  # both ranks, and no other failure
    assert "exitcode  : -" not in output  # no rank was killed by a signal
    more = int(re.search(r"driver: (\d+) more SIGTERM", output).group(1))
    assert more > 0, "the ranks were signalled again while they stopped"
    stopped = int(re.search(r"driver: latest step_(\d+)", output).group(1))
    assert signalled <= stopped < STEPS, (signalled, stopped)
    assert output.count("dynmoe-train: preempted") == 1  # said once, by rank 0
    assert f"at step {stopped}: checkpoint {launches.notes['out'] / 'cut' / 'checkpoints'}" in output


def test_the_relaunch_ends_bit_for_bit_where_the_uninterrupted_run_ends(launches: Runs) -> None:
    cut = launches.notes["out"] / "cut"
    whole, again = uninterrupted(launches), one(launches, "again")
    assert again.returncode == 0, again.output[-3000:]
    latest = re.search(r"driver: latest (step_\d+)", one(launches, "cut").output).group(1)
    assert f"resumed from {cut / 'checkpoints' / latest}" in again.stderr
    assert_same_checkpoint(whole / "checkpoints" / FINAL, cut / "checkpoints" / FINAL)
    assert records(cut) == records(whole)  # every step's loss, norm, routing statistics; none twice


def test_slurm_requeues_a_preempted_job(launches: Runs) -> None:
    """The batch script's srun ends with status 75: it requeues its job, and says so."""
    out = launches.notes["out"]
    done = one(launches, "slurm")
    assert done.returncode == PREEMPTED, done.output[-3000:]
    job = re.search(r"dynmoe: job (\d+),", done.output).group(1)
    assert (out / "scontrol.log").read_text() == f"requeue {job}\n"
    assert f"requeueing job {job}" in done.output
    assert re.search(r"driver: latest step_\d+", done.output)
