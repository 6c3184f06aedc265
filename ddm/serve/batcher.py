"""The generation worker: one background thread behind a bounded queue.

Requests are queued as jobs; the worker takes the oldest job and, for up to `max_wait_ms`, gathers the jobs
behind it that are *compatible* with it (the same strategy, steps, solver and guidance on/off: the same compiled
device program) until they hold `max_batch` images, then runs that batch and resolves each job's future.

What a batch does: identical requests in it are computed once; the distinct requests (they share a `merge_key`,
which is `batch_key`: guidance scales may differ) run as one merged device call through `generate_many` when one
is given (`ddm.sampling.request.generate_many`: every request keeps its own noise, routing draws and guidance
scale), and their futures resolve to `Merged(value, requests, images)`; a request alone in its batch runs as its
own `generate` call and resolves to its plain value, bit for bit what `ddm sample` gives. A
merged call's values may differ from the lone call's by rounding (docs/serving.md), which is why `Merged` says
so. A merged call that fails is retried one request at a time, so a failing request still fails alone.

Admission: a job is refused (`QueueFull`) when the images already pending plus its own exceed `max_queue`; one
larger than `max_queue` on its own could never run and is refused with a DDMError instead. A job that fails sets
its exception on its own future; the worker goes on with the next.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from ddm.core.errors import DDMError
from ddm.sampling.request import Request, merge_key

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """The queue holds `max_queue` pending images: the client should retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


def batch_key(request: Request) -> tuple:
    """What requests must share to run as one device program: (strategy, steps, solver, guidance on), the
    `merge_key` of `generate_many` (a merged batch of several guidance scales gives each row its own)."""
    return merge_key(request)


@dataclasses.dataclass(frozen=True)
class Merged:
    """A request's value from a merged call: `value` (what `generate_many` gave for it), and the merged call's
    distinct `requests` and `images` (rows before padding)."""

    value: Any
    requests: int
    images: int


def pad_size(images: int, max_batch: int) -> int:
    """The rows a merged call of `images` is padded to: the next power of two, but not beyond max(images,
    max_batch), so that a server compiles about log2(max_batch) merged programs per request kind."""
    return min(1 << max(images - 1, 0).bit_length(), max(images, max_batch))


@dataclasses.dataclass
class Job:
    """One queued piece of work: a generation (`request`) or any other call on the worker (`call`, e.g. a
    verification); `images` counts against the queue bound."""

    images: int
    future: concurrent.futures.Future
    request: Request | None = None
    call: Callable[[], Any] | None = None
    conditions: Any = None  # a generation's condition embeddings (the request names them by digest), or None

    @property
    def key(self) -> tuple | None:
        return None if self.request is None else batch_key(self.request)


class Batcher:
    """Runs `generate(request, conditions) -> SampleResult` (and other calls) on one worker thread; see the module
    docstring. conditions: what the request was submitted with (its condition embeddings, or None).

    max_batch: images gathered into one batch (>= 1). max_wait_ms: how long the first job of a batch waits for
    companions (>= 0). generate_many(requests, pad_to, conditions) -> one value per request: merges the distinct
    requests of a batch that share a `merge_key`, conditions one per request (None: every request runs alone). max_queue: pending images (queued or running) beyond which jobs are refused (>= 1).
    """

    def __init__(self, generate: Callable[[Request, Any], Any], *, max_batch: int = 64, max_wait_ms: float = 10.0,
                 max_queue: int = 256, on_batch: Callable[[int, int], None] | None = None,
                 generate_many: Callable[[list[Request], int, list], list] | None = None):
        for name, value, lo in (("max_batch", max_batch, 1), ("max_queue", max_queue, 1),
                                ("max_wait_ms", max_wait_ms, 0)):
            if value < lo:
                raise DDMError(f"{name}={value} must be >= {lo}")
        self.generate, self.on_batch, self.generate_many = generate, on_batch, generate_many
        self.max_batch, self.max_wait, self.max_queue = max_batch, max_wait_ms / 1000.0, max_queue
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._held: Job | None = None  # an incompatible job met while gathering: the next batch starts with it
        self._lock = threading.Lock()
        self._pending_images = 0
        self._pending_jobs = 0
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="ddm-serve-batcher", daemon=True)
        self._thread.start()

    @property
    def pending_images(self) -> int:
        return self._pending_images

    @property
    def pending_jobs(self) -> int:
        return self._pending_jobs

    def submit(self, request: Request, conditions: Any = None) -> concurrent.futures.Future:
        """Queues a generation; its future resolves to `generate(request, conditions)`. conditions: the condition
        embeddings the request names by digest (`Request.conditions_sha256`; so equal requests carry equal ones),
        or None. QueueFull when full."""
        return self._admit(Job(request.n, concurrent.futures.Future(), request=request, conditions=conditions))

    def call(self, fn: Callable[[], Any], images: int = 0) -> concurrent.futures.Future:
        """Queues `fn()` to run on the worker, alone, in turn with the generations; `images`: its weight in the
        queue bound (e.g. a record's n). QueueFull when full."""
        return self._admit(Job(images, concurrent.futures.Future(), call=fn))

    def close(self, timeout: float | None = 30.0) -> None:
        """Stops taking jobs, lets the running batch finish, fails what is still queued, joins the worker."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._queue.put(None)
        self._thread.join(timeout)
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.future.set_exception(DDMError("the server is shutting down"))

    def _admit(self, job: Job) -> concurrent.futures.Future:
        if job.images > self.max_queue:
            raise DDMError(f"n={job.images} images exceeds the server's queue of {self.max_queue} images")
        with self._lock:
            if self._closed:
                raise QueueFull("the server is shutting down")
            if self._pending_images + job.images > self.max_queue or (job.images == 0 and self._pending_jobs
                                                                        >= self.max_queue):
                raise QueueFull(f"the queue is full ({self._pending_images} of {self.max_queue} images pending)")
            self._pending_images += job.images
            self._pending_jobs += 1
        self._queue.put(job)
        return job.future

    def _done(self, job: Job) -> None:
        with self._lock:
            self._pending_images -= job.images
            self._pending_jobs -= 1

    # -----------------------------------------------------------------------------------------------------
    # The worker thread.
    # -----------------------------------------------------------------------------------------------------

    def _next(self, timeout: float | None) -> Job | None:
        """The held job, else the next queued one (waiting up to `timeout`); None when none came or on close."""
        if self._held is not None:
            job, self._held = self._held, None
            return job
        try:
            return self._queue.get(timeout=timeout) if timeout is None or timeout > 0 else self._queue.get_nowait()
        except queue.Empty:
            return None

    def _gather(self, first: Job) -> list[Job]:
        """`first` and the compatible jobs that arrive within max_wait, up to max_batch images."""
        batch, images = [first], first.images
        if first.key is None:
            return batch
        deadline = time.monotonic() + self.max_wait
        while images < self.max_batch:
            job = self._next(deadline - time.monotonic())
            if job is None:
                if self._closed:  # the close sentinel was taken: put it back for the main loop
                    self._queue.put(None)
                break
            if job.key != first.key or images + job.images > self.max_batch:
                self._held = job
                break
            batch.append(job)
            images += job.images
        return batch

    def _work(self) -> None:
        while True:
            first = self._next(None)
            if first is None:
                return
            batch = self._gather(first)
            if first.request is not None and self.on_batch is not None:
                try:
                    self.on_batch(len(batch), sum(job.images for job in batch))
                except Exception:  # bookkeeping never stops the worker
                    logger.exception("on_batch failed")
            if first.call is not None:
                self._finish([first], call=True)
            else:
                self._finish(batch, call=False)

    def _finish(self, jobs: list[Job], *, call: bool) -> None:
        """Runs a batch (a lone call job, or generations) and resolves its futures."""
        live = []
        for job in jobs:
            if job.future.set_running_or_notify_cancel():
                live.append(job)
            else:
                self._done(job)
        outcomes: list[Any] = []
        if call:
            for job in live:
                try:
                    outcomes.append(job.call())
                except BaseException as err:  # noqa: BLE001 - the job's failure is its own, never the worker's
                    outcomes.append(_Failure(err))
        else:
            distinct: dict[Request, Any] = {}  # each distinct request with its conditions
            for job in live:
                distinct.setdefault(job.request, job.conditions)
            values = self._generations(distinct)
            outcomes = [values[job.request] for job in live]
        for job, outcome in zip(live, outcomes, strict=True):
            self._done(job)  # before the future resolves: a client that retries at once finds the room free
            if isinstance(outcome, _Failure):
                logger.debug("job failed: %s", outcome.error)
                job.future.set_exception(outcome.error)
            else:
                job.future.set_result(outcome)

    def _generations(self, requests: dict[Request, Any]) -> dict[Request, Any]:
        """Each distinct request's value (or `_Failure`), given {request: its conditions}: merged per `merge_key`
        when `generate_many` is given."""
        groups: dict[tuple, list[Request]] = {}
        for request in requests:
            groups.setdefault(merge_key(request), []).append(request)
        out: dict[Request, Any] = {}
        for group in groups.values():
            if self.generate_many is not None and len(group) > 1:
                images = sum(r.n for r in group)
                try:
                    values = self.generate_many(group, pad_size(images, self.max_batch), [requests[r] for r in group])
                    out.update({r: Merged(v, len(group), images) for r, v in zip(group, values, strict=True)})
                    continue
                except Exception as err:  # noqa: BLE001 - retried alone below, so each failure is its own
                    logger.warning(f"a merged call of {len(group)} requests failed ({type(err).__name__}: {err}); "
                                   f"running them one at a time")
            for request in group:
                try:
                    out[request] = self.generate(request, requests[request])
                except BaseException as err:  # noqa: BLE001 - the job's failure is its own, never the worker's
                    out[request] = _Failure(err)
        return out


@dataclasses.dataclass(frozen=True)
class _Failure:
    error: BaseException
