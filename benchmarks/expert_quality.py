"""Each expert on its own cluster, against the monolith's samples that fall in that cluster.

    python -m benchmarks.expert_quality --run-dir RUN [--n 200] [--monolith-n 2000] [--steps 20] [--seed 0]

For a finished run with experts and a monolith (`benchmarks/experiment.py` leaves them), per cluster k:
- real: the held-out images whose nearest centroid is k (`Run.holdout_set`, the prepare-time assignment);
- expert: `--n` samples of expert k alone (`single:k`);
- monolith: the monolith's samples (`--monolith-n` drawn once) whose nearest centroid is k, under the same
  rule as the held-out images (the prepare-time embedding, fitted again exactly as `ddm prepare` fitted it; the
  script checks it reproduces the held-out images' stored clusters and prints the agreement);
- train: the first images of cluster k's training shard (the floor: real images against real images).
Every FD of a cluster uses the same number of images on each generated side (the smallest of the three sets),
so the small-sample bias is the same for the three columns. FD is in the run's feature net
(RUN/eval/featurenet, trained if absent), the one `ddm evaluate` reports. Prints a markdown table and writes
RUN/eval/expert_quality.json.

What it answers: when the ensemble (drawn from the prior) and the monolith are level overall, is each expert
better or worse than the monolith on the data the expert owns?
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from benchmarks.common import markdown_table
from ddm.data.embed import fit_embedding
from ddm.data.kmeans import assign
from ddm.data.prepare import fit_sample
from ddm.data.run import Run
from ddm.data.shards import read_shard
from ddm.data.sources import load_dataset
from ddm.eval.featurenet import get_featurenet
from ddm.eval.metrics import frechet_distance, precision_recall
from ddm.sampling.load import load_ensemble, load_single


def nearest_centroid(run: Run):
    """The prepare-time cluster rule of a k-means run: uint8 images [N, H, W, C] -> nearest centroid [N] int32.
    The embedding is fitted again on the same rows with the same seed as `ddm prepare` fitted it."""
    cfg = run.config.data
    images = load_dataset(cfg, None).images
    _, transform = fit_embedding(np.asarray(images[fit_sample(len(images), cfg.fit_samples, cfg.seed)]),
                                 run.codec.encode, cfg)
    centroids = np.load(run.resolve(run.manifest["clustering"]["centroids"]))
    return lambda x: assign(transform(x), centroids)


def cluster_quality(run_dir: Path, n: int, monolith_n: int, steps: int, seed: int) -> dict:
    run = Run.open(run_dir)
    ensemble = load_ensemble(run)
    monolith = load_single(run, "monolith")
    if monolith is None:
        raise SystemExit(f"{run_dir} has no trained monolith")
    net = get_featurenet(run)
    solver = run.config.sample.solver
    rule = nearest_centroid(run)
    real_images, real_k = run.holdout_set()[:2]
    agreement = float(np.mean(rule(real_images) == real_k))
    mono = monolith.sample(monolith_n, "single:0", steps=steps, solver=solver, seed=seed).images
    mono_k = rule(mono)
    real_feats = net.features(real_images)
    rows = []
    for k in run.cluster_ids:
        real = real_feats[real_k == k]
        expert = net.features(ensemble.sample(n, f"single:{k}", steps=steps, solver=solver, seed=seed + 1).images)
        mine = net.features(mono[mono_k == k])
        train = net.features(read_shard(run.shard_path(k))[:n])
        m = min(len(expert), len(mine), len(train))
        fd = {name: frechet_distance(real, feats[:m]) for name, feats in
              (("expert", expert), ("monolith", mine), ("train", train))}
        pr = {name: precision_recall(real, feats[:m]) for name, feats in (("expert", expert), ("monolith", mine))}
        rows.append({"cluster": k, "real": int(len(real)), "m": int(m), "monolith_share": float(np.mean(mono_k == k)),
                     "fd": fd, "precision_recall": pr})
    return {"run_dir": str(run_dir), "rule_agreement_on_holdout": agreement, "n": n, "monolith_n": monolith_n, "steps": steps, "solver": solver,
            "seed": seed, "clusters": rows}


def table(report: dict) -> str:
    head = ["cluster", "held-out images", "images per FD", "monolith's share", "FD expert", "FD monolith",
            "FD train (floor)", "precision / recall expert", "precision / recall monolith"]
    body = []
    for r in report["clusters"]:
        fd, pr = r["fd"], r["precision_recall"]
        better = "**" if fd["expert"] < fd["monolith"] else ""
        body.append([str(r["cluster"]), str(r["real"]), str(r["m"]), f"{r['monolith_share']:.3f}",
                     f"{better}{fd['expert']:.1f}{better}", f"{fd['monolith']:.1f}", f"{fd['train']:.1f}",
                     "{:.2f} / {:.2f}".format(*pr["expert"]), "{:.2f} / {:.2f}".format(*pr["monolith"])])
    wins = sum(r["fd"]["expert"] < r["fd"]["monolith"] for r in report["clusters"])
    weights = np.array([r["real"] for r in report["clusters"]], np.float64)
    mean = {side: float(np.average([r["fd"][side] for r in report["clusters"]], weights=weights))
            for side in ("expert", "monolith", "train")}
    def pr(side: str, i: int) -> float:
        return float(np.mean([r["precision_recall"][side][i] for r in report["clusters"]]))

    return (markdown_table(head, body) + f"\n\nnearest-centroid rule refitted: {report['rule_agreement_on_holdout']:.1%} "
            f"of held-out images keep their stored cluster; expert ahead on {wins} of {len(body)} clusters; FD weighted by "
            f"held-out images: expert {mean['expert']:.1f}, monolith {mean['monolith']:.1f}, "
            f"train {mean['train']:.1f}; mean precision / recall: expert {pr('expert', 0):.2f} / {pr('expert', 1):.2f}, "
            f"monolith {pr('monolith', 0):.2f} / {pr('monolith', 1):.2f}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True, type=Path)
    parser.add_argument("--n", type=int, default=200, help="samples per expert")
    parser.add_argument("--monolith-n", type=int, default=2000, help="monolith samples, split by cluster")
    parser.add_argument("--steps", type=int, default=20, help="ODE steps (the run's solver)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    report = cluster_quality(args.run_dir, args.n, args.monolith_n, args.steps, args.seed)
    out = args.run_dir / "eval" / "expert_quality.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))


if __name__ == "__main__":
    main()
