"""The router: a classifier p(cluster k | x_t, t[, y]) over the K data clusters, returning K logits.

y is what the experts are conditioned on: a class label, or a condition embedding (pooled [D] or tokens [L, D],
averaged over the tokens) projected into the conditioning vector (`ddm.core.dit.ConditionEmbedder`, with its
learned null for NaN rows), unless `RouterConfig.condition` is off: then the router ignores the embedding and
models p(k | x_t, t), as Paris's router does.

Three architectures (`RouterConfig.arch`):
- "conv" (`ConvRouter`, default): a small strided conv net. Each stage is conv3x3 -> GroupNorm -> FiLM from
  the conditioning vector (timestep MLP [+ label embedding]) -> SiLU; then global average pool, LayerNorm and
  a linear head. Widths come from `ROUTER_PRESETS`; the tiny preset costs a few percent of a tiny DiT expert.
- "mlp" (`MLPRouter`): the flattened image through dense layers, each Linear -> LayerNorm -> FiLM(c) -> SiLU,
  then LayerNorm and a linear head. A handful of matmuls: on XLA:CPU it costs a fraction of the conv router's
  time at the same accuracy on small images (8x8 digits: docs/benchmarks.md, "Router cost"), where the conv
  router's many small ops cost more than the whole micro expert's matmuls would suggest. Widths:
  `MLP_PRESETS`.
- "dit" (`DiTRouter`): the paper's router, DiT blocks from `ddm.core.dit` (patch embed, fixed position
  embedding, conditioning, adaLN-Zero blocks) with a learned CLS token prepended and a linear head on it.
  Sizes come from `ddm.core.dit.DIT_PRESETS`, so it costs about as much as a DiT of the same preset.

Both heads start at zero (uniform prediction, loss log K). Logits are float32 whatever the compute dtype.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from ddm.core.config import RouterConfig
from ddm.core.dit import (
    ConditionEmbedder,
    PatchEmbed,
    check_condition_shape,
    check_image_shape,
    check_inputs,
    check_width,
    condition_macs,
    make_blocks,
    preset_dims,
    sincos_pos_embed,
    transformer_macs,
)
from ddm.core.errors import DDMError

# preset name -> channel widths of the conv stages (the first at full resolution, each later one stride 2).
ROUTER_PRESETS: dict[str, tuple[int, ...]] = {
    "micro": (8, 16, 32),
    "tiny": (16, 32, 64),
    "small": (32, 64, 128),
    "S": (64, 128, 256),
    "B": (96, 192, 384, 768),
    "L": (128, 256, 512, 1024),
    "XL": (192, 384, 768, 1152),
}
# preset name -> hidden widths of the mlp router's dense layers.
MLP_PRESETS: dict[str, tuple[int, ...]] = {
    # micro: one hidden layer. On digits it routes as well as two (eval-router given the class 0.892 vs 0.891,
    # class-blind 0.697 vs 0.701) at half the time (5% vs 9-11% of the micro expert's CPU time under load).
    "micro": (128,),
    "tiny": (256, 256),
    "small": (512, 512),
    "S": (1024, 1024),
    "B": (1024, 1024, 1024),
    "L": (2048, 2048, 2048),
    "XL": (2048, 2048, 2048, 2048),
}
CONV_FREQ_DIM = 64  # sinusoidal timestep features of the conv and mlp routers (the DiT router: ddm.core.dit.FREQ_DIM)

_zeros = nnx.initializers.zeros_init()
_normal = nnx.initializers.normal(0.02)


def _check_router_args(image_shape: tuple[int, ...], num_clusters: int,
                       widths: tuple[int, ...] | None = None) -> tuple[int, int, int]:
    if len(image_shape) != 3 or min(image_shape) < 1:
        raise DDMError(f"image shape {tuple(image_shape)} must be (H, W, C) with positive sizes")
    if num_clusters < 1:
        raise DDMError(f"number of clusters {num_clusters} must be >= 1")
    if widths is not None and (not widths or min(widths) < 1):
        raise DDMError(f"router widths {widths} must be a non-empty list of positive sizes")
    return tuple(int(s) for s in image_shape)


def conv_widths(preset: str) -> tuple[int, ...]:
    """Channel widths of a conv router preset."""
    if preset not in ROUTER_PRESETS:
        raise DDMError(f"unknown router preset {preset!r} (known: {', '.join(ROUTER_PRESETS)})")
    return ROUTER_PRESETS[preset]


def mlp_widths(preset: str) -> tuple[int, ...]:
    """Hidden widths of an mlp router preset."""
    if preset not in MLP_PRESETS:
        raise DDMError(f"unknown router preset {preset!r} (known: {', '.join(MLP_PRESETS)})")
    return MLP_PRESETS[preset]


class ConvStage(nnx.Module):
    """conv3x3 (stride s) -> GroupNorm -> FiLM(c) -> SiLU: [B, H, W, Cin] -> [B, ceil(H/s), ceil(W/s), Cout]
    float32. FiLM (scale, shift) = Linear(c), zero-initialised so it starts as the identity."""

    def __init__(self, in_ch: int, out_ch: int, cond_dim: int, *, stride: int, dtype: jnp.dtype,
                 rngs: nnx.Rngs):
        self.conv = nnx.Conv(in_ch, out_ch, (3, 3), strides=stride, padding="SAME", dtype=dtype, rngs=rngs)
        self.norm = nnx.GroupNorm(out_ch, num_groups=math.gcd(8, out_ch), rngs=rngs)
        self.film = nnx.Linear(cond_dim, 2 * out_ch, dtype=dtype, kernel_init=_zeros, rngs=rngs)

    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        h = self.norm(self.conv(x).astype(jnp.float32))
        scale, shift = jnp.split(self.film(c).astype(jnp.float32)[:, None, None, :], 2, axis=-1)
        return jax.nn.silu(h * (1.0 + scale) + shift)


class _StagedRouter(nnx.Module):
    """The body the conv and MLP routers share: (x [B, H, W, C], t [B], y [B] | None) -> logits
    [B, num_clusters] float32 through a condition embedding c(t, y), FiLM-conditioned stages, a LayerNorm and a
    zero-initialised head (every cluster equally likely before training). Subclasses build the stages
    (`_stages`) and shape the input and the stages' output (`_inputs`, `_pool`)."""

    def __init__(self, *, image_shape: tuple[int, int, int], widths: tuple[int, ...], num_clusters: int,
                 num_classes: int = 0, condition_shape: tuple[int, ...] = (), dtype: jnp.dtype = jnp.float32,
                 rngs: nnx.Rngs):
        self.image_shape = _check_router_args(image_shape, num_clusters, widths)
        self.dtype = dtype
        cond_dim = widths[-1]
        self.cond = ConditionEmbedder(cond_dim, num_classes, condition_shape=condition_shape,
                                      freq_dim=CONV_FREQ_DIM, dtype=dtype, rngs=rngs)
        self.stages = nnx.List(self._stages(widths, cond_dim, dtype, rngs))
        self.norm = nnx.LayerNorm(widths[-1], rngs=rngs)
        self.head = nnx.Linear(widths[-1], num_clusters, kernel_init=_zeros, rngs=rngs)

    def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array | None = None) -> jax.Array:
        check_inputs(x, t, y, self.image_shape, self.cond.condition_shape)
        c = self.cond(t, y)
        h = self._inputs(x).astype(self.dtype)
        for stage in self.stages:
            h = stage(h.astype(self.dtype), c)
        return self.head(self.norm(self._pool(h))).astype(jnp.float32)


class ConvRouter(_StagedRouter):
    """Small conv net router: (x [B, H, W, C], t [B], y [B] | None) -> logits [B, num_clusters] float32."""

    def _stages(self, widths, cond_dim, dtype, rngs) -> list:
        chans = (self.image_shape[2],) + tuple(widths)
        return [ConvStage(chans[i], chans[i + 1], cond_dim, stride=1 if i == 0 else 2, dtype=dtype, rngs=rngs)
                for i in range(len(widths))]

    def _inputs(self, x: jax.Array) -> jax.Array:
        return x

    def _pool(self, h: jax.Array) -> jax.Array:
        return jnp.mean(h, axis=(1, 2))


class DenseStage(nnx.Module):
    """Linear -> LayerNorm -> FiLM(c) -> SiLU: [B, Din] -> [B, Dout] float32. FiLM (scale, shift) = Linear(c),
    zero-initialised so it starts as the identity."""

    def __init__(self, in_dim: int, out_dim: int, cond_dim: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.linear = nnx.Linear(in_dim, out_dim, dtype=dtype, rngs=rngs)
        self.norm = nnx.LayerNorm(out_dim, use_scale=False, use_bias=False, rngs=rngs)
        self.film = nnx.Linear(cond_dim, 2 * out_dim, dtype=dtype, kernel_init=_zeros, rngs=rngs)

    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        h = self.norm(self.linear(x).astype(jnp.float32))
        scale, shift = jnp.split(self.film(c).astype(jnp.float32), 2, axis=-1)
        return jax.nn.silu(h * (1.0 + scale) + shift)


class MLPRouter(_StagedRouter):
    """Dense router on the flattened image: (x [B, H, W, C], t [B], y [B] | None) -> logits [B, num_clusters]
    float32."""

    def _stages(self, widths, cond_dim, dtype, rngs) -> list:
        dims = (math.prod(self.image_shape),) + tuple(widths)
        return [DenseStage(dims[i], dims[i + 1], cond_dim, dtype=dtype, rngs=rngs) for i in range(len(widths))]

    def _inputs(self, x: jax.Array) -> jax.Array:
        return x.reshape(x.shape[0], -1)

    def _pool(self, h: jax.Array) -> jax.Array:
        return h


class DiTRouter(nnx.Module):
    """Transformer router (DiT blocks + CLS token): (x, t, y | None) -> logits [B, num_clusters] float32."""

    def __init__(self, *, image_shape: tuple[int, int, int], patch_size: int, depth: int, width: int,
                 heads: int, num_clusters: int, num_classes: int = 0, condition_shape: tuple[int, ...] = (),
                 dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
        self.image_shape = _check_router_args(image_shape, num_clusters)
        self.grid = check_image_shape(self.image_shape, patch_size)
        check_width(width, heads)
        self.width = width
        self.cond = ConditionEmbedder(width, num_classes, condition_shape=condition_shape, dtype=dtype, rngs=rngs)
        self.patch_embed = PatchEmbed(patch_size, self.image_shape[2], width, dtype=dtype, rngs=rngs)
        self.cls = nnx.Param(_normal(rngs.params(), (1, 1, width), jnp.float32))
        self.blocks = make_blocks(depth, width, heads, dtype=dtype, rngs=rngs)
        self.norm = nnx.LayerNorm(width, rngs=rngs)
        self.head = nnx.Linear(width, num_clusters, kernel_init=_zeros, rngs=rngs)

    def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array | None = None) -> jax.Array:
        check_inputs(x, t, y, self.image_shape, self.cond.condition_shape)
        c = self.cond(t, y)
        h = self.patch_embed(x).astype(jnp.float32) + sincos_pos_embed(*self.grid, self.width)
        cls = jnp.broadcast_to(self.cls[...], (x.shape[0], 1, self.width))
        h = jnp.concatenate([cls, h], axis=1)
        for block in self.blocks:
            h = block(h, c)
        return self.head(self.norm(h[:, 0])).astype(jnp.float32)


def router_condition_shape(router: RouterConfig, condition_shape: tuple[int, ...] | None) -> tuple[int, ...]:
    """The condition embedding shape the router of `router` takes for data of `condition_shape`: that shape, or
    () when `router.condition` is off (the router then ignores the embeddings)."""
    return check_condition_shape(condition_shape) if router.condition else ()


def router_from_config(router: RouterConfig, image_shape: tuple[int, int, int], num_clusters: int,
                       num_classes: int = 0, rngs: nnx.Rngs | None = None, dtype: jnp.dtype = jnp.float32,
                       condition_shape: tuple[int, ...] | None = ()) -> ConvRouter | MLPRouter | DiTRouter:
    """The router described by `router` for images (H, W, C) and K = `num_clusters` clusters.

    `num_classes > 0` adds a label input (null label `num_classes` when y is None); a non-empty
    `condition_shape` (the data's condition embeddings) an embedding input, unless `router.condition` is off
    (`router_condition_shape`). `rngs` defaults to `nnx.Rngs(0)` (handy under `nnx.eval_shape`); pass your own
    for training.
    """
    rngs = nnx.Rngs(0) if rngs is None else rngs
    conditions = {"num_classes": num_classes, "condition_shape": router_condition_shape(router, condition_shape)}
    if router.arch == "conv":
        return ConvRouter(image_shape=image_shape, widths=conv_widths(router.preset), num_clusters=num_clusters,
                          dtype=dtype, rngs=rngs, **conditions)
    if router.arch == "mlp":
        return MLPRouter(image_shape=image_shape, widths=mlp_widths(router.preset), num_clusters=num_clusters,
                         dtype=dtype, rngs=rngs, **conditions)
    if router.arch == "dit":
        depth, width, heads = preset_dims(router.preset)
        return DiTRouter(image_shape=image_shape, patch_size=router.patch_size, depth=depth, width=width,
                         heads=heads, num_clusters=num_clusters, dtype=dtype, rngs=rngs, **conditions)
    raise DDMError(f"unknown router arch {router.arch!r} (known: conv, mlp, dit)")


def router_flops_per_image(router: RouterConfig, image_shape: tuple[int, int, int], num_clusters: int,
                           condition_shape: tuple[int, ...] | None = ()) -> float:
    """Forward-pass FLOPs of one image (2 x multiply-accumulates of convs and matmuls; norms are not counted).

    conv: sum over stages of H_s W_s 9 Cin Cout + timestep MLP + FiLM (cond_dim 2 Cout per stage) + head.
    mlp:  sum over layers of Din Dout (Din = H W C for the first) + timestep MLP + FiLM + head.
    dit:  patch embed N p^2 C D + timestep MLP + blocks on N + 1 tokens (`ddm.core.dit.transformer_macs`) + head D K.
    A condition embedding the router takes (`router_condition_shape`) adds its projection E cond_dim.
    """
    h, w, c = _check_router_args(image_shape, num_clusters)
    shape = router_condition_shape(router, condition_shape)
    if router.arch == "conv":
        widths = conv_widths(router.preset)
        macs = condition_macs(widths[-1], CONV_FREQ_DIM, shape) + widths[-1] * num_clusters
        in_ch = c
        for i, out_ch in enumerate(widths):
            if i > 0:
                h, w = -(-h // 2), -(-w // 2)
            macs += h * w * 9 * in_ch * out_ch + widths[-1] * 2 * out_ch
            in_ch = out_ch
        return 2.0 * macs
    if router.arch == "mlp":
        widths = mlp_widths(router.preset)
        macs = condition_macs(widths[-1], CONV_FREQ_DIM, shape) + widths[-1] * num_clusters
        in_dim = h * w * c
        for out_dim in widths:
            macs += in_dim * out_dim + widths[-1] * 2 * out_dim
            in_dim = out_dim
        return 2.0 * macs
    if router.arch == "dit":
        depth, width, _ = preset_dims(router.preset)
        gh, gw = check_image_shape((h, w, c), router.patch_size)
        n = gh * gw
        macs = (n * router.patch_size**2 * c * width + condition_macs(width, condition_shape=shape)
                + transformer_macs(n + 1, depth, width) + width * num_clusters)
        return 2.0 * macs
    raise DDMError(f"unknown router arch {router.arch!r} (known: conv, mlp, dit)")
