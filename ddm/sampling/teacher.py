"""The distillation teacher of a run (`ddm distill`): its pinned experts (and router) as one pure velocity
function, `ddm.experts.distill.Teacher`.

The experts share one architecture, so their parameters are stacked along a leading axis [K, ...] and one
expert function is vmapped over them:
- "cluster": sample i runs expert clusters[i] alone (its parameters gathered per sample, so the cost is one
  expert forward per sample, as in the paper; memory holds B copies of one expert's parameters);
- "full": every expert runs on every sample and the router's posterior p(k | x_t, t, y) weights them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ddm.core.errors import DDMError
from ddm.data.run import Run
from ddm.experts.distill import Teacher
from ddm.sampling.load import load_ensemble


def build_teacher(run: Run, kind: str) -> Teacher:
    """The run's teacher of kind "cluster" or "full"; DDMError if an expert (or, for "full", the router) is
    not trained."""
    if kind not in ("cluster", "full"):
        raise DDMError(f"teacher must be cluster or full, got {kind!r}")
    missing = run.unfinished_experts()
    if missing:
        raise DDMError(f"distillation needs every expert; experts {missing} of {run.root} are not trained")
    ensemble = load_ensemble(run, with_router=kind == "full")
    apply = ensemble.expert_apply
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *ensemble.expert_params)

    def one(params, x, t, y):
        """One sample through its own expert: x [H, W, C], t [], y [] | None -> v [H, W, C]."""
        return apply(params, x[None], t[None], None if y is None else y[None])[0]

    if kind == "cluster":
        def teacher(x_t, t, clusters, y):
            params = jax.tree.map(lambda p: p[clusters], stacked)  # [B, ...]: each sample's expert
            return jax.vmap(one, in_axes=(0, 0, 0, None if y is None else 0))(params, x_t, t, y)
        return teacher

    router_apply, router_params = ensemble.router_apply, ensemble.router_params

    def teacher(x_t, t, clusters, y):
        del clusters  # the router decides
        v = jax.vmap(lambda p: apply(p, x_t, t, y))(stacked)  # [K, B, H, W, C]
        w = jax.nn.softmax(router_apply(router_params, x_t, t, y).astype(jnp.float32), axis=-1)  # [B, K]
        return jnp.einsum("bk,kb...->b...", w, v.astype(jnp.float32))

    return teacher
