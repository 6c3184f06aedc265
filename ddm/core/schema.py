"""Declarative checks of JSON documents (the run manifest, island bundles, ...) with one-line errors.

A schema is plain data: `Obj({"name": Int(min=0), ...}, optional={...})`, `ListOf(...)`, `MapOf(...)`,
`Str(...)`, `Hex(64)`, `Num(...)`, `Bool()`, `Nullable(...)`, `Named(...)`, `Anything()`.
`check(document, schema, where)` walks the document and raises one `DDMError` for the first field that does
not fit, naming the field by its path and what it should be:

    manifest runs/x/manifest.json: clusters must be a list of objects, got 'x'
    manifest runs/x/manifest.json: dataset.image_shape[0] must be an integer in 1..65536, got 'a'

Relations between fields (counts that must add up, ids that must be in order) are `rules`: functions of the
(already type-checked) document that return a problem or None, checked after the schema. To check a new
field, add it to the schema of its document (under `optional` when older documents lack it); fields a schema
does not name are kept and not checked, so a reader never refuses a document only because a newer writer
added something; a `closed` object (a signed record, whose every byte is a claim) refuses them instead:

    record r.json: unknown field 'comment'

"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

from ddm.core.errors import DDMError

Rule = Callable[[dict], "str | None"]  # a problem with the document, or None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class Spec:
    """One field's expected form. `problem` returns (path of the offending field, what it must be) or None."""

    def describe(self) -> str:
        raise NotImplementedError

    def problem(self, value: Any, path: str) -> tuple[str, str, Any] | None:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Anything(Spec):
    """Anything (checked elsewhere, e.g. the config section by the config's own dataclasses)."""

    kind: type | tuple[type, ...] | None = None
    name: str = "anything"

    def describe(self) -> str:
        return self.name

    def problem(self, value, path):
        if self.kind is not None and not isinstance(value, self.kind):
            return path, self.name, value
        return None


def _outside(spec: Int | Num, value) -> bool:
    """Whether a number lies outside the spec's [min, max] (either bound may be None: unbounded)."""
    return (spec.min is not None and value < spec.min) or (spec.max is not None and value > spec.max)


@dataclasses.dataclass(frozen=True)
class Int(Spec):
    min: int | None = None
    max: int | None = None

    def describe(self) -> str:
        if self.min is not None and self.max is not None:
            return f"an integer in {self.min}..{self.max}"
        if self.min is not None:
            return f"an integer >= {self.min}"
        return "an integer" if self.max is None else f"an integer <= {self.max}"

    def problem(self, value, path):
        return (path, self.describe(), value) if not _is_int(value) or _outside(self, value) else None


@dataclasses.dataclass(frozen=True)
class Num(Spec):
    """A finite number (ints accepted) within [min, max]."""

    min: float | None = None
    max: float | None = None

    def describe(self) -> str:
        lo = "" if self.min is None else f" >= {self.min:g}"
        hi = "" if self.max is None else f" <= {self.max:g}"
        return f"a finite number{lo}{' and' if lo and hi else ''}{hi}"

    def problem(self, value, path):
        ok = (_is_int(value) or isinstance(value, float)) and math.isfinite(value)
        return (path, self.describe(), value) if not ok or _outside(self, value) else None


@dataclasses.dataclass(frozen=True)
class Bool(Spec):
    def describe(self) -> str:
        return "true or false"

    def problem(self, value, path):
        return None if isinstance(value, bool) else (path, self.describe(), value)


@dataclasses.dataclass(frozen=True)
class Str(Spec):
    """A string of `min_len` (non-empty by default) to `max_len` characters, one of `choices` or matching `pattern`
    (when given)."""

    choices: tuple[str, ...] = ()
    pattern: str | None = None
    max_len: int = 4096
    name: str | None = None
    min_len: int = 1

    def describe(self) -> str:
        if self.name:
            return self.name
        if self.choices:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        if self.min_len == 0:
            return f"a string of at most {self.max_len} characters"
        return "a non-empty string"

    def problem(self, value, path):
        if (not isinstance(value, str) or len(value) < self.min_len or len(value) > self.max_len
                or (self.choices and value not in self.choices)
                or (self.pattern is not None and not re.fullmatch(self.pattern, value))):
            return path, self.describe(), value
        return None


def Hex(digits: int = 64) -> Str:  # noqa: N802 - reads like the other specs
    """`digits` lowercase hex digits (a SHA-256 is 64)."""
    return Str(pattern=f"[0-9a-f]{{{digits}}}", name=f"{digits} lowercase hex digits")


def RelPath() -> Str:  # noqa: N802
    """A path inside the run directory (relative, no `..`) or a URL (`gs://...`)."""
    return Str(pattern=r"(?!/)(?!.*(^|/)\.\.(/|$))[^\x00]+|[a-z][a-z0-9+.-]*://[^\x00]+",
               name="a relative path inside the run (no '..') or a URL")


@dataclasses.dataclass(frozen=True)
class Nullable(Spec):
    inner: Spec

    def describe(self) -> str:
        return f"{self.inner.describe()} or null"

    def problem(self, value, path):
        if value is None:
            return None
        found = self.inner.problem(value, path)
        return None if found is None else (found[0], f"{found[1]} or null" if found[0] == path else found[1],
                                           found[2])


@dataclasses.dataclass(frozen=True)
class Named(Spec):
    """`inner`, with any problem inside it reported as this field not being `name`: for small compound values
    (a shape, a map of strings) that read better whole than by their parts."""

    inner: Spec
    name: str

    def describe(self) -> str:
        return self.name

    def problem(self, value, path):
        return None if self.inner.problem(value, path) is None else (path, self.name, value)


@dataclasses.dataclass(frozen=True)
class ListOf(Spec):
    item: Spec
    min_len: int = 0
    max_len: int | None = None
    name: str | None = None

    def describe(self) -> str:
        if self.name:
            return self.name
        size = ""
        if self.min_len == self.max_len:
            size = f"{self.min_len} "
        elif self.min_len:
            size = f"at least {self.min_len} "
        noun = self.item.describe()
        return f"a list of {size}{'objects' if isinstance(self.item, Obj) else noun}"

    def problem(self, value, path):
        if (not isinstance(value, list) or len(value) < self.min_len
                or (self.max_len is not None and len(value) > self.max_len)):
            return path, self.describe(), value
        for i, item in enumerate(value):
            found = self.item.problem(item, f"{path}[{i}]")
            if found is not None:
                return found
        return None


@dataclasses.dataclass(frozen=True)
class Obj(Spec):
    """An object with `fields` (required) and `optional` fields; other keys are allowed and not checked, or
    refused when `closed`."""

    fields: dict[str, Spec]
    optional: dict[str, Spec] = dataclasses.field(default_factory=dict)
    closed: bool = False

    def describe(self) -> str:
        return "an object"

    def problem(self, value, path):
        if not isinstance(value, dict):
            return path, self.describe(), value
        prefix = f"{path}." if path else ""
        if self.closed:
            unknown = sorted(set(value) - set(self.fields) - set(self.optional))
            if unknown:
                return f"{prefix}{unknown[0]}", "absent", _UNKNOWN
        for name, spec in self.fields.items():
            if name not in value:
                return f"{prefix}{name}", "present", _MISSING
            found = spec.problem(value[name], f"{prefix}{name}")
            if found is not None:
                return found
        for name, spec in self.optional.items():
            if name in value:
                found = spec.problem(value[name], f"{prefix}{name}")
                if found is not None:
                    return found
        return None


@dataclasses.dataclass(frozen=True)
class MapOf(Spec):
    """An object of at most `max_len` keys (when given) that match `key_pattern`, whose values all fit `value`."""

    value: Spec
    key_pattern: str = ".+"
    key_name: str = "keys"
    max_len: int | None = None

    def describe(self) -> str:
        return "an object"

    def problem(self, value, path):
        if not isinstance(value, dict):
            return path, self.describe(), value
        if self.max_len is not None and len(value) > self.max_len:
            return path, f"an object of at most {self.max_len} keys", value
        for key, item in value.items():
            if not re.fullmatch(self.key_pattern, key):
                return path or "the document", f"keyed by {self.key_name}", key
            found = self.value.problem(item, f"{path}.{key}" if path else key)
            if found is not None:
                return found
        return None


_MISSING = object()
_UNKNOWN = object()


def check(document: Any, schema: Spec, where: str, rules: Sequence[Rule] = ()) -> Any:
    """Returns `document` if it fits `schema` and every rule; else DDMError `"{where}: {field} must be ..."`."""
    found = schema.problem(document, "")
    if found is not None:
        path, expected, got = found
        field = path or "the document"
        if got is _MISSING:
            raise DDMError(f"{where}: {field} is missing")
        if got is _UNKNOWN:
            raise DDMError(f"{where}: unknown field {field!r}")
        raise DDMError(f"{where}: {field} must be {expected}, got {_short(got)}")
    for rule in rules:
        problem = rule(document)
        if problem:
            raise DDMError(f"{where}: {problem}")
    return document
