"""Adversarial and honest records against `ddm verify`: generic mutants, claims whose environment is forged to look
like another platform's, and honest claims made on other platforms, before uncalibrated and calibrated verifiers.

    python -m benchmarks.fuzz_records [--run-dir runs/digits] [--records 1000] [--forged 240] [--honest 24]
        [--seed 0] [--margin 4] [--recalibrate] [--issue-cases] [--worst-case]

The verifier calibrates itself first (`ddm verify --calibrate`: `ddm.verify.calibrate.calibrate` with its default
second setup, fast-math XLA in another process) unless it already holds thresholds of its own for the run
(--recalibrate: always). Each class is judged by three verifiers, once with records unsigned and once with the
claimant's public key pinned: uncalibrated (auto: bit for bit only), calibrated (auto), calibrated in explicit
tolerance mode. Each record is judged in-process exactly as `ddm verify` judges a file (`Verifier.verify`:
honest -> exit 0, not honest -> 1, DDMError -> 2, anything else a traceback).

Classes:
- the generic categories of `tests/oracles/fuzz.py` (deleted fields, wrong types, huge numbers, digests, swapped
  hashes, request changes, value changes with and without digests recomputed, truncated JSON, environment,
  signature), `--records` mutants of the issue's record (4 images, top1, 8 Heun steps, seed 0); pinned: mutants
  of the signed record (altered after signing);
- forged_environment (`--forged`): a consistent record of another computation (one step fewer or more, half the
  steps, the other solver, another strategy, another seed, or edited pixel values with every digest recomputed)
  that claims a base request and states another environment (the fast-math flags, the verifier's own, a GPU,
  none); pinned: signed by the claimant, who signs its own false claims;
- honest_other_flags (`--honest`): honest records made by a process with the calibration's other XLA flags, of
  requests the calibration did not use (other seeds; steps 8, 16, 30; n 4 and 16); honest_merged: the same
  requests merged into one batch with another, as `ddm serve` does. Pinned: signed by the claimant.

A false accept is an altered claim judged honest. An altered claim whose values are within one float32 ulp of
its request's regeneration everywhere (the generic "lowest bit" edit) is counted apart, as rounding-level: no
tolerance that admits honest rounding drift can reject it. Prints markdown tables (docs/verification.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

from benchmarks.common import machine_table, markdown_table
from ddm.core.errors import DDMError
from ddm.data.run import Run
from ddm.sampling.request import Request
from ddm.verify.calibrate import (
    CalibrationSettings,
    calibrate,
    format_calibration,
    regenerate_elsewhere,
    regenerate_merged,
)
from ddm.verify.environment import environment
from ddm.verify.limits import VerifyLimits
from ddm.verify.records import claimed_values, make_record
from ddm.verify.signing import generate_keypair, load_private_key, load_public_key, sign_record
from ddm.verify.verdict import NO_CALIBRATION, Verifier, run_thresholds, value_distances
from tests.oracles.fuzz import Mutant, issue_cases, mutants, verify_outcome

FAST_MATH = "--xla_cpu_enable_fast_math=true"
GENERIC_RECORD = Request(seed=0, n=4, strategy="top1", steps=8, solver="heun")  # the issue's fuzz record
# bases of the forged claims: the issue's repro (16 images, top1, 16 Heun steps, seed 3) and other shapes of claim
FORGED_BASES = (Request(seed=3, n=16, strategy="top1", steps=16, solver="heun"),
                Request(seed=5, n=16, strategy="prior", steps=16, solver="euler"),
                Request(seed=7, n=16, strategy="full", steps=30, solver="heun"),
                Request(seed=0, n=4, strategy="top1", steps=8, solver="heun"))
CHEATS = ("steps-1", "steps+1", "steps/2", "solver", "strategy", "seed", "pixels: one value +1 level",
          "pixels: every value +0.01", "pixels: one image +1 level", "pixels: noise of 1 level")
# what a strategy cheat computes instead; not top-k with k >= 2, which is `full` itself on a run of 2 experts
ALT_STRATEGIES = {"top1": ("full", "prior"), "prior": ("top1", "full"), "full": ("top1", "prior")}
HONEST_SEED = 10_000  # honest other-platform requests use seeds from here: never a calibration seed
VERIFIERS = (("uncalibrated", "auto"), ("calibrated", "auto"), ("calibrated", "tolerance"))


def forged_envs() -> dict[str, dict]:
    own = environment()
    return {"fast-math flags": dict(own, xla_flags=FAST_MATH), "the verifier's own": own,
            "a GPU": dict(own, backend="gpu", device="NVIDIA H100 80GB HBM3", cpu="unknown"), "none": {}}


def cheat_values(verifier: Verifier, base: Request, cheat: str, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """The values a cheating claimant holds for `base` (float32 [n, H, W, C]) and what it did instead."""
    if cheat.startswith("pixels"):
        values = verifier.regenerate(base).copy()
        flat = values.reshape(len(values), -1)
        i = int(rng.integers(len(values)))
        level = np.float32(1 / 127.5)
        if cheat == "pixels: one value +1 level":
            flat[i, int(rng.integers(flat.shape[1]))] += level
        elif cheat == "pixels: every value +0.01":
            flat += np.float32(0.01)
        elif cheat == "pixels: one image +1 level":
            flat[i] += level
        else:
            flat += (rng.standard_normal(flat.shape) * level).astype(np.float32)
        return values, cheat
    made = {"steps-1": dataclasses.replace(base, steps=base.steps - 1),
            "steps+1": dataclasses.replace(base, steps=base.steps + 1),
            "steps/2": dataclasses.replace(base, steps=base.steps // 2),
            "solver": dataclasses.replace(base, solver="euler" if base.solver == "heun" else "heun"),
            "seed": dataclasses.replace(base, seed=base.seed + 1)}.get(cheat)
    if cheat == "strategy":
        options = ALT_STRATEGIES[base.strategy]
        made = dataclasses.replace(base, strategy=options[int(rng.integers(len(options)))])
    return verifier.regenerate(made), f"made {made.strategy} {made.solver} {made.steps} steps seed {made.seed}"


def forged_claims(verifier: Verifier, count: int, seed: int, key=None) -> list[Mutant]:
    """`count` consistent records of cheats claiming a base request with a forged environment (module docstring);
    signed with `key` when given."""
    rng = np.random.default_rng(seed)
    envs = forged_envs()
    sha = verifier.run.sha256
    out = []
    for i in range(count):
        base = FORGED_BASES[i % len(FORGED_BASES)]
        cheat = CHEATS[int(rng.integers(len(CHEATS)))]
        env_name = list(envs)[int(rng.integers(len(envs)))]
        values, made = cheat_values(verifier, base, cheat, rng)
        record = make_record(sha, base, values, envs[env_name], verifier.ensemble.codec)
        if key is not None:
            record = sign_record(record, key)
        claims = f"{base.strategy} {base.solver} {base.steps} steps n={base.n}"
        detail = f"{cheat} | claims {claims} ({made}); env {env_name}"
        out.append(Mutant("forged_environment", detail, json.dumps(record), True))
    return out


def honest_requests(count: int) -> list[Request]:
    """Requests the calibration never regenerated: seeds from HONEST_SEED, strategies x solvers x steps x n."""
    combos = [(st, so, steps, n) for st in ("top1", "full", "prior") for so in ("heun", "euler")
              for steps in (8, 16, 30) for n in (16, 4)]
    return [Request(seed=HONEST_SEED + i, n=n, strategy=st, steps=steps, solver=so)
            for i, (st, so, steps, n) in enumerate(combos[j % len(combos)] for j in range(count))]


def honest_claims(verifier: Verifier, requests: list[Request], work: Path, key=None) -> list[Mutant]:
    """Honest records of `requests` made on two other setups: a process with fast-math XLA (its own environment
    in the record) and merged batches here (named in the environment, as `ddm serve` does)."""
    sha, codec = verifier.run.sha256, verifier.ensemble.codec
    other, other_env = regenerate_elsewhere(verifier.run.root, requests, FAST_MATH, work)
    merged = regenerate_merged(verifier.ensemble, requests)
    out = []
    for name, values, env in (("honest_other_flags", other, other_env),
                              ("honest_merged", merged, environment("merged batch: 2 requests"))):
        for r, v in zip(requests, values):
            record = make_record(sha, r, v, env, codec)
            record = record if key is None else sign_record(record, key)
            out.append(Mutant(name, f"{r.strategy} {r.solver} {r.steps} steps n={r.n} seed {r.seed}",
                              json.dumps(record), False))
    return out


def rounding_level(verifier: Verifier, text: str) -> bool:
    """Whether a record's values are within one float32 ulp of its request's regeneration at every value."""
    try:
        record = json.loads(text)
        claimed = claimed_values(record)
        regenerated = verifier.regenerate(Request.from_json(record["request"]))
    except (DDMError, ValueError, KeyError, TypeError):
        return False
    if claimed.shape != regenerated.shape:
        return False
    ulp = np.abs(np.spacing(regenerated.astype(np.float32)))
    return bool((np.abs(claimed.astype(np.float64) - regenerated) <= ulp).all())


def judge(verifier: Verifier, cases: list[Mutant], work: Path, original: dict | None = None) -> dict:
    """Per category: {"records", "altered", "exit0", "exit1", "exit2", "traceback", "false_accepts",
    "rounding_level", "false_rejects"} and the details of false accepts / rejects / tracebacks. A request
    mutant (altered None) is altered unless its request regenerates `original`'s values bit for bit."""
    path = work / "record.json"
    table: dict[str, dict] = {}
    details = {"false_accepts": [], "false_rejects": [], "tracebacks": [], "rounding_level": []}
    for m in cases:
        path.write_text(m.text)
        outcome, trace = verify_outcome(verifier, path, m)
        if trace is not None:
            details["tracebacks"].append(trace)
        altered = m.altered
        if altered is None:
            altered = not _generates(verifier, m.request, claimed_values(original))
        row = table.setdefault(m.category, dict.fromkeys(("records", "altered", "exit0", "exit1", "exit2", "traceback",
                                                          "false_accepts", "rounding_level", "false_rejects"), 0))
        row["records"] += 1
        row["altered"] += int(altered)
        row[outcome] += 1
        if altered and outcome == "exit0":
            kind = "rounding_level" if rounding_level(verifier, m.text) else "false_accepts"
            row[kind] += 1
            details[kind].append(f"{m.category}: {m.detail}")
        if not altered and m.category.startswith("honest") and outcome != "exit0":
            row["false_rejects"] += 1
            details["false_rejects"].append(f"{m.category}: {m.detail}")
    return {"by_category": table, **details}


def _generates(verifier: Verifier, request: dict, values: np.ndarray) -> bool:
    """Whether `request` is valid on the run and regenerates `values` bit for bit (then the claim is true)."""
    try:
        regenerated = verifier.regenerate(Request.from_json(request))
    except DDMError:
        return False
    return regenerated.shape == values.shape and np.array_equal(regenerated.view(np.uint32), values.view(np.uint32))


def run_verifiers(verifier: Verifier, own, cases: list[Mutant], work: Path, public_key, original: dict) -> dict:
    """`judge` by each of VERIFIERS: {(calibration, mode): result}."""
    results = {}
    for calibration, mode in VERIFIERS:
        verifier.own = own if calibration == "calibrated" else NO_CALIBRATION
        verifier.mode, verifier.public_key = mode, public_key
        t0 = time.perf_counter()
        results[(calibration, mode)] = judge(verifier, cases, work, original)
        results[(calibration, mode)]["seconds"] = time.perf_counter() - t0
    return results


def summary_tables(unsigned: dict, pinned: dict) -> str:
    """False accepts (altered claims judged honest) and, for honest classes, records accepted: per class and
    verifier, unsigned / key pinned."""
    first = next(iter(unsigned.values()))["by_category"]
    head = ["class", "records", "altered"] + [f"{c} {m}" for c, m in VERIFIERS]
    rows = []
    for category, row in first.items():
        cells = []
        for key in VERIFIERS:
            u, p = unsigned[key]["by_category"][category], pinned[key]["by_category"][category]
            if category.startswith("honest"):
                cells.append(f"{u['exit0']} / {p['exit0']} accepted")
            else:
                level = [r["rounding_level"] for r in (u, p)]
                extra = f" (+{level[0]} / {level[1]} rounding-level)" if any(level) else ""
                cells.append(f"**{u['false_accepts']}** / **{p['false_accepts']}**{extra}")
        rows.append([category, row["records"], row["altered"], *cells])
    totals = []
    for key in VERIFIERS:
        fa = [sum(r["false_accepts"] for r in res[key]["by_category"].values()) for res in (unsigned, pinned)]
        tb = [len(res[key]["tracebacks"]) for res in (unsigned, pinned)]
        totals.append(f"**{fa[0]} / {fa[1]}** false accepts; {tb[0]} / {tb[1]} tracebacks")
    rows.append(["**all**", sum(r["records"] for r in first.values()), sum(r["altered"] for r in first.values()),
                 *totals])
    return markdown_table(head, rows)


def outcome_table(result: dict) -> str:
    rows = [[c, r["records"], r["altered"], r["exit0"], r["exit1"], r["exit2"], r["traceback"], r["false_accepts"],
             r["rounding_level"], r["false_rejects"]] for c, r in result["by_category"].items()]
    return markdown_table(["class", "records", "altered", "exit 0", "exit 1", "exit 2", "traceback",
                           "false accepts", "rounding-level accepts", "honest rejected"], rows)


def distance_table(verifier: Verifier, cases: list[Mutant]) -> str:
    """Per class of honest and forged claims: per-image max |dx| to the claimed request's regeneration (min,
    median, max over images) and the claim medians (min, max): the separation tolerance relies on."""
    stats: dict[str, dict[str, list[float]]] = {}
    for m in cases:
        record = json.loads(m.text)
        claimed = claimed_values(record)
        max_abs, _ = value_distances(claimed, verifier.regenerate(Request.from_json(record["request"])))
        kind = m.category if m.category != "forged_environment" else "forged: " + m.detail.split(" | ")[0]
        s = stats.setdefault(kind, {"images": [], "medians": []})
        s["images"] += max_abs.tolist()
        s["medians"].append(float(np.median(max_abs)))
    rows = [[k, len(s["medians"]), f"{min(s['images']):.2e}", f"{np.median(s['images']):.2e}",
             f"{max(s['images']):.2e}", f"{min(s['medians']):.2e}", f"{max(s['medians']):.2e}"]
            for k, s in sorted(stats.items())]
    return markdown_table(["claims", "count", "image max\\|dx\\| min", "median", "max", "claim median min",
                           "claim median max"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default=str(REPO / "runs" / "digits"))
    parser.add_argument("--records", type=int, default=1000, help="generic mutants (default 1000)")
    parser.add_argument("--forged", type=int, default=240, help="forged-environment claims (default 240)")
    parser.add_argument("--honest", type=int, default=24, help="honest requests per other setup (default 24)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--margin", type=float, default=CalibrationSettings.margin,
                        help=f"calibration margin (default {CalibrationSettings.margin:g}, `ddm verify --calibrate`'s)")
    parser.add_argument("--recalibrate", action="store_true", help="calibrate even if the verifier already has")
    parser.add_argument("--issue-cases", action="store_true", help="also the 93 cases of the earlier issue")
    parser.add_argument("--worst-case", action="store_true")
    args = parser.parse_args()

    t_start = time.perf_counter()
    run = Run.open(args.run_dir)
    print(machine_table(extra={"command": " ".join(sys.argv), "run": f"{args.run_dir} ({run.sha256[:16]})"}))
    own = run_thresholds(run)
    if own.thresholds is None or args.recalibrate:
        t0 = time.perf_counter()
        report = calibrate(run.root, CalibrationSettings(margin=args.margin))
        print(f"\n### calibration ({time.perf_counter() - t0:.0f}s)\n\n```\n{format_calibration(report)}\n```")
        own = run_thresholds(run)
    print(f"\nthresholds: {own.thresholds.to_json()}")
    verifier = Verifier(run, own=NO_CALIBRATION, cache_size=1024)
    work = Path(tempfile.mkdtemp(prefix="ddm-fuzz-"))
    generate_keypair(work / "key")
    private, public = load_private_key(work / "key"), load_public_key(work / "key.pub")

    t0 = time.perf_counter()
    record = make_record(run.sha256, GENERIC_RECORD, verifier.regenerate(GENERIC_RECORD), environment(),
                         verifier.ensemble.codec)
    signed = sign_record(record, private)
    generic = mutants(record, args.records, args.seed)
    generic_signed = mutants(signed, args.records, args.seed)
    forged = forged_claims(verifier, args.forged, args.seed)
    forged_signed = [dataclasses.replace(m, text=json.dumps(sign_record(json.loads(m.text), private)))
                     for m in forged]
    requests = honest_requests(args.honest)
    honest = honest_claims(verifier, requests, work)
    honest_signed = [dataclasses.replace(m, text=json.dumps(sign_record(json.loads(m.text), private)))
                     for m in honest]
    print(f"\nrecords built in {time.perf_counter() - t0:.0f}s: {len(generic)} generic mutants, {len(forged)} "
          f"forged-environment claims, {len(honest)} honest other-platform claims (x2: unsigned and signed)")

    cases = generic + forged + honest
    pinned_cases = generic_signed + forged_signed + honest_signed
    if args.issue_cases:
        cases += issue_cases(record)
        pinned_cases += issue_cases(signed)
    unsigned = run_verifiers(verifier, own, cases, work, None, record)
    pinned = run_verifiers(verifier, own, pinned_cases, work, public, signed)
    print(f"\n### false accepts, unsigned / key pinned ({len(cases)} records each; "
          f"{time.perf_counter() - t_start:.0f}s in all)\n")
    print(summary_tables(unsigned, pinned))
    for label, results in (("unsigned", unsigned), ("key pinned", pinned)):
        for key, res in results.items():
            print(f"\n#### {key[0]} verifier, {key[1]} mode, {label} ({res['seconds']:.0f}s)\n")
            print(outcome_table(res))
            for kind in ("false_accepts", "false_rejects", "tracebacks", "rounding_level"):
                if res[kind]:
                    print(f"\n{kind} ({len(res[kind])}): {res[kind][:12]}")
    print("\n### distances to the regeneration of the claimed request (honest other-platform vs forged claims)\n")
    print(distance_table(verifier, forged + honest))
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
