"""The router of a run: the network it was trained as, and its weights pinned by SHA-256 in the manifest."""

from __future__ import annotations

import functools
from collections.abc import Callable

from flax import nnx

from ddm.core.checkpoint import load_pinned
from ddm.core.config import RouterConfig
from ddm.core.ensemble import model_apply
from ddm.core.errors import DDMError
from ddm.data.run import Run
from ddm.router.model import router_from_config


def make_router(router_cfg: RouterConfig, image_shape: tuple[int, int, int], num_clusters: int,
                rngs: nnx.Rngs) -> nnx.Module:
    return router_from_config(router_cfg, image_shape, num_clusters, rngs=rngs)


def router_factory(run: Run) -> Callable[[nnx.Rngs], nnx.Module]:
    """The router constructor for a run (what its checkpoints are restored into)."""
    return functools.partial(make_router, run.config.router, run.image_shape, run.num_clusters)


def load_router(run: Run) -> tuple[Callable, object]:
    """(apply(state, x, t, y) -> logits [B, K], state) of the run's finished router, checked against its pin."""
    entry = run.trained("router", what=f"the router of {run.root}",
                        hint=f"run `ddm train-router --run-dir {run.root}`")
    if entry.get("num_clusters") != run.num_clusters:
        raise DDMError(f"router was trained for {entry.get('num_clusters')} clusters but the manifest has "
                       f"{run.num_clusters}")
    model = load_pinned(run.weights_path(entry), entry.get("sha256"), router_factory(run), "router")
    return model_apply(model, labels=False)
