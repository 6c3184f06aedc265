"""Background prefetch: a thread computes the next batches of a step-indexed reader while the trainer trains.

The reader stays a pure function of the step; the thread only computes `fetch(step)` for step s, s+1, ... ahead
of time into a bounded queue. Asking for any other step than the next one (a resume, a test jumping around)
restarts the thread there, so what a caller gets is always exactly `fetch(step)`. An exception in the thread
is raised in the caller, unchanged (a `DDMError` keeps its one-line message), by the `get` that reaches it.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

_POLL_S = 0.1  # how often a blocked worker checks whether it was told to stop


class _Worker:
    """One thread computing fetch(start), fetch(start + 1), ... into a queue of at most `depth` results."""

    def __init__(self, fetch: Callable[[int], Any], start: int, depth: int):
        self.next = start  # the step the next `take` returns
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._work, args=(fetch, start), name=f"ddm-prefetch-{start}",
                                       daemon=True)  # a forgotten reader never keeps the process alive
        self.thread.start()

    def _work(self, fetch: Callable[[int], Any], step: int) -> None:
        while not self.stopped.is_set():
            try:
                item = (fetch(step), None)
            except BaseException as err:  # noqa: BLE001 - handed to the caller, who raises it
                item = (None, err)
            while not self.stopped.is_set():
                try:
                    self.queue.put(item, timeout=_POLL_S)
                    break
                except queue.Full:
                    continue
            if item[1] is not None:
                return
            step += 1

    def take(self) -> Any:
        while True:
            try:
                result, err = self.queue.get(timeout=_POLL_S)
                break
            except queue.Empty:
                if not self.thread.is_alive() and self.queue.empty():  # stopped (an error is queued first)
                    raise RuntimeError("prefetch thread stopped") from None
        if err is not None:
            raise err
        self.next += 1
        return result

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join()


class Prefetcher:
    """`get(step)` == `fetch(step)`, computed up to `depth` steps ahead on a background thread.

    `fetch` must be a pure function of the step and is only ever called from one thread at a time. `close()`
    stops the thread (a later `get` starts a new one); it is safe to call more than once.
    """

    def __init__(self, fetch: Callable[[int], Any], depth: int):
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self._fetch, self._depth = fetch, depth
        self._worker: _Worker | None = None

    def get(self, step: int) -> Any:
        if self._worker is None or self._worker.next != step:
            self.close()
            self._worker = _Worker(self._fetch, step, self._depth)
        try:
            return self._worker.take()
        except BaseException:
            self.close()  # the thread has ended on this error; the next `get` starts afresh
            raise

    def close(self) -> None:
        if self._worker is not None:
            self._worker.stop()
            self._worker = None
