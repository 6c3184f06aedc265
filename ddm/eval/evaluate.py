"""`ddm evaluate`: sample quality per routing strategy (and of the monolith) against held-out real images.

For each strategy (default: full, top1, top2, threshold:0.1, sample, top1+full:0.5, prior, without prior on runs
conditioned on embeddings, which have no counts to draw from; plus the monolith when RUN/monolith is trained) we
draw n samples from the same initial noise (unconditional: the null class or condition) and measure, in the features of the
run's feature network (`ddm.eval.featurenet`: a conv net trained on this dataset's k-means pseudo-classes, so
"FD in kmc32-cnn features", not FID):

- FD: Fréchet distance between Gaussians fitted to generated and held-out features (lower is better);
- precision / recall: k-NN manifold estimates (Kynkäänniemi et al. 2019, k=3): the share of generated samples
  inside the real manifold (union of balls reaching each real point's 3rd neighbour) and vice versa;
- coverage: share of samples the router assigns to each cluster at t=0 vs the data's shares (and vs the
  router's own assignment of the held-out images), summarised as total variation (TV) distance;
- router usage per step: the mean routing weight of each expert at each solver step (from SampleResult.weights);
- class accuracy (class-conditional runs): `class_n` samples guided towards classes 0, 1, 2, ... in turn, at
  each guidance scale of `cfg_scales` (1 = the conditional model without guidance), read by the run's class
  classifier (`ddm.eval.featurenet.get_classifier`: the feature net's architecture trained on the true labels of
  the training shards); the share read as the class asked for, overall and per class. The reference row gives
  the classifier's own accuracy on the held-out images.
- condition following (runs conditioned on embeddings): `class_n` samples, each drawn for a held-out image's
  condition embedding, at each guidance scale of `cfg_scales`: their FD to the held-out images and their
  condition match (`ddm.eval.conditional`), with the chance and real-data levels of that match.

A reference row ("real (train)": n training images vs the held-out set) gives the floor these finite-sample
metrics reach on real data. Outputs: RUN/eval/report.json, report.md, strategies.png (grids side by side),
samples.npz (every generated image).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ddm.sampling.ensemble import Ensemble
from ddm.core.errors import DDMError
from ddm.train.plots import save_strategy_figure
from ddm.sampling.routing import PRIOR_WITHOUT_COUNTS, parse_strategy, prior_available
from ddm.data.components import MONOLITH as MONOLITH_COMPONENT
from ddm.data.components import SINGLE_NAMES
from ddm.data.components import STUDENT as STUDENT_COMPONENT
from ddm.data.run import Run
from ddm.data.shards import read_conditions, read_labels, read_shard
from ddm.eval.conditional import chance_match, condition_match
from ddm.eval.features import UserFeatures
from ddm.eval.featurenet import FeatureNet, FeatureNetConfig, apply_padded, get_classifier, get_featurenet
from ddm.eval.metrics import KNN_K, frechet_distance, quality, shares, total_variation
from ddm.eval.latentspace import LatentSpace, latent_spaces
from ddm.eval.pixelpca import fit_pixel_pca
from ddm.sampling.load import load_ensemble, load_single
from ddm.sampling.outputs import load_decoder, usage_summary, viewable

logger = logging.getLogger(__name__)

DEFAULT_STRATEGIES = ("full", "top1", "top2", "threshold:0.1", "sample", "top1+full:0.5", "prior")
DEFAULT_N = 500
DEFAULT_CFG_SCALES = (1.0, 2.0, 3.0)
DEFAULT_CLASS_N = 100  # guided samples per (model, guidance scale)
MONOLITH, STUDENT = MONOLITH_COMPONENT.name, STUDENT_COMPONENT.name
SINGLES = SINGLE_NAMES  # single models evaluated beside the routed ensemble (`ddm.data.components`)
REFERENCE = "real (train)"
GRID_IMAGES = 64


# ---------------------------------------------------------------------------------------------------------
# Models.
# ---------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _router_argmax(router_apply):
    return jax.jit(lambda s, x: jnp.argmax(router_apply(s, x, jnp.zeros((x.shape[0],), jnp.float32), None), -1))


def router_assignments(ensemble: Ensemble, images: np.ndarray, batch: int = 256) -> np.ndarray:
    """argmax_k p(k | x, t=0) of uint8 images [N, H, W, C] (or a latent run's float latents, as stored) under
    the ensemble's router: [N] int32. Batches are padded to `batch` rows (one compilation for any N)."""
    fn = _router_argmax(ensemble.router_apply)
    return apply_padded(lambda x: fn(ensemble.router_params, x), images, batch,
                        encode=ensemble.codec.encode).astype(np.int32)


# ---------------------------------------------------------------------------------------------------------
# The evaluation.
# ---------------------------------------------------------------------------------------------------------


def _load_real(run: Run) -> np.ndarray:
    if run.holdout_path() is None:
        raise DDMError(f"{run.root} has no held-out images to evaluate against: prepare it with "
                       "data.holdout_fraction > 0")
    images = read_shard(run.holdout_path())
    if len(images) <= KNN_K:
        raise DDMError(f"{run.root} has only {len(images)} held-out images; precision/recall need more than {KNN_K}")
    return images


def class_accuracy(model: Ensemble, strategy: str, classifier: FeatureNet, *, class_n: int, cfg_scale: float,
                   steps: int, solver: str, seed: int, batch_size: int | None = None) -> dict:
    """Samples class_n images of classes 0, 1, 2, ... in turn (guidance `cfg_scale`; 1: the conditional model
    alone) and reads them with `classifier`: {"accuracy", "per_class" [num_classes], "seconds"}."""
    num_classes = model.num_classes
    y = np.arange(class_n, dtype=np.int32) % num_classes
    t0 = time.perf_counter()
    result = model.sample(class_n, strategy, steps=steps, solver=solver, seed=seed, y=y,
                          cfg_scale=None if cfg_scale == 1.0 else cfg_scale, batch_size=batch_size)
    correct = classifier.predict(result.images) == y
    per_class = [float(correct[y == c].mean()) if (y == c).any() else None for c in range(num_classes)]
    return {"accuracy": float(correct.mean()), "per_class": per_class,
            "seconds": round(time.perf_counter() - t0, 2)}


def conditional_quality(model: Ensemble, strategy: str, net, real: np.ndarray, real_conditions: np.ndarray,
                        conditions: np.ndarray, *, cfg_scale: float, steps: int, solver: str, seed: int,
                        latent: bool, batch_size: int | None = None) -> dict:
    """Samples one image per row of `conditions` float32 [m, *condition_shape] (held-out embeddings; guidance
    `cfg_scale`, 1: the conditional model alone) and scores them against the held-out images (`real`: their
    features [N, F] in `net`, real_conditions [N, *condition_shape] their embeddings): {"fd", "condition_match",
    "seconds"} (`ddm.eval.conditional`)."""
    t0 = time.perf_counter()
    result = model.sample(len(conditions), strategy, steps=steps, solver=solver, seed=seed, y=conditions,
                          cfg_scale=None if cfg_scale == 1.0 else cfg_scale, batch_size=batch_size)
    features = net.features(result.latents if latent else result.images)
    return {"fd": frechet_distance(real, features),
            "condition_match": condition_match(features, conditions, real, real_conditions),
            "seconds": round(time.perf_counter() - t0, 2)}


def evaluation_strategies(strategies: Sequence[str] | None, condition_shape: tuple[int, ...]) -> list[str]:
    """The strategies to evaluate: `strategies`, or None for DEFAULT_STRATEGIES, less `prior` on a run conditioned
    on embeddings (it draws from class counts, which such a run has none of). DDMError when `prior` is asked for
    there explicitly."""
    if strategies is None:
        return [s for s in DEFAULT_STRATEGIES if s != "prior" or prior_available(condition_shape)]
    if not prior_available(condition_shape) and any(parse_strategy(s).kind == "prior" for s in strategies):
        raise DDMError(f"{PRIOR_WITHOUT_COUNTS}; leave it out of --strategies")
    return list(strategies)


def evaluate_run(run_dir: str | Path, overrides: Sequence[str] = (), *, n: int = DEFAULT_N, steps: int | None = None,
                 solver: str | None = None, seed: int = 0, strategies: Sequence[str] | None = None,
                 monolith: bool = True, batch_size: int | None = None, cache_dir: str | Path | None = None,
                 feature_cfg: FeatureNetConfig | None = None, features: UserFeatures | None = None,
                 cfg_scales: Sequence[float] = DEFAULT_CFG_SCALES, class_n: int = DEFAULT_CLASS_N,
                 student: bool = True, out_dir: str | Path | None = None) -> dict:
    """Evaluates a run; writes RUN/eval/{report.json, report.md, strategies.png, samples.npz}; returns the report.

    n: samples per strategy (> k=3). steps / solver: ODE settings (default: the run's sample section).
    strategies: None: `evaluation_strategies`' defaults for the run.
    seed: noise seed, the same for every strategy (paired comparison). monolith / student: include RUN/monolith /
    the distilled RUN/student if trained. out_dir: where the outputs go (default RUN/eval).
    features: a user feature extractor (`ddm.eval.features.load_features`) instead of the run's feature net.
    cfg_scales, class_n: guidance scales and samples per scale of the class accuracy (class-conditional runs;
    the classifier trains with `feature_cfg`'s settings, whatever `features` is).
    """
    run_dir = Path(run_dir)
    if n <= KNN_K:
        raise DDMError(f"--n must be larger than k={KNN_K} for precision/recall, got {n}")
    if class_n < 1:
        raise DDMError(f"--class-n must be >= 1, got {class_n}")
    if any(not np.isfinite(s) or s < 0 for s in cfg_scales):
        raise DDMError(f"guidance scales must be finite numbers >= 0, got {list(cfg_scales)}")
    for strategy in strategies or ():
        parse_strategy(strategy)  # a bad strategy fails before anything is loaded or trained
    run = Run.open(run_dir, overrides)
    strategies = evaluation_strategies(strategies, run.condition_shape)
    steps = run.config.sample.steps if steps is None else steps
    limits = run.config.sample
    if n > limits.max_n or steps > limits.max_steps:  # before any model loads: a huge request is refused at once
        raise DDMError(f"--n {n} / --steps {steps} exceed sample.max_n={limits.max_n} / sample.max_steps="
                       f"{limits.max_steps} (--set sample.max_n=N / sample.max_steps=N to allow more)")
    latent = run.codec.latents  # FD etc. on decoded images or on the latents: `ddm.eval.latentspace`
    decoder = load_decoder(run.config.sample.decoder) if latent else None
    real_images = _load_real(run)
    ensemble = load_ensemble(run)
    manifest = run.manifest
    solver = solver or run.config.sample.solver
    num_clusters = run.num_clusters
    out_dir = run.eval_dir if out_dir is None else Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    train_images = np.concatenate([read_shard(path) for path in run.shard_paths()])
    if latent:
        net, second, pca = latent_spaces(run.codec, train_images, decoder, features)
    else:
        net = features or get_featurenet(run, cfg=feature_cfg, cache_dir=cache_dir)
        second = pca = fit_pixel_pca(train_images)
    real = net.features(real_images)
    real_pca = second.features(real_images)
    data_share = run.cluster_shares()
    holdout_share = shares(router_assignments(ensemble, real_images), num_clusters)

    rows: dict[str, dict] = {}
    pick = np.random.default_rng(seed).permutation(len(train_images))[:n]
    rows[REFERENCE] = {"kind": "reference", "n": len(pick), **quality(real, net.features(train_images[pick])),
                       "fd_pca": frechet_distance(real_pca, second.features(train_images[pick]))}
    classifier = None
    if latent and run.num_classes and cfg_scales:
        logger.info("class accuracy skipped: its classifier learns from images, and this run's shards hold latents")
    elif run.num_classes and cfg_scales:
        classifier = get_classifier(run, cfg=feature_cfg, cache_dir=cache_dir)
        real_classes = read_labels(run.holdout_path())
        rows[REFERENCE]["class_accuracy"] = float((classifier.predict(real_images) == real_classes).mean())

    conditional = None  # runs conditioned on embeddings: samples drawn for held-out embeddings
    real_conditions = read_conditions(run.holdout_path()) if run.condition_shape and cfg_scales else None
    if real_conditions is not None:
        real_conditions = np.asarray(real_conditions, np.float32)
        chosen = np.random.default_rng(seed).permutation(len(real_images))[:class_n]
        train_conditions = np.concatenate([read_conditions(path) for path in run.shard_paths()])
        drawn_for = np.ascontiguousarray(real_conditions[chosen])  # [m, *condition_shape]: one sample each
        real_match = condition_match(net.features(train_images[pick]), train_conditions[pick], real, real_conditions)
        rows[REFERENCE]["condition_match"] = real_match
        conditional = {"n": len(chosen), "cfg_scales": [float(s) for s in cfg_scales],
                       "chance_match": chance_match(real_conditions, seed), "real_match": real_match}

    models = [(s, ensemble, s) for s in strategies]
    for name, wanted in ((MONOLITH, monolith), (STUDENT, student)):
        single = load_single(run, name) if wanted else None
        if single is not None:
            models.append((name, single, "single:0"))
    grids, arrays = {}, {}
    for name, model, strategy in models:
        t0 = time.perf_counter()
        result = model.sample(n, strategy, steps=steps, solver=solver, seed=seed, batch_size=batch_size)
        seconds = time.perf_counter() - t0
        stored = result.latents if latent else result.images  # what the shards hold: comparable with real_images
        row = {"kind": name if name in SINGLES else "ensemble", "strategy": strategy, "n": n,
               **quality(real, net.features(stored)),
               "fd_pca": frechet_distance(real_pca, second.features(stored)), "seconds": round(seconds, 2),
               "expert_evals_per_sample": result.expert_evals / n}
        share = shares(router_assignments(ensemble, stored), num_clusters)
        row["coverage"] = {"share": share.tolist(), "tv_vs_data": total_variation(share, data_share),
                           "tv_vs_holdout": total_variation(share, holdout_share)}
        if name not in SINGLES:
            row["router_usage"] = np.asarray(result.weights, np.float64).mean(1).tolist()  # [steps, K]
        if classifier is not None:
            row["class_accuracy"] = {f"{scale:g}": class_accuracy(
                model, strategy, classifier, class_n=class_n, cfg_scale=float(scale), steps=steps, solver=solver,
                seed=seed, batch_size=batch_size) for scale in cfg_scales}
        if conditional is not None:
            row["conditional"] = {f"{scale:g}": conditional_quality(
                model, strategy, net, real, real_conditions, drawn_for, cfg_scale=float(scale),
                steps=steps, solver=solver, seed=seed, latent=latent, batch_size=batch_size) for scale in cfg_scales}
        rows[name] = row
        grids[name] = viewable(result, decoder)[0][:GRID_IMAGES]
        arrays[name] = stored
        usage = f" ({usage_summary(result)})" if name not in SINGLES else ""
        accuracy = "".join(f"  acc@{s} {a['accuracy']:.2f}" for s, a in row.get("class_accuracy", {}).items())
        accuracy += "".join(f"  cond@{s} FD {c['fd']:.1f} match {c['condition_match']:.3f}"
                            for s, c in row.get("conditional", {}).items())
        logger.info(f"  {name:<14} FD {row['fd']:8.3f}  FD-pca {row['fd_pca']:7.3f}  P {row['precision']:.3f}  R {row['recall']:.3f}  "
            f"cov-TV {row['coverage']['tv_vs_data']:.3f}  {seconds:5.1f}s{accuracy}{usage}")

    figure = out_dir / "strategies.png"
    save_strategy_figure(grids, figure)
    np.savez_compressed(out_dir / "samples.npz", **{k.replace(":", "_"): v for k, v in arrays.items()})
    report = {
        "run_dir": str(run_dir),
        "manifest_sha256": run.sha256,
        "dataset": {k: manifest["dataset"].get(k) for k in ("source", "fingerprint", "num_images", "image_shape")},
        "num_clusters": num_clusters,
        "clustering": manifest["clustering"].get("method"),
        "featurenet": _features_info(net),
        "pixel_pca": {"name": second.name, "dim": int(pca.basis.shape[1]),
                      "description": second.description if latent else "raw-pixel PCA of the training images"},
        "request": {"n": n, "steps": steps, "solver": solver, "seed": seed},
        "num_classes": run.num_classes,
        "holdout_count": len(real_images),
        "knn_k": KNN_K,
        "data_share": data_share.tolist(),
        "holdout_router_share": holdout_share.tolist(),
        "results": rows,
        "figure": os.path.relpath(figure, run_dir),
        "samples": os.path.relpath(out_dir / "samples.npz", run_dir),
    }
    if classifier is not None:
        report["classifier"] = {"name": classifier.name, "sha256": classifier.sha256, "key": classifier.key,
                                "trained_now": classifier.trained, "path": str(Path("eval") / "classifier"),
                                "class_n": class_n, "cfg_scales": [float(s) for s in cfg_scales],
                                "holdout_accuracy": rows[REFERENCE]["class_accuracy"]}
    if conditional is not None:
        report["conditional"] = conditional
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "report.md").write_text(format_markdown(report))
    logger.info(f"report -> {out_dir / 'report.json'}, {out_dir / 'report.md'}; grids -> {figure}")
    return report


def _features_info(net: FeatureNet | UserFeatures) -> dict:
    """The report's description of the feature space the metrics were computed in."""
    if isinstance(net, LatentSpace):
        return {"name": net.name, "dim": net.dim, "metric_name": f"FD in {net.name} features",
                "description": net.description}
    if isinstance(net, UserFeatures):
        return {"name": net.name, "user": True, "dim": net.dim, "metric_name": f"FD in {net.name} features",
                "description": f"the user's feature extractor `{net.name}`"}
    trained_in = net.info.get("trained_in") or {}
    where = f", trained on {trained_in.get('cpu') or trained_in.get('device_kind')}" if trained_in else ""
    return {"name": net.name, "sha256": net.sha256, "key": net.key, "dim": net.dim, "trained_now": net.trained,
            "trained_in": trained_in or None,
            "path": str(Path("eval") / "featurenet"), "metric_name": f"FD in {net.name} features",
            "description": (f"a conv net trained on this dataset's k-means pseudo-classes, sha256 `{net.sha256[:16]}`"
                            f"{where}; "
                            "**not FID**: comparable only between evaluations with this same net (this sha256: "
                            "the same recipe trained on another kind of CPU or accelerator gives other weights; "
                            "copy RUN/eval/featurenet or the cache to compare across machines)")}


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
        (f"{net['metric_name']} ({net['description']}). "
         f"{req['n']} samples per row, {req['steps']} {req['solver']} steps, seed {req['seed']}, against "
         f"{report['holdout_count']} held-out images. Precision/recall: k-NN manifolds, k={report['knn_k']} "
         "(Kynkäänniemi et al. 2019). Coverage: total variation between the router's t=0 cluster assignment of "
         "the samples and the data's cluster shares. `real (train)` = training images, the finite-sample floor."),
        "",
        (f"FD-PCA: FD in {report['pixel_pca']['name']} features ({report['pixel_pca']['description']}), on the "
         "same samples, a second feature space."),
        "",
        "| model | FD ↓ | FD-PCA ↓ | precision ↑ | recall ↑ | coverage TV ↓ | expert evals / sample | seconds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in report["results"].items():
        cells = [f"{row['fd']:.3f}", f"{row['fd_pca']:.3f}", f"{row['precision']:.3f}", f"{row['recall']:.3f}",
                 "-", "-", "-"]
        if "coverage" in row:
            cells[4:] = [f"{row['coverage']['tv_vs_data']:.3f}", f"{row['expert_evals_per_sample']:.0f}",
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
    if "classifier" in report:
        lines += _class_accuracy_markdown(report)
    if "conditional" in report:
        lines += _conditional_markdown(report)
    usage = {name: np.asarray(row["router_usage"]) for name, row in report["results"].items() if "router_usage" in row}
    if usage:
        lines += ["", "Router usage (mean weight per expert) at the first, middle and last solver step:", "",
                  "| strategy | first (t=1) | middle | last |", "|---|---|---|---|"]
        for name, u in usage.items():
            lines.append(f"| {name} | {_shares_text(u[0])} | {_shares_text(u[len(u) // 2])} | "
                         f"{_shares_text(u[-1])} |")
    return "\n".join(lines) + "\n"


def _class_accuracy_markdown(report: dict) -> list[str]:
    """The class-accuracy table: one row per model, one column per guidance scale (overall and worst class)."""
    clf = report["classifier"]
    scales = [f"{s:g}" for s in clf["cfg_scales"]]
    lines = ["", (f"Class accuracy of guided samples ({clf['class_n']} per cell, classes in turn), read by "
                  f"{clf['name']} (the same conv net trained on the true labels of the training shards, sha256 "
                  f"`{clf['sha256'][:16]}`; {clf['holdout_accuracy']:.1%} on the held-out images). Guidance scale 1 "
                  "is the conditional model without guidance. Cells: overall / worst class."), "",
             "| model | " + " | ".join(f"cfg {s}" for s in scales) + " |", "|---|" + "---:|" * len(scales)]
    for name, row in report["results"].items():
        if "class_accuracy" in row and isinstance(row["class_accuracy"], dict):
            cells = []
            for s in scales:
                acc = row["class_accuracy"][s]
                worst = min(a for a in acc["per_class"] if a is not None)
                cells.append(f"{acc['accuracy']:.1%} / {worst:.0%}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _conditional_markdown(report: dict) -> list[str]:
    """The condition-following table: one row per model, one column per guidance scale (FD / condition match)."""
    cond = report["conditional"]
    scales = [f"{s:g}" for s in cond["cfg_scales"]]
    lines = ["", (f"Condition following: {cond['n']} samples per cell, each drawn for a held-out image's condition "
                  "embedding; FD against the held-out images, and condition match: the mean cosine similarity "
                  "between a sample's embedding and that of its nearest held-out image in features (ddm/eval/"
                  f"conditional.py). Chance (embeddings of other images) {cond['chance_match']:.3f}; real training "
                  f"images {cond['real_match']:.3f}. Guidance scale 1 is the conditional model without guidance. "
                  "Cells: FD / match."), "",
             "| model | " + " | ".join(f"cfg {s}" for s in scales) + " |", "|---|" + "---:|" * len(scales)]
    for name, row in report["results"].items():
        if "conditional" in row:
            cells = [f"{row['conditional'][s]['fd']:.1f} / {row['conditional'][s]['condition_match']:.3f}"
                     for s in scales]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines
