"""Conditioning on per-image embeddings, the model and training side: pooled (D,) conditions through adaLN,
token (L, D) conditions through cross-attention, the NaN null, condition dropout, the router's switch, and the
SD-VAE-latent + CLIP-token shapes through the real trainer. Class-label models are unchanged."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import forward, model_inputs, perturb

from ddm.core.codec import Codec
from ddm.core.config import ModelConfig, RouterConfig, TrainConfig
from ddm.core.dit import DiT, count_dit_params, dit_flops, dit_flops_per_image
from ddm.core.errors import DDMError
from ddm.core.flow import drop_conditions, null_like
from ddm.core.functional import model_apply
from ddm.experts.assemble import PLAN_MODEL_FIELDS
from ddm.experts.train import flow_loss, make_dit
from ddm.router.model import router_flops_per_image, router_from_config
from ddm.router.train import router_loss
from ddm.sampling.dispatch import expert_velocity
from ddm.train.checkpoint import load_pinned
from ddm.train.monitor import HeldOut
from ddm.train.trainer import Task, Trainer, init_state, make_optimizer, read_metrics, train_step

SHAPE = (8, 8, 1)
SMALL = {"depth": 2, "width": 32, "heads": 2}  # test_dit.py's small architecture
KINDS = {"pooled": (16,), "tokens": (5, 16)}


def small_dit(condition_shape=(), num_classes=0, seed=0) -> DiT:
    return DiT(image_shape=SHAPE, patch_size=2, num_classes=num_classes, condition_shape=condition_shape,
               rngs=nnx.Rngs(seed), **SMALL)


def conditions(shape, batch=4, seed=1) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).standard_normal((batch, *shape)).astype(np.float32))


@pytest.fixture(scope="module", params=sorted(KINDS))
def dit(request):
    """A small DiT conditioned on pooled or token embeddings, its zero-initialised layers randomised."""
    model = small_dit(KINDS[request.param])
    perturb(model)
    return model


def test_null_rows_are_the_unconditional_model_and_conditions_matter(dit):
    x, t = model_inputs(SHAPE, batch=4)
    y = conditions(dit.condition_shape)
    v = np.asarray(forward(dit, x, t, y.at[1].set(jnp.nan).at[3].set(jnp.nan)))
    v_none = np.asarray(forward(dit, x, t, None))
    np.testing.assert_allclose(v[[1, 3]], v_none[[1, 3]], atol=1e-6)  # an all-NaN row is the null condition
    assert np.abs(v[[0, 2]] - v_none[[0, 2]]).max() > 1e-3  # a real condition is not
    # Another condition for row 0 changes row 0 alone; float16 conditions are their float32 values.
    v_other = np.asarray(forward(dit, x, t, y.at[0].set(conditions(dit.condition_shape, 1, seed=9)[0])))
    v_plain = np.asarray(forward(dit, x, t, y))
    assert np.abs(v_other[0] - v_plain[0]).max() > 1e-3
    np.testing.assert_array_equal(v_other[1:], v_plain[1:])
    half = y.astype(jnp.float16)
    np.testing.assert_allclose(np.asarray(forward(dit, x, t, half)),
                               np.asarray(forward(dit, x, t, half.astype(jnp.float32))), atol=1e-6)


def test_nan_rows_give_finite_outputs_and_gradients(dit):
    x, t = model_inputs(SHAPE, batch=4)
    y = conditions(dit.condition_shape).at[0].set(jnp.nan).at[2, 0].set(jnp.nan)  # row 2: one stray NaN
    graphdef, state = nnx.split(dit)

    def loss(s):
        return jnp.mean(jnp.square(nnx.merge(graphdef, s)(x, t, y)))

    value, grads = jax.jit(jax.value_and_grad(loss))(state)
    assert np.isfinite(float(value))
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    assert float(jnp.abs(grads["cond"]["null"][...]).max()) > 0  # the null row trains the null embedding


def test_a_new_model_predicts_zero_and_its_blocks_start_as_the_identity():
    model = small_dit(KINDS["tokens"])
    x, t = model_inputs(SHAPE, batch=4)
    np.testing.assert_array_equal(np.asarray(forward(model, x, t, conditions((5, 16)))), 0.0)
    h = jnp.asarray(np.random.default_rng(1).standard_normal((4, 16, 32), dtype=np.float32))
    c = jnp.asarray(np.random.default_rng(2).standard_normal((4, 32), dtype=np.float32))
    context = jnp.asarray(np.random.default_rng(3).standard_normal((4, 5, 32), dtype=np.float32))
    block = nnx.jit(lambda b, h, c, context: b(h, c, context))
    np.testing.assert_array_equal(np.asarray(block(model.blocks[0], h, c, context)), np.asarray(h))
    assert model.blocks[0].cross is not None and small_dit(KINDS["pooled"]).blocks[0].cross is None


def test_condition_dropout_nulls_about_p_of_the_rows_as_label_dropout_does():
    y = jnp.asarray(np.random.default_rng(0).standard_normal((20_000, 3)).astype(np.float16))
    dropped = np.asarray(drop_conditions(jax.random.key(0), y, 0.1, 7))
    null = np.isnan(dropped).all(axis=1)
    assert dropped.dtype == np.float16 and abs(null.mean() - 0.1) < 0.01
    assert not np.isnan(dropped[~null]).any()
    np.testing.assert_array_equal(dropped[~null], np.asarray(y)[~null])
    labels = np.asarray(drop_conditions(jax.random.key(0), jnp.zeros(20_000, jnp.int32), 0.1, 7))
    np.testing.assert_array_equal(labels == 7, null)  # one draw per row: the same rows for either kind
    assert np.isnan(np.asarray(null_like(y[:2], 7))).all()
    np.testing.assert_array_equal(np.asarray(null_like(jnp.array([1, 2]), 7)), [7, 7])


# Computed from the class-label DiT before condition embeddings existed: its parameter tree (paths and shapes)
# and its outputs must not move.
CLASS_TREE_SHA = "97a57841629d4d78"
CLASS_OUTPUT = np.array([[0.18081653, -0.21572018, -0.17611244],
                         [-0.13735312, 0.05779118, -0.06500842],
                         [0.35611564, -0.019668452, 0.33471906],
                         [0.022167958, 0.08221764, -0.17038223]], np.float32)
CLASS_OUTPUT_ABS_SUM = 52.34465026855469


def test_class_label_dit_is_unchanged():
    model = small_dit(num_classes=4)
    leaves = jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))
    tree = ";".join(f"{jax.tree_util.keystr(path)}:{tuple(leaf.shape)}" for path, leaf in leaves)
    assert hashlib.sha256(tree.encode()).hexdigest()[:16] == CLASS_TREE_SHA
    perturb(model)
    x, t = model_inputs(SHAPE, batch=4)
    v = np.asarray(forward(model, x, t, jnp.array([0, 1, 2, 4])))
    np.testing.assert_allclose(v.reshape(4, -1)[:, :3], CLASS_OUTPUT, rtol=1e-5, atol=1e-7)
    assert float(np.abs(v).sum()) == pytest.approx(CLASS_OUTPUT_ABS_SUM, rel=1e-5)


def test_bad_conditions_are_one_line_errors(dit):
    x, t = model_inputs(SHAPE, batch=4)
    cases = [(conditions((3,)), "condition shape (4, 3) must be [B, "),
             (jnp.zeros((4, *dit.condition_shape), jnp.int32), "condition embeddings must be float, got int32")]
    for y, needle in cases:
        with pytest.raises(DDMError) as err:
            dit(x, t, y)  # the shape checks run first: no compute before the error
        assert needle in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(DDMError, match="not both"):
        small_dit((16,), num_classes=3)
    for shape in [(2, 3, 4), (0,), (4, -1)]:
        with pytest.raises(DDMError, match="condition shape"):
            nnx.eval_shape(lambda shape=shape: small_dit(shape))


def hlo_flops(model: nnx.Module, y_shape) -> float:
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda s, x, t, y: nnx.merge(graphdef, s)(x, t, y))
    args = (jax.ShapeDtypeStruct((1, *SHAPE), jnp.float32), jax.ShapeDtypeStruct((1,), jnp.float32),
            jax.ShapeDtypeStruct((1, *y_shape), jnp.float32))
    cost = fn.lower(state, *args).cost_analysis()
    return (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_flops_count_the_condition_and_cross_attention(kind):
    shape = KINDS[kind]
    abstract = nnx.eval_shape(lambda: small_dit(shape))
    formula = dit_flops(SHAPE, 2, SMALL["depth"], SMALL["width"], shape)
    assert formula == pytest.approx(hlo_flops(abstract, shape), rel=0.1)
    assert formula > dit_flops(SHAPE, 2, SMALL["depth"], SMALL["width"])


def test_cross_attention_cost_at_clip_token_shapes():
    tokens, plain = (ModelConfig(preset="micro", num_classes=0, condition_shape=(77, 768)),
                     ModelConfig(preset="micro", num_classes=0))
    # micro: 3 blocks of width 64; the projections 768 -> 64 (pooled, context) and per block q, kv, out, adaLN
    extra = 2 * (768 * 64 + 64) + 77 * 768 + 3 * (4 * 64 * 64 + 4 * 64 + 64 * 3 * 64 + 3 * 64)
    assert count_dit_params(tokens, (32, 32, 4)) - count_dit_params(plain, (32, 32, 4)) == extra
    xl_tokens = dataclasses.replace(tokens, preset="XL")
    ratio = dit_flops_per_image(xl_tokens, (32, 32, 4)) / dit_flops_per_image(dataclasses.replace(plain, preset="XL"),
                                                                               (32, 32, 4))
    assert ratio == pytest.approx(1.22, abs=0.01)  # DiT-XL/2 on 32x32x4: 77-token cross-attention in 28 blocks


def test_classifier_free_guidance_uses_the_null_condition(dit):
    apply, params = model_apply(dit)
    x, t = model_inputs(SHAPE, batch=4)
    y = conditions(dit.condition_shape)
    guided = jax.jit(functools.partial(expert_velocity, apply, cfg=True, null_label=0))
    np.testing.assert_allclose(np.asarray(guided(params, x, t, y, jnp.float32(0.0))),
                               np.asarray(forward(dit, x, t, None)), atol=1e-6)  # scale 0: the null half
    np.testing.assert_allclose(np.asarray(guided(params, x, t, y, jnp.float32(1.0))),
                               np.asarray(forward(dit, x, t, y)), atol=1e-5)  # scale 1: the conditional half


class ArrayBatches:
    """A reader of fixed random rows: stored images or latents [N, *image_shape] and float16 conditions
    [N, *condition_shape]."""

    process_index = 0

    def __init__(self, images: np.ndarray, conditions: np.ndarray, batch: int):
        self.images, self.conditions, self.batch_size = images, conditions, batch
        self.num_images, self.seed, self.image_shape = len(images), 0, images.shape[1:]

    def position(self, step):
        return types.SimpleNamespace(epoch=0, offset=step * self.batch_size)

    def batch(self, step):
        rows = (np.arange(self.batch_size) + step * self.batch_size) % self.num_images
        return self.images[rows], np.zeros(self.batch_size, np.int32), self.conditions[rows]


def test_the_trainer_trains_the_condition_path(tmp_path):
    """Token conditions through `Trainer`: the [B, L, D] float16 batch element is sharded and split into 2
    micro-batches like the others, and after 3 steps (adaLN-Zero: the condition path gets gradients once the
    zero-initialised layers have moved) the null embedding, the condition projection and the cross-attention
    have trained; everything stays finite. Held-out rows keep the conditions' float kind."""
    rng = np.random.default_rng(0)
    reader = ArrayBatches(rng.integers(0, 256, (16, *SHAPE)).astype(np.uint8),
                          rng.standard_normal((16, *KINDS["tokens"])).astype(np.float16), 16)
    rows = HeldOut(reader.images, np.zeros(16), reader.conditions).rows(20)[2]
    assert rows.dtype == np.float32 and rows.shape == (20, *KINDS["tokens"])
    cfg = TrainConfig(steps=3, batch_size=16, grad_accum=2, lr=1e-2, warmup_steps=0, schedule="constant",
                      log_every=3, checkpoint_every=100)
    task = Task(name="tokens", make_model=lambda rngs: DiT(image_shape=SHAPE, patch_size=2, depth=1, width=32,
                                                           heads=2, condition_shape=KINDS["tokens"], rngs=rngs),
                loss=functools.partial(flow_loss, "uniform", 0.5, 0, condition_shape=KINDS["tokens"]),
                reader=reader, out_dir=tmp_path / "out", meta={})
    trainer = Trainer(task, cfg)
    start = jax.device_get(trainer.initial_state()["params"])
    result = trainer.run()
    (row,) = read_metrics(result.metrics_path)
    assert np.isfinite(row["loss"])
    final = jax.device_get(nnx.state(load_pinned(result.final_path, result.ema_sha256, task.make_model, "tokens"),
                                     nnx.Param))
    assert all(np.isfinite(a).all() for a in jax.tree.leaves(final))
    moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), final, start)
    for part in (moved["cond"]["null"], moved["cond"]["condition"], moved["context"], moved["blocks"][0]["cross"]):
        assert min(jax.tree.leaves(part)) > 0


def test_sd_latents_with_clip_tokens_train():
    """The SD-VAE latent (32x32x4) + CLIP token (77x768) shapes: a micro DiT with cross-attention takes 2 steps
    of the trainer's step (flow loss with condition dropout, AdamW, EMA) on random data; the parameters move
    and stay finite."""
    model_cfg = ModelConfig(preset="micro", num_classes=0, condition_shape=(77, 768))
    make = functools.partial(make_dit, model_cfg, (32, 32, 4))
    loss = functools.partial(flow_loss, "logit_normal", 0.5, 0, condition_shape=(77, 768))
    tx = make_optimizer(TrainConfig(lr=1e-3, warmup_steps=0, schedule="constant"))
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: make(nnx.Rngs(0))))
    codec = Codec("latents", (0.0,) * 4, (1.0,) * 4)
    step = jax.jit(functools.partial(train_step, graphdef, loss, tx, 0.999, codec=codec), donate_argnums=0)
    state = init_state(make, tx, 0)
    start = jax.device_get(state["params"])
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, 32, 32, 4)).astype(np.float16)
    tokens = rng.standard_normal((2, 77, 768)).astype(np.float16)
    for _ in range(2):
        state, metrics = step(state, latents, np.zeros(2, np.int32), tokens)
    params = jax.device_get(state["params"])
    assert np.isfinite(float(metrics["loss"])) and int(state["bad"][0]) == -1
    assert all(np.isfinite(a).all() for a in jax.tree.leaves(params))
    assert max(jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), params, start))) > 0


@pytest.mark.parametrize("arch", ["conv", "dit"])
def test_router_takes_the_condition_or_not(arch):
    cfg = RouterConfig(arch=arch, preset="micro")
    shape = KINDS["tokens"]
    router = router_from_config(cfg, SHAPE, 3, rngs=nnx.Rngs(1), condition_shape=shape)
    blind = router_from_config(RouterConfig(arch=arch, preset="micro", condition=False), SHAPE, 3,
                               rngs=nnx.Rngs(1), condition_shape=shape)
    plain = router_from_config(cfg, SHAPE, 3, rngs=nnx.Rngs(1))
    # Without `router.condition` the router is the unconditioned one: same parameters, no embedding input.
    assert jax.tree.structure(nnx.state(blind, nnx.Param)) == jax.tree.structure(nnx.state(plain, nnx.Param))
    assert router.cond.condition_shape == shape and blind.cond.condition_shape == ()
    blind_cfg = RouterConfig(arch=arch, preset="micro", condition=False)
    assert router_flops_per_image(cfg, SHAPE, 3, shape) > router_flops_per_image(blind_cfg, SHAPE, 3, shape)
    assert router_flops_per_image(blind_cfg, SHAPE, 3, shape) == router_flops_per_image(cfg, SHAPE, 3)
    perturb(router)
    x, t = model_inputs(SHAPE, batch=4)
    y = conditions(shape)
    logits = np.asarray(forward(router, x, t, y.at[1].set(jnp.nan)))
    none = np.asarray(forward(router, x, t, None))
    np.testing.assert_allclose(logits[1], none[1], atol=1e-5)
    assert np.abs(logits[0] - none[0]).max() > 1e-4
    # The loss: the condition is an input, dropped to NaN rows; the blind router's loss ignores it.
    clusters = jnp.array([0, 1, 2, 0])
    value, aux = nnx.jit(lambda r, x, c, y: router_loss("uniform", 0.5, 0, r, x, c, y, jax.random.key(0),
                                                        condition_shape=shape))(router, x, clusters, y)
    assert np.isfinite(float(value)) and 0 <= float(aux["accuracy"]) <= 1
    value, _ = nnx.jit(lambda r, x, c, y: router_loss("uniform", 0.5, 0, r, x, c, y, jax.random.key(0)))(
        blind, x, clusters, y)
    assert float(value) == pytest.approx(np.log(3), rel=1e-5)  # zero head: uniform, whatever the condition


def test_islands_cannot_change_the_condition_shape():
    assert "condition_shape" in PLAN_MODEL_FIELDS and "num_classes" in PLAN_MODEL_FIELDS
