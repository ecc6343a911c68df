"""Graceful stop on SIGTERM / SIGUSR2 (SLURM pre-emption or time limit).

The handler only records the signal; the loop finishes the current step, writes a checkpoint on
rank 0 and raises :class:`TrainingPreempted`, a ``SystemExit`` with code :data:`EXIT_PREEMPTED`.

Under submitit (``configs/hydra/launcher/slurm.yaml``) SLURM sends USR2 ``signal_delay_s`` before the
time limit; submitit's own handler, which we replaced, is called *after* our checkpoint is on
disk: it re-queues the job (``max_num_timeout`` times) and exits. Without submitit, a batch script
can requeue when the exit code is :data:`EXIT_PREEMPTED`. Under ``torchrun`` the agent forwards
SIGTERM to the workers and kills them 30 s later, so a step plus a checkpoint must fit in that
time; the workers exit with EXIT_PREEMPTED but torchrun itself exits with 1 (seen on 2 H100s,
torch 2.11), so a wrapper should look for the ``preempted`` event in ``metrics.jsonl`` instead.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Sequence
from types import FrameType
from typing import Any

# sysexits.h EX_TEMPFAIL: "temporary failure; the user is invited to retry". Not 0/1, not the
# shell's 128+N for killed processes, not timeout(1)'s 124.
EXIT_PREEMPTED = 75


class TrainingPreempted(SystemExit):
    """Raised after the pre-emption checkpoint is written; exits the process with EXIT_PREEMPTED."""

    def __init__(self, *, step: int, signal_name: str, checkpoint: str | None) -> None:
        super().__init__(EXIT_PREEMPTED)
        self.step = step
        self.signal_name = signal_name
        self.checkpoint = checkpoint

    def __str__(self) -> str:
        return f"training stopped by {self.signal_name} after step {self.step}; checkpoint {self.checkpoint}"


class PreemptionWatcher:
    """Context manager that records the first of ``signal_names`` received (main thread only)."""

    def __init__(self, signal_names: Sequence[str]) -> None:
        self.signals = [getattr(signal, name) for name in signal_names]
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum

    def __enter__(self) -> PreemptionWatcher:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    @property
    def requested(self) -> bool:
        return self.received is not None

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else "none"

    def chain(self) -> None:
        """Call the handler that was installed before ours for the received signal (e.g. submitit's
        re-queue handler); default and ignore dispositions are not called."""
        if self.received is None:
            return
        previous = self._previous.get(self.received)
        if callable(previous) and previous not in (signal.SIG_DFL, signal.SIG_IGN, signal.default_int_handler):
            previous(self.received, None)
