"""Cost of checking a shard against its digest when a reader opens it (once per process).

    python -m benchmarks.bench_shard_digest [--sizes 10000,60000,300000]

Writes synthetic 28x28x1 uint8 shards with int32 labels (chunked along N as `ddm prepare` does) and times
- opening a `ShardReader` without a digest (tensorstore read of the whole shard into memory),
- the same with `digests=[...]` (the content SHA-256 over the rows it already holds),
- `shard_sha256` of rows already in memory (the digest's own cost, without any read),
- `verify_shard` of a streamed shard (reads and hashes it block by block, as for shards above 2 GiB).
Each timing is the median of 3 (the per-process cache of checked shards is cleared between runs). Prints a
markdown table and the machine it ran on.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

from ddm.data import shards  # noqa: E402


def _median(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        shards._VERIFIED.clear()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,60000,300000")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.system()}")
    print("| images (28x28x1) | MB | open | open + digest | digest overhead | sha256 in memory | streamed verify |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(v) for v in args.sizes.split(",")):
            images = rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)
            labels = rng.integers(0, 10, n).astype(np.int32)
            path = str(Path(tmp) / f"shard_{n}")
            sha = shards.write_shard(path, images, labels, 256, cluster=0)
            plain = _median(lambda: shards.ShardReader([path], batch_size=128, seed=0))
            checked = _median(lambda: shards.ShardReader([path], batch_size=128, seed=0, digests=[sha]))
            hashing = _median(lambda: shards.shard_sha256(images, labels))
            streamed = _median(lambda: shards.verify_shard(path, sha, 0))
            print(f"| {n:,} | {images.nbytes / 1e6:.0f} | {plain:.3f}s | {checked:.3f}s | "
                  f"{(checked - plain) / plain:+.0%} | {hashing:.3f}s | {streamed:.3f}s |")


if __name__ == "__main__":
    main()
