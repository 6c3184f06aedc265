"""Read throughput of cluster shards: `ShardReader.batch` in memory vs streaming, and raw tensorstore reads.

    python -m benchmarks.bench_shards [--seconds 2] [--chunk 256]

Writes two shards into a temporary folder: the 10,000 MNIST images of ../shared/data/mnist10k.npz (synthetic
28x28x1 noise when the file is absent) and 60,000 synthetic 28x28x1 images, chunked along N as `ddm prepare`
does. For each it times
- `ShardReader.batch` for global batches of 128 and 512, with the whole shard cached in memory and with
  `in_memory=False` (rows streamed from the zarr store each step, as for shards above 2 GiB);
- tensorstore's whole-array read (`open_shard(path).read()`), the cost an in-memory reader pays once.
Each timing runs consecutive steps (a fresh per-epoch permutation, so random rows) for about `--seconds`
after one warm-up batch. Prints a markdown table and the machine it ran on.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

from ddm.data.shards import ShardReader, open_shard, write_shard  # noqa: E402

MNIST10K = REPO.parent / "shared" / "data" / "mnist10k.npz"


def mnist_images() -> tuple[np.ndarray, str]:
    """[10000, 28, 28, 1] uint8 and a name for the table."""
    if MNIST10K.is_file():
        with np.load(MNIST10K) as f:
            images = f["data"]
        return images.reshape(len(images), 28, 28, 1).astype(np.uint8), "mnist10k"
    return synthetic(10_000, seed=1), "synthetic 10k (mnist10k absent)"


def synthetic(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)


def time_batches(reader: ShardReader, seconds: float) -> tuple[float, int]:
    """(images/s, steps) for consecutive steps run for about `seconds` after a warm-up step."""
    reader.batch(0)
    steps, t0 = 0, time.perf_counter()
    while True:
        reader.batch(steps + 1)
        steps += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds and steps >= 3:
            break
    return steps * reader.batch_size / elapsed, steps


def time_whole_read(path: str, repeats: int) -> float:
    """Median seconds of one whole-array read through tensorstore (store opened once)."""
    store = open_shard(path)
    store.read().result()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        store.read().result()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="time budget per reader measurement")
    parser.add_argument("--repeats", type=int, default=5, help="whole-array reads per shard (median)")
    parser.add_argument("--chunk", type=int, default=256, help="chunk length along N (data.chunk_images)")
    args = parser.parse_args()

    mnist, mnist_name = mnist_images()
    datasets = [(mnist_name, mnist), ("synthetic 60k", synthetic(60_000))]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, images in datasets:
            path = str(Path(tmp) / name.split()[0])
            t0 = time.perf_counter()
            write_shard(path, images, chunk=args.chunk)
            write_s = time.perf_counter() - t0
            size_mb = sum(f.stat().st_size for f in Path(path).iterdir()) / 1e6
            n = len(images)
            rows.append((name, n, "write_shard (whole array)", "-", f"{n / write_s:,.0f}", f"{write_s * 1e3:.1f}",
                         f"{size_mb:.1f} MB on disk"))
            whole_s = time_whole_read(path, args.repeats)
            rows.append((name, n, "tensorstore whole-array read", "-", f"{n / whole_s:,.0f}", f"{whole_s * 1e3:.1f}",
                         f"median of {args.repeats}"))
            for in_memory in (True, False):
                t0 = time.perf_counter()
                reader_proto = ShardReader([path], batch_size=128, seed=0, in_memory=in_memory)
                open_s = time.perf_counter() - t0
                del reader_proto
                for batch in (128, 512):
                    reader = ShardReader([path], batch_size=batch, seed=0, in_memory=in_memory)
                    rate, steps = time_batches(reader, args.seconds)
                    mode = "ShardReader.batch, in memory" if in_memory else "ShardReader.batch, streaming"
                    rows.append((name, n, mode, str(batch), f"{rate:,.0f}", f"{batch / rate * 1e3:.2f}",
                                 f"{steps} steps; reader opened in {open_s * 1e3:.0f} ms"))

    versions = {pkg: importlib.metadata.version(pkg) for pkg in ("numpy", "tensorstore")}
    print(f"machine: {os.cpu_count()} CPUs, {platform.platform()}, {platform.processor() or platform.machine()}; "
          f"Python {platform.python_version()}, " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print(f"shards: uint8 [N, 28, 28, 1], zarr via tensorstore, chunk {args.chunk} images along N\n")
    print("| data | N | operation | batch | images/s | ms per batch (or per call) | notes |")
    print("|---|---:|---|---:|---:|---:|---|")
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")


if __name__ == "__main__":
    main()
