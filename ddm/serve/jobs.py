"""Asynchronous generations (`POST /v1/jobs`): a bounded store of jobs and their results.

A job is one generation request submitted to the `Batcher`; its status follows the worker's future: "queued"
(waiting in the queue), "running" (its batch is on the device), then "done" (with the reply of
`POST /v1/images/generations`) or "failed" (with a one-line error). The device solve is one program, so there
are no per-step progress counts: the status is all there is until the result.

Bounds: at most `max_jobs` jobs are kept; a finished job is dropped `ttl_s` seconds after it finished, or earlier
(oldest finished first) when a new job needs its room. When every kept job is still unfinished the store is full
and a new job is refused (`QueueFull`); the batcher's queue bound usually refuses first.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from typing import Any

from ddm.core.errors import DDMError
from ddm.sampling.request import Request
from ddm.serve.batcher import QueueFull

STATUSES = ("queued", "running", "done", "failed")


@dataclasses.dataclass
class Job:
    """One asynchronous generation. `future`: the batcher's; `result` / `error` are set once it finished."""

    id: str
    request: Request
    future: Any
    created: float
    finished: float | None = None
    result: dict | None = None
    error: str | None = None

    @property
    def status(self) -> str:
        if self.finished is not None:
            return "failed" if self.error is not None else "done"
        return "running" if self.future.running() or self.future.done() else "queued"

    def to_json(self, with_result: bool = True) -> dict:
        """{"id", "object": "job", "status", "created", "finished", "request", "result" (done), "error"
        (failed)}; times are UNIX seconds."""
        out = {"id": self.id, "object": "job", "status": self.status, "created": int(self.created),
               "finished": None if self.finished is None else int(self.finished), "request": self.request.to_json()}
        if self.error is not None:
            out["error"] = self.error
        if with_result and self.result is not None:
            out["result"] = self.result
        return out


class JobStore:
    """Thread-safe store of at most `max_jobs` jobs (>= 1); finished ones kept `ttl_s` seconds (> 0)."""

    def __init__(self, *, max_jobs: int = 1000, ttl_s: float = 600.0, clock=time.time):
        if max_jobs < 1 or ttl_s <= 0:
            raise DDMError(f"max_jobs={max_jobs} must be >= 1 and ttl_s={ttl_s} > 0")
        self.max_jobs, self.ttl_s, self.clock = max_jobs, ttl_s, clock
        self._jobs: dict[str, Job] = {}  # insertion order: oldest first
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._jobs)

    def reserve(self) -> None:
        """Makes room for one job (expired and then the oldest finished ones go); QueueFull when none can."""
        with self._lock:
            self._expire()
            if len(self._jobs) < self.max_jobs:
                return
            oldest = next((j for j in self._jobs.values() if j.finished is not None), None)
            if oldest is None:
                raise QueueFull(f"{len(self._jobs)} jobs are unfinished, the most this server keeps")
            del self._jobs[oldest.id]

    def add(self, request: Request, future: Any) -> Job:
        """Stores a new job for `future` (call `reserve` first)."""
        job = Job(id=uuid.uuid4().hex, request=request, future=future, created=self.clock())
        with self._lock:
            self._jobs[job.id] = job
        return job

    def finish(self, job: Job, *, result: dict | None = None, error: str | None = None) -> None:
        job.result, job.error, job.finished = result, error, self.clock()

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            self._expire()
            return self._jobs.get(job_id)

    def _expire(self) -> None:
        cutoff = self.clock() - self.ttl_s
        for job_id in [j.id for j in self._jobs.values() if j.finished is not None and j.finished < cutoff]:
            del self._jobs[job_id]
