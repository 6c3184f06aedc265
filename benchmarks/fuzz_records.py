"""Adversarial records against `ddm verify`: the issue's 93 former false accepts, and a seeded 1,000-record fuzz.

    python -m benchmarks.fuzz_records [--run-dir runs/digits] [--records 1000] [--seed 0]
        [--modes auto,tolerance,phash] [--signed] [--worst-case]

The honest record is what `ddm sample --record` writes for 4 images, top1, 8 Heun steps, seed 0 (the issue's
setup). Each mutant is judged in-process exactly as `ddm verify` judges a file (`ddm.verify.verdict.Verifier`:
honest -> exit 0, not honest -> 1, DDMError -> 2; anything else would be a traceback), once per mode, with the
wall time of each record (the first regeneration of a new request shape includes its compilation). --signed
also signs the honest record and runs the fuzz with the public key required. --worst-case times one honest
regeneration at the default limits (the most work a record may ask for: n * steps = max_image_steps, strategy
full, Heun). Prints markdown tables (docs/verification.md has the results).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from benchmarks.common import machine_table, markdown_table
from ddm.data.run import Run
from ddm.sampling.request import Request
from ddm.verify.environment import environment
from ddm.verify.limits import VerifyLimits
from ddm.verify.records import make_record
from ddm.verify.signing import generate_keypair, load_private_key, load_public_key, sign_record
from ddm.verify.verdict import Verifier
from tests.oracles.fuzz import issue_cases, judge_mutants, run_fuzz


def table(result: dict) -> str:
    rows = []
    for category, r in result["by_category"].items():
        rows.append([category, r["records"], r["altered"], r["exit0"], r["exit1"], r["exit2"], r["traceback"],
                     r["max_seconds"]])
    total = {k: sum(r[k] for r in result["by_category"].values())
             for k in ("records", "altered", "exit0", "exit1", "exit2", "traceback")}
    rows.append(["**all**", *total.values(), result["max_seconds"]])
    return markdown_table(["category", "records", "altered claims", "exit 0", "exit 1", "exit 2", "traceback",
                           "max s / record"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default=str(REPO / "runs" / "digits"))
    parser.add_argument("--records", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--modes", default="auto,tolerance,phash")
    parser.add_argument("--signed", action="store_true")
    parser.add_argument("--worst-case", action="store_true")
    args = parser.parse_args()

    run = Run.open(args.run_dir)
    verifier = Verifier(run)
    request = Request(seed=0, n=4, strategy="top1", steps=8, solver="heun")
    record = make_record(run.sha256, request, verifier.regenerate(request), environment())
    work = Path(tempfile.mkdtemp(prefix="ddm-fuzz-"))
    print(machine_table(extra={"command": " ".join(sys.argv), "run": f"{args.run_dir} ({run.sha256[:16]})",
                               "record": "4 images, top1, 8 heun steps, seed 0"}))
    for mode in args.modes.split(","):
        verifier.mode = mode
        t0 = time.perf_counter()
        issue = judge_mutants(verifier, record, issue_cases(record), work)
        print(f"\n### mode {mode}: the issue's 93 former false accepts ({time.perf_counter() - t0:.0f}s)\n")
        print(table(issue))
        print(f"\naltered claims judged honest: {len(issue['altered_exit0'])} {issue['altered_exit0'][:10]}")
        t0 = time.perf_counter()
        fuzz = run_fuzz(verifier, record, args.records, args.seed, work)
        print(f"\n### mode {mode}: {args.records} seeded mutants, seed {args.seed} "
              f"({time.perf_counter() - t0:.0f}s, median {fuzz['median_seconds']}s / record)\n")
        print(table(fuzz))
        print(f"\naltered claims judged honest: {len(fuzz['altered_exit0'])} {fuzz['altered_exit0'][:10]}")
        print(f"tracebacks: {len(fuzz['tracebacks'] + issue['tracebacks'])} {fuzz['tracebacks'][:5]}")
    if args.signed:
        generate_keypair(work / "key")
        signed = sign_record(record, load_private_key(work / "key"))
        verifier.mode, verifier.public_key = "auto", load_public_key(work / "key.pub")
        fuzz = run_fuzz(verifier, signed, args.records, args.seed, work)
        print(f"\n### mode auto, signature required: {args.records} seeded mutants of the signed record\n")
        print(table(fuzz))
        print(f"\naltered claims judged honest: {len(fuzz['altered_exit0'])}; signed records judged honest after "
              f"any change: {sum(r['exit0'] for r in fuzz['by_category'].values())}")
    if args.worst_case:
        limits = VerifyLimits()
        n = min(limits.max_n, 128)
        worst = Request(seed=1, n=n, strategy="full", steps=limits.max_image_steps // n, solver="heun")
        t0 = time.perf_counter()
        verifier.regenerate(worst)
        print(f"\nworst case at the default limits: {n} images x {worst.steps} heun steps, strategy full: "
              f"{time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
