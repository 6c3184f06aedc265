"""`ddm prepare` on a large memory-mapped float16 latent .npy (peak RSS, time), then the shard reader's
latents/s on the result, against what one island consumes.

    nice -n 10 python -m benchmarks.bench_prepare                 # 250,000 x 32x32x4 float16 = 2.0 GB
    python -m benchmarks.bench_prepare --n 20000 --keep DIR       # smaller; keep the files in DIR

The .npy is written by this script (random values a block at a time, in a temporary folder that is deleted at
the end) and prepared by `ddm prepare` in a child process, whose peak resident memory is its own VmHWM
(/proc/self/status, read as it exits). The reader part opens every cluster shard of the run as one streaming
`ShardReader` (in_memory=False: rows are read from the zarr chunks, as for data larger than RAM) and times
`--batches` random batches of `--batch` latents. The consumption figure it compares with is computed, not
measured: one 8-GPU H100 island training DiT-B/2 at `--mfu` (default 50%) of 989 TFLOP/s bf16 per GPU
consumes 8 x 0.5 x 989e12 / (3 x forward FLOPs per latent) latents/s (`ddm.core.dit.dit_flops`).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

from benchmarks.common import machine_table, markdown_table  # noqa: E402
from ddm.core.config import ModelConfig  # noqa: E402
from ddm.core.dit import dit_flops_per_image  # noqa: E402
from ddm.data.run import Run  # noqa: E402
from ddm.data.shards import ShardReader  # noqa: E402

SHAPE = (32, 32, 4)
CHILD = ("import sys; from ddm.app.cli import main; rc = main(sys.argv[1:]); "
         "print('VmHWM', open('/proc/self/status').read().split('VmHWM:')[1].split()[0]); sys.exit(rc)")
H100_BF16 = 989e12


def write_latents(path: Path, n: int, block: int = 10_000) -> None:
    """A float16 [n, 32, 32, 4] .npy of random SD-like latents (mean ~0.5, std ~5), written a block at a time."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, *SHAPE))
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((16, *SHAPE)).astype(np.float32) * 4.0
    for lo in range(0, n, block):
        m = min(block, n - lo)
        rows = centres[rng.integers(0, 16, m)] + rng.standard_normal((m, *SHAPE), dtype=np.float32) * 3.0 + 0.5
        out[lo:lo + m] = rows.astype(np.float16)
    out.flush()
    del out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=250_000)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--fit-samples", type=int, default=20_000)
    parser.add_argument("--chunk-images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--mfu", type=float, default=0.5)
    parser.add_argument("--keep", help="folder to keep the .npy and run in (default: a temporary one, deleted)")
    args = parser.parse_args(argv)

    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="ddm-bench-prepare-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        source, run_dir = folder / "latents.npy", folder / "run"
        t0 = time.perf_counter()
        write_latents(source, args.n)
        made = time.perf_counter() - t0
        size = source.stat().st_size
        # The child reports its own high-water mark (VmHWM of its address space after exec): getrusage's
        # RUSAGE_CHILDREN would also count this parent's pages, which the child holds between fork and exec.
        cmd = [sys.executable, "-c", CHILD, "prepare", "--config", str(REPO / "configs" / "digits-latents.yaml"),
               "--run-dir", str(run_dir), "--overwrite", "--set", f"data.source={source}", "--set", "data.labels=none",
               "--set", f"data.k={args.k}", "--set", f"data.fit_samples={args.fit_samples}",
               "--set", "data.embed_dim=32", "--set", f"data.chunk_images={args.chunk_images}",
               "--set", "data.holdout_fraction=0.004", "--set", "run_dir=unused"]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if done.returncode:
            print(done.stdout[-2000:], done.stderr[-2000:])
            return 1
        peak_rss = int(done.stdout.strip().splitlines()[-1].split()[1]) * 1024  # VmHWM is in KiB

        run = Run.open(run_dir)
        reader = ShardReader(run.shard_paths(), batch_size=args.batch, seed=0, cluster_ids=run.cluster_ids,
                             in_memory=False)
        reader.batch(0)  # open and warm the stores
        t0 = time.perf_counter()
        for step in range(1, args.batches + 1):
            reader.batch(step)
        read_rate = args.batches * args.batch / (time.perf_counter() - t0)
        flops = 3 * dit_flops_per_image(ModelConfig(preset="B", patch_size=2), SHAPE)
        island = 8 * args.mfu * H100_BF16 / flops

        print(markdown_table(["what", "value"], [
            ["input", f"float16 [{args.n:,}, 32, 32, 4] .npy, {size / 1e9:.2f} GB (written in {made:.0f} s)"],
            ["ddm prepare", f"K={args.k}, fit_samples={args.fit_samples:,}, pca 32, chunk {args.chunk_images}"],
            ["prepare wall time", f"{seconds:.0f} s"],
            ["prepare peak RSS", f"{peak_rss / 2**30:.2f} GiB"],
            ["reader (streaming, random batches of {})".format(args.batch), f"{read_rate:,.0f} latents/s"],
            ["one 8xH100 island, DiT-B/2 at {:.0%} MFU".format(args.mfu),
             f"{island:,.0f} latents/s (3 x {flops / 3 / 1e9:.1f} GFLOP per latent)"],
        ]))
        print()
        print(machine_table(extra={"command": "python -m benchmarks.bench_prepare " + " ".join(argv or sys.argv[1:])}))
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
