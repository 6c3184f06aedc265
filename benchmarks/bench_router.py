"""Router cost per sampling step relative to one expert of the default preset: FLOPs and measured time.

    python -m benchmarks.bench_router [--quick] [--repeats N] [--batch B] [--config digits.yaml ...]

With top-1 routing every velocity evaluation runs the router once and one expert per sample, so the router's
overhead is router cost / expert cost per image. For each shipped config's expert (configs/digits.yaml: DiT
micro, 8x8x1 patch 2, K=4; configs/mnist10k.yaml: DiT small, 28x28x1 patch 4, K=8, read from the YAML files)
and each router (conv, mlp and dit architectures at the micro/tiny/small presets; the config's own is marked),
this prints
- the analytic FLOPs ratio (`router.model.router_flops_per_image` / `ddm.dit.dit_flops_per_image`), and
- the measured forward-time ratio: both jitted, warmed up, called in turn at the same batch, median of the
  rounds (wall time, and process CPU time as the steadier check on a loaded machine).
Goal (the issue): <= 10% of an expert's cost. The dit router's patch size is the `RouterConfig` default (2) and,
where the expert's differs, the expert's too. Parameters are random (cost does not depend on their values).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

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
)
from ddm.core.config import ModelConfig, RouterConfig, load_config, with_num_classes
from ddm.core.dit import count_params, dit_flops_per_image, dit_from_config
from ddm.router.model import router_flops_per_image, router_from_config

# Every shipped config, with the image shape and number of classes its data source gives (configs do not store
# them): digits runs are class-conditional (10 digits), mnist10k.npz has no labels.
SHAPES = {"digits.yaml": (8, 8, 1), "mnist10k.yaml": (28, 28, 1)}
CLASSES = {"digits.yaml": 10, "mnist10k.yaml": 0}


def shipped_configs() -> list[tuple[str, ModelConfig, tuple[int, int, int], int, RouterConfig]]:
    """(config file, expert ModelConfig, image shape, K, the config's router) of configs/*.yaml."""
    out = []
    for name, shape in SHAPES.items():
        cfg = load_config(REPO / "configs" / name)
        out.append((name, with_num_classes(cfg, CLASSES[name]).expert.model, shape, cfg.data.k, cfg.router))
    return out


PRESETS = ("micro", "tiny", "small")


def routers_for(expert: ModelConfig) -> list[RouterConfig]:
    out = [RouterConfig(arch=arch, preset=p) for arch in ("conv", "mlp") for p in PRESETS]
    for p in PRESETS:
        out.append(RouterConfig(arch="dit", preset=p))  # default patch size 2
        if expert.patch_size != RouterConfig().patch_size:
            out.append(RouterConfig(arch="dit", preset=p, patch_size=expert.patch_size))
    return out


def _label(router: RouterConfig) -> str:
    return f"{router.arch} {router.preset}" + (f" p{router.patch_size}" if router.arch == "dit" else "")


def _forward(module: nnx.Module):
    """A jitted forward (params as an argument, like sampling does) and the params."""
    graphdef, state = nnx.split(module)
    fn = jax.jit(lambda s, x, t, y: nnx.merge(graphdef, s)(x, t, y))
    return fn, state


def bench_config(name, expert_cfg, shape, k, default_router, batch, repeats) -> list[list[str]]:
    x = jax.random.normal(jax.random.key(0), (batch, *shape), jnp.float32)
    t = jax.random.uniform(jax.random.key(1), (batch,), jnp.float32)
    classes = expert_cfg.num_classes or 0  # a conditional config: expert and router both take the class
    y = jax.random.randint(jax.random.key(2), (batch,), 0, classes) if classes else None
    expert = dit_from_config(expert_cfg, shape, nnx.Rngs(0))
    expert_flops = dit_flops_per_image(expert_cfg, shape)
    fns, meta = {}, {}
    efn, estate = _forward(expert)
    fns["expert"] = lambda: efn(estate, x, t, y)
    role = "expert, conditional" if classes else "expert"
    meta["expert"] = (f"DiT {expert_cfg.preset} p{expert_cfg.patch_size} ({role})", count_params(expert), expert_flops)
    for router_cfg in routers_for(expert_cfg):
        router = router_from_config(router_cfg, shape, k, num_classes=expert_cfg.num_classes, rngs=nnx.Rngs(0))
        rfn, rstate = _forward(router)
        label = _label(router_cfg)
        fns[label] = lambda rfn=rfn, rstate=rstate: rfn(rstate, x, t, y)
        same = (router_cfg.arch, router_cfg.preset, router_cfg.patch_size) == (
            default_router.arch, default_router.preset, default_router.patch_size)
        marker = " (config default)" if same else ""
        meta[label] = (label + marker, count_params(router), router_flops_per_image(router_cfg, shape, k))
    timings = interleaved(fns, repeats=repeats, warmup=2, block=jax.block_until_ready)
    base = timings["expert"]
    rows = []
    for key, timing in timings.items():
        label, params, flops = meta[key]
        flops_ratio = flops / expert_flops
        time_ratio = timing.median / base.median
        cpu_ratio = timing.cpu_median / base.cpu_median
        goal = "-" if key == "expert" else ("yes" if max(flops_ratio, cpu_ratio) <= 0.10 else "no")
        rows.append([f"{name}: {shape[0]}x{shape[1]}x{shape[2]}, K={k}", label, f"{params:,}",
                     fmt(flops / 1e6), f"{flops_ratio:.1%}", f"{timing.median * 1e3:.2f}", f"{time_ratio:.1%}",
                     f"{cpu_ratio:.1%}", goal])
    return rows


HEADERS = ["config (image, clusters)", "model", "params", "MFLOPs / image", "FLOPs vs expert",
           "forward ms (batch)", "time vs expert (wall)", "time vs expert (CPU)", "<= 10%"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (median taken)")
    parser.add_argument("--batch", type=int, default=64, help="images per forward (default: sample.n = 64)")
    parser.add_argument("--config", action="append", choices=sorted(SHAPES), default=None,
                        help="only this shipped config (repeatable; default: all of them)")
    args = parser.parse_args()
    repeats = args.repeats or (3 if args.quick else 7)
    command = "python -m benchmarks.bench_router" + (" --quick" if args.quick else "") + (
        f" --repeats {args.repeats}" if args.repeats else "") + "".join(f" --config {c}" for c in args.config or [])
    print(machine_table(extra={"command": f"`{command}`", "batch": args.batch, "rounds": repeats}))
    print()
    rows = []
    for config in shipped_configs():
        if args.config and config[0] not in args.config:
            continue
        rows += bench_config(*config, args.batch, repeats)
        print(f"done: {config[0]} (load average {load_average()})", file=sys.stderr, flush=True)
    print(markdown_table(HEADERS, rows))
    print(f"\nload average after: {load_average()}")


if __name__ == "__main__":
    main()
