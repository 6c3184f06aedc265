"""The DDM experiment at CPU scale: monolith vs a K-expert ensemble at equal training FLOPs, per routing
strategy, over several seeds and training budgets (our version of the paper's Table 1 and its budget curve),
with k-means vs random partitions and, optionally, the distilled student (the paper's section 4.4).

    python -m benchmarks.experiment [--dataset digits|mnist10k] [--seeds 0,1,2] [--partitions kmeans,random]
        [--flop-match batch|steps] [--budgets 300,1000,3000 | --expert-steps 250] [--ks 2,4,8] [--batch B]
        [--ema 0.98] [--router-steps 150] [--distill-steps N --teacher cluster|full] [--n 400]
        [--sample-steps 20] [--out runs/experiment] [--set section.key=value ...] [--strategies full,top1,...]
        [--plot docs/img/..._flops.png] [--results-in earlier/results-batch.json ...] [--table-only]

Per K, budget S (steps per expert), seed s and partition p, one run directory
OUT/<dataset>/<match>-k<K>-s<S>/<p>-s<s>/:
- prepare with the dataset's config + the overrides below (stored in the manifest, so every later stage uses
  them). The clustering itself uses data.seed=0 for every seed, so all runs share the same holdout set and
  the same feature network; the seed changes expert/router/student initialisation, data order and sampling noise.
- `random`: prepared with `data.partition=random`, `data.partition_seed=s`: the training images are split
  uniformly at random into K equal-size shards (clustering.method = "random"), the held-out images get random
  clusters too (same holdout set as the k-means runs).
- K experts x S steps, the router x R steps, then (kmeans runs only; the monolith does not depend on the
  partition) the monolith with the same training FLOPs, matched one of two ways (`--flop-match`):
      batch (default, the paper's: 8 experts x batch 32 = the monolith's 256): every expert takes batch B / K
          and S steps; the monolith takes batch B and the same S steps. The router's FLOPs are on the
          ensemble's side only (R * B_r * 3 * F_router, a few % here).
      steps: every expert takes batch B and S steps; the monolith takes batch B and
          (K * S * B * 3 * F_dit + R * B_r * 3 * F_router) / (B * 3 * F_dit) steps.
  F_* are forward FLOPs per image (`dit_flops_per_image`, `router_flops_per_image`); 3 = forward + backward.
  Experts, monolith and student share the learning rate of the config and the EMA decay `--ema`; `--set
  monolith.train.lr=X` gives the monolith its own (each side at its own best lr).
- `--distill-steps N`: a student (the experts' architecture, batch B, N steps, `--teacher`) distilled from the
  finished ensemble; its FLOPs = N * B * (3 * F_student + F_teacher), F_teacher = F_dit for the cluster teacher
  (one expert per sample), K * F_dit + F_router for the full one; plotted at ensemble + distillation FLOPs.
- `ddm evaluate` (FD in the feature net's features and in raw-pixel PCA features, precision/recall k=3,
  coverage) on n samples per strategy; the student in RUN/eval_student/. Each row also gets its speckle
  (`ddm.eval.speckle`: the samples' mean |Laplacian| over the training images'; 1 = as smooth as the data).

Every stage is skipped when its output is already there, so the script resumes after a crash and re-running
it only prints the tables (OUT/<dataset>/results-<match>.{md,json}) and redraws `--plot` (FD vs training FLOPs;
with several --ks, also <plot stem>_ksweep_s<S>.png: FD against K at budget S).
`--results-in` merges an earlier invocation's results-<match>.json (e.g. one kept under docs/data/ after its run
directories were deleted) into the tables and the plot, seed by seed.
Runs everything in this one process (no per-island processes: on a shared 2-core machine process start-up and
recompilation would dominate), with jax's persistent compilation cache in OUT/jax_cache.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

from ddm.core.config import load_config, monolith_job
from ddm.core.dit import dit_flops_per_image
from ddm.core.machine import cpu_model
from ddm.data import manifest as mf
from ddm.data.shards import read_shard
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


def expert_batch(args, k: int) -> int:
    """Per-expert batch: the monolith's batch B split K ways (batch matching), or B itself (steps matching)."""
    if args.flop_match == "steps":
        return args.batch
    if args.batch % k:
        raise SystemExit(f"--flop-match batch needs a batch divisible by K: {args.batch} % {k} != 0")
    return args.batch // k


def job_overrides(section: str, steps: int, batch: int | None, ema: float, seed: int, log_parts: int = 2) -> list[str]:
    """`section.train.*`: `steps` steps (a tenth of them warmup, one checkpoint at the end) at `batch` (None: the
    config's), EMA decay `ema`, seed `seed`."""
    return [f"{section}.train.{key}={value}" for key, value in (
        ("steps", steps), ("warmup_steps", max(steps // 10, 1)), *([("batch_size", batch)] if batch else []),
        ("ema_decay", ema), ("seed", seed), ("checkpoint_every", steps), ("log_every", max(steps // log_parts, 1)))]


def run_overrides(args, seed: int, steps: int, k: int, partition: str = "kmeans") -> list[str]:
    distill = max(args.distill_steps, 1)
    return [
        *DATASET_OVERRIDES[args.dataset],
        "data.seed=0", f"data.k={k}", f"data.partition={partition}", f"data.partition_seed={seed}",
        *job_overrides("expert", steps, expert_batch(args, k), args.ema, seed),
        *job_overrides("router", args.router_steps, None, 0.95, seed),
        f"sample.steps={args.sample_steps}", f"sample.seed={seed}",
        # The student: the experts' architecture, the monolith's batch, its own step count.
        "distill.model.preset={expert_preset}", "distill.model.patch_size={expert_patch}",
        *job_overrides("distill", distill, args.batch, args.ema, seed), f"distill.teacher={args.teacher}",
        *args.set,
    ]


def resolved_overrides(args, seed: int, steps: int, k: int, partition: str = "kmeans") -> list[str]:
    """run_overrides with the student's architecture filled in from the experts' (after every --set)."""
    raw = run_overrides(args, seed, steps, k, partition)
    cfg = load_config(CONFIGS[args.dataset], [o for o in raw if not o.startswith("distill.model")])
    return [o.format(expert_preset=cfg.expert.model.preset, expert_patch=cfg.expert.model.patch_size)
            if o.startswith("distill.model") else o for o in raw]


def lr_text(cfg) -> str:
    """The learning rate(s) for a table's header: one when both sides share it."""
    expert, monolith = cfg.expert.train.lr, monolith_job(cfg).train.lr
    return f"{expert:g}" if expert == monolith else f"experts {expert:g}, monolith {monolith:g}"


def flops(cfg, image_shape: tuple[int, int, int], k: int, match: str, monolith_batch: int,
          distill_steps: int = 0) -> dict:
    """Training FLOPs (3 x forward per image: forward + backward) of the ensemble (experts + router), the
    monolith that matches it, and the distillation on top of the ensemble.

    batch: the monolith takes the experts' steps at batch K x the experts' batch (the paper's matching; the
    router's FLOPs are on the ensemble's side only). steps: the monolith takes as many steps at the experts'
    batch as make its FLOPs equal to experts + router.
    """
    f_dit = dit_flops_per_image(cfg.expert.model, image_shape)
    f_router = router_flops_per_image(cfg.router, image_shape, k)
    t, tr = cfg.expert.train, cfg.router.train
    experts = k * t.steps * t.batch_size * 3 * f_dit
    router = tr.steps * tr.batch_size * 3 * f_router
    if match == "batch":
        mono_steps, mono_batch = t.steps, monolith_batch
    else:
        mono_steps, mono_batch = round((experts + router) / (t.batch_size * 3 * f_dit)), t.batch_size
    out = {"match": match, "dit_forward_flops_per_image": f_dit, "router_forward_flops_per_image": f_router,
           "experts": experts, "router": router, "ensemble": experts + router, "monolith_steps": mono_steps,
           "monolith_batch": mono_batch, "monolith": mono_steps * mono_batch * 3 * f_dit,
           "router_share": router / (experts + router)}
    if distill_steps:
        d = cfg.distill
        f_student = dit_flops_per_image(d.model, image_shape)
        f_teacher = f_dit if d.teacher == "cluster" else k * f_dit + f_router
        out["distill"] = distill_steps * d.train.batch_size * (3 * f_student + f_teacher)
        out["student_total"] = out["ensemble"] + out["distill"]
    return out


def finished(entry: dict | None, steps: int) -> bool:
    return bool(entry) and entry.get("status") == "finished" and entry.get("step") == steps


def run_dir_of(args, partition: str, seed: int, steps: int, k: int) -> Path:
    return Path(args.out) / args.dataset / f"{args.flop_match}-k{k}-s{steps}" / f"{partition}-s{seed}"


def build_run(args, partition: str, seed: int, steps: int, k: int) -> Path:
    """Prepares and trains one run directory, skipping whatever is already finished."""
    from ddm.data.prepare import prepare
    from ddm.experts.distill import train_student
    from ddm.experts.train import train_expert, train_monolith
    from ddm.router.train import train_router
    from ddm.sampling.teacher import build_teacher
    from ddm.data.run import Run

    run_dir = run_dir_of(args, partition, seed, steps, k)
    overrides = resolved_overrides(args, seed, steps, k, partition)
    cfg = load_config(CONFIGS[args.dataset], overrides)
    if not mf.manifest_path(run_dir).exists():
        log(f"{run_dir}: prepare")
        prepare(cfg, run_dir, base_dir=REPO)
    manifest = mf.read_manifest(run_dir)
    for c in manifest["clusters"]:
        if not finished(manifest.get("experts", {}).get(str(c["id"])), cfg.expert.train.steps):
            t0 = time.perf_counter()
            train_expert(run_dir, c["id"], progress=False)
            log(f"{run_dir.parent.name}/{run_dir.name}: expert {c['id']} ({c['count']} images) "
                f"{time.perf_counter() - t0:.0f}s")
    if not finished(mf.read_manifest(run_dir).get("router"), cfg.router.train.steps):
        t0 = time.perf_counter()
        # As for the student below: a later --router-steps reaches the trainer as overrides, and the routed
        # rows of the old evaluation are stale.
        train_router(run_dir, [o for o in overrides if o.startswith("router.")], progress=False)
        shutil.rmtree(run_dir / "eval", ignore_errors=True)
        log(f"{run_dir.parent.name}/{run_dir.name}: router {time.perf_counter() - t0:.0f}s")
    if partition == "kmeans":
        budget = flops(cfg, tuple(manifest["dataset"]["image_shape"]), len(manifest["clusters"]), args.flop_match,
                       args.batch)
        m, b = budget["monolith_steps"], budget["monolith_batch"]
        if not finished(mf.read_manifest(run_dir).get("monolith"), m):
            t0 = time.perf_counter()
            # The manifest keeps the settings of the run's first preparation: a later `--set monolith.train.lr=...`
            # (the monolith's own lr) must reach the trainer as an override.
            own = [o for o in args.set if o.startswith("monolith.")]
            train_monolith(run_dir, [*job_overrides("monolith", m, b, args.ema, seed, log_parts=4), *own],
                           progress=False)
            log(f"{run_dir.parent.name}/{run_dir.name}: monolith ({m} steps x {b}) {time.perf_counter() - t0:.0f}s")
        if args.distill_steps and not finished(mf.read_manifest(run_dir).get("student"), args.distill_steps):
            t0 = time.perf_counter()
            # The manifest keeps the settings of the run's first preparation; a later --distill-steps or
            # --teacher must reach the trainer as overrides, and the student's old evaluation is stale.
            distill = [o for o in overrides if o.startswith("distill.")]
            run = Run.open(run_dir, distill)
            train_student(run_dir, build_teacher(run, cfg.distill.teacher), cfg.distill.teacher, distill,
                          progress=False)
            shutil.rmtree(run_dir / "eval_student", ignore_errors=True)
            log(f"{run_dir.parent.name}/{run_dir.name}: student ({args.distill_steps} steps x {args.batch}, "
                f"{cfg.distill.teacher} teacher) {time.perf_counter() - t0:.0f}s")
    return run_dir


def evaluate(args, run_dir: Path, seed: int) -> dict:
    """The run's report (reused when it has these settings and strategies); the student's row, when distilled,
    from its own evaluation in RUN/eval_student/ (so distilling later does not resample every strategy)."""
    report_path = run_dir / "eval" / "report.json"
    report = None
    if report_path.exists():
        report = json.loads(report_path.read_text())
        if report["request"] != {"n": args.n, "steps": args.sample_steps, "solver": report["request"]["solver"],
                                 "seed": seed} or not set(args.strategies) <= set(report["results"]):
            report = None
    if report is None:
        t0 = time.perf_counter()
        report = evaluate_run(run_dir, n=args.n, steps=args.sample_steps, seed=seed, strategies=args.strategies,
                              cache_dir=Path(args.out) / "cache", student=False)
        log(f"{run_dir.parent.name}/{run_dir.name}: evaluated in {time.perf_counter() - t0:.0f}s")
    if args.distill_steps and mf.read_manifest(run_dir).get("student"):
        student_path = run_dir / "eval_student" / "report.json"
        if not student_path.exists():
            t0 = time.perf_counter()
            evaluate_run(run_dir, n=args.n, steps=args.sample_steps, seed=seed, strategies=(), monolith=False,
                         cache_dir=Path(args.out) / "cache", out_dir=run_dir / "eval_student")
            log(f"{run_dir.parent.name}/{run_dir.name}: student evaluated in {time.perf_counter() - t0:.0f}s")
        student = json.loads(student_path.read_text())["results"].get("student")
        if student is not None:
            report["results"]["student"] = student
    add_speckle(report, run_dir)
    return report


def add_speckle(report: dict, run_dir: Path) -> None:
    """Adds each row's speckle (`ddm.eval.speckle`: the samples' Laplacian energy over the training images')
    from the saved samples of RUN/eval and RUN/eval_student; pixel runs only."""
    from ddm.eval.speckle import speckle_ratios

    samples = {}
    for folder in ("eval", "eval_student"):
        path = run_dir / folder / "samples.npz"
        if path.exists():
            with np.load(path) as saved:
                samples |= {name: saved[name.replace(":", "_")] for name in report["results"]
                            if name != "real (train)" and name.replace(":", "_") in saved.files}
    if not samples or any(images.dtype != np.uint8 for images in samples.values()):
        return
    manifest = mf.read_manifest(run_dir)
    real = np.concatenate([read_shard(mf.resolve(run_dir, c["shard"])) for c in manifest["clusters"]])
    for name, ratio in speckle_ratios(samples, real).items():
        report["results"][name]["speckle"] = ratio


# ---------------------------------------------------------------------------------------------------------
# The table.
# ---------------------------------------------------------------------------------------------------------


def _cell(values: list[float], digits: int) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


def _unique_or_all(values: list[float]) -> list[float]:
    """One value when every seed has the same (expert calls per sample of a fixed strategy), else all."""
    return values[:1] if len(set(values)) == 1 else values


METRICS = ("fd", "fd_pca", "precision", "recall", "speckle")


def collect(reports: dict[tuple[str, int], dict], strategies: tuple[str, ...]) -> list[dict]:
    """One row per (partition, model): lists of per-seed metrics (seed order in `seeds`)."""
    rows = []
    for partition in ("kmeans", "random"):
        names = ["monolith", "student"] * (partition == "kmeans") + list(strategies) + ["real (train)"]
        for name in names:
            found = [(s, r["results"][name]) for (p, s), r in sorted(reports.items()) if p == partition
                     and name in r["results"]]
            if not found:
                continue
            per_seed = [row for _, row in found]
            rows.append({"partition": partition, "model": name, "seeds": [s for s, _ in found],
                         **{m: [row[m] for row in per_seed if m in row] for m in METRICS},
                         "coverage_tv": [row["coverage"]["tv_vs_data"] for row in per_seed if "coverage" in row],
                         "evals": [row["expert_evals_per_sample"] for row in per_seed
                                   if "expert_evals_per_sample" in row]})
    return rows


def format_table(rows: list[dict], metric_name: str) -> str:
    lines = [(f"| partition | model | {metric_name} ↓ | FD-PCA ↓ | precision ↑ | recall ↑ | coverage TV ↓ | "
              "speckle (1 = data) | expert evals / sample | paper FID (ImageNet) | seeds |"),
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        paper = PAPER_FID.get(row["model"]) if row["partition"] == "kmeans" else None
        lines.append(f"| {row['partition']} | {row['model']} | {_cell(row['fd'], 2)} | {_cell(row['fd_pca'], 2)} | "
                     f"{_cell(row['precision'], 3)} | {_cell(row['recall'], 3)} | {_cell(row['coverage_tv'], 3)} | "
                     f"{_cell(row.get('speckle', []), 2)} | {_cell(_unique_or_all(row['evals']), 0)} | "
                     f"{'-' if paper is None else paper} | {len(row['seeds'])} |")
    per_seed = [f"{row['model']} " + " / ".join(f"{v:.1f}" for v in row["fd"]) for row in rows
                if row["partition"] == "kmeans"]
    lines += ["", f"Per seed ({metric_name}, seeds {' / '.join(map(str, rows[0]['seeds']))}): " + "; ".join(per_seed)]
    return "\n".join(lines)


def merge_points(points: list[dict], earlier: list[dict], source: str) -> list[dict]:
    """`points` with an earlier invocation's points merged in, per (K, budget) and per (partition, model) row,
    seed by seed: a seed in `points` replaces the same seed in `earlier` (its run directory is the newer
    measurement). Sorted by (K, budget); a merged point's header names what came from `source`."""
    merged = {(p["k"], p["steps"]): p for p in points}
    for old in earlier:
        key = (old["k"], old["steps"])
        if key not in merged:
            merged[key] = {**old, "header": f"{old['header']} (from {source})"}
            continue
        new = merged[key]
        rows, added = [], set()
        for name in dict.fromkeys([(r["partition"], r["model"]) for r in new["rows"] + old["rows"]]):
            pair = [next((r for r in p["rows"] if (r["partition"], r["model"]) == name), None) for p in (new, old)]
            by_seed = {}
            for row in reversed([r for r in pair if r is not None]):  # the old first, the new overwriting it
                for i, seed in enumerate(row["seeds"]):
                    by_seed[seed] = {m: row[m][i] for m in (*METRICS, "coverage_tv", "evals")
                                     if len(row.get(m, ())) == len(row["seeds"])}
            if pair[1] is not None:
                added |= set(pair[1]["seeds"]) - set(pair[0]["seeds"] if pair[0] else ())
            seeds = sorted(by_seed)
            rows.append({"partition": name[0], "model": name[1], "seeds": seeds,
                         **{m: [by_seed[s][m] for s in seeds if m in by_seed[s]]
                            for m in (*METRICS, "coverage_tv", "evals")}})
        header = new["header"] + (f"; cells of seeds {sorted(added)} from {source}" if added else "")
        merged[key] = {**new, "rows": rows, "header": header}
    return [merged[key] for key in sorted(merged)]


def _kmeans_row(point: dict, model: str) -> dict | None:
    return next((r for r in point["rows"] if r["partition"] == "kmeans" and r["model"] == model), None)


def _label_axis(ax, xlabel: str, metric_label: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{metric_label} (lower is better)")
    ax.grid(alpha=0.3)


def _save_figure(fig, axes, title: str, path: Path) -> None:
    from ddm.train.plots import save_figure

    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    save_figure(fig, path, dpi=110, bbox_inches="tight")


def plot_budgets(points: list[dict], path: Path, title: str) -> None:
    """FD (feature net, left; raw-pixel PCA, right) against training FLOPs, mean ± std over seeds, one line per
    model: the monolith at its own FLOPs, every strategy at the ensemble's, the student at ensemble +
    distillation."""
    from ddm.train.plots import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    models = []
    for p in points:
        models += [r["model"] for r in p["rows"] if r["partition"] == "kmeans" and r["model"] not in models]
    for ax, metric, label in ((axes[0], "fd", points[0]["metric_name"]), (axes[1], "fd_pca", "FD in raw-pixel PCA")):
        for name in models:
            xs, ys, es = [], [], []
            for p in points:
                row = _kmeans_row(p, name)
                if row is None or not row[metric]:
                    continue
                key = {"monolith": "monolith", "student": "student_total"}.get(name, "ensemble")
                if name == "real (train)" or key not in p["flops"]:
                    continue
                xs.append(p["flops"][key])
                ys.append(np.mean(row[metric]))
                es.append(np.std(row[metric], ddof=1) if len(row[metric]) > 1 else 0.0)
            if xs:
                style = {"monolith": dict(color="black", lw=2.2), "student": dict(color="tab:purple", ls="--")}
                ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=name, **style.get(name, {}))
        floors = [np.mean(r[metric]) for p in points for r in p["rows"] if r["model"] == "real (train)" and r[metric]]
        if floors:
            ax.axhline(np.mean(floors), color="gray", ls=":", label="real (train) floor")
        ax.set_xscale("log")
        # Over less than a decade a log axis labels its minor ticks, on top of each other.
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
        _label_axis(ax, "training FLOPs", label)
    _save_figure(fig, axes, title, path)


def plot_k_sweep(points: list[dict], path: Path, title: str) -> None:
    """FD (feature net, left; raw-pixel PCA, right) against the number of experts K at one budget, mean ± std
    over seeds, one line per model (the monolith is trained in every K's run directory: same steps and batch)."""
    from ddm.train.plots import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    points = sorted(points, key=lambda p: p["k"])
    models = list(dict.fromkeys(r["model"] for p in points for r in p["rows"] if r["partition"] == "kmeans"))
    style = {"monolith": dict(color="black", lw=2.2), "real (train)": dict(color="gray", ls=":")}
    for ax, metric, label in ((axes[0], "fd", points[0]["metric_name"]), (axes[1], "fd_pca", "FD in raw-pixel PCA")):
        for name in models:
            rows = [(p["k"], _kmeans_row(p, name)) for p in points]
            rows = [(k, r[metric]) for k, r in rows if r is not None and r[metric]]
            if not rows:
                continue
            # The monolith does not depend on K: its spread across K is its own run-to-run noise (data order).
            legend = "monolith (same settings at every K)" if name == "monolith" else name
            ax.errorbar([k for k, _ in rows], [np.mean(v) for _, v in rows],
                        yerr=[np.std(v, ddof=1) if len(v) > 1 else 0.0 for _, v in rows], marker="o", capsize=3,
                        label=legend, **style.get(name, {}))
        ax.set_xscale("log", base=2)
        ax.set_xticks([p["k"] for p in points], [str(p["k"]) for p in points])
        _label_axis(ax, "K (experts; each at batch B / K)", label)
    _save_figure(fig, axes, title, path)


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=tuple(CONFIGS), default="digits")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--partitions", default="kmeans,random")
    parser.add_argument("--flop-match", choices=("batch", "steps"), default="batch",
                        help="batch (the paper's): each expert takes batch B/K and the monolith's steps; steps: "
                             "each expert takes batch B and 1/K of the monolith's steps")
    parser.add_argument("--expert-steps", type=int, default=250, help="steps per expert (one budget)")
    parser.add_argument("--budgets", default=None, help="comma-separated steps per expert: a budget sweep "
                                                        "(default: --expert-steps)")
    parser.add_argument("--ks", default=None, help="comma-separated K (a K sweep; default: the config's data.k)")
    parser.add_argument("--batch", type=int, default=None, help="the monolith's batch B (default: the config's)")
    parser.add_argument("--ema", type=float, default=0.98, help="EMA decay of experts, monolith and student")
    parser.add_argument("--router-steps", type=int, default=150)
    parser.add_argument("--distill-steps", type=int, default=0, help="train a student for this many steps (0: none)")
    parser.add_argument("--teacher", choices=("cluster", "full"), default="cluster")
    parser.add_argument("--n", type=int, default=400, help="samples per strategy")
    parser.add_argument("--sample-steps", type=int, default=20, help="Heun steps")
    parser.add_argument("--out", default=str(REPO / "runs" / "experiment"))
    parser.add_argument("--set", action="append", default=[], help="extra config override (repeatable)")
    # Default: `ddm evaluate`'s list, the paper's Table 1 strategies plus top1+full:0.5 and prior (ddm/sampling/routing.py).
    parser.add_argument("--strategies", default=",".join(DEFAULT_STRATEGIES),
                        help="routing strategies to evaluate, comma-separated (a finished run's report is reused "
                             "when it has them all)")
    parser.add_argument("--plot", default=None, help="write the FD-vs-training-FLOPs figure here (PNG)")
    parser.add_argument("--results-in", action="append", default=[],
                        help="an earlier invocation's results-<match>.json (repeatable): its cells join the table "
                             "and the plot, a seed finished here replacing the same seed there")
    parser.add_argument("--table-only", action="store_true", help="print the table of finished runs only")
    args = parser.parse_args()
    args.strategies = tuple(s.strip() for s in args.strategies.split(",") if s.strip())
    seeds = _ints(args.seeds)
    partitions = [p for p in args.partitions.split(",") if p]
    budgets = _ints(args.budgets) if args.budgets else [args.expert_steps]
    base_cfg = load_config(CONFIGS[args.dataset], [*DATASET_OVERRIDES[args.dataset], *args.set])
    ks = _ints(args.ks) if args.ks else [base_cfg.data.k]
    args.batch = args.batch or base_cfg.expert.train.batch_size

    t_start = time.perf_counter()
    # Every expert/router/monolith job compiles the same few programs: a persistent compilation cache turns
    # ~10-25 s of recompilation per job (on this loaded 2-core machine) into a cache hit.
    import jax

    jax.config.update("jax_compilation_cache_dir", str(Path(args.out) / "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    # the CPU model too: XLA:CPU compiles per instruction set, so the feature net's weights (and every FD) follow it
    machine = (f"{cpu_model()} ({platform.machine()}), {os.cpu_count()} CPUs, Python {platform.python_version()}, "
               f"jax {jax.__version__}")
    points: list[dict] = []
    texts: list[str] = []
    # Budget-major within each K, then seed-major: a partial sweep still gives complete low budgets.
    for k in ks:
        for steps in budgets:
            reports: dict[tuple[str, int], dict] = {}
            for seed in seeds:
                for partition in partitions:
                    run_dir = run_dir_of(args, partition, seed, steps, k)
                    if args.table_only:
                        path = run_dir / "eval" / "report.json"
                        if path.exists():
                            reports[(partition, seed)] = evaluate(args, run_dir, seed)
                        continue
                    run_dir = build_run(args, partition, seed, steps, k)
                    reports[(partition, seed)] = evaluate(args, run_dir, seed)
            if not reports:
                continue
            any_report = next(iter(reports.values()))
            cfg = load_config(CONFIGS[args.dataset], resolved_overrides(args, seeds[0], steps, k))
            budget = flops(cfg, tuple(any_report["dataset"]["image_shape"]), k, args.flop_match, args.batch,
                           args.distill_steps)
            rows = collect(reports, args.strategies)
            metric_name = any_report["featurenet"]["metric_name"].replace(" features", "")
            header = (f"{args.dataset}, K={k}, flop-match {args.flop_match}: experts {steps} steps x batch "
                      f"{cfg.expert.train.batch_size}, router {args.router_steps} steps x {cfg.router.train.batch_size}"
                      f", monolith {budget['monolith_steps']} steps x {budget['monolith_batch']} (ensemble "
                      f"{budget['ensemble']:.3g} FLOPs = experts {budget['experts']:.3g} + router "
                      f"{budget['router']:.3g} ({budget['router_share']:.1%}); monolith {budget['monolith']:.3g})"
                      + (f"; student {args.distill_steps} steps x {args.batch} ({args.teacher} teacher, "
                         f"+{budget['distill']:.3g} FLOPs)" if args.distill_steps else "")
                      + f"; EMA {args.ema}, lr {lr_text(cfg)}; {args.n} samples x {args.sample_steps} Heun "
                      f"steps vs {any_report['holdout_count']} held-out images; feature net "
                      f"{any_report['featurenet']['name']} sha256 {any_report['featurenet']['sha256'][:16]}; mean ± "
                      f"std over seeds {sorted({s for _, s in reports})}")
            points.append({"k": k, "steps": steps, "flops": budget, "rows": rows, "header": header,
                           "metric_name": metric_name})
    for path in args.results_in:
        points = merge_points(points, json.loads(Path(path).read_text())["points"], Path(path).name)
    if not points:
        print("no finished runs")
        return 1
    for point in points:
        table = format_table(point["rows"], point["metric_name"])
        print(point["header"])
        print(table, flush=True)
        texts.append(point["header"] + "\n\n" + table + "\n")
    print(f"machine: {machine}; wall time this invocation {time.perf_counter() - t_start:.0f}s")
    out = Path(args.out) / args.dataset
    name = f"results-{args.flop_match}"
    (out / f"{name}.md").write_text("\n".join(texts))
    (out / f"{name}.json").write_text(json.dumps({"points": points, "args": vars(args), "machine": machine},
                                                 indent=2) + "\n")
    if args.plot:
        for k in ks:
            sweep = [p for p in points if p["k"] == k]
            if len(sweep) > 1:  # a curve needs two budgets
                path = Path(args.plot) if len(ks) == 1 else Path(args.plot).with_stem(f"{Path(args.plot).stem}_k{k}")
                seeds_in = sorted({s for p in sweep for r in p["rows"] for s in r["seeds"]})
                plot_budgets(sweep, path, f"{args.dataset}, K={k}, flop-match {args.flop_match}, seeds "
                                          f"{','.join(map(str, seeds_in))}")
                print(f"figure -> {path}")
        for steps in budgets:
            sweep = [p for p in points if p["steps"] == steps and p["k"] in ks]
            if len(sweep) > 1:
                path = Path(args.plot).with_stem(f"{Path(args.plot).stem}_ksweep_s{steps}")
                plot_k_sweep(sweep, path, f"{args.dataset}, S={steps}, flop-match {args.flop_match}, K sweep")
                print(f"figure -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
