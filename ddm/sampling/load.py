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
from ddm.data.run import Run
from ddm.router.trained import load_router
from ddm.sampling.ensemble import Ensemble
from ddm.train.checkpoint import load_pinned


def open_run(run: Run | str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Run:
    """`run` itself, or the run directory at that path opened with `overrides`."""
    return run if isinstance(run, Run) else Run.open(run, overrides)


def expert_factory(run: Run) -> Callable[[nnx.Rngs], nnx.Module]:
    """The constructor every expert of the run is restored into."""
    return functools.partial(dit_from_config, run.config.expert.model, run.image_shape)


def single_factory(run: Run, entry: dict) -> tuple[ModelConfig, Callable[[nnx.Rngs], nnx.Module]]:
    """(model config, constructor) of a single model (the monolith): the config it was trained with."""
    model_cfg = from_dict(ModelConfig, entry["model"]) if "model" in entry else run.config.expert.model
    return model_cfg, functools.partial(dit_from_config, model_cfg, run.image_shape)


def prior_counts(run: Run) -> np.ndarray:
    """What the `prior` strategy's p(k | y) comes from, as the manifest plans it: each cluster's class counts
    [K, num_classes] (labelled data), else its size [K]. float64."""
    if run.num_classes and all("class_counts" in c for c in run.clusters):
        return np.array([c["class_counts"] for c in run.clusters], np.float64)
    return np.array([c["count"] for c in run.clusters], np.float64)


def load_ensemble(run: Run | str | Path, overrides: list[str] | tuple[str, ...] = (), *,
                  with_router: bool = True) -> Ensemble:
    """The routed ensemble of a run: its finished experts (EMA weights) and its router.

    Experts that are not finished are left out (the ensemble masks them and warns); the router is required
    unless `with_router` is False (then only the `oracle` / `prior` / `single:k` strategies work). The clusters'
    data counts (`prior_counts`) go with it, for `prior`.
    """
    run = open_run(run, overrides)
    make_expert = expert_factory(run)
    states, apply = [], None
    for k in run.cluster_ids:
        entry = run.expert(k)
        if not run.finished(entry):
            states.append(None)
            continue
        model = load_pinned(run.weights_path(entry), entry.get("sha256"), make_expert, f"expert {k}")
        apply, state = model_apply(model)
        states.append(state)
    if apply is None:
        raise DDMError(f"no expert of {run.root} is trained yet: run `ddm train-islands --run-dir {run.root}`")
    router_apply = router_state = None
    if with_router:
        router_apply, router_state = load_router(run)
    return Ensemble(apply, states, router_apply, router_state, image_shape=run.image_shape, codec=run.codec,
                    num_classes=run.config.expert.model.num_classes, prior_counts=prior_counts(run))


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
                    codec=run.codec)
