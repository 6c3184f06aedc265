"""Expert training throughput on this machine's CPU: images/s of the shared trainer's step.

For each DiT preset (tiny on 8x8x1 digits-like images, S on 32x32x4 latent-like images, patch 2) the step is
timed on 1 CPU device and on 8 fake CPU devices (meshes data x fsdp = 8x1 and 2x4). Every configuration runs
in its own subprocess, because the device count is fixed when XLA starts (`--xla_force_host_platform_device_count`).

The timed step is exactly the trainer's: `Trainer._step` (jit, donated state, sharded in/out), fed through
`Trainer._global_batch` from a synthetic reader (random uint8 images; the data path is not what is measured).
Reported per configuration: compile time, step time after one warm-up step (median of 3 timing windows
when there are enough steps) with the process CPU time per step beside it (all threads; steadier than wall
time on a shared machine), images/s, the sharding overhead ratio (step time / 1-device step time of the same
preset: the 8 fake devices share the same cores, so a ratio above 1 is partitioning, collective and
replicated-work overhead), and peak host memory (ru_maxrss of the worker).

    python -m benchmarks.bench_train                 # both presets: ~5 minutes on 2 cores, ~8 when busy
    python -m benchmarks.bench_train --presets tiny  # ~2 minutes
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# preset -> (image shape, default batch, default timed steps). S is ~450x the FLOPs of tiny per image at 32x32:
# a handful of images per step keeps the whole benchmark within minutes on 2 cores.
PRESETS = {"tiny": ((8, 8, 1), 64, 15), "S": ((32, 32, 4), 8, 1)}
LAYOUTS = [(1, 1, 1), (8, 8, 1), (8, 2, 4)]  # (devices, mesh data, mesh fsdp)


# ---------------------------------------------------------------------------------------------------------
# Worker: one (preset, devices, mesh) configuration in a fresh process.
# ---------------------------------------------------------------------------------------------------------


class SyntheticReader:
    """Random uint8 batches with the `ShardReader` interface the trainer uses."""

    def __init__(self, image_shape, batch_size: int, seed: int = 0):
        import numpy as np

        self.image_shape, self.batch_size, self.seed = tuple(image_shape), batch_size, seed
        self.num_images, self.process_index = 1 << 20, 0
        rng = np.random.default_rng(seed)
        self._images = rng.integers(0, 256, (4, batch_size, *image_shape), dtype=np.uint8)
        self._labels = np.zeros(batch_size, np.int32)

    def position(self, step: int):
        from ddm.data.shards import ReaderPosition

        return ReaderPosition(epoch=0, offset=step * self.batch_size)

    def batch(self, step: int):
        return self._images[step % len(self._images)], self._labels, self._labels


def worker(args) -> None:
    import functools
    import resource

    import jax

    from ddm.core.config import ModelConfig, TrainConfig
    from ddm.core.dit import dit_flops_per_image
    from ddm.experts.train import flow_loss, make_dit
    from ddm.train.trainer import Task, Trainer

    image_shape = tuple(args.image)
    model_cfg = ModelConfig(preset=args.preset, patch_size=2)
    task = Task(name=f"bench {args.preset}", make_model=functools.partial(make_dit, model_cfg, image_shape),
                loss=functools.partial(flow_loss, "logit_normal", 0.0, 0),  # unconditional
                reader=SyntheticReader(image_shape, args.batch), out_dir=Path("/nonexistent"), meta={})
    cfg = TrainConfig(steps=1000, batch_size=args.batch, warmup_steps=10, mesh_data=args.data, mesh_fsdp=args.fsdp)
    trainer = Trainer(task, cfg, progress=False)
    with jax.set_mesh(trainer.mesh):
        state = trainer._init()
        batch = trainer._global_batch(0)
        t0 = time.perf_counter()
        compiled = trainer._step.lower(state, *batch).compile()
        compile_s = time.perf_counter() - t0
        state, metrics = compiled(state, *batch)  # warm-up
        jax.block_until_ready(metrics["loss"])
        # Timed in windows of `steps // 3` steps (or 1); the median window resists load spikes from other jobs.
        per_window = max(1, args.steps // 3)
        windows = []  # (wall, process CPU) seconds per step
        for w in range(max(1, args.steps // per_window)):
            t0, c0 = time.perf_counter(), time.process_time()
            for step in range(1 + w * per_window, 1 + (w + 1) * per_window):
                state, metrics = compiled(state, *trainer._global_batch(step))
            jax.block_until_ready((state, metrics))
            windows.append(((time.perf_counter() - t0) / per_window, (time.process_time() - c0) / per_window))
        step_s, cpu_s = sorted(windows)[len(windows) // 2]
    sharded = sum("fsdp" in leaf.sharding.spec for leaf in jax.tree.leaves(state["params"]))
    print(json.dumps({
        "preset": args.preset, "image": list(image_shape), "batch": args.batch, "devices": jax.device_count(),
        "mesh": f"{args.data}x{args.fsdp}", "params": trainer.num_params, "sharded_leaves": sharded,
        "compile_s": compile_s, "step_s": step_s, "cpu_s": cpu_s, "images_per_s": args.batch / step_s,
        "gflops_per_image_fwd": dit_flops_per_image(model_cfg, image_shape) / 1e9,
        "loss": float(metrics["loss"]), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))


# ---------------------------------------------------------------------------------------------------------
# Driver.
# ---------------------------------------------------------------------------------------------------------


def run_config(preset: str, devices: int, data: int, fsdp: int, batch: int, steps: int) -> dict:
    image = PRESETS[preset][0]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROC", "DDM_"))}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # compile time is part of the report
    cmd = [sys.executable, "-m", "benchmarks.bench_train", "--worker", "--preset", preset, "--image", *map(str, image),
           "--batch", str(batch), "--steps", str(steps), "--data", str(data), "--fsdp", str(fsdp)]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"worker {preset} {devices} devices {data}x{fsdp} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(rows: list[dict], machine: str) -> str:
    lines = [
        machine,
        "",
        ("| preset | input | params | batch | devices | mesh (data x fsdp) | compile s | step ms | CPU s / step "
         "| images/s | overhead vs 1 device | peak RSS MiB |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = {r["preset"]: r["step_s"] for r in rows if r["devices"] == 1}
    for r in rows:
        ratio = r["step_s"] / base[r["preset"]] if r["preset"] in base else float("nan")
        lines.append(
            f"| {r['preset']} | {'x'.join(map(str, r['image']))} | {r['params'] / 1e6:.2f}M | {r['batch']} "
            f"| {r['devices']} | {r['mesh']} | {r['compile_s']:.1f} | {r['step_s'] * 1e3:,.0f} | {r['cpu_s']:.3g} "
            f"| {r['images_per_s']:.3g} | {ratio:.2f}x | {r['peak_rss_mb']:,.0f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--batch", type=int, default=None, help="global batch (default: per preset)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: per preset)")
    # worker-only arguments
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--preset", help=argparse.SUPPRESS)
    parser.add_argument("--image", type=int, nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--fsdp", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)

    from benchmarks.common import load_average, machine_table

    load_at_start = load_average()
    t0 = time.perf_counter()
    rows = []
    for preset in args.presets:
        _, batch, steps = PRESETS[preset]
        for devices, data, fsdp in LAYOUTS:
            row = run_config(preset, devices, data, fsdp, args.batch or batch, args.steps or steps)
            rows.append(row)
            print(f"  {preset:>4} {devices} device(s) mesh {row['mesh']}: {row['images_per_s']:.3g} img/s, "
                  f"step {row['step_s'] * 1e3:.0f} ms, compile {row['compile_s']:.0f}s", file=sys.stderr)
    command = "python -m benchmarks.bench_train" + "".join(
        f" --{k} {v}" for k, v in (("batch", args.batch), ("steps", args.steps)) if v)
    if args.presets != list(PRESETS):
        command += " --presets " + " ".join(args.presets)
    machine = machine_table(extra={"load average at start": load_at_start, "command": f"`{command}`"})
    print(table(rows, machine))
    print(f"\n(total {time.perf_counter() - t0:.0f}s)")


if __name__ == "__main__":
    main()
