"""One trainer per output: a lease file with a heartbeat in the expert's OUT folder.

`OUT/lease.json` names its holder (host, pid) and is rewritten every `HEARTBEAT_S` seconds while training
runs. A second trainer of the same OUT refuses to start, naming the holder, unless the lease is stale: its
heartbeat is older than `STALE_S`, or its holder is a process of this host that no longer exists (a crashed
or SIGKILLed trainer never blocks the next start for long).
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


def read_lease(out: Path) -> dict | None:
    try:
        return json.loads((Path(out) / LEASE).read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def stale(lease: dict, now: float | None = None) -> bool:
    """Whether a lease may be taken over: heartbeat older than STALE_S, or a dead holder on this host."""
    now = time.time() if now is None else now
    if now - float(lease.get("heartbeat", 0)) > STALE_S:
        return True
    return lease.get("host") == socket.gethostname() and not _alive(int(lease.get("pid", -1)))


class Lease:
    """`with Lease(out):` holds OUT's lease (DDMError if another live trainer holds it) and heartbeats it."""

    def __init__(self, out: str | Path, *, heartbeat_s: float = HEARTBEAT_S):
        self.path = Path(out) / LEASE
        self.heartbeat_s = heartbeat_s
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def holder(self) -> str:
        return f"{self.me['host']}:{self.me['pid']}"

    def _write(self) -> None:
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({**self.me, "holder": self.holder, "heartbeat": time.time()}))
        os.replace(tmp, self.path)

    def acquire(self) -> None:
        # Folders this lease creates are removed again on release if nothing else was written in them, so a
        # trainer refused before its first write leaves nothing behind.
        self._created = [p for p in (self.path.parent, *self.path.parent.parents) if not p.exists()]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:  # the common case: nobody holds it; O_EXCL makes two simultaneous starts race safely
            os.close(os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            held = read_lease(self.path.parent)
            if held is not None and not stale(held):
                age = time.time() - float(held.get("heartbeat", 0))
                raise DDMError(f"{self.path.parent} is being trained by {held.get('holder')} (heartbeat {age:.0f}s "
                               f"ago): one trainer per output; a lease without a heartbeat for {STALE_S:.0f}s "
                               "is taken over") from None
            if held is not None:
                logger.info(f"taking over the stale lease of {held.get('holder')} on {self.path.parent}")
        self._write()
        self._thread = threading.Thread(target=self._beat, name="ddm-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self._write()
            except OSError as err:  # OUT gone or unwritable: training itself will fail and say so
                logger.warning(f"lease heartbeat on {self.path} failed: {err}")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        held = read_lease(self.path.parent)
        if held is not None and held.get("holder") == self.holder:
            self.path.unlink(missing_ok=True)
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
