"""DiT: shapes and dtypes, adaLN-Zero init, conditioning, parameter counts, FLOPs, input validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import forward, model_inputs, perturb

from ddm.core.config import ModelConfig
from ddm.core.dit import (
    DIT_PRESETS,
    DiT,
    abstract_dit,
    count_dit_params,
    count_params,
    dit_flops,
    dit_flops_per_image,
    dit_from_config,
    patchify,
    sincos_pos_embed,
    unpatchify,
)
from ddm.core.errors import DDMError

SMALL = dict(depth=2, width=32, heads=2)  # one small architecture everywhere: XLA compiles are shared


def small_dit(shape=(8, 8, 1), patch=2, num_classes=0, dtype=jnp.float32, seed=0) -> DiT:
    return DiT(image_shape=shape, patch_size=patch, num_classes=num_classes, dtype=dtype, rngs=nnx.Rngs(seed),
               **SMALL)


@pytest.mark.parametrize("shape,patch", [((8, 8, 1), 2), ((28, 28, 1), 4), ((32, 32, 3), 2), ((8, 12, 2), 4)])
def test_output_shape_and_dtype(shape, patch):
    model = small_dit(shape, patch)
    perturb(model)
    x, t = model_inputs(shape)
    v = forward(model, x, t)
    assert v.shape == (3, *shape) and v.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(v))) and float(jnp.abs(v).max()) > 0


def test_zero_output_at_init_and_identity_blocks():
    model = small_dit(num_classes=4)
    x, t = model_inputs((8, 8, 1))
    np.testing.assert_array_equal(np.asarray(forward(model, x, t, jnp.array([0, 1, 2]))), 0.0)
    block = nnx.jit(lambda b, h, c: b(h, c))
    h = jnp.asarray(np.random.default_rng(1).standard_normal((3, 16, 32), dtype=np.float32))
    c = jnp.asarray(np.random.default_rng(2).standard_normal((3, 32), dtype=np.float32))
    np.testing.assert_array_equal(np.asarray(block(model.blocks[0], h, c)), np.asarray(h))
    perturb(model)
    assert float(jnp.abs(block(model.blocks[0], h, c) - h).max()) > 1e-3


def test_bfloat16_compute_float32_params_and_output():
    m32, m16 = small_dit(num_classes=4), small_dit(num_classes=4, dtype=jnp.bfloat16)
    perturb(m32)
    perturb(m16)
    assert {leaf.dtype for leaf in jax.tree.leaves(nnx.state(m16, nnx.Param))} == {jnp.dtype(jnp.float32)}
    x, t = model_inputs((8, 8, 1))
    y = jnp.array([0, 1, 2])
    v16, v32 = forward(m16, x, t, y), forward(m32, x, t, y)
    assert v16.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(v16)))
    assert float(jnp.abs(v16 - v32).max()) < 0.05 * float(jnp.abs(v32).max()) + 1e-3
    assert float(jnp.abs(v16 - v32).max()) > 0  # really computed in bfloat16


def test_class_conditioning():
    model = small_dit(num_classes=4)
    assert model.cond.labels.embedding.shape == (5, 32)  # num_classes + 1 rows, the last is the null label
    perturb(model)
    x, t = model_inputs((8, 8, 1))
    v0 = forward(model, x, t, jnp.zeros(3, jnp.int32))
    v1 = forward(model, x, t, jnp.ones(3, jnp.int32))
    assert float(jnp.abs(v0 - v1).max()) > 1e-4
    null = jnp.full(3, 4, jnp.int32)
    v_null = forward(model, x, t, null)
    np.testing.assert_allclose(np.asarray(forward(model, x, t)), np.asarray(v_null), atol=1e-6)
    # and the timestep matters
    assert float(jnp.abs(forward(model, x, 1.0 - t, null) - v_null).max()) > 1e-4


def test_labels_given_to_unconditional_model_raise():
    model = small_dit()
    x, t = model_inputs((8, 8, 1))
    with pytest.raises(DDMError, match="unconditional"):
        forward(model, x, t, jnp.zeros(3, jnp.int32))


@pytest.mark.parametrize("shape,patch", [((28, 28, 1), 3), ((8, 10, 1), 4), ((32, 32, 3), 5)])
def test_patch_mismatch_raises(shape, patch):
    with pytest.raises(DDMError, match="divisible by the patch size"):
        nnx.eval_shape(lambda: dit_from_config(ModelConfig(patch_size=patch), shape, nnx.Rngs(0)))


def test_bad_widths_and_input_shapes_raise():
    with pytest.raises(DDMError, match="heads"):
        nnx.eval_shape(lambda: DiT(image_shape=(8, 8, 1), patch_size=2, depth=1, width=30, heads=4,
                                   rngs=nnx.Rngs(0)))
    model = small_dit()
    with pytest.raises(DDMError, match="does not match"):
        forward(model, jnp.zeros((2, 8, 8, 3)), jnp.zeros(2))
    with pytest.raises(DDMError, match="t shape"):
        forward(model, jnp.zeros((2, 8, 8, 1)), jnp.zeros(3))


def test_patchify_roundtrip_and_pos_embed_is_fixed():
    x = np.random.default_rng(0).standard_normal((2, 8, 12, 3)).astype(np.float32)
    tokens = patchify(x, 4)
    assert tokens.shape == (2, 6, 48)
    np.testing.assert_array_equal(tokens[0, 1], x[0, 0:4, 4:8].reshape(-1))
    np.testing.assert_array_equal(unpatchify(tokens, 4, (8, 12, 3)), x)
    pos = sincos_pos_embed(2, 3, 16)
    assert pos.shape == (6, 16) and len({tuple(row) for row in pos.round(5)}) == 6
    model = nnx.eval_shape(small_dit)
    shapes = {leaf.shape for leaf in jax.tree.leaves(nnx.state(model))}
    assert (16, 32) not in shapes and (1, 16, 32) not in shapes  # no position-embedding variable


# DiT paper, Table 4 (ImageNet 256 -> latent 32x32x4, patch 2, 1000 classes): params and Gflops (= GMACs).
PAPER = {"S": (33.0e6, 6.06e9), "B": (130.5e6, 23.01e9), "L": (458.1e6, 80.71e9), "XL": (675.1e6, 118.64e9)}


@pytest.mark.parametrize("preset", sorted(PAPER))
def test_paper_param_counts_and_flops(preset):
    cfg = ModelConfig(preset=preset, patch_size=2, num_classes=1000)
    params, gmacs = PAPER[preset]
    # the paper also learns the variance (2C output channels); our final layer has C.
    assert count_dit_params(cfg, (32, 32, 4)) == pytest.approx(params, rel=0.02)
    assert dit_flops_per_image(cfg, (32, 32, 4)) / 2 == pytest.approx(gmacs, rel=0.01)


def test_presets_and_abstract_count_match_concrete():
    assert DIT_PRESETS["S"] == (12, 384, 6) and DIT_PRESETS["XL"] == (28, 1152, 16)
    concrete = count_params(small_dit(num_classes=4))
    assert count_params(nnx.eval_shape(lambda: small_dit(num_classes=4))) == concrete
    d = SMALL["width"]
    block = 4 * d * d + 4 * d + 2 * 4 * d * d + 5 * d + 6 * d * d + 6 * d  # attn, mlp, adaLN (+ biases)
    embed = 256 * d + d + d * d + d + 5 * d + 4 * d + d  # timestep MLP, labels, patch embed
    final = 2 * d * d + 2 * d + 4 * d + 4
    assert concrete == embed + SMALL["depth"] * block + final
    assert 1e6 < count_dit_params(ModelConfig(preset="tiny", patch_size=2), (8, 8, 1)) < 2e6


def hlo_flops(abstract_model: nnx.Module, shape) -> float:
    """FLOPs that XLA's HLO cost analysis counts for one image (lowered, not compiled: cheap)."""
    graphdef, state = nnx.split(abstract_model)
    fn = jax.jit(lambda s, x, t: nnx.merge(graphdef, s)(x, t))
    x, t = jax.ShapeDtypeStruct((1, *shape), jnp.float32), jax.ShapeDtypeStruct((1,), jnp.float32)
    lowered = fn.lower(state, x, t)
    cost = lowered.cost_analysis()
    return (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]


@pytest.mark.parametrize("shape,patch", [((8, 8, 1), 2), ((28, 28, 1), 4), ((32, 32, 3), 2)])
def test_flops_formula_matches_xla_cost_analysis(shape, patch):
    cfg = ModelConfig(preset="tiny", patch_size=patch)
    assert dit_flops_per_image(cfg, shape) == pytest.approx(hlo_flops(abstract_dit(cfg, shape), shape), rel=0.1)
    assert dit_flops_per_image(cfg, shape) == dit_flops(shape, patch, *DIT_PRESETS["tiny"][:2])
