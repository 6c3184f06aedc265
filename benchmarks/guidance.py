"""Class accuracy of guided samples per class: the done-when check of issue 12.

    python -m benchmarks.guidance [--run-dir runs/digits] [--n 100] [--scales 1,3] [--strategy top1,prior]
        [--out runs/digits/eval/guidance] [--grid docs/img/digits_guided.png]

For every routing strategy (comma-separated; default top1 and prior, whose p(k | y) comes from the class
counts), class C and scale S this runs exactly the user's command

    ddm sample --run-dir RUN --n N --class C --cfg-scale S --strategy STRATEGY --out OUT/STRATEGY/c<C>_s<S>.png

(in this process, through `ddm.app.cli.main`, so the run's own sample settings apply: steps, solver, seed) and
reads the N images with two classifiers trained on the run's real training images and their true labels:
- `cls<C>-cnn`: the project's class classifier (`ddm.eval.featurenet.get_classifier`, what `ddm evaluate` uses);
- `svc`: scikit-learn's SVC (RBF kernel, gamma = 1 / (D * pixel variance), C=10) on the pixels in [0, 1], an
  independent check with no code in common with ours.
Each classifier's accuracy on the held-out images is printed as its ceiling. Prints a markdown table (accuracy
per class, strategy and scale, by both classifiers) and, with --grid, writes one PNG with the first 8 samples of
each class at each strategy and scale (a row per class, side by side).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

from benchmarks.common import machine_table, markdown_table
from ddm.app.cli import main as ddm_main
from ddm.data.run import Run
from ddm.data.shards import read_labels, read_shard
from ddm.eval.featurenet import get_classifier, run_training_set
from ddm.train.plots import save_strategy_figure

GRID_PER_CLASS = 8


def svc_classifier(images: np.ndarray, labels: np.ndarray):
    """scikit-learn SVC on flattened pixels in [0, 1]; returns predict(images uint8 [N, H, W, C]) -> [N]."""
    from sklearn.svm import SVC

    x = images.reshape(len(images), -1) / 255.0
    svc = SVC(C=10.0, gamma=1.0 / (x.shape[1] * x.var())).fit(x, labels)
    return lambda imgs: svc.predict(imgs.reshape(len(imgs), -1) / 255.0).astype(np.int32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default="runs/digits")
    parser.add_argument("--n", type=int, default=100, help="images per class and scale")
    parser.add_argument("--scales", default="1,3", help="comma-separated guidance scales")
    parser.add_argument("--strategy", default="top1,prior", help="routing strategies, comma-separated")
    parser.add_argument("--out", default=None, help="sample folder (default RUN/eval/guidance)")
    parser.add_argument("--grid", default=None, help="also write a PNG of the first 8 samples per class and scale")
    args = parser.parse_args()
    scales = [float(s) for s in args.scales.split(",")]
    strategies = [s.strip() for s in args.strategy.split(",") if s.strip()]
    columns = [(strategy, scale) for strategy in strategies for scale in scales]
    run = Run.open(args.run_dir)
    out = Path(args.out) if args.out else run.eval_dir / "guidance"

    images, labels = run_training_set(run)
    holdout, holdout_labels = read_shard(run.holdout_path()), read_labels(run.holdout_path())
    cnn = get_classifier(run)
    classifiers = {cnn.name: cnn.predict, "svc": svc_classifier(images, labels)}
    ceiling = {name: float((predict(holdout) == holdout_labels).mean()) for name, predict in classifiers.items()}

    accuracy: dict[tuple[str, str, float], list[float]] = {}  # (classifier, strategy, scale) -> per class
    grids: dict[str, list[np.ndarray]] = {_title(st, s): [] for st, s in columns}
    seconds = 0.0
    for strategy, scale in columns:
        for c in range(run.num_classes):
            png = out / strategy.replace(":", "_") / f"c{c}_s{scale:g}.png"
            t0 = time.perf_counter()
            code = ddm_main(["sample", "--run-dir", str(run.root), "--n", str(args.n), "--class", str(c),
                             "--cfg-scale", str(scale), "--strategy", strategy, "--out", str(png)])
            seconds += time.perf_counter() - t0
            if code != 0:
                raise SystemExit(f"ddm sample failed for class {c}, strategy {strategy}, scale {scale}")
            with np.load(png.with_suffix(".npz")) as arrays:
                samples = arrays["images"]
                assert json.loads(str(arrays["request"]))["labels"] == [c] * args.n
            for name, predict in classifiers.items():
                accuracy.setdefault((name, strategy, scale), []).append(float((predict(samples) == c).mean()))
            grids[_title(strategy, scale)].append(samples[:GRID_PER_CLASS])

    names = run.class_names or [str(c) for c in range(run.num_classes)]
    keys = [(name, st, s) for st, s in columns for name in classifiers]
    headers = ["class"] + [f"{name} @ {_title(st, s)}" for name, st, s in keys]
    rows = [[names[c]] + [f"{accuracy[key][c]:.0%}" for key in keys] for c in range(run.num_classes)]
    rows.append(["**mean**"] + [f"**{np.mean(accuracy[key]):.1%}**" for key in keys])
    rows.append(["**worst class**"] + [f"{min(accuracy[key]):.0%}" for key in keys])
    print(machine_table(extra={"command": " ".join(sys.argv), "run": str(run.root)}))
    print()
    print(f"{args.n} samples per class, strategy and scale ({', '.join(strategies)}; the run's sample settings: "
          f"{run.config.sample.steps} {run.config.sample.solver} steps, seed {run.config.sample.seed}); "
          f"sampling took {seconds:.0f}s in all. Classifier accuracy on the {len(holdout)} held-out images: "
          + ", ".join(f"{name} {acc:.1%}" for name, acc in ceiling.items()) + ".")
    print()
    print(markdown_table(headers, rows))
    if args.grid:
        figure = {title: np.concatenate(parts) for title, parts in grids.items()}
        save_strategy_figure(figure, args.grid, ncols=GRID_PER_CLASS)
        print(f"\ngrid -> {args.grid}")


def _title(strategy: str, scale: float) -> str:
    return f"{strategy} cfg {scale:g}"


if __name__ == "__main__":
    main()
