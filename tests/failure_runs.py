"""The training job the failure tests interrupt (test_preemption, test_restart), and the uninterrupted run of it they
all compare with: 2 CPU ranks, the torch engine, a checkpoint every 4 steps, data.global_batch kept on any world size.

One uninterrupted run serves both modules (launch_support's shared launches): whichever queues first queues it, in
a folder of the session that every interrupted run of both modules writes beside.
"""

from __future__ import annotations

import json
import os
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from launch_support import Commands, Runs
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
UNINTERRUPTED = "uninterrupted"


def args(out: Path, name: str) -> list[str]:
    return [*ARGS, f"data.path={out / 'corpus.txt'}", f"out_dir={out}", f"name={name}"]


def env(**extra: str) -> dict[str, str]:
    """This environment without any launcher's variables (the suite may itself run under one), plus ``extra``."""
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK")
    base = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    return {**base, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, **extra}


def driver(metrics: Path, step: int, signal: str, ranks: str, *more: str) -> list[str]:
    """tests/signal_driver.py in front of a command: ``signal`` to ``ranks`` once the run logged ``step``."""
    cmd = [sys.executable, str(DRIVER), "--metrics", str(metrics), "--step", str(step), "--signal", signal]
    return [*cmd, "--ranks", ranks, *more, "--"]


def torchrun(out: Path, name: str) -> list[str]:
    """launch/torchrun.sh on this machine (NPROC_PER_NODE and MASTER_PORT come with the environment)."""
    return ["launch/torchrun.sh", *args(out, name)]


def folder(runs: Runs, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's folder of the failure runs, with their corpus; the uninterrupted run queued in it once."""
    notes = runs.shared_notes
    if "failures" not in notes:
        out = notes["failures"] = tmp_path_factory.mktemp("failures")
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        (out / "corpus.txt").write_bytes(b"".join((stdlib / n).read_bytes() for n in ("textwrap.py", "string.py")))

        def whole() -> Commands:
            return [(torchrun(out, "whole"), env(NPROC_PER_NODE="2", MASTER_PORT=str(free_port())))]

        runs.share(UNINTERRUPTED, whole, TIMEOUT_S, cwd=REPO)
    return notes["failures"]


def uninterrupted(runs: Runs) -> Path:
    """The uninterrupted run's folder, once it finished successfully."""
    (done,) = runs.shared(UNINTERRUPTED)
    assert done.returncode == 0, done.output[-4000:]
    return runs.shared_notes["failures"] / "whole"


def records(run: Path, after: int = -1) -> list[dict]:
    """Every training and validation record after step ``after``, without wall time, throughput or memory."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
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


FINAL = f"step_{STEPS:06d}"
