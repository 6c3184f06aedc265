"""`SHA256SUMS` of an exported run folder: the SHA-256 of every file, in `sha256sum` format.

`sha256sum -c SHA256SUMS` checks an export by hand; `check_sums` is what `Run.open` does before anything in an
export is read, so a changed byte in any listed file (weights, manifest, configs, model card, or the list
itself) is refused. Files that are not listed (a `.git/` or `.gitattributes` a hub clone adds) are ignored.
"""

from __future__ import annotations

from pathlib import Path

from ddm.core.errors import DDMError
from ddm.core.hashing import file_sha256

SUMS = "SHA256SUMS"


def write_sums(folder: Path) -> Path:
    """Lists every file under `folder` (sorted relative paths) with its SHA-256; returns the SHA256SUMS path."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != SUMS)
    lines = [f"{file_sha256(p)}  {p.relative_to(folder).as_posix()}\n" for p in files]
    path = folder / SUMS
    path.write_text("".join(lines))
    return path


def check_sums(folder: Path) -> int:
    """Checks every file listed in folder/SHA256SUMS; returns how many. DDMError naming the first mismatch."""
    path = Path(folder) / SUMS
    if not path.is_file():
        raise DDMError(f"{folder} has no {SUMS}: not a complete export")
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise DDMError(f"{path} is not a valid {SUMS} file") from None
    count = 0
    for number, line in enumerate(text.splitlines(), 1):
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64 or not name or ".." in Path(name).parts or Path(name).is_absolute():
            raise DDMError(f"{path} line {number} is not '<sha256>  <file>'")
        target = Path(folder) / name
        if not target.is_file():
            raise DDMError(f"{target} is listed in {SUMS} but missing")
        if file_sha256(target) != digest:
            raise DDMError(f"{target} does not match its SHA-256 in {SUMS}: refusing to load the export")
        count += 1
    if count == 0:
        raise DDMError(f"{path} lists no files")
    return count
