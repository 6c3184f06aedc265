"""The distillation teacher of a run (`ddm distill`): its pinned experts (and router) as one pure velocity
function, `ddm.experts.distill.Teacher`.

- "cluster": sample i runs expert clusters[i] alone (one expert forward per sample, as in the paper). The rows
  are grouped by cluster and each expert runs on its own rows, by the ensemble's dispatcher
  (`ddm.sampling.dispatch` with one-hot weights: "unrolled" chunks on CPU, "grouped" buckets on GPU/TPU), so each
  expert's parameters are read once per batch, never copied per sample;
- "full": every expert runs on every sample (the experts share one architecture: their parameters stacked
  along a leading axis [K, ...] and one expert function vmapped over them) and the router's posterior
  p(k | x_t, t, y) weights them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ddm.core.errors import DDMError
from ddm.data.run import Run
from ddm.experts.distill import Teacher
from ddm.sampling import dispatch
from ddm.sampling.ensemble import Ensemble
from ddm.sampling.load import load_ensemble


def build_teacher(run: Run, kind: str) -> Teacher:
    """The run's teacher of kind "cluster" or "full"; DDMError if an expert (or, for "full", the router) is
    not trained."""
    if kind not in ("cluster", "full"):
        raise DDMError(f"teacher must be cluster or full, got {kind!r}")
    missing = run.unfinished_experts()
    if missing:
        raise DDMError(f"distillation needs every expert; experts {missing} of {run.root} are not trained")
    return ensemble_teacher(load_ensemble(run, with_router=kind == "full"), kind)


def ensemble_teacher(ensemble: Ensemble, kind: str) -> Teacher:
    """The teacher of kind "cluster" or "full" from a loaded ensemble with every expert available (and, for
    "full", its router); the cluster teacher runs the ensemble's `resolved_dispatch`. Experts of one
    architecture only: DDMError for an ensemble of several (islands that chose their own model size)."""
    if ensemble.heterogeneous:
        raise DDMError("distillation needs experts of one architecture; this run's islands chose different "
                       "expert.model configs")
    if kind == "cluster":
        return _cluster_teacher(ensemble)
    apply = ensemble.expert_apply
    stacked = dispatch.stack_params(ensemble.expert_params)
    router_apply, router_params = ensemble.router_apply, ensemble.router_params

    def teacher(x_t, t, clusters, y):
        del clusters  # the router decides
        v = jax.vmap(lambda p: apply(p, x_t, t, y))(stacked)  # [K, B, H, W, C]
        w = jax.nn.softmax(router_apply(router_params, x_t, t, y).astype(jnp.float32), axis=-1)  # [B, K]
        return jnp.einsum("bk,kb...->b...", w, v.astype(jnp.float32))

    return teacher


def _cluster_teacher(ensemble: Ensemble) -> Teacher:
    """Each sample through its own cluster's expert, the rows grouped by cluster (every expert available)."""
    present = tuple(range(ensemble.num_experts))
    unrolled = ensemble.resolved_dispatch == "unrolled"
    experts = tuple(ensemble.expert_params) if unrolled else ensemble.stacked_params
    common = {"cfg": False, "null_label": ensemble.num_classes}

    def teacher(x_t, t, clusters, y):
        """x_t [B, H, W, C] f32, t [B] f32, clusters [B] int32, y [B] int32 | None -> v [B, H, W, C] f32."""
        batch = x_t.shape[0]
        floor = dispatch.bucket_floor(batch, len(present), ensemble.min_bucket)
        weights = jax.nn.one_hot(clusters, len(present), dtype=jnp.float32)  # [B, K]: the own expert, weight 1
        args = (ensemble.expert_apply, experts, present, x_t, t, y, weights, jnp.float32(0.0))
        if unrolled:
            v, _, _ = dispatch.unrolled(*args, chunk=floor, **common)
        else:
            v, _, _ = dispatch.grouped(*args, buckets=dispatch.bucket_sizes(batch, floor), **common)
        return v

    return teacher
