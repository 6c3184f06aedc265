"""The ensemble is exact: with analytic experts and router for a Gaussian mixture, no training involved.

Data: a mixture of J=6 isotropic Gaussians in D=4 (seen as [2, 2, 1] images), weights pi_j, means mu_j,
shared std s, grouped into K=3 clusters {0, 1}, {2, 3, 4}, {5}. Under x_t = (1-t) x0 + t eps:
    x_t | j ~ N((1-t) mu_j, sigma_t^2 I),  sigma_t^2 = (1-t)^2 s^2 + t^2
    E[eps | x_t, j] = t r_j / sigma_t^2,  E[x0 | x_t, j] = mu_j + (1-t) s^2 r_j / sigma_t^2,  r_j = x_t - (1-t) mu_j
    u_j = E[eps | x_t, j] - E[x0 | x_t, j]
An expert's velocity is v_k = sum_{j in k} p(j | x_t, k) u_j, the router's logits are log p(k | x_t), and
sum_k p(k | x_t) v_k must equal the whole mixture's velocity sum_j p(j | x_t) u_j.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from oracles.traces import TraceCounter
from PIL import Image

from ddm.core import flow as solvers
from ddm.core.errors import DDMError
from ddm.core.images import make_grid, save_grid_png, to_uint8
from ddm.sampling.ensemble import Ensemble, SampleResult
from ddm.sampling.routing import Strategy, parse_strategy

SHAPE = (2, 2, 1)
D = 4
S = 0.1
PI = np.array([0.3, 0.1, 0.2, 0.15, 0.15, 0.1])
MU = 0.6 * np.array(
    [[1, 0, 0, 0], [-1, 0, 0, 0], [0, 1, 0, 0], [0, -1, 0, 0], [0, 0, 1, 0.5], [0, 0, -1, -0.5]], np.float64
)
CLUSTERS = [[0, 1], [2, 3, 4], [5]]
K = len(CLUSTERS)
CLUSTER_OF = np.array([k for j in range(len(PI)) for k, members in enumerate(CLUSTERS) if j in members])


# --------------------------------------------------------------------------------------------------------
# Analytic experts and router (float32, jit-able; params are arrays so one compiled function serves all).
# --------------------------------------------------------------------------------------------------------


def _component_terms(x, t, means):
    """x [b, D], t [b], means [J, D] -> (log N_j(x) up to a j-independent constant [b, J], u_j [b, J, D])."""
    a = (1.0 - t)[:, None, None]
    var = ((1.0 - t) ** 2 * S**2 + t**2)[:, None, None]
    r = x[:, None, :] - a * means[None]
    logn = -0.5 * (r**2).sum(-1) / var[..., 0]
    u = t[:, None, None] * r / var - (means[None] + a * S**2 * r / var)
    return logn, u


def expert_apply(params, x, t, y):
    """Cluster velocity: params {"means": [3, D], "logw": [3]} (within-cluster log weights, -inf = padding)."""
    del y
    flat = x.reshape(x.shape[0], D)
    logn, u = _component_terms(flat, t, params["means"])
    post = jax.nn.softmax(params["logw"][None] + logn, axis=-1)
    return (post[..., None] * u).sum(1).reshape(x.shape)


def router_apply(params, x, t, y):
    """Logits [b, K] = log p(k | x_t) (exactly, in log space)."""
    del y
    logn, _ = _component_terms(x.reshape(x.shape[0], D), t, params["means"])
    lp = params["logpi"][None] + logn  # [b, J]
    member = params["member"]  # [J, K] bool
    per_cluster = jnp.where(member[None], lp[:, :, None], -jnp.inf)  # [b, J, K]
    joint = jax.scipy.special.logsumexp(per_cluster, axis=1)
    return joint - jax.scipy.special.logsumexp(lp, axis=1, keepdims=True)


def expert_params(k):
    members = CLUSTERS[k]
    means = np.zeros((3, D), np.float32)
    logw = np.full(3, -np.inf, np.float32)
    means[: len(members)] = MU[members]
    w = PI[members] / PI[members].sum()
    logw[: len(members)] = np.log(w)
    return {"means": jnp.asarray(means), "logw": jnp.asarray(logw)}


ROUTER_PARAMS = {
    "means": jnp.asarray(MU, jnp.float32),
    "logpi": jnp.asarray(np.log(PI), jnp.float32),
    "member": jnp.asarray(np.eye(K, dtype=bool)[CLUSTER_OF]),
}


def make_ensemble(available=None, router=True, **kwargs):
    params = [expert_params(k) if available is None or available[k] else None for k in range(K)]
    return Ensemble(
        expert_apply,
        params,
        router_apply if router else None,
        ROUTER_PARAMS if router else None,
        image_shape=SHAPE,
        available=available,
        **kwargs,
    )


def mixture_velocity(x, t):
    """Whole-mixture velocity in float64 numpy: x [b, D], t [b] -> [b, D]."""
    x = np.asarray(x, np.float64)
    t = np.asarray(t, np.float64)[:, None, None]
    var = (1 - t) ** 2 * S**2 + t**2
    r = x[:, None, :] - (1 - t) * MU[None]
    lp = np.log(PI)[None] - 0.5 * (r**2).sum(-1) / var[..., 0]
    post = np.exp(lp - lp.max(-1, keepdims=True))
    post /= post.sum(-1, keepdims=True)
    u = t * r / var - (MU[None] + (1 - t) * S**2 * r / var)
    return (post[..., None] * u).sum(1)


def noisy_points(n, seed, t_low=0.02, t_high=0.98):
    """(x_t [n, 2, 2, 1] f32, t [n] f32, component [n]) drawn from the true noisy marginal."""
    rng = np.random.default_rng(seed)
    comp = rng.choice(len(PI), size=n, p=PI)
    x0 = MU[comp] + S * rng.normal(size=(n, D))
    t = rng.uniform(t_low, t_high, size=n)
    xt = (1 - t)[:, None] * x0 + t[:, None] * rng.normal(size=(n, D))
    return xt.astype(np.float32).reshape(n, *SHAPE), t.astype(np.float32), comp


@jax.jit
def _all_expert_velocities(params, x, t):
    return jnp.stack([expert_apply(p, x, t, None) for p in params])


def all_expert_velocities(x, t):
    """Every expert on every sample, no routing: [K, b, 2, 2, 1]."""
    return _all_expert_velocities([expert_params(k) for k in range(K)], jnp.asarray(x), jnp.asarray(t))


@jax.jit
def router_posterior(x, t):
    """p(k | x_t) [b, K] from the analytic router."""
    return jax.nn.softmax(router_apply(ROUTER_PARAMS, x, t, None))


@pytest.fixture
def ensemble():
    return make_ensemble()


# --------------------------------------------------------------------------------------------------------
# Exactness of the velocity.
# --------------------------------------------------------------------------------------------------------


def test_full_velocity_equals_mixture_velocity(ensemble):
    x, t, _ = noisy_points(4096, seed=1)
    v, w = ensemble.velocity(x, t, "full")
    ref = mixture_velocity(x.reshape(-1, D), t)
    err = np.abs(np.asarray(v).reshape(-1, D) - ref).max() / np.abs(ref).max()
    assert err < 1e-5, err
    np.testing.assert_allclose(np.asarray(w).sum(-1), 1.0, atol=1e-6)
    # Far-off-manifold points too (large log-densities): still float32-accurate, relative to the scale.
    rng = np.random.default_rng(2)
    x2 = rng.uniform(-1.5, 1.5, size=(1024, *SHAPE)).astype(np.float32)
    t2 = rng.uniform(0.02, 0.98, size=1024).astype(np.float32)
    v2, _ = ensemble.velocity(x2, t2, "full")
    ref2 = mixture_velocity(x2.reshape(-1, D), t2)
    err2 = np.abs(np.asarray(v2).reshape(-1, D) - ref2).max() / np.abs(ref2).max()
    assert err2 < 1e-5, err2


def test_single_expert_is_not_the_mixture(ensemble):
    """Control: the test above can fail; no single expert reproduces the mixture velocity."""
    x, t, _ = noisy_points(256, seed=3)
    ref = mixture_velocity(x.reshape(-1, D), t)
    for k in range(K):
        v, _ = ensemble.velocity(x, t, f"single:{k}")
        assert np.abs(np.asarray(v).reshape(-1, D) - ref).max() > 0.1


@pytest.mark.parametrize("text", ["top1", "top2", "threshold:0.1", "sample", "full", "top1+full:0.5"])
def test_dispatch_equals_all_experts_then_mask(ensemble, text):
    """Grouping samples per expert (gather, padded bucket, scatter-add) is exact."""
    x, t, _ = noisy_points(256, seed=4, t_low=0.3, t_high=0.8)
    v, w = ensemble.velocity(x, t, text, rng=jax.random.key(5))
    v_all = all_expert_velocities(x, t)
    ref = jnp.einsum("bk,kbhwc->bhwc", w, v_all)
    np.testing.assert_allclose(np.asarray(v), np.asarray(ref), rtol=1e-6, atol=1e-6)


def test_top1_routes_each_sample_to_its_posterior_argmax(ensemble):
    x, t, _ = noisy_points(256, seed=6, t_low=0.2, t_high=0.9)
    _, w = ensemble.velocity(x, t, "top1")
    w = np.asarray(w)
    posterior = np.asarray(router_posterior(x, t))
    np.testing.assert_array_equal(np.argmax(w, -1), np.argmax(posterior, -1))
    assert ((w == 0) | (w == 1)).all()
    counts = np.bincount(np.argmax(w, -1), minlength=K)
    assert (counts > 0).all(), counts  # per-sample decisions differ within one batch


# --------------------------------------------------------------------------------------------------------
# Sampling reproduces the mixture.
# --------------------------------------------------------------------------------------------------------


def _mixture_stats(x):
    """Nearest-mean assignment of samples [n, D]: (weights [J], means [J, D], stds [J])."""
    comp = np.argmin(((x[:, None, :] - MU[None]) ** 2).sum(-1), axis=1)
    weights = np.bincount(comp, minlength=len(PI)) / len(x)
    means = np.stack([x[comp == j].mean(0) for j in range(len(PI))])
    stds = np.array([(x[comp == j] - MU[j]).std() for j in range(len(PI))])
    return weights, means, stds


def test_full_ode_sampling_reproduces_the_mixture(ensemble):
    n = 10_000
    result = ensemble.sample(n, "full", steps=100, solver="heun", seed=0)
    x = result.x.reshape(n, D)
    weights, means, stds = _mixture_stats(x)
    # Standard error of a weight <= sqrt(0.3 * 0.7 / n) = 0.0046; 0.02 is > 4 sigma.
    np.testing.assert_allclose(weights, PI, atol=0.02)
    # Per-component means: standard error s / sqrt(n pi_j) <= 0.0032 per coordinate.
    np.testing.assert_allclose(means, MU, atol=0.015)
    np.testing.assert_allclose(stds, S, rtol=0.1)
    assert result.weights.shape == (100, n, K) and result.expert_ids is None
    assert result.expert_evals == n * K * solvers.evaluations("heun", 100)


def test_a_wrong_router_fails_the_mixture_check():
    """Control: the statistical check has power. Uniform routing (ignoring the posterior) is far off."""

    def uniform_router(params, x, t, y):
        return jnp.zeros((x.shape[0], K))

    bad = Ensemble(expert_apply, [expert_params(k) for k in range(K)], uniform_router, None, image_shape=SHAPE)
    x = bad.sample(2000, "full", steps=30, solver="heun", seed=0).x.reshape(-1, D)
    weights, _, _ = _mixture_stats(x)
    assert np.abs(weights - PI).max() > 0.05, weights


def test_top1_sampling_lands_on_components_but_is_biased(ensemble):
    """Top-1 is an approximation, not the marginal flow. Its samples still land on mixture components, but
    here it over-weights the cluster the prior favours near t=1 (everyone starts in cluster 1, pi=0.5, and
    follows that expert until the posterior flips), so the weights are off: exactness needs `full`."""
    n = 4000
    result = ensemble.sample(n, "top1", steps=40, solver="euler", seed=1, batch_size=1000)
    x = result.x.reshape(n, D)
    nearest = np.sqrt(((x[:, None, :] - MU[None]) ** 2).sum(-1)).min(1)
    assert np.percentile(nearest, 99) < 4 * S * np.sqrt(D) / 2 * 1.1  # chi_4 99th percentile is 3.64 s
    weights, _, _ = _mixture_stats(x)
    cluster_weights = np.bincount(CLUSTER_OF, weights=weights, minlength=K)
    assert cluster_weights[1] > 0.5 + 0.1, cluster_weights
    # One expert per sample per step, not K.
    assert result.expert_evals == n * 40
    assert result.padded_evals < 2 * result.expert_evals
    assert result.expert_ids.shape == (40, n)
    np.testing.assert_array_equal(result.expert_ids, np.argmax(result.weights, -1))


def test_full_start_shrinks_top1_bias_at_the_cost_it_predicts(ensemble):
    """`top1+full:T` mixes with the full posterior while t > T. The lower T, the closer the samples' component
    weights get to the mixture's (the bias of top1 above comes from committing near t = 1), and every step
    with t > T costs K expert calls per sample instead of one."""
    n, steps = 4000, 40
    errors = {}
    for text in ("top1", "top1+full:0.5", "top1+full:0.3", "full"):
        result = ensemble.sample(n, text, steps=steps, solver="euler", seed=1, batch_size=1000)
        weights, _, _ = _mixture_stats(result.x.reshape(n, D))
        errors[text] = np.abs(weights - PI).max()
        full_above = {"top1": 1.0, "full": -1.0}.get(text, parse_strategy(text).full_above)
        full_steps = int((solvers.time_grid(steps)[:-1] > full_above).sum())
        assert result.expert_evals == n * (K * full_steps + (steps - full_steps)), text
    assert errors["top1"] > errors["top1+full:0.5"] > errors["top1+full:0.3"] > errors["full"], errors
    assert errors["top1"] > 0.08 and errors["top1+full:0.3"] < 0.04, errors


# --------------------------------------------------------------------------------------------------------
# Dispatch cost, recompiles.
# --------------------------------------------------------------------------------------------------------


def test_top1_runs_one_expert_per_sample_and_bounded_compiles(ensemble):
    n, steps = 64, 12
    full = ensemble.sample(n, "full", steps=steps, seed=0)
    assert full.expert_evals == full.padded_evals == n * K * steps
    counter = TraceCounter(expert_apply)  # counts this test's own programs
    counted = ensemble.replace(expert_apply=counter, dispatch="unrolled")
    top1 = counted.sample(n, "top1", steps=steps, seed=0)
    assert top1.expert_evals == n * steps
    # One trace per expert (its own code in the unrolled dispatch), each of the 8-row chunk (the bucket floor of
    # a batch of 64 with min_bucket 8): the expert function is not traced per bucket size or per step.
    assert counter.traces == K and set(counter.shapes) == {(8, *SHAPE)}, counter.shapes
    counted.sample(n, "top1", steps=steps, seed=5)
    assert counter.traces == K  # the same program: no new trace


# --------------------------------------------------------------------------------------------------------
# Missing experts.
# --------------------------------------------------------------------------------------------------------


def test_missing_expert_is_masked_renormalised_and_warned():
    with pytest.warns(UserWarning, match=r"experts \[1\] of 3 are missing"):
        ens = make_ensemble(available=[True, False, True])
    x, t, _ = noisy_points(256, seed=7, t_low=0.2, t_high=0.9)
    v, w = ens.velocity(x, t, "full")
    w = np.asarray(w)
    assert (w[:, 1] == 0).all()
    posterior = np.asarray(router_posterior(x, t))
    p = posterior[:, [0, 2]] / posterior[:, [0, 2]].sum(-1, keepdims=True)
    np.testing.assert_allclose(w[:, [0, 2]], p, rtol=1e-4, atol=1e-6)
    v_all = np.asarray(all_expert_velocities(x, t))
    ref = p[:, 0, None, None, None] * v_all[0] + p[:, 1, None, None, None] * v_all[2]
    np.testing.assert_allclose(np.asarray(v), ref, rtol=1e-5, atol=1e-5)
    _, w1 = ens.velocity(x, t, "top1")
    assert (np.asarray(w1)[:, 1] == 0).all()
    result = ens.sample(256, "top1", steps=5, seed=0)
    assert set(np.unique(result.expert_ids)) <= {0, 2}
    with pytest.raises(DDMError, match="missing"):
        ens.sample(4, "single:1", steps=2)
    with pytest.raises(DDMError, match="missing"):
        ens.sample(4, "oracle", steps=2, labels=[0, 1, 2, 0])


def test_any_nonempty_subset_works_and_none_refuses():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ens = make_ensemble(available=[False, False, True])
        result = ens.sample(64, "top2", steps=3, seed=0)
    assert (result.weights[..., 2] == 1).all()
    with pytest.raises(DDMError, match="all 3 experts are missing"):
        make_ensemble(available=[False, False, False])
    with pytest.raises(DDMError, match="no parameters"):
        Ensemble(expert_apply, [expert_params(0), None], router_apply, ROUTER_PARAMS, image_shape=SHAPE,
                 available=[True, True])


# --------------------------------------------------------------------------------------------------------
# Determinism, oracle/single, CFG, request errors.
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["sample", "top1"])
def test_sampling_is_deterministic_per_seed(ensemble, text):
    a = ensemble.sample(128, text, steps=8, solver="heun", seed=3)
    b = ensemble.sample(128, text, steps=8, solver="heun", seed=3)
    c = ensemble.sample(128, text, steps=8, solver="heun", seed=4)
    assert a.images.tobytes() == b.images.tobytes() and a.x.tobytes() == b.x.tobytes()
    np.testing.assert_array_equal(a.weights, b.weights)
    assert (a.x != c.x).any()
    # Batching changes neither the noise nor the routing draws.
    d = ensemble.sample(128, text, steps=8, solver="heun", seed=3, batch_size=64)
    np.testing.assert_allclose(d.x, a.x, atol=1e-5)
    np.testing.assert_array_equal(d.expert_ids, a.expert_ids)


def test_sample_strategy_draws_vary_per_step_and_sample(ensemble):
    result = ensemble.sample(256, "sample", steps=6, seed=0)
    ids = result.expert_ids
    assert len(np.unique(ids[0])) > 1  # per sample
    assert (ids[0] != ids[1]).any()  # per step


def test_initial_noise_is_threefry_normal(ensemble):
    """Zero steps would be useless, so check through a velocity-free identity: x at t=1 is the noise."""
    noise = jax.random.normal(jax.random.key(11, impl="threefry2x32"), (64, *SHAPE), jnp.float32)
    result = ensemble.sample(64, "single:0", steps=1, seed=11)
    # One Euler step from t=1 to 0: x0 = noise - v(noise, 1).
    v = all_expert_velocities(noise, jnp.ones(64))[0]
    np.testing.assert_allclose(result.x, np.asarray(noise - v), rtol=1e-6, atol=1e-6)


def test_oracle_and_single(ensemble):
    x, t, comp = noisy_points(256, seed=8)
    labels = CLUSTER_OF[comp]
    v_all = np.asarray(all_expert_velocities(x, t))
    v, w = ensemble.velocity(x, t, "oracle", labels=labels)
    np.testing.assert_array_equal(np.asarray(w), np.eye(K, dtype=np.float32)[labels])
    np.testing.assert_allclose(np.asarray(v), v_all[labels, np.arange(256)], rtol=1e-6, atol=1e-6)
    v, w = ensemble.velocity(x, t, "single:2")
    np.testing.assert_allclose(np.asarray(v), v_all[2], rtol=1e-6, atol=1e-6)
    assert (np.asarray(w)[:, 2] == 1).all()

    labels = np.arange(64) % K
    result = ensemble.sample(64, "oracle", steps=4, seed=0, labels=labels)
    np.testing.assert_array_equal(result.expert_ids, np.tile(labels, (4, 1)))
    assert result.expert_evals == 64 * 4
    # Oracle sampling lands each sample in its own cluster.
    comp = np.argmin(((result.x.reshape(64, 1, D) - MU[None]) ** 2).sum(-1), axis=1)
    np.testing.assert_array_equal(CLUSTER_OF[comp], labels)
    result = ensemble.sample(64, "single:1", steps=4, seed=0)
    assert (result.expert_ids == 1).all()
    with pytest.raises(DDMError, match="labels"):
        ensemble.sample(4, "oracle", steps=2)


def test_router_free_ensemble_allows_only_oracle_and_single():
    ens = make_ensemble(router=False)
    assert ens.sample(64, "single:0", steps=2).x.shape == (64, *SHAPE)
    with pytest.raises(DDMError, match="needs a router"):
        ens.sample(8, "top1", steps=2)


def test_classifier_free_guidance():
    """v = v_uncond + s (v_cond - v_uncond) per expert, with the null label = num_classes."""
    num_classes = 3

    def cond_expert(params, x, t, y):
        bias = jnp.where(y == num_classes, 0.0, y.astype(jnp.float32) + 1.0)
        return params * x + bias[:, None, None, None]

    def router(params, x, t, y):
        return jnp.zeros((x.shape[0], 2))

    ens = Ensemble(cond_expert, [jnp.float32(0.5), jnp.float32(-1.0)], router, None, image_shape=SHAPE,
                   num_classes=num_classes)
    x = jnp.ones((4, *SHAPE))
    y = np.array([0, 1, 2, 1])
    v, _ = ens.velocity(x, 0.5, "full", y=y, cfg_scale=2.0)
    # mean of experts: (0.5 - 1.0) / 2 * x, plus the guided bias 2 * (y + 1)
    expected = -0.25 + 2.0 * (y + 1.0)
    np.testing.assert_allclose(np.asarray(v)[:, 0, 0, 0], expected, rtol=1e-6)
    v, _ = ens.velocity(x, 0.5, "top1", y=y)  # conditional, no guidance: expert 0 (tie -> lower index)
    np.testing.assert_allclose(np.asarray(v)[:, 0, 0, 0], 0.5 + (y + 1.0), rtol=1e-6)
    v, _ = ens.velocity(x, 0.5, "top1")  # no labels: the null label (unconditional)
    np.testing.assert_allclose(np.asarray(v), 0.5, rtol=1e-6)
    assert ens.sample(8, "top1", steps=2, y=1, cfg_scale=1.5).images.shape == (8, *SHAPE)
    with pytest.raises(DDMError, match="class labels"):
        ens.velocity(x, 0.5, "full", cfg_scale=2.0)
    with pytest.raises(DDMError, match="unconditional"):
        make_ensemble().velocity(x, 0.5, "full", y=y)


def test_request_errors(ensemble):
    with pytest.raises(DDMError, match="accepted"):
        ensemble.sample(4, "top", steps=2)
    with pytest.raises(DDMError, match="solver"):
        ensemble.sample(4, "top1", steps=2, solver="rk4")
    with pytest.raises(DDMError, match="steps"):
        ensemble.sample(4, "top1", steps=0)
    with pytest.raises(DDMError, match="shape"):
        ensemble.velocity(np.zeros((4, 3, 3, 1)), 0.5, "full")
    with pytest.raises(DDMError, match="only 3"):
        ensemble.sample(4, "single:3", steps=2)


# --------------------------------------------------------------------------------------------------------
# Solvers and images.
# --------------------------------------------------------------------------------------------------------


def test_heun_is_second_order_and_euler_first():
    """dx/dt = x: exact x(0) = x(1) * e^-1. Halving the step divides the error by ~2 (Euler) / ~4 (Heun)."""
    x1 = jnp.ones((1, 1))
    exact = np.exp(-1.0)

    def err(solver, steps):
        # Heun's last step is Euler (O(h^2) locally), so its global error stays O(h^2).
        x0, _ = jax.jit(lambda x: solvers.integrate(lambda x, t, e: (x, None), x, steps, solver))(x1)
        return abs(float(x0[0, 0]) - exact)

    assert 1.8 < err("euler", 40) / err("euler", 80) < 2.2
    assert 3.0 < err("heun", 40) / err("heun", 80) < 4.5
    assert err("heun", 40) < err("euler", 40) / 10
    assert solvers.evaluations("heun", 10) == 19 and solvers.evaluations("euler", 10) == 10


def test_to_uint8_and_grids(tmp_path):
    np.testing.assert_array_equal(to_uint8(np.array([-2.0, -1.0, 0.0, 1.0, 3.0])), [0, 0, 128, 255, 255])
    images = np.arange(5 * 8 * 8, dtype=np.uint8).reshape(5, 8, 8, 1)
    grid = make_grid(images, ncols=3)
    assert grid.shape == (2 * 9 + 1, 3 * 9 + 1, 1) and grid.dtype == np.uint8
    np.testing.assert_array_equal(grid[1:9, 10:18], images[1])
    assert (grid[10:18, 19:27] == 0).all()  # the unused sixth cell
    path = save_grid_png(images, tmp_path / "grid.png")
    with Image.open(path) as im:
        assert im.mode == "L" and im.size == (3 * 65 + 1, 2 * 65 + 1)  # 8x8 upscaled by 8, 1-pixel borders
    rgb = np.zeros((4, 4, 4, 3), np.uint8)
    with Image.open(save_grid_png(rgb, tmp_path / "rgb.png", ncols=4, scale=2)) as im:
        assert im.mode == "RGB" and im.size == (4 * 9 + 1, 9 + 1)


def test_sample_result_fields(ensemble):
    result = ensemble.sample(64, "top2", steps=3, seed=0)
    assert isinstance(result, SampleResult)
    assert result.images.dtype == np.uint8 and result.images.shape == (64, *SHAPE)
    assert result.x.dtype == np.float32 and result.weights.dtype == np.float32
    assert result.weights.shape == (3, 64, K) and result.expert_ids is None
    assert result.strategy == "top2" and str(Strategy("topk", k=2)) == result.strategy
    np.testing.assert_array_equal(result.images, to_uint8(result.x))
