"""K-means in JAX: the step that splits a dataset's features into K training shards (GUIDE section 2).

Three modes, all sharing one Lloyd loop that runs on device as a single jitted `lax.while_loop`:

- "lloyd": k-means++ initialisation, then Lloyd iterations until the relative inertia change is below `tol`.
- "balanced": the same loop, but each assignment step caps every cluster at ceil(balance_slack * N / K)
  points with the greedy margin-ordered assignment (see `_capacity_assign`), so no island gets a giant shard.
- "two_stage": as in the DDM paper for large N: k-means with many fine centroids, then a weighted k-means of
  those into K coarse clusters; every point takes its fine centroid's coarse label.

Empty clusters are never returned: a cluster left empty by an assignment step is re-seeded with the point
farthest from its centroid. Fewer distinct points than K is refused with a `DDMError`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ddm.core.config import KMEANS_MODES as MODES
from ddm.core.errors import DDMError

logger = logging.getLogger(__name__)

LOG_EVERY = 10  # iterations between progress lines (and host syncs) when progress is on
# Above this many N*K distance entries the assignment step runs over blocks of rows, so memory stays at
# about CHUNK_ELEMENTS floats instead of N*K (1.28M points x 1024 fine centroids would be 5 GB). Below it
# one unblocked pass is faster: on CPU a scan over cache-sized blocks is slower per iteration (docs/benchmarks.md).
CHUNK_ELEMENTS = 1 << 25
# k-means++ costs K * trials passes over its input, so it runs on a seeded subsample of
# max(INIT_SAMPLE_MIN, INIT_SAMPLE_PER_CLUSTER * K) points when N is larger; Lloyd then uses every point.
INIT_SAMPLE_MIN = 20_000
INIT_SAMPLE_PER_CLUSTER = 20
# The distance matmuls must not drop to TF32/bf16 on accelerators: near-ties and the inertia need float32.
_HI = lax.Precision.HIGHEST
_TINY = float(np.finfo(np.float32).tiny)


@dataclasses.dataclass(frozen=True)
class KMeansResult:
    """A clustering of N points into K non-empty clusters.

    centroids: [K, D] float32. labels: [N] int32 in [0, K). inertia: sum over points of the squared distance
    to their assigned centroid (accumulated in float64). n_iter: Lloyd iterations run (two_stage: fine plus
    coarse). sizes: [K] int64 points per cluster, all >= 1.
    """

    centroids: np.ndarray
    labels: np.ndarray
    inertia: float
    n_iter: int
    sizes: np.ndarray


# ---------------------------------------------------------------------------------------------------------
# Input checks (host side, before anything is compiled).
# ---------------------------------------------------------------------------------------------------------


def _as_points(x: np.ndarray, name: str) -> np.ndarray:
    """Returns `x` as a C-contiguous float32 [N, D] array or raises DDMError naming what is wrong."""
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise DDMError(f"kmeans: {name} must have shape [N, D], got shape {arr.shape} (ndim={arr.ndim})")
    if arr.shape[0] == 0:
        raise DDMError(f"kmeans: {name} has no points (N=0)")
    if arr.shape[1] == 0:
        raise DDMError(f"kmeans: {name} has no features (D=0)")
    if arr.dtype != bool and (
        not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating)
    ):
        raise DDMError(f"kmeans: {name} must be real numbers, got dtype {arr.dtype}")
    with np.errstate(over="ignore"):  # float64 beyond float32 range becomes Inf, reported just below
        arr = np.ascontiguousarray(arr, dtype=np.float32)
    # One float32 sum is much cheaper than a full isfinite mask and is non-finite whenever an entry is; it can
    # also overflow on huge finite values, so the exact row count only runs when it fires.
    if not np.isfinite(arr.sum()):
        bad = np.flatnonzero(~np.isfinite(arr).all(axis=1))
        if bad.size:
            raise DDMError(
                f"kmeans: {name} has {bad.size} row(s) with NaN/Inf (first at row {bad[0]}); "
                "values beyond float32 range count as Inf"
            )
    return arr


def _check_args(n: int, k: int, mode: str, max_iter: int, tol: float, fine_k: int, slack: float) -> None:
    if mode not in MODES:
        raise DDMError(f"kmeans: mode {mode!r} is not one of {', '.join(MODES)}")
    if k < 1:
        raise DDMError(f"kmeans: k={k} must be >= 1")
    if k > n:
        raise DDMError(f"kmeans: k={k} is larger than the number of points N={n}")
    if max_iter < 0:
        raise DDMError(f"kmeans: max_iter={max_iter} must be >= 0")
    if not tol >= 0:
        raise DDMError(f"kmeans: tol={tol} must be >= 0")
    if fine_k < 1:
        raise DDMError(f"kmeans: fine_k={fine_k} must be >= 1")
    if not slack >= 1.0:
        raise DDMError(f"kmeans: balance_slack={slack} must be >= 1.0 (below 1 the K caps cannot hold N points)")


def balanced_capacity(n: int, k: int, balance_slack: float) -> int:
    """The most points one cluster may hold in balanced mode: ceil(balance_slack * n / k).

    The 1e-9 absorbs float noise (1.1 * 400 / 4 is 110.00000000000001, and the cap meant is 110); the cap
    never drops below ceil(n / k), so K caps always hold all n points.
    """
    return max(math.ceil(balance_slack * n / k - 1e-9), -(-n // k))


# ---------------------------------------------------------------------------------------------------------
# Device kernels. Shapes: x [N, D] f32, w [N] f32 point weights (0 marks padding rows), c [K, D] f32.
# ---------------------------------------------------------------------------------------------------------


def _sq_norms(x: jax.Array) -> jax.Array:
    return jnp.sum(x * x, axis=1)


_sq_norms_jit = jax.jit(_sq_norms)


def _partial_sqdist(x: jax.Array, c: jax.Array, c_sq: jax.Array) -> jax.Array:
    """[n, K] ||c||^2 - 2 x.c: the squared distance less ||x||^2, which a per-row argmin does not need."""
    return c_sq[None, :] - 2.0 * jnp.dot(x, c.T, precision=_HI)


def _argmin_rows(part: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-row (first) argmin [n] int32 and min [n] of part [n, K].

    For K >= 16 the min and then the smallest index attaining it are two plain reductions, which XLA:CPU
    vectorises; its fused (value, index) argmin reduction is slower there (docs/benchmarks.md, "k-means vs
    scikit-learn"). For small K the fused argmin is the faster one. Both give the same (first-index) answer.
    """
    k = part.shape[1]
    best = jnp.min(part, axis=1)
    if k < 16:
        return jnp.argmin(part, axis=1).astype(jnp.int32), best
    iota = jnp.arange(k, dtype=jnp.int32)[None, :]
    return jnp.min(jnp.where(part == best[:, None], iota, k), axis=1), best


def _accumulate(x, w, labels, k: int, scatter: bool) -> tuple[jax.Array, jax.Array]:
    """Weighted per-cluster sums [K, D] and weights [K] of x [n, D], w [n], labels [n].

    scatter=True: a scatter-add, which XLA:CPU runs about twice as fast as the one-hot matmul (its
    transposed-LHS dot is slow). scatter=False: the one-hot matmul, for GPU/TPU, where a scatter-add into K
    rows serialises on atomics and the matmul runs on the matrix units.
    """
    if scatter:
        return jax.ops.segment_sum(x * w[:, None], labels, k), jax.ops.segment_sum(w, labels, k)
    onehot_w = jnp.where(labels[:, None] == jnp.arange(k, dtype=labels.dtype)[None, :], w[:, None], 0.0)
    sums = lax.dot_general(onehot_w, x, (((0,), (0,)), ((), ())), precision=_HI)
    return sums, jnp.sum(onehot_w, axis=0)


def _sums(x, w, labels, c, reduce: str, with_sums: bool) -> tuple[jax.Array, jax.Array]:
    if not with_sums:
        return jnp.zeros_like(c), jnp.zeros((c.shape[0],), x.dtype)
    return _accumulate(x, w, labels, c.shape[0], scatter=reduce == "scatter")


def _reduce_kind() -> str:
    """How per-cluster sums and counts are formed on the default backend (a static choice made on the host)."""
    return "scatter" if jax.default_backend() == "cpu" else "onehot"


def _counts(w: jax.Array, labels: jax.Array, k: int, reduce: str) -> jax.Array:
    """[K] int32 number of real (w > 0) points per cluster."""
    real = w > 0
    if reduce == "scatter":
        return jax.ops.segment_sum(real.astype(jnp.int32), labels, k)
    hit = (labels[:, None] == jnp.arange(k, dtype=labels.dtype)[None, :]) & real[:, None]
    return jnp.sum(hit, axis=0, dtype=jnp.int32)


def _nearest_pass(x, w, x_sq, c, block: int, reduce: str, with_sums: bool):
    """Nearest-centroid assignment (+ M-step sums), over blocks of `block` rows when N > block.

    reduce: "scatter" or "onehot" (see `_accumulate`); with_sums=False skips the M-step sums (zeros returned).
    Returns labels [N] int32, squared distances [N] (expanded form, clamped at 0), sums [K, D], weights [K],
    counts [K].
    """
    k = c.shape[0]
    c_sq = _sq_norms(c)

    def one(xb, wb, xsqb):
        labels, best = _argmin_rows(_partial_sqdist(xb, c, c_sq))
        mind = jnp.maximum(xsqb + best, 0.0)
        return (labels, mind, *_sums(xb, wb, labels, c, reduce, with_sums), _counts(wb, labels, k, reduce))

    n = x.shape[0]
    if n <= block:
        return one(x, w, x_sq)
    nb = n // block  # callers pad N to a multiple of block

    def body(acc, blk):
        labels, mind, s, ws, cn = one(*blk)
        return (acc[0] + s, acc[1] + ws, acc[2] + cn), (labels, mind)

    init = (jnp.zeros_like(c), jnp.zeros((k,), x.dtype), jnp.zeros((k,), jnp.int32))
    blocks = (x.reshape(nb, block, -1), w.reshape(nb, block), x_sq.reshape(nb, block))
    (s, ws, cn), (labels, mind) = lax.scan(body, init, blocks)
    return labels.reshape(n), mind.reshape(n), s, ws, cn


def _capacity_assign(dist: jax.Array, cap: jax.Array) -> jax.Array:
    """Assigns each row of `dist` [N, K] (K >= 2) to a column so that no column gets more than `cap` rows.

    The usual greedy for size-constrained k-means: points are taken in order of their preference margin
    (distance to the second-nearest centroid minus distance to the nearest; largest first, ties by index),
    and each goes to its nearest centroid that still has room. Run here in parallel rounds: every unplaced
    point proposes to its nearest open centroid and each centroid accepts its proposers in margin order up to
    its remaining room. A round either places every remaining point or fills at least one centroid, so there
    are at most K rounds, and K * cap >= N guarantees every point is placed.

    The margin order is fixed once per call. Recomputing margins over the open centroids every round (a
    "regret" variant) gave 0.005-0.08% lower balanced inertia on skewed blobs and MNIST but cost a sort per
    round, several times slower (docs/benchmarks.md). Returns labels [N] int32 with bincount <= cap.
    """
    n, k = dist.shape
    iota = jnp.arange(n, dtype=jnp.int32)
    nearest2 = -lax.top_k(-dist, 2)[0]
    _, order = lax.sort((nearest2[:, 0] - nearest2[:, 1], iota), num_keys=1, is_stable=True)
    dist = dist[order]  # rows in margin order, so a cumulative sum ranks each centroid's proposers
    columns = jnp.arange(k, dtype=jnp.int32)[None, :]

    def cond(state):
        labels, _, rounds = state
        return jnp.any(labels < 0) & (rounds <= k)

    def body(state):
        labels, room, rounds = state
        best = jnp.argmin(jnp.where((room > 0)[None, :], dist, jnp.inf), axis=1).astype(jnp.int32)
        proposes = (best[:, None] == columns) & (labels < 0)[:, None]  # [N, K]
        rank = jnp.cumsum(proposes.astype(jnp.int32), axis=0)  # 1-based, among this centroid's proposers
        accepted = jnp.any(proposes & (rank <= room[None, :]), axis=1)
        labels = jnp.where(accepted, best, labels)
        room = room - jnp.minimum(jnp.sum(proposes, axis=0, dtype=jnp.int32), room)
        return labels, room, rounds + 1

    init = (jnp.full((n,), -1, jnp.int32), jnp.full((k,), cap, jnp.int32), jnp.int32(0))
    labels, _, _ = lax.while_loop(cond, body, init)
    return jnp.zeros((n,), jnp.int32).at[order].set(labels)


def _balanced_pass(x, w, x_sq, c, cap, reduce: str, with_sums: bool):
    """Capacity-constrained assignment; same outputs as `_nearest_pass`. Holds the full [N, K] distances."""
    k = c.shape[0]
    dist = jnp.maximum(x_sq[:, None] + _partial_sqdist(x, c, _sq_norms(c)), 0.0)
    if k == 1:
        labels = jnp.zeros((x.shape[0],), jnp.int32)
    else:
        labels = _capacity_assign(dist, cap)
    mind = jnp.take_along_axis(dist, labels[:, None], axis=1)[:, 0]
    return (labels, mind, *_sums(x, w, labels, c, reduce, with_sums), _counts(w, labels, k, reduce))


def _fill_empty(x, w, c, labels, mind, sums, wsum, counts, block: int):
    """Re-seeds each empty cluster with the point farthest from its centroid, one cluster at a time.

    Only points whose cluster keeps at least one other point may move, so filling one cluster never empties
    another. Distances are recomputed exactly, in blocks like the assignment: the expanded form is too coarse
    to tell 0 from tiny. The move updates the M-step sums in place. `stuck` is True when an empty cluster
    remains because every movable point already sits on its centroid, which means fewer distinct points than
    clusters. Runs nothing (one `any` test) when no cluster is empty, the usual case.
    Returns (c, labels, mind, sums, wsum, counts, stuck), updated.
    """

    def cond(state):
        *_, counts, stuck = state
        return jnp.any(counts == 0) & ~stuck

    def body(state):
        c, labels, mind, sums, wsum, counts, _ = state
        j = jnp.argmax(counts == 0)
        movable = (w > 0) & (counts[labels] >= 2)
        far = jnp.where(movable, _exact_sqdist(x, c, labels, block), -1.0)
        i = jnp.argmax(far)
        stuck = far[i] <= 0.0

        def move(_):
            a, xi, wi = labels[i], x[i], w[i]
            return (
                c.at[j].set(xi),
                labels.at[i].set(j),
                mind.at[i].set(0.0),
                sums.at[a].add(-wi * xi).at[j].add(wi * xi),
                wsum.at[a].add(-wi).at[j].add(wi),
                counts.at[a].add(-1).at[j].add(1),
            )

        keep = (c, labels, mind, sums, wsum, counts)
        return (*lax.cond(stuck, lambda _: keep, move, None), stuck)

    state = lax.while_loop(cond, body, (c, labels, mind, sums, wsum, counts, jnp.bool_(False)))
    return state


def _pass(x, w, x_sq, c, cap, *, balanced: bool, block: int, reduce: str, with_sums: bool):
    if balanced:
        return _balanced_pass(x, w, x_sq, c, cap, reduce, with_sums)
    return _nearest_pass(x, w, x_sq, c, block, reduce, with_sums)


@functools.partial(jax.jit, static_argnames=("balanced", "block", "reduce"))
def _lloyd_loop(x, w, x_sq, c, it, prev, limit, tol, cap, *, balanced: bool, block: int, reduce: str):
    """Lloyd iterations from iteration `it` until `limit` or until the relative inertia change < tol.

    One device program for the whole loop: the host is not involved between iterations. Returns
    (centroids [K, D], iterations done, last inertia (w.r.t. the centroids before the last update), done).
    """

    def cond(state):
        _, it, _, done = state
        return (it < limit) & ~done

    def body(state):
        c, it, prev, _ = state
        labels, mind, s, ws, cn = _pass(
            x, w, x_sq, c, cap, balanced=balanced, block=block, reduce=reduce, with_sums=True
        )
        c, labels, mind, s, ws, cn, _ = _fill_empty(x, w, c, labels, mind, s, ws, cn, block)
        inertia = jnp.sum(w * mind)
        # A cluster can only stay empty when stuck; it keeps its centroid and is reported after the loop.
        c_new = jnp.where((ws > 0)[:, None], s / jnp.maximum(ws, _TINY)[:, None], c)
        # max(prev, tiny): a perfect fit (inertia 0) still stops for tol > 0, while tol = 0 never stops.
        done = jnp.abs(prev - inertia) < tol * jnp.maximum(prev, _TINY)
        return c_new, it + 1, inertia, done

    return lax.while_loop(cond, body, (c, it, prev, jnp.bool_(False)))


@functools.partial(jax.jit, static_argnames=("balanced", "block", "reduce"))
def _final_assign(x, w, x_sq, c, cap, *, balanced: bool, block: int, reduce: str):
    """Labels for the final centroids (empty clusters re-seeded) and exact per-point squared distances.

    Returns centroids [K, D], labels [N] int32, squared distances [N] f32 (direct ||x - c||^2, not the
    cancellation-prone expanded form), counts [K], stuck.
    """
    labels, mind, s, ws, cn = _pass(
        x, w, x_sq, c, cap, balanced=balanced, block=block, reduce=reduce, with_sums=False
    )
    c, labels, _, _, _, cn, stuck = _fill_empty(x, w, c, labels, mind, s, ws, cn, block)
    return c, labels, _exact_sqdist(x, c, labels, block), cn, stuck


def _exact_sqdist(x, c, labels, block: int):
    """[N] direct ||x - c[labels]||^2, over blocks of rows when N > block."""
    n = x.shape[0]
    if n <= block:
        return jnp.sum(jnp.square(x - c[labels]), axis=1)
    nb = n // block
    blocks = (x.reshape(nb, block, -1), labels.reshape(nb, block))
    return lax.map(lambda b: jnp.sum(jnp.square(b[0] - c[b[1]]), axis=1), blocks).reshape(n)


@functools.partial(jax.jit, static_argnames=("k", "n_trials"))
def _kmeanspp(x, w, key, *, k: int, n_trials: int):
    """Greedy k-means++ (Arthur & Vassilvitskii 2007; the variant scikit-learn uses): [K, D] seeds.

    Each new centroid is the best of `n_trials` candidates drawn with probability proportional to
    w * D(x)^2 (the one that lowers the potential most), which avoids the bad draws that leave two seeds in
    one blob. x [n, D], w [n] > 0.
    """
    x_sq = _sq_norms(x)
    n = x.shape[0]

    def draw(key, p, count):
        # Inverse-CDF sampling needs `count` uniforms per step; Gumbel-max (jax.random.categorical) would
        # need n, and threefry for n numbers per step dominated the whole initialisation on CPU.
        cdf = jnp.cumsum(p)
        u = jax.random.uniform(key, (count,), p.dtype) * cdf[-1]
        # p == 0 everywhere (every point already a seed) draws the last point; the duplicate seed is caught
        # later as "fewer distinct points than k".
        return jnp.minimum(jnp.searchsorted(cdf, u, side="right"), n - 1)

    key, sub = jax.random.split(key)
    first = draw(sub, w, 1)[0]
    c = jnp.zeros((k, x.shape[1]), x.dtype).at[0].set(x[first])
    closest = jnp.sum(jnp.square(x - x[first]), axis=1)

    def body(i, state):
        c, closest, key = state
        key, sub = jax.random.split(key)
        cand = draw(sub, w * closest, n_trials)
        xc = x[cand]
        d = jnp.maximum(x_sq[:, None] - 2.0 * jnp.dot(x, xc.T, precision=_HI) + _sq_norms(xc)[None, :], 0.0)
        d = jnp.minimum(closest[:, None], d)
        best = jnp.argmin(jnp.sum(w[:, None] * d, axis=0))
        return c.at[i].set(xc[best]), d[:, best], key

    c, _, _ = lax.fori_loop(1, k, body, (c, closest, key))
    return c


# ---------------------------------------------------------------------------------------------------------
# Host drivers.
# ---------------------------------------------------------------------------------------------------------


def _init_sample_size(n: int, k: int) -> int:
    return min(n, max(INIT_SAMPLE_MIN, INIT_SAMPLE_PER_CLUSTER * k))


def _seed_centroids(x: np.ndarray, w: np.ndarray, k: int, key: jax.Array) -> jax.Array:
    """k-means++ seeds [K, D] from a seeded subsample of x [N, D] with weights w [N] (all > 0)."""
    n = x.shape[0]
    m = _init_sample_size(n, k)
    key_sub, key_pp = jax.random.split(key)
    if m < n:
        idx = np.sort(np.asarray(jax.random.choice(key_sub, n, (m,), replace=False)))
        x, w = x[idx], w[idx]
    return _kmeanspp(jnp.asarray(x), jnp.asarray(w), key_pp, k=k, n_trials=2 + int(math.log(k)))


def _blocked(x: np.ndarray, w: np.ndarray, k: int, allow: bool = True) -> tuple[np.ndarray, np.ndarray, int]:
    """Rows per block for x [N, D] against k centroids, with x and w [N] padded to a multiple of it.

    Zero-weight padding rows never move centroids, add inertia or get re-seeded.
    """
    n = x.shape[0]
    if not allow or n * k <= CHUNK_ELEMENTS:
        return x, w, n
    block = max(256, CHUNK_ELEMENTS // k)
    pad = (-n) % block
    if pad:
        x = np.concatenate([x, np.zeros((pad, x.shape[1]), x.dtype)])
        w = np.concatenate([w, np.zeros((pad,), w.dtype)])
    return x, w, block


def _fit(
    x: np.ndarray,
    w: np.ndarray,
    c0: jax.Array | np.ndarray,
    *,
    balanced: bool,
    cap: int,
    max_iter: int,
    tol: float,
    progress: bool,
    stage: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, bool]:
    """Runs the Lloyd loop on x [N, D] with weights w [N] from centroids c0 [K, D].

    Returns centroids [K, D], labels [N] int32, exact squared distances [N] f32, iterations, stuck (some
    cluster is empty because there are fewer distinct points than K).
    """
    n = x.shape[0]
    x, w, block = _blocked(x, w, c0.shape[0], allow=not balanced)
    xd, wd = jnp.asarray(x), jnp.asarray(w)
    x_sq = _sq_norms_jit(xd)
    cap_d, tol_d = jnp.int32(cap), jnp.float32(tol)
    reduce = _reduce_kind()
    c, it, prev = jnp.asarray(c0, jnp.float32), jnp.int32(0), jnp.float32(jnp.inf)
    done_iters = 0
    while done_iters < max_iter:
        # Without progress lines the whole run is one device call; with them, it syncs every LOG_EVERY steps.
        limit = max_iter if not progress else min(max_iter, done_iters + LOG_EVERY)
        c, it, prev, done = _lloyd_loop(
            xd, wd, x_sq, c, it, prev, jnp.int32(limit), tol_d, cap_d, balanced=balanced, block=block,
            reduce=reduce,
        )
        done_iters = int(it)
        if progress:
            logger.info(f"kmeans[{stage}] iter {done_iters}/{max_iter} inertia {float(prev):.6g}")
        if bool(done):
            break
    c, labels, sqdist, _, stuck = _final_assign(
        xd, wd, x_sq, c, cap_d, balanced=balanced, block=block, reduce=reduce
    )
    return np.asarray(c), np.asarray(labels)[:n], np.asarray(sqdist)[:n], done_iters, bool(stuck)


def _refuse_degenerate(x: np.ndarray, k: int) -> None:
    """Raises for a clustering left with an empty cluster, which only fewer distinct points than k causes."""
    distinct = int(np.unique(x, axis=0).shape[0])
    if distinct < k:
        raise DDMError(f"kmeans: x has only {distinct} distinct point(s), fewer than k={k} clusters")
    raise RuntimeError(f"kmeans left a cluster empty although x has {distinct} >= k={k} distinct points")


def _sizes_text(sizes: np.ndarray) -> str:
    if sizes.size <= 16:
        return "[" + " ".join(str(int(s)) for s in sizes) + "]"
    return f"min {sizes.min()} median {int(np.median(sizes))} max {sizes.max()} over {sizes.size} clusters"


def _result(c, labels, sqdist, n_iter, k, mode, progress) -> KMeansResult:
    sizes = np.bincount(labels, minlength=k).astype(np.int64)
    inertia = float(np.sum(sqdist, dtype=np.float64))
    if progress:
        logger.info(f"kmeans[{mode}] done: {n_iter} iterations, inertia {inertia:.6g}, sizes {_sizes_text(sizes)}")
    return KMeansResult(
        centroids=np.asarray(c, np.float32), labels=labels.astype(np.int32), inertia=inertia, n_iter=n_iter,
        sizes=sizes,
    )


def kmeans(
    x: np.ndarray,
    k: int,
    *,
    seed: int = 0,
    max_iter: int = 100,
    tol: float = 1e-4,
    mode: str = "lloyd",
    fine_k: int = 256,
    balance_slack: float = 1.1,
    init: np.ndarray | None = None,
    progress: bool = False,
) -> KMeansResult:
    """Clusters x [N, D] (any real dtype, used as float32) into k non-empty clusters.

    seed: k-means++ seed (jax.random; the same seed gives bitwise the same result on the same machine).
    max_iter: most Lloyd iterations. tol: stop when |inertia change| / previous inertia < tol; tol=0 runs
    exactly max_iter iterations. mode: "lloyd", "balanced" (no cluster above
    ceil(balance_slack * N / k) points) or "two_stage" (min(max(fine_k, k), N) fine centroids, then a
    weighted k-means of those into k). init: [k, D] starting centroids instead of k-means++ (for two_stage:
    the coarse stage's start, [k, D] as well). progress: log a short line (logger `ddm.data.kmeans`, INFO)
    every LOG_EVERY iterations and at the end.

    Returns a KMeansResult (centroids [k, D] f32, labels [N] int32, inertia, n_iter, sizes [k] int64).
    Raises DDMError on bad input: wrong shape, N=0, NaN/Inf rows, k < 1 or k > N, unknown mode, or fewer
    distinct points than k.
    """
    pts = _as_points(x, "x")
    n, d = pts.shape
    _check_args(n, k, mode, max_iter, tol, fine_k, balance_slack)
    c0 = None
    if init is not None:
        c0 = _as_points(init, "init")
        if c0.shape != (k, d):
            raise DDMError(f"kmeans: init must have shape ({k}, {d}) = (k, D), got {c0.shape}")
    key = jax.random.key(seed)
    ones = np.ones((n,), np.float32)
    common = dict(max_iter=max_iter, tol=tol, progress=progress)

    if mode == "two_stage":
        return _two_stage(pts, k, key, min(max(fine_k, k), n), c0, common)

    balanced = mode == "balanced" and k > 1
    if c0 is None:
        c0 = _seed_centroids(pts, ones, k, key)
    cap = balanced_capacity(n, k, balance_slack) if balanced else n
    c, labels, sqdist, n_iter, stuck = _fit(pts, ones, c0, balanced=balanced, cap=cap, stage=mode, **common)
    if stuck:
        _refuse_degenerate(pts, k)
    return _result(c, labels, sqdist, n_iter, k, mode, progress)


def _two_stage(pts: np.ndarray, k: int, key: jax.Array, n_fine: int, c0, common: dict) -> KMeansResult:
    """Fine k-means with n_fine centroids, weighted k-means of the fine centroids into k, point labels by
    lookup; the returned centroids are recomputed as the mean of each coarse cluster's points."""
    n = pts.shape[0]
    progress = common["progress"]
    ones = np.ones((n,), np.float32)
    key_fine, key_coarse = jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)
    fine_c0 = _seed_centroids(pts, ones, n_fine, key_fine)
    fine_c, fine_labels, _, fine_iters, _ = _fit(
        pts, ones, fine_c0, balanced=False, cap=n, stage="two_stage/fine", **common
    )
    # A fine cluster can only stay empty when there are fewer distinct points than n_fine; drop it, since
    # only k (not n_fine) distinct points are required.
    fine_sizes = np.bincount(fine_labels, minlength=n_fine)
    keep = np.flatnonzero(fine_sizes)
    fc, fw = fine_c[keep], fine_sizes[keep].astype(np.float32)
    if fc.shape[0] < k:
        _refuse_degenerate(pts, k)
    if c0 is None:
        c0 = _seed_centroids(fc, fw, k, key_coarse)
    _, coarse_labels, _, coarse_iters, stuck = _fit(
        fc, fw, c0, balanced=False, cap=fc.shape[0], stage="two_stage/coarse", **common
    )
    if stuck:
        _refuse_degenerate(pts, k)
    lookup = np.zeros((n_fine,), np.int32)
    lookup[keep] = coarse_labels
    labels = lookup[fine_labels]
    c, sqdist = _coarse_centroids(jnp.asarray(pts), jnp.asarray(labels), k, _reduce_kind() == "scatter")
    return _result(np.asarray(c), labels, np.asarray(sqdist), fine_iters + coarse_iters, k, "two_stage", progress)


@functools.partial(jax.jit, static_argnames=("k", "scatter"))
def _coarse_centroids(x, labels, k: int, scatter: bool):
    """Mean of each cluster's points [K, D] and each point's exact squared distance to its mean [N]."""
    sums, wsum = _accumulate(x, jnp.ones((x.shape[0],), x.dtype), labels, k, scatter)
    c = sums / jnp.maximum(wsum, 1.0)[:, None]
    return c, jnp.sum(jnp.square(x - c[labels]), axis=1)


@functools.partial(jax.jit, static_argnames=("block", "reduce"))
def _assign_jit(x, x_sq, c, *, block: int, reduce: str):
    w = jnp.ones((x.shape[0],), x.dtype)
    return _nearest_pass(x, w, x_sq, c, block, reduce, with_sums=False)[0]


def assign(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Nearest-centroid labels [N] int32 for points x [N, D] and centroids [K, D] (e.g. held-out data).

    Plain nearest assignment, without balanced mode's capacities.
    """
    pts = _as_points(x, "x")
    c = _as_points(centroids, "centroids")
    if c.shape[1] != pts.shape[1]:
        raise DDMError(f"assign: x has D={pts.shape[1]} features but centroids have D={c.shape[1]}")
    n = pts.shape[0]
    pts, _, block = _blocked(pts, np.ones((n,), np.float32), c.shape[0])
    xd = jnp.asarray(pts)
    labels = _assign_jit(xd, _sq_norms_jit(xd), jnp.asarray(c), block=block, reduce=_reduce_kind())
    return np.asarray(labels)[:n].astype(np.int32)
