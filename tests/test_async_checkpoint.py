"""checkpoint.async: the state is taken at the step and written by a background thread while training goes on.

Its checkpoints are the synchronous run's, byte for byte (1 and 2 ranks, with adaptation moving experts while a save
is in flight); what is written is the state of the save's step although training changed it before the writer ran;
a writer that fails on one rank fails the save on every rank at a later step boundary with the error, and `latest`
stays the previous checkpoint, as it does when renaming into place (rank 0, in the background) fails; a preemption
waits for the save in flight; a resume from an async checkpoint ends where the uninterrupted run ends.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from dynmoe_dist.checkpoint import CheckpointError, Manifest, latest, published
from dynmoe_dist.parallel.groups import single_process_groups
from dynmoe_dist.train.checkpointing import load_checkpoint
from dynmoe_dist.train.preempt import Preemption
from dynmoe_dist.train.progress import Progress
from dynmoe_dist.train.trainer import Trainer

import dist_pool
from train_support import EVENTS, by_id, config, seed_events, small_corpus

STEPS = 8


class Sink:
    """What the run folder would receive; ``on_train`` is called with each train record's step."""

    def __init__(self, on_train=None) -> None:
        self.records: list[dict] = []
        self.on_train = on_train

    def metrics(self, record: dict) -> None:
        self.records.append(record)
        if record["kind"] == "train" and self.on_train is not None:
            self.on_train(record["step"])

    def event(self, record: dict) -> None:
        pass

    def checkpoints(self) -> list[dict]:
        return [r for r in self.records if r["kind"] == "checkpoint"]


def trainer(root: Path, background: bool, groups=None, sink: Sink | None = None) -> Trainer:
    """The tiny model with adaptation events every few steps, a checkpoint every 2 steps, all of them kept."""
    cfg = config(
        "engine=torch",
        *EVENTS,
        f"steps={STEPS}",
        "checkpoint.every=2",
        "checkpoint.keep=10",
        f"checkpoint.async={str(background).lower()}",
        "logging.every=1",
        "logging.val_every=100",
    )
    groups = groups or single_process_groups()
    t = Trainer(cfg, small_corpus(), groups, torch.device("cpu"), sink or Sink(), checkpoint_root=root)
    seed_events(t.model)
    return t


def contents(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` by relative path; manifests without the training time, which is wall-clock."""
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if path.name == "manifest.json":
            manifest = json.loads(data)
            manifest["state"]["train"].pop("elapsed")
            data = json.dumps(manifest, sort_keys=True).encode()
        out[str(path.relative_to(root))] = data
    return out


def assert_same_checkpoints(sync_root: Path, async_root: Path) -> None:
    sync, background = contents(sync_root), contents(async_root)
    assert sorted(background) == sorted(sync)
    differ = [name for name in sync if sync[name] != background[name]]
    assert not differ, differ
    assert [p.name for p in published(async_root)] == [f"step_{s:06d}" for s in range(2, STEPS + 1, 2)]
    assert not list(async_root.glob(".partial-*"))


def assert_published_later(records: list[dict]) -> None:
    """Training went on while each save but the last was written: it was published at a later step."""
    assert [r["checkpoint_step"] for r in records] == list(range(2, STEPS + 1, 2))
    assert all(r["step"] > r["checkpoint_step"] for r in records[:-1]), records
    assert records[-1]["step"] == STEPS and all(r["write_seconds"] > 0 for r in records)


def test_one_rank_equals_sync_bit_for_bit_and_resumes_exactly(tmp_path: Path) -> None:
    sync = trainer(tmp_path / "sync", False)
    sync.fit()
    background = trainer(tmp_path / "async", True)
    background.fit()
    assert_same_checkpoints(tmp_path / "sync", tmp_path / "async")
    assert_published_later(background.sink.checkpoints())
    layers = [json.dumps(Manifest.read(p).layers, default=vars) for p in published(tmp_path / "async")]
    assert len(set(layers)) > 1  # adaptation changed the experts while saves were in flight
    end = by_id(background)
    assert all(torch.equal(end[k], v) for k, v in by_id(sync).items())

    resumed = trainer(tmp_path / "resumed", True)  # from the async run's step 4, to its end
    load_checkpoint(resumed, tmp_path / "async" / "step_000004")
    resumed.fit()
    again = by_id(resumed)
    assert sorted(again) == sorted(end) and all(torch.equal(again[k], end[k]) for k in end)
    last = contents(tmp_path / "resumed" / "step_000008")
    assert last == {k[len("step_000008/") :]: v for k, v in contents(tmp_path / "async").items() if "00008/" in k}


def test_written_state_is_the_save_steps_although_training_changed_it(tmp_path: Path) -> None:
    t = trainer(tmp_path, True)
    for _ in range(3):
        t.train_step()
    expected = by_id(t)
    release = threading.Event()
    t.checkpoint_fault = lambda stage: stage == "writing" and release.wait(60)  # the writer starts late
    progress = Progress(STEPS, t.state.step, "none", True)
    t.checkpoint(progress)
    for _ in range(3):
        t.train_step()  # parameters, optimizer states, RNG and data position all move on meanwhile
    assert not t.saving.done() and latest(tmp_path) is None
    now = by_id(t)
    assert any(not torch.equal(now[k], expected[k]) for k in expected if k.startswith("dense/"))
    release.set()
    assert t.finish_checkpoint(progress) == tmp_path / "step_000003" == latest(tmp_path)

    loaded = trainer(tmp_path / "other", True)
    load_checkpoint(loaded, tmp_path)
    state = by_id(loaded)
    assert sorted(state) == sorted(expected)
    differ = [k for k in expected if not torch.equal(state[k], expected[k])]
    assert not differ, differ
    assert loaded.state.step == 3 and Manifest.read(latest(tmp_path)).step == 3


def test_preemption_waits_for_the_save_in_flight(tmp_path: Path) -> None:
    preemption = Preemption()

    def signal_after(step: int) -> None:
        if step == 3:
            preemption.received.append("SIGTERM")  # seen by every rank at step 4, which is a checkpoint step

    t = trainer(tmp_path, True, sink=Sink(signal_after))
    t.preemption = preemption
    t.checkpoint_fault = lambda stage: stage == "writing" and time.sleep(0.5)  # slow writers
    t.fit()
    assert t.preempted and t.state.step == 4 and t.saving is None
    # step 2's writer was still busy at step 3, which trained on: published at step 4, before that step's save began
    assert [(r["checkpoint_step"], r["step"]) for r in t.sink.checkpoints()] == [(2, 4), (4, 4)]
    assert latest(tmp_path).name == "step_000004" and Manifest.read(latest(tmp_path)).step == 4
    assert [p.name for p in published(tmp_path)] == ["step_000002", "step_000004"]
    assert not list(tmp_path.glob(".partial-*"))


def test_a_failed_publish_stops_the_run_and_leaves_latest(tmp_path: Path) -> None:
    t = trainer(tmp_path, True)
    calls = []

    def fault(stage: str) -> None:  # rank 0's publishing thread: the second checkpoint's manifest is not renamed
        if stage == "manifest":
            calls.append(stage)
            if len(calls) == 2:
                raise OSError(5, "Input/output error")

    t.checkpoint_fault = fault
    with pytest.raises(CheckpointError, match=r"checkpoint of step 4 not published \(rank 0: OSError: \[Errno 5\]"):
        t.fit()
    assert t.state.step == 6 and t.saving is None and t.publishing is None  # settled before step 6's save began
    assert latest(tmp_path).name == "step_000002" and [p.name for p in published(tmp_path)] == ["step_000002"]


# ----------------------------------------------------------------------------------------------------------------------
# 2 ranks


def case_fit(root: str, background: bool) -> list[dict]:
    t = trainer(Path(root), background, dist_pool.groups(2))
    t.fit()
    return t.sink.checkpoints()


def case_failing_writer(root: str) -> tuple[str, int]:
    """Rank 1's writer fails at the second save (a full disk); rank 0's writes its shards."""
    t = trainer(Path(root), True, dist_pool.groups(2))
    calls = []

    def fault(stage: str) -> None:
        if stage == "written":
            calls.append(stage)
            if dist.get_rank() == 1 and len(calls) == 2:
                raise OSError(28, "No space left on device")

    t.checkpoint_fault = fault
    with pytest.raises(CheckpointError) as err:
        t.fit()
    assert t.saving is None
    return str(err.value), t.state.step


def test_two_ranks_equal_sync_and_a_failed_writer_leaves_latest(tmp_path: Path) -> None:
    pool = dist_pool.pool(2)
    pool.run(case_fit, str(tmp_path / "sync"), False)
    records = pool.run(case_fit, str(tmp_path / "async"), True)[0]
    assert_same_checkpoints(tmp_path / "sync", tmp_path / "async")
    assert_published_later(records)
    assert {f"experts-{r:05d}.safetensors" for r in (0, 1)} <= set(Manifest.read(tmp_path / "async/step_000004").files)

    root = tmp_path / "failed"
    for message, step in pool.run(case_failing_writer, str(root)):
        assert "checkpoint of step 4 not written (rank 1: [Errno 28] No space left on device)" in message, message
        assert "'latest' is unchanged" in message
        assert 4 < step <= 6, step  # at a later step boundary: training went on while the writers ran
    assert latest(root).name == "step_000002" and [p.name for p in published(root)] == ["step_000002"]


def case_failing_sync_publish(root: str) -> tuple[str, int]:
    """A synchronous save whose publishing fails on rank 0 (the second checkpoint's manifest): every rank learns it in
    the vote that ends the save, none waits on a barrier rank 0 never reaches."""
    t = trainer(Path(root), False, dist_pool.groups(2))
    calls = []

    def fault(stage: str) -> None:
        if stage == "manifest":
            calls.append(stage)
            if len(calls) == 2:
                raise OSError(5, "Input/output error")

    t.checkpoint_fault = fault
    with pytest.raises(CheckpointError) as err:
        t.fit()
    return str(err.value), t.state.step


def test_two_ranks_a_failed_synchronous_publish_stops_both(tmp_path: Path) -> None:
    root = tmp_path / "sync-failed"
    for message, step in dist_pool.pool(2).run(case_failing_sync_publish, str(root)):
        assert "checkpoint of step 4 not published (rank 0: OSError: [Errno 5] Input/output error)" in message, message
        assert step == 4
    assert latest(root).name == "step_000002"
