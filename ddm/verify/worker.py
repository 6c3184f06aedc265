"""Verifier processes: each regenerates every claimed request once, in an environment of its own, and takes
part in a commit-reveal round (`ddm.verify.commit`).

A verifier is a separate OS process (`python -m ddm.verify.worker`) with its own setup (`VerifierSpec`: XLA
flags, CPU affinity, batch size, parameter rounding). It loads the run (checkpoints SHA-256 pinned),
regenerates each distinct request once, and judges every claim as `ddm verify` does (`ddm.verify.verdict`): per
claim a payload of its verdict in each mode and the per-image distances. It writes its commitments
(WORK/verifier_i.commit.json), waits until the coordinator opens the reveal phase (WORK/reveal.open, written once
every verifier has committed), then writes its payloads and nonces (WORK/verifier_i.json).

A copying verifier (`copy_of`) does no work: mode "reveal" commits to a guess (every claim honest, all distances
0) and later publishes verifier `copy_of`'s reveal as its own; mode "commitment" republishes that verifier's
commitments and then its reveal. `ddm.verify.commit.check_reveals` catches both.

`run_verifiers` starts N of them, runs the two phases, and returns their reveals and the reveal check.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from ddm.core.errors import DDMError
from ddm.data.run import Run
from ddm.sampling.load import load_ensemble
from ddm.sampling.request import Request, generate
from ddm.verify.commit import check_reveals, commit
from ddm.verify.environment import environment
from ddm.verify.records import claimed_values, validate_record
from ddm.verify.thresholds import Thresholds
from ddm.verify.verdict import check_record_fits_run, decide, image_checks, record_problems

JUDGED_MODES = ("exact", "tolerance", "phash")
COPY_MODES = ("reveal", "commitment")
# The claims' condition embeddings by digest (an .npz beside claims.json), on runs conditioned on embeddings.
CONDITIONS_FILE = "conditions.npz"
REVEAL_SIGNAL = "reveal.open"

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class VerifierSpec:
    """How one verifier process is set up.

    xla_flags: appended to the inherited XLA_FLAGS (a --xla_force_host_platform_device_count here replaces
        the inherited one). cpus: CPU affinity, i.e. how many cores XLA's thread pools see (None: inherited).
    batch_size: samples integrated together, an int or "half" (n // 2); None: the whole request.
    param_mantissa: emulates hardware that computes in lower precision: every float parameter (experts and
        router) is rounded to this many mantissa bits before sampling (10 = TF32, the default of float32
        matmuls on recent NVIDIA GPUs; 7 = bfloat16). Only the weights are rounded, not the activations, so
        this under-states such hardware's drift. None: exact.
    copy_of, copy_mode: a copying verifier (the module docstring) that copies verifier `copy_of`; None: an
        honest one.
    """

    xla_flags: str = ""
    cpus: int | None = None
    batch_size: int | str | None = None
    param_mantissa: int | None = None
    copy_of: int | None = None
    copy_mode: str = "reveal"

    def __post_init__(self) -> None:
        if self.cpus is not None and (not isinstance(self.cpus, int) or self.cpus < 1):
            raise DDMError(f"verifier cpus={self.cpus!r} must be a positive integer")
        b = self.batch_size
        if b is not None and b != "half" and (not isinstance(b, int) or b < 1):
            raise DDMError(f"verifier batch_size={b!r} must be a positive integer or 'half'")
        m = self.param_mantissa
        if m is not None and (not isinstance(m, int) or not 1 <= m <= 22):
            raise DDMError(f"verifier param_mantissa={m!r} must be an integer in [1, 22]")
        if self.copy_of is not None and (not isinstance(self.copy_of, int) or self.copy_of < 0):
            raise DDMError(f"verifier copy_of={self.copy_of!r} must be a verifier index >= 0")
        if self.copy_mode not in COPY_MODES:
            raise DDMError(f"verifier copy_mode={self.copy_mode!r} must be one of {', '.join(COPY_MODES)}")

    @classmethod
    def parse(cls, text: str) -> VerifierSpec:
        """`key=value` pairs separated by ';' with keys xla_flags, cpus, batch_size, param_mantissa, copy_of,
        copy_mode; "" or "plain" is a verifier set up like the claimant.
        Example: "xla_flags=--xla_cpu_enable_fast_math=true;cpus=1"."""
        fields: dict[str, Any] = {}
        text = text.strip()
        if text in ("", "plain"):
            return cls()
        for part in filter(None, (p.strip() for p in text.split(";"))):
            key, sep, value = part.partition("=")
            key = key.strip()
            if not sep or key not in ("xla_flags", "cpus", "batch_size", "param_mantissa", "copy_of", "copy_mode"):
                raise DDMError(f"verifier spec {text!r}: expected xla_flags=..., cpus=N, batch_size=N|half, "
                               f"param_mantissa=N, copy_of=N or copy_mode=reveal|commitment separated by ';', "
                               f"got {part!r}")
            value = value.strip()
            if key in ("cpus", "param_mantissa", "copy_of") or (key == "batch_size" and value != "half"):
                try:
                    fields[key] = int(value)
                except ValueError:
                    raise DDMError(f"verifier spec {text!r}: {key} must be an integer, got {value!r}") from None
            else:
                fields[key] = value
        return cls(**fields)

    def describe(self) -> str:
        if self.copy_of is not None:
            return f"copier of verifier {self.copy_of} (copies its {self.copy_mode})"
        parts = [f"XLA_FLAGS+={self.xla_flags}"] if self.xla_flags else []
        if self.cpus is not None:
            parts.append(f"cpus={self.cpus}")
        if self.batch_size is not None:
            parts.append(f"batch={self.batch_size}")
        if self.param_mantissa is not None:
            parts.append(f"params rounded to {self.param_mantissa} mantissa bits")
        return ", ".join(parts) or "plain (claimant's settings)"

    def env(self, base: dict[str, str]) -> dict[str, str]:
        env = dict(base)
        if self.xla_flags:
            extra = self.xla_flags.split()
            replaced = {f.split("=")[0] for f in extra if f.startswith("--xla_force_host_platform_device_count")}
            kept = [f for f in env.get("XLA_FLAGS", "").split() if f.split("=")[0] not in replaced]
            env["XLA_FLAGS"] = " ".join(kept + extra)
        return env


    def resolved_batch(self, n: int) -> int | None:
        if self.batch_size == "half":
            return max(1, n // 2)
        return self.batch_size


DEFAULT_VERIFIERS = (
    VerifierSpec(),  # the claimant's settings, in another process
    # every CPU axis at once: device count, batch size (bucket shapes), thread count, fast-math codegen
    VerifierSpec(xla_flags="--xla_force_host_platform_device_count=2 --xla_cpu_multi_thread_eigen=false "
                           "--xla_cpu_enable_fast_math=true", cpus=1, batch_size="half"),
    VerifierSpec(param_mantissa=10),  # emulated TF32 weights: the drift of another kind of hardware
)


def round_mantissa(params, bits: int):
    """Every float32 leaf rounded (to nearest, ties to even) to `bits` mantissa bits; other leaves as they are."""
    drop = 23 - bits

    def rnd(leaf):
        arr = np.asarray(leaf)
        if arr.dtype != np.float32 or drop <= 0:
            return leaf
        u = arr.view(np.uint32).astype(np.uint64)
        u = (u + (1 << (drop - 1)) - 1 + ((u >> drop) & 1)) >> drop << drop
        new = u.astype(np.uint32).view(np.float32)
        return jax.device_put(new, leaf.sharding) if hasattr(leaf, "sharding") else new

    return jax.tree.map(rnd, params)


def _finite(values) -> list[float | None]:
    """Floats for JSON (and canonical JSON): inf (a non-finite regeneration) becomes None."""
    return [float(v) if np.isfinite(v) else None for v in values]


def judge_claim(record: dict, regenerated: np.ndarray, thresholds: Thresholds | None) -> dict:
    """One claim as a verifier reports it: {"consistent", "auto_mode", "verdicts": {exact, tolerance, phash,
    auto}, "distances": {identical, phash, dhash, max_abs, rms} (lists over images)}. The verdicts are
    `ddm verify`'s at `thresholds` (None before the run's first calibration: tolerance, phash and auto
    verdicts None); the distances let `ddm.verify.analysis` recompute them at any threshold."""
    problems = record_problems(record)
    checks = image_checks(claimed_values(record), regenerated)
    # auto as `ddm verify` runs it for a verifier that holds the calibration this evaluation makes: bit for bit
    # passes, anything else is judged within the thresholds (the record's environment has no say)
    auto_mode = "tolerance"
    verdicts = {m: None if thresholds is None and m != "exact" else decide(checks, problems, m, thresholds)[0]
                for m in JUDGED_MODES}
    verdicts["auto"] = verdicts[auto_mode]
    return {"consistent": not problems, "auto_mode": auto_mode, "verdicts": verdicts,
            "distances": {"identical": [c.identical for c in checks], "phash": [c.phash for c in checks],
                          "dhash": [c.dhash for c in checks], "max_abs": _finite(c.max_abs for c in checks),
                          "rms": _finite(c.rms for c in checks)}}


def _read_claims(claims_path: str | Path) -> tuple[list[dict], Thresholds | None]:
    try:
        payload = json.loads(Path(claims_path).read_text())
        thresholds = payload.get("thresholds")
        return payload["claims"], None if thresholds is None else Thresholds(**thresholds)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DDMError(f"cannot read claims {claims_path}: {err}") from None


def _read_conditions(claims_path: str | Path) -> dict[str, np.ndarray]:
    """The condition rows the claims name, by digest (CONDITIONS_FILE beside the claims; {} without it). Each is
    checked against the digest of the record that uses it when it is used (`generate`)."""
    path = Path(claims_path).parent / CONDITIONS_FILE
    if not path.exists():
        return {}
    try:
        with np.load(path, allow_pickle=False) as stored:
            return {digest: stored[digest] for digest in stored.files}
    except (OSError, ValueError) as err:
        raise DDMError(f"cannot read the claims' condition embeddings {path}: {err}") from None


def _write_json(path: Path, body: dict) -> None:
    """Atomically (temp file + rename): a reader polling for `path` never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(body) + "\n")
    tmp.replace(path)


def _wait_for(path: Path, timeout: float) -> dict | None:
    """Polls until `path` exists; its JSON (None for the reveal signal). DDMError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not path.is_file():
        if time.monotonic() > deadline:
            raise DDMError(f"gave up after {timeout:.0f}s waiting for {path}")
        time.sleep(0.05)
    return json.loads(path.read_text()) if path.suffix == ".json" else None


def commit_path(work: Path, index: int) -> Path:
    return work / f"verifier_{index}.commit.json"


def reveal_path(work: Path, index: int) -> Path:
    return work / f"verifier_{index}.json"


def verifier_worker(run_dir: str, claims_path: str | Path, work: str | Path, index: int, *,
                    batch_size: int | None = None, param_mantissa: int | None = None, overrides=(),
                    reveal_timeout: float = 3600.0) -> dict:
    """One honest verifier: load the run, regenerate each distinct claimed request once, judge every claim,
    commit, wait for the reveal phase, reveal.

    Reveal JSON (WORK/verifier_i.json): {"verifier": {index, pid, backend, devices, cpus, xla_flags, batch_size,
    param_mantissa, jax, environment, regenerations, seconds}, "results": [payload per claim: {"claim",
    "verifier", ... `judge_claim`}], "nonces": {claim id: nonce}}.
    """
    t0 = time.perf_counter()
    work = Path(work)
    claims, thresholds = _read_claims(claims_path)
    conditions = _read_conditions(claims_path)
    run = Run.open(run_dir, overrides)
    ensemble = load_ensemble(run)
    if param_mantissa is not None:
        ensemble = ensemble.replace(
            expert_params=[None if p is None else round_mantissa(p, param_mantissa) for p in ensemble.expert_params],
            router_params=round_mantissa(ensemble.router_params, param_mantissa))
    # what this verifier changes that `ddm verify` would not: rounded weights, or a split batch (other bits)
    emulated = [f"{k}={v}" for k, v in (("param_mantissa", param_mantissa), ("batch_size", batch_size)) if v]
    env = environment("; ".join(emulated) or None)
    cache: dict[str, np.ndarray] = {}
    results = []
    for claim in claims:
        record = validate_record(claim.get("record"), f"claim {claim.get('id')}")
        check_record_fits_run(record, run)
        key = json.dumps(record["request"], sort_keys=True)
        if key not in cache:
            cache[key] = generate(ensemble, Request.from_json(record["request"]), batch_size=batch_size,
                                  conditions=conditions.get(record["request"].get("conditions_sha256"))).x
        results.append({"claim": claim["id"], "verifier": index, **judge_claim(record, cache[key], thresholds)})
    info = {"index": index, "pid": os.getpid(), "backend": jax.default_backend(), "devices": jax.device_count(),
            "cpus": len(os.sched_getaffinity(0)), "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "batch_size": batch_size, "param_mantissa": param_mantissa, "jax": jax.__version__, "environment": env,
            "regenerations": len(cache), "seconds": round(time.perf_counter() - t0, 2)}
    return _commit_then_reveal(work, index, info, results, reveal_timeout)


def _commit_then_reveal(work: Path, index: int, info: dict, results: list[dict], timeout: float) -> dict:
    commitments, nonces = commit({str(r["claim"]): r for r in results})
    _write_json(commit_path(work, index), {"verifier": index, "commitments": commitments})
    _wait_for(work / REVEAL_SIGNAL, timeout)
    out = {"verifier": info, "results": results, "nonces": nonces}
    _write_json(reveal_path(work, index), out)
    return out


def copying_worker(claims_path: str | Path, work: str | Path, index: int, copy_of: int, mode: str, *,
                   reveal_timeout: float = 3600.0) -> dict:
    """A verifier that regenerates nothing and copies verifier `copy_of` (module docstring)."""
    work = Path(work)
    claims, thresholds = _read_claims(claims_path)
    info = {"index": index, "pid": os.getpid(), "copy_of": copy_of, "copy_mode": mode, "regenerations": 0}
    if mode == "reveal":
        n = {c["id"]: len(c["record"]["images"]) for c in claims}
        # what an honest verifier reports for an honest claim (`judge_claim`)
        verdicts = {m: True if thresholds is not None or m == "exact" else None for m in JUDGED_MODES}
        guess = [{"claim": c["id"], "verifier": index, "consistent": True, "auto_mode": "tolerance",
                  "verdicts": {**verdicts, "auto": verdicts["tolerance"]},
                  "distances": {"identical": [True] * n[c["id"]], "phash": [0] * n[c["id"]],
                                "dhash": [0] * n[c["id"]], "max_abs": [0.0] * n[c["id"]],
                                "rms": [0.0] * n[c["id"]]}} for c in claims]
        commitments, nonces = commit({str(r["claim"]): r for r in guess})
        _write_json(commit_path(work, index), {"verifier": index, "commitments": commitments})
        _wait_for(work / REVEAL_SIGNAL, reveal_timeout)
        source = _wait_for(reveal_path(work, copy_of), reveal_timeout)
        results = [{**r, "verifier": index} for r in source["results"]]  # claims the copied work as its own
    else:
        source_commit = _wait_for(commit_path(work, copy_of), reveal_timeout)
        _write_json(commit_path(work, index), {"verifier": index, "commitments": source_commit["commitments"]})
        _wait_for(work / REVEAL_SIGNAL, reveal_timeout)
        source = _wait_for(reveal_path(work, copy_of), reveal_timeout)
        results, nonces = source["results"], source["nonces"]
    out = {"verifier": info, "results": results, "nonces": nonces}
    _write_json(reveal_path(work, index), out)
    return out


def _worker_command(i: int, spec: VerifierSpec, run_dir: str, claims_path: Path, work: Path, n_images: int,
                    overrides) -> list[str]:
    cmd = [sys.executable, "-m", "ddm.verify.worker", "--run-dir", str(run_dir), "--claims", str(claims_path),
           "--work", str(work), "--index", str(i)]
    if spec.copy_of is not None:
        return cmd + ["--copy-of", str(spec.copy_of), "--copy-mode", spec.copy_mode]
    batch = spec.resolved_batch(n_images)
    if batch is not None:
        cmd += ["--batch-size", str(batch)]
    if spec.cpus is not None:
        cmd += ["--cpus", str(spec.cpus)]
    if spec.param_mantissa is not None:
        cmd += ["--param-mantissa", str(spec.param_mantissa)]
    for o in overrides:
        cmd += ["--set", o]
    return cmd


def _kill_all(procs: dict[int, subprocess.Popen]) -> None:
    """Stops the verifier processes still running (after a failure); each by its own handle."""
    for p in procs.values():
        if p.poll() is None:
            p.kill()
            p.wait()


def run_verifiers(run_dir: str, claims_path: Path, specs: tuple[VerifierSpec, ...], n_images: int, work: Path,
                  *, overrides=(), parallel: int | None = None) -> tuple[list[dict], list[dict]]:
    """Starts one `python -m ddm.verify.worker` process per spec and runs the commit and reveal phases.

    Returns (reveals in spec order, `check_reveals` per verifier). parallel: verifiers regenerating at a time
    (one that has committed only waits, so it no longer counts). DDMError if a verifier fails.
    """
    for spec in specs:
        if spec.copy_of is not None and not (spec.copy_of < len(specs) and specs[spec.copy_of].copy_of is None):
            raise DDMError(f"verifier {spec.describe()}: verifier {spec.copy_of} is not an honest verifier here")
    for stale in [*work.glob("verifier_*.json"), *work.glob("verifier_*.json.tmp"), work / REVEAL_SIGNAL]:
        stale.unlink(missing_ok=True)
    limit = parallel or len(specs)
    procs: dict[int, subprocess.Popen] = {}
    opened = False
    with contextlib.ExitStack() as stack:
        stack.callback(_kill_all, procs)
        while True:
            committed = {i for i in procs if commit_path(work, i).is_file()}
            working = [i for i, p in procs.items() if i not in committed and p.poll() is None]
            for i, spec in enumerate(specs):  # start the next ones while fewer than `limit` are working
                if i in procs or len(working) >= limit:
                    continue
                log = stack.enter_context(open(work / f"verifier_{i}.log", "w"))
                procs[i] = subprocess.Popen(_worker_command(i, spec, run_dir, claims_path, work, n_images, overrides),
                                            env=spec.env(dict(os.environ)), stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL)
                working.append(i)
            for i, p in procs.items():
                if p.poll() not in (None, 0) or (p.poll() == 0 and not reveal_path(work, i).is_file()):
                    log_path = work / f"verifier_{i}.log"
                    lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
                    raise DDMError(f"verifier {i} ({specs[i].describe()}) failed with exit {p.poll()}: "
                                   f"{lines[-1] if lines else 'no output'} (log: {log_path})")
            if not opened and len(procs) == len(specs) and len(committed) == len(specs):
                (work / REVEAL_SIGNAL).write_text(f"{time.time()}\n")  # every verifier has committed
                opened = True
                logger.info(f"all {len(specs)} verifiers committed; reveal phase open")
            if opened and all(p.poll() == 0 for p in procs.values()):
                break
            time.sleep(0.1)
    reveals = []
    for i, spec in enumerate(specs):
        reveal = json.loads(reveal_path(work, i).read_text())
        reveal["verifier"]["spec"] = spec.describe()
        reveals.append(reveal)
    commitments = [json.loads(commit_path(work, i).read_text())["commitments"] for i in range(len(specs))]
    checks = check_reveals(commitments, [{str(r["claim"]): r for r in rv["results"]} for rv in reveals],
                           [rv["nonces"] for rv in reveals])
    for i, check in enumerate(checks):
        if not check["ok"]:
            logger.info(f"verifier {i} ({specs[i].describe()}) rejected by commit-reveal: {check['problems']}; "
                        f"{check['first']}")
    return reveals, checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ddm.verify.worker",
                                     description="one verifier process: regenerate claims, commit, reveal")
    w = parser
    w.add_argument("--run-dir", required=True)
    w.add_argument("--claims", required=True, help="JSON {'claims': [{'id', 'kind', 'record'}, ...], 'thresholds'}")
    w.add_argument("--work", required=True, help="the folder of the commit and reveal files")
    w.add_argument("--index", type=int, required=True, help="this verifier's index")
    w.add_argument("--batch-size", type=int, default=None)
    w.add_argument("--param-mantissa", type=int, default=None, help="round parameters to N mantissa bits")
    w.add_argument("--cpus", type=int, default=None, help="run on the first N of the allowed CPUs")
    w.add_argument("--copy-of", type=int, default=None, help="a copying verifier: copy this verifier")
    w.add_argument("--copy-mode", choices=COPY_MODES, default="reveal")
    w.add_argument("--reveal-timeout", type=float, default=3600.0, help="seconds to wait for the reveal phase")
    w.add_argument("--set", action="append", default=[])
    args = parser.parse_args(argv)
    if args.cpus is not None:  # before jax starts its backend, so that XLA's thread pools are sized for them
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.cpus])
    try:
        if args.copy_of is not None:
            copying_worker(args.claims, args.work, args.index, args.copy_of, args.copy_mode,
                           reveal_timeout=args.reveal_timeout)
        else:
            verifier_worker(args.run_dir, args.claims, args.work, args.index, batch_size=args.batch_size,
                            param_mantissa=args.param_mantissa, overrides=args.set,
                            reveal_timeout=args.reveal_timeout)
    except DDMError as err:
        print(f"ddm consensus worker: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
