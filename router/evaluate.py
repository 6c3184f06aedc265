"""`ddm eval-router`: how well the router's p(k | x_t, t) matches the truth on held-out images.

Per t-bin: top-1 accuracy and cross-entropy; overall: expected calibration error (15 confidence bins),
confusion matrix, and the mean predicted distribution at t = 1 (pure noise) against the cluster proportions
(the posterior there *is* the prior, so a good router predicts the proportions, not uniform).

A router of labelled data is evaluated under the null label (p(k | x_t, t), what unguided sampling uses) and
given each image's class (p(k | x_t, t, y), what guided sampling uses): accuracy and cross-entropy given y on
the same noisy inputs, and at pure noise the mean prediction per class against that class's cluster shares
p(k | y), beside the best a class-blind prediction can do there (the cluster proportions). A router that takes
condition embeddings (`router.condition: true` on a run with `data.conditions`) is likewise evaluated under the
null condition and given each held-out image's embedding (`given_condition`: accuracy and cross-entropy).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ddm.core.errors import DDMError
from ddm.core.flow import interpolate
from ddm.data.run import Run
from ddm.data.shards import read_conditions, read_labels, read_shard
from ddm.router.model import router_condition_shape
from ddm.router.trained import load_router
from ddm.train.plots import pyplot, save_figure

logger = logging.getLogger(__name__)

T_BINS = 10
ECE_BINS = 15
NOISE_DRAWS = 64  # pure-noise inputs per class for the prediction at t = 1 given the class


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE of top-1 confidence. probs: [N, K], labels: [N]."""
    confidence, predicted = probs.max(-1), probs.argmax(-1)
    correct = predicted == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (confidence > lo) & (confidence <= hi)
        if inside.any():
            ece += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(ece)


def router_probabilities(apply: Callable, x0: np.ndarray, t: np.ndarray, seed: int, batch: int = 512,
                         y: np.ndarray | None = None) -> np.ndarray:
    """p(k | x_t, t[, y]) for x_t built from x0: [N, H, W, C] in [-1, 1], t: [N] and y: [N] int32 class labels
    (None: the router's unconditional input). apply(x, t, y) -> logits. Returns [N, K] float32. The noise is a
    function of (seed, row), so calls with and without y see the same x_t."""
    key = jax.random.key(seed)

    def probabilities(x, tt, yy, k):
        return jax.nn.softmax(apply(interpolate(x, jax.random.normal(k, x.shape), tt), tt, yy), -1)

    fn = jax.jit(probabilities)
    out = []
    for i in range(0, len(x0), batch):
        yb = None if y is None else jnp.asarray(y[i:i + batch])
        out.append(np.asarray(fn(jnp.asarray(x0[i:i + batch]), jnp.asarray(t[i:i + batch]), yb,
                                 jax.random.fold_in(key, i))))
    return np.concatenate(out)


def _given_class(model: Callable, run: Run, x0: np.ndarray, t: np.ndarray, clusters: np.ndarray,
                 classes: np.ndarray, seed: int) -> dict:
    """The router given each image's class: accuracy and cross-entropy on the evaluation's (x0, t) draws, and
    at pure noise the mean p(k | x_1, y) per class vs p(k | y). classes: [N] int32 of x0's rows."""
    probs = router_probabilities(model, x0, t, seed, y=classes)
    nll = -np.log(np.clip(probs[np.arange(len(clusters)), clusters], 1e-12, None))
    num_classes, shares = run.num_classes, run.class_shares().T  # [C, K]
    present = np.unique(classes)
    # NOISE_DRAWS pure-noise inputs per class (x0 is irrelevant at t = 1), averaged per class.
    ys = np.repeat(present, NOISE_DRAWS).astype(np.int32)
    ones, blank = np.ones(len(ys), np.float32), np.zeros((len(ys),) + x0.shape[1:], np.float32)
    at_noise = router_probabilities(model, blank, ones, seed + 1, y=ys).reshape(len(present), NOISE_DRAWS, -1).mean(1)
    blind = router_probabilities(model, blank, ones, seed + 1).reshape(len(present), NOISE_DRAWS, -1).mean(1)
    weight = np.bincount(classes, minlength=num_classes)[present] / len(classes)

    def mean_tv(predicted: np.ndarray) -> float:
        return float((weight * 0.5 * np.abs(predicted - shares[present]).sum(-1)).sum())

    return {"accuracy": float((probs.argmax(-1) == clusters).mean()), "cross_entropy": float(nll.mean()),
            "at_pure_noise": {"classes": present.tolist(), "predicted": at_noise.tolist(),
                              "class_shares": shares[present].tolist(), "total_variation": mean_tv(at_noise),
                              "null_label_total_variation": mean_tv(blind),
                              "cluster_shares_total_variation": mean_tv(run.cluster_shares()[None])}}


def evaluate_router(run_dir: str | Path, overrides: list[str] | tuple[str, ...] = (), *, seed: int = 0,
                    repeats: int = 4) -> dict:
    """Writes RUN/eval/router.json and router.png; returns the report."""
    run = Run.open(run_dir, overrides)
    if run.holdout_path() is None:
        raise DDMError(f"{run.root} has no held-out images (prepared with data.holdout_fraction=0)")
    apply, state = load_router(run)

    def model(x, t, y=None):
        return apply(state, x, t, y)

    images = run.codec.encode(read_shard(run.holdout_path()))
    labels = run.holdout_labels()
    k = run.num_clusters
    prior = run.cluster_shares()

    # Each held-out image at `repeats` noise levels spread evenly over the t-bins.
    n = len(images)
    x0 = np.tile(images, (repeats * T_BINS, 1, 1, 1))
    y = np.tile(labels, repeats * T_BINS)
    rng = np.random.default_rng(seed)
    bin_of = np.repeat(np.arange(T_BINS), repeats * n)
    t = ((bin_of + rng.uniform(size=len(x0))) / T_BINS).astype(np.float32)
    probs = router_probabilities(model, x0, t, seed)
    nll = -np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, None))
    correct = probs.argmax(-1) == y

    per_bin = [{"t_lo": b / T_BINS, "t_hi": (b + 1) / T_BINS, "accuracy": float(correct[bin_of == b].mean()),
                "cross_entropy": float(nll[bin_of == b].mean()),
                "ece": expected_calibration_error(probs[bin_of == b], y[bin_of == b])} for b in range(T_BINS)]
    confusion = np.zeros((k, k), np.int64)
    np.add.at(confusion, (y, probs.argmax(-1)), 1)
    at_noise = router_probabilities(model, images, np.ones(n, np.float32), seed + 1).mean(0)
    report = {
        "holdout_images": int(n), "evaluations": int(len(y)), "accuracy": float(correct.mean()),
        "cross_entropy": float(nll.mean()), "ece": expected_calibration_error(probs, y), "per_t_bin": per_bin,
        "confusion": confusion.tolist(),
        "at_pure_noise": {"predicted": at_noise.tolist(), "cluster_shares": prior.tolist(),
                          "total_variation": float(0.5 * np.abs(at_noise - prior).sum())},
    }
    if run.num_classes:
        classes = np.tile(read_labels(run.holdout_path()), repeats * T_BINS)
        report["given_class"] = _given_class(model, run, x0, t, y, classes, seed)
    if router_condition_shape(run.config.router, run.condition_shape):
        conditions = read_conditions(run.holdout_path()).astype(np.float32)
        given = router_probabilities(model, x0, t, seed, y=np.tile(conditions, (repeats * T_BINS,)
                                                                  + (1,) * (conditions.ndim - 1)))
        report["given_condition"] = {
            "accuracy": float((given.argmax(-1) == y).mean()),
            "cross_entropy": float(-np.log(np.clip(given[np.arange(len(y)), y], 1e-12, None)).mean())}
    out_dir = run.eval_dir
    out_dir.mkdir(exist_ok=True)
    (out_dir / "router.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_router_report(report, out_dir / "router.png")
    logger.info(format_router_report(report))
    logger.info(f"wrote {out_dir / 'router.json'} and {out_dir / 'router.png'}")
    return report


def format_router_report(report: dict) -> str:
    lines = [f"router on {report['holdout_images']} held-out images x {report['evaluations'] // report['holdout_images']}"
             f" noise levels: accuracy {report['accuracy']:.3f}, cross-entropy {report['cross_entropy']:.3f}, "
             f"ECE {report['ece']:.3f}", f"{'t':>11}  {'accuracy':>8}  {'xent':>6}  {'ece':>6}"]
    for b in report["per_t_bin"]:
        lines.append(f"{b['t_lo']:.1f} - {b['t_hi']:.1f}  {b['accuracy']:>8.3f}  {b['cross_entropy']:>6.3f}  {b['ece']:>6.3f}")
    noise = report["at_pure_noise"]
    lines.append("at t=1: predicted " + " ".join(f"{p:.3f}" for p in noise["predicted"]) + " | shares "
                 + " ".join(f"{p:.3f}" for p in noise["cluster_shares"]) + f" (TV {noise['total_variation']:.3f})")
    if "given_class" in report:
        given = report["given_class"]
        at = given["at_pure_noise"]
        lines.append(f"given the class y: accuracy {given['accuracy']:.3f}, cross-entropy {given['cross_entropy']:.3f}; "
                     f"at t=1 p(k | y) vs the class's cluster shares: TV {at['total_variation']:.3f} (null label "
                     f"{at['null_label_total_variation']:.3f}, best class-blind {at['cluster_shares_total_variation']:.3f})")
    if "given_condition" in report:
        given = report["given_condition"]
        lines.append(f"given the condition c: accuracy {given['accuracy']:.3f}, cross-entropy "
                     f"{given['cross_entropy']:.3f} (above: under the null condition)")
    return "\n".join(lines)


def plot_router_report(report: dict, path: Path) -> None:
    """Accuracy and calibration error vs t, and the confusion matrix, as one PNG."""
    plt = pyplot()
    bins = report["per_t_bin"]
    centers = [(b["t_lo"] + b["t_hi"]) / 2 for b in bins]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5), dpi=110)
    ax1.plot(centers, [b["accuracy"] for b in bins], "o-", label="top-1 accuracy")
    ax1.plot(centers, [b["ece"] for b in bins], "s--", label="calibration error (ECE)")
    ax1.axhline(max(report["at_pure_noise"]["cluster_shares"]), color="gray", lw=0.8, ls=":",
                label="largest cluster share")
    ax1.set_xlabel("t (0 = data, 1 = noise)")
    ax1.set_ylim(0, 1.02)
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    confusion = np.asarray(report["confusion"], float)
    ax2.imshow(confusion / np.maximum(confusion.sum(1, keepdims=True), 1), cmap="Blues", vmin=0, vmax=1)
    ax2.set_xlabel("predicted cluster")
    ax2.set_ylabel("true cluster")
    ax2.set_title("confusion (row-normalised)")
    fig.tight_layout()
    save_figure(fig, path)
