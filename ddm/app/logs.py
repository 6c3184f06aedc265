"""How the `ddm` command shows logs: plain lines that do not tear progress bars, and no third-party chatter.

Library modules log through `logging.getLogger(__name__)` (all under the `ddm` logger) and print nothing
themselves; only the CLI decides where those lines go: progress and results (INFO) to stdout, warnings to
stderr. Other libraries' records (absl, jax, orbax) reach the user only at ERROR and above: their INFO and
WARNING lines are internal details, not something a user can act on.

An unexpected exception (a bug) never reaches the user as a traceback: `write_crash_log` puts it, with the
command line and versions, in a log file ($DDM_LOG_DIR, default ~/.cache/ddm/logs, else the temp folder),
and the CLI prints one line pointing there.
"""

from __future__ import annotations

import datetime
import logging
import os
import platform
import sys
import tempfile
import traceback
from importlib import metadata
from pathlib import Path

from tqdm import tqdm

import ddm
from ddm.core.cache import default_cache_dir


def _is_ddm(record: logging.LogRecord) -> bool:
    return record.name == "ddm" or record.name.startswith("ddm.")


class _DdmLines(logging.Handler):
    """ddm's own records, one per line through `tqdm.write` (an active progress bar is redrawn below).
    The stream is looked up at each record, so redirected stdout/stderr are honoured."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
            tqdm.write(self.format(record), file=stream)
        except Exception:  # noqa: BLE001 - logging must never raise into the caller
            self.handleError(record)


class _OthersToStderr(logging.Handler):
    """Everyone else's records at this handler's level and above, as `LEVEL name: message` on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        if _is_ddm(record):
            return  # already shown by _DdmLines
        try:
            sys.stderr.write(f"{record.levelname} {record.name}: {record.getMessage()}\n")
        except Exception:  # noqa: BLE001
            self.handleError(record)


def configure(level: int = logging.INFO, others: int = logging.ERROR) -> None:
    """Shows ddm's records of `level` and above, and other libraries' of `others` and above (idempotent).

    absl installs a plain stderr handler on the root logger the first time anything logs through it (that is
    where `WARNING:absl:...` lines come from); such handlers are turned into the same filtered one.
    """
    ddm_logger = logging.getLogger("ddm")
    for handler in [h for h in ddm_logger.handlers if isinstance(h, _DdmLines)]:
        ddm_logger.removeHandler(handler)
    lines = _DdmLines()
    lines.setFormatter(logging.Formatter("%(message)s"))
    ddm_logger.addHandler(lines)
    ddm_logger.setLevel(level)

    root = logging.getLogger()
    for handler in list(root.handlers):
        if type(handler) is logging.StreamHandler or isinstance(handler, _OthersToStderr):
            root.removeHandler(handler)
    others_handler = _OthersToStderr()
    others_handler.setLevel(others)
    root.addHandler(others_handler)


def one_line(err: BaseException, limit: int = 500) -> str:
    """An exception's message on one line (the first line, at most `limit` characters)."""
    lines = str(err).strip().splitlines()
    text = lines[0] if lines else type(err).__name__
    if isinstance(err, OSError) and err.filename and str(err.filename) not in text:
        text = f"{text}: {err.filename}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def crash_log_dirs() -> list[Path]:
    """Where crash logs go, in order of preference: $DDM_LOG_DIR, ~/.cache/ddm/logs ($DDM_CACHE_DIR/logs), temp."""
    first = [Path(os.environ["DDM_LOG_DIR"])] if os.environ.get("DDM_LOG_DIR") else []
    return first + [default_cache_dir() / "logs", Path(tempfile.gettempdir()) / "ddm-logs"]


def _version(package: str) -> str:
    """An installed package's version without importing it (a crash may come before jax was loaded)."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def write_crash_log(argv: list[str], err: BaseException) -> str:
    """Writes the traceback of `err` (with the command line and versions) to a new log file; returns its path,
    or a note when no folder could take it."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    text = (f"ddm {ddm.__version__}, python {platform.python_version()}, jax {_version('jax')}, "
            f"{platform.platform()}\ncommand: {' '.join(argv)}\n\n"
            + "".join(traceback.format_exception(type(err), err, err.__traceback__)))
    for folder in crash_log_dirs():
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"ddm-{stamp}-{os.getpid()}.log"
            path.write_text(text)
            return str(path)
        except OSError:
            continue
    return "no log: no writable log folder"
