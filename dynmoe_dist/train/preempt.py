"""Preemption: SIGTERM or SIGUSR1 on any rank -> every rank checkpoints at the next step boundary and exits with
``PREEMPTED`` ("preempted, requeue me").

Why at a step boundary and agreed: a rank cannot save alone (a checkpoint is collective), and ranks that stop at
different steps would save different states. The handler only records the signal; the trainer folds the flag into
the one small all-reduce it makes every step (``Trainer.agree_step``), so all ranks see it at the same step. Further
signals while the checkpoint is written only count: nothing is interrupted, and the save stays atomic (a SIGKILL in
the middle leaves the previous ``latest``).

Schedulers send SIGTERM some time before SIGKILL (Slurm: ``KillWait``, 30 s by default; Kubernetes: the grace period;
torchrun forwards SIGTERM to its workers and waits 30 s), or SIGUSR1 ahead of a time limit with ``sbatch
--signal=USR1@<seconds>``.
"""

from __future__ import annotations

import signal
import threading
from dataclasses import dataclass, field

# The exit status of a rank that checkpointed because it was asked to stop: EX_TEMPFAIL from sysexits.h, "a temporary
# failure; the user is invited to retry". launch/slurm.sbatch requeues the job on it; resume=auto continues the run.
PREEMPTED = 75
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


@dataclass
class Preemption:
    """The signals this process received since ``install``; ``requested`` once any arrived."""

    received: list[str] = field(default_factory=list)

    @property
    def requested(self) -> bool:
        return bool(self.received)

    def install(self) -> Preemption:
        """Handle SIGTERM and SIGUSR1 from now on (main thread only; elsewhere nothing is installed)."""
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame) -> None:
        self.received.append(signal.Signals(signum).name)  # nothing else: the handler may run inside any code
