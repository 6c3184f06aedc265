"""The DiT's scale knobs: attention through jax.nn.dot_product_attention, per-block remat, gradient
accumulation. Each must change cost, never results (within float tolerance)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import perturb

from ddm.core.config import TrainConfig
from ddm.core.dit import DiT, reference_attention
from ddm.core.errors import DDMError
from ddm.train.trainer import init_state, loss_and_grads, make_optimizer, train_step

SHAPE = (16, 16, 4)  # a latent-shaped input: 64 tokens of patch 2


def _dit(remat="none", depth=2, width=32, heads=2, seed=0):
    model = DiT(image_shape=SHAPE, patch_size=2, depth=depth, width=width, heads=heads, num_classes=3,
                remat=remat, rngs=nnx.Rngs(seed))
    perturb(model, seed)
    return model


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-6), (jnp.bfloat16, 2e-2)])
def test_dot_product_attention_equals_reference(dtype, tol):
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 64, 4, 16)) * 2, dtype) for _ in range(3))
    ours = jax.nn.dot_product_attention(q, k, v)
    ref = reference_attention(q, k, v)
    assert ours.dtype == ref.dtype == dtype
    np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(ref, np.float32), atol=tol, rtol=tol)


def _flow_loss(model, x, y):
    """A deterministic loss (t and targets from the inputs, no noise draws) with a mean over rows."""
    t = jax.nn.sigmoid(x.mean(axis=(1, 2, 3)))
    return jnp.mean((model(x, t, y) - x[..., ::-1]) ** 2)


def test_remat_changes_memory_not_results():
    """Same loss and gradients; the activations the backward pass keeps (the residuals of `jax.vjp`) shrink to
    about the blocks' inputs. (XLA:CPU's `memory_analysis()` does not show it: its scheduler hoists the
    recomputation next to the forward pass; on GPU `benchmarks/bench_gpu.py` measures the peak.)"""
    rng = np.random.default_rng(1)
    x, y = jnp.asarray(rng.standard_normal((8, *SHAPE)), jnp.float32), jnp.asarray([0, 1, 2, 3, 0, 1, 2, 3])
    results, residual_bytes = [], []
    for remat in ("none", "block"):
        graphdef, params = nnx.split(_dit(remat))
        loss, vjp = jax.jit(lambda p, graphdef=graphdef: jax.vjp(lambda q: _flow_loss(nnx.merge(graphdef, q), x, y),
                                                                 p))(params)
        residual_bytes.append(sum(leaf.nbytes for leaf in jax.tree.leaves(vjp)))
        results.append(jax.device_get((loss, vjp(jnp.ones_like(loss))[0])))
    (loss0, g0), (loss1, g1) = results
    np.testing.assert_allclose(loss1, loss0, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6), g0, g1)
    assert residual_bytes[1] < 0.25 * residual_bytes[0], residual_bytes
    with pytest.raises(DDMError, match="remat"):
        DiT(image_shape=SHAPE, patch_size=2, depth=1, width=32, heads=2, remat="all", rngs=nnx.Rngs(0))


def _accum_loss(model, x, clusters, classes, rng):
    del clusters, rng  # deterministic in the rows, so micro-batches and the big batch see the same per-row terms
    loss = _flow_loss(model, x, classes)
    return loss, {"loss_copy": loss}


def test_grad_accumulation_equals_one_big_batch():
    """4 micro-batches of 4 rows = one batch of 16: same loss, gradients and optimizer step (float tolerance)."""
    def make_model(rngs):
        return DiT(image_shape=SHAPE, patch_size=4, depth=1, width=32, heads=2, num_classes=3, rngs=rngs)

    cfg = TrainConfig(lr=1e-3, warmup_steps=0, schedule="constant", batch_size=16, grad_accum=4)
    tx = make_optimizer(cfg)
    state = jax.jit(functools.partial(init_state, make_model, tx, 0))()
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: make_model(nnx.Rngs(params=0))))
    params = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(3), a.shape), state["params"])
    state = {**state, "params": params}
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (16, *SHAPE), dtype=np.uint8)
    clusters, classes = np.zeros(16, np.int32), rng.integers(0, 3, 16).astype(np.int32)
    x = jnp.asarray(images, jnp.float32) / 127.5 - 1
    big = jax.jit(functools.partial(loss_and_grads, graphdef, _accum_loss, accum=1))
    acc = jax.jit(functools.partial(loss_and_grads, graphdef, _accum_loss, accum=4))
    args = (state["params"], state["rest"], x, clusters, classes, jax.random.key(0))
    (l1, aux1), g1 = jax.device_get(big(*args))
    (l4, aux4), g4 = jax.device_get(acc(*args))
    np.testing.assert_allclose(l4, l1, rtol=1e-6)
    np.testing.assert_allclose(aux4["loss_copy"], aux1["loss_copy"], rtol=1e-6)
    assert max(float(np.abs(a).max()) for a in jax.tree.leaves(g1)) > 1e-4  # the gradients are not trivially 0
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-7), g1, g4)
    # The trainer's step with accum=4 reports the big batch's loss and gradient norm.
    step = jax.jit(functools.partial(train_step, graphdef, _accum_loss, tx, 0.9, accum=4))
    _, metrics = jax.device_get(step(state, images, clusters, classes))
    np.testing.assert_allclose(metrics["loss"], l1, rtol=1e-6)
    np.testing.assert_allclose(metrics["grad_norm"], np.sqrt(sum((a.astype(np.float64) ** 2).sum()
                                                                 for a in jax.tree.leaves(g1))), rtol=1e-5)
    with pytest.raises(DDMError, match="grad_accum"):
        TrainConfig(batch_size=16, grad_accum=3)
