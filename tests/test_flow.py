"""Flow-matching math: the t=0 data / t=1 noise convention, losses, label dropout, ODE steps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from oracles.host_dispatch import solve

from ddm.core import flow
from ddm.core.errors import DDMError
from ddm.core.flow import (
    drop_conditions,
    euler_step,
    flow_matching_loss,
    heun_step,
    interpolate,
    noisy_batch,
    sample_t,
    target_velocity,
    time_grid,
)


def _pair(shape=(4, 6, 6, 2), seed=0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.standard_normal(shape, np.float32)), jnp.asarray(rng.standard_normal(shape, np.float32))


def test_interpolate_endpoints_and_midpoint():
    x0, eps = _pair()
    np.testing.assert_array_equal(np.asarray(interpolate(x0, eps, jnp.zeros(4))), np.asarray(x0))
    np.testing.assert_array_equal(np.asarray(interpolate(x0, eps, jnp.ones(4))), np.asarray(eps))
    t = jnp.array([0.0, 0.25, 0.5, 1.0])
    xt = interpolate(x0, eps, t)
    np.testing.assert_allclose(np.asarray(xt[2]), np.asarray(0.5 * (x0[2] + eps[2])), atol=1e-6)
    np.testing.assert_allclose(np.asarray(xt[1]), np.asarray(0.75 * x0[1] + 0.25 * eps[1]), atol=1e-6)


def test_target_velocity_is_time_derivative():
    x0, eps = _pair()
    t = jnp.array([0.1, 0.4, 0.7, 0.95])
    _, dxdt = jax.jvp(lambda s: interpolate(x0, eps, s), (t,), (jnp.ones(4),))
    np.testing.assert_allclose(np.asarray(dxdt), np.asarray(target_velocity(x0, eps)), atol=1e-6)
    np.testing.assert_allclose(np.asarray(target_velocity(x0, eps)), np.asarray(eps - x0))


def test_euler_with_exact_velocity_recovers_data():
    x0, eps = _pair()
    # The exact flow towards the single point x0: v(x, t) = (x - x0) / t; x_t - x0 shrinks by t_next / t per
    # Euler step, so any grid ending at 0 lands exactly on x0.
    velocity = lambda x, t: (x - x0) / t[:, None, None, None]
    x = eps
    grid = [1.0, 0.9, 0.6, 0.35, 0.1, 0.0]
    for t, t_next in zip(grid[:-1], grid[1:]):
        x = euler_step(velocity, x, t, t_next)
    np.testing.assert_allclose(np.asarray(x), np.asarray(x0), atol=1e-5)
    # constant (straight-path) velocity: both solvers are exact from t=1 to t=0 with any steps
    const = lambda x, t: eps - x0
    for step in (euler_step, heun_step):
        x = eps
        ts = time_grid(7)
        for i in range(7):
            x = step(const, x, ts[i], ts[i + 1])
        np.testing.assert_allclose(np.asarray(x), np.asarray(x0), atol=1e-5)


def test_steps_pass_batched_times_and_heun_is_second_order():
    seen = []

    def velocity(x, t):
        seen.append(t.shape)
        return x  # dx/dt = x: x(0) = x(1) / e

    x1 = jnp.ones((3, 2))
    errors = {}
    for name, step in (("euler", euler_step), ("heun", heun_step)):
        errs = []
        for n in (8, 16):
            x, ts = x1, time_grid(n)
            for i in range(n):
                x = step(velocity, x, ts[i], ts[i + 1])
            errs.append(abs(float(x[0, 0]) - np.exp(-1.0)))
        errors[name] = errs[0] / errs[1]
    assert set(seen) == {(3,)}
    assert 1.7 < errors["euler"] < 2.3 and 3.5 < errors["heun"] < 4.5


def test_sample_t_modes():
    u = sample_t(jax.random.key(0), 20_000, "uniform")
    ln = sample_t(jax.random.key(1), 20_000, "logit_normal")
    assert u.shape == ln.shape == (20_000,) and u.dtype == ln.dtype == jnp.float32
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0 and abs(float(u.mean()) - 0.5) < 0.01
    assert float(ln.min()) > 0.0 and float(ln.max()) < 1.0 and abs(float(ln.mean()) - 0.5) < 0.01
    assert float(jnp.mean(jnp.abs(ln - 0.5) < 0.25)) > float(jnp.mean(jnp.abs(u - 0.5) < 0.25)) + 0.1
    with pytest.raises(DDMError, match="not one of"):
        sample_t(jax.random.key(0), 4, "cosine")


def test_loss_zero_for_perfect_predictor_and_positive_otherwise():
    x0, _ = _pair(seed=3)
    perfect = lambda x_t, t: (x_t - x0) / t[:, None, None, None]  # eps - x0, recovered from x_t
    loss = jax.jit(lambda rng: flow_matching_loss(perfect, x0, rng, "logit_normal"))(jax.random.key(0))
    assert loss.shape == () and loss.dtype == jnp.float32 and float(loss) < 1e-8
    zero = flow_matching_loss(lambda x_t, t: jnp.zeros_like(x_t), x0, jax.random.key(0), "uniform")
    assert float(zero) == pytest.approx(1.0 + float(jnp.mean(x0**2)), rel=0.1)
    x_t, t, eps = noisy_batch(jax.random.key(5), x0, "uniform")
    np.testing.assert_allclose(np.asarray(x_t), np.asarray(interpolate(x0, eps, t)), atol=1e-6)


def test_drop_labels_rate():
    y = jnp.arange(100_000, dtype=jnp.int32) % 10
    dropped = drop_conditions(jax.random.key(0), y, 0.1, 10)
    mask = dropped == 10
    assert dropped.dtype == jnp.int32
    assert abs(float(mask.mean()) - 0.1) < 0.005
    np.testing.assert_array_equal(np.asarray(dropped[~mask]), np.asarray(y[~mask]))
    np.testing.assert_array_equal(np.asarray(drop_conditions(jax.random.key(0), y, 0.0, 10)), np.asarray(y))
    assert bool(jnp.all(drop_conditions(jax.random.key(1), y, 1.0, 10) == 10))


def test_time_grid():
    ts = time_grid(4)
    np.testing.assert_allclose(np.asarray(ts), [1.0, 0.75, 0.5, 0.25, 0.0])
    with pytest.raises(DDMError):
        time_grid(0)


@pytest.mark.parametrize("solver,steps", [("euler", 1), ("euler", 5), ("heun", 1), ("heun", 2), ("heun", 6)])
def test_integrate_is_solve_in_one_program(solver, steps):
    """`integrate` (a scan over evaluations, traced once) takes the same steps as `solve`, and tells each
    evaluation apart (2 * step + stage); a wrong schedule (e.g. a corrector on Heun's last step) would move x."""
    x1 = jax.random.normal(jax.random.key(0), (5, 3))

    def field(x, t):
        return jnp.sin(3.0 * x) * t[:, None] + 0.5 * x

    traces = []

    def velocity(x, t, evaluation):
        traces.append(1)
        return field(x, t), (evaluation, t[0])

    x0, (ids, ts) = jax.jit(lambda x: flow.integrate(velocity, x, steps, solver))(x1)
    np.testing.assert_allclose(np.asarray(x0), np.asarray(solve(field, x1, steps, solver)), rtol=1e-6,
                               atol=1e-6)
    stages = flow.evaluation_stages(solver, steps)
    assert len(traces) == 1 and len(stages) == flow.evaluations(solver, steps)
    step_of = np.cumsum(stages == 0) - 1
    np.testing.assert_array_equal(np.asarray(ids), 2 * step_of + stages)
    grid = flow.time_grid(steps)
    np.testing.assert_array_equal(np.asarray(ts), np.where(stages == 0, grid[step_of], grid[step_of + 1]))
