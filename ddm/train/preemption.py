"""Preemption: SIGTERM / SIGINT ask a training loop to stop at the next step boundary.

Schedulers announce preemption with a signal (SLURM `--signal`, Kubernetes' SIGTERM before the grace period
ends, cloud TPU/GPU maintenance events). The loop finishes the step it is in, writes a checkpoint and raises
`Preempted`; the CLI exits with `PREEMPTED_EXIT`, which a requeueing script tells apart from a failure. The
next start resumes from that checkpoint exactly as after a crash (bitwise on the same devices).
"""

from __future__ import annotations

import signal
import threading

# EX_TEMPFAIL (sysexits.h): "try again later": not a success (0), bad input (2) or a crash.
PREEMPTED_EXIT = 75
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    """Training stopped on a signal after checkpointing `step`; rerun the same command to resume."""

    def __init__(self, name: str, step: int, signame: str):
        super().__init__(f"{name}: stopped by {signame} after checkpointing step {step}; rerun to resume")
        self.step, self.signame = step, signame


class StopRequest:
    """While entered, SIGTERM and SIGINT set `signame` instead of killing the process (main thread only;
    elsewhere it never triggers). The previous handlers come back on exit."""

    def __init__(self):
        self.signame: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signame = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
