"""Streaming `ShardReader` throughput on float16 latent shards larger than the in-memory limit: the global
permutation (the reader before chunk-aware shuffling) against the chunk-aware order, with and without
background prefetch, against what one island consumes.

    nice -n 15 python -m benchmarks.bench_reader                  # 8 shards, 250,000 x 32x32x4 float16 = 2.0 GB
    python -m benchmarks.bench_reader --n 20000 --batches 20      # a quick look

The shards are written by this script (random values, `ShardWriter`, zarr chunks of `--chunk` latents) in a
temporary folder deleted at the end; every reader streams them (`in_memory=False`, as for shards larger than
RAM). After the OS page cache holds them (they were just written), this measures decode + gather, not disk.
Each mode reads `--batches` consecutive batches of `--batch` after one warm-up batch:

- "read": the trainer's loop with nothing else to do (latents/s of the reader alone);
- "with a consumer": each batch is followed by `--step-ms` of sleep standing in for the device's train step
  (the host thread is free, as while a jitted step runs); reported is the mean wait for a batch per step,
  which prefetch should bring to ~0 once the reader is faster than the step.

The consumption figure is computed, not measured: one 8-GPU H100 island training DiT-B/2 at `--mfu` (default
50%) of 989 TFLOP/s bf16 per GPU consumes 8 x mfu x 989e12 / (3 x forward FLOPs per latent) latents/s.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

from benchmarks.common import machine_table, markdown_table  # noqa: E402
from ddm.core.config import ModelConfig  # noqa: E402
from ddm.core.dit import dit_flops_per_image  # noqa: E402
from ddm.data.shards import ShardReader, ShardWriter  # noqa: E402

SHAPE = (32, 32, 4)
H100_BF16 = 989e12


def write_shards(folder: Path, n: int, k: int, chunk: int, block: int = 8192) -> list[str]:
    """`k` float16 shards of about n / k random latents each (std ~3, like SD latents); their paths."""
    rng = np.random.default_rng(0)
    paths = []
    for i, size in enumerate(np.diff(np.linspace(0, n, k + 1).astype(int))):
        path = str(folder / f"cluster_{i}")
        writer = ShardWriter(path, int(size), SHAPE, np.float16, labelled=False, chunk=chunk)
        for lo in range(0, size, block):
            m = min(block, size - lo)
            writer.write(lo, (rng.standard_normal((m, *SHAPE), dtype=np.float32) * 3.0).astype(np.float16))
        writer.finish(cluster=i)
        paths.append(path)
    return paths


def timed(reader: ShardReader, batches: int, step_s: float) -> tuple[float, float]:
    """(seconds for `batches` batches after a warm-up one, mean seconds waited for a batch per step)."""
    reader.batch(0)
    waited, t0 = 0.0, time.perf_counter()
    for step in range(1, batches + 1):
        t = time.perf_counter()
        reader.batch(step)
        waited += time.perf_counter() - t
        if step_s:
            time.sleep(step_s)
    total = time.perf_counter() - t0
    reader.close()
    return total, waited / batches


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=250_000)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--chunk", type=int, default=64, help="zarr chunk length (latents)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--buffer", type=int, default=8192, help="shuffle buffer (rows) of the chunk-aware order")
    parser.add_argument("--prefetch", type=int, default=4)
    parser.add_argument("--step-ms", type=float, default=50.0, help="the stand-in consumer's step time")
    parser.add_argument("--mfu", type=float, default=0.5)
    args = parser.parse_args(argv)

    folder = Path(tempfile.mkdtemp(prefix="ddm-bench-reader-"))
    try:
        t0 = time.perf_counter()
        paths = write_shards(folder, args.n, args.k, args.chunk)
        made = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        modes = [("global permutation (old reader)", "global", 0), ("chunk-aware", "chunks", 0),
                 (f"chunk-aware + prefetch {args.prefetch}", "chunks", args.prefetch)]
        rows = []
        for name, shuffle, prefetch in modes:
            kw = {"batch_size": args.batch, "seed": 0, "in_memory": False, "shuffle": shuffle,
                  "shuffle_buffer": args.buffer, "prefetch": prefetch}
            seconds, _ = timed(ShardReader(paths, **kw), args.batches, 0.0)
            _, wait = timed(ShardReader(paths, **kw), args.batches, args.step_ms / 1e3)
            rows.append([name, f"{args.batches * args.batch / seconds:,.0f}", f"{1e3 * wait:.1f}"])
        flops = 3 * dit_flops_per_image(ModelConfig(preset="B", patch_size=2), SHAPE)
        island = 8 * args.mfu * H100_BF16 / flops
        print(f"{args.k} float16 shards, {args.n:,} x 32x32x4 latents, {size / 1e9:.2f} GB on disk (written in "
              f"{made:.0f} s), chunks of {args.chunk}, batches of {args.batch}, shuffle buffer {args.buffer:,} "
              f"rows; load average {os.getloadavg()[0]:.1f}")
        print()
        print(markdown_table(["reader (streaming)", "read: latents/s", f"wait per step with a {args.step_ms:g} ms "
                              "consumer (ms)"], rows))
        print()
        print(f"one 8xH100 island, DiT-B/2 at {args.mfu:.0%} MFU: {island:,.0f} latents/s "
              f"(3 x {flops / 3 / 1e9:.1f} GFLOP per latent)")
        print()
        print(machine_table(extra={"command": "python -m benchmarks.bench_reader " + " ".join(argv or sys.argv[1:])}))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
