"""Sampling throughput of the routed ensemble (top-1, top-2, full) relative to one expert sampling alone.

    python benchmarks/bench_sampling.py [--quick] [--repeats N]

For each shape, K=8 randomly initialised DiT experts (same architecture, seeds 0..7) and a random conv router
are put in one `Ensemble`; the baseline is an `Ensemble` holding only expert 0, sampled with `single:0` (no
router, one expert call per evaluation). Every strategy samples the same batch (one `sample` call, `n` = batch)
with the same Euler steps, and images/s = batch / median wall time. Goal (the issue): top-1 >= 0.8x the
single expert, full ~ 1/K.

Random init is adapted so that the numbers mean something:
- experts: the zero-initialised adaLN-Zero modulations and final layer get N(0, 0.02) weights, so velocities
  are non-zero and samples move (routing decisions can change from step to step);
- router: a random conv router (the preset named in the table) whose zero-initialised head is replaced by a
  random projection of its pooled features, centred on a calibration batch of noise (bias = -W mean feature),
  so that different samples prefer different experts (the top-1 choices are spread over all K; the table's
  "experts used" column shows how evenly). Its cost is the real router's.

Columns: "expert rows" is the number of rows the experts actually ran per evaluation (bucket padding included),
relative to the batch (single = 1.0, full = K); "router share" is the router's forward time (jit, warm, median
at the same batch) times the evaluations of one call, over the strategy's wall time; "plain loop" is a jitted
Euler loop over expert 0 without the `Ensemble` (what dispatch costs on top of the expert itself); "top1, finer
buckets" is an experiment, top-1 with the bucket sizes on the grid 2^k and 3 * 2^(k-1) instead of the
Ensemble's powers of two (see `fine_bucket_size`), to show what bucket padding costs.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks.common import (
    fmt,
    interleaved,
    load_average,
    machine_table,
    markdown_table,
    time_fn,
)
from ddm.core import ensemble as ensemble_lib
from ddm.core import flow as solvers
from ddm.core.dit import DiT, preset_dims
from ddm.core.ensemble import Ensemble
from ddm.router.model import ConvRouter, conv_widths

K = 8
STRATEGIES = ("top1", "top2", "full")
FINE = "top1, finer buckets"  # the experiment row (see `fine_bucket_size`)


@dataclasses.dataclass(frozen=True)
class Case:
    preset: str
    image_shape: tuple[int, int, int]
    patch_size: int
    batch: int
    steps: int
    repeats: int
    router_preset: str
    plain_loop: bool = True

    @property
    def name(self) -> str:
        h, w, c = self.image_shape
        return f"{self.preset} {h}x{w}x{c}/p{self.patch_size}"


def cases(quick: bool, repeats: int | None) -> list[Case]:
    r = repeats or (3 if quick else 5)
    out = [
        Case("tiny", (8, 8, 1), 2, 64, 3 if quick else 6, r, "tiny"),
        Case("tiny", (28, 28, 1), 4, 64, 1 if quick else 2, r, "tiny"),
    ]
    # S on 32x32x4 (256 tokens, 12 blocks of width 384) takes about a second per image-step on a 2-core CPU:
    # a small batch, one step, two rounds.
    if not quick:
        out.append(Case("S", (32, 32, 4), 2, 4, 1, repeats or 2, "S", plain_loop=False))
    return out


# ---------------------------------------------------------------------------------------------------------
# Models.
# ---------------------------------------------------------------------------------------------------------


def _is_kernel(path) -> bool:
    """Whether a pytree path of an nnx.State leaf ends in a Linear/Conv kernel (the last key is `.value`)."""
    return any(getattr(k, "key", None) == "kernel" for k in path)


def _randomise_zeros(state: nnx.State, key: jax.Array, scale: float = 0.02) -> nnx.State:
    """Every all-zero *kernel* (adaLN-Zero modulations, final layer, FiLM) gets N(0, scale) entries."""
    leaves, treedef = jax.tree.flatten_with_path(state)
    out = []
    for i, (path, leaf) in enumerate(leaves):
        if _is_kernel(path) and not bool(jnp.any(leaf != 0)):
            leaf = scale * jax.random.normal(jax.random.fold_in(key, i), leaf.shape, leaf.dtype)
        out.append(leaf)
    return jax.tree.unflatten(treedef, out)


def make_experts(case: Case) -> tuple[callable, list[nnx.State]]:
    """(expert_apply, K param states) of randomly initialised DiTs of one architecture."""
    depth, width, heads = preset_dims(case.preset)
    states, graphdef = [], None
    for k in range(K):
        model = DiT(image_shape=case.image_shape, patch_size=case.patch_size, depth=depth, width=width,
                    heads=heads, rngs=nnx.Rngs(k))
        graphdef, state = nnx.split(model)
        states.append(_randomise_zeros(state, jax.random.key(100 + k)))

    def expert_apply(state, x, t, y):
        return nnx.merge(graphdef, state)(x, t, y)

    return expert_apply, states


def _router_features(router: ConvRouter, x: jax.Array, t: jax.Array) -> jax.Array:
    """The router's pooled, normalised features [B, D] (its forward pass up to the head)."""
    c = router.cond(t, None)
    h = x.astype(router.dtype)
    for stage in router.stages:
        h = stage(h, c)
    return router.norm(jnp.mean(h, axis=(1, 2)))


def make_router(case: Case) -> tuple[callable, nnx.State]:
    """(router_apply, params) of a random conv router whose top-1 choice varies from sample to sample."""
    router = ConvRouter(image_shape=case.image_shape, widths=conv_widths(case.router_preset), num_clusters=K,
                        rngs=nnx.Rngs(1234))
    graphdef, state = nnx.split(router)
    state = _randomise_zeros(state, jax.random.key(99))
    router = nnx.merge(graphdef, state)
    calib = jax.random.normal(jax.random.key(7), (256, *case.image_shape))
    feats = _router_features(router, calib, jnp.ones((256,)))
    # A random projection of the features' deviation from their mean: W (f - mean f).
    centred = feats - feats.mean(0)
    w = jax.random.normal(jax.random.key(8), (feats.shape[1], K)) / (centred.std() * math.sqrt(feats.shape[1]))
    router.head.kernel[...] = w
    router.head.bias[...] = -feats.mean(0) @ w
    graphdef, state = nnx.split(router)

    def router_apply(state, x, t, y):
        return nnx.merge(graphdef, state)(x, t)

    return router_apply, state


def plain_loop(expert_apply, params, noise: jax.Array, steps: int):
    """Euler sampling with one expert and no Ensemble: x_T = noise, one jitted expert call per step."""
    step = jax.jit(lambda p, x, t, dt: x + dt * expert_apply(p, x, t, None), donate_argnums=1)
    ts = solvers.time_grid(steps)

    def run():
        x = jnp.array(noise)
        for i in range(steps):
            x = step(params, x, jnp.full((x.shape[0],), ts[i]), jnp.float32(ts[i + 1] - ts[i]))
        return x

    return run


def fine_bucket_size(count: int, batch: int, floor: int) -> int:
    """An experiment, not what `Ensemble` does: the next size >= max(count, floor) on the grid 1, 2, 3, 4, 6, 8,
    12, 16, 24, ... (2^k and 3 * 2^(k-1)), capped at the batch. At most a third of a bucket is padding instead of
    half, for up to twice the compilations of `ddm.core.ensemble._bucket_size`'s powers of two."""
    if count >= batch:
        return batch
    c = max(count, floor)
    p = 1 << (c - 1).bit_length()
    if p >= 4 and c <= 3 * p // 4:
        p = 3 * p // 4
    return min(batch, p)


def with_fine_buckets(fn):
    """fn run with `fine_bucket_size` in place of the Ensemble's bucket rule (restored afterwards)."""
    def run():
        original = ensemble_lib._bucket_size
        ensemble_lib._bucket_size = fine_bucket_size
        try:
            return fn()
        finally:
            ensemble_lib._bucket_size = original
    return run


# ---------------------------------------------------------------------------------------------------------
# One case.
# ---------------------------------------------------------------------------------------------------------


def bench_case(case: Case) -> list[list[str]]:
    expert_apply, params = make_experts(case)
    router_apply, router_params = make_router(case)
    single = Ensemble(expert_apply, params[:1], None, None, image_shape=case.image_shape)
    ensemble = Ensemble(expert_apply, params, router_apply, router_params, image_shape=case.image_shape)
    n, steps = case.batch, case.steps
    results = {}

    def sampler(ens, strategy, key=None):
        def run():
            results[key or strategy] = ens.sample(n, strategy, steps=steps, solver="euler", seed=0)
            return results[key or strategy].x
        return run

    noise = jax.random.normal(jax.random.key(0, impl="threefry2x32"), (n, *case.image_shape), jnp.float32)
    fns = {"plain loop": plain_loop(expert_apply, params[0], noise, steps)} if case.plain_loop else {}
    fns["single:0"] = sampler(single, "single:0")
    fns.update({s: sampler(ensemble, s) for s in STRATEGIES})
    fns[FINE] = with_fine_buckets(sampler(ensemble, "top1", key=FINE))
    # Warm-up (compilation): every strategy once, except `full`, whose only bucket (the whole batch, with
    # K-wide weights) `single:0` on the K-expert ensemble compiles at 1/K of the cost.
    warm = {name: fn for name, fn in fns.items() if name != "full"}
    warm["full (warm-up)"] = sampler(ensemble, "single:0", key="warm-up")
    interleaved(warm, repeats=1, warmup=0, block=jax.block_until_ready)
    timings = interleaved(fns, repeats=case.repeats, warmup=0, block=jax.block_until_ready)

    # The router alone at the same batch, jitted and warm: its share of each strategy's time.
    route = jax.jit(router_apply)
    t = jnp.ones((n,), jnp.float32)
    router = time_fn(lambda: route(router_params, noise, t, None), repeats=max(5, case.repeats), warmup=2,
                     block=jax.block_until_ready)

    base = timings["single:0"]
    rows = []
    for name, timing in timings.items():
        res = results.get(name)
        evals = steps  # Euler: one velocity evaluation per step
        expert_rows = 1.0 if res is None else res.padded_evals / (evals * n)
        used = share = "-"
        if name in (*STRATEGIES, FINE):
            top1 = np.bincount(np.argmax(res.weights, -1).reshape(-1), minlength=K) / (steps * n)
            used = f"{int((top1 > 0).sum())}/{K} (max {top1.max():.2f})"
            share = f"{router.cpu_median * evals / timing.cpu_median:.1%}"
        rows.append([case.name, f"B={n}, {steps} steps", name, fmt(n / timing.median),
                     f"{base.median / timing.median:.2f}", f"{base.cpu_median / timing.cpu_median:.2f}",
                     f"{expert_rows:.2f}", used, share, f"{timing.spread:.0%}"])
    return rows


HEADERS = ["experts (DiT preset, image/patch)", "request", "strategy", "images/s", "vs single (wall)",
           "vs single (CPU time)", "expert rows / batch", "top-1 experts used (max share)", "router share",
           "spread"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats; skip the S preset")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per strategy (median taken)")
    args = parser.parse_args()
    command = "python benchmarks/bench_sampling.py" + (" --quick" if args.quick else "")
    print(machine_table(extra={"command": f"`{command}`", "experts": f"K={K}, Euler solver, min_bucket 8"}))
    print()
    rows = []
    for case in cases(args.quick, args.repeats):
        rows += bench_case(case)
        print(f"done: {case.name} (load average {load_average()})", file=sys.stderr, flush=True)
    print(markdown_table(HEADERS, rows))
    print(f"\nload average after: {load_average()}")


if __name__ == "__main__":
    main()
