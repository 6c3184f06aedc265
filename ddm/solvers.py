"""Tiny ODE solvers for the flow-matching sampler.

Convention (shared with `ddm.flow`): t=0 is data, t=1 is noise, x_t = (1-t) x0 + t eps, and the velocity is
v = eps - x0. Sampling integrates dx/dt = v *backwards*, from t=1 (pure noise) down to t=0 (data), on a
uniform grid. With t_next < t, an Euler step is x <- x + (t_next - t) * v(x, t).

The solvers are pure functions of `velocity(x, t) -> v` with x [B, ...] float32 and t [B] float32, so the same
code drives a single network, the routed `Ensemble` (whose velocity is host-side Python that dispatches to
jitted experts) or an analytic field in tests.

Heun (EDM's second-order sampler, Karras et al. 2022, Alg. 1): an Euler predictor followed by a trapezoidal
corrector. On the final step (t_next == 0) it takes the plain Euler step instead: a network's velocity at
exactly t=0 is the least-trained point of its input range (t is drawn logit-normal in training), and skipping
it saves one evaluation, so `heun` costs 2*steps - 1 velocity evaluations. The final step is short (1/steps), so
the order of the method is unaffected in practice.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ddm.errors import DDMError

SOLVERS = ("euler", "heun")

Velocity = Callable[[jax.Array, jax.Array], jax.Array]


def time_grid(steps: int) -> np.ndarray:
    """The integration times: float32 [steps + 1], uniform from 1.0 (noise) down to exactly 0.0 (data)."""
    if steps < 1:
        raise DDMError(f"sampling needs steps >= 1, got {steps}")
    return np.linspace(1.0, 0.0, steps + 1, dtype=np.float32)


def _times(x: jax.Array, t: float) -> jax.Array:
    """A scalar time as the per-sample vector [B] float32 the velocity functions take."""
    return jnp.full((x.shape[0],), t, dtype=jnp.float32)


def euler_step(velocity: Velocity, x: jax.Array, t: float, t_next: float) -> jax.Array:
    """One Euler step from t to t_next (< t): x [B, ...] float32 -> x [B, ...] float32. One evaluation."""
    dt = np.float32(t_next) - np.float32(t)
    return x + dt * velocity(x, _times(x, t))


def heun_step(velocity: Velocity, x: jax.Array, t: float, t_next: float) -> jax.Array:
    """One Heun step from t to t_next (< t): x [B, ...] -> x [B, ...]. Two evaluations, one when t_next == 0."""
    dt = np.float32(t_next) - np.float32(t)
    v = velocity(x, _times(x, t))
    x_pred = x + dt * v
    if t_next == 0.0:
        return x_pred  # final step: plain Euler (see the module docstring)
    v_next = velocity(x_pred, _times(x, t_next))
    return x + (0.5 * dt) * (v + v_next)


def step_function(solver: str) -> Callable[[Velocity, jax.Array, float, float], jax.Array]:
    """The step function named by `solver` ("euler" or "heun")."""
    if solver == "euler":
        return euler_step
    if solver == "heun":
        return heun_step
    raise DDMError(f"unknown solver {solver!r}; expected one of {', '.join(SOLVERS)}")


def evaluations(solver: str, steps: int) -> int:
    """Velocity evaluations a full solve costs: `steps` for Euler, 2*steps - 1 for Heun."""
    step_function(solver)  # validates the name
    return steps if solver == "euler" else 2 * steps - 1


def solve(velocity: Velocity, x1: jax.Array, steps: int, solver: str = "euler") -> jax.Array:
    """Integrates from noise x1 [B, ...] float32 at t=1 to the sample x0 [B, ...] float32 at t=0."""
    step = step_function(solver)
    ts = time_grid(steps)
    x = jnp.asarray(x1, jnp.float32)
    for i in range(steps):
        x = step(velocity, x, float(ts[i]), float(ts[i + 1]))
    return x
