"""Counting traces without a global registry: wrap the apply function the ensemble is built with.

jax runs an apply function's Python body only while tracing (a compiled program reuses the trace), so the
calls a `TraceCounter` sees are the traces. An ensemble built with a fresh counter compiles its own programs
(jitted functions are cached per apply function), which keeps counts independent between tests.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class TraceCounter:
    """apply(params, x, t, y) that records the x shape [b, ...] of every trace of the wrapped function."""

    def __init__(self, apply: Callable[..., Any]):
        self.apply = apply
        self.shapes: list[tuple[int, ...]] = []

    def __call__(self, params, x, t, y):
        self.shapes.append(tuple(x.shape))
        return self.apply(params, x, t, y)

    @property
    def traces(self) -> int:
        return len(self.shapes)
