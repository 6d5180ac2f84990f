"""Preemption end to end: torchrun, 2 CPU ranks, the torch engine. SIGUSR1 reaches one rank at a random step (then
SIGTERM to every rank every 50 ms until they are gone, a second signal while the checkpoint is written); every rank
checkpoints at the same step and exits with status 75. A second launch of the same command resumes there and ends
with the parameters, optimizer states, RNG states and metrics of an uninterrupted run, bit for bit.

The launches run in the background of the suite (launch_support); tests/signal_driver.py sends the signals from
outside, to the real rank processes.
"""

from __future__ import annotations

import json
import os
import random
import re
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from launch_support import Commands, Done, Launches, Runs
from safetensors.torch import load_file

from dynmoe_dist.parallel.bootstrap import free_port
from dynmoe_dist.train.preempt import PREEMPTED

STEPS = 14
ARGS = (
    "model=tiny",
    "parallel.device=cpu",
    "data.seq_len=32",
    "data.batch_size=4",
    f"steps={STEPS}",
    "engine=torch",
    "logging.every=1",  # every step logged: the driver watches the steps, and the metrics compare step by step
    "logging.val_every=7",
    "logging.wandb=disabled",
    "logging.progress=lines",
    "checkpoint.every=100",  # none but the preemption's and the end's
    "adapt.record_steps=3",
    "adapt.idle_steps=1",
    "adapt.min_experts=2",
    "name=run",
)
TIMEOUT_S = 300
RELAUNCH = "test_the_relaunch_ends_bit_for_bit_where_the_uninterrupted_run_ends"
HERE = Path(__file__).resolve().parent
DRIVER = HERE / "signal_driver.py"


def train(out: Path) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    return [*cmd, "-m", "dynmoe_dist.train", *ARGS, f"out_dir={out}"]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def driver(out: Path, step: int, *more: str) -> list[str]:
    cmd = [sys.executable, str(DRIVER), "--metrics", str(out / "run" / "metrics.jsonl"), "--step", str(step)]
    return [*cmd, "--signal", "USR1", "--ranks", "1", *more, "--"]


def preempted(out: Path, step: int) -> Commands:
    return [([*driver(out, step, "--repeat", "TERM"), *train(out)], env())]


def slurm(out: Path) -> Commands:
    """launch/slurm.sbatch under the sbatch, srun and scontrol doubles; SIGUSR1 to one rank, as --signal sends it."""
    slurm_env = {k: v for k, v in env().items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "MASTER_"))}
    slurm_env.update(
        PATH=f"{HERE / 'slurm_doubles'}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        PYTHON=sys.executable,
        RDZV_PORT=str(free_port()),
        SCONTROL_LOG=str(out / "scontrol.log"),
    )
    sbatch = ["sbatch", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "launch/slurm.sbatch"]
    return [([*driver(out, 3), *sbatch, *ARGS, f"out_dir={out}"], slurm_env)]


def queue_launches(runs: Runs, wanted: set[str], tmp_path_factory: pytest.TempPathFactory) -> None:
    if not wanted:
        return
    out = runs.notes["out"] = tmp_path_factory.mktemp("preemption")
    step = runs.notes["step"] = random.SystemRandom().randint(3, STEPS - 6)
    if wanted & {"test_a_signal_on_one_rank_checkpoints_every_rank_at_one_step_and_exits_75", RELAUNCH}:
        runs.submit("cut", partial(preempted, out / "cut", step), TIMEOUT_S, split=True)
    if RELAUNCH in wanted:
        runs.submit("whole", lambda: [(train(out / "whole"), env())], TIMEOUT_S, split=True)

        def again() -> Commands:
            runs.result("cut")
            return [(train(out / "cut"), env())]

        runs.submit("again", again, TIMEOUT_S, split=True)
    if "test_slurm_requeues_a_preempted_job" in wanted:
        runs.submit("slurm", partial(slurm, out / "slurm"), TIMEOUT_S, split=True, cwd=HERE.parent)


@pytest.fixture(scope="module")
def launches(background: Launches) -> Runs:
    return background.module(__name__)


def one(launches: Runs, name: str) -> Done:
    (done,) = launches.result(name)
    return done


def records(folder: Path) -> list[dict]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    drop = ("time", "tokens_per_s", "peak_mem_mb", "seconds", "path")
    return [{k: v for k, v in r.items() if k not in drop} for r in rows if r["kind"] in ("train", "val")]


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
    assert f"at step {stopped}: checkpoint {launches.notes['out'] / 'cut' / 'run' / 'checkpoints'}" in output


def test_the_relaunch_ends_bit_for_bit_where_the_uninterrupted_run_ends(launches: Runs) -> None:
    out = launches.notes["out"]
    whole, again = one(launches, "whole"), one(launches, "again")
    assert whole.returncode == 0, whole.output[-3000:]
    assert again.returncode == 0, again.output[-3000:]
    cut_run, whole_run = out / "cut" / "run", out / "whole" / "run"
    latest = re.search(r"driver: latest (step_\d+)", one(launches, "cut").output).group(1)
    assert f"resumed from {cut_run / 'checkpoints' / latest}" in again.stderr
    final = f"step_{STEPS:06d}"
    files = sorted(p.name for p in (whole_run / "checkpoints" / final).glob("*.safetensors"))
    assert files == sorted(p.name for p in (cut_run / "checkpoints" / final).glob("*.safetensors"))
    for name in files:  # parameters, Adam moments, expert ids, RNG states, adaptation windows
        a, b = load_file(whole_run / "checkpoints" / final / name), load_file(cut_run / "checkpoints" / final / name)
        assert set(a) == set(b), name
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}: {key}"
    assert records(cut_run) == records(whole_run)  # every step's loss, norm, routing statistics; none twice


def test_slurm_requeues_a_preempted_job(launches: Runs) -> None:
    """The batch script's srun ends with status 75: it requeues its job, and says so."""
    out = launches.notes["out"] / "slurm"
    done = one(launches, "slurm")
    assert done.returncode == PREEMPTED, done.output[-3000:]
    job = re.search(r"dynmoe: job (\d+),", done.output).group(1)
    assert (out / "scontrol.log").read_text() == f"requeue {job}\n"
    assert f"requeueing job {job}" in done.output
    assert re.search(r"driver: latest step_\d+", done.output)
