"""Every way in, with the real training job: each script in launch/ (deepspeed launcher, torchrun, MPICH's mpiexec,
Slurm through test doubles of sbatch and srun), two nodes on one machine (two torchrun agents; DeepSpeed's per-node
mode without ssh), and wrong settings stopped before training with what to fix. Same seed, same losses everywhere.

Every launch is real and independent of the others: they run in the background of the suite from its start
(launch_support), and each test waits for its own. The job reads a small text corpus (about 60 KB of the standard
library in one file) rather than the whole standard library: the launchers are under test here, not the data, and
every launch reads the same bytes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
from launch_support import Commands, Done, Launches, Runs

from dynmoe_dist.parallel.bootstrap import free_port

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
DOUBLES = Path(__file__).resolve().parent / "slurm_doubles"
TINY = [
    "model=tiny",
    "parallel.device=cpu",  # the suite runs on CPU ranks, on a GPU host too
    "data.seq_len=32",
    "data.batch_size=4",
    "steps=8",
    "logging.every=2",
    "logging.val_every=8",
    "logging.wandb=disabled",
    "checkpoint.every=0",
]
TIMEOUT_S = 240  # each launch, counted from its own start


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any launcher's variables (the suite may itself run under one), plus ``extra``."""
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK")
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in drop and not k.startswith(("SLURM_", "OMPI_", "PMI", "MPI_", "HYDI_", "DYNMOE_"))
    }
    env.update(PATH=f"{BIN}{os.pathsep}{env['PATH']}", OMP_NUM_THREADS="1", PYTHON=sys.executable, **extra)
    return env


def slurm_env() -> dict[str, str]:
    env = clean_env(RDZV_PORT=str(free_port()))
    env["PATH"] = f"{DOUBLES}{os.pathsep}{env['PATH']}"
    return env


def losses(folder: Path) -> list[float]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["kind"] in ("train", "val")]


def corpus_args(out: Path) -> list[str]:
    return ["data=text", f"data.path={out / 'corpus.txt'}", "data.val_fraction=0.1"]


def train_args(out: Path, name: str) -> list[str]:
    return [*TINY, *corpus_args(out), f"out_dir={out}", f"name={name}"]


def trained(launches: Runs, name: str) -> list[Done]:
    done = launches.result(name)
    for d in done:
        assert d.returncode == 0, d.output[-4000:]
    return done


@pytest.fixture(scope="module")
def reference(launches: Runs, out: Path) -> list[float]:
    """launch/torchrun.sh, 2 ranks: the sequence every other way in must reproduce."""
    trained(launches, "torchrun")
    return losses(out / "torchrun")


def launch_torchrun(out: Path) -> Commands:
    env = clean_env(NPROC_PER_NODE="2", MASTER_PORT=str(free_port()))
    return [(["launch/torchrun.sh", *train_args(out, "torchrun")], env)]


def test_torchrun_script_trains(reference: list[float]) -> None:
    assert len(reference) == 6 and reference[-1] < reference[0]  # validation at 0 and 8, 4 train lines


def launch_deepspeed(out: Path) -> Commands:
    port = str(free_port())
    env = clean_env(ACCELERATOR="cpu", NPROC_PER_NODE="2", MASTER_PORT=port, DEEPSPEED=str(BIN / "deepspeed"))
    return [(["launch/deepspeed.sh", *train_args(out, "deepspeed")], env)]


def test_deepspeed_script(launches: Runs, out: Path, reference: list[float]) -> None:
    (done,) = trained(launches, "deepspeed")
    output, port = done.output, done.env["MASTER_PORT"]
    assert "--num_accelerators 2" in output or "num_accelerators=2" in output or "dist_world_size=2" in output
    assert losses(out / "deepspeed") == pytest.approx(reference, rel=1e-5)
    # the launcher sets LOCAL_SIZE, so DeepSpeed's CPU all-reduce made one /dev/shm segment per rank; none may outlive
    # the run (DeepSpeed never unlinks them; init_deepspeed_comm does)
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


def launch_hostfile(out: Path) -> Commands:
    hostfile = out / "localhost.hosts"
    hostfile.write_text("localhost slots=2\n")
    env = clean_env(
        ACCELERATOR="cpu", HOSTFILE=str(hostfile), MASTER_PORT=str(free_port()), DEEPSPEED=str(BIN / "deepspeed")
    )
    return [(["launch/deepspeed.sh", *train_args(out, "hostfile")], env)]


def test_deepspeed_script_with_a_localhost_hostfile(launches: Runs, out: Path, reference: list[float]) -> None:
    trained(launches, "hostfile")
    assert losses(out / "hostfile") == pytest.approx(reference, rel=1e-5)


def launch_mpich(out: Path) -> Commands:
    env = clean_env(NP="2", MPIRUN=str(BIN / "mpiexec"), MASTER_PORT=str(free_port()))
    return [(["launch/mpirun.sh", *train_args(out, "mpich")], env)]


def test_mpirun_script_under_mpich(launches: Runs, out: Path, reference: list[float]) -> None:
    assert (BIN / "mpiexec").exists(), "the mpich wheel (dev extras) provides mpiexec next to the interpreter"
    trained(launches, "mpich")
    assert losses(out / "mpich") == pytest.approx(reference, rel=1e-5)


def launch_slurm(out: Path) -> Commands:
    cmd = ["sbatch", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "launch/slurm.sbatch"]
    return [([*cmd, *train_args(out, "slurm"), "parallel.world_size=2"], slurm_env())]


def test_slurm_script_under_sbatch_and_srun_doubles(launches: Runs, out: Path, reference: list[float]) -> None:
    (done,) = trained(launches, "slurm")
    assert "1 nodes (localhost) x 2 tasks" in done.output
    assert losses(out / "slurm") == pytest.approx(reference, rel=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# two nodes on one machine: one launch of two commands, started together


def launch_two_torchrun(out: Path) -> Commands:
    port = str(free_port())
    agents = []
    for node in (0, 1):
        env = clean_env(NNODES="2", NODE_RANK=str(node), NPROC_PER_NODE="1", MASTER_ADDR="localhost", MASTER_PORT=port)
        agents.append((["launch/torchrun.sh", *train_args(out, "two_torchrun")], env))
    return agents


def test_two_torchrun_agents_as_two_nodes(launches: Runs, out: Path, reference: list[float]) -> None:
    assert len(trained(launches, "two_torchrun")) == 2
    assert losses(out / "two_torchrun") == pytest.approx(reference, rel=1e-5)


def launch_two_deepspeed(out: Path) -> Commands:
    hostfile = out / "two_nodes.hosts"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")  # two names for this machine: two "nodes"
    port = str(free_port())
    nodes = []
    for node in (0, 1):
        env = clean_env(
            ACCELERATOR="cpu",
            HOSTFILE=str(hostfile),
            NODE_RANK=str(node),
            NPROC_PER_NODE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
            DEEPSPEED=str(BIN / "deepspeed"),
        )
        nodes.append((["launch/deepspeed.sh", *train_args(out, "two_deepspeed")], env))
    return nodes


def test_deepspeed_per_node_mode_without_ssh(launches: Runs, out: Path, reference: list[float]) -> None:
    assert len(trained(launches, "two_deepspeed")) == 2
    assert losses(out / "two_deepspeed") == pytest.approx(reference, rel=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# wrong settings: stopped before training, with what to fix


def refused(launches: Runs, name: str, *needles: str) -> None:
    (done,) = launches.result(name)
    output = done.output
    assert done.returncode != 0, output[-2000:]
    for needle in needles:
        assert needle in output, output[-2000:]
    assert "step 0: validation" not in output  # nothing trained


def launch_too_many_ranks(out: Path) -> Commands:
    hostfile = out / "small.hosts"
    hostfile.write_text("localhost slots=2\n")
    env = clean_env(ACCELERATOR="cpu", HOSTFILE=str(hostfile), NPROC_PER_NODE="4", DEEPSPEED=str(BIN / "deepspeed"))
    return [(["launch/deepspeed.sh", *TINY, *corpus_args(out)], env)]


def test_more_ranks_than_hostfile_slots(launches: Runs) -> None:
    refused(launches, "too_many_ranks", "NPROC_PER_NODE=4", "localhost only 2 slots")


def launch_no_master_torchrun(out: Path) -> Commands:
    return [(["launch/torchrun.sh", *TINY, *corpus_args(out)], clean_env(NNODES="2"))]


def launch_no_master_deepspeed(out: Path) -> Commands:
    env = clean_env(ACCELERATOR="cpu", NODE_RANK="1", HOSTFILE=str(REPO / "launch" / "hostfile.example"))
    return [(["launch/deepspeed.sh", *TINY, *corpus_args(out)], env)]


def launch_no_master_python(out: Path) -> Commands:
    env = clean_env(RANK="1", WORLD_SIZE="2", MASTER_PORT="29500")  # a launcher that forgot the rendezvous address
    return [([sys.executable, "-m", "dynmoe_dist.train", *TINY, *corpus_args(out)], env)]


def test_multi_node_without_master_address(launches: Runs) -> None:
    refused(launches, "no_master_torchrun", "NNODES=2 needs MASTER_ADDR")
    refused(launches, "no_master_deepspeed", "NODE_RANK=1 needs MASTER_ADDR")
    refused(launches, "no_master_python", "MASTER_ADDR", "unset but WORLD_SIZE=2")


def launch_slurm_wrong_count(out: Path) -> Commands:
    cmd = ["sbatch", "--nodes=1", "--ntasks-per-node=2", "launch/slurm.sbatch", *TINY, *corpus_args(out)]
    return [([*cmd, f"out_dir={out}", "name=wrong", "parallel.world_size=4"], slurm_env())]


def test_slurm_task_count_differs_from_the_config(launches: Runs) -> None:
    refused(launches, "slurm_wrong_count", "parallel.world_size=4", "SLURM_NTASKS=2")


def launch_ep_size(out: Path) -> Commands:
    # No restarts: a refused configuration is refused again on each of them (the script allows 3 by default)
    env = clean_env(NPROC_PER_NODE="2", MASTER_PORT=str(free_port()), MAX_RESTARTS="0")
    return [(["launch/torchrun.sh", *TINY, *corpus_args(out), "parallel.ep_size=3"], env)]


def test_expert_parallel_size_that_does_not_divide_the_world(launches: Runs) -> None:
    refused(launches, "ep_size", "parallel.ep_size=3", "divisor of the world size 2")


def launch_nested(out: Path) -> Commands:
    env = clean_env(
        RANK="0",
        WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT="29500",
        SLURM_PROCID="1",
        SLURM_NTASKS="2",
        SLURM_LOCALID="1",
        SLURM_NTASKS_PER_NODE="2",
    )
    return [([sys.executable, "-m", "dynmoe_dist.train", *TINY, *corpus_args(out)], env)]


def test_nested_launchers_that_disagree(launches: Runs) -> None:
    refused(launches, "nested", "RANK=0", "SLURM_PROCID=1", "DYNMOE_LAUNCHER")


# ----------------------------------------------------------------------------------------------------------------------
# every launch of the module, in the order the tests read them, with the tests that read each

WITH_REFERENCE = {
    "test_torchrun_script_trains",
    "test_deepspeed_script",
    "test_deepspeed_script_with_a_localhost_hostfile",
    "test_mpirun_script_under_mpich",
    "test_slurm_script_under_sbatch_and_srun_doubles",
    "test_two_torchrun_agents_as_two_nodes",
    "test_deepspeed_per_node_mode_without_ssh",
}
LAUNCHES: dict[str, tuple[Callable[[Path], Commands], set[str]]] = {
    "torchrun": (launch_torchrun, WITH_REFERENCE),
    "deepspeed": (launch_deepspeed, {"test_deepspeed_script"}),
    "hostfile": (launch_hostfile, {"test_deepspeed_script_with_a_localhost_hostfile"}),
    "mpich": (launch_mpich, {"test_mpirun_script_under_mpich"}),
    "slurm": (launch_slurm, {"test_slurm_script_under_sbatch_and_srun_doubles"}),
    "two_torchrun": (launch_two_torchrun, {"test_two_torchrun_agents_as_two_nodes"}),
    "two_deepspeed": (launch_two_deepspeed, {"test_deepspeed_per_node_mode_without_ssh"}),
    "too_many_ranks": (launch_too_many_ranks, {"test_more_ranks_than_hostfile_slots"}),
    "no_master_torchrun": (launch_no_master_torchrun, {"test_multi_node_without_master_address"}),
    "no_master_deepspeed": (launch_no_master_deepspeed, {"test_multi_node_without_master_address"}),
    "no_master_python": (launch_no_master_python, {"test_multi_node_without_master_address"}),
    "slurm_wrong_count": (launch_slurm_wrong_count, {"test_slurm_task_count_differs_from_the_config"}),
    "ep_size": (launch_ep_size, {"test_expert_parallel_size_that_does_not_divide_the_world"}),
    "nested": (launch_nested, {"test_nested_launchers_that_disagree"}),
}
# Refusals where every rank stops at its own check and only rank 0 prints: the other ranks wait
# (app.REFUSAL_GRACE_S) before they exit, since torchrun and srun --kill-on-bad-exit kill rank 0 once another rank
# exited; these run alone as well, so that a loaded machine cannot stretch rank 0's lag past that wait.
ALONE = {"slurm_wrong_count", "ep_size"}


def queue_launches(runs: Runs, wanted: set[str], tmp_path_factory: pytest.TempPathFactory) -> None:
    """At the start of the session (launch_support): every launch a selected test of this module reads."""
    out = runs.notes["out"] = tmp_path_factory.mktemp("launch")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = ("textwrap.py", "string.py", "bisect.py", "heapq.py")
    (out / "corpus.txt").write_bytes(b"".join((stdlib / name).read_bytes() for name in files))
    for name, (make, tests) in LAUNCHES.items():
        if wanted & tests:
            runs.submit(name, partial(make, out), TIMEOUT_S, cwd=REPO, alone=name in ALONE)


@pytest.fixture(scope="module")
def launches(background: Launches) -> Runs:
    return background.module(__name__)


@pytest.fixture(scope="module")
def out(launches: Runs) -> Path:
    return launches.notes["out"]


# ----------------------------------------------------------------------------------------------------------------------
# make train


def test_make_train_takes_nproc_launcher_and_overrides() -> None:
    make = shutil.which("make")
    assert make, "make is needed for the Makefile's own test"
    dry = subprocess.run(
        [make, "-n", "train", "NPROC=3", "LAUNCHER=deepspeed", "steps=5", "moe=top_k", "RUN=x"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    line = next(line for line in dry.stdout.splitlines() if "launch/" in line and "name=" in line)
    assert "NPROC_PER_NODE=3" in line and "launch/deepspeed.sh" in line
    assert "name=x" in line and "steps=5" in line and "moe=top_k" in line
    assert "NPROC=" not in line.split("launch/")[1] and "LAUNCHER=" not in line.split("launch/")[1]
    for launcher, script in (("torchrun", "launch/torchrun.sh"), ("mpirun", "launch/mpirun.sh")):
        dry = subprocess.run([make, "-n", "train", f"LAUNCHER={launcher}"], cwd=REPO, capture_output=True, text=True)
        assert script in dry.stdout
    wrong = subprocess.run([make, "train", "LAUNCHER=pbs"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert wrong.returncode != 0 and "LAUNCHER=pbs: expected torchrun, deepspeed or mpirun" in wrong.stderr
