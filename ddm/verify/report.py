"""`ddm consensus-eval`: independent verifier processes, commit-reveal, a majority vote, and the measured
distance distributions that the verification thresholds are calibrated from (GUIDE section 4,
docs/verification.md).

The claimant (this process) builds honest and tampered claims (`ddm.verify.claims`), N verifier processes
regenerate them and commit then reveal (`ddm.verify.worker`, plus copying verifiers that must be caught), and
the analysis (`ddm.verify.analysis`) calibrates the pHash and tolerance thresholds and scores every mode with
single, majority and Byzantine votes. Outputs (in RUN/eval or --out): consensus_report.json, consensus_hist.png,
consensus_work/ (the claims, each verifier's commitments, reveal and log), and verify_thresholds.json (the
calibrated thresholds; `ddm verify` reads them from RUN/eval).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from ddm.data.run import Run
from ddm.sampling.load import load_ensemble
from ddm.sampling.request import conditions_sha256
from ddm.train.plots import pyplot, save_figure
from ddm.verify.analysis import MODES_SCORED, analyse
from ddm.verify.claims import HONEST_KINDS, INTRA_KIND, EvalSettings, build_claims, gallery
from ddm.verify.phash import HASH_BITS
from ddm.verify.thresholds import Thresholds, write_thresholds
from ddm.verify.verdict import run_thresholds
from ddm.verify.worker import CONDITIONS_FILE, run_verifiers

logger = logging.getLogger(__name__)


def plot_histograms(analysis: dict, path: Path) -> Path:
    """Per-image pHash distance histograms (fraction of images) with the pHash threshold, and per-image
    max |dx| histograms (log scale) with the tolerance threshold."""
    plt = pyplot()
    hist = analysis["histograms"]
    t = analysis["threshold"]["recommended"]
    edges = np.arange(HASH_BITS + 2) - 0.5
    fig, axes = plt.subplots(3, 1, figsize=(9, 10))
    honest = [k for k in hist if k in HONEST_KINDS]
    attacks = [k for k in analysis["kinds"] if k not in HONEST_KINDS and k != INTRA_KIND]
    groups = [(axes[0], honest + [INTRA_KIND, "nearest_neighbour_same_cluster", "nearest_neighbour_any"],
               "pHash: honest regenerations vs intra-class collisions"),
              (axes[1], honest + attacks, "pHash: honest regenerations vs tampered claims")]
    for ax, keys, title in groups:
        for key in keys:
            counts = np.asarray(hist.get(key, []), np.float64)
            if counts.size == 0 or counts.sum() == 0:
                continue
            ax.stairs(counts / counts.sum(), edges, label=f"{key} (n={int(counts.sum())})",
                      linewidth=2.5 if key in HONEST_KINDS else 1.3)
        ax.axvline(t + 0.5, color="k", linestyle="--", label=f"threshold {t}")
        ax.set_ylabel("fraction of images")
        ax.set_xlabel("pHash Hamming distance to the verifier's regeneration (bits)")
        ax.set_xlim(-0.5, HASH_BITS + 0.5)
        ax.set_title(title)
        ax.legend(fontsize=7, ncol=2)
    values = analysis["max_abs_histograms"]
    log_edges = np.asarray(values["log10_edges"])
    ax = axes[2]
    for key in honest + attacks + [INTRA_KIND, "nearest_neighbour"]:
        counts = np.asarray(values.get(key, []), np.float64)
        if counts.size == 0 or counts.sum() == 0:
            continue
        ax.stairs(counts / counts.sum(), log_edges, label=f"{key}", linewidth=2.5 if key in HONEST_KINDS else 1.3)
    ax.axvline(np.log10(analysis["tolerance"]["max_abs"]), color="k", linestyle="--",
               label=f"max|dx| threshold {analysis['tolerance']['max_abs']:g}")
    ax.set_xlabel("log10 max |dx| per image, regenerated vs claimed values (0 is drawn at -8)")
    ax.set_ylabel("fraction of images")
    ax.set_title("tolerance: honest drift vs tampered claims and collisions")
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    return save_figure(fig, path, dpi=100)


def format_mode_table(analysis: dict) -> list[str]:
    """Claim kinds x modes, each 'single / majority / byzantine' rejection rate (false rejects for honest kinds,
    detection for the others), and intra-class false accepts per image."""
    modes = analysis["modes"]
    lines = [f"  {'kind':<22}" + "".join(f"{m:>22}" for m in MODES_SCORED)]
    for kind in analysis["kinds"]:
        cells = "".join(f"{modes[m][kind]['single']:>8.3f}/{modes[m][kind]['majority']:.3f}/"
                        f"{modes[m][kind]['byzantine']:.3f}" for m in MODES_SCORED)
        lines.append(f"  {kind:<22}{cells}")
    fa = "".join(f"{modes[m]['intra_false_accept_per_image'].get('majority', float('nan')):>13.4f}/"
                 f"{modes[m]['intra_false_accept_per_image']['nearest_neighbour'] or 0:.4f}" for m in MODES_SCORED)
    lines.append(f"  {'intra FA/image maj/NN':<22}{fa}")
    return lines


def format_summary(report: dict) -> str:
    """The report as readable lines: verifiers, commit-reveal, distributions, thresholds, rates per mode."""
    a = report["analysis"]
    pick, tol = a["threshold"], a["tolerance"]
    lines = ["verifiers:"]
    for i, v in enumerate(report["verifiers"]):
        cr = a["commit_reveal"][i]
        status = "commit-reveal ok" if cr["ok"] else f"REJECTED by commit-reveal {cr['problems']}"
        if "devices" in v:
            ident = ", ".join(f"{k} {a['bitwise_identical'][k][a['voters'].index(i)]:.0%}"
                              for k in HONEST_KINDS if k in a["kinds"] and i in a["voters"])
            lines.append(f"  {i}: {v['spec']} ({v['devices']} devices, {v['cpus']} cpus, {v['seconds']}s); "
                         f"bitwise identical: {ident or '-'}; {status}")
        else:
            lines.append(f"  {i}: {v['spec']}; {status}")
    lines.append("per image                  count  pHash med/max     max|dx| median / max    rms median / max")
    for k in a["kinds"]:
        p, m, r = a["phash_per_image"][k], a["max_abs_per_image"][k], a["rms_per_image"][k]
        if p.get("count"):
            lines.append(f"  {k:<24} {p['count']:>6}  {p['median']:>5.1f} {p['max']:>5}     "
                         f"{m['median']:>9.2e} / {m['max']:<9.2e}  {r['median']:>9.2e} / {r['max']:.2e}")
    for k, s in a["nearest_neighbour"].items():
        if s.get("count"):
            lines.append(f"  nearest neighbour pHash ({k}): {s['count']} images, min {s['min']}, median {s['median']}")
    for k, s in a["value_nearest_neighbour"].items():
        if s.get("count"):
            lines.append(f"  nearest neighbour {k}: {s['count']} images, min {s['min']:.3g}, median {s['median']:.3g}")
    lines.append(f"pHash threshold: {pick['recommended']} ({pick['rule']}); honest max {pick['honest_max']}, "
                 f"intra-class min {pick['intra_min']}")
    lines.append(f"tolerance: max|dx| <= {tol['max_abs']:g}, rms <= {tol['rms']:g}, claim medians <= "
                 f"{tol['median_max_abs']:g} / {tol['median_rms']:g} ({tol['rule']}); honest max "
                 f"{tol['honest_max_abs']:.3g} / {tol['honest_max_rms']:.3g}, intra-class min "
                 f"{tol['intra_min_max_abs']} / {tol['intra_min_rms']}")
    lines.append("rejection rate of claims by mode, single/majority/byzantine (honest kinds: false rejects):")
    lines += format_mode_table(a)
    return "\n".join(lines)


def consensus_eval(run_dir: str, settings: EvalSettings = EvalSettings(), out_dir: str | Path | None = None, *,
                   overrides=(), conditions: np.ndarray | None = None) -> dict:
    """`ddm consensus-eval`: claims, N verifier processes with commit-reveal, analysis; writes the JSON report,
    the histogram, and the calibrated thresholds (OUT/verify_thresholds.json, OUT = RUN/eval by default).

    conditions: float32 [m, *condition_shape], the condition embeddings the claims are drawn for on a run
    conditioned on embeddings (`ddm.verify.claims.build_claims`); the verifiers read them from
    consensus_work/conditions.npz, by digest, as `ddm verify --conditions` reads a record's file."""
    t0 = time.perf_counter()
    run = Run.open(run_dir, overrides)
    out = Path(out_dir) if out_dir is not None else run.eval_dir
    work = out / "consensus_work"
    work.mkdir(parents=True, exist_ok=True)
    ensemble = load_ensemble(run)
    manifest_sha = run.sha256
    claims, condition_table = build_claims(ensemble, manifest_sha, settings, conditions)
    t_claims = time.perf_counter() - t0
    claims_path = work / "claims.json"
    (work / CONDITIONS_FILE).unlink(missing_ok=True)  # an earlier evaluation's
    if condition_table:
        np.savez(work / CONDITIONS_FILE, **condition_table)
    in_use = run_thresholds(run).thresholds  # what the verifiers' committed verdicts use (None before the first
    # calibration); the analysis recalibrates
    claims_path.write_text(json.dumps({"run_dir": str(run_dir), "claims": claims,
                                       "thresholds": None if in_use is None else in_use.to_json()}) + "\n")
    specs = settings.all_verifiers()
    logger.info(f"{len(claims)} claims ({settings.requests} requests x {settings.images} images) -> {claims_path}; "
                f"starting {len(specs)} verifier processes ({len(settings.copiers)} of them copiers)")
    reveals, checks = run_verifiers(run_dir, claims_path, specs, settings.images, work, overrides=overrides,
                                    parallel=settings.parallel)
    analysis = analyse(claims, reveals, checks, gallery(claims), margin=settings.margin)
    report = {
        "format": "ddm-consensus-eval/v2",
        "run_dir": str(run_dir),
        "manifest_sha256": manifest_sha,
        "settings": settings.to_json(),
        "conditions": None if conditions is None else {"rows": len(conditions), "shape": list(conditions.shape[1:]),
                                                       "sha256": conditions_sha256(conditions)},
        "verifiers": [o["verifier"] for o in reveals],
        "analysis": analysis,
        "seconds": {"claims": round(t_claims, 1), "total": round(time.perf_counter() - t0, 1)},
    }
    report_path = out / "consensus_report.json"
    report_path.write_text(json.dumps(report, indent=1) + "\n")
    png = plot_histograms(analysis, out / "consensus_hist.png")
    calibrated = Thresholds(**{k: v for k, v in analysis["thresholds"].items() if k != "source"})
    # in RUN/eval by default, where `ddm verify` looks; with --out, beside the report (copy it to RUN/eval)
    thresholds_file = write_thresholds(out, manifest_sha, calibrated, {
        "report": str(report_path), "settings": settings.to_json(), "pick_phash": analysis["threshold"],
        "pick_tolerance": analysis["tolerance"],
        "verifiers": [v["spec"] for i, v in enumerate(report["verifiers"]) if i in analysis["voters"]]})
    logger.info(format_summary(report))
    logger.info(f"report -> {report_path}, histogram -> {png}, thresholds -> {thresholds_file}")
    return report
