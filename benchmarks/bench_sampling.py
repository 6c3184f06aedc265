"""Sampling throughput of the routed ensemble (top-1, top-2, full, ...) relative to one expert sampling alone.

    python -m benchmarks.bench_sampling [--quick] [--repeats N] [--device cpu|gpu]

For each shape, K=8 randomly initialised DiT experts (same architecture, seeds 0..7) and a random conv router
are put in one `Ensemble`; the baseline ("one expert") is expert 0 alone on the whole batch, the Euler solve as
one jitted program (`flow.integrate`, no `Ensemble`, no dispatch): what one model costs. `single:0` is an
`Ensemble` holding only expert 0, through the ensemble's machinery (its row dispatch included). Every row
samples the same batch (one `sample` call, `n` = batch) with the same Euler steps; images/s = batch / median
wall time. Goal (issue 16): top-1 >= 0.9x the single expert for tiny 8x8 and >= 0.95x for S 32x32x4 (CPU-time
ratio on CPU), full ~ 1/K.

`--device cpu` (default): tiny 8x8x1 (B=64), tiny 28x28x1 (B=64, full run only) and S 32x32x4 (B=4, one step).
`--device gpu`: DiT-B/2 and DiT-XL/2 on 32x32x4 latents (B=64 and 32, 10 steps, 4 with --quick; conv routers
of the same preset), ready for a GPU (nothing else needs one; not run yet); ratios of wall times, since CPU time
means nothing there. Eight XL experts take 22 GB, their stack as much again.

Random init is adapted so that the numbers mean something:
- experts: the zero-initialised adaLN-Zero modulations and final layer get N(0, 0.02) weights, so velocities
  are non-zero and samples move (routing decisions can change from step to step);
- router: a random conv router (the preset named in the table) whose zero-initialised head is replaced by a
  random projection of its pooled features, centred on a calibration batch of noise (bias = -W mean feature),
  so that different samples prefer different experts (the top-1 choices are spread over all K; the table's
  "experts used" column shows how evenly). Its cost is the real router's.

Columns: "dispatch" is the dispatcher that ran (`SampleResult.dispatch`; "auto" resolves to "unrolled" on CPU,
"grouped" on GPU; "host" is the tests' reference dispatcher, tests/oracles/host_dispatch.py, that reads the routing
weights back every evaluation); "expert rows"
is the number of rows the experts actually ran per evaluation (chunk/bucket padding included), relative to the
batch (single = 1.0, full = K); "router share" is the router's forward time (jit, warm, median at the same
batch) times the evaluations of one call, over the strategy's time; "plain loop" is a jitted Euler loop over
expert 0 without the `Ensemble` (one program launch per step). "top1, exact rows (no router)" is a bound, not a
dispatcher: one jitted program running each expert on exactly its top-1 rows (no padding, no routing; the
selection is fixed from a top-1 `sample` call), i.e. what per-expert calls cost on this backend at best.

Prior rows (ancestral sampling: each sample's expert drawn once from the cluster shares, here K equal clusters,
then that expert alone, no router): `prior` and `single:0` against one expert at n = 64*K images in one call,
all timed here (the only rows at that n; "experts used" is then the drawn experts), every case; S's with one
timed round.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

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
from ddm.core import flow as solvers
from ddm.core.dit import DiT, preset_dims
from ddm.router.model import ConvRouter, conv_widths
from ddm.sampling.ensemble import Ensemble
from tests.oracles.host_dispatch import HOST, host_sample

K = 8
# (row label, strategy, dispatch) after the single-expert baseline; "auto" is what `Ensemble` picks.
RUNS = (
    ("top1", "top1", "auto"),
    ("top2", "top2", "auto"),
    ("full", "full", "auto"),
    ("top1+full:0.5", "top1+full:0.5", "auto"),
    ("top1 (host reference)", "top1", HOST),
)
# The device dispatchers "auto" did not pick, and "unrolled" with a smaller chunk (`min_bucket` 4): the full run
# measures them (docs/benchmarks.md says why "auto" picks what it picks).
OPTIONS = tuple((f"top1 ({name})", "top1", name) for name in ("unrolled", "grouped", "capacity"))
SMALL_CHUNK = 4
BOUND = "top1, exact rows (no router)"
BASE = "one expert (one program)"  # the baseline every ratio is taken against


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
    options: bool = True
    prior: bool = True  # the prior rows (n = 64*K)
    prior_repeats: int | None = None  # timed rounds of the prior rows (None: `repeats`)

    @property
    def name(self) -> str:
        h, w, c = self.image_shape
        return f"{self.preset} {h}x{w}x{c}/p{self.patch_size}"


def cases(device: str, quick: bool, repeats: int | None) -> list[Case]:
    r = repeats or (3 if quick else 5)
    if device == "gpu":  # --quick: fewer steps, and no dispatch options (each is one more XL compile)
        steps = 4 if quick else 10
        return [Case("B", (32, 32, 4), 2, 64, steps, r, "B", options=not quick),
                Case("XL", (32, 32, 4), 2, 32, steps, r, "XL", options=not quick)]
    out = [Case("tiny", (8, 8, 1), 2, 64, 3 if quick else 6, r, "tiny", options=not quick)]
    if not quick:
        out.append(Case("tiny", (28, 28, 1), 4, 64, 2, r, "tiny"))
    # S on 32x32x4 (256 tokens, 12 blocks of width 384) takes about 0.15 s per image-step on a 2-core CPU:
    # a small batch, one step, few rounds.
    # Its prior rows (512 images a call) get one timed round after the compiling one.
    out.append(Case("S", (32, 32, 4), 2, 4, 1, repeats or (4 if quick else 5), "S", plain_loop=False,
                    options=not quick, prior_repeats=repeats or 1))
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


def one_expert(expert_apply, params, noise: jax.Array, steps: int):
    """Euler sampling with one expert on the whole batch as one jitted program (no Ensemble): the baseline."""
    def solve(p, x):
        return solvers.integrate(lambda x, t, e: (expert_apply(p, x, t, None), None), x, steps, "euler")[0]

    solve = jax.jit(solve)
    return lambda: solve(params, noise)


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


def exact_rows_bound(expert_apply, params, noise: jax.Array, choice: np.ndarray, steps: int):
    """Euler sampling where every expert runs on exactly its rows of a fixed top-1 assignment (choice [B]), in
    one jitted program per step: the cost of per-expert calls with no padding, no routing and no dispatch."""
    rows = [np.flatnonzero(choice == k) for k in range(len(params))]

    def velocity(ps, x, t):
        v = jnp.zeros_like(x)
        for k, r in enumerate(rows):
            if r.size:
                v = v.at[r].set(expert_apply(ps[k], x[r], t[r], None))
        return v

    step = jax.jit(lambda ps, x, t, dt: x + dt * velocity(ps, x, t), donate_argnums=1)
    ts = solvers.time_grid(steps)

    def run():
        x = jnp.array(noise)
        for i in range(steps):
            x = step(params, x, jnp.full((x.shape[0],), ts[i]), jnp.float32(ts[i + 1] - ts[i]))
        return x

    return run


# ---------------------------------------------------------------------------------------------------------
# One case.
# ---------------------------------------------------------------------------------------------------------


def bench_case(case: Case, gpu: bool) -> list[list[str]]:
    expert_apply, params = make_experts(case)
    router_apply, router_params = make_router(case)
    single = Ensemble(expert_apply, params[:1], None, None, image_shape=case.image_shape)
    ensemble = Ensemble(expert_apply, params, router_apply, router_params, image_shape=case.image_shape)
    n, steps = case.batch, case.steps
    results = {}

    def sampler(ens, strategy, key, reference=False):
        draw = functools.partial(host_sample, ens) if reference else ens.sample

        def run():
            results[key] = draw(n, strategy, steps=steps, solver="euler", seed=0)
            return results[key].x
        return run

    noise = jax.random.normal(jax.random.key(0, impl="threefry2x32"), (n, *case.image_shape), jnp.float32)
    fns = {BASE: one_expert(expert_apply, params[0], noise, steps)}
    if case.plain_loop:
        fns["plain loop"] = plain_loop(expert_apply, params[0], noise, steps)
    fns["single:0"] = sampler(single, "single:0", "single:0")
    runs = list(RUNS)
    if case.options:
        auto = ensemble.resolved_dispatch
        runs += [run for run in OPTIONS if run[2] != auto]
        if case.batch // K > SMALL_CHUNK:  # otherwise the floor is below it already
            runs.append((f"top1 ({auto}, min_bucket {SMALL_CHUNK})", "top1", auto))
    for label, strategy, dispatch in runs:
        ens = ensemble.replace(dispatch="auto" if dispatch == HOST else dispatch,
                               min_bucket=SMALL_CHUNK if "min_bucket" in label else 8)
        fns[label] = sampler(ens, strategy, label, reference=dispatch == HOST)
    # Warm-up (compilation), then the bound: the top-1 assignment of the first step, fixed.
    interleaved(fns, repeats=1, warmup=0, block=jax.block_until_ready)
    choice = np.argmax(results["top1"].weights[0], -1)
    fns[BOUND] = exact_rows_bound(expert_apply, params, noise, choice, steps)
    fns[BOUND]()
    timings = interleaved(fns, repeats=case.repeats, warmup=0, block=jax.block_until_ready)

    # The router alone at the same batch, jitted and warm: its share of each strategy's time.
    route = jax.jit(router_apply)
    t = jnp.ones((n,), jnp.float32)
    router = time_fn(lambda: route(router_params, noise, t, None), repeats=max(5, case.repeats), warmup=2,
                     block=jax.block_until_ready)

    base = timings[BASE]
    rows = []
    for name, timing in timings.items():
        res = results.get(name)
        evals = steps  # Euler: one velocity evaluation per step
        expert_rows = 1.0 if res is None else res.padded_evals / (evals * n)
        used = share = "-"
        if res is not None and name != "single:0":
            top1 = np.bincount(np.argmax(res.weights, -1).reshape(-1), minlength=K) / (steps * n)
            used = f"{int((top1 > 0).sum())}/{K} (max {top1.max():.2f})"
            own, total = (router.median, timing.median) if gpu else (router.cpu_median, timing.cpu_median)
            share = f"{own * evals / total:.1%}"
        cpu = "-" if gpu else f"{base.cpu_median / timing.cpu_median:.2f}"
        rows.append([case.name, f"B={n}, {steps} steps", name, "-" if res is None else res.dispatch,
                     fmt(n / timing.median), f"{base.median / timing.median:.2f}", cpu, f"{expert_rows:.2f}",
                     used, share, f"{timing.spread:.0%}"])
    return rows + (prior_rows(case, expert_apply, params, gpu) if case.prior else [])


def prior_rows(case: Case, expert_apply, params, gpu: bool) -> list[list[str]]:
    """One expert, `single:0` and `prior` (K equal cluster sizes, no router) at n = 64*K, interleaved: three table
    rows."""
    n, steps = 64 * K, case.steps
    single = Ensemble(expert_apply, params[:1], None, None, image_shape=case.image_shape)
    prior = Ensemble(expert_apply, params, None, None, image_shape=case.image_shape, prior_counts=np.ones(K))
    results = {}

    def sampler(ens, strategy):
        def run():
            results[strategy] = ens.sample(n, strategy, steps=steps, solver="euler", seed=0)
            return results[strategy].x
        return run

    noise = jax.random.normal(jax.random.key(0, impl="threefry2x32"), (n, *case.image_shape), jnp.float32)
    fns = {BASE: one_expert(expert_apply, params[0], noise, steps), "single:0": sampler(single, "single:0"),
           "prior": sampler(prior, "prior")}
    interleaved(fns, repeats=1, warmup=0, block=jax.block_until_ready)  # compilation
    timings = interleaved(fns, repeats=case.prior_repeats or case.repeats, warmup=0, block=jax.block_until_ready)
    base = timings[BASE]
    rows = []
    for name, timing in timings.items():
        res = results.get(name)
        if res is None:
            cpu = "-" if gpu else "1.00"
            rows.append([case.name, f"B={n}, {steps} steps", f"{name} (n=64K)", "-", fmt(n / timing.median), "1.00",
                         cpu, "1.00", "-", "-", f"{timing.spread:.0%}"])
            continue
        used = "-"
        if name == "prior":
            drawn = np.bincount(res.experts, minlength=K) / n
            used = f"{int((drawn > 0).sum())}/{K} (max {drawn.max():.2f})"
        cpu = "-" if gpu else f"{base.cpu_median / timing.cpu_median:.2f}"
        rows.append([case.name, f"B={n}, {steps} steps", f"{name} (n=64K)", res.dispatch, fmt(n / timing.median),
                     f"{base.median / timing.median:.2f}", cpu, f"{res.padded_evals / (steps * n):.2f}", used,
                     "-", f"{timing.spread:.0%}"])
    return rows


HEADERS = ["experts (DiT preset, image/patch)", "request", "strategy", "dispatch", "images/s", "vs single (wall)",
           "vs single (CPU time)", "expert rows / batch", "top-1 experts used (max share)", "router share",
           "spread"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="fewer steps and rounds; tiny 8x8 and S only, without the other dispatch options")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per strategy (median taken)")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                        help="cpu: tiny and S presets; gpu: DiT-B/2 and XL/2 on 32x32x4 latents (needs a GPU)")
    args = parser.parse_args()
    if args.device == "gpu" and jax.default_backend() != "gpu":
        sys.exit(f"--device gpu needs a GPU; jax's default backend here is {jax.default_backend()}")
    if args.device == "cpu":
        jax.config.update("jax_platforms", "cpu")
    command = "python -m benchmarks.bench_sampling" + (" --quick" if args.quick else "") + (
        " --device gpu" if args.device == "gpu" else "")
    extra = {"command": f"`{command}`", "experts": f"K={K}, Euler solver, min_bucket 8",
             "device": str(jax.devices()[0].device_kind)}
    print(machine_table(extra=extra))
    print()
    rows = []
    for case in cases(args.device, args.quick, args.repeats):
        rows += bench_case(case, gpu=args.device == "gpu")
        print(f"done: {case.name} (load average {load_average()})", file=sys.stderr, flush=True)
    print(markdown_table(HEADERS, rows))
    print(f"\nload average after: {load_average()}")


if __name__ == "__main__":
    main()
