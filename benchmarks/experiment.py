"""The DDM experiment at CPU scale: monolith vs a K-expert ensemble at equal training FLOPs, per routing
strategy, with k-means vs random partitions, over several seeds (our version of the paper's Table 1).

    python benchmarks/experiment.py [--dataset digits|mnist10k] [--seeds 0,1,2] [--partitions kmeans,random]
        [--expert-steps 250] [--router-steps 150] [--n 400] [--sample-steps 20] [--out runs/experiment]
        [--set section.key=value ...] [--strategies full,top1,...] [--table-only]

Per seed s and partition p, one run directory OUT/<dataset>/<p>-s<s>/:
- prepare with the dataset's config + the overrides below (stored in the manifest, so every later stage uses
  them). The clustering itself uses data.seed=0 for every seed, so all runs share the same holdout set and
  the same feature network; the seed changes expert/router initialisation, data order and sampling noise.
- `random`: after preparing, the training images are re-split uniformly at random into K equal-size shards
  (seeded by s), written with `ddm.data.shards.write_shard`; the manifest's clusters say so
  (clustering.method = "random"). The held-out images get random labels.
- K experts x S steps, the router x R steps, then (kmeans runs only; the monolith does not depend on the
  partition) the monolith with the same total training FLOPs:
      ensemble = K * S * B * 3 * F_dit + R * B_r * 3 * F_router,    monolith steps = ensemble / (B * 3 * F_dit)
  with F_* the forward FLOPs per image (`dit_flops_per_image`, `router_flops_per_image`); 3 = forward + backward.
- `ddm evaluate` (FD in the feature net's features, precision/recall k=3, coverage) on n samples per strategy.

Every stage is skipped when its output is already there, so the script resumes after a crash and re-running
it only prints the table. Runs everything in this one process (no per-island processes: on a shared 2-core
machine process start-up and recompilation would dominate), with jax's persistent compilation cache in
OUT/jax_cache.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ddm.core.config import load_config
from ddm.core.dit import dit_flops_per_image
from ddm.data import manifest as mf
from ddm.data.shards import read_labels, read_shard, write_shard
from ddm.eval.evaluate import DEFAULT_STRATEGIES, evaluate_run
from ddm.router.model import router_flops_per_image

CONFIGS = {"digits": REPO / "configs" / "digits.yaml", "mnist10k": REPO / "configs" / "mnist10k.yaml"}
# CPU-sized settings per dataset (on top of the config file); --set adds more.
DATASET_OVERRIDES = {
    # Unconditional, as in docs/results.md (the default digits config is class-conditional since issue 12).
    "digits": ["data.labels=none"],
    # 28x28 with the micro DiT and 4x4 patches (49 tokens) and the tiny conv router: small enough for a CPU.
    # lr 2e-3 (the config's 5e-4 is for the small preset): at 5e-4 and 400 steps no model drew digits.
    "mnist10k": ["expert.model.preset=micro", "expert.model.patch_size=4", "router.preset=tiny",
                 "expert.train.lr=0.002", f"data.source={REPO.parent / 'shared' / 'data' / 'mnist10k.npz'}"],
}
PAPER_FID = {"monolith": 12.81, "full": 10.52, "top1": 9.84, "top2": 10.31, "threshold:0.1": 10.15,
             "sample": 157.05}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)



# ---------------------------------------------------------------------------------------------------------
# Runs.
# ---------------------------------------------------------------------------------------------------------


def run_overrides(args, seed: int) -> list[str]:
    s, r = args.expert_steps, args.router_steps
    return [
        *DATASET_OVERRIDES[args.dataset],
        "data.seed=0",
        f"expert.train.steps={s}", f"expert.train.warmup_steps={max(s // 10, 1)}", "expert.train.ema_decay=0.98",
        f"expert.train.seed={seed}", f"expert.train.checkpoint_every={s}", f"expert.train.log_every={max(s // 2, 1)}",
        f"router.train.steps={r}", f"router.train.warmup_steps={max(r // 10, 1)}", "router.train.ema_decay=0.95",
        f"router.train.seed={seed}", f"router.train.checkpoint_every={r}", f"router.train.log_every={max(r // 2, 1)}",
        f"sample.steps={args.sample_steps}", f"sample.seed={seed}",
        *args.set,
    ]


def flops(cfg, image_shape: tuple[int, int, int], k: int) -> dict:
    """Training FLOPs of the ensemble (experts + router) and the monolith steps that match them."""
    f_dit = dit_flops_per_image(cfg.expert.model, image_shape)
    f_router = router_flops_per_image(cfg.router, image_shape, k)
    t, tr = cfg.expert.train, cfg.router.train
    experts = k * t.steps * t.batch_size * 3 * f_dit
    router = tr.steps * tr.batch_size * 3 * f_router
    mono_steps = round((experts + router) / (t.batch_size * 3 * f_dit))
    return {"dit_forward_flops_per_image": f_dit, "router_forward_flops_per_image": f_router,
            "experts": experts, "router": router, "ensemble": experts + router, "monolith_steps": mono_steps,
            "monolith": mono_steps * t.batch_size * 3 * f_dit, "router_share": router / (experts + router)}


def _partition_inertia(images: np.ndarray, labels: np.ndarray, cfg) -> float:
    """Within-cluster sum of squares of a partition in the run's clustering embedding (as k-means reports)."""
    from ddm.data.embed import embed

    features = embed(images, cfg.data).astype(np.float64)
    return float(sum(((features[labels == k] - features[labels == k].mean(0)) ** 2).sum()
                     for k in np.unique(labels)))


def random_partition(run_dir: Path, seed: int, cfg) -> None:
    """Re-splits a prepared run's training images uniformly at random into K equal-size shards.

    The manifest then says clustering.method = "random" (n_iter 0, inertia of the random partition in the same
    embedding, for comparison with k-means'); held-out images get random labels; clusters/labels.npy (k-means
    labels) is removed.
    """
    manifest = mf.read_manifest(run_dir)
    if manifest["clustering"].get("method") == "random":
        return
    k = len(manifest["clusters"])
    paths = [mf.resolve(run_dir, c["shard"]) for c in manifest["clusters"]]
    images = np.concatenate([read_shard(path) for path in paths])
    classes = [read_labels(path) for path in paths]
    classes = None if classes[0] is None else np.concatenate(classes)
    rng = np.random.default_rng([seed, 7])
    labels = np.empty(len(images), np.int32)
    labels[rng.permutation(len(images))] = np.arange(len(images)) % k
    chunk = manifest["config"]["data"]["chunk_images"]
    for c in manifest["clusters"]:
        rows = labels == c["id"]
        member_classes = None if classes is None else classes[rows]
        write_shard(mf.resolve(run_dir, c["shard"]), images[rows], member_classes, chunk)
        c.update(count=int(rows.sum()), share=int(rows.sum()) / len(images))
        if member_classes is not None:
            c["class_counts"] = np.bincount(member_classes, minlength=manifest["dataset"]["num_classes"]).tolist()
    holdout = manifest.get("holdout") or {}
    if holdout.get("labels"):
        np.save(mf.resolve(run_dir, holdout["labels"]), rng.integers(0, k, holdout["count"]).astype(np.int32))
    (run_dir / "clusters" / "labels.npy").unlink(missing_ok=True)  # k-means labels no longer describe the shards
    manifest["clustering"].update(method="random", random_seed=seed, n_iter=0, train_labels=None,
                                  kmeans_inertia=manifest["clustering"].get("inertia"),
                                  inertia=_partition_inertia(images, labels, cfg))
    mf.write_manifest(run_dir, manifest)


def finished(entry: dict | None, steps: int) -> bool:
    return bool(entry) and entry.get("status") == "finished" and entry.get("step") == steps


def build_run(args, partition: str, seed: int) -> Path:
    """Prepares and trains one run directory, skipping whatever is already finished."""
    from ddm.data.prepare import prepare
    from ddm.experts.train import train_expert, train_monolith
    from ddm.router.train import train_router

    run_dir = Path(args.out) / args.dataset / f"{partition}-s{seed}"
    overrides = run_overrides(args, seed)
    cfg = load_config(CONFIGS[args.dataset], overrides)
    if not mf.manifest_path(run_dir).exists():
        log(f"{run_dir}: prepare")
        prepare(cfg, run_dir, base_dir=REPO)
    if partition == "random":
        random_partition(run_dir, seed, cfg)
    manifest = mf.read_manifest(run_dir)
    for c in manifest["clusters"]:
        if not finished(manifest.get("experts", {}).get(str(c["id"])), cfg.expert.train.steps):
            t0 = time.perf_counter()
            train_expert(run_dir, c["id"], progress=False)
            log(f"{run_dir.name}: expert {c['id']} ({c['count']} images) {time.perf_counter() - t0:.0f}s")
    if not finished(mf.read_manifest(run_dir).get("router"), cfg.router.train.steps):
        t0 = time.perf_counter()
        train_router(run_dir, progress=False)
        log(f"{run_dir.name}: router {time.perf_counter() - t0:.0f}s")
    if partition == "kmeans":
        budget = flops(cfg, tuple(manifest["dataset"]["image_shape"]), len(manifest["clusters"]))
        m = budget["monolith_steps"]
        if not finished(mf.read_manifest(run_dir).get("monolith"), m):
            t0 = time.perf_counter()
            train_monolith(run_dir, [f"expert.train.steps={m}", f"expert.train.warmup_steps={max(m // 10, 1)}",
                                     f"expert.train.checkpoint_every={m}", f"expert.train.log_every={max(m // 4, 1)}"],
                           progress=False)
            log(f"{run_dir.name}: monolith ({m} steps) {time.perf_counter() - t0:.0f}s")
    return run_dir


def evaluate(args, run_dir: Path, seed: int) -> dict:
    report_path = run_dir / "eval" / "report.json"
    if report_path.exists():
        report = json.loads(report_path.read_text())
        if report["request"] == {"n": args.n, "steps": args.sample_steps, "solver": report["request"]["solver"],
                                 "seed": seed} and set(args.strategies) <= set(report["results"]):
            return report
    t0 = time.perf_counter()
    report = evaluate_run(run_dir, n=args.n, steps=args.sample_steps, seed=seed, strategies=args.strategies,
                          cache_dir=Path(args.out) / "cache")
    log(f"{run_dir.name}: evaluated in {time.perf_counter() - t0:.0f}s")
    return report


# ---------------------------------------------------------------------------------------------------------
# The table.
# ---------------------------------------------------------------------------------------------------------


def _cell(values: list[float], digits: int) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


def collect(reports: dict[tuple[str, int], dict], strategies: tuple[str, ...]) -> list[dict]:
    """One row per (partition, model): lists of per-seed metrics."""
    rows = []
    for partition in ("kmeans", "random"):
        names = ["monolith"] * (partition == "kmeans") + list(strategies) + ["real (train)"]
        for name in names:
            per_seed = [r["results"][name] for (p, _), r in sorted(reports.items()) if p == partition
                        and name in r["results"]]
            if not per_seed:
                continue
            rows.append({"partition": partition, "model": name, "seeds": len(per_seed),
                         **{m: [row[m] for row in per_seed] for m in ("fd", "precision", "recall")},
                         "coverage_tv": [row["coverage"]["tv_vs_data"] for row in per_seed if "coverage" in row],
                         "evals": [row["expert_evals_per_sample"] for row in per_seed
                                   if "expert_evals_per_sample" in row]})
    return rows


def format_table(rows: list[dict], metric_name: str) -> str:
    lines = [(f"| partition | model | {metric_name} ↓ | precision ↑ | recall ↑ | coverage TV ↓ | "
              "expert evals / sample | paper FID (ImageNet) | seeds |"),
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        paper = PAPER_FID.get(row["model"]) if row["partition"] == "kmeans" else None
        lines.append(f"| {row['partition']} | {row['model']} | {_cell(row['fd'], 2)} | {_cell(row['precision'], 3)} | "
                     f"{_cell(row['recall'], 3)} | {_cell(row['coverage_tv'], 3)} | {_cell(row['evals'], 0)} | "
                     f"{'-' if paper is None else paper} | {row['seeds']} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=tuple(CONFIGS), default="digits")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--partitions", default="kmeans,random")
    parser.add_argument("--expert-steps", type=int, default=250)
    parser.add_argument("--router-steps", type=int, default=150)
    parser.add_argument("--n", type=int, default=400, help="samples per strategy")
    parser.add_argument("--sample-steps", type=int, default=20, help="Heun steps")
    parser.add_argument("--out", default=str(REPO / "runs" / "experiment"))
    parser.add_argument("--set", action="append", default=[], help="extra config override (repeatable)")
    # Default: `ddm evaluate`'s list, the paper's Table 1 strategies plus top1+full:0.5 (ddm/routing.py).
    parser.add_argument("--strategies", default=",".join(DEFAULT_STRATEGIES),
                        help="routing strategies to evaluate, comma-separated (a finished run's report is reused "
                             "when it has them all)")
    parser.add_argument("--table-only", action="store_true", help="print the table of finished runs only")
    args = parser.parse_args()
    args.strategies = tuple(s.strip() for s in args.strategies.split(",") if s.strip())
    seeds = [int(s) for s in args.seeds.split(",") if s]
    partitions = [p for p in args.partitions.split(",") if p]

    t_start = time.perf_counter()
    # Every expert/router/monolith job compiles the same few programs: a persistent compilation cache turns
    # ~10-25 s of recompilation per job (on this loaded 2-core machine) into a cache hit.
    import jax

    jax.config.update("jax_compilation_cache_dir", str(Path(args.out) / "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    cfg = load_config(CONFIGS[args.dataset], run_overrides(args, seeds[0]))
    reports: dict[tuple[str, int], dict] = {}
    for seed in seeds:  # seed-major: a partial run still gives complete seeds
        for partition in partitions:
            run_dir = Path(args.out) / args.dataset / f"{partition}-s{seed}"
            if args.table_only:
                path = run_dir / "eval" / "report.json"
                if path.exists():
                    reports[(partition, seed)] = json.loads(path.read_text())
                continue
            run_dir = build_run(args, partition, seed)
            reports[(partition, seed)] = evaluate(args, run_dir, seed)
    if not reports:
        print("no finished runs")
        return 1
    any_report = next(iter(reports.values()))
    budget = flops(cfg, tuple(any_report["dataset"]["image_shape"]), any_report["num_clusters"])
    rows = collect(reports, args.strategies)
    table = format_table(rows, any_report["featurenet"]["metric_name"].replace(" features", ""))
    header = (f"{args.dataset}: K={any_report['num_clusters']}, {args.expert_steps} steps/expert x batch "
              f"{cfg.expert.train.batch_size}, router {args.router_steps} steps x {cfg.router.train.batch_size}, "
              f"monolith {budget['monolith_steps']} steps (same FLOPs: {budget['ensemble']:.3g} = experts "
              f"{budget['experts']:.3g} + router {budget['router']:.3g}, router {budget['router_share']:.1%}); "
              f"{args.n} samples x {args.sample_steps} Heun steps vs {any_report['holdout_count']} held-out images; "
              f"feature net {any_report['featurenet']['name']} sha256 {any_report['featurenet']['sha256'][:16]}; "
              f"mean ± std over seeds {sorted({s for _, s in reports})}")
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}"
    print(header)
    print(table)
    print(f"machine: {machine}; wall time this invocation {time.perf_counter() - t_start:.0f}s")
    out = Path(args.out) / args.dataset
    (out / "results.md").write_text(header + "\n\n" + table + "\n")
    (out / "results.json").write_text(json.dumps({"header": header, "flops": budget, "rows": rows,
                                                  "args": vars(args)}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
