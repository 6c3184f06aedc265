"""The reference dispatcher (the design before the one-program solve) and the Python-loop ODE solver.

`host_velocity` / `host_sample` compute what `Ensemble.velocity` / `Ensemble.sample` compute, the slow and
obvious way: per velocity evaluation the router runs (one jitted call), its [B, K] weights come to the host,
and every expert with selected samples runs one jitted call on a padded bucket of its rows (powers of two from
a floor, capped at the batch: `ddm.sampling.dispatch.bucket_floor` / `bucket_size`); the ODE is a Python loop
over `flow.euler_step` / `flow.heun_step` (`solve`). The noise, the routing keys and the `prior` draws are the
ensemble's own, so every device dispatch agrees with this to float rounding (tests/test_ensemble_device.py),
and `benchmarks/bench_sampling.py` times it as the baseline.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ddm.core import flow
from ddm.sampling import dispatch as dispatch_lib
from ddm.sampling.ensemble import Ensemble, SampleResult, _fixed_route, _route
from ddm.sampling.routing import Strategy

HOST = "host"  # SampleResult.dispatch of the reference


def solve(velocity: flow.Velocity, x1: jax.Array, steps: int, solver: str = "euler") -> jax.Array:
    """Integrates from noise x1 [B, ...] float32 at t=1 to x0 [B, ...] float32 at t=0, one Python step at a
    time (`flow.integrate` is the package's one solver; this is its reference)."""
    step = flow.step_function(solver)
    ts = flow.time_grid(steps)
    x = jnp.asarray(x1, jnp.float32)
    for i in range(steps):
        x = step(velocity, x, float(ts[i]), float(ts[i + 1]))
    return x


def _expert_contrib(expert_apply, null_label, params, acc, x, t, y, weights, k, idx, cfg_scale, *, cfg):
    """acc [B, ...] + weights[idx, k] * v_k(x[idx]) scattered back to rows idx; returns the new acc.

    idx [bucket] int32: selected rows, padded with B (out of range: the gather clips it, the scatter drops it).
    k: int32 scalar (traced, so one executable serves every expert). cfg (static): classifier-free guidance.
    """
    xb, tb = x.at[idx].get(mode="clip"), t.at[idx].get(mode="clip")
    yb = None if y is None else y.at[idx].get(mode="clip")
    v = dispatch_lib.expert_velocity(expert_apply, params, xb, tb, yb, cfg_scale, cfg=cfg, null_label=null_label)
    w = weights.at[idx, k].get(mode="clip")
    return acc.at[idx].add(w.reshape((-1,) + (1,) * (v.ndim - 1)) * v, mode="drop")


@functools.lru_cache(maxsize=16)
def _jitted_contrib(expert_apply, null_label: int):
    return jax.jit(functools.partial(_expert_contrib, expert_apply, null_label), static_argnames=("cfg",),
                   donate_argnames=("acc",))


@functools.lru_cache(maxsize=16)
def _jitted_route(router_apply):
    return jax.jit(functools.partial(_route, router_apply), static_argnames=("strategy",))


_fixed_route_jit = jax.jit(_fixed_route, static_argnames=("batch", "strategy"))


def _present(ens: Ensemble) -> tuple[int, ...]:
    return tuple(k for k in range(ens.num_experts) if ens.available[k])


def _fixed_weights(ens: Ensemble, strategy: Strategy, labels: np.ndarray | None, n: int):
    """(device, host) weights [n, K] for the strategies that ignore the router (oracle, prior, single)."""
    if strategy.needs_router:
        return None
    weights = _fixed_route_jit(jnp.asarray(ens.available, bool), labels, n, strategy=strategy)
    return weights, np.asarray(weights)


def _evaluate(ens: Ensemble, x, t, y, strategy: Strategy, *, key, offset: int, fixed, cfg: bool,
              cfg_scale: float) -> tuple[jax.Array, jax.Array, int, int]:
    """One evaluation: v [B, ...] f32, weights [B, K] f32 (device), real and padded expert rows."""
    batch = x.shape[0]
    present = _present(ens)
    if fixed is not None:
        weights, host = fixed
    else:
        weights = _jitted_route(ens.router_apply)(ens.router_params, x, t, y, jnp.asarray(ens.available, bool),
                                                  key, jnp.uint32(offset), strategy=strategy)
        host = None if strategy.kind == "full" else np.asarray(weights)  # the one [B, K] transfer
    contrib = _jitted_contrib(ens.expert_apply, ens.num_classes)
    acc = jnp.zeros(x.shape, jnp.float32)
    scale = jnp.float32(cfg_scale)
    real = padded = 0
    floor = dispatch_lib.bucket_floor(batch, len(present), ens.min_bucket)
    for k in present:
        if host is None:
            rows = np.arange(batch, dtype=np.int32)
        else:
            rows = np.flatnonzero(host[:, k] > 0).astype(np.int32)
            if rows.size == 0:
                continue
        size = dispatch_lib.bucket_size(rows.size, batch, floor)
        idx = np.full((size,), batch, np.int32)
        idx[: rows.size] = rows
        acc = contrib(ens.expert_params[k], acc, x, t, y, weights, jnp.int32(k), idx, scale, cfg=cfg)
        real += rows.size
        padded += size
    return acc, weights, real, padded


def host_velocity(ens: Ensemble, x_t, t, strategy: str | Strategy, *, rng=None, labels: Any = None, y: Any = None,
                  cfg_scale: float | None = None) -> tuple[jax.Array, jax.Array]:
    """`Ensemble.velocity` by the reference dispatcher: (v [B, H, W, C] f32, weights [B, K] f32)."""
    strategy = ens._check_strategy(strategy)
    x = jnp.asarray(x_t, jnp.float32)
    batch = x.shape[0]
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (batch,))
    labels = ens._check_labels(strategy, labels, batch)
    y_host, cfg = ens._check_condition(y, cfg_scale, batch)
    y_dev = None if y_host is None else jnp.asarray(y_host)
    fixed = _fixed_weights(ens, strategy, labels, batch)
    v, weights, _, _ = _evaluate(ens, x, t, y_dev, strategy, key=rng, offset=0, fixed=fixed, cfg=cfg,
                                 cfg_scale=0.0 if cfg_scale is None else float(cfg_scale))
    return v, weights


def _solve_batch(ens, x1, y, labels, route_base, offset: int, strategy, steps, solver, cfg, scale: float):
    """One batch: a Python loop over steps (`solve`'s) and, per evaluation, over experts."""
    fixed = _fixed_weights(ens, strategy, labels, x1.shape[0])
    step_weights = []
    counts = [0, 0]  # real, padded rows
    evaluation = [0]

    def velocity(x_s, t_s):
        stage = evaluation[0] % 2 if solver == "heun" else 0
        step = evaluation[0] // 2 if solver == "heun" else evaluation[0]
        key = None if route_base is None else jax.random.fold_in(route_base, 2 * step + stage)
        v, w, r, p = _evaluate(ens, x_s, t_s, y, strategy, key=key, offset=offset, fixed=fixed, cfg=cfg,
                               cfg_scale=scale)
        if stage == 0:
            step_weights.append(np.asarray(w))
        evaluation[0] += 1
        counts[0] += r
        counts[1] += p
        return v

    x = solve(velocity, x1, steps, solver)
    return np.asarray(x), np.stack(step_weights), counts[0], counts[1]


def host_sample(ens: Ensemble, n: int, strategy: str | Strategy = "top1", *, steps: int = 50, solver: str = "euler",
                seed: int = 0, labels: Any = None, y: Any = None, cfg_scale: float | None = None,
                batch_size: int | None = None) -> SampleResult:
    """`Ensemble.sample` by the reference dispatcher (the same noise, routing keys and prior draws); its
    `dispatch` is "host"."""
    strategy = ens._check_strategy(strategy)
    flow.step_function(solver)
    labels = ens._check_labels(strategy, labels, n)
    y_all, cfg = ens._check_condition(y, cfg_scale, n)
    if strategy.kind == "prior":
        labels = ens.prior_experts(n, seed=seed, y=y_all)
    batch_size = n if batch_size is None else int(batch_size)
    base = jax.random.key(seed, impl="threefry2x32")
    noise = jax.random.normal(base, (n, *ens.image_shape), jnp.float32)
    route_base = jax.random.fold_in(base, 1) if strategy.kind == "sample" else None
    scale = 0.0 if cfg_scale is None else float(cfg_scale)
    batches = []
    for start in range(0, n, batch_size):
        stop = min(n, start + batch_size)
        batches.append(_solve_batch(ens, noise[start:stop], None if y_all is None else jnp.asarray(y_all[start:stop]),
                                    None if labels is None else labels[start:stop], route_base, start, strategy,
                                    steps, solver, cfg, scale))
    x_final = np.concatenate([b[0] for b in batches]).astype(np.float32)
    weights = np.concatenate([b[1] for b in batches], axis=1).astype(np.float32)
    expert_ids = np.argmax(weights, axis=-1).astype(np.int32) if strategy.one_hot else None
    return SampleResult(images=ens.codec.preview(x_final), x=x_final, weights=weights, expert_ids=expert_ids,
                        strategy=str(strategy), solver=solver, steps=steps, seed=seed,
                        expert_evals=int(sum(b[2] for b in batches)), padded_evals=int(sum(b[3] for b in batches)),
                        dispatch=HOST, latents=ens.codec.decode(x_final) if ens.codec.latents else None,
                        experts=expert_ids[0].copy() if strategy.fixed else None)
