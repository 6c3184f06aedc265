"""Writing output files so that a failed command leaves nothing half-written.

Two habits, used by every command that writes what a user asked for:

- check an output path *before* any work (`check_output_file`, `check_output_dir`): a directory where a file
  should go, a path below a regular file or an unwritable folder is a one-line DDMError, not a traceback after
  minutes of sampling. Writability is tested by doing it (a probe file created and removed at once), not by
  `os.access`, which reads permission bits and read-only mounts only: it says yes to root for a chmod-0500
  folder and for /sys, where nothing can be created;
- write through a temporary name in the same folder and rename (`atomic_write`, `Staged`): a reader never sees
  a torn file, and a command that fails part-way removes what it staged. `Staged` commits several outputs
  together only once every one of them was written.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from ddm.core.errors import DDMError

TMP_MARK = ".ddm-tmp"  # temporary names: NAME.ddm-tmp<pid>, in the folder of NAME


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def write_refusal(folder: str | Path) -> OSError | None:
    """Why files cannot be created in `folder` (the OSError of creating an empty probe file there), None when
    they can; the probe is removed at once. Asks the filesystem, so it holds for root too."""
    try:
        handle, probe = tempfile.mkstemp(prefix=".ddm-probe", dir=folder)  # a fresh name: no clash with a leftover
    except OSError as err:
        return err
    os.close(handle)
    with contextlib.suppress(OSError):
        os.unlink(probe)
    return None


def check_output_dir(path: str | Path, what: str) -> Path:
    """`path` as a folder outputs may go into: an existing writable folder, or one that can be created (its
    nearest existing ancestor is a writable folder). DDMError naming `what` otherwise. Leaves nothing behind
    (the probe of writability is removed at once)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DDMError(f"{what} {path} is a file, not a folder")
    base = _nearest_existing(path.absolute())
    if not base.is_dir():
        raise DDMError(f"{what} {path} cannot be created: {base} is a file")
    err = write_refusal(base)
    if err is not None:
        raise DDMError(f"{what} {path} is not writable ({base} does not allow writing: {err.strerror or err})")
    return path


def check_output_file(path: str | Path, what: str, suffixes: tuple[str, ...] = ()) -> Path:
    """`path` as a file to be written: not a folder, with one of `suffixes` (when given), in a folder that exists
    or can be created and is writable; an existing file must be writable. DDMError naming `what` otherwise."""
    path = Path(path)
    if path.is_dir() or str(path).endswith(os.sep):
        raise DDMError(f"{what} {path} is a folder: give a file name")
    if suffixes and path.suffix.lower() not in suffixes:
        raise DDMError(f"{what} {path} must end with {' or '.join(suffixes)}")
    check_output_dir(path.parent if str(path.parent) else Path("."), f"the folder of {what}")
    if path.exists():
        try:  # opened for writing without creating or truncating: the file is left as it was
            os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK))  # a FIFO must not block
        except OSError as err:
            raise DDMError(f"{what} {path} exists and is not writable: {err.strerror or err}") from None
    return path


def temporary_name(path: Path) -> Path:
    return path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")


def atomic_write(path: str | Path, data: bytes | str) -> Path:
    """Writes `data` to `path` through a temporary file + rename: `path` holds the old or the new bytes, never
    a part. The folder is created when missing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


class Staged:
    """Several outputs committed together: `stage(path)` gives the temporary name to write `path` to; leaving the
    `with` block normally renames every staged file to its name, an exception removes them all (and the folders
    staging created), so a failed command leaves no output behind.

        with Staged() as out:
            save_png(..., out.stage(png))
            np.savez(out.stage(npz), ...)
    """

    def __init__(self) -> None:
        self._files: list[tuple[Path, Path]] = []
        self._made: list[Path] = []

    def stage(self, path: str | Path) -> Path:
        path = Path(path)
        missing = []
        parent = path.absolute().parent
        while not parent.exists():
            missing.append(parent)
            parent = parent.parent
        for folder in reversed(missing):
            folder.mkdir()
            self._made.append(folder)
        tmp = temporary_name(path)
        self._files.append((tmp, path))
        return tmp

    def __enter__(self) -> Staged:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            committed = []
            try:
                for tmp, path in self._files:
                    os.replace(tmp, path)
                    committed.append(path)
                return
            except OSError as err:
                self._discard(committed)
                raise DDMError(f"cannot write {path}: {err.strerror or err}") from None
        self._discard([])

    def _discard(self, committed: list[Path]) -> None:
        for path in [tmp for tmp, _ in self._files] + committed:
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
        for folder in reversed(self._made):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if still empty: nothing of anyone else's is removed
