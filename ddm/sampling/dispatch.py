"""Routed dispatch on the device: sum_k w[:, k] * v_k(x) computed without a host round-trip.

Pure, jit-able functions used by `ddm.sampling.ensemble.Ensemble`. The experts share one `expert_apply(params, x,
t, y)`; their parameters are *stacked*: one pytree whose leaves carry a leading expert axis [S, ...] over the S
available experts (`stack_params`), so one traced expert function serves every expert, selected by a traced
index, and the stack can be sharded over an `expert` mesh axis.

Dispatches (`DISPATCHES`; `Ensemble(dispatch=...)` picks one, "auto" the backend's best):
- "unrolled" (CPU default): every expert gets its own code with its own parameters (a static loop over the
  experts), and runs its selected rows in chunks of a static size (a `lax.fori_loop` whose trip count is
  computed on the device: zero for an expert nobody selected). XLA:CPU copies a dynamically indexed slice of a
  stacked weight far more slowly than the matmul that reads it takes (docs/design.md, "Routed sampling"), so
  on CPU no parameter is ever sliced out of a stack. Costs one expert trace per expert in the program.
- "grouped" (GPU/TPU default): the experts' parameters stacked, one loop over the experts with the parameters
  indexed on the device, and one bucket per expert whose static size is chosen on the device (`lax.switch`
  over the bucket sizes: powers of two from a floor, capped at the batch, `bucket_sizes`). One expert trace
  per bucket size, whatever K; the indexing costs a copy of each selected expert's weights per evaluation,
  cheap at accelerator bandwidth.
- "capacity": all experts at once (`jax.vmap` over the stack) on fixed-capacity buckets, MoE-style; rows beyond
  an expert's capacity are not dropped but taken in further rounds (a `lax.while_loop`), so the result is exact.
  One batched call per round instead of one call per expert, and no parameter slicing: the stack can be
  sharded over an `expert` mesh axis, each device running its own experts.

Exactness: every dispatch computes each (sample, expert) velocity with non-zero weight exactly once and adds
w * v into the sample's row; padded rows point at index B (out of range) and are dropped. Rows are added per
expert in ascending expert order ("unrolled", "grouped") or summed over the expert axis in a fixed order
("capacity"), never through a scatter with repeated indices, so results are deterministic on every backend
(GPU scatter-adds with duplicate indices are not).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ddm.core.errors import DDMError
from ddm.core.flow import null_like

DISPATCHES = ("auto", "unrolled", "grouped", "capacity")

ExpertApply = Callable[[Any, jax.Array, jax.Array, jax.Array | None], jax.Array]


def stack_params(params: Sequence[Any], sharding: jax.sharding.Sharding | None = None) -> Any:
    """Stacks S param trees of one structure into one tree with leaves [S, ...].

    sharding: where the stack lives, e.g. `NamedSharding(mesh, P("expert"))` to put expert s on device s of an
    `expert` mesh axis (S must be divisible by the axis size); None keeps jax's default placement.
    """
    params = list(params)
    if not params:
        raise DDMError("stack_params needs at least one param tree")
    structures = {jax.tree.structure(p) for p in params}
    if len(structures) > 1:
        raise DDMError("the experts' parameter trees differ in structure; they must share one architecture")
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *params)
    return stacked if sharding is None else jax.device_put(stacked, sharding)


def take_expert(stacked: Any, s: jax.Array | int) -> Any:
    """The param tree of stacked expert s (traced or static index)."""
    return jax.tree.map(lambda leaf: jax.lax.dynamic_index_in_dim(leaf, s, keepdims=False), stacked)


def bucket_floor(batch: int, experts: int, min_bucket: int) -> int:
    """The smallest bucket (and the "unrolled" chunk) for a batch of `batch` over `experts` available experts:
    `min_bucket`, but never more than batch / experts, the mean selection of top-1 (so small batches are not
    padded up to `min_bucket` rows per expert)."""
    return max(1, min(min_bucket, batch // experts))


def bucket_size(count: int, batch: int, floor: int) -> int:
    """The static bucket for `count` selected rows of a batch of `batch`: next power of two >= max(count,
    floor), capped at `batch` (so a bucket never exceeds the batch, and a full selection costs no padding)."""
    if count >= batch:
        return batch
    return min(batch, max(floor, 1 << (count - 1).bit_length()))


def bucket_sizes(batch: int, floor: int) -> tuple[int, ...]:
    """Every bucket `bucket_size` can return for counts 1..batch, ascending."""
    return tuple(sorted({bucket_size(c, batch, floor) for c in range(1, batch + 1)}))


def expert_velocity(expert_apply: ExpertApply, params: Any, x: jax.Array, t: jax.Array, y: jax.Array | None,
                    cfg_scale: jax.Array, *, cfg: bool, null_label: int) -> jax.Array:
    """One expert's velocity on rows x [b, H, W, C] f32, t [b], y [b] int32 | None -> [b, H, W, C] f32.

    cfg (static): classifier-free guidance, v = v_uncond + cfg_scale * (v_cond - v_uncond), both halves in one
    expert call (the null condition is `ddm.core.flow.null_like(y, null_label)`). cfg_scale: f32 scalar, or one
    per row [b] (merged requests of different scales, `Ensemble.sample_rows`).
    """
    if not cfg:
        return expert_apply(params, x, t, y).astype(jnp.float32)
    n = x.shape[0]
    v2 = expert_apply(params, jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                      jnp.concatenate([y, null_like(y, null_label)])).astype(jnp.float32)
    v_cond, v_uncond = v2[:n], v2[n:]
    if jnp.ndim(cfg_scale):
        cfg_scale = _broadcast_rows(cfg_scale, v_cond)
    return v_uncond + cfg_scale * (v_cond - v_uncond)


def _gather_rows(idx: jax.Array, x: jax.Array, t: jax.Array, y: jax.Array | None):
    """Rows idx [b] of x, t, y; index B (padding) reads the last row (clipped), whose result is dropped."""
    return (x.at[idx].get(mode="clip"), t.at[idx].get(mode="clip"),
            None if y is None else y.at[idx].get(mode="clip"))


def _scale_rows(cfg_scale: jax.Array, idx: jax.Array) -> jax.Array:
    """A per-row CFG scale [B] at rows idx (clipped as `_gather_rows` clips); a scalar as it is."""
    return cfg_scale.at[idx].get(mode="clip") if jnp.ndim(cfg_scale) else cfg_scale


def _broadcast_rows(w: jax.Array, like: jax.Array) -> jax.Array:
    """w [b] -> [b, 1, ..., 1] against like [b, ...]."""
    return w.reshape(w.shape + (1,) * (like.ndim - w.ndim))


def _selection(weights: jax.Array, present: tuple[int, ...]) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(cols [B, S] weights of the available experts, counts [S] int32 selected rows per expert, order [B, S]
    int32: each expert's selected rows first, ascending, then the others)."""
    cols = weights[:, np.asarray(present)]
    selected = cols > 0
    counts = selected.sum(0, dtype=jnp.int32)
    order = jnp.argsort(jnp.where(selected, 0, 1), axis=0, stable=True).astype(jnp.int32)
    return cols, counts, order


def dense(expert_apply: ExpertApply, experts: Sequence[Any] | Any, present: tuple[int, ...], x: jax.Array,
          t: jax.Array, y: jax.Array | None, weights: jax.Array, cfg_scale: jax.Array, *, cfg: bool,
          null_label: int, slots: tuple[int, ...]):
    """Experts `slots` (indices into `experts`: S param trees, or their stack) on every row: the `full` and
    `single` strategies, whose selection is known without looking, and the full-posterior steps of `S+full:T`.
    Returns (v [B, ...] f32, real rows, padded rows); experts are added in ascending order, each with its own
    code (unrolled) so that its parameters are read in place."""
    acc = jnp.zeros(x.shape, jnp.float32)
    for s in slots:
        params = experts[s] if isinstance(experts, (list, tuple)) else take_expert(experts, s)
        v = expert_velocity(expert_apply, params, x, t, y, cfg_scale, cfg=cfg, null_label=null_label)
        acc = acc + _broadcast_rows(weights[:, present[s]], v) * v
    rows = jnp.int32(x.shape[0] * len(slots))
    return acc, rows, rows


def unrolled(expert_apply: ExpertApply, experts: Sequence[Any], present: tuple[int, ...], x: jax.Array,
             t: jax.Array, y: jax.Array | None, weights: jax.Array, cfg_scale: jax.Array, *, cfg: bool,
             null_label: int, chunk: int):
    """Each expert on its selected rows only, in chunks of `chunk` rows (see the module docstring).

    experts: S param trees (the available experts, in `present` order), each given its own code, so no
    parameter is ever sliced out of a stack (XLA:CPU copies a dynamically sliced weight slowly, slower than
    the expert itself for large models). weights [B, K] f32, zero = not selected. Returns (v [B, ...] f32, real
    rows, padded rows) int32.
    """
    batch = x.shape[0]
    cols, counts, order = _selection(weights, present)
    slots = jnp.arange(chunk, dtype=jnp.int32)
    acc = jnp.zeros(x.shape, jnp.float32)
    for s, params in enumerate(experts):

        def body(c, acc, s=s, params=params):
            position = c * chunk + slots
            idx = jnp.where(position < counts[s], order[:, s].at[position].get(mode="clip"), batch)
            xb, tb, yb = _gather_rows(idx, x, t, y)
            v = expert_velocity(expert_apply, params, xb, tb, yb, _scale_rows(cfg_scale, idx), cfg=cfg,
                                null_label=null_label)
            w = cols[:, s].at[idx].get(mode="clip")
            return acc.at[idx].add(_broadcast_rows(w, v) * v, mode="drop")

        acc = jax.lax.fori_loop(0, (counts[s] + chunk - 1) // chunk, body, acc)  # a while loop: 0 if unselected
    padded = ((counts + chunk - 1) // chunk).sum(dtype=jnp.int32) * chunk
    return acc, counts.sum(dtype=jnp.int32), padded


def grouped(expert_apply: ExpertApply, stacked: Any, present: tuple[int, ...], x: jax.Array, t: jax.Array,
            y: jax.Array | None, weights: jax.Array, cfg_scale: jax.Array, *, cfg: bool, null_label: int,
            buckets: tuple[int, ...]):
    """Each expert on its selected rows only, one bucket per expert (see the module docstring).

    weights [B, K] f32 (zero = not selected); present: the K-indices of the S stacked experts; buckets: the
    static bucket sizes, ascending, the last one B. Returns (v [B, ...] f32, real rows, padded rows) int32.
    """
    batch = x.shape[0]
    cols, counts, order = _selection(weights, present)
    sizes = jnp.asarray(buckets, jnp.int32)
    # Branch 0 skips an expert with no selected row; branch j >= 1 runs bucket j - 1 (the first one >= count).
    branch = jnp.where(counts > 0, 1 + jnp.searchsorted(sizes, counts, side="left"), 0).astype(jnp.int32)

    def body(s, acc):
        count, rows, w_col = counts[s], order[:, s], cols[:, s]

        def run(size):
            def branch_fn(acc):
                params = take_expert(stacked, s)  # inside the branch: an unselected expert is never read
                idx = jnp.where(jnp.arange(size) < count, rows[:size], batch)
                xb, tb, yb = _gather_rows(idx, x, t, y)
                v = expert_velocity(expert_apply, params, xb, tb, yb, _scale_rows(cfg_scale, idx), cfg=cfg,
                                    null_label=null_label)
                w = w_col.at[idx].get(mode="clip")
                return acc.at[idx].add(_broadcast_rows(w, v) * v, mode="drop")
            return branch_fn

        return jax.lax.switch(branch[s], [lambda acc: acc] + [run(b) for b in buckets], acc)

    acc = jax.lax.fori_loop(0, len(present), body, jnp.zeros(x.shape, jnp.float32))
    padded = jnp.where(counts > 0, sizes[jnp.maximum(branch - 1, 0)], 0).sum(dtype=jnp.int32)
    return acc, counts.sum(dtype=jnp.int32), padded


def capacity_for(batch: int, experts: int, per_sample: int) -> int:
    """The static per-expert capacity of the "capacity" dispatch: the mean rows per expert when every sample
    selects `per_sample` experts, rounded up to a power of two, capped at the batch."""
    mean = math.ceil(batch * min(per_sample, experts) / experts)
    return min(batch, 1 << (mean - 1).bit_length())


def capacity(expert_apply: ExpertApply, stacked: Any, present: tuple[int, ...], x: jax.Array, t: jax.Array,
             y: jax.Array | None, weights: jax.Array, cfg_scale: jax.Array, *, cfg: bool, null_label: int,
             size: int):
    """All experts at once on buckets of `size` rows each (vmapped over the stack), in as many rounds as the
    most-selected expert needs (exact: no row is dropped). Returns (v [B, ...] f32, real rows, padded rows)."""
    batch = x.shape[0]
    num = len(present)
    cols, counts, order = _selection(weights, present)
    rounds = (jnp.max(counts) + size - 1) // size
    slots = jnp.arange(size, dtype=jnp.int32)
    run = jax.vmap(
        lambda p, xb, tb, yb, sb: expert_velocity(expert_apply, p, xb, tb, yb, sb, cfg=cfg, null_label=null_label),
        in_axes=(0, 0, 0, None if y is None else 0, 0 if jnp.ndim(cfg_scale) else None),
    )

    def body(state):
        r, acc = state
        position = r * size + slots  # [size]
        live = position[None, :] < counts[:, None]  # [S, size]
        idx = jnp.where(live, order.T.at[:, position].get(mode="clip"), batch)  # [S, size]
        xb, tb, yb = _gather_rows(idx, x, t, y)
        v = run(stacked, xb, tb, yb, _scale_rows(cfg_scale, idx))  # [S, size, ...]
        w = jnp.take_along_axis(cols.T, jnp.minimum(idx, batch - 1), axis=1) * live  # [S, size]
        contrib = _broadcast_rows(w, v) * v
        # Each expert's rows are distinct: scatter per expert into its own plane, then sum planes in order.
        planes = jax.vmap(lambda i, c: jnp.zeros(x.shape, jnp.float32).at[i].add(c, mode="drop"))(idx, contrib)
        for s in range(num):
            acc = acc + planes[s]
        return r + 1, acc

    _, acc = jax.lax.while_loop(lambda state: state[0] < rounds, body,
                                (jnp.int32(0), jnp.zeros(x.shape, jnp.float32)))
    return acc, counts.sum(dtype=jnp.int32), (rounds * size * num).astype(jnp.int32)
