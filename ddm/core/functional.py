"""A pure function over an NNX model's state: the form that jit, vmap over stacked experts and the ensemble take."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flax import nnx


def model_apply(model: nnx.Module, *, labels: bool = True) -> tuple[Callable, Any]:
    """A pure apply function and the state of an NNX model, in the form `Ensemble` takes.

    Returns (apply(state, x [b, H, W, C], t [b], y [b] | None) -> output, state). labels=False drops y (for a
    model without a class input).
    """
    graphdef, state = nnx.split(model)

    if labels:
        def apply(state, x, t, y):
            return nnx.merge(graphdef, state)(x, t, y)
    else:
        def apply(state, x, t, y):
            return nnx.merge(graphdef, state)(x, t)

    return apply, state
