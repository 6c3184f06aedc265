"""Rectified flow / flow matching: pure functions shared by the trainer, the router and the samplers.

Time convention (used everywhere in ddm):

    t = 0 is data, t = 1 is noise.
    x_t = (1 - t) * x0 + t * eps,          x0 ~ data, eps ~ N(0, I)
    v   = d x_t / dt = eps - x0            (the regression target of every velocity model)
    sampling integrates dx/dt = v(x, t) from t = 1 (pure noise) down to t = 0 (data).

Shapes: images x0, eps, x_t are [B, ...] (usually [B, H, W, C]); t is [B] float32 and is broadcast over
the trailing axes. Everything here is jit-able; `mode` strings and probabilities are static Python values.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from ddm.errors import DDMError

T_MODES = ("uniform", "logit_normal")

Velocity = Callable[[jax.Array, jax.Array], jax.Array]  # (x [B, ...], t [B]) -> v [B, ...]


def _expand(t: jax.Array, like: jax.Array) -> jax.Array:
    """t [B] -> [B, 1, ..., 1] broadcastable against `like` [B, ...]."""
    return jnp.reshape(t, t.shape + (1,) * (like.ndim - t.ndim))


def interpolate(x0: jax.Array, eps: jax.Array, t: jax.Array) -> jax.Array:
    """x_t = (1 - t) x0 + t eps; x0, eps [B, ...], t [B] -> [B, ...] (dtype of the promoted inputs)."""
    t = _expand(t, x0)
    return (1.0 - t) * x0 + t * eps


def target_velocity(x0: jax.Array, eps: jax.Array) -> jax.Array:
    """v = eps - x0 [B, ...], the time derivative of `interpolate` (constant along each straight path)."""
    return eps - x0


def sample_t(rng: jax.Array, batch: int, mode: str) -> jax.Array:
    """Training times [batch] float32: "uniform" on [0, 1) or "logit_normal" = sigmoid(N(0, 1)) in (0, 1)."""
    if mode == "uniform":
        return jax.random.uniform(rng, (batch,), jnp.float32)
    if mode == "logit_normal":
        return jax.nn.sigmoid(jax.random.normal(rng, (batch,), jnp.float32))
    raise DDMError(f"t sampling mode {mode!r} is not one of {', '.join(T_MODES)}")


def noisy_batch(rng: jax.Array, x0: jax.Array, t_sampling: str) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Draws t and eps for a clean batch: x0 [B, ...] -> (x_t [B, ...] float32, t [B] float32, eps [B, ...]).

    The router trains on these (x_t, t) pairs labelled with the cluster of x0.
    """
    t_rng, eps_rng = jax.random.split(rng)
    x0 = x0.astype(jnp.float32)
    t = sample_t(t_rng, x0.shape[0], t_sampling)
    eps = jax.random.normal(eps_rng, x0.shape, jnp.float32)
    return interpolate(x0, eps, t), t, eps


def flow_matching_loss(predict: Velocity, x0: jax.Array, rng: jax.Array, t_sampling: str) -> jax.Array:
    """Mean squared error between predict(x_t, t) and eps - x0, a float32 scalar.

    `predict(x_t [B, ...] float32, t [B] float32) -> v [B, ...]` (any float dtype; the error is taken in
    float32). Labels, label dropout and the model's parameters are closed over by `predict`.
    """
    x_t, t, eps = noisy_batch(rng, x0, t_sampling)
    v = predict(x_t, t).astype(jnp.float32)
    return jnp.mean(jnp.square(v - target_velocity(x0.astype(jnp.float32), eps)))


def drop_labels(rng: jax.Array, y: jax.Array, p: float, null_label: int) -> jax.Array:
    """Classifier-free guidance label dropout: each entry of y [B] int becomes `null_label` with prob. p."""
    drop = jax.random.uniform(rng, y.shape) < p
    return jnp.where(drop, jnp.asarray(null_label, y.dtype), y)


def _batch_times(t: jax.Array | float, x: jax.Array) -> jax.Array:
    """A scalar or [B] time -> [B] float32."""
    return jnp.broadcast_to(jnp.asarray(t, jnp.float32), x.shape[:1])


def euler_step(velocity: Velocity, x: jax.Array, t: jax.Array | float, t_next: jax.Array | float) -> jax.Array:
    """One Euler step of dx/dt = velocity(x, t) from t to t_next (t_next < t when sampling).

    x [B, ...]; t, t_next scalars or [B]; velocity is called with t as a [B] float32 array. Returns x at
    t_next, [B, ...] in x's dtype.
    """
    t, t_next = _batch_times(t, x), _batch_times(t_next, x)
    v = velocity(x, t)
    return (x + _expand(t_next - t, x) * v).astype(x.dtype)


def heun_step(velocity: Velocity, x: jax.Array, t: jax.Array | float, t_next: jax.Array | float) -> jax.Array:
    """One Heun (explicit trapezoid, 2nd order) step: Euler predictor, then the average of the velocities at
    both ends. Same shapes as `euler_step`; two velocity evaluations.
    """
    t, t_next = _batch_times(t, x), _batch_times(t_next, x)
    dt = _expand(t_next - t, x)
    v = velocity(x, t)
    v_next = velocity(x + dt * v, t_next)
    return (x + dt * 0.5 * (v + v_next)).astype(x.dtype)


def time_grid(steps: int) -> jax.Array:
    """Uniform sampling times [steps + 1] float32 from 1 (noise) to 0 (data)."""
    if steps < 1:
        raise DDMError(f"number of sampling steps {steps} must be >= 1")
    return jnp.linspace(1.0, 0.0, steps + 1, dtype=jnp.float32)
