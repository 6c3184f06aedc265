"""Verifier processes: each regenerates every claimed request once, in an environment of its own.

A verifier is a separate OS process (`python -m ddm.verify.worker`) with its own setup (`VerifierSpec`: XLA
flags, CPU affinity, batch size, parameter rounding). It loads the run (checkpoints SHA-256 pinned),
regenerates each distinct request once, and writes per claim the per-image pHash / dHash Hamming distances and
whether the regenerated batch is bitwise identical. `run_verifiers` starts N of them and collects their output.
"""

from __future__ import annotations

import argparse
import concurrent.futures
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
from ddm.core.hashing import images_sha256
from ddm.data.run import Run
from ddm.sampling.load import load_ensemble
from ddm.sampling.request import Request, generate
from ddm.verify.phash import perceptual_hashes
from ddm.verify.records import validate_record
from ddm.verify.verdict import check_record_fits_run, hash_distances

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
    """

    xla_flags: str = ""
    cpus: int | None = None
    batch_size: int | str | None = None
    param_mantissa: int | None = None

    def __post_init__(self) -> None:
        if self.cpus is not None and (not isinstance(self.cpus, int) or self.cpus < 1):
            raise DDMError(f"verifier cpus={self.cpus!r} must be a positive integer")
        b = self.batch_size
        if b is not None and b != "half" and (not isinstance(b, int) or b < 1):
            raise DDMError(f"verifier batch_size={b!r} must be a positive integer or 'half'")
        m = self.param_mantissa
        if m is not None and (not isinstance(m, int) or not 1 <= m <= 22):
            raise DDMError(f"verifier param_mantissa={m!r} must be an integer in [1, 22]")

    @classmethod
    def parse(cls, text: str) -> VerifierSpec:
        """`key=value` pairs separated by ';' with keys xla_flags, cpus, batch_size, param_mantissa; "" or
        "plain" is a verifier set up like the claimant. Example: "xla_flags=--xla_cpu_enable_fast_math=true;cpus=1"."""
        fields: dict[str, Any] = {}
        text = text.strip()
        if text in ("", "plain"):
            return cls()
        for part in filter(None, (p.strip() for p in text.split(";"))):
            key, sep, value = part.partition("=")
            key = key.strip()
            if not sep or key not in ("xla_flags", "cpus", "batch_size", "param_mantissa"):
                raise DDMError(f"verifier spec {text!r}: expected xla_flags=..., cpus=N, batch_size=N|half or "
                               f"param_mantissa=N separated by ';', got {part!r}")
            value = value.strip()
            if key in ("cpus", "param_mantissa") or (key == "batch_size" and value != "half"):
                try:
                    fields[key] = int(value)
                except ValueError:
                    raise DDMError(f"verifier spec {text!r}: {key} must be an integer, got {value!r}") from None
            else:
                fields[key] = value
        return cls(**fields)

    def describe(self) -> str:
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

    def restrict_cpus(self) -> None:
        """Limits the calling process to its first `cpus` allowed CPUs (run in the verifier's child process
        before it starts, so XLA's thread pools are sized for them); no-op when cpus is None."""
        if self.cpus is not None:
            os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: self.cpus])

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


def verifier_worker(run_dir: str, claims_path: str | Path, out_path: str | Path, *, batch_size: int | None = None,
                    param_mantissa: int | None = None, overrides=()) -> dict:
    """One verifier: load the run, regenerate each distinct claimed request once, write per-claim distances.

    Output JSON: {"verifier": {pid, backend, devices, cpus, xla_flags, batch_size, jax, seconds,
    regenerations}, "results": [{"id", "phash": [int per image], "dhash": [...], "exact": bool}]}.
    """
    t0 = time.perf_counter()
    try:
        payload = json.loads(Path(claims_path).read_text())
        claims = payload["claims"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DDMError(f"cannot read claims {claims_path}: {err}") from None
    run = Run.open(run_dir, overrides)
    ensemble = load_ensemble(run)
    if param_mantissa is not None:
        ensemble = ensemble.replace(
            expert_params=[None if p is None else round_mantissa(p, param_mantissa) for p in ensemble.expert_params],
            router_params=round_mantissa(ensemble.router_params, param_mantissa))
    cache: dict[str, tuple[str, list[dict[str, str]]]] = {}
    results = []
    for claim in claims:
        record = validate_record(claim.get("record"), f"claim {claim.get('id')}")
        check_record_fits_run(record, run)
        key = json.dumps(record["request"], sort_keys=True)
        if key not in cache:
            images = generate(ensemble, Request.from_json(record["request"]), batch_size=batch_size).images
            cache[key] = (images_sha256(images), perceptual_hashes(images))
        sha, hashes = cache[key]
        dp, dd = hash_distances(record, hashes)
        results.append({"id": claim["id"], "phash": dp, "dhash": dd, "exact": sha == record["sha256"]})
    info = {"pid": os.getpid(), "backend": jax.default_backend(), "devices": jax.device_count(),
            "cpus": len(os.sched_getaffinity(0)), "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "batch_size": batch_size, "param_mantissa": param_mantissa, "jax": jax.__version__,
            "regenerations": len(cache),
            "seconds": round(time.perf_counter() - t0, 2)}
    out = {"verifier": info, "results": results}
    Path(out_path).write_text(json.dumps(out) + "\n")
    return out


def run_verifiers(run_dir: str, claims_path: Path, specs: tuple[VerifierSpec, ...], n_images: int, work: Path,
                  *, overrides=(), parallel: int | None = None) -> list[dict]:
    """Starts one `python -m ddm.verify.worker` process per spec; returns their outputs, in spec order."""

    def one(i: int, spec: VerifierSpec) -> dict:
        out, log_path = work / f"verifier_{i}.json", work / f"verifier_{i}.log"
        out.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "ddm.verify.worker", "--run-dir", str(run_dir),
               "--claims", str(claims_path), "--out", str(out)]
        batch = spec.resolved_batch(n_images)
        if batch is not None:
            cmd += ["--batch-size", str(batch)]
        if spec.param_mantissa is not None:
            cmd += ["--param-mantissa", str(spec.param_mantissa)]
        for o in overrides:
            cmd += ["--set", o]
        t0 = time.perf_counter()
        with open(log_path, "w") as fh:
            code = subprocess.run(cmd, check=False, env=spec.env(dict(os.environ)), stdout=fh, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, preexec_fn=spec.restrict_cpus).returncode
        if code != 0 or not out.is_file():
            lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
            raise DDMError(f"verifier {i} ({spec.describe()}) failed with exit {code}: "
                           f"{lines[-1] if lines else 'no output'} (log: {log_path})")
        logger.info(f"verifier {i} ({spec.describe()}) done in {time.perf_counter() - t0:.1f}s")
        result = json.loads(out.read_text())
        result["verifier"]["spec"] = spec.describe()
        return result

    workers = parallel or len(specs)
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(one, i, spec) for i, spec in enumerate(specs)]
        return [f.result() for f in futures]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ddm.verify.worker",
                                     description="one verifier process: regenerate claims, write their distances")
    w = parser
    w.add_argument("--run-dir", required=True)
    w.add_argument("--claims", required=True, help="JSON {'claims': [{'id', 'kind', 'record'}, ...]}")
    w.add_argument("--out", required=True, help="where to write the distances (JSON)")
    w.add_argument("--batch-size", type=int, default=None)
    w.add_argument("--param-mantissa", type=int, default=None, help="round parameters to N mantissa bits")
    w.add_argument("--set", action="append", default=[])
    args = parser.parse_args(argv)
    try:
        verifier_worker(args.run_dir, args.claims, args.out, batch_size=args.batch_size,
                        param_mantissa=args.param_mantissa, overrides=args.set)
    except DDMError as err:
        print(f"ddm consensus worker: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())


if __name__ == "__main__":
    sys.exit(main())
