"""Caption following of a run conditioned on the captioned digits' embeddings (`configs/digits-captions.yaml`).

    python -m benchmarks.captions --run-dir RUN [--n 10] [--scales 1,3] [--strategy top1,full] [--out DIR]

Every caption the captioned digits can have (10 digits x 3 thicknesses x 3 slants = 90 strings,
`ddm.data.captions.caption`) is embedded with `ddm.data.captions.encode` (the run's `sample.condition_encoder`),
n rows each, into one conditions file OUT/captions.npy of 90 n rows; then for every strategy and scale this runs
exactly the user's command

    ddm sample --run-dir RUN --conditions OUT/captions.npy --cfg-scale S --strategy STRATEGY --out OUT/STRATEGY_sS.png

(in this process, through `ddm.app.cli.main`: the run's own steps, solver and seed apply) and reads the images:
- class accuracy: the share an SVC reads as the caption's digit (`benchmarks.guidance.svc_classifier`: RBF on the
  pixels in [0, 1], trained on all 1,797 digits with their labels; no code in common with the models);
- attribute agreement: `ddm.data.captions.caption_attributes` of each image against its caption's digit; the
  share whose thickness, slant, and both, are the caption's.
A reference row, "no caption", is `ddm sample` without conditions (the null condition, top1, no guidance) scored
against the same captions: what ignoring the caption gives (chance: 10% class, about 1/3 per attribute).
Prints a markdown table; --grid writes the first 8 images of one caption per digit for each column.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import machine_table, markdown_table
from benchmarks.guidance import svc_classifier
from ddm.app.cli import main as ddm_main
from ddm.data import captions
from ddm.data.run import Run

GRID_PER_CAPTION = 8


def caption_set() -> tuple[list[str], np.ndarray]:
    """The 90 captions in (digit, thickness, slant) order and their int32 [90, 3] (digit, thickness, slant)."""
    parts = [(d, t, s) for d in range(captions.NUM_DIGITS) for t in range(len(captions.THICKNESS))
             for s in range(len(captions.SLANT))]
    return [captions.caption(*p) for p in parts], np.asarray(parts, np.int32)


def score(images: np.ndarray, wanted: np.ndarray, predict) -> dict[str, float]:
    """Shares of images uint8 [N, 8, 8, 1] following their captions wanted int [N, 3] (digit, thickness, slant)."""
    measured = captions.caption_attributes(images, wanted[:, 0])
    thick, slant = measured["thickness"] == wanted[:, 1], measured["slant"] == wanted[:, 2]
    return {"class": float((predict(images) == wanted[:, 0]).mean()), "thickness": float(thick.mean()),
            "slant": float(slant.mean()), "both": float((thick & slant).mean())}


def _sample(args: list[str]) -> np.ndarray:
    if ddm_main(["sample", *args]) != 0:
        raise SystemExit(f"ddm sample {' '.join(args)} failed")
    out = Path(args[args.index("--out") + 1]).with_suffix(".npz")
    with np.load(out) as arrays:
        return arrays["images"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default="runs/digits-captions")
    parser.add_argument("--n", type=int, default=10, help="images per caption (90 captions)")
    parser.add_argument("--scales", default="1,3", help="comma-separated guidance scales")
    parser.add_argument("--strategy", default="top1,full", help="routing strategies, comma-separated")
    parser.add_argument("--out", default=None, help="sample folder (default RUN/eval/captions)")
    parser.add_argument("--grid", default=None, help="also write a PNG: per column, 8 images of one caption per digit")
    args = parser.parse_args()
    scales = [float(s) for s in args.scales.split(",")]
    strategies = [s.strip() for s in args.strategy.split(",") if s.strip()]
    run = Run.open(args.run_dir)
    if not run.condition_shape:
        raise SystemExit(f"{run.root} is not conditioned on embeddings (configs/digits-captions.yaml makes one)")
    out = Path(args.out) if args.out else run.eval_dir / "captions"
    out.mkdir(parents=True, exist_ok=True)

    texts, parts = caption_set()
    wanted = np.repeat(parts, args.n, axis=0)  # caption i's n images are rows i n .. (i + 1) n - 1
    conditions = out / "captions.npy"
    np.save(conditions, captions.encode(list(np.repeat(texts, args.n))))
    predict = svc_classifier(*captions.digits())
    n = str(len(wanted))

    results: dict[str, dict[str, float]] = {}
    grids: dict[str, np.ndarray] = {}
    seconds = 0.0
    t0 = time.perf_counter()
    images = _sample(["--run-dir", str(run.root), "--n", n, "--strategy", "top1", "--out", str(out / "none.png")])
    seconds += time.perf_counter() - t0
    results["no caption (null condition), top1"] = score(images, wanted, predict)
    for strategy in strategies:
        for scale in scales:
            title = f"{strategy}, cfg {scale:g}"
            png = out / f"{strategy.replace(':', '_')}_s{scale:g}.png"
            t0 = time.perf_counter()
            images = _sample(["--run-dir", str(run.root), "--conditions", str(conditions), "--cfg-scale", str(scale),
                              "--strategy", strategy, "--out", str(png)])
            seconds += time.perf_counter() - t0
            results[title] = score(images, wanted, predict)
            # one caption per digit ("a regular D upright"), its first 8 images
            first = [(d * 9 + 4) * args.n for d in range(captions.NUM_DIGITS)]
            grids[title] = np.concatenate([images[i:i + min(args.n, GRID_PER_CAPTION)] for i in first])

    headers = ["samples", "class accuracy", "thickness", "slant", "both"]
    rows = [[name, f"{r['class']:.1%}", f"{r['thickness']:.1%}", f"{r['slant']:.1%}", f"{r['both']:.1%}"]
            for name, r in results.items()]
    rows.append(["chance", "10.0%", "33.3%", "33.3%", "11.1%"])
    print(machine_table(extra={"command": " ".join(sys.argv), "run": str(run.root)}))
    print()
    print(f"{args.n} images per caption x 90 captions = {n} per row (the run's sample settings: "
          f"{run.config.sample.steps} {run.config.sample.solver} steps, seed {run.config.sample.seed}); sampling took "
          f"{seconds:.0f}s in all. Class: scikit-learn SVC trained on all 1,797 digits; attributes: "
          "caption_attributes against the caption's digit.")
    print()
    print(markdown_table(headers, rows))
    if args.grid:
        from ddm.train.plots import save_strategy_figure

        save_strategy_figure(grids, args.grid, ncols=GRID_PER_CAPTION)
        print(f"\ngrid -> {args.grid}")


if __name__ == "__main__":
    main()
