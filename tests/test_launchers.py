"""Every way in, with the real training job: each script in launch/ (deepspeed launcher, torchrun, MPICH's mpiexec,
Slurm through test doubles of sbatch and srun), two nodes on one machine (two torchrun agents; DeepSpeed's per-node
mode without ssh), and wrong settings stopped before training with what to fix. Same seed, same losses everywhere."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

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
TIMEOUT_S = 180


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


def start(cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    """Wait (bounded); on a timeout the whole process group goes, so no rank outlives the test."""
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{proc.args} did not finish in {TIMEOUT_S} s:\n{out[-3000:]}")
    return proc.returncode, out


def run(cmd: list[str], env: dict[str, str]) -> str:
    code, out = finish(start(cmd, env))
    assert code == 0, out[-4000:]
    return out


def losses(folder: Path) -> list[float]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["kind"] in ("train", "val")]


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("launch")


@pytest.fixture(scope="module")
def reference(out: Path) -> list[float]:
    """launch/torchrun.sh, 2 ranks: the sequence every other way in must reproduce."""
    env = clean_env(NPROC_PER_NODE="2", MASTER_PORT=str(free_port()))
    run(["launch/torchrun.sh", *TINY, f"out_dir={out}", "name=torchrun"], env)
    return losses(out / "torchrun")


def test_torchrun_script_trains(reference: list[float]) -> None:
    assert len(reference) == 6 and reference[-1] < reference[0]  # validation at 0 and 8, 4 train lines


def test_deepspeed_script(out: Path, reference: list[float]) -> None:
    port = str(free_port())
    env = clean_env(ACCELERATOR="cpu", NPROC_PER_NODE="2", MASTER_PORT=port, DEEPSPEED=str(BIN / "deepspeed"))
    output = run(["launch/deepspeed.sh", *TINY, f"out_dir={out}", "name=deepspeed"], env)
    assert "--num_accelerators 2" in output or "num_accelerators=2" in output or "dist_world_size=2" in output
    assert losses(out / "deepspeed") == pytest.approx(reference, rel=1e-5)
    # the launcher sets LOCAL_SIZE, so DeepSpeed's CPU all-reduce made one /dev/shm segment per rank; none may outlive
    # the run (DeepSpeed never unlinks them; init_deepspeed_comm does)
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


def test_deepspeed_script_with_a_localhost_hostfile(out: Path, reference: list[float]) -> None:
    hostfile = out / "localhost.hosts"
    hostfile.write_text("localhost slots=2\n")
    env = clean_env(
        ACCELERATOR="cpu", HOSTFILE=str(hostfile), MASTER_PORT=str(free_port()), DEEPSPEED=str(BIN / "deepspeed")
    )
    run(["launch/deepspeed.sh", *TINY, f"out_dir={out}", "name=hostfile"], env)
    assert losses(out / "hostfile") == pytest.approx(reference, rel=1e-5)


def test_mpirun_script_under_mpich(out: Path, reference: list[float]) -> None:
    mpiexec = BIN / "mpiexec"
    assert mpiexec.exists(), "the mpich wheel (dev extras) provides mpiexec next to the interpreter"
    env = clean_env(NP="2", MPIRUN=str(mpiexec), MASTER_PORT=str(free_port()))
    run(["launch/mpirun.sh", *TINY, f"out_dir={out}", "name=mpich"], env)
    assert losses(out / "mpich") == pytest.approx(reference, rel=1e-5)


def slurm_env() -> dict[str, str]:
    env = clean_env(RDZV_PORT=str(free_port()))
    env["PATH"] = f"{DOUBLES}{os.pathsep}{env['PATH']}"
    return env


def test_slurm_script_under_sbatch_and_srun_doubles(out: Path, reference: list[float]) -> None:
    cmd = ["sbatch", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "launch/slurm.sbatch"]
    output = run([*cmd, *TINY, f"out_dir={out}", "name=slurm", "parallel.world_size=2"], slurm_env())
    assert "1 nodes (localhost) x 2 tasks" in output
    assert losses(out / "slurm") == pytest.approx(reference, rel=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# two nodes on one machine


def test_two_torchrun_agents_as_two_nodes(out: Path, reference: list[float]) -> None:
    port = str(free_port())
    agents = []
    for node in (0, 1):
        env = clean_env(NNODES="2", NODE_RANK=str(node), NPROC_PER_NODE="1", MASTER_ADDR="localhost", MASTER_PORT=port)
        agents.append(start(["launch/torchrun.sh", *TINY, f"out_dir={out}", "name=two_torchrun"], env))
    for agent in agents:
        code, output = finish(agent)
        assert code == 0, output[-3000:]
    assert losses(out / "two_torchrun") == pytest.approx(reference, rel=1e-5)


def test_deepspeed_per_node_mode_without_ssh(out: Path, reference: list[float]) -> None:
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
        nodes.append(start(["launch/deepspeed.sh", *TINY, f"out_dir={out}", "name=two_deepspeed"], env))
    for node in nodes:
        code, output = finish(node)
        assert code == 0, output[-3000:]
    assert losses(out / "two_deepspeed") == pytest.approx(reference, rel=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# wrong settings: stopped before training, with what to fix


def refused(cmd: list[str], env: dict[str, str], *needles: str) -> None:
    code, output = finish(start(cmd, env))
    assert code != 0, output[-2000:]
    for needle in needles:
        assert needle in output, output[-2000:]
    assert "step 0: validation" not in output  # nothing trained


def test_more_ranks_than_hostfile_slots(out: Path) -> None:
    hostfile = out / "small.hosts"
    hostfile.write_text("localhost slots=2\n")
    env = clean_env(ACCELERATOR="cpu", HOSTFILE=str(hostfile), NPROC_PER_NODE="4", DEEPSPEED=str(BIN / "deepspeed"))
    refused(["launch/deepspeed.sh", *TINY], env, "NPROC_PER_NODE=4", "localhost only 2 slots")


def test_multi_node_without_master_address() -> None:
    refused(["launch/torchrun.sh", *TINY], clean_env(NNODES="2"), "NNODES=2 needs MASTER_ADDR")
    hostfile_env = clean_env(ACCELERATOR="cpu", NODE_RANK="1", HOSTFILE=str(REPO / "launch" / "hostfile.example"))
    refused(["launch/deepspeed.sh", *TINY], hostfile_env, "NODE_RANK=1 needs MASTER_ADDR")
    env = clean_env(RANK="1", WORLD_SIZE="2", MASTER_PORT="29500")  # a launcher that forgot the rendezvous address
    refused([sys.executable, "-m", "dynmoe_dist.train", *TINY], env, "MASTER_ADDR", "unset but WORLD_SIZE=2")


def test_slurm_task_count_differs_from_the_config(out: Path) -> None:
    cmd = ["sbatch", "--nodes=1", "--ntasks-per-node=2", "launch/slurm.sbatch", *TINY, f"out_dir={out}"]
    refused([*cmd, "name=wrong", "parallel.world_size=4"], slurm_env(), "parallel.world_size=4", "SLURM_NTASKS=2")


def test_expert_parallel_size_that_does_not_divide_the_world(out: Path) -> None:
    env = clean_env(NPROC_PER_NODE="2", MASTER_PORT=str(free_port()))
    refused(
        ["launch/torchrun.sh", *TINY, "parallel.ep_size=3"], env, "parallel.ep_size=3", "divisor of the world size 2"
    )


def test_nested_launchers_that_disagree() -> None:
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
    refused([sys.executable, "-m", "dynmoe_dist.train", *TINY], env, "RANK=0", "SLURM_PROCID=1", "DYNMOE_LAUNCHER")


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
