"""A run's trained models, ready to sample: the routed `Ensemble`, or one model (the monolith) on its own.

Every component is restored from its `final/` checkpoint (or, in an export, its `.safetensors` file) and
checked against the SHA-256 pinned in the manifest (`ddm.train.checkpoint.load_pinned`): a corrupted or
tampered checkpoint never reaches sampling.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import numpy as np
from flax import nnx

from ddm.core.config import ModelConfig, from_dict
from ddm.core.dit import dit_from_config
from ddm.core.errors import DDMError
from ddm.core.functional import model_apply
from ddm.data.membership import router_problem
from ddm.data.run import Run
from ddm.router.trained import load_router
from ddm.sampling.ensemble import Ensemble
from ddm.train.checkpoint import load_pinned


def open_run(run: Run | str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Run:
    """`run` itself, or the run directory at that path opened with `overrides`."""
    return run if isinstance(run, Run) else Run.open(run, overrides)


def entry_model(run: Run, entry: dict | None, what: str) -> ModelConfig:
    """The model config a component (manifest `entry`, named `what`) was trained with: the entry's "model" (an
    island chooses its expert's own, `ddm.experts.assemble`), else the plan's `expert.model`."""
    if not entry or "model" not in entry:
        return run.config.expert.model
    try:
        return from_dict(ModelConfig, entry["model"])
    except DDMError as err:
        raise DDMError(f"{what}'s model config in {run.root}'s manifest is not valid: {err}") from None


def expert_factory(run: Run, k: int | None = None) -> Callable[[nnx.Rngs], nnx.Module]:
    """The constructor expert `k` is restored into: its own model config (`entry_model`); None: the plan's."""
    model_cfg = run.config.expert.model if k is None else entry_model(run, run.expert(k), f"expert {k}")
    return functools.partial(dit_from_config, model_cfg, run.image_shape)


def single_factory(run: Run, entry: dict) -> tuple[ModelConfig, Callable[[nnx.Rngs], nnx.Module]]:
    """(model config, constructor) of a single model (the monolith): the config it was trained with."""
    model_cfg = entry_model(run, entry, "the single model")
    return model_cfg, functools.partial(dit_from_config, model_cfg, run.image_shape)


def prior_counts(run: Run) -> np.ndarray:
    """What the `prior` strategy's p(k | y) comes from, as the manifest plans it: each cluster's class counts
    [K, num_classes] (labelled data), else its size [K]; zero for a removed cluster. float64."""
    if run.num_classes and all("class_counts" in c for c in run.clusters):
        counts = np.array([c["class_counts"] for c in run.clusters], np.float64)
    else:
        counts = np.array([c["count"] for c in run.clusters], np.float64)
    counts[run.removed_clusters] = 0  # a cluster that left (`ddm remove-island`) is no part of the mixture
    return counts


def load_ensemble(run: Run | str | Path, overrides: list[str] | tuple[str, ...] = (), *,
                  with_router: bool = True, membership: str | None = None) -> Ensemble:
    """The routed ensemble of a run: its finished experts (EMA weights) and its router.

    Experts that are not finished, or whose cluster left (`ddm remove-island`), are left out (the ensemble masks
    them and warns). The router is loaded unless `with_router` is False (then only the `oracle` / `prior` /
    `single:k` strategies work); when it is not trained, or was trained for another membership
    (`ddm.data.membership.router_problem`), the ensemble has none and router strategies refuse with the reason
    (`Ensemble.router_note`), while `prior` needs only the clusters' data counts (`prior_counts`), which go with
    it. membership: the id of an earlier membership of the run (`Run.at`): its experts and
    router, as they were (a verification record names the one it was made with).

    Each expert is restored with its own model config (`entry_model`); experts of one config share one apply
    function. When every expert has the same config the Ensemble gets that one function (the homogeneous
    path); otherwise one per expert, and it runs each group of equal structure with its own program.
    """
    run = open_run(run, overrides)
    if membership is not None:
        run = run.at(membership)
    states, applies = [], []
    shared: dict[ModelConfig, Callable] = {}  # one apply function per architecture
    for k in range(run.num_clusters):  # one slot per cluster id; a removed cluster's expert is unregistered
        entry = run.expert(k)
        if not run.finished(entry):
            states.append(None)
            applies.append(None)
            continue
        model = load_pinned(run.weights_path(entry), entry.get("sha256"), expert_factory(run, k), f"expert {k}")
        apply, state = model_apply(model)
        applies.append(shared.setdefault(entry_model(run, entry, f"expert {k}"), apply))
        states.append(state)
    if not shared:
        raise DDMError(f"no expert of {run.root} is trained yet: run `ddm train-islands --run-dir {run.root}`")
    router_apply = router_state = None
    stale = router_problem(run.manifest) if with_router else None
    if with_router and stale is None and not run.finished(run.component("router")):
        stale = f"the router of {run.root} is not trained: run `ddm train-router --run-dir {run.root}`"
    if with_router and stale is None:
        router_apply, router_state = load_router(run)
    apply = next(iter(shared.values())) if len(shared) == 1 else applies  # one architecture: one function
    return Ensemble(apply, states, router_apply, router_state, image_shape=run.image_shape, codec=run.codec,
                    num_classes=run.config.expert.model.num_classes,
                    condition_shape=run.config.expert.model.condition_shape or (), prior_counts=prior_counts(run),
                    router_note=stale)


def load_single(run: Run | str | Path, section: str = "monolith") -> Ensemble | None:
    """A run's single model (the monolith) as a 1-expert Ensemble (sample it with `single:0`); None if it is
    not trained. Its model config is the one it was trained with (stored in its manifest entry)."""
    run = open_run(run)
    entry = run.component(section)
    if not run.finished(entry):
        return None
    model_cfg, make = single_factory(run, entry)
    apply, state = model_apply(load_pinned(run.weights_path(entry), entry.get("sha256"), make, section))
    return Ensemble(apply, [state], None, None, image_shape=run.image_shape, num_classes=model_cfg.num_classes,
                    condition_shape=model_cfg.condition_shape or (), codec=run.codec)
