"""Speckle probe (issue 15): are the mnist10k experts' speckled samples caused by the learning rate (tuned for
the monolith's batch 128, applied at the experts' batch 16) or by the EMA decay (0.99)?

    python -m benchmarks.speckle [--k 8] [--cluster 0] [--steps 1500] [--batch 16] [--lrs 0.002,0.000707]
        [--emas 0.99,0.999] [--n 64] [--sample-steps 20] [--seed 0] [--out runs/speckle]

The cheapest evidence: one expert (cluster `--cluster` of a K-means split of mnist10k, the experiment's CPU
settings: micro DiT, 4x4 patches), trained once per (lr, EMA) pair at batch `--batch`, each in its own run
directory OUT/lr<lr>-ema<ema>/ (prepared with those settings, so the manifest records them); n samples from it
alone (`single:<cluster>`, Heun) are compared with the cluster's own training images by

    speckle = mean |discrete Laplacian| of the samples / the same of the real images (pixels in [0, 1]),

1 for images as smooth as the data, > 1 for pixel-scale noise; plus the expert's last held-out loss. Writes
OUT/speckle.{md,json} and OUT/speckle.png (the samples, one row per setting). The monolith is not trained here
(at batch 128 one setting costs 8x an expert); see docs/results.md for what that leaves open.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]

from benchmarks.experiment import CONFIGS, DATASET_OVERRIDES
from ddm.core.config import load_config
from ddm.train.plots import save_strategy_figure
from ddm.data import manifest as mf
from ddm.data.shards import read_shard
from ddm.eval.speckle import laplacian_energy


def overrides(args, lr: float, ema: float) -> list[str]:
    s = args.steps
    return [*DATASET_OVERRIDES["mnist10k"], "data.seed=0", f"data.k={args.k}", f"expert.train.lr={lr}",
            f"expert.train.ema_decay={ema}", f"expert.train.steps={s}", f"expert.train.warmup_steps={max(s // 10, 1)}",
            f"expert.train.batch_size={args.batch}", f"expert.train.seed={args.seed}",
            f"expert.train.checkpoint_every={s}", f"expert.train.log_every={max(s // 4, 1)}"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--cluster", type=int, default=0)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lrs", default="0.002,0.000707", help="the monolith's lr and lr x sqrt(16/128)")
    parser.add_argument("--emas", default="0.99,0.999")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(REPO / "runs" / "speckle"))
    args = parser.parse_args()

    import jax

    from ddm.data.prepare import prepare
    from ddm.experts.train import train_expert
    from ddm.sampling.load import load_ensemble

    out = Path(args.out)
    jax.config.update("jax_compilation_cache_dir", str(out / "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    rows, grids, real_energy = [], {}, None
    for lr in [float(v) for v in args.lrs.split(",")]:
        for ema in [float(v) for v in args.emas.split(",")]:
            run_dir = out / f"lr{lr:g}-ema{ema:g}"
            cfg = load_config(CONFIGS["mnist10k"], overrides(args, lr, ema))
            if not mf.manifest_path(run_dir).exists():
                prepare(cfg, run_dir, base_dir=REPO)
            manifest = mf.read_manifest(run_dir)
            if real_energy is None:
                cluster = next(c for c in manifest["clusters"] if c["id"] == args.cluster)
                real_energy = laplacian_energy(read_shard(mf.resolve(run_dir, cluster["shard"])))
            entry = manifest.get("experts", {}).get(str(args.cluster))
            t0 = time.perf_counter()
            if not (entry and entry.get("status") == "finished" and entry.get("step") == args.steps):
                train_expert(run_dir, args.cluster, progress=False)
            seconds = time.perf_counter() - t0
            metrics = [json.loads(line) for line in
                       (run_dir / "experts" / str(args.cluster) / "metrics.jsonl").read_text().splitlines()]
            holdout = [m["holdout_loss"] for m in metrics if "holdout_loss" in m]
            ens = load_ensemble(run_dir, with_router=False)
            images = ens.sample(args.n, f"single:{args.cluster}", steps=args.sample_steps, solver="heun",
                                seed=args.seed).images
            energy = laplacian_energy(images)
            name = f"lr {lr:g}, EMA {ema:g}"
            grids[name] = images
            rows.append({"lr": lr, "ema": ema, "speckle": energy / real_energy, "laplacian": energy,
                         "holdout_loss": holdout[-1] if holdout else None, "train_seconds": round(seconds)})
            print(f"[{time.strftime('%H:%M:%S')}] {name}: speckle {energy / real_energy:.3f}, held-out loss "
                  f"{rows[-1]['holdout_loss']}, trained in {seconds:.0f}s", flush=True)
    lines = [f"mnist10k K={args.k}, expert {args.cluster} alone, {args.steps} steps x batch {args.batch}, seed "
             f"{args.seed}; {args.n} samples x {args.sample_steps} Heun steps; real images' mean |Laplacian| "
             f"{real_energy:.4f}", "", "| lr | EMA | speckle (1 = as smooth as the data) | held-out loss |",
             "|---:|---:|---:|---:|"]
    lines += [f"| {r['lr']:g} | {r['ema']:g} | {r['speckle']:.3f} | {r['holdout_loss']:.4f} |" for r in rows]
    print("\n".join(lines))
    (out / "speckle.md").write_text("\n".join(lines) + "\n")
    (out / "speckle.json").write_text(json.dumps({"args": vars(args), "real_laplacian": real_energy,
                                                  "rows": rows}, indent=2) + "\n")
    save_strategy_figure(grids, out / "speckle.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
