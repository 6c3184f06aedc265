"""The router of a run: the network it was trained as, and its weights pinned by SHA-256 in the manifest."""

from __future__ import annotations

import functools
from collections.abc import Callable

from flax import nnx

from ddm.core.config import RouterConfig
from ddm.core.errors import DDMError
from ddm.core.functional import model_apply
from ddm.data.membership import router_problem
from ddm.data.run import Run
from ddm.router.model import router_condition_shape, router_from_config
from ddm.train.checkpoint import load_pinned


def make_router(router_cfg: RouterConfig, image_shape: tuple[int, int, int], num_clusters: int,
                num_classes: int, rngs: nnx.Rngs, condition_shape: tuple[int, ...] = ()) -> nnx.Module:
    return router_from_config(router_cfg, image_shape, num_clusters, num_classes, rngs=rngs,
                              condition_shape=condition_shape)


def router_factory(run: Run) -> Callable[[nnx.Rngs], nnx.Module]:
    """The router constructor for a run (what its checkpoints are restored into). On labelled data the router
    takes the class as an input: it models p(cluster | x_t, t, y), and p(cluster | x_t, t) under the null label;
    on data with condition embeddings it takes those, unless `router.condition` is off."""
    return functools.partial(make_router, run.config.router, run.image_shape, run.num_clusters, run.num_classes,
                             condition_shape=run.condition_shape)


# The settings that decide the router's network: a checkpoint restores only into the network it was trained as.
NETWORK_FIELDS = ("arch", "preset", "patch_size", "condition")


def check_router_network(entry: dict, router_cfg: RouterConfig) -> None:
    """DDMError naming the first network setting in which `router_cfg` differs from the one the trained router
    recorded (manifest entry's "router"; entries without one are not checked)."""
    trained = entry.get("router") or {}
    for field in NETWORK_FIELDS:
        if field in trained and trained[field] != getattr(router_cfg, field):
            raise DDMError(f"the router was trained with router.{field}={trained[field]} but this command has "
                           f"router.{field}={getattr(router_cfg, field)}: drop that --set, or retrain the router")


def load_router(run: Run) -> tuple[Callable, object]:
    """(apply(state, x, t, y) -> logits [B, K], state) of the run's finished router, checked against its pin.

    y: [B] int32 class labels (the null label `num_classes`, or None, for p(k | x_t, t)), or float [B,
    *condition_shape] condition embeddings (NaN rows are the null); ignored by the router of an unlabelled run
    and by one that does not take the embeddings (`router.condition` off).
    """
    entry = run.trained("router", what=f"the router of {run.root}",
                        hint=f"run `ddm train-router --run-dir {run.root}`")
    stale = router_problem(run.manifest)  # trained with clusters that left, or before one joined
    if stale is not None:
        raise DDMError(stale)
    if entry.get("num_clusters") != run.num_clusters:
        raise DDMError(f"router was trained for {entry.get('num_clusters')} clusters but the manifest has "
                       f"{run.num_clusters}")
    if entry.get("num_classes", 0) != run.num_classes:
        raise DDMError(f"router was trained for {entry.get('num_classes', 0)} classes but the data has "
                       f"{run.num_classes}")
    check_router_network(entry, run.config.router)
    model = load_pinned(run.weights_path(entry), entry.get("sha256"), router_factory(run), "router")
    takes = run.num_classes > 0 or bool(router_condition_shape(run.config.router, run.condition_shape))
    return model_apply(model, labels=takes)
