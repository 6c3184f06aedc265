"""Class accuracy of guided samples per class: the done-when check of issue 12.

    python benchmarks/guidance.py [--run-dir runs/digits] [--n 100] [--scales 1,3] [--strategy top1]
        [--out runs/digits/eval/guidance] [--grid docs/img/digits_guided.png]

For every class C and scale S this runs exactly the user's command

    ddm sample --run-dir RUN --n N --class C --cfg-scale S --strategy STRATEGY --out OUT/c<C>_s<S>.png

(in this process, through `ddm.app.cli.main`, so the run's own sample settings apply: steps, solver, seed) and
reads the N images with two classifiers trained on the run's real training images and their true labels:
- `cls<C>-cnn`: the project's class classifier (`ddm.eval.featurenet.get_classifier`, what `ddm evaluate` uses);
- `svc`: scikit-learn's SVC (RBF kernel, gamma = 1 / (D * pixel variance), C=10) on the pixels in [0, 1], an
  independent check with no code in common with ours.
Each classifier's accuracy on the held-out images is printed as its ceiling. Prints a markdown table (accuracy
per class and scale, by both classifiers) and, with --grid, writes one PNG with the first 8 samples of each
class at each scale (a row per class, scales side by side).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

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
    parser.add_argument("--strategy", default="top1")
    parser.add_argument("--out", default=None, help="sample folder (default RUN/eval/guidance)")
    parser.add_argument("--grid", default=None, help="also write a PNG of the first 8 samples per class and scale")
    args = parser.parse_args()
    scales = [float(s) for s in args.scales.split(",")]
    run = Run.open(args.run_dir)
    out = Path(args.out) if args.out else run.eval_dir / "guidance"

    images, labels = run_training_set(run)
    holdout, holdout_labels = read_shard(run.holdout_path()), read_labels(run.holdout_path())
    cnn = get_classifier(run)
    classifiers = {cnn.name: cnn.predict, "svc": svc_classifier(images, labels)}
    ceiling = {name: float((predict(holdout) == holdout_labels).mean()) for name, predict in classifiers.items()}

    accuracy: dict[tuple[str, float], list[float]] = {}  # (classifier, scale) -> accuracy per class
    grids: dict[str, list[np.ndarray]] = {f"cfg {s:g}": [] for s in scales}
    seconds = 0.0
    for scale in scales:
        for c in range(run.num_classes):
            png = out / f"c{c}_s{scale:g}.png"
            t0 = time.perf_counter()
            code = ddm_main(["sample", "--run-dir", str(run.root), "--n", str(args.n), "--class", str(c),
                             "--cfg-scale", str(scale), "--strategy", args.strategy, "--out", str(png)])
            seconds += time.perf_counter() - t0
            if code != 0:
                raise SystemExit(f"ddm sample failed for class {c}, scale {scale}")
            with np.load(png.with_suffix(".npz")) as arrays:
                samples = arrays["images"]
                assert json.loads(str(arrays["request"]))["labels"] == [c] * args.n
            for name, predict in classifiers.items():
                accuracy.setdefault((name, scale), []).append(float((predict(samples) == c).mean()))
            grids[f"cfg {scale:g}"].append(samples[:GRID_PER_CLASS])

    names = run.class_names or [str(c) for c in range(run.num_classes)]
    headers = ["class"] + [f"{name} @ cfg {s:g}" for s in scales for name in classifiers]
    rows = [[names[c]] + [f"{accuracy[name, s][c]:.0%}" for s in scales for name in classifiers]
            for c in range(run.num_classes)]
    rows.append(["**mean**"] + [f"**{np.mean(accuracy[name, s]):.1%}**" for s in scales for name in classifiers])
    rows.append(["**worst class**"] + [f"{min(accuracy[name, s]):.0%}" for s in scales for name in classifiers])
    print(machine_table(extra={"command": " ".join(sys.argv), "run": str(run.root)}))
    print()
    print(f"{args.n} samples per class and scale ({args.strategy}, the run's sample settings: "
          f"{run.config.sample.steps} {run.config.sample.solver} steps, seed {run.config.sample.seed}); "
          f"sampling took {seconds:.0f}s in all. Classifier accuracy on the {len(holdout)} held-out images: "
          + ", ".join(f"{name} {acc:.1%}" for name, acc in ceiling.items()) + ".")
    print()
    print(markdown_table(headers, rows))
    if args.grid:
        figure = {title: np.concatenate(parts) for title, parts in grids.items()}
        save_strategy_figure(figure, args.grid, ncols=GRID_PER_CLASS)
        print(f"\ngrid -> {args.grid}")


if __name__ == "__main__":
    main()
