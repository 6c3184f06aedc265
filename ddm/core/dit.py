"""Diffusion Transformer (DiT, Peebles & Xie 2023) in Flax NNX, used by every expert and the monolith.

    x [B,H,W,C] --patchify + linear--> tokens [B,N,D] + fixed 2-D sin-cos position embedding
    t [B] --sinusoidal(1000 t)--> MLP --+--> c [B,D] (conditioning vector)
    y [B] --embedding(num_classes+1)----+      (index num_classes is the "null" label for CFG)
    tokens --depth x adaLN-Zero block(c)--> final adaLN + linear --unpatchify--> v [B,H,W,C]

A model is conditioned on class labels (`num_classes > 0`), on per-image condition embeddings
(`condition_shape` non-empty; then y is float [B, *condition_shape]), or on nothing:

    pooled y [B, D]    --Linear(D -> D_model)--------------> added to c (adaLN), as the label embedding is
    tokens y [B, L, D] --mean over L, Linear(D -> D_model)--> added to c
                       --Linear(D -> D_model)--> context [B, L, D_model]: keys / values of a cross-attention
                         sub-layer in every block (queries from the image tokens)

The null condition is a row of y that is all NaN: the model replaces it (and every row when y is None) by a
learned null embedding before anything else sees it (`ConditionEmbedder.null_filled`), as the label table's
row `num_classes` is the null label.

adaLN-Zero: every block's modulation (shift, scale, gate for attention, cross-attention and MLP) is a linear
map of silu(c) initialised to zero, so each block starts as the identity; the final linear layer is zero too,
so a new model predicts v = 0 everywhere. The model is deterministic: condition dropout for classifier-free
guidance happens in the loss (`ddm.core.flow.drop_conditions`), not here.

Precision: parameters are float32. Matmuls run in the compute `dtype` (e.g. bfloat16); the residual stream,
layer norms and the attention softmax stay float32, and the output is float32.

The building blocks (`ConditionEmbedder`, `PatchEmbed`, `sincos_pos_embed`, `DiTBlock`) are shared with
the transformer router (`router.model.DiTRouter`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ddm.core.config import REMAT_MODES, ModelConfig
from ddm.core.errors import DDMError

# name -> (depth, width, heads). S/B/L/XL are the DiT paper's configurations.
DIT_PRESETS: dict[str, tuple[int, int, int]] = {
    "micro": (3, 64, 4),  # CPU-sized: the default digits run and fast tests
    "tiny": (4, 128, 4),
    "small": (6, 256, 4),
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
MLP_RATIO = 4
FREQ_DIM = 256  # sinusoidal features of the timestep fed to the timestep MLP
TIME_SCALE = 1000.0  # t in [0, 1] is scaled to the DiT paper's [0, 1000) range before the sinusoids

_xavier = nnx.initializers.xavier_uniform()
_zeros = nnx.initializers.zeros_init()
_normal = nnx.initializers.normal(0.02)


def compute_dtype(name: str) -> jnp.dtype:
    """`"float32"` / `"bfloat16"` (as in `ModelConfig.dtype`) -> the jnp dtype."""
    dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
    if name not in dtypes:
        raise DDMError(f"compute dtype {name!r} is not one of {', '.join(dtypes)}")
    return dtypes[name]


def check_image_shape(image_shape: tuple[int, int, int], patch_size: int) -> tuple[int, int]:
    """Validates (H, W, C) against the patch size; returns the token grid (H // p, W // p)."""
    if len(image_shape) != 3 or min(image_shape) < 1:
        raise DDMError(f"image shape {tuple(image_shape)} must be (H, W, C) with positive sizes")
    if patch_size < 1:
        raise DDMError(f"patch size {patch_size} must be positive")
    h, w, _ = image_shape
    if h % patch_size or w % patch_size:
        raise DDMError(f"image size {h}x{w} is not divisible by the patch size {patch_size}")
    return h // patch_size, w // patch_size


def check_condition_shape(shape) -> tuple[int, ...]:
    """`None` / () (no condition embedding), (D,) pooled or (L, D) tokens -> the shape as a tuple of ints."""
    shape = tuple(shape or ())
    if len(shape) > 2 or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1 for s in shape):
        raise DDMError(f"condition shape {shape} must be () (none), (D,) (pooled) or (L, D) (tokens) with "
                       "positive sizes")
    return tuple(int(s) for s in shape)


def check_width(width: int, heads: int) -> None:
    """The width must split evenly into heads, and into 4 for the 2-D sin-cos position embedding."""
    if width < 1 or heads < 1 or width % heads:
        raise DDMError(f"width {width} is not divisible by {heads} heads")
    if width % 4:
        raise DDMError(f"width {width} must be divisible by 4 (2-D sin-cos position embedding)")


# ---------------------------------------------------------------------------------------------------------
# Fixed embeddings (pure functions, no parameters).
# ---------------------------------------------------------------------------------------------------------


def timestep_features(t: jax.Array, dim: int = FREQ_DIM, max_period: float = 10_000.0) -> jax.Array:
    """Sinusoidal features of `TIME_SCALE * t`: t [B] float in [0, 1] -> [B, dim] float32 ([cos | sin])."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = (TIME_SCALE * t.astype(jnp.float32))[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def _sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10_000.0 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    args = positions.reshape(-1)[:, None] * omega[None, :]
    return np.concatenate([np.sin(args), np.cos(args)], axis=1)


@functools.lru_cache(maxsize=32)
def sincos_pos_embed(grid_h: int, grid_w: int, dim: int) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding (MAE/DiT): [grid_h * grid_w, dim] float32, row-major tokens.

    The first dim/2 channels encode the row, the last dim/2 the column. A numpy constant: not a parameter,
    not in checkpoints. The returned array is cached; do not modify it.
    """
    if dim % 4:
        raise DDMError(f"position embedding width {dim} must be divisible by 4")
    rows, cols = np.meshgrid(np.arange(grid_h, dtype=np.float64), np.arange(grid_w, dtype=np.float64),
                             indexing="ij")
    emb = np.concatenate([_sincos_1d(dim // 2, rows), _sincos_1d(dim // 2, cols)], axis=1)
    emb = emb.astype(np.float32)
    emb.flags.writeable = False
    return emb


def patchify(x: jax.Array, p: int) -> jax.Array:
    """[B, H, W, C] -> [B, (H/p)(W/p), p*p*C], tokens in row-major order, each patch flattened (p, p, C)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(tokens: jax.Array, p: int, image_shape: tuple[int, int, int]) -> jax.Array:
    """Inverse of `patchify`: [B, (H/p)(W/p), p*p*C] -> [B, H, W, C]."""
    h, w, c = image_shape
    b = tokens.shape[0]
    x = tokens.reshape(b, h // p, w // p, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, c)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """adaLN modulation x * (1 + scale) + shift; x [B, N, D], shift/scale [B, 1, D]."""
    return x * (1.0 + scale) + shift


# ---------------------------------------------------------------------------------------------------------
# Building blocks (shared with router.model.DiTRouter).
# ---------------------------------------------------------------------------------------------------------


class ConditionEmbedder(nnx.Module):
    """(t [B] float, y | None) -> conditioning vector c [B, width] in the compute dtype.

    c = MLP(sinusoidal(t)), plus at most one of:
    - `num_classes > 0`: the label embedding of y [B] int. The table has `num_classes + 1` rows; row
      `num_classes` is the null label, used when `y` is None.
    - `condition_shape` (D,) or (L, D): Linear(D -> width) of y [B, D] float, or of y [B, L, D] float averaged
      over its L tokens. Rows of y that are all NaN, and every row when `y` is None, are the null condition:
      a learned embedding of `condition_shape` replaces them (`null_filled`).
    """

    def __init__(self, width: int, num_classes: int = 0, *, condition_shape: tuple[int, ...] = (),
                 freq_dim: int = FREQ_DIM, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
        if num_classes < 0:
            raise DDMError(f"num_classes={num_classes} must be >= 0")
        condition_shape = check_condition_shape(condition_shape)
        if num_classes and condition_shape:
            raise DDMError(f"a model is conditioned on class labels (num_classes={num_classes}) or on condition "
                           f"embeddings (condition_shape={condition_shape}), not both")
        self.freq_dim = freq_dim
        self.num_classes = num_classes
        self.condition_shape = condition_shape
        self.time_in = nnx.Linear(freq_dim, width, dtype=dtype, kernel_init=_normal, rngs=rngs)
        self.time_out = nnx.Linear(width, width, dtype=dtype, kernel_init=_normal, rngs=rngs)
        self.labels = (nnx.Embed(num_classes + 1, width, dtype=dtype, embedding_init=_normal, rngs=rngs)
                       if num_classes > 0 else None)
        # The null embedding starts small, like the label table's rows: near the zero vector, not a random caption.
        self.null = nnx.Param(_normal(rngs.params(), condition_shape, jnp.float32)) if condition_shape else None
        self.condition = (nnx.Linear(condition_shape[-1], width, dtype=dtype, kernel_init=_normal, rngs=rngs)
                          if condition_shape else None)

    def null_filled(self, y: jax.Array | None, batch: int) -> jax.Array:
        """Condition embeddings y [batch, *condition_shape] float (or None) -> float32 [batch, *condition_shape]
        with no NaN: rows that are all NaN (every row when y is None) become the learned null embedding.

        NaN entries of other rows (never in loaded data, which refuses NaN) become 0, so no NaN reaches the
        output or a gradient: `jnp.where` picks from NaN-free operands. Idempotent.
        """
        null = self.null[...]
        if y is None:
            return jnp.broadcast_to(null, (batch, *self.condition_shape))
        y = y.astype(jnp.float32)
        nan = jnp.isnan(y)
        is_null = jnp.all(nan.reshape(batch, -1), axis=1).reshape(batch, *(1,) * len(self.condition_shape))
        return jnp.where(is_null, null, jnp.where(nan, 0.0, y))

    def __call__(self, t: jax.Array, y: jax.Array | None = None) -> jax.Array:
        c = self.time_out(jax.nn.silu(self.time_in(timestep_features(t, self.freq_dim))))
        if self.labels is not None:
            if y is None:
                y = jnp.full(t.shape, self.num_classes, jnp.int32)
            return c + self.labels(y)
        if self.condition is not None:
            y = self.null_filled(y, t.shape[0])
            return c + self.condition(y if y.ndim == 2 else jnp.mean(y, axis=1))
        if y is not None:
            raise DDMError("labels given to an unconditional model (num_classes=0)")
        return c


class PatchEmbed(nnx.Module):
    """[B, H, W, C] -> [B, N, width]: non-overlapping p x p patches, flattened, one linear map (a strided
    conv in the DiT paper; same parameters and FLOPs)."""

    def __init__(self, patch_size: int, channels: int, width: int, *, dtype: jnp.dtype = jnp.float32,
                 rngs: nnx.Rngs):
        self.patch_size = patch_size
        self.proj = nnx.Linear(patch_size * patch_size * channels, width, dtype=dtype, kernel_init=_xavier,
                               rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.proj(patchify(x, self.patch_size))


def apply_tokens(layer: nnx.Linear, x: jax.Array) -> jax.Array:
    """A dense layer on tokens x: [B, N, D_in] -> [B, N, D_out], applied to the [B*N, D_in] view.

    Same math as `layer(x)`, but XLA:CPU lowers the 2-D matmul's weight gradient to its fast GEMM path instead
    of transposed copies of the activations (27% faster training steps for micro, 8% for small; see
    docs/benchmarks.md, "JAX vs PyTorch training step").
    """
    return layer(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)


def reference_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Plain softmax attention, the definition `jax.nn.dot_product_attention` must agree with (tests).

    q, k, v: [B, N, heads, head_dim] in the compute dtype -> [B, N, heads, head_dim] in that dtype; logits and
    softmax in float32.
    """
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    weights = jax.nn.softmax(logits / math.sqrt(q.shape[-1]), axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


class Attention(nnx.Module):
    """Multi-head self-attention, [B, N, D] -> [B, N, D], through `jax.nn.dot_product_attention`: cuDNN flash
    attention on GPUs that have it, XLA elsewhere; logits and softmax in float32 either way."""

    def __init__(self, width: int, heads: int, *, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
        self.heads = heads
        self.dtype = dtype
        self.qkv = nnx.Linear(width, 3 * width, dtype=dtype, kernel_init=_xavier, rngs=rngs)
        self.proj = nnx.Linear(width, width, dtype=dtype, kernel_init=_xavier, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, d = x.shape
        head_dim = d // self.heads
        q, k, v = jnp.split(apply_tokens(self.qkv, x).reshape(b, n, 3, self.heads, head_dim), 3, axis=2)
        q, k, v = (a[:, :, 0].astype(self.dtype) for a in (q, k, v))  # [B, N, heads, head_dim]
        out = jax.nn.dot_product_attention(q, k, v)
        return apply_tokens(self.proj, out.reshape(b, n, d))


class CrossAttention(nnx.Module):
    """Multi-head cross-attention: queries from x [B, N, D], keys and values from context [B, L, D] (both in the
    compute dtype) -> [B, N, D]; through `jax.nn.dot_product_attention` as `Attention`."""

    def __init__(self, width: int, heads: int, *, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
        self.heads = heads
        self.dtype = dtype
        self.q = nnx.Linear(width, width, dtype=dtype, kernel_init=_xavier, rngs=rngs)
        self.kv = nnx.Linear(width, 2 * width, dtype=dtype, kernel_init=_xavier, rngs=rngs)
        self.proj = nnx.Linear(width, width, dtype=dtype, kernel_init=_xavier, rngs=rngs)

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        b, n, d = x.shape
        head_dim = d // self.heads
        q = apply_tokens(self.q, x).reshape(b, n, self.heads, head_dim).astype(self.dtype)
        k, v = jnp.split(apply_tokens(self.kv, context).reshape(b, context.shape[1], 2, self.heads, head_dim), 2,
                         axis=2)
        out = jax.nn.dot_product_attention(q, k[:, :, 0].astype(self.dtype), v[:, :, 0].astype(self.dtype))
        return apply_tokens(self.proj, out.reshape(b, n, d))


class DiTBlock(nnx.Module):
    """adaLN-Zero transformer block: x [B, N, D] float32, c [B, D] (, context [B, L, D]) -> x [B, N, D] float32.

    Modulation (shift, scale, gate) x (attention, MLP) = Linear(silu(c)) initialised to zero: identity at init.
    `cross_attention`: a cross-attention sub-layer on `context` between the two, with its own zero-initialised
    (shift, scale, gate), so the block still starts as the identity.
    """

    def __init__(self, width: int, heads: int, *, mlp_ratio: int = MLP_RATIO, dtype: jnp.dtype = jnp.float32,
                 cross_attention: bool = False, rngs: nnx.Rngs):
        self.dtype = dtype
        self.norm1 = nnx.LayerNorm(width, epsilon=1e-6, use_scale=False, use_bias=False, rngs=rngs)
        self.attn = Attention(width, heads, dtype=dtype, rngs=rngs)
        self.norm2 = nnx.LayerNorm(width, epsilon=1e-6, use_scale=False, use_bias=False, rngs=rngs)
        self.mlp_in = nnx.Linear(width, mlp_ratio * width, dtype=dtype, kernel_init=_xavier, rngs=rngs)
        self.mlp_out = nnx.Linear(mlp_ratio * width, width, dtype=dtype, kernel_init=_xavier, rngs=rngs)
        self.modulation = nnx.Linear(width, 6 * width, dtype=dtype, kernel_init=_zeros, rngs=rngs)
        self.cross_norm = (nnx.LayerNorm(width, epsilon=1e-6, use_scale=False, use_bias=False, rngs=rngs)
                           if cross_attention else None)
        self.cross = CrossAttention(width, heads, dtype=dtype, rngs=rngs) if cross_attention else None
        self.cross_modulation = (nnx.Linear(width, 3 * width, dtype=dtype, kernel_init=_zeros, rngs=rngs)
                                 if cross_attention else None)

    def __call__(self, x: jax.Array, c: jax.Array, context: jax.Array | None = None) -> jax.Array:
        mod = self.modulation(jax.nn.silu(c)).astype(jnp.float32)[:, None, :]
        shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(mod, 6, axis=-1)
        h = modulate(self.norm1(x), shift1, scale1).astype(self.dtype)
        x = x + gate1 * self.attn(h).astype(jnp.float32)
        if self.cross is not None:
            if context is None:
                raise DDMError("a cross-attention block needs the condition tokens (context)")
            shift, scale, gate = jnp.split(self.cross_modulation(jax.nn.silu(c)).astype(jnp.float32)[:, None, :], 3,
                                           axis=-1)
            h = modulate(self.cross_norm(x), shift, scale).astype(self.dtype)
            x = x + gate * self.cross(h, context).astype(jnp.float32)
        h = modulate(self.norm2(x), shift2, scale2).astype(self.dtype)
        h = apply_tokens(self.mlp_out, jax.nn.gelu(apply_tokens(self.mlp_in, h), approximate=True))
        return x + gate2 * h.astype(jnp.float32)


def make_blocks(depth: int, width: int, heads: int, *, dtype: jnp.dtype, rngs: nnx.Rngs,
                cross_attention: bool = False) -> nnx.List:
    """`depth` adaLN-Zero blocks (with a cross-attention sub-layer each when `cross_attention`)."""
    return nnx.List([DiTBlock(width, heads, dtype=dtype, cross_attention=cross_attention, rngs=rngs)
                     for _ in range(depth)])


class FinalLayer(nnx.Module):
    """adaLN (shift, scale) + linear to patch pixels, both zero-initialised: [B, N, D] -> [B, N, out_dim]."""

    def __init__(self, width: int, out_dim: int, *, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
        self.dtype = dtype
        self.norm = nnx.LayerNorm(width, epsilon=1e-6, use_scale=False, use_bias=False, rngs=rngs)
        self.modulation = nnx.Linear(width, 2 * width, dtype=dtype, kernel_init=_zeros, rngs=rngs)
        self.linear = nnx.Linear(width, out_dim, dtype=dtype, kernel_init=_zeros, rngs=rngs)

    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        shift, scale = jnp.split(self.modulation(jax.nn.silu(c)).astype(jnp.float32)[:, None, :], 2, axis=-1)
        return self.linear(modulate(self.norm(x), shift, scale).astype(self.dtype))


# ---------------------------------------------------------------------------------------------------------
# The model.
# ---------------------------------------------------------------------------------------------------------


class DiT(nnx.Module):
    """Velocity model v(x_t, t, y) for flow matching (see `ddm.core.flow` for the time convention).

    `image_shape` is (H, W, C); H and W must be divisible by `patch_size`. `num_classes > 0` adds a label
    embedding with a null row (index `num_classes`); `y=None` then means "unconditional" (null label).
    `condition_shape` (D,) or (L, D) (exclusive with classes) conditions on float embeddings y [B,
    *condition_shape] instead (module docstring); all-NaN rows and `y=None` are the learned null condition.
    """

    def __init__(self, *, image_shape: tuple[int, int, int], patch_size: int, depth: int, width: int,
                 heads: int, num_classes: int = 0, condition_shape: tuple[int, ...] = (),
                 dtype: jnp.dtype = jnp.float32, remat: str = "none", rngs: nnx.Rngs):
        self.grid = check_image_shape(image_shape, patch_size)
        check_width(width, heads)
        if depth < 1:
            raise DDMError(f"depth {depth} must be >= 1")
        self.image_shape = tuple(int(s) for s in image_shape)
        self.patch_size = patch_size
        self.width = width
        self.num_classes = num_classes
        if remat not in REMAT_MODES:
            raise DDMError(f"remat {remat!r} is not one of {', '.join(REMAT_MODES)}")
        self.remat = remat
        channels = self.image_shape[2]
        self.cond = ConditionEmbedder(width, num_classes, condition_shape=condition_shape, dtype=dtype, rngs=rngs)
        self.condition_shape = self.cond.condition_shape
        tokens = len(self.condition_shape) == 2
        self.patch_embed = PatchEmbed(patch_size, channels, width, dtype=dtype, rngs=rngs)
        self.blocks = make_blocks(depth, width, heads, dtype=dtype, rngs=rngs, cross_attention=tokens)
        self.final = FinalLayer(width, patch_size * patch_size * channels, dtype=dtype, rngs=rngs)
        # The condition tokens in the model's width: the cross-attention's keys and values in every block.
        self.context = (nnx.Linear(self.condition_shape[-1], width, dtype=dtype, kernel_init=_xavier, rngs=rngs)
                        if tokens else None)

    def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array | None = None) -> jax.Array:
        """x [B, H, W, C] float, t [B] float in [0, 1], y (int32 [B] labels, float [B, *condition_shape]
        embeddings, or None) -> velocity [B, H, W, C] float32."""
        check_inputs(x, t, y, self.image_shape, self.condition_shape)
        context = None
        if self.context is not None:
            y = self.cond.null_filled(y, x.shape[0])
            context = apply_tokens(self.context, y)
        c = self.cond(t, y)
        h = self.patch_embed(x).astype(jnp.float32) + sincos_pos_embed(*self.grid, self.width)
        for block in self.blocks:
            h = _apply_block(block, h, c, context) if self.remat == "none" else _remat_block(block, h, c, context)
        out = self.final(h, c)
        return unpatchify(out, self.patch_size, self.image_shape).astype(jnp.float32)


def _apply_block(block: DiTBlock, h: jax.Array, c: jax.Array, context: jax.Array | None = None) -> jax.Array:
    return block(h, c, context)


# remat="block": a block's activations are recomputed in the backward pass instead of stored, so activation
# memory is one block's worth plus the residual stream per block (~1/3 more compute for much less memory).
_remat_block = nnx.remat(_apply_block)


def check_inputs(x: jax.Array, t: jax.Array, y: jax.Array | None, image_shape: tuple[int, ...],
                 condition_shape: tuple[int, ...] = ()) -> None:
    """Static shape checks shared by the DiT and the routers (run at trace time). y: labels [B], or float
    condition embeddings [B, *condition_shape] for a model conditioned on those."""
    if x.ndim != 4 or tuple(x.shape[1:]) != tuple(image_shape):
        raise DDMError(f"input shape {tuple(x.shape)} does not match [B, {', '.join(map(str, image_shape))}]")
    if t.shape != x.shape[:1]:
        raise DDMError(f"t shape {tuple(t.shape)} must be [B] = [{x.shape[0]}]")
    if y is None:
        return
    if not condition_shape:
        if y.shape != x.shape[:1]:
            raise DDMError(f"y shape {tuple(y.shape)} must be [B] = [{x.shape[0]}]")
        return
    expected = (x.shape[0], *condition_shape)
    if tuple(y.shape) != expected:
        raise DDMError(f"condition shape {tuple(y.shape)} must be [B, {', '.join(map(str, condition_shape))}] = "
                       f"{list(expected)}")
    if not jnp.issubdtype(y.dtype, jnp.floating):
        raise DDMError(f"condition embeddings must be float, got {y.dtype}")


def preset_dims(preset: str) -> tuple[int, int, int]:
    """(depth, width, heads) of a DiT preset."""
    if preset not in DIT_PRESETS:
        raise DDMError(f"unknown DiT preset {preset!r} (known: {', '.join(DIT_PRESETS)})")
    return DIT_PRESETS[preset]


def dit_from_config(model: ModelConfig, image_shape: tuple[int, int, int], rngs: nnx.Rngs) -> DiT:
    """The DiT described by a `ModelConfig` for images of `image_shape` (H, W, C).

    `num_classes=None` / `condition_shape=None` (not yet resolved against a dataset) build a model without
    that conditioning.
    """
    depth, width, heads = preset_dims(model.preset)
    return DiT(image_shape=tuple(image_shape), patch_size=model.patch_size, depth=depth, width=width,
               heads=heads, num_classes=model.num_classes or 0, condition_shape=model.condition_shape or (),
               dtype=compute_dtype(model.dtype), remat=model.remat, rngs=rngs)


# ---------------------------------------------------------------------------------------------------------
# Parameter and FLOP counting.
# ---------------------------------------------------------------------------------------------------------


def count_params(module: nnx.Module) -> int:
    """Number of scalars in the module's `nnx.Param`s; works on real and on abstract (eval_shape) modules."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(nnx.state(module, nnx.Param)))


def abstract_dit(model: ModelConfig, image_shape: tuple[int, int, int]) -> DiT:
    """The DiT of `model` with `jax.ShapeDtypeStruct` leaves (nothing allocated), via `nnx.eval_shape`."""
    return nnx.eval_shape(lambda: dit_from_config(model, image_shape, nnx.Rngs(0)))


def count_dit_params(model: ModelConfig, image_shape: tuple[int, int, int]) -> int:
    """Parameter count of the DiT of `model`, computed abstractly (XL costs no memory)."""
    return count_params(abstract_dit(model, image_shape))


def transformer_macs(num_tokens: int, depth: int, width: int, mlp_ratio: int = MLP_RATIO) -> int:
    """Multiply-accumulates of `depth` adaLN-Zero blocks on `num_tokens` tokens of `width` (one image).

    Per block: qkv 3 N D^2 + attention logits N^2 D + attention-weighted values N^2 D + output projection
    N D^2 + MLP 2 r N D^2 + adaLN modulation 6 D^2 (once per image, not per token).
    """
    n, d = num_tokens, width
    per_block = (4 + 2 * mlp_ratio) * n * d * d + 2 * n * n * d + 6 * d * d
    return depth * per_block


def condition_macs(width: int, freq_dim: int = FREQ_DIM, condition_shape: tuple[int, ...] = ()) -> int:
    """Multiply-accumulates of the timestep MLP, plus the projection E D of a condition embedding of width E
    (`condition_shape` (E,) or (L, E): tokens are averaged first). The label embedding is a lookup: free."""
    return freq_dim * width + width * width + (condition_shape[-1] * width if condition_shape else 0)


def cross_attention_macs(num_tokens: int, context_tokens: int, width: int) -> int:
    """Multiply-accumulates of one block's cross-attention sub-layer, N image tokens on L condition tokens:
    queries N D^2 + keys and values 2 L D^2 + logits N L D + weighted values N L D + output projection N D^2
    + its adaLN modulation 3 D^2 (once per image)."""
    n, m, d = num_tokens, context_tokens, width
    return 2 * n * d * d + 2 * m * d * d + 2 * n * m * d + 3 * d * d


def dit_flops(image_shape: tuple[int, int, int], patch_size: int, depth: int, width: int,
              condition_shape: tuple[int, ...] = ()) -> float:
    """Forward-pass FLOPs of one image through a DiT of these dimensions, 2 x multiply-accumulates of every
    matmul:

        patch embed N (p^2 C) D + timestep MLP (256 D + D^2) + depth x transformer block (see
        `transformer_macs`) + final layer (2 D^2 + N D p^2 C), with N = HW / p^2 tokens;
        condition embeddings of `condition_shape` (E,) add their projection E D; tokens (L, E) add E D (the
        pooled projection), L E D (the context projection) and depth x `cross_attention_macs`.

    Norms, softmax, activations and adds are not counted (they are O(N D), a few percent at most). The DiT
    paper's "Gflops" count multiply-adds, i.e. half of this: DiT-XL/2 at 32x32x4 is 118.6 there, ~237e9 here.
    """
    gh, gw = check_image_shape(tuple(image_shape), patch_size)
    condition_shape = check_condition_shape(condition_shape)
    n, patch_dim = gh * gw, patch_size**2 * image_shape[2]
    macs = (n * patch_dim * width + condition_macs(width, condition_shape=condition_shape)
            + transformer_macs(n, depth, width) + 2 * width * width + n * width * patch_dim)
    if len(condition_shape) == 2:
        tokens, dim = condition_shape
        macs += tokens * dim * width + depth * cross_attention_macs(n, tokens, width)
    return 2.0 * macs


def dit_flops_per_image(model: ModelConfig, image_shape: tuple[int, int, int]) -> float:
    """Forward-pass FLOPs of one image through the DiT of `model` (see `dit_flops` for the formula)."""
    depth, width, _ = preset_dims(model.preset)
    return dit_flops(image_shape, model.patch_size, depth, width, model.condition_shape or ())
