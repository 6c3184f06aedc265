"""The device dispatchers (the whole solve as one program) equal the host reference dispatcher.

Uses the analytic Gaussian-mixture experts and router of test_ensemble_exact.py (exact velocities, cheap to
compile). Every strategy, CFG, missing experts and `sample` are compared on a batch whose top-1 choices cover
every expert; the reference is the host dispatcher of tests/oracles/host_dispatch.py, the previous design.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from oracles.host_dispatch import host_sample, host_velocity
from oracles.traces import TraceCounter
from test_ensemble_exact import SHAPE, K, expert_apply, expert_params, make_ensemble, noisy_points

from ddm.core.errors import DDMError
from ddm.sampling import dispatch
from ddm.sampling.ensemble import Ensemble

STRATEGIES = ["full", "top1", "top2", "threshold:0.1", "sample", "top1+full:0.5", "oracle", "single:1"]
DEVICE = ["unrolled", "grouped", "capacity"]
TOL = {"rtol": 1e-5, "atol": 1e-5}


def assert_same_routing(weights, reference, err_msg=""):
    """The same experts selected for every sample, with the same weights to float rounding."""
    weights, reference = np.asarray(weights), np.asarray(reference)
    np.testing.assert_array_equal(weights > 0, reference > 0, err_msg=err_msg)
    np.testing.assert_allclose(weights, reference, rtol=1e-5, atol=1e-6, err_msg=err_msg)


@pytest.fixture(scope="module")
def reference():
    return make_ensemble()


def _labels(n):
    return np.arange(n) % K


# Every strategy on the default dispatch; the strategies that mix selections (several experts per sample, or
# none chosen by the router) on the others too.
CASES = [("unrolled", text) for text in STRATEGIES] + [
    (name, text) for name in ("grouped", "capacity") for text in ("threshold:0.1", "top1+full:0.5")]


@pytest.mark.parametrize("dispatch_name,text", CASES)
def test_velocity_equals_reference(reference, dispatch_name, text):
    device = reference.replace(dispatch=dispatch_name)
    x, t, _ = noisy_points(96, seed=4, t_low=0.2, t_high=0.9)
    t[::2] = 0.3  # top1+full:0.5: half the batch on the full posterior, half on top-1
    kwargs = {"rng": jax.random.key(5)} if text == "sample" else {}
    if text == "oracle":
        kwargs["labels"] = _labels(96)
    v_ref, w_ref = host_velocity(reference, x, t, text, **kwargs)
    v, w = device.velocity(x, t, text, **kwargs)
    assert_same_routing(w, w_ref, err_msg=text)
    np.testing.assert_allclose(np.asarray(v), np.asarray(v_ref), **TOL, err_msg=text)
    if text in ("top1", "sample", "oracle"):  # the batch exercises sparse selections on every expert
        assert len(np.unique(np.argmax(np.asarray(w_ref), -1))) == K


@pytest.mark.parametrize("text", STRATEGIES)
def test_sample_equals_reference(reference, text):
    """The default device dispatch (and, for the strategies that mix selections, every device dispatch) runs
    the same solve as the reference: same routing decisions, same samples to float rounding, same counts."""
    labels = _labels(48) if text == "oracle" else None
    ref = host_sample(reference, 48, text, steps=3, solver="heun", seed=2, labels=labels)
    names = DEVICE if text in ("top2", "top1+full:0.5") else ["auto"]
    for name in names:
        out = reference.replace(dispatch=name).sample(48, text, steps=3, solver="heun", seed=2, labels=labels)
        fixed = text in ("oracle", "prior") or text.startswith("single")  # grouped by expert on the host
        assert out.dispatch == ("groups" if fixed else name if name != "auto" else "unrolled")
        assert_same_routing(out.weights, ref.weights)
        np.testing.assert_allclose(out.x, ref.x, **TOL)
        assert out.expert_evals == ref.expert_evals, name
        if out.expert_ids is not None:
            np.testing.assert_array_equal(out.expert_ids, ref.expert_ids)


def test_classifier_free_guidance_equals_reference():
    num_classes = 3

    def cond_expert(params, x, t, y):
        bias = jnp.where(y == num_classes, 0.0, y.astype(jnp.float32) + 1.0)
        return params["a"] * x + bias[:, None, None, None] * (1.0 - t)[:, None, None, None]

    def router(params, x, t, y):
        return jnp.stack([x.sum((1, 2, 3)), -x.sum((1, 2, 3)), x[:, 0, 0, 0]], -1) * params

    experts = [{"a": jnp.float32(0.5)}, {"a": jnp.float32(-1.0)}, {"a": jnp.float32(0.2)}]
    host = Ensemble(cond_expert, experts, router, jnp.float32(3.0), image_shape=SHAPE, num_classes=num_classes)
    y = np.arange(40) % (num_classes + 1)  # includes the null label
    # top1+full:0.5 runs both phases (the full posterior, then top-1) in one solve.
    for text, names in (("top1+full:0.5", DEVICE), ("full", ["unrolled"])):
        ref = host_sample(host, 40, text, steps=4, seed=1, y=y, cfg_scale=2.5)
        for name in names:
            out = host.replace(dispatch=name).sample(40, text, steps=4, seed=1, y=y, cfg_scale=2.5)
            assert_same_routing(out.weights, ref.weights)
            np.testing.assert_allclose(out.x, ref.x, **TOL)
    assert len(np.unique(np.argmax(ref.weights, -1))) > 1  # the routing is not trivial


def test_missing_experts_equal_reference():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        device = make_ensemble(available=[True, False, True])
    for text in ("top2", "sample"):
        ref = host_sample(device, 40, text, steps=3, seed=3)
        out = device.sample(40, text, steps=3, seed=3)
        assert (out.weights[..., 1] == 0).all()
        assert_same_routing(out.weights, ref.weights)
        np.testing.assert_allclose(out.x, ref.x, **TOL)


def test_one_compile_per_batch_and_strategy_shape():
    counter = TraceCounter(expert_apply)  # its own compiled programs: counts no other test disturbs
    ens = make_ensemble().replace(expert_apply=counter)
    ens.sample(37, "top2", steps=3, seed=0)
    first = counter.traces
    assert first > 0
    ens.sample(37, "top2", steps=3, seed=1)  # another seed: same program
    ens.replace(router_params=ens.router_params).sample(37, "top2", steps=3, seed=2)  # another ensemble too
    assert counter.traces == first
    ens.sample(41, "top2", steps=3, seed=0, batch_size=37)  # batches of 37 and 4: one new program, for the 4
    assert counter.traces > first


def test_no_transfer_inside_the_solve():
    """Once the request is on the device, the solve moves nothing between host and device until its results
    are fetched. (On CPU jax does not guard device-to-host reads, which cost nothing there; it does guard the
    host-to-device direction, and a dispatcher that reads the weights back must send index arrays down again.)"""
    ens = make_ensemble()
    ens.sample(24, "top1+full:0.5", steps=3, solver="heun", seed=0)  # compile outside the guard
    with jax.transfer_guard("disallow"):
        result = ens.sample(24, "top1+full:0.5", steps=3, solver="heun", seed=1)
    assert result.x.shape == (24, *SHAPE)
    # Control: the reference dispatcher goes back to the host at every evaluation, which the guard refuses.
    host_sample(ens, 24, "top1", steps=3, seed=0)
    with jax.transfer_guard("disallow"), pytest.raises(Exception, match="isallowed"):
        host_sample(ens, 24, "top1", steps=3, seed=1)


def test_bitwise_deterministic_and_batch_composition():
    ens = make_ensemble()
    a = ens.sample(64, "sample", steps=4, solver="heun", seed=7)
    b = ens.sample(64, "sample", steps=4, solver="heun", seed=7)
    assert a.x.tobytes() == b.x.tobytes() and a.weights.tobytes() == b.weights.tobytes()
    # Other companions in the batch: the same routing draws, the same floats to rounding (not bitwise).
    c = ens.sample(64, "sample", steps=4, solver="heun", seed=7, batch_size=24)
    np.testing.assert_array_equal(c.expert_ids, a.expert_ids)
    np.testing.assert_allclose(c.x, a.x, **TOL)


def test_capacity_dispatch_shards_over_an_expert_mesh_axis():
    """The stacked layout shards over an `expert` axis (K=3 experts on 3 of the 8 fake devices) and gives the
    same samples as the unsharded stack."""
    mesh = jax.make_mesh((K,), ("expert",), devices=jax.devices()[:K],
                         axis_types=(jax.sharding.AxisType.Auto,))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("expert"))
    plain = make_ensemble(dispatch="capacity")
    sharded = plain.replace(expert_sharding=sharding)
    leaf = jax.tree.leaves(sharded.stacked_params)[0]
    assert leaf.sharding.spec[0] == "expert" and len(leaf.sharding.device_set) == K
    for text in ("top1", "full"):
        ref = plain.sample(30, text, steps=3, seed=4)
        out = sharded.sample(30, text, steps=3, seed=4)
        assert_same_routing(out.weights, ref.weights)
        np.testing.assert_allclose(out.x, ref.x, **TOL)


def test_buckets_chunks_and_capacity_rules():
    assert dispatch.bucket_sizes(64, 8) == (8, 16, 32, 64)
    assert dispatch.bucket_sizes(20, 6) == (6, 8, 16, 20)
    assert dispatch.bucket_sizes(4, 1) == (1, 2, 4)
    assert dispatch.capacity_for(64, 8, 1) == 8 and dispatch.capacity_for(64, 3, 2) == 64
    assert dispatch.capacity_for(4, 8, 1) == 1
    stacked = dispatch.stack_params([expert_params(k) for k in range(K)])
    assert jax.tree.leaves(stacked)[0].shape[0] == K
    np.testing.assert_array_equal(dispatch.take_expert(stacked, 2)["means"], expert_params(2)["means"])
    with pytest.raises(DDMError, match="structure"):
        dispatch.stack_params([expert_params(0), {"means": expert_params(0)["means"]}])
    with pytest.raises(DDMError, match="dispatch"):
        Ensemble(expert_apply, [expert_params(0)], None, None, image_shape=SHAPE, dispatch="gpu")
