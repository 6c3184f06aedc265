"""`ddm verify --calibrate`: a verifier measures the honest drift between setups it really runs, and writes the
tolerance thresholds it will judge other platforms' claims with (RUN/eval/verify_thresholds.json).

The setups, each regenerating the same calibration requests (strategies x solvers x step counts x a few seeds):

- reference: this process as it is: exactly what `ddm verify` regenerates with later;
- other XLA flags: a second process with `other_xla_flags` added to XLA_FLAGS (XLA reads them once, when jax
  starts its backend, hence a process). The default, fast-math CPU code generation, rounds differently the way
  another CPU, compiler or library version does;
- merged: this process with each request merged into one batch with another request, as `ddm serve` batches
  (other matmul shapes and summation orders, the same noise and routing draws).

Per image of every non-reference setup: max |dx|, RMS dx and pHash distance to the reference; per claim the
medians over its images. The thresholds are `margin` x the largest honest per-image value (the pHash bound is the
largest honest distance itself), and for claim medians `margin` x the 90th percentile of the per-image values
(`pick_thresholds` says why), measured on honest regenerations only: cheats are never used to tune them. A setup
that changes no bit leaves tolerance as strict as exact mode; the summary says so.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import itertools
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ddm.core import documents
from ddm.core.errors import DDMError
from ddm.core.files import atomic_write
from ddm.core.schema import Anything, ListOf, Obj, Str
from ddm.data.run import Run
from ddm.sampling.load import load_ensemble
from ddm.sampling.request import Request, generate, generate_many
from ddm.sampling.routing import parse_strategy
from ddm.verify.environment import environment, environment_differences
from ddm.verify.thresholds import HALF_LEVEL, MEDIAN_MIN_IMAGES, Thresholds, write_thresholds
from ddm.verify.verdict import image_checks

logger = logging.getLogger(__name__)

DEFAULT_OTHER_FLAGS = "--xla_cpu_enable_fast_math=true"
MEDIAN_QUANTILE = 0.9  # the per-image quantile of honest drift that bounds a claim's median (`pick_thresholds`)
MERGE_PARTNER_SEED = 1_000_003  # the seed of the request each calibration request is merged with
MERGE_PARTNER_N = 3  # a batch of another size than the request's: other matmul shapes
REQUESTS_FORMAT = "ddm-calibration-requests/v1"
REQUESTS_SCHEMA = Obj({"format": Str(), "requests": ListOf(Anything(dict, "an object"), min_len=1)})


@dataclasses.dataclass(frozen=True)
class CalibrationSettings:
    """What `calibrate` regenerates: `seeds` requests of `images` images per strategy x solver x step count
    (steps: () for the run's `sample.steps`). Strategies the run cannot serve (routed ones without a router,
    prior without cluster counts) are left out; class-conditional runs get every other request guided (labels,
    the run's `sample.cfg_scale`). margin: 4 by default, because honest drift is heavy-tailed: a few images in
    a hundred drift several times further than the rest (docs/verification.md has the measurements)."""

    images: int = 8
    seeds: int = 2
    steps: tuple[int, ...] = ()
    strategies: tuple[str, ...] = ("top1", "full", "prior")
    solvers: tuple[str, ...] = ("euler", "heun")
    seed: int = 0
    other_xla_flags: str = DEFAULT_OTHER_FLAGS
    merged: bool = True
    margin: float = 4.0

    def __post_init__(self) -> None:
        if not isinstance(self.images, int) or self.images < MEDIAN_MIN_IMAGES:
            raise DDMError(f"calibration images={self.images!r} must be an integer >= {MEDIAN_MIN_IMAGES} (so that "
                           f"claim medians are measured)")
        if not isinstance(self.seeds, int) or self.seeds < 1:
            raise DDMError(f"calibration seeds={self.seeds!r} must be a positive integer")
        if not self.strategies or not self.solvers:
            raise DDMError("calibration needs at least one strategy and one solver")
        for s in self.strategies:
            parse_strategy(s)
        if not self.other_xla_flags.strip() and not self.merged:
            raise DDMError("calibration needs another setup: other XLA flags, merged batches, or both")
        if not self.margin >= 1:
            raise DDMError(f"margin={self.margin} must be >= 1 (thresholds below the measured honest drift)")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def calibration_requests(run: Run, ensemble, settings: CalibrationSettings) -> list[Request]:
    """The requests every setup regenerates: strategies x solvers x steps x `seeds`, seeds settings.seed, +1,
    ... (one per request)."""
    strategies = [s for s in settings.strategies
                  if not (parse_strategy(s).needs_router and ensemble.router_params is None)
                  and not (parse_strategy(s).kind == "prior" and ensemble.prior_counts is None)]
    if not strategies:
        raise DDMError(f"run {run.root} serves none of the calibration strategies {', '.join(settings.strategies)}")
    steps = settings.steps or (run.config.sample.steps,)
    guided = ensemble.num_classes > 0
    out = []
    combos = itertools.product(strategies, settings.solvers, steps, range(settings.seeds))
    for i, (strategy, solver, n_steps, _) in enumerate(combos):
        labels, cfg = None, None
        if guided and i % 2 == 1:
            labels = tuple((i + j) % ensemble.num_classes for j in range(settings.images))
            cfg = run.config.sample.cfg_scale
        out.append(Request(seed=settings.seed + i, n=settings.images, strategy=strategy, steps=n_steps,
                           solver=solver, labels=labels, cfg_scale=cfg))
    return out


def regenerate(ensemble, requests: list[Request]) -> list[np.ndarray]:
    """Each request's final state, float32 [n, H, W, C], alone (what `ddm verify` regenerates)."""
    return [np.asarray(generate(ensemble, r).x, np.float32) for r in requests]


def regenerate_merged(ensemble, requests: list[Request]) -> list[np.ndarray]:
    """Each request's final state when merged into one batch with a partner request of another size and seed
    (`generate_many`, as `ddm serve` merges): the same draws, other batch shapes."""
    out = []
    for r in requests:
        partner = dataclasses.replace(r, seed=MERGE_PARTNER_SEED + r.seed, n=MERGE_PARTNER_N,
                                      labels=None if r.labels is None else r.labels[:MERGE_PARTNER_N])
        out.append(np.asarray(generate_many(ensemble, [r, partner])[0].x, np.float32))
    return out


def regenerate_elsewhere(run_dir: str | Path, requests: list[Request], xla_flags: str, work: Path,
                         overrides=()) -> tuple[list[np.ndarray], dict[str, str]]:
    """The requests regenerated by another process (`python -m ddm.verify.calibrate`) with `xla_flags` added to
    XLA_FLAGS: (final states, that process's environment). DDMError naming its last log line if it fails."""
    requests_path, out = work / "requests.json", work / "regenerated.npz"
    documents.write(requests_path, {"format": REQUESTS_FORMAT, "requests": [r.to_json() for r in requests]})
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join([*env.get("XLA_FLAGS", "").split(), *xla_flags.split()])
    cmd = [sys.executable, "-m", "ddm.verify.calibrate", "--run-dir", str(run_dir), "--requests", str(requests_path),
           "--out", str(out)]
    for o in overrides:
        cmd += ["--set", o]
    log_path = work / "other_setup.log"
    with open(log_path, "w") as log:
        code = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                              check=False).returncode
    if code != 0 or not out.is_file():
        lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
        raise DDMError(f"the calibration process with XLA_FLAGS+={xla_flags} failed with exit {code}: "
                       f"{lines[-1] if lines else 'no output'}")
    with np.load(out) as data:
        values = [np.asarray(data[f"x{i}"], np.float32) for i in range(len(requests))]
    return values, documents.read(out.with_suffix(".json"), None, "calibration environment")


def drift(requests: list[Request], reference: list[np.ndarray], other: list[np.ndarray], codec) -> list[dict]:
    """Per request: {"request", "identical" (images bitwise equal), "max_abs", "rms", "phash" (lists over images)}
    of `other` against `reference`."""
    rows = []
    for r, a, b in zip(requests, reference, other):
        checks = image_checks(b, a, codec)  # claimed = the other setup's, regenerated = the reference's
        rows.append({"request": r.to_json(), "identical": sum(c.identical for c in checks),
                     "max_abs": [c.max_abs for c in checks], "rms": [c.rms for c in checks],
                     "phash": [c.phash for c in checks]})
    return rows


def pick_thresholds(rows: list[dict], margin: float, *, latents: bool = False) -> tuple[Thresholds, dict]:
    """Thresholds from honest drift (module docstring), and the largest honest values they came from. The tail
    outliers' bound (`ddm.verify.thresholds`) is half an 8-bit level for images, none for latents or when no
    setup changed a bit (no drift seen, no tail allowed)."""
    images = {k: [v for r in rows for v in r[k]] for k in ("max_abs", "rms", "phash")}
    if not all(np.isfinite(images["max_abs"])):
        raise DDMError("an honest regeneration was not finite: nothing to calibrate from")
    medians = {k: [float(np.median(r[k])) for r in rows if len(r[k]) >= MEDIAN_MIN_IMAGES] for k in ("max_abs", "rms")}
    # A claim's median over its images varies from claim to claim (3x on the runs measured), so a few claims'
    # largest median under-states it. An honest claim of n >= 5 images has a median above the per-image
    # MEDIAN_QUANTILE only if 3 of 5 of its images are (binomial: < 1% for q = 0.9), so that quantile of all the
    # images measured bounds the median too, never below the largest claim median seen.
    largest = {"max_abs": max(images["max_abs"]), "rms": max(images["rms"]), "phash": max(images["phash"]),
               **{f"median_{k}": max([float(np.quantile(images[k], MEDIAN_QUANTILE)), *medians[k]])
                  for k in ("max_abs", "rms")}}

    def bound(x: float) -> float:  # margin * x rounded up to 3 significant digits: never below the drift
        y = margin * x
        return float(f"{y:.3g}") if float(f"{y:.3g}") >= y else float(f"{y * (1 + 5e-3):.3g}")

    thresholds = Thresholds(phash=int(largest["phash"]), max_abs=bound(largest["max_abs"]), rms=bound(largest["rms"]),
                            median_max_abs=bound(largest["median_max_abs"]), median_rms=bound(largest["median_rms"]),
                            outlier_max_abs=(None if latents or largest["max_abs"] == 0
                                             else max(bound(largest["max_abs"]), HALF_LEVEL)),
                            source="ddm verify --calibrate")
    return thresholds, largest


def calibrate(run_dir: str | Path, settings: CalibrationSettings = CalibrationSettings(), *, overrides=(),
              work: str | Path | None = None) -> dict:
    """Regenerates the calibration requests in every setup, picks the thresholds and writes them for this
    verifier (RUN/eval/verify_thresholds.json, with the measurements). work: a folder that keeps the other
    process's requests, values and log (default: a temporary one). Returns the report: {"settings",
    "verifier_environment", "setups": {name: {"environment" (other processes), "rows" (`drift`)}}, "largest",
    "thresholds", "seconds", "path"}."""
    t0 = time.perf_counter()
    run = Run.open(run_dir, overrides)
    ensemble = load_ensemble(run, with_router=run.finished(run.component("router")))
    requests = calibration_requests(run, ensemble, settings)
    own_env = environment()
    reference = regenerate(ensemble, requests)
    logger.info(f"calibration: {len(requests)} requests x {settings.images} images regenerated here "
                f"({time.perf_counter() - t0:.0f}s)")
    setups: dict[str, dict] = {}
    if settings.other_xla_flags.strip():
        with contextlib.ExitStack() as stack:
            folder = Path(work) if work is not None else Path(stack.enter_context(
                tempfile.TemporaryDirectory(prefix="ddm-calibrate-")))
            folder.mkdir(parents=True, exist_ok=True)
            values, env = regenerate_elsewhere(run.root, requests, settings.other_xla_flags, folder, overrides)
        if not environment_differences(env, own_env):
            raise DDMError(f"XLA_FLAGS+={settings.other_xla_flags} did not change the environment: not another setup")
        setups[f"XLA_FLAGS+={settings.other_xla_flags}"] = {"environment": env,
                                                            "rows": drift(requests, reference, values, ensemble.codec)}
        logger.info(f"calibration: other XLA flags done ({time.perf_counter() - t0:.0f}s)")
    if settings.merged:
        setups["merged batch"] = {"rows": drift(requests, reference, regenerate_merged(ensemble, requests),
                                                ensemble.codec)}
    rows = [r for s in setups.values() for r in s["rows"]]
    thresholds, largest = pick_thresholds(rows, settings.margin, latents=ensemble.codec.latents)
    report = {"settings": settings.to_json(), "verifier_environment": own_env, "setups": setups,
              "largest": largest, "thresholds": thresholds.to_json(),
              "seconds": round(time.perf_counter() - t0, 1)}
    report["path"] = str(write_thresholds(run.eval_dir, run.sha256, thresholds, report, own_env))
    return report


def format_calibration(report: dict) -> str:
    """The calibration as readable lines: per setup the drift it showed, then the thresholds."""
    lines = [(f"{'setup':<48} {'images':>6} {'bitwise':>7}  {'max|dx| max':>11} {'median':>8}  {'rms max':>8} "
              f"{'median':>8}  pHash max")]
    for name, setup in report["setups"].items():
        rows = setup["rows"]
        a = [v for r in rows for v in r["max_abs"]]
        s = [v for r in rows for v in r["rms"]]
        med_a = max(float(np.median(r["max_abs"])) for r in rows)
        med_s = max(float(np.median(r["rms"])) for r in rows)
        lines.append(f"{name[:48]:<48} {len(a):>6} {sum(r['identical'] for r in rows):>7}  {max(a):>11.2e} "
                     f"{med_a:>8.2e}  {max(s):>8.2e} {med_s:>8.2e}  {max(v for r in rows for v in r['phash']):>9}")
    t, m = report["thresholds"], report["settings"]["margin"]
    lines.append(f"thresholds ({m:g} x the largest honest drift): max|dx| <= {t['max_abs']:g}, rms <= {t['rms']:g} "
                 f"per image; claim medians <= {t['median_max_abs']:g} / {t['median_rms']:g} ({m:g} x the "
                 f"{MEDIAN_QUANTILE:g} quantile per image); pHash <= {t['phash']}"
                 + (f"; tail: 5% of a 5+ image claim up to max|dx| {t['outlier_max_abs']:.3g}"
                    if t.get("outlier_max_abs", t["max_abs"]) > t["max_abs"] else ""))
    if report["largest"]["max_abs"] == 0:
        lines.append("no setup changed a bit: tolerance mode is as strict as exact mode")
    lines.append(f"wrote {report['path']} ({report['seconds']:.0f}s)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """The other setup's process: regenerates the requests of --requests and writes --out (.npz of x0, x1, ...)
    and its environment beside it (.json)."""
    parser = argparse.ArgumentParser(prog="python -m ddm.verify.calibrate",
                                     description="regenerate calibration requests in this process's setup")
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--requests", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args(argv)
    try:
        body = documents.read(args.requests, REQUESTS_SCHEMA, "calibration requests", fmt=REQUESTS_FORMAT)
        requests = [Request.from_json(r) for r in body["requests"]]
        run = Run.open(args.run_dir, args.set)
        ensemble = load_ensemble(run, with_router=run.finished(run.component("router")))
        values = regenerate(ensemble, requests)
        out = Path(args.out)
        documents.write(out.with_suffix(".json"), environment())
        buffer = io.BytesIO()
        np.savez(buffer, **{f"x{i}": v for i, v in enumerate(values)})
        atomic_write(out, buffer.getvalue())
    except DDMError as err:
        print(f"ddm verify --calibrate: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
