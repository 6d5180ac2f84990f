"""The application end to end, as users start it: torchrun, 2 CPU ranks, a tiny config, both engines; the run folder,
the metrics and event files, wandb's offline files, what is printed last, and the report on that run.

Every launch is real. They run in the background of the suite from its start (launch_support): first the runs that
need nothing (both engines, the uninterrupted 24-step run), then the ones that go on from a finished run (resume, the
refusals, the report), each started once its run has finished. A test waits for its own. bf16 against fp32 is
tests/test_train_engines.py's, on the same tiny run in the ranks of the suite.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from functools import partial
from pathlib import Path

import pytest
import yaml
from launch_support import Commands, Done, Launches, Runs

from dynmoe_dist.parallel.bootstrap import free_port
from dynmoe_dist.train.report import PLOTS

STEPS = 16
ARGS = (
    "model=tiny",
    "parallel.device=cpu",  # CPU ranks, on a GPU host too
    "data.seq_len=32",
    "data.batch_size=4",
    f"steps={STEPS}",
    "logging.every=4",
    "logging.val_every=8",
    "adapt.record_steps=3",
    "adapt.idle_steps=1",
    "adapt.min_experts=2",
    "adapt.rebalance_threshold=1.01",
)
TIMEOUT_S = 300  # each launch, counted from its own start


def train(out: Path, *args: str) -> Commands:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    cmd += ["-m", "dynmoe_dist.train", *ARGS, f"out_dir={out}", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    return [(cmd, env)]


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def one(launches: Runs, name: str) -> Done:
    (done,) = launches.result(name)
    return done


def succeeded(launches: Runs, name: str) -> Done:
    done = one(launches, name)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


ENGINES = {"deepspeed": (), "torch": ("engine=torch", "logging.wandb=disabled")}


def queue_launches(runs: Runs, wanted: set[str], tmp_path_factory: pytest.TempPathFactory) -> None:
    """At the start of the session (launch_support): every launch a selected test of this module reads. A launch that
    goes on from a finished run is queued after it and prepares its folder (a copy, a damaged shard) once that run has
    finished; what it saw then is in ``runs.notes`` for its test."""
    out = runs.notes["out"] = tmp_path_factory.mktemp("runs")
    for engine in ENGINES if wanted else ():  # every test reads one of these two runs, or goes on from one
        runs.submit(engine, partial(train, out, f"name={engine}", *ENGINES[engine]), TIMEOUT_S, split=True)
    if "test_resume_auto_continues_the_run_as_if_uninterrupted" in wanted:
        whole = partial(train, out / "resume", "name=whole", f"steps={STEPS + 8}", "logging.wandb=disabled")
        runs.submit("whole", whole, TIMEOUT_S, split=True)

    def after(name: str, prepare):
        def make() -> Commands:
            succeeded(runs, name)
            return prepare()

        return make

    if "test_an_existing_run_is_never_overwritten" in wanted:

        def existing() -> Commands:
            runs.notes["existing"] = (out / "torch" / "metrics.jsonl").read_bytes()
            return train(out, "name=torch", "engine=torch", "logging.wandb=disabled", "resume=none")

        runs.submit("existing", after("torch", existing), TIMEOUT_S, split=True)
    if "test_resume_auto_continues_the_run_as_if_uninterrupted" in wanted:

        def resume() -> Commands:
            folder = copy_of(out / "deepspeed", out / "resume", ignore=REPORT)  # the report may be writing
            runs.notes["resume"] = (folder / "checkpoints" / "latest").read_text().strip()
            return train(folder.parent, "name=deepspeed", f"steps={STEPS + 8}", "logging.wandb=disabled")

        runs.submit("resume", after("deepspeed", resume), TIMEOUT_S, split=True)
    if "test_a_damaged_checkpoint_is_refused_and_nothing_is_written" in wanted:

        def damaged() -> Commands:
            folder = copy_of(out / "torch", out / "damaged")
            latest = folder / "checkpoints" / (folder / "checkpoints" / "latest").read_text().strip()
            shard = latest / "shared.safetensors"
            data = bytearray(shard.read_bytes())
            data[-10] ^= 0xFF
            shard.write_bytes(bytes(data))
            runs.notes["damaged"] = files_of(folder)
            return train(folder.parent, "name=torch", "engine=torch", "logging.wandb=disabled", "steps=24")

        runs.submit("damaged", after("torch", damaged), TIMEOUT_S, split=True)
    if "test_report_on_the_recorded_run" in wanted:

        def report() -> Commands:
            return [([sys.executable, "-m", "dynmoe_dist.train.report", str(out / "deepspeed")], dict(os.environ))]

        runs.submit("report", after("deepspeed", report), 120, split=True)


@pytest.fixture(scope="module")
def launches(background: Launches) -> Runs:
    return background.module(__name__)


@pytest.fixture(scope="module")
def out(launches: Runs) -> Path:
    return launches.notes["out"]


@pytest.fixture(scope="module")
def runs(launches: Runs, out: Path) -> dict[str, tuple[Path, Done]]:
    return {engine: (out / engine, succeeded(launches, engine)) for engine in ENGINES}


@pytest.mark.parametrize("engine", ["deepspeed", "torch"])
def test_run_folder_holds_config_metrics_and_events(runs, engine: str) -> None:
    folder, proc = runs[engine]
    config = yaml.safe_load((folder / "config.yaml").read_text())
    assert config["engine"]["name"] == engine and config["steps"] == STEPS and config["model"]["d_model"] == 32
    metrics = records(folder / "metrics.jsonl")
    train_rows = [r for r in metrics if r["kind"] == "train"]
    val_rows = [r for r in metrics if r["kind"] == "val"]
    assert [r["step"] for r in train_rows] == [4, 8, 12, 16] and [r["step"] for r in val_rows] == [0, 8, 16]
    for r in train_rows:
        assert {"loss", "lr", "grad_norm", "tokens_per_s", "tokens", "peak_mem_mb", "aux_loss"} <= set(r)
        (layer,) = r["moe"].values()
        assert {"experts", "avg_k", "k_hist", "load", "load_imbalance", "unrouted", "dropped"} <= set(layer)
        # the numbers are the world's: 2 ranks x 4 sequences x 32 tokens x 4 steps per line
        assert sum(layer["k_hist"]) == 2 * 4 * 32 * 4
        assert sum(layer["load"].values()) == sum(k * n for k, n in enumerate(layer["k_hist"]))
    assert train_rows[-1]["tokens"] == STEPS * 2 * 4 * 32
    assert val_rows[-1]["loss"] < val_rows[0]["loss"] and "bpb" in val_rows[-1]
    events = records(folder / "events.jsonl")
    assert events and all(e["committed"] for e in events)
    assert {"step", "layer", "kind", "added", "removed", "moved", "bytes_moved", "seconds", "experts"} <= set(events[0])
    assert f"{engine} engine, fp32 on cpu" in proc.stderr  # the resolved precision and device, said once
    # what is printed last says where everything is
    lines = proc.stdout.strip().splitlines()
    tail = lines[lines.index(f"run folder: {folder}") :]
    assert len(tail) <= 6
    assert any(str(folder / "metrics.jsonl") in line for line in tail)
    assert any(str(folder / "events.jsonl") in line for line in tail)


def test_wandb_offline_files(runs) -> None:
    folder, proc = runs["deepspeed"]
    offline = list((folder / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("*.wandb"))
    assert f"wandb:   {offline[0]}" in proc.stdout
    assert not (runs["torch"][0] / "wandb").exists()  # logging.wandb=disabled


def test_both_engines_reach_the_same_losses(runs) -> None:
    ds, pt = (
        [r["loss"] for r in records(runs[name][0] / "metrics.jsonl") if r["kind"] == "val"] for name in runs
    )  # fmt: skip
    assert ds == pytest.approx(pt, rel=1e-4)


def test_an_existing_run_is_never_overwritten(runs, launches: Runs) -> None:
    folder, _ = runs["torch"]
    proc = one(launches, "existing")
    before = launches.notes["existing"]
    assert proc.returncode != 0  # each rank exits 2; torchrun reports the failure as 1
    assert proc.stderr.count("already holds a run") == 1  # said once, by rank 0
    assert "resume=auto" in proc.stderr and "overwrite=true" in proc.stderr
    assert (folder / "metrics.jsonl").read_bytes() == before


COMPARED = ("loss", "grad_norm", "aux_loss", "lr", "tokens")


def comparable(folder: Path) -> list[tuple]:
    """The records two runs of the same training must agree on (not wall time, throughput or memory)."""
    out = []
    for r in records(folder / "metrics.jsonl"):
        if r["kind"] in ("train", "val"):
            moe = [(m["experts"], m["k_hist"], m["load"]) for m in r.get("moe", {}).values()]
            out.append((r["kind"], r["step"], *[round(r.get(k, 0.0), 6) for k in COMPARED], moe))
    return out


REPORT = ("plots", "summary.md")  # what the report adds to a run folder


def copy_of(folder: Path, parent: Path, ignore: tuple[str, ...] = ()) -> Path:
    """A copy of a finished run to go on from, so the module's runs stay as the other tests expect them."""
    target = parent / folder.name
    shutil.copytree(folder, target, ignore=shutil.ignore_patterns(*ignore))
    return target


def files_of(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file() and "wandb" not in p.parts}


def test_resume_auto_continues_the_run_as_if_uninterrupted(launches: Runs, out: Path) -> None:
    """A second launch of the same run with more steps picks up its last checkpoint (written at the end)."""
    proc = one(launches, "resume")
    folder = out / "resume" / "deepspeed"
    assert launches.notes["resume"] == f"step_{STEPS:06d}"
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {folder / 'checkpoints' / f'step_{STEPS:06d}'}" in proc.stderr
    whole = one(launches, "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    resumed, uninterrupted = comparable(folder), comparable(folder.parent / "whole")
    assert [r[:2] for r in resumed] == [r[:2] for r in uninterrupted]  # one record per step, none twice
    assert resumed == uninterrupted
    assert records(folder / "events.jsonl") and [
        {k: e[k] for k in ("step", "added", "removed", "moved")} for e in records(folder / "events.jsonl")
    ] == [
        {k: e[k] for k in ("step", "added", "removed", "moved")}
        for e in records(folder.parent / "whole" / "events.jsonl")
    ]


def test_a_damaged_checkpoint_is_refused_and_nothing_is_written(launches: Runs, out: Path) -> None:
    proc = one(launches, "damaged")
    before = launches.notes["damaged"]
    assert proc.returncode != 0
    assert "shared.safetensors does not match its SHA-256" in proc.stderr
    after = files_of(out / "damaged" / "torch")
    assert after == before


def test_report_on_the_recorded_run(runs, launches: Runs) -> None:
    folder, _ = runs["deepspeed"]
    proc = one(launches, "report")
    assert proc.returncode == 0, proc.stderr
    for name in PLOTS:
        png = folder / "plots" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
        assert str(png) in proc.stdout
    summary = (folder / "summary.md").read_text()
    val = [r for r in records(folder / "metrics.jsonl") if r["kind"] == "val"]
    assert f"{val[0]['loss']:.4f} -> {val[-1]['loss']:.4f}" in summary
    events = records(folder / "events.jsonl")
    assert f"{sum(len(e['added']) for e in events)} / {sum(len(e['removed']) for e in events)}" in summary
    assert "| blocks.1.moe |" in summary
