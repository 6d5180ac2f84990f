"""Run a launch and signal or kill its training ranks from outside once the run reaches a step, as a scheduler would.

    python tests/signal_driver.py --metrics RUN/metrics.jsonl --step 5 --signal USR1 --ranks 1 [--repeat TERM] -- CMD...

Starts CMD in its own session, waits until ``metrics.jsonl`` holds a train record at ``--step`` or later (the run logs
every step), then sends ``--signal`` to the training processes of ``--ranks`` (found among CMD's descendants by their
command line and their RANK variable), or with ``--ranks tree`` to CMD and every process under it (a lost node: its
launcher and its ranks). ``--repeat SIG`` then keeps sending SIG to every rank every 50 ms until they are gone (a
second signal while the checkpoint is written). ``--recovery`` then watches the run come back, whichever process
brings it back (CMD's launcher restarting its ranks, or another node's): it says when the run folder was opened again
(a resumed run rewrites ``metrics.jsonl``) and when the run is back at the step it had reached, in seconds after the
signal (with ``--rejoin``: when it trained one step past the checkpoint it resumed from). ``--rejoin`` (with
``--ranks tree`` and ``--recovery``: a node that comes back) then starts CMD again once the run trains again, as the
returning node: while it starts and joins, the run's training processes on this machine are
held (SIGSTOP) so that a run of a few steps is still running when the node asks in, as a long run would be; they go
on (SIGCONT) once their launcher has asked them to stop for the new rendezvous round (its SIGTERM pending). Prints
what it did as ``driver: ...`` lines, and the run's ``latest`` checkpoint once CMD ended, and exits with CMD's
status (the second CMD's, after ``--rejoin``). Never a mock: the launchers, the ranks and the signals are the real
ones.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

TRAIN_MODULE = "dynmoe_dist.train"


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            out += children
            todo += children
    return out


def rank_of(pid: int) -> int | None:
    """The RANK of a training process (``python [-u] -m dynmoe_dist.train ...``), None for anything else."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    words = [a.decode() for a in argv[1:4]]
    if "-m" not in words or words[words.index("-m") + 1 : words.index("-m") + 2] != [TRAIN_MODULE]:
        return None
    for item in environ:
        key, _, value = item.decode(errors="replace").partition("=")
        if key in ("RANK", "SLURM_PROCID"):
            return int(value)
    return None


def ranks(root: int) -> dict[int, int]:
    return {r: pid for pid in descendants(root) if (r := rank_of(pid)) is not None}


def reached(metrics: Path, step: int) -> int | None:
    try:
        lines = metrics.read_text().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line being written
        if record.get("kind") == "train" and record["step"] >= step:
            return record["step"]
    return None


def run_processes(run: Path) -> list[int]:
    """The training processes of the run in folder ``run`` on this machine, whoever launched them."""
    wanted = {f"out_dir={run.parent}".encode(), f"name={run.name}".encode()}
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or rank_of(int(entry.name)) is None:
            continue
        with contextlib.suppress(OSError):
            if wanted <= set((entry / "cmdline").read_bytes().split(b"\0")):
                found.append(int(entry.name))
    return found


def term_pending(pid: int) -> bool | None:
    """Whether SIGTERM waits to be delivered to ``pid`` (a held process cannot take it); None once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    if "\nState:\tZ" in status:
        return None
    pending = next(line.split()[1] for line in status.splitlines() if line.startswith("ShdPnd:"))
    return bool(int(pending, 16) & (1 << (signal.SIGTERM - 1)))


def rejoin(cmd: list[str], run: Path, deadline: float) -> subprocess.Popen:
    """Hold the run, start ``cmd`` again (the node back), let the run go on once its launcher stops it for the new
    round."""
    held = run_processes(run)
    for pid in held:
        os.kill(pid, signal.SIGSTOP)
    started = time.monotonic()
    print(f"driver: held the run's ranks (pids {held}); the node comes back", flush=True)
    proc = subprocess.Popen(cmd, start_new_session=True)
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            states = [term_pending(pid) for pid in held]
            if held and all(state is not False for state in states):  # asked to stop (or gone): the node was seen
                print(
                    f"driver: the run's launcher stopped its ranks {time.monotonic() - started:.1f} s after the node"
                    " came back",
                    flush=True,
                )
                break
            time.sleep(0.05)
        else:
            print("driver: the run's launcher never stopped its ranks for the node that came back", flush=True)
    finally:
        for pid in held:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    return proc


def tree(root: int) -> list[int]:
    """``root`` and every process under it, parents first."""
    return [root, *descendants(root)]


def inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except OSError:
        return None


def watch_recovery(metrics: Path, at: int | None, signalled: float, deadline: float) -> None:
    """Until the run is back at step ``at`` (or the deadline): when its folder reopened, when it got back there. With
    ``at`` None, until it trained one step past the checkpoint it resumed from (``latest`` when it reopened)."""
    before, reopened, wanted = inode(metrics), None, at
    while time.monotonic() < deadline:
        now = inode(metrics)
        if reopened is None and now is not None and now != before:
            reopened = time.monotonic()
            print(f"driver: run folder reopened {reopened - signalled:.1f} s after the signal", flush=True)
            if wanted is None:  # no checkpoint (a restart before the first one starts over): its first step
                latest = metrics.parent / "checkpoints" / "latest"
                wanted = int(latest.read_text().strip().removeprefix("step_")) + 1 if latest.exists() else 1
        if reopened is not None and (step := reached(metrics, wanted)) is not None:
            what = "back at" if at is not None else "training again at"
            print(f"driver: {what} step {step} {time.monotonic() - signalled:.1f} s after the signal", flush=True)
            return
        time.sleep(0.05)
    print(f"driver: the run did not come back to step {wanted}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--step", type=int, required=True)
    parser.add_argument("--signal", default="USR1")
    parser.add_argument("--ranks", default="all")
    parser.add_argument("--repeat", default=None)
    parser.add_argument("--recovery", action="store_true")
    parser.add_argument("--rejoin", action="store_true")
    parser.add_argument("--timeout", type=float, default=240.0)
    parser.add_argument("cmd", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    proc = subprocess.Popen(cmd, start_new_session=True)
    deadline = time.monotonic() + args.timeout
    try:
        while (at := reached(args.metrics, args.step)) is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                print(f"driver: the run ended or stalled before step {args.step}", flush=True)
                return proc.wait(timeout=max(deadline - time.monotonic(), 1))
            time.sleep(0.05)
        sig = signal.Signals[f"SIG{args.signal}"]
        if args.ranks == "tree":
            pids = tree(proc.pid)
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            print(f"driver: {sig.name} to the launch's {len(pids)} processes (pids {pids}) at step {at}", flush=True)
        else:
            found = ranks(proc.pid)
            chosen = sorted(found) if args.ranks == "all" else [int(r) for r in args.ranks.split(",")]
            for r in chosen:
                os.kill(found[r], sig)
            print(f"driver: {sig.name} to ranks {chosen} (pids {[found[r] for r in chosen]}) at step {at}", flush=True)
        signalled = time.monotonic()
        if args.repeat:
            again = signal.Signals[f"SIG{args.repeat}"]
            sent = 0
            while proc.poll() is None and time.monotonic() < deadline:
                for pid in ranks(proc.pid).values():
                    try:
                        os.kill(pid, again)
                        sent += 1
                    except ProcessLookupError:
                        pass
                time.sleep(0.05)
            print(f"driver: {sent} more {again.name} while the ranks were stopping", flush=True)
        if args.recovery:  # a node coming back: as soon as the run trains again, so that it is still running
            watch_recovery(args.metrics, None if args.rejoin else at, signalled, deadline)
        if args.rejoin:
            proc.wait(timeout=max(deadline - time.monotonic(), 1))  # killed: its status is the signal's
            proc = rejoin(cmd, args.metrics.parent, deadline)
        status = proc.wait(timeout=max(deadline - time.monotonic(), 1))
        latest = args.metrics.parent / "checkpoints" / "latest"
        if latest.exists():
            print(f"driver: latest {latest.read_text().strip()}", flush=True)
        return status
    finally:
        if proc.poll() is None:
            for pid in tree(proc.pid):  # torchrun starts each worker in a session of its own
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.wait()


if __name__ == "__main__":
    sys.exit(main())
