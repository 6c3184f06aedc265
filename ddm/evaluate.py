"""`ddm evaluate`: sample quality per routing strategy (and of the monolith) against held-out real images.

For each strategy (default: full, top1, top2, threshold:0.1, sample; plus the monolith when RUN/monolith is
trained) we draw n samples from the same initial noise and measure, in the features of the run's feature
network (`ddm.featurenet`: a conv net trained on this dataset's k-means pseudo-classes, so "FD in kmc32-cnn
features", not FID):

- FD: Fréchet distance between Gaussians fitted to generated and held-out features (lower is better);
- precision / recall: k-NN manifold estimates (Kynkäänniemi et al. 2019, k=3): the share of generated samples
  inside the real manifold (union of balls reaching each real point's 3rd neighbour) and vice versa;
- coverage: share of samples the router assigns to each cluster at t=0 vs the data's shares (and vs the
  router's own assignment of the held-out images), summarised as total variation (TV) distance;
- router usage per step: the mean routing weight of each expert at each solver step (from SampleResult.weights).

A reference row ("real (train)": n training images vs the held-out set) gives the floor these finite-sample
metrics reach on real data. Outputs: RUN/eval/report.json, report.md, strategies.png (grids side by side),
samples.npz (every generated image).
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from data import manifest as mf
from data.shards import read_shard
from ddm.errors import DDMError
from ddm.featurenet import FeatureNetConfig, apply_padded, get_featurenet

DEFAULT_STRATEGIES = ("full", "top1", "top2", "threshold:0.1", "sample", "top1+full:0.5")
DEFAULT_N = 500
KNN_K = 3
MONOLITH = "monolith"
REFERENCE = "real (train)"
GRID_IMAGES = 64


# ---------------------------------------------------------------------------------------------------------
# Metrics (pure numpy, float64).
# ---------------------------------------------------------------------------------------------------------


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean [D], covariance [D, D]) of features [N, D] (N >= 2), float64, unbiased covariance."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise DDMError(f"Fréchet distance needs features [N >= 2, D], got {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def frechet_distance_from_stats(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)).

    Tr (S1 S2)^(1/2) = Tr (A S2 A)^(1/2) with A = S1^(1/2): both square roots are of symmetric PSD matrices,
    computed by eigendecomposition (real and stable, unlike a general sqrtm of the non-symmetric S1 S2).
    """
    diff = np.asarray(mu1, np.float64) - np.asarray(mu2, np.float64)
    w, v = np.linalg.eigh(np.asarray(sigma1, np.float64))
    a = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    m = a @ np.asarray(sigma2, np.float64) @ a
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None)).sum()
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean
    return float(max(value, 0.0))


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """FD between the Gaussians fitted to features a [Na, D] and b [Nb, D]."""
    return frechet_distance_from_stats(*gaussian_stats(a), *gaussian_stats(b))


def pairwise_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distances [Na, Nb] (float64) between rows of a [Na, D] and b [Nb, D]."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.sqrt(np.clip(sq, 0.0, None))


def knn_radii(features: np.ndarray, k: int = KNN_K) -> np.ndarray:
    """Distance from each row of features [N, D] to its k-th nearest other row: [N] float64."""
    if len(features) <= k:
        raise DDMError(f"k-NN radii need more than k={k} points, got {len(features)}")
    d = pairwise_distances(features, features)
    return np.partition(d, k, axis=1)[:, k]  # column 0 is the point itself (distance 0)


def _inside(points: np.ndarray, centres: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """[Np] bool: is each point within radius of at least one centre."""
    return (pairwise_distances(points, centres) <= radii[None, :]).any(1)


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = KNN_K) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of fake [Nf, D] against real [Nr, D].

    precision: share of fake points inside the real manifold (balls around each real point reaching its k-th
    nearest real neighbour); recall: share of real points inside the fake manifold, defined the same way.
    """
    precision = _inside(fake, real, knn_radii(real, k)).mean()
    recall = _inside(real, fake, knn_radii(fake, k)).mean()
    return float(precision), float(recall)


def shares(labels: np.ndarray, k: int) -> np.ndarray:
    """Share of each of k classes in labels [N]: [k] float64 summing to 1."""
    return np.bincount(np.asarray(labels), minlength=k)[:k] / max(len(labels), 1)


def total_variation(p: np.ndarray, q: np.ndarray) -> float:
    return float(0.5 * np.abs(np.asarray(p) - np.asarray(q)).sum())


def quality(real: np.ndarray, fake: np.ndarray, k: int = KNN_K) -> dict:
    """FD, precision and recall of fake features against real features."""
    precision, recall = precision_recall(real, fake, k)
    return {"fd": frechet_distance(real, fake), "precision": precision, "recall": recall}


# ---------------------------------------------------------------------------------------------------------
# Models.
# ---------------------------------------------------------------------------------------------------------


def monolith_ensemble(run_dir: Path, manifest: dict, cfg):
    """The trained monolith as a 1-expert Ensemble (sample it with `single:0`), or None if it is not trained."""
    from ddm.config import ModelConfig, from_dict
    from ddm.ensemble import Ensemble
    from ddm.loading import load_component
    from experts.train import make_dit

    entry = manifest.get(MONOLITH)
    if not entry or entry.get("status") != "finished":
        return None
    model_cfg = from_dict(ModelConfig, entry["model"]) if "model" in entry else cfg.expert.model
    image_shape = tuple(manifest["dataset"]["image_shape"])
    model = load_component(str(run_dir), entry, functools.partial(make_dit, model_cfg, image_shape), MONOLITH)
    graphdef, state = nnx.split(model)

    def apply(state, x, t, y):
        return nnx.merge(graphdef, state)(x, t, y)

    return Ensemble(apply, [state], None, None, image_shape=image_shape, num_classes=model_cfg.num_classes)


@functools.lru_cache(maxsize=8)
def _router_argmax(router_apply):
    return jax.jit(lambda s, x: jnp.argmax(router_apply(s, x, jnp.zeros((x.shape[0],), jnp.float32), None), -1))


def router_assignments(ensemble, images: np.ndarray, batch: int = 256) -> np.ndarray:
    """argmax_k p(k | x, t=0) of uint8 images [N, H, W, C] under the ensemble's router: [N] int32.
    Batches are padded to `batch` rows (one compilation for any N)."""
    fn = _router_argmax(ensemble.router_apply)
    return apply_padded(lambda x: fn(ensemble.router_params, x), images, batch).astype(np.int32)


# ---------------------------------------------------------------------------------------------------------
# The evaluation.
# ---------------------------------------------------------------------------------------------------------


def _load_real(run_dir: Path, manifest: dict) -> np.ndarray:
    holdout = manifest.get("holdout") or {}
    if not holdout.get("shard") or not holdout.get("count"):
        raise DDMError(f"{run_dir} has no held-out images to evaluate against: prepare it with "
                       "data.holdout_fraction > 0")
    images = read_shard(mf.resolve(run_dir, holdout["shard"]))
    if len(images) <= KNN_K:
        raise DDMError(f"{run_dir} has only {len(images)} held-out images; precision/recall need more than {KNN_K}")
    return images


def evaluate_run(run_dir: str | Path, overrides: Sequence[str] = (), *, n: int = DEFAULT_N, steps: int | None = None,
                 solver: str | None = None, seed: int = 0, strategies: Sequence[str] = DEFAULT_STRATEGIES,
                 monolith: bool = True, batch_size: int | None = None, cache_dir: str | Path | None = None,
                 feature_cfg: FeatureNetConfig | None = None, log: Callable[[str], None] = print) -> dict:
    """Evaluates a run; writes RUN/eval/{report.json, report.md, strategies.png, samples.npz}; returns the report.

    n: samples per strategy (> k=3). steps / solver: ODE settings (default: the run's sample section).
    seed: noise seed, the same for every strategy (paired comparison). monolith: include RUN/monolith if trained.
    """
    from ddm.loading import load_run
    from ddm.pipeline import save_strategy_figure
    from ddm.routing import parse_strategy
    from ddm.sampling import usage_summary

    run_dir = Path(run_dir)
    if n <= KNN_K:
        raise DDMError(f"--n must be larger than k={KNN_K} for precision/recall, got {n}")
    for strategy in strategies:
        parse_strategy(strategy)  # a bad strategy fails before anything is loaded or trained
    manifest = mf.read_manifest(run_dir)
    real_images = _load_real(run_dir, manifest)
    ensemble, cfg, manifest = load_run(str(run_dir), overrides)
    steps = cfg.sample.steps if steps is None else steps
    solver = solver or cfg.sample.solver
    num_clusters = len(manifest["clusters"])
    out_dir = run_dir / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)

    net = get_featurenet(run_dir, manifest, cfg=feature_cfg, cache_dir=cache_dir, log=log)
    real = net.features(real_images)
    data_share = np.array([c["share"] for c in manifest["clusters"]], np.float64)
    holdout_share = shares(router_assignments(ensemble, real_images), num_clusters)

    rows: dict[str, dict] = {}
    train_images = np.concatenate([read_shard(mf.resolve(run_dir, c["shard"])) for c in manifest["clusters"]])
    pick = np.random.default_rng(seed).permutation(len(train_images))[:n]
    rows[REFERENCE] = {"kind": "reference", "n": len(pick), **quality(real, net.features(train_images[pick]))}

    models = [(s, ensemble, s) for s in strategies]
    mono = monolith_ensemble(run_dir, manifest, cfg) if monolith else None
    if mono is not None:
        models.append((MONOLITH, mono, "single:0"))
    grids, arrays = {}, {}
    for name, model, strategy in models:
        t0 = time.perf_counter()
        result = model.sample(n, strategy, steps=steps, solver=solver, seed=seed, batch_size=batch_size)
        seconds = time.perf_counter() - t0
        row = {"kind": "monolith" if name == MONOLITH else "ensemble", "strategy": strategy, "n": n,
               **quality(real, net.features(result.images)), "seconds": round(seconds, 2),
               "expert_evals_per_sample": result.expert_evals / n}
        share = shares(router_assignments(ensemble, result.images), num_clusters)
        row["coverage"] = {"share": share.tolist(), "tv_vs_data": total_variation(share, data_share),
                           "tv_vs_holdout": total_variation(share, holdout_share)}
        if name != MONOLITH:
            row["router_usage"] = np.asarray(result.weights, np.float64).mean(1).tolist()  # [steps, K]
        rows[name] = row
        grids[name] = result.images[:GRID_IMAGES]
        arrays[name] = result.images
        usage = f" ({usage_summary(result)})" if name != MONOLITH else ""
        log(f"  {name:<14} FD {row['fd']:8.3f}  P {row['precision']:.3f}  R {row['recall']:.3f}  "
            f"cov-TV {row['coverage']['tv_vs_data']:.3f}  {seconds:5.1f}s{usage}")

    figure = out_dir / "strategies.png"
    save_strategy_figure(grids, figure)
    np.savez_compressed(out_dir / "samples.npz", **{k.replace(":", "_"): v for k, v in arrays.items()})
    report = {
        "run_dir": str(run_dir),
        "manifest_sha256": mf.manifest_sha256(manifest),
        "dataset": {k: manifest["dataset"].get(k) for k in ("source", "fingerprint", "num_images", "image_shape")},
        "num_clusters": num_clusters,
        "clustering": manifest["clustering"].get("method"),
        "featurenet": {"name": net.name, "sha256": net.sha256, "key": net.key, "dim": net.dim,
                       "trained_now": net.trained, "path": str(Path("eval") / "featurenet"),
                       "metric_name": f"FD in {net.name} features"},
        "request": {"n": n, "steps": steps, "solver": solver, "seed": seed},
        "holdout_count": len(real_images),
        "knn_k": KNN_K,
        "data_share": data_share.tolist(),
        "holdout_router_share": holdout_share.tolist(),
        "results": rows,
        "figure": str(figure.relative_to(run_dir)),
        "samples": "eval/samples.npz",
    }
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "report.md").write_text(format_markdown(report))
    log(f"report -> {out_dir / 'report.json'}, {out_dir / 'report.md'}; grids -> {figure}")
    return report


# ---------------------------------------------------------------------------------------------------------
# Markdown.
# ---------------------------------------------------------------------------------------------------------


def _shares_text(values: Sequence[float]) -> str:
    return " ".join(f"{v:.2f}" for v in values)


def format_markdown(report: dict) -> str:
    """The report as markdown: a quality table, a coverage table and router usage per step."""
    net, req = report["featurenet"], report["request"]
    lines = [
        f"# Evaluation of `{report['run_dir']}`",
        "",
        (f"{net['metric_name']} (a conv net trained on this dataset's k-means pseudo-classes, sha256 "
         f"`{net['sha256'][:16]}`; **not FID**: comparable only between runs on this dataset). "
         f"{req['n']} samples per row, {req['steps']} {req['solver']} steps, seed {req['seed']}, against "
         f"{report['holdout_count']} held-out images. Precision/recall: k-NN manifolds, k={report['knn_k']} "
         "(Kynkäänniemi et al. 2019). Coverage: total variation between the router's t=0 cluster assignment of "
         "the samples and the data's cluster shares. `real (train)` = training images, the finite-sample floor."),
        "",
        "| model | FD ↓ | precision ↑ | recall ↑ | coverage TV ↓ | expert evals / sample | seconds |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in report["results"].items():
        cells = [f"{row['fd']:.3f}", f"{row['precision']:.3f}", f"{row['recall']:.3f}", "-", "-", "-"]
        if "coverage" in row:
            cells[3:] = [f"{row['coverage']['tv_vs_data']:.3f}", f"{row['expert_evals_per_sample']:.0f}",
                         f"{row['seconds']:.1f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    k = report["num_clusters"]
    lines += ["", "Cluster shares (router argmax at t=0):", "",
              "| | " + " | ".join(f"c{i}" for i in range(k)) + " |", "|---|" + "---:|" * k,
              "| data (train shards) | " + " | ".join(f"{v:.2f}" for v in report["data_share"]) + " |",
              "| held-out images | " + " | ".join(f"{v:.2f}" for v in report["holdout_router_share"]) + " |"]
    for name, row in report["results"].items():
        if "coverage" in row:
            lines.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in row["coverage"]["share"]) + " |")
    usage = {name: np.asarray(row["router_usage"]) for name, row in report["results"].items() if "router_usage" in row}
    if usage:
        lines += ["", "Router usage (mean weight per expert) at the first, middle and last solver step:", "",
                  "| strategy | first (t=1) | middle | last |", "|---|---|---|---|"]
        for name, u in usage.items():
            lines.append(f"| {name} | {_shares_text(u[0])} | {_shares_text(u[len(u) // 2])} | "
                         f"{_shares_text(u[-1])} |")
    return "\n".join(lines) + "\n"
