"""A local working copy of a folder in a bucket: pulled once, pushed while a job writes it, pushed last on exit.

Orbax 0.12.8 writes checkpoints to local disks and gs:// but not s3:// (its array writer rejects any other
URL), and the trainer's metrics, plots and digests are local files. So a job whose output is a URL writes
into a local working copy (under $TMPDIR) and `Mirror` keeps the bucket in step with it:

- `pull()` copies the bucket's files into the working copy, except checkpoint steps whose upload was cut
  short (no `ddm_digest.json`: pushed last in every step), which the next push removes from the bucket;
- `push()` uploads every file that is new or changed since the last push (skipping temporary names: orbax's
  uncommitted steps, ddm's staged files), each checkpoint step's digest after its other files, then deletes
  from the bucket what the job deleted (old steps dropped by retention);
- a thread pushes every `every_s` seconds while the job runs, so a killed job loses at most that much.

A job that resumes pulls the bucket's checkpoints back; the checkpointer verifies each step against its
digest as it does for local folders. The bucket copy is written only by the holder of the folder's lease.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
from pathlib import Path

from ddm.data import storage

logger = logging.getLogger(__name__)

STEP_DIGEST = "ddm_digest.json"  # written last into every committed checkpoint step (ddm.train.checkpoint)
TEMPORARY = ("orbax-checkpoint-tmp", ".ddm-tmp", ".tmp")  # parts of names that are never pushed
PUSH_EVERY_S = 10.0


def _step_of(rel: str) -> str | None:
    """'checkpoints/<step>' for a file inside a checkpoint step, else None."""
    parts = rel.split("/")
    return "/".join(parts[:2]) if len(parts) > 2 and parts[0] == "checkpoints" and parts[1].isdigit() else None


def _temporary(rel: str) -> bool:
    return any(mark in part for part in rel.split("/") for mark in TEMPORARY)


def _push_order(rel: str) -> tuple[bool, str]:
    return rel.rsplit("/", 1)[-1] == STEP_DIGEST, rel  # a step's digest after its other files


class Mirror:
    """`with Mirror(url, skip=(...)) as work:` a local folder whose files end up in folder `url`.

    `skip`: names (relative to the folder) the mirror never pulls, pushes or deletes (the lease, records the
    job writes to the URL itself)."""

    def __init__(self, url: str, *, skip: tuple[str, ...] = (), every_s: float = PUSH_EVERY_S):
        self.url, self.skip, self.every_s = url.rstrip("/"), set(skip), every_s
        self.local: Path | None = None  # the working copy: a new folder under $TMPDIR, made by `__enter__`
        self._pushed: dict[str, tuple[int, int] | None] = {}  # what the bucket holds: rel -> (size, mtime_ns)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def pull(self) -> int:
        """Copies the bucket folder into the working copy (complete checkpoint steps only); returns the count."""
        remote = [rel for rel in storage.list_files(self.url) if rel not in self.skip]
        complete = {_step_of(rel) for rel in remote if rel.endswith("/" + STEP_DIGEST)}
        count = 0
        for rel in remote:
            if _step_of(rel) is not None and _step_of(rel) not in complete:
                self._pushed[rel] = None  # an upload cut short: the next push deletes it
                continue
            target = self.local / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(storage.read_bytes(storage.join(self.url, rel)) or b"")
            self._pushed[rel] = self._signature(target)
            count += 1
        if count:
            logger.info(f"pulled {count} files from {self.url} into the working copy {self.local}")
        return count

    @staticmethod
    def _signature(path: Path) -> tuple[int, int]:
        stat = path.stat()
        return stat.st_size, stat.st_mtime_ns

    def push(self) -> int:
        """Uploads what changed since the last push, then deletes what the job deleted; returns files uploaded."""
        with self._lock:
            local = {}
            for path in self.local.rglob("*"):
                rel = path.relative_to(self.local).as_posix()
                if rel in self.skip or _temporary(rel):
                    continue
                try:
                    if path.is_file():
                        local[rel] = self._signature(path)
                except FileNotFoundError:  # removed while we looked (an old step dropped by retention)
                    continue
            uploaded = 0
            for rel in sorted(local, key=_push_order):
                if self._pushed.get(rel) == local[rel]:
                    continue
                try:
                    data = (self.local / rel).read_bytes()
                except FileNotFoundError:
                    continue
                storage.write_bytes(storage.join(self.url, rel), data)
                self._pushed[rel] = local[rel]
                uploaded += 1
            for rel in sorted(set(self._pushed) - set(local)):
                storage.delete(storage.join(self.url, rel))
                del self._pushed[rel]
            return uploaded

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.push()
            except Exception as err:  # noqa: BLE001 - a failed background push is retried; the last one raises
                logger.warning(f"pushing {self.local} to {self.url} failed (retrying): {err}")

    def __enter__(self) -> Path:
        self.local = Path(tempfile.mkdtemp(prefix="ddm-out-"))
        try:
            self.pull()
        except BaseException:
            shutil.rmtree(self.local, ignore_errors=True)
            raise
        self._thread = threading.Thread(target=self._loop, name="ddm-mirror", daemon=True)
        self._thread.start()
        return self.local

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            uploaded = self.push()  # also after a failure or SIGTERM: the checkpoints it left are worth keeping
            logger.info(f"pushed the working copy to {self.url} ({uploaded} files changed)")
        finally:
            shutil.rmtree(self.local, ignore_errors=True)
