"""Rectified flow / flow matching: the training objective and the ODE solvers, as pure functions.

Time convention (used everywhere in ddm):

    t = 0 is data, t = 1 is noise.
    x_t = (1 - t) * x0 + t * eps,          x0 ~ data, eps ~ N(0, I)
    v   = d x_t / dt = eps - x0            (the regression target of every velocity model)
    sampling integrates dx/dt = v(x, t) from t = 1 (pure noise) down to t = 0 (data).

Shapes: images x0, eps, x_t are [B, ...] (usually [B, H, W, C]); t is [B] float32 and is broadcast over
the trailing axes. Everything here is jit-able; `mode` strings and probabilities are static Python values.

Solvers are pure functions of `velocity(x, t) -> v` (x [B, ...] float32, t [B] float32), so the same code
drives a single network, the routed `Ensemble` or an analytic field in tests. Heun is EDM's second-order
sampler (Karras et al. 2022, Alg. 1): an Euler predictor and a trapezoidal corrector, except on the final step
(t_next == 0) where it takes the plain Euler step: a network's velocity at exactly t = 0 is the least-trained
point of its input range (t is drawn logit-normal in training), and skipping it saves one evaluation, so
`heun` costs 2 * steps - 1 velocity evaluations. The final step is short (1 / steps), so the order of the
method is unaffected in practice.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ddm.core.config import SOLVERS, T_SAMPLINGS  # the names a config accepts
from ddm.core.errors import DDMError

Velocity = Callable[[jax.Array, jax.Array], jax.Array]  # (x [B, ...], t [B]) -> v [B, ...]


def _expand(t: jax.Array, like: jax.Array) -> jax.Array:
    """t [B] -> [B, 1, ..., 1] broadcastable against `like` [B, ...]."""
    return jnp.reshape(t, t.shape + (1,) * (like.ndim - t.ndim))


# ---------------------------------------------------------------------------------------------------------
# Training objective.
# ---------------------------------------------------------------------------------------------------------


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
    raise DDMError(f"t sampling mode {mode!r} is not one of {', '.join(T_SAMPLINGS)}")


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
    float32). Conditions, condition dropout and the model's parameters are closed over by `predict`.
    """
    x_t, t, eps = noisy_batch(rng, x0, t_sampling)
    v = predict(x_t, t).astype(jnp.float32)
    return jnp.mean(jnp.square(v - target_velocity(x0.astype(jnp.float32), eps)))


def conditions_of(classes: jax.Array, num_classes: int, condition_shape: tuple[int, ...]) -> jax.Array | None:
    """What a model of `num_classes` / `condition_shape` is conditioned on, out of a batch's third element:
    class labels [B] int32 as they are, condition embeddings as float32 [B, *condition_shape] (a reader gives
    them as stored, float16 or float32), or None for a model without either (the element is ignored)."""
    if condition_shape:
        return classes.astype(jnp.float32)
    return classes if num_classes else None


def null_like(y: jax.Array, null_label: int) -> jax.Array:
    """The null condition for every row of y: `null_label` for class labels y [B] int, a row of NaN for
    condition embeddings y [B, ...] float (what the model replaces by its learned null embedding)."""
    if jnp.issubdtype(y.dtype, jnp.floating):
        return jnp.full_like(y, jnp.nan)
    return jnp.full_like(y, null_label)


def drop_conditions(rng: jax.Array, y: jax.Array, p: float, null_label: int) -> jax.Array:
    """Classifier-free guidance condition dropout: each row of y becomes the null condition (`null_like`) with
    probability p. y: class labels [B] int (-> `null_label`) or condition embeddings [B, ...] float (-> a row of
    NaN); same shape and dtype out. One uniform draw per row, so both kinds drop the same rows for one key."""
    drop = jax.random.uniform(rng, y.shape[:1]) < p
    return jnp.where(_expand(drop, y), null_like(y, null_label), y)


# ---------------------------------------------------------------------------------------------------------
# ODE solvers.
# ---------------------------------------------------------------------------------------------------------


def time_grid(steps: int) -> np.ndarray:
    """The integration times: float32 [steps + 1], uniform from 1.0 (noise) down to exactly 0.0 (data)."""
    if steps < 1:
        raise DDMError(f"sampling needs steps >= 1, got {steps}")
    return np.linspace(1.0, 0.0, steps + 1, dtype=np.float32)


def _batch_times(t: jax.Array | float, x: jax.Array) -> jax.Array:
    """A scalar or [B] time -> [B] float32."""
    return jnp.broadcast_to(jnp.asarray(t, jnp.float32), x.shape[:1])


def _is_final(t_next: jax.Array | float) -> bool:
    """Whether t_next is the (concrete) end of the solve, t = 0."""
    try:
        return bool(np.all(np.asarray(t_next) == 0.0))
    except (TypeError, jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return False


def euler_step(velocity: Velocity, x: jax.Array, t: jax.Array | float, t_next: jax.Array | float) -> jax.Array:
    """One Euler step of dx/dt = velocity(x, t) from t to t_next (< t): x [B, ...] -> x [B, ...].

    t, t_next: scalars or [B]; velocity is called with t as a [B] float32 array. One evaluation.
    """
    t, t_next = _batch_times(t, x), _batch_times(t_next, x)
    return (x + _expand(t_next - t, x) * velocity(x, t)).astype(x.dtype)


def heun_step(velocity: Velocity, x: jax.Array, t: jax.Array | float, t_next: jax.Array | float) -> jax.Array:
    """One Heun step from t to t_next (< t): x [B, ...] -> x [B, ...]. Two evaluations; one, and a plain Euler
    step, when t_next is the final time 0 (see the module docstring)."""
    final = _is_final(t_next)
    t, t_next = _batch_times(t, x), _batch_times(t_next, x)
    dt = _expand(t_next - t, x)
    v = velocity(x, t)
    x_pred = x + dt * v
    if final:
        return x_pred.astype(x.dtype)
    v_next = velocity(x_pred, t_next)
    return (x + dt * 0.5 * (v + v_next)).astype(x.dtype)


def step_function(solver: str) -> Callable[[Velocity, jax.Array, float, float], jax.Array]:
    """The step function named by `solver` ("euler" or "heun")."""
    if solver == "euler":
        return euler_step
    if solver == "heun":
        return heun_step
    raise DDMError(f"unknown solver {solver!r}; expected one of {', '.join(SOLVERS)}")


def evaluations(solver: str, steps: int) -> int:
    """Velocity evaluations a full solve costs: `steps` for Euler, 2 * steps - 1 for Heun."""
    step_function(solver)  # validates the name
    return steps if solver == "euler" else 2 * steps - 1


def evaluation_stages(solver: str, steps: int) -> np.ndarray:
    """The stage of each velocity evaluation of a solve, in order: int32 [evaluations(solver, steps)], 0 for a
    step's first evaluation, 1 for Heun's corrector."""
    if evaluations(solver, steps) == steps:
        return np.zeros(steps, np.int32)
    return np.asarray([0, 1] * (steps - 1) + [0], np.int32)


AuxVelocity = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, Any]]


def integrate(velocity: AuxVelocity, x1: jax.Array, steps: int, solver: str = "euler") -> tuple[jax.Array, Any]:
    """The ODE solve from x1 at t=1 to x0 at t=0 as one traced program (the one solver of ddm: sampling, the
    training grids, distillation), for use inside `jax.jit`: a `lax.scan` over the velocity evaluations.

    velocity(x [B, ...] f32, t [B] f32, evaluation int32 scalar) -> (v [B, ...], aux pytree), where evaluation
    = 2 * step + stage (stage 1: Heun's corrector) identifies the call (e.g. to derive its random key).
    Returns (x0 [B, ...] float32, aux stacked over the evaluations in order: leading axis
    `evaluations(solver, steps)`; `evaluation_stages` says which are each step's first).

    The scan runs one evaluation per iteration, so `velocity` is traced once (not once per stage: a routed
    velocity is a large program). Its arithmetic is `euler_step` / `heun_step`'s: the first evaluation of a
    step predicts x + dt v; the corrector, where there is one, gives x + dt 0.5 (v + v_next), so `integrate`
    and a Python loop of those steps agree to float rounding (the tests' reference).
    """
    ts = time_grid(steps)
    stages = evaluation_stages(solver, steps)
    step_of = np.cumsum(stages == 0) - 1  # the step of each evaluation
    corrected = np.asarray([solver == "heun" and i < steps - 1 for i in step_of])  # the step has a corrector
    schedule = (
        jnp.asarray(stages),
        jnp.asarray(np.where(stages == 0, ts[step_of], ts[step_of + 1])),  # t of the evaluation
        jnp.asarray(ts[step_of + 1] - ts[step_of]),  # the step's dt (float32, as in heun_step)
        jnp.asarray(corrected),
        jnp.asarray(2 * step_of + stages, jnp.int32),
    )
    x1 = jnp.asarray(x1, jnp.float32)

    def body(carry, item):
        x, x_pred, v_first = carry
        stage, t, dt, has_corrector, evaluation = item
        first = stage == 0
        v, aux = velocity(jnp.where(first, x, x_pred), _batch_times(t, x), evaluation)
        dt = _expand(_batch_times(dt, x), x)
        predicted = x + dt * v
        corrected_x = x + dt * 0.5 * (v_first + v)
        x_next = jnp.where(first, jnp.where(has_corrector, x, predicted), corrected_x).astype(x.dtype)
        return (x_next, jnp.where(first, predicted, x_pred), jnp.where(first, v, v_first)), aux

    zeros = jnp.zeros_like(x1)
    (x, _, _), aux = jax.lax.scan(body, (x1, zeros, zeros), schedule)
    return x, aux

