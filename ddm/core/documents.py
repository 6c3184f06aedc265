"""JSON documents (manifest.json, island.json, expert.json, verification records, thresholds): one canonical
form to digest, one way to write a file, one way to read and check one.

- `canonical_bytes(obj)`: the UTF-8 bytes of ``json.dumps(obj, sort_keys=True, separators=(",", ":"),
  ensure_ascii=True, allow_nan=False)``: keys sorted, no whitespace, non-ASCII as \\uXXXX escapes, floats as
  Python's shortest round-trip repr. `digest(obj)` is its SHA-256 (hex): what run ids, bundle and config
  digests, signatures and commitments are computed over. NaN and Inf are refused (JSON has no spelling for
  them; Python's ``NaN`` token would make the digest of a value no other JSON reader can produce).
- `dumps(obj)`: the file layout: indented (keys in the order given), ASCII, NaN / Inf refused, a final
  newline. `write(path, obj)` writes it through a temporary file in the same folder and a rename
  (`ddm.core.files.atomic_write`): a reader sees the old document or the new one, never a part.
- `parse(raw, where)`: strict JSON: duplicate keys, the tokens ``NaN`` / ``Infinity``, bad UTF-8, nesting too
  deep and integers too long to convert are all one-line DDMErrors ``"{where} is not valid JSON: ..."``.
  `load(raw, schema, where)` parses and checks against a `ddm.core.schema` schema (and its rules);
  `read(path, schema, what)` does the same for a local file and names it in every error.

Documents that may live in a bucket (island.json, expert.json) are read and written as bytes by
`ddm.data.storage` and go through `dumps` / `load` here.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ddm.core.errors import DDMError
from ddm.core.files import atomic_write
from ddm.core.schema import Rule, Spec, check


def canonical_bytes(obj: Any) -> bytes:
    """The canonical bytes of a JSON value (layout in the module docstring); DDMError for NaN / Inf or a value
    JSON cannot hold."""
    try:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()
    except (TypeError, ValueError, RecursionError) as err:
        raise DDMError(f"not canonical JSON: {err}") from None


def digest(obj: Any) -> str:
    """SHA-256 hex digest (64 lowercase hex digits) of `canonical_bytes(obj)`."""
    return hashlib.sha256(canonical_bytes(obj)).hexdigest()


def dumps(obj: Any, indent: int = 2) -> bytes:
    """`obj` as a file holds it: indented by `indent`, keys in the order given, ASCII, ending in a newline;
    DDMError for NaN / Inf or a value JSON cannot hold."""
    try:
        return (json.dumps(obj, indent=indent, ensure_ascii=True, allow_nan=False) + "\n").encode()
    except (TypeError, ValueError, RecursionError) as err:
        raise DDMError(f"cannot write as JSON: {err}") from None


def write(path: str | Path, obj: Any, indent: int = 2) -> Path:
    """Writes `dumps(obj, indent)` to `path` atomically (temporary file in the same folder + rename; the folder
    is created when missing). Nothing is written when `obj` is not JSON."""
    return atomic_write(path, dumps(obj, indent))


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        duplicate = next(k for k in keys if keys.count(k) > 1)
        raise DDMError(f"duplicate key {duplicate!r}")
    return dict(pairs)


def _constant(name: str):
    raise DDMError(f"{name} is not a JSON number")


def parse(raw: str | bytes, where: str) -> Any:
    """Strict JSON text -> value; DDMError ``"{where} is not valid JSON: ..."`` (one line) for duplicate keys,
    NaN / Infinity, bad UTF-8, nesting too deep to parse or integers too long to convert."""
    try:
        return json.loads(raw, object_pairs_hook=_no_duplicate_keys, parse_constant=_constant)
    except DDMError as err:
        raise DDMError(f"{where} is not valid JSON: {err}") from None
    except (ValueError, UnicodeDecodeError, RecursionError) as err:  # JSONDecodeError, a 5,000-digit number
        raise DDMError(f"{where} is not valid JSON: {' '.join(str(err)[:200].split())}") from None


def check_format(document: Any, fmt: str, where: str) -> dict:
    """`document` if it is an object whose "format" is `fmt`; DDMError ``"{where} is not a {fmt} document"``."""
    if not isinstance(document, dict) or document.get("format") != fmt:
        raise DDMError(f"{where} is not a {fmt} document")
    return document


def load(raw: str | bytes, schema: Spec | None, where: str, *, fmt: str | None = None,
         rules: Sequence[Rule] = ()) -> Any:
    """Parses `raw` strictly, checks its "format" (when `fmt` is given), then `schema` and `rules` (when a
    schema is given); returns the document, else a one-line DDMError starting with `where`."""
    document = parse(raw, where)
    if fmt is not None:
        check_format(document, fmt, where)
    return document if schema is None else check(document, schema, where, rules)


def read(path: str | Path, schema: Spec | None, what: str, *, fmt: str | None = None,
         rules: Sequence[Rule] = (), missing: str = "") -> Any:
    """The document in the local file `path`, parsed and checked as `load` does. Errors name it
    ``"{what} {path}"``; a missing file is ``"no {what} at {path}"`` followed by `missing` (a hint) when given."""
    path = Path(path)
    where = f"{what} {path}"
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DDMError(f"no {what} at {path}" + (f": {missing}" if missing else "")) from None
    except OSError as err:
        raise DDMError(f"{where} cannot be read: {err.strerror or err}") from None
    return load(raw, schema, where, fmt=fmt, rules=rules)
