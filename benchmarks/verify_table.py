"""The verification table of docs/verification.md from a `ddm consensus-eval` work folder, for chosen fleets.

    python -m benchmarks.verify_table RUN/eval/consensus_work --fleet 0,1,2 [--fleet 0,1,3 ...] [--margin 2]
        [--holdout]

A fleet is a set of the folder's honest verifiers (their indices in consensus_work, e.g. verifier_3.json). For
each, the thresholds are recalibrated from that fleet's own honest drift (`ddm.verify.analysis.analyse`, the
same code as `ddm consensus-eval`), and every claim kind is scored in every mode: rejection rates as single /
majority / Byzantine (false rejects for honest kinds, detection for the others). A verifier added to a finished
run (`python -m ddm.verify.worker --run-dir RUN --claims WORK/claims.json --work WORK --index N ...`) joins the
folder's claims without regenerating them. --holdout calibrates on the claims of even-numbered requests and
scores only the odd-numbered ones, so that "0 honest false rejects" is not true by construction.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from benchmarks.common import markdown_table
from ddm.verify.analysis import MODES_SCORED, analyse
from ddm.verify.claims import HONEST_KINDS, gallery
from ddm.verify.thresholds import Thresholds


def _request_index(claim: dict) -> int:
    return claim["record"]["request"]["seed"]


def fleet_table(work: Path, fleet: list[int], margin: float, holdout: bool = False) -> str:
    claims = json.loads((work / "claims.json").read_text())["claims"]
    reveals = [json.loads((work / f"verifier_{i}.json").read_text()) for i in fleet]
    checks = [{"ok": True, "problems": {}, "first": None}] * len(fleet)  # commit-reveal was checked on the run
    thresholds = None
    if holdout:
        calibration = [c for c in claims if _request_index(c) % 2 == 0]
        claims = [c for c in claims if _request_index(c) % 2 == 1]
        fitted = analyse(calibration, reveals, checks, gallery(calibration), margin=margin)
        thresholds = Thresholds(**{k: v for k, v in fitted["thresholds"].items() if k != "source"})
    a = analyse(claims, reveals, checks, gallery(claims), margin=margin, thresholds=thresholds)
    specs = []
    for i, rv in zip(fleet, reveals):
        info = rv["verifier"]
        desc = info.get("xla_flags", "")[-60:] or "plain"
        if info.get("param_mantissa"):
            desc = f"params rounded to {info['param_mantissa']} mantissa bits"
        elif info.get("batch_size"):
            desc = f"batch {info['batch_size']}, {info['cpus']} cpu(s)" + (", fast-math" if "fast_math" in desc else "")
        specs.append(f"{i}: {desc}")
    rows = []
    for kind in a["kinds"]:
        cells = []
        for mode in MODES_SCORED:
            r = a["modes"][mode][kind]
            cells.append(f"{r['single']:.3g} / {r['majority']:.3g} / {r['byzantine']:.3g}")
        label = f"{kind} (false reject)" if kind in HONEST_KINDS else kind
        rows.append([label, a["claims_per_kind"][kind], *cells])
    fa = []
    for mode in MODES_SCORED:
        f = a["modes"][mode]["intra_false_accept_per_image"]
        fa.append(f"{f.get('majority', 0):.3g} / NN {f['nearest_neighbour']:.3g} of {f['nearest_neighbour_images']}")
    rows.append(["intra-class false accepts per image (same_cluster, majority / nearest neighbour)", "", *fa])
    t, tol = a["thresholds"], a["tolerance"]
    split = "calibrated on even requests, scored on odd ones" if holdout else "calibrated and scored on all claims"
    head = (f"fleet {', '.join(specs)}\n\nthresholds ({split}): pHash {t['phash']}; tolerance max|dx| "
            f"{t['max_abs']:g}, rms {t['rms']:g}, claim medians {t['median_max_abs']:g} / {t['median_rms']:g}; "
            f"scored claims' honest max {tol['honest_max_abs']:.3g} / {tol['honest_max_rms']:.3g}, closest "
            f"different image {tol['intra_min_max_abs']:.3g} / {tol['intra_min_rms']:.3g}\n")
    return head + "\n" + markdown_table(["claim kind", "claims", *MODES_SCORED], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("--fleet", action="append", required=True, help="comma-separated verifier indices")
    parser.add_argument("--margin", type=float, default=2.0)
    parser.add_argument("--holdout", action="store_true", help="calibrate on even requests, score odd ones")
    args = parser.parse_args()
    for fleet in args.fleet:
        print(fleet_table(args.work, [int(i) for i in fleet.split(",")], args.margin, args.holdout))
        print()


if __name__ == "__main__":
    main()
