"""Router models: logits shape/dtype, jit, conditioning, shared DiT blocks, FLOPs budget."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import forward, model_inputs, perturb

from ddm.core.config import MODEL_PRESETS, ModelConfig, RouterConfig
from ddm.core.dit import DIT_PRESETS, DiTBlock, dit_flops_per_image
from ddm.core.errors import DDMError
from ddm.router.model import (
    MLP_PRESETS,
    ROUTER_PRESETS,
    ConvRouter,
    DiTRouter,
    MLPRouter,
    router_flops_per_image,
    router_from_config,
)

SMALL_DIT = dict(patch_size=2, depth=2, width=32, heads=2)  # a small transformer router: cheap to compile


def make_router(arch, shape, num_clusters, num_classes=0, dtype=jnp.float32, seed=0):
    if arch in ("conv", "mlp"):
        return router_from_config(RouterConfig(arch=arch, preset="tiny"), shape, num_clusters, num_classes,
                                  nnx.Rngs(seed), dtype=dtype)
    return DiTRouter(image_shape=shape, num_clusters=num_clusters, num_classes=num_classes, dtype=dtype,
                     rngs=nnx.Rngs(seed), **SMALL_DIT)


@pytest.mark.parametrize("arch,shape", [("conv", (8, 8, 1)), ("conv", (28, 28, 1)), ("conv", (32, 32, 3)),
                                        ("mlp", (8, 8, 1)), ("mlp", (28, 28, 1)), ("dit", (8, 8, 1))])
def test_logits_shape_dtype_and_uniform_at_init(arch, shape):
    router = make_router(arch, shape, 5)
    assert isinstance(router, {"conv": ConvRouter, "mlp": MLPRouter, "dit": DiTRouter}[arch])
    x, t = model_inputs(shape)
    logits = forward(router, x, t)
    assert logits.shape == (3, 5) and logits.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(logits), 0.0)  # zero head: uniform p(k | x_t, t) at init
    perturb(router)
    logits = forward(router, x, t)
    assert bool(jnp.all(jnp.isfinite(logits)))
    assert float(jnp.abs(logits[0] - logits[1]).max()) > 1e-4  # depends on the input
    assert float(jnp.abs(forward(router, x, 1.0 - t) - logits).max()) > 1e-5  # and on t


@pytest.mark.parametrize("arch", ["conv", "mlp", "dit"])
def test_class_label_input(arch):
    router = make_router(arch, (8, 8, 1), 3, num_classes=4, seed=1)
    perturb(router)
    x, t = model_inputs((8, 8, 1))
    a = forward(router, x, t, jnp.zeros(3, jnp.int32))
    b = forward(router, x, t, jnp.full(3, 2, jnp.int32))
    assert float(jnp.abs(a - b).max()) > 1e-5
    np.testing.assert_allclose(np.asarray(forward(router, x, t)),
                               np.asarray(forward(router, x, t, jnp.full(3, 4, jnp.int32))), atol=1e-6)
    plain = make_router(arch, (8, 8, 1), 3)
    with pytest.raises(DDMError, match="unconditional"):
        forward(plain, x, t, jnp.zeros(3, jnp.int32))


@pytest.mark.parametrize("arch", ["conv", "dit"])
def test_bfloat16_router_is_finite(arch):
    router = make_router(arch, (8, 8, 1), 5, dtype=jnp.bfloat16)
    perturb(router)
    x, t = model_inputs((8, 8, 1))
    logits = forward(router, x, t)
    assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))
    assert {leaf.dtype for leaf in jax.tree.leaves(nnx.state(router, nnx.Param))} == {jnp.dtype(jnp.float32)}


def test_dit_router_from_config_reuses_dit_blocks_and_trains():
    abstract = nnx.eval_shape(lambda: router_from_config(RouterConfig(arch="dit", preset="tiny"), (8, 8, 1), 4))
    assert isinstance(abstract, DiTRouter) and len(abstract.blocks) == DIT_PRESETS["tiny"][0]
    assert all(isinstance(b, DiTBlock) for b in abstract.blocks) and abstract.cls.shape == (1, 1, 128)
    router = make_router("dit", (8, 8, 1), 4)
    x, t = model_inputs((8, 8, 1))
    labels = jnp.array([0, 1, 3])

    @nnx.jit
    def grads(model):
        def loss(m):
            logp = jax.nn.log_softmax(m(x, t))
            return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))
        return nnx.value_and_grad(loss)(model)

    value, g = grads(router)
    assert float(value) == pytest.approx(np.log(4), rel=1e-5)
    assert float(jnp.abs(g.head.kernel[...]).max()) > 0
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(g))


def test_bad_router_inputs_raise():
    with pytest.raises(DDMError, match="divisible by the patch size"):
        router_from_config(RouterConfig(arch="dit", patch_size=3), (8, 8, 1), 4)
    with pytest.raises(DDMError, match="clusters"):
        router_from_config(RouterConfig(), (8, 8, 1), 0)
    router = router_from_config(RouterConfig(), (8, 8, 1), 4)
    with pytest.raises(DDMError, match="does not match"):
        router(jnp.zeros((2, 8, 9, 1)), jnp.zeros(2))


@pytest.mark.parametrize("shape,patch", [((8, 8, 1), 2), ((28, 28, 1), 4)])
def test_tiny_conv_router_flops_within_budget(shape, patch):
    expert = dit_flops_per_image(ModelConfig(preset="tiny", patch_size=patch), shape)
    router = router_flops_per_image(RouterConfig(arch="conv", preset="tiny"), shape, 8)
    assert 0 < router <= 0.1 * expert
    assert set(ROUTER_PRESETS) == set(MODEL_PRESETS)  # every preset a RouterConfig accepts has widths


def test_mlp_router_presets_and_flops_within_budget():
    """The mlp presets cover every model preset, and the micro one (configs/digits.yaml) is a few percent of the
    micro expert's FLOPs on 8x8 digits."""
    assert set(MLP_PRESETS) == set(MODEL_PRESETS)
    expert = dit_flops_per_image(ModelConfig(preset="micro", patch_size=2), (8, 8, 1))
    assert 0 < router_flops_per_image(RouterConfig(arch="mlp", preset="micro"), (8, 8, 1), 4) <= 0.05 * expert


@pytest.mark.parametrize("arch", ["conv", "mlp", "dit"])
@pytest.mark.parametrize("shape,patch", [((8, 8, 1), 2), ((28, 28, 1), 4)])
def test_router_flops_match_xla_cost_analysis(arch, shape, patch):
    cfg = RouterConfig(arch=arch, preset="tiny", patch_size=patch)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: router_from_config(cfg, shape, 8)))
    fn = jax.jit(lambda s, x, t: nnx.merge(graphdef, s)(x, t))
    x, t = jax.ShapeDtypeStruct((1, *shape), jnp.float32), jax.ShapeDtypeStruct((1,), jnp.float32)
    lowered = fn.lower(state, x, t)
    cost = lowered.cost_analysis()  # XLA's HLO count, lowered but not compiled
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    assert router_flops_per_image(cfg, shape, 8) == pytest.approx(cost["flops"], rel=0.15)
