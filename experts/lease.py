"""One trainer per output: a lease file with a heartbeat in the expert's OUT folder (a local folder or a URL).

`OUT/lease.json` names its holder (host, pid) and is rewritten every `HEARTBEAT_S` seconds while training
runs. A second trainer of the same OUT refuses to start, naming the holder, unless the lease is stale: its
heartbeat is older than `STALE_S`, or its holder is a process of this host that no longer exists (a crashed
or SIGKILLed trainer never blocks the next start for long).

Every change of the lease is a compare-and-swap on the file (`ddm.data.storage.write_if`): taking it writes
the complete record only if the file is still absent, or still the stale lease that was judged stale;
heartbeats and the release change it only if it is still this holder's. Two trainers starting together (or
taking over the same stale lease) cannot both win, on a local disk (tensorstore's lock + rename) or in a
bucket (S3 `If-None-Match` / `If-Match`, GCS generation preconditions). A holder whose heartbeat finds the
lease changed under it (it was paused past `STALE_S` and taken over) stops heartbeating and logs it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

from ddm.core.errors import DDMError
from ddm.data import storage

logger = logging.getLogger(__name__)

LEASE = "lease.json"
HEARTBEAT_S = 10.0
STALE_S = 60.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


def _parse(raw: bytes | None) -> dict | None:
    try:
        held = json.loads(raw) if raw is not None else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return held if isinstance(held, dict) else None


def read_lease(out: str | Path) -> dict | None:
    return _parse(storage.read_bytes(storage.join(out, LEASE)))


def stale(lease: dict, now: float | None = None) -> bool:
    """Whether a lease may be taken over: heartbeat older than STALE_S, or a dead holder on this host."""
    now = time.time() if now is None else now
    if now - float(lease.get("heartbeat", 0)) > STALE_S:
        return True
    return lease.get("host") == socket.gethostname() and not _alive(int(lease.get("pid", -1)))


class Lease:
    """`with Lease(out):` holds OUT's lease (DDMError if another live trainer holds it) and heartbeats it."""

    def __init__(self, out: str | Path, *, heartbeat_s: float = HEARTBEAT_S):
        self.out = str(out) if storage.is_url(out) else Path(out)
        self.path = storage.join(self.out, LEASE)
        self.heartbeat_s = heartbeat_s
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        self._generation: bytes | None = None  # of the lease file as this holder last wrote it
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def holder(self) -> str:
        return f"{self.me['host']}:{self.me['pid']}"

    def _record(self) -> str:
        return json.dumps({**self.me, "holder": self.holder, "heartbeat": time.time()})

    def _refuse(self, held: dict) -> DDMError:
        age = time.time() - float(held.get("heartbeat", 0))
        return DDMError(f"{self.out} is being trained by {held.get('holder')} (heartbeat {age:.0f}s ago): one "
                        f"trainer per output; a lease without a heartbeat for {STALE_S:.0f}s is taken over")

    def acquire(self) -> None:
        local = not storage.is_url(self.out)
        if local:
            # Folders this lease creates are removed again on release if nothing else was written in them, so a
            # trainer refused before its first write leaves nothing behind.
            self._created = [p for p in (self.out, *self.out.parents) if not p.exists()]
            self.out.mkdir(parents=True, exist_ok=True)
        try:
            raw, generation = storage.read_versioned(self.path)
            held = _parse(raw)
            if raw is not None and held is not None and not stale(held):
                raise self._refuse(held)
            if held is not None:
                logger.info(f"taking over the stale lease of {held.get('holder')} on {self.out}")
            self._generation = storage.write_if(self.path, self._record(), generation)
            if self._generation is None:  # another trainer took it between our read and our write, or ...
                winner = read_lease(self.out)
                if winner is None:  # ... nobody did: the store refused the write itself
                    raise DDMError(f"cannot write {self.path}: refused by the store (does the bucket exist, and may "
                                   "these credentials write to it?)")
                raise self._refuse(winner)
        except BaseException:
            if local:
                self._remove_created()
            raise
        self._thread = threading.Thread(target=self._beat, name="ddm-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                generation = storage.write_if(self.path, self._record(), self._generation)
            except (OSError, DDMError) as err:  # OUT gone or unwritable: training itself will fail and say so
                logger.warning(f"lease heartbeat on {self.path} failed: {err}")
                continue
            if generation is None:
                logger.warning(f"lost the lease on {self.out} to {(read_lease(self.out) or {}).get('holder')}: "
                               "heartbeat stopped")
                return
            self._generation = generation

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._generation is not None:  # removed only if it is still ours
            storage.write_if(self.path, None, self._generation)
            self._generation = None
        self._remove_created()

    def _remove_created(self) -> None:
        for folder in getattr(self, "_created", []):  # innermost first
            try:
                folder.rmdir()
            except OSError:  # not empty: training wrote something
                break

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
