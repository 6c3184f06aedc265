"""Writes a small latent dataset for `configs/digits-latents.yaml`: the 1,797 digits as float16 "latents"
[N, 8, 8, 4] with their class labels, in the range and precision of SD-VAE latents (not centred, std ~4).

    python -m benchmarks.make_latents [--out runs/digits-latents.npz]
    ddm run --config configs/digits-latents.yaml

No VAE is involved (none ships offline): channel 0 is the digit, channel 1 its negative, channel 2 a blurred
copy, channel 3 a fixed per-pixel pattern plus noise, each with its own offset and scale, so the per-channel
normalisation (`ddm.core.codec`) has something to undo. The script is the recipe's stand-in for "encode your
images with your VAE and save `latents` (+ `labels`) in an .npz".
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def digit_latents(n: int | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(latents float16 [n, 8, 8, 4], labels int64 [n]) from scikit-learn's digits (all 1,797 by default)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x, labels = digits.images[:n] / 16.0, digits.target[:n]
    rng = np.random.default_rng(seed)
    blurred = (x + np.roll(x, 1, 1) + np.roll(x, -1, 1) + np.roll(x, 1, 2) + np.roll(x, -1, 2)) / 5.0
    pattern = np.sin(np.arange(64).reshape(8, 8))[None]
    channels = [6.0 * x - 1.0, 2.0 - 4.0 * x, 8.0 * blurred + 0.5, pattern + 0.3 * rng.standard_normal(x.shape)]
    return np.stack(channels, axis=-1).astype(np.float16), labels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "runs" / "digits-latents.npz"))
    args = parser.parse_args(argv)
    latents, labels = digit_latents()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, latents=latents, labels=labels)
    print(f"{len(latents)} latents {latents.dtype} {list(latents.shape[1:])} with labels -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
