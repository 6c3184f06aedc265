"""`ddm consensus-eval`: independent verifier processes, a majority vote, and the measured distance
distributions that the verification threshold is chosen from (GUIDE section 4, docs/verification.md).

The claimant (this process) builds honest and tampered claims (`ddm.verify.claims`), N verifier processes
regenerate them (`ddm.verify.worker`), and the analysis (`ddm.verify.analysis`) picks the threshold and scores
single, majority and Byzantine votes. Outputs (in RUN/eval or --out): consensus_report.json,
consensus_hist.png, and consensus_work/ (the claims, each verifier's results and log).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from ddm.core.plots import pyplot, save_figure
from ddm.data.run import Run
from ddm.sampling.load import load_ensemble
from ddm.verify.analysis import analyse
from ddm.verify.claims import HONEST_KINDS, INTRA_KIND, EvalSettings, build_claims
from ddm.verify.phash import HASH_BITS
from ddm.verify.worker import run_verifiers

logger = logging.getLogger(__name__)


def plot_histograms(analysis: dict, path: Path) -> Path:
    """Per-image pHash distance histograms (fraction of images) with the recommended threshold."""
    plt = pyplot()
    hist = analysis["histograms"]
    t = analysis["threshold"]["recommended"]
    edges = np.arange(HASH_BITS + 2) - 0.5
    fig, axes = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    honest = [k for k in hist if k in HONEST_KINDS]
    groups = [(axes[0], honest + [INTRA_KIND, "nearest_neighbour_same_cluster", "nearest_neighbour_any"],
               "honest regenerations vs intra-class collisions"),
              (axes[1], honest + [k for k in analysis["kinds"] if k not in HONEST_KINDS and k != INTRA_KIND],
               "honest regenerations vs tampered claims")]
    for ax, keys, title in groups:
        for key in keys:
            counts = np.asarray(hist.get(key, []), np.float64)
            if counts.size == 0 or counts.sum() == 0:
                continue
            ax.stairs(counts / counts.sum(), edges, label=f"{key} (n={int(counts.sum())})",
                      linewidth=2.5 if key in HONEST_KINDS else 1.3)
        ax.axvline(t + 0.5, color="k", linestyle="--", label=f"threshold {t}")
        ax.set_ylabel("fraction of images")
        ax.set_title(title)
        ax.legend(fontsize=7, ncol=2)
    axes[1].set_xlabel("pHash Hamming distance to the verifier's regeneration (bits)")
    axes[1].set_xlim(-0.5, HASH_BITS + 0.5)
    fig.tight_layout()
    return save_figure(fig, path, dpi=100)


def format_summary(report: dict) -> str:
    """The report as readable lines: verifiers, distributions, threshold and rates around it."""
    a = report["analysis"]
    pick = a["threshold"]
    lines = ["verifiers:"]
    for i, v in enumerate(report["verifiers"]):
        ident = ", ".join(f"{k} {a['bitwise_identical'][k][i]:.0%}" for k in HONEST_KINDS if k in a["kinds"])
        lines.append(f"  {i}: {v['spec']} ({v['devices']} devices, {v['cpus']} cpus, {v['seconds']}s); "
                     f"bitwise identical: {ident}")
    lines.append("per-image pHash distance   count   min  median   p95   max")
    rows = [(k, a["phash_per_image"][k]) for k in a["kinds"]]
    rows += [(f"nearest neighbour ({k})", s) for k, s in a["nearest_neighbour"].items()]
    for name, s in rows:
        if s.get("count"):
            lines.append(f"  {name:<24} {s['count']:>6} {s['min']:>5} {s['median']:>7.1f} {s['p95']:>5.1f} "
                         f"{s['max']:>5}")
    lines.append(f"threshold: recommended {pick['recommended']} ({pick['rule']}); largest with zero intra-class "
                 f"false accepts: {pick['largest_zero_false_accept']}; honest max {pick['honest_max']}, "
                 f"intra-class min {pick['intra_min']}")
    t = pick["recommended"]
    row = a["per_threshold"][t]
    lines.append(f"at threshold {t}: rejection rate of claims   single  majority  byzantine")
    for kind in a["kinds"]:
        r = row[kind]
        label = "false reject" if kind in HONEST_KINDS else "detected"
        lines.append(f"  {kind:<22} {label:<13} {r['single']:>6.2f} {r['majority']:>9.2f} {r['byzantine']:>10.2f}")
    lines.append("threshold  honest FRR (maj)  intra FA/image (maj)  NN FA/image  attacks detected (single/maj/byz)")
    for t in sorted({0, 1, 2, 4, 6, 8, 10, 12, 16, 20, 24, pick["recommended"]}):
        row = a["per_threshold"][t]
        frr = max(row[k]["majority"] for k in HONEST_KINDS if k in row)
        fa = row["intra_false_accept_per_image"]
        det = row.get("all_attacks", {})
        lines.append(f"  {t:>7}  {frr:>16.3f}  {fa.get('majority', float('nan')):>20.3f}  "
                     f"{fa['nearest_neighbour'] if fa['nearest_neighbour'] is not None else float('nan'):>11.3f}  "
                     f"{det.get('single', 0):.3f} / {det.get('majority', 0):.3f} / {det.get('byzantine', 0):.3f}")
    return "\n".join(lines)


def consensus_eval(run_dir: str, settings: EvalSettings = EvalSettings(), out_dir: str | Path | None = None, *,
                   overrides=()) -> dict:
    """`ddm consensus-eval`: claims, N verifier processes, analysis; writes the JSON report and histogram."""
    t0 = time.perf_counter()
    run = Run.open(run_dir, overrides)
    out = Path(out_dir) if out_dir is not None else run.eval_dir
    work = out / "consensus_work"
    work.mkdir(parents=True, exist_ok=True)
    ensemble = load_ensemble(run)
    manifest_sha = run.sha256
    claims, gallery = build_claims(ensemble, manifest_sha, settings)
    t_claims = time.perf_counter() - t0
    claims_path = work / "claims.json"
    claims_path.write_text(json.dumps({"run_dir": str(run_dir), "claims": claims}) + "\n")
    logger.info(f"{len(claims)} claims ({settings.requests} requests x {settings.images} images) -> {claims_path}; "
        f"starting {len(settings.verifiers)} verifier processes")
    outputs = run_verifiers(run_dir, claims_path, settings.verifiers, settings.images, work, overrides=overrides,
                            parallel=settings.parallel)
    report = {
        "format": "ddm-consensus-eval/v1",
        "run_dir": str(run_dir),
        "manifest_sha256": manifest_sha,
        "settings": settings.to_json(),
        "verifiers": [o["verifier"] for o in outputs],
        "analysis": analyse(claims, outputs, gallery),
        "seconds": {"claims": round(t_claims, 1), "total": round(time.perf_counter() - t0, 1)},
    }
    report_path = out / "consensus_report.json"
    report_path.write_text(json.dumps(report, indent=1) + "\n")
    png = plot_histograms(report["analysis"], out / "consensus_hist.png")
    logger.info(format_summary(report))
    logger.info(f"report -> {report_path}, histogram -> {png}")
    return report
