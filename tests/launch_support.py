"""Real launches (torchrun, the DeepSpeed launcher, mpiexec, Slurm doubles, the CLI) run in the background of the suite.

A launch spends most of its time importing torch, DeepSpeed and hydra in a chain of processes (launcher, agent,
ranks), much of it on one core, and an in-process test mostly runs on one core too. So a module whose tests read
launches defines ``queue_launches(runs, wanted, tmp_path_factory)``: at the start of the session (conftest's
``background`` fixture) every such module queues the launches its selected tests read, and they run one at a time
beside the other tests, two at a time while a test waits for one. Those modules run last
(``modules_with_launches_last``), so their launches are mostly done when their tests read them.

Each launch runs in its own session under its own timeout, counted from its start; the launches marked ``alone`` run
when the first of their tests asks for one, one after the other with no other launch running (for refusals where only
rank 0 prints, and the launcher kills rank 0 when another rank exits first). Whatever still runs at the end of the
session is killed with its whole process group: no rank outlives the suite.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

QUEUE_HOOK = "queue_launches"
SHARED = "shared"  # the prefix of launches several modules read


@dataclass
class Done:
    """How one command of a launch ended: its exit status and output (stderr merged into stdout unless split)."""

    args: list[str]
    env: dict[str, str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float  # from its start to its end

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


# A launch: one or more commands started together (two "nodes" must rendezvous), each (argv, environment).
Commands = list[tuple[list[str], dict[str, str]]]


@dataclass
class _Launch:
    make: Callable[[], Commands]  # builds the commands just before they start (ports picked then, files written)
    timeout_s: float
    split: bool
    cwd: Path | None
    alone: bool
    name: str = ""
    result: list[Done] | str | None = None  # a str: why there is no result
    done: threading.Event = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.done = threading.Event()


class Launches:
    """The session's queue of launches: one runs at a time, two while a test waits for one."""

    def __init__(self, idle_slots: int = 1, waiting_slots: int = 2) -> None:
        self._idle_slots, self._waiting_slots = idle_slots, waiting_slots
        self._launches: dict[str, _Launch] = {}
        self._queue: list[str] = []
        self._turn = threading.Condition()
        self._running = 0
        self._waiters = 0  # tests waiting for a launch
        self._alone = False  # a launch that must run with no other is waiting or running
        self._procs: list[subprocess.Popen] = []
        self._closed = False
        self._threads = [threading.Thread(target=self._serve, daemon=True) for _ in range(waiting_slots)]
        for t in self._threads:
            t.start()
        self.notes: dict[str, object] = {}  # what a module's preparation recorded for its tests
        self.started = time.monotonic()
        self.timeline: list[tuple[str, float, float]] = []  # (name, start, end) in seconds since the session began

    def module(self, name: str) -> Runs:
        return Runs(self, name)

    def submit(self, name: str, launch: _Launch, once: bool = False) -> None:
        with self._turn:
            if once and name in self._launches:
                return
            assert name not in self._launches, name
            launch.name = name
            self._launches[name] = launch
            if not launch.alone:
                self._queue.append(name)
                self._turn.notify_all()

    def _slots(self) -> int:
        return 0 if self._alone else self._waiting_slots if self._waiters else self._idle_slots

    def _serve(self) -> None:
        while True:
            with self._turn:
                self._turn.wait_for(lambda: self._closed or (self._queue and self._running < self._slots()))
                if self._closed:
                    return
                launch = self._launches[self._queue.pop(0)]
                self._running += 1
            try:
                launch.result = self._run(launch)
            except BaseException as exc:  # noqa: BLE001 - the test that reads it reports it
                launch.result = f"could not start: {exc!r}"
            finally:
                with self._turn:
                    self._running -= 1
                    self._turn.notify_all()
                launch.done.set()

    def result(self, name: str) -> list[Done]:
        """Wait for launch ``name`` (one ``Done`` per command); a launch that did not finish in time fails the test."""
        launch = self._launches[name]
        if launch.alone and not launch.done.is_set():
            self._run_alone()
        with self._turn:
            self._waiters += 1
            self._turn.notify_all()
        try:
            launch.done.wait()
        finally:
            with self._turn:
                self._waiters -= 1
        if isinstance(launch.result, str):
            pytest.fail(f"launch {name} {launch.result}")
        return launch.result

    def _run_alone(self) -> None:
        """Let the running launches end, start none, and run every `alone` launch not run yet, one after the other
        (those of later tests too: one pause of the queue for all of them)."""
        with self._turn:
            self._alone = True
            self._turn.wait_for(lambda: self._running == 0)
        try:
            for launch in [lch for lch in self._launches.values() if lch.alone and not lch.done.is_set()]:
                try:
                    launch.result = self._run(launch)
                except BaseException as exc:  # noqa: BLE001 - reported by result(), like a queued launch's
                    launch.result = f"could not start: {exc!r}"
                finally:
                    launch.done.set()
        finally:
            with self._turn:
                self._alone = False
                self._turn.notify_all()

    def _run(self, launch: _Launch) -> list[Done] | str:
        commands = launch.make()
        with self._turn:
            if self._closed:
                return "never started: the session ended first"
            start = time.monotonic()
            procs = [
                subprocess.Popen(
                    cmd,
                    env=env,
                    cwd=launch.cwd,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE if launch.split else subprocess.STDOUT,
                    text=True,
                    start_new_session=True,
                )
                for cmd, env in commands
            ]
            self._procs += procs
        outputs: list = [None] * len(procs)
        ended = [0.0] * len(procs)
        readers = [
            threading.Thread(target=_read, args=(p, outputs, ended, i), daemon=True) for i, p in enumerate(procs)
        ]
        for r in readers:
            r.start()
        deadline = start + launch.timeout_s  # they start together: one limit for the whole launch
        for r in readers:
            r.join(max(deadline - time.monotonic(), 0.0))
        self.timeline.append((launch.name, start - self.started, time.monotonic() - self.started))
        if any(r.is_alive() for r in readers):
            for p in procs:
                _kill(p)
            for r in readers:
                r.join()
            tails = "\n".join(
                f"--- {p.args}:\n{(o[0] or '')[-3000:]}{(o[1] or '')[-3000:]}" for p, o in zip(procs, outputs)
            )
            return f"did not finish in {launch.timeout_s} s:\n{tails}"
        return [
            Done(p.args, env, p.returncode, out or "", err or "", end - start)
            for p, (_, env), (out, err), end in zip(procs, commands, outputs, ended)
        ]

    def close(self) -> None:
        with self._turn:
            self._closed = True
            for proc in self._procs:
                if proc.poll() is None:
                    _kill(proc)
            self._turn.notify_all()
        for launch in self._launches.values():
            if launch.result is None:
                launch.result = "never started: the session ended first"
                launch.done.set()


def timeline_lines(runs: Launches) -> list[str]:
    """Each launch's start and end in the session, for keeping the suite inside its time: the launches, not the tests
    in this process, are what it waits for at its end."""
    rows = sorted(runs.timeline, key=lambda r: r[1])
    busy = sum(end - start for _, start, end in rows)
    last = max((end for _, _, end in rows), default=0.0)
    head = f"launches: {len(rows)}, {busy:.0f} s of launch time, the last ended {last:.0f} s into the session"
    return [head, *(f"{start:7.1f} s {end:7.1f} s {end - start:6.1f} s  {name}" for name, start, end in rows)]


class Runs:
    """One module's view of the session's launches: its names, its notes."""

    def __init__(self, runs: Launches, module: str) -> None:
        self._runs, self._prefix = runs, f"{module}::"
        self.notes = runs.notes.setdefault(module, {})

    def submit(
        self,
        name: str,
        make: Callable[[], Commands],
        timeout_s: float,
        *,
        split: bool = False,
        cwd: Path | None = None,
        alone: bool = False,
    ) -> None:
        self._runs.submit(self._prefix + name, _Launch(make, timeout_s, split, cwd, alone))

    def result(self, name: str) -> list[Done]:
        return self._runs.result(self._prefix + name)

    @property
    def shared_notes(self) -> dict:
        """Notes of the launches several modules read."""
        return self._runs.notes.setdefault(SHARED, {})

    def share(self, name: str, make: Callable[[], Commands], timeout_s: float, *, cwd: Path | None = None) -> None:
        """Queue a launch that several modules read (an uninterrupted reference run): the first to ask queues it."""
        self._runs.submit(f"{SHARED}::{name}", _Launch(make, timeout_s, False, cwd, False), once=True)

    def shared(self, name: str) -> list[Done]:
        return self._runs.result(f"{SHARED}::{name}")


def _read(proc: subprocess.Popen, outputs: list, ended: list, i: int) -> None:
    outputs[i] = proc.communicate()
    ended[i] = time.monotonic()


def _kill(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def _launch_modules(items: list[pytest.Item]) -> dict[object, set[str]]:
    """The modules that queue launches, in run order, each with the names (parameters left out) of its tests."""
    modules: dict[object, set[str]] = {}
    for item in items:
        module = getattr(item, "module", None)
        if module is not None and hasattr(module, QUEUE_HOOK):
            modules.setdefault(module, set()).add(item.originalname)
    return modules


def modules_with_launches_last(items: list[pytest.Item]) -> None:
    """Reorder (stably) so that the modules that queue launches run after all the others."""
    items.sort(key=lambda item: hasattr(getattr(item, "module", None), QUEUE_HOOK))


def start_background(session: pytest.Session, tmp_path_factory: pytest.TempPathFactory) -> Launches:
    runs = Launches()
    for module, wanted in _launch_modules(session.items).items():
        getattr(module, QUEUE_HOOK)(runs.module(module.__name__), wanted, tmp_path_factory)
    return runs
