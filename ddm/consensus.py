"""`ddm consensus-eval`: independent verifier processes, a majority vote, and the measured distance
distributions that the verification threshold is chosen from (GUIDE section 4, docs/verification.md).

Roles:
- The *claimant* (the calling process) builds claims. For request i (seed `seed + i`, the chosen strategy,
  steps and solver) and S_i = the same request with strategy `single:k` (k = i mod K over present experts):

  | kind                  | claims to be the output of | but its images are                                      |
  |-----------------------|----------------------------|---------------------------------------------------------|
  | honest                | R_i                        | R_i's output                                            |
  | honest_single         | S_i                        | S_i's output                                            |
  | same_cluster          | S_i                        | S_i with another seed: same expert, other noise         |
  | seed                  | R_i                        | R_i with another seed                                   |
  | strategy              | R_i                        | R_i with another routing strategy                       |
  | steps                 | R_i                        | R_i with half the solver steps                          |
  | perturbed_expert:S    | R_i                        | R_i after adding N(0, (S * rms of the leaf)^2) noise to |
  |                       |                            | every parameter of the expert R_i used most             |
  | swapped_experts       | R_i                        | R_i with the two most used experts' parameters swapped  |
  | pixel_noise           | R_i                        | R_i's output + N(0, sigma^2) pixel noise, rounded       |

  `same_cluster` pairs and the nearest neighbours among all generated images that come from different noise
  are the intra-class collision measurements: a threshold that accepts them lets a different image pass.
- Each *verifier* is a separate OS process (`python -m ddm.consensus worker`), with its own environment (XLA
  flags, CPU affinity, batch size; `VerifierSpec`). It loads the run (checkpoints SHA-256 pinned), regenerates
  every distinct request once, and writes per claim the per-image pHash / dHash Hamming distances and whether
  the regenerated batch is bitwise identical.
- The analysis pools distances into distributions, picks the threshold (`pick_threshold`), and scores every
  threshold with one verifier (mean over verifiers), the majority of N (a claim fails when more than half of
  the verifiers reject it), and the majority with one Byzantine verifier that votes the wrong way on every
  claim (worst case over which verifier it is). A verifier rejects a claim when any image's pHash distance
  exceeds the threshold (as `ddm verify` does).

Outputs (in RUN/eval or --out): consensus_report.json, consensus_hist.png, and consensus_work/ (the claims,
each verifier's results and log).

This module imports no jax at import time, so that a worker can set its CPU affinity before XLA starts.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ddm.errors import DDMError

HONEST_KINDS = ("honest", "honest_single")
INTRA_KIND = "same_cluster"
OTHER_SEED_OFFSET = 1_000_000  # the seed of "another seed" claims: seed + this (never a request's own seed)
ALT_STRATEGIES = ("full", "top2", "sample", "top1")  # the "strategy" tamper cycles over those that differ
HASH_BITS = 64


# ----------------------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------------------


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


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """What `consensus_eval` measures. Defaults are sized for a CPU (a few minutes on 2 cores)."""

    requests: int = 8
    images: int = 8
    steps: int = 8
    solver: str = "euler"
    strategy: str = "top1"
    seed: int = 0
    verifiers: tuple[VerifierSpec, ...] = DEFAULT_VERIFIERS
    perturb_scales: tuple[float, ...] = (0.01, 0.1)  # expert noise, relative to each leaf's RMS
    pixel_noise: float = 8.0  # std of the added pixel noise, in uint8 levels
    parallel: int | None = None  # verifier processes at a time (default: all)

    def __post_init__(self) -> None:
        from ddm.routing import parse_strategy
        from ddm.sampling import Request

        for name in ("requests", "images"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise DDMError(f"consensus-eval {name}={value!r} must be a positive integer")
        if not isinstance(self.steps, int) or self.steps < 2:
            raise DDMError(f"consensus-eval steps={self.steps!r} must be >= 2 (the 'steps' tamper halves it)")
        if not self.verifiers:
            raise DDMError("consensus-eval needs at least one verifier")
        if any(not (s > 0) for s in self.perturb_scales):
            raise DDMError(f"perturb scales must be positive, got {self.perturb_scales}")
        if not self.pixel_noise > 0:
            raise DDMError(f"pixel noise must be positive, got {self.pixel_noise}")
        if self.parallel is not None and self.parallel < 1:
            raise DDMError(f"parallel={self.parallel} must be >= 1")
        if parse_strategy(self.strategy).kind in ("oracle", "single"):
            raise DDMError(f"consensus-eval strategy must be routed (top1, full, ...), not {self.strategy}")
        Request(seed=self.seed, n=self.images, strategy=self.strategy, steps=self.steps, solver=self.solver)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["verifiers"] = [v.describe() for v in self.verifiers]
        return d


# ----------------------------------------------------------------------------------------------------------
# Claimant: honest and tampered claims
# ----------------------------------------------------------------------------------------------------------


def _with_params(ensemble, expert_params):
    """The same ensemble (router, architecture, compiled functions) with other expert parameters."""
    from ddm.ensemble import Ensemble

    return Ensemble(ensemble.expert_apply, expert_params, ensemble.router_apply, ensemble.router_params,
                    image_shape=ensemble.image_shape, num_classes=ensemble.num_classes,
                    available=ensemble.available, min_bucket=ensemble.min_bucket)


def perturb_params(params, scale: float, rng: np.random.Generator):
    """Every floating leaf x of a param tree -> x + scale * rms(x) * N(0, 1) (same dtype and placement)."""
    import jax

    def noise(leaf):
        arr = np.asarray(leaf)
        if not np.issubdtype(arr.dtype, np.floating):
            return leaf
        rms = float(np.sqrt(np.mean(np.square(arr, dtype=np.float64)))) or 1.0
        new = (arr + scale * rms * rng.standard_normal(arr.shape)).astype(arr.dtype)
        return jax.device_put(new, leaf.sharding) if hasattr(leaf, "sharding") else new

    return jax.tree.map(noise, params)


def _alt_strategy(strategy: str, i: int) -> str:
    from ddm.routing import parse_strategy

    options = [s for s in ALT_STRATEGIES if parse_strategy(s) != parse_strategy(strategy)]
    return options[i % len(options)]


def build_claims(ensemble, manifest_sha: str, settings: EvalSettings,
                 log: Callable[[str], None] = print) -> tuple[list[dict], list[dict]]:
    """(claims, gallery). A claim is {"id", "kind", "meta", "record"} (record: `ddm.verify.make_record`).
    gallery: every generated image that is a faithful output of some request, as {"noise": [seed, index],
    "cluster": k or None, "phash": hex}, for the nearest-neighbour collision measurement."""
    from ddm.hashing import perceptual_hashes
    from ddm.sampling import Request, generate
    from ddm.verify import make_record

    present = [k for k in range(ensemble.num_experts) if ensemble.available[k]]
    rng = np.random.default_rng(settings.seed)
    claims: list[dict] = []
    gallery: list[dict] = []

    def add(kind: str, request: Request, images: np.ndarray, **meta) -> None:
        claims.append({"id": len(claims), "kind": kind, "meta": meta,
                       "record": make_record(manifest_sha, request, images)})

    def remember(images: np.ndarray, seed: int, cluster: int | None) -> None:
        for j, h in enumerate(perceptual_hashes(images)):
            gallery.append({"noise": [seed, j], "cluster": cluster, "phash": h["phash"]})

    t0 = time.perf_counter()
    for i in range(settings.requests):
        seed = settings.seed + i
        other_seed = seed + OTHER_SEED_OFFSET
        req = Request(seed=seed, n=settings.images, strategy=settings.strategy, steps=settings.steps,
                      solver=settings.solver)
        honest = generate(ensemble, req)
        add("honest", req, honest.images)
        remember(honest.images, seed, None)

        moved = generate(ensemble, dataclasses.replace(req, seed=other_seed)).images
        add("seed", req, moved, seed=other_seed)
        remember(moved, other_seed, None)
        alt = _alt_strategy(req.strategy, i)
        add("strategy", req, generate(ensemble, dataclasses.replace(req, strategy=alt)).images, strategy=alt)
        fewer = req.steps // 2
        add("steps", req, generate(ensemble, dataclasses.replace(req, steps=fewer)).images, steps=fewer)

        usage = np.asarray(honest.weights, np.float64).sum(axis=(0, 1))  # [K] routing weight per expert
        order = [int(k) for k in np.argsort(-usage, kind="stable") if ensemble.available[int(k)]]
        a = order[0]
        for scale in settings.perturb_scales:
            params = list(ensemble.expert_params)
            params[a] = perturb_params(params[a], scale, rng)
            add(f"perturbed_expert:{scale:g}", req, generate(_with_params(ensemble, params), req).images,
                expert=a, scale=scale)
        if len(order) >= 2:
            b = order[1]
            params = list(ensemble.expert_params)
            params[a], params[b] = params[b], params[a]
            add("swapped_experts", req, generate(_with_params(ensemble, params), req).images, experts=[a, b])
        noisy = honest.images.astype(np.float64) + rng.normal(0.0, settings.pixel_noise, honest.images.shape)
        add("pixel_noise", req, np.clip(np.round(noisy), 0, 255).astype(np.uint8), std=settings.pixel_noise)

        k = present[i % len(present)]
        single = Request(seed=seed, n=settings.images, strategy=f"single:{k}", steps=settings.steps,
                         solver=settings.solver)
        own = generate(ensemble, single).images
        add("honest_single", single, own, expert=k)
        remember(own, seed, k)
        other = generate(ensemble, dataclasses.replace(single, seed=other_seed)).images
        add(INTRA_KIND, single, other, expert=k, seed=other_seed)
        remember(other, other_seed, k)
        log(f"claimant: request {i + 1}/{settings.requests} done ({time.perf_counter() - t0:.1f}s)")
    return claims, gallery


# ----------------------------------------------------------------------------------------------------------
# Verifier processes
# ----------------------------------------------------------------------------------------------------------


def round_mantissa(params, bits: int):
    """Every float32 leaf rounded (to nearest, ties to even) to `bits` mantissa bits; other leaves as they are."""
    import jax

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
    import jax

    from ddm.hashing import images_sha256, perceptual_hashes
    from ddm.loading import load_run
    from ddm.sampling import Request, generate
    from ddm.verify import check_record_fits_run, hash_distances, validate_record

    t0 = time.perf_counter()
    try:
        payload = json.loads(Path(claims_path).read_text())
        claims = payload["claims"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DDMError(f"cannot read claims {claims_path}: {err}") from None
    ensemble, _, manifest = load_run(run_dir, overrides)
    if param_mantissa is not None:
        from ddm.ensemble import Ensemble

        ensemble = Ensemble(ensemble.expert_apply, [None if p is None else round_mantissa(p, param_mantissa)
                                                    for p in ensemble.expert_params],
                            ensemble.router_apply, round_mantissa(ensemble.router_params, param_mantissa),
                            image_shape=ensemble.image_shape, num_classes=ensemble.num_classes,
                            available=ensemble.available, min_bucket=ensemble.min_bucket)
    cache: dict[str, tuple[str, list[dict[str, str]]]] = {}
    results = []
    for claim in claims:
        record = validate_record(claim.get("record"), f"claim {claim.get('id')}")
        check_record_fits_run(record, manifest, run_dir)
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
                  *, overrides=(), parallel: int | None = None, log: Callable[[str], None] = print) -> list[dict]:
    """Starts one `python -m ddm.consensus worker` process per spec; returns their outputs, in spec order."""

    def one(i: int, spec: VerifierSpec) -> dict:
        out, log_path = work / f"verifier_{i}.json", work / f"verifier_{i}.log"
        out.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "ddm.consensus", "worker", "--run-dir", str(run_dir),
               "--claims", str(claims_path), "--out", str(out)]
        if spec.cpus is not None:
            cmd += ["--cpus", str(spec.cpus)]
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
                                  stdin=subprocess.DEVNULL).returncode
        if code != 0 or not out.is_file():
            lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
            raise DDMError(f"verifier {i} ({spec.describe()}) failed with exit {code}: "
                           f"{lines[-1] if lines else 'no output'} (log: {log_path})")
        log(f"verifier {i} ({spec.describe()}) done in {time.perf_counter() - t0:.1f}s")
        result = json.loads(out.read_text())
        result["verifier"]["spec"] = spec.describe()
        return result

    workers = parallel or len(specs)
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(one, i, spec) for i, spec in enumerate(specs)]
        return [f.result() for f in futures]


# ----------------------------------------------------------------------------------------------------------
# Analysis
# ----------------------------------------------------------------------------------------------------------


def _popcount(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.uint64)
    return np.unpackbits(x.view(np.uint8).reshape(*x.shape, 8), axis=-1).sum(-1).astype(np.int64)


def nearest_neighbours(gallery: list[dict]) -> dict[str, list[int]]:
    """For each gallery image, the smallest pHash distance to an image made from different noise:
    "same_cluster" among images of the same single:k expert, "any" among all images (top1 ones included)."""
    if len(gallery) < 2:
        return {"same_cluster": [], "any": []}
    hashes = np.array([int(g["phash"], 16) for g in gallery], np.uint64)
    noise = np.array([g["noise"] for g in gallery], np.int64)  # [N, 2]: (seed, index in the request)
    same_noise = (noise[:, None, 0] == noise[None, :, 0]) & (noise[:, None, 1] == noise[None, :, 1])
    clusters = np.array([-1 if g["cluster"] is None else g["cluster"] for g in gallery])
    dist = _popcount(hashes[:, None] ^ hashes[None, :])
    big = HASH_BITS + 1
    any_ = np.where(same_noise, big, dist).min(1)
    same = np.where(same_noise | (clusters[:, None] != clusters[None, :]) | (clusters[:, None] < 0), big, dist)
    same = same.min(1)[clusters >= 0]
    return {"same_cluster": [int(d) for d in same if d < big], "any": [int(d) for d in any_ if d < big]}


def _stats(values) -> dict:
    v = np.asarray(list(values), np.float64)
    if v.size == 0:
        return {"count": 0}
    return {"count": int(v.size), "min": int(v.min()), "p5": float(np.percentile(v, 5)),
            "median": float(np.median(v)), "mean": round(float(v.mean()), 3), "p95": float(np.percentile(v, 95)),
            "max": int(v.max())}


def _histogram(values) -> list[int]:
    return np.bincount(np.asarray(list(values), np.int64), minlength=HASH_BITS + 1).tolist()


def pick_threshold(honest: list[int], intra: list[int]) -> dict:
    """The threshold rule (docs/verification.md), from per-image pHash distances of honest regenerations and
    of intra-class collisions (different noise, same cluster, and nearest neighbours).

    - largest_zero_false_accept = min(intra) - 1: the largest threshold that accepts no measured collision;
    - if that is >= max(honest) the sets separate, and the recommended threshold is the midpoint
      max(honest) + (min(intra) - max(honest)) // 2, leaving equal margins for unseen honest hardware drift
      and unseen closer collisions;
    - otherwise (overlap) it is the threshold minimising honest false rejects + intra-class false accepts
      (per image).
    """
    h = np.asarray(honest if honest else [0], np.int64)
    c = np.asarray(intra, np.int64)
    honest_max = int(h.max())
    if c.size == 0:
        return {"rule": "no intra-class measurements: the largest honest distance", "honest_max": honest_max,
                "intra_min": None, "largest_zero_false_accept": None, "separable": True,
                "recommended": honest_max}
    intra_min = int(c.min())
    zero_fa = intra_min - 1
    if zero_fa >= honest_max:
        return {"rule": "midpoint between the largest honest and the smallest intra-class distance",
                "honest_max": honest_max, "intra_min": intra_min, "largest_zero_false_accept": zero_fa,
                "separable": True, "recommended": honest_max + (intra_min - honest_max) // 2}
    ts = np.arange(HASH_BITS + 1)
    cost = (h[None, :] > ts[:, None]).mean(1) + (c[None, :] <= ts[:, None]).mean(1)
    return {"rule": "overlap: minimum of honest false-reject + intra-class false-accept rate per image",
            "honest_max": honest_max, "intra_min": intra_min, "largest_zero_false_accept": max(zero_fa, -1),
            "separable": False, "recommended": int(np.argmin(cost))}


def vote_rates(max_dist: np.ndarray, threshold: int, *, honest: bool) -> dict[str, float]:
    """Rejection rates of claims at `threshold`.

    max_dist: [V, C] each verifier's largest per-image pHash distance for each claim (a verifier rejects when
    it exceeds the threshold). honest: whether these claims are honest (the Byzantine verifier then rejects
    them; otherwise it accepts them). Returns single (mean over verifiers), majority (more than half reject)
    and byzantine (majority with one verifier voting the wrong way; worst case over which one).
    """
    reject = np.asarray(max_dist) > threshold  # [V, C]
    n_verifiers = reject.shape[0]
    single = float(reject.mean())
    majority = float((reject.sum(0) * 2 > n_verifiers).mean())
    byz = []
    for b in range(n_verifiers):
        votes = reject.copy()
        votes[b] = honest  # honest claims: always reject; tampered: always accept
        byz.append(float((votes.sum(0) * 2 > n_verifiers).mean()))
    byzantine = max(byz) if honest else min(byz)
    return {"single": round(single, 4), "majority": round(majority, 4), "byzantine": round(byzantine, 4)}


def analyse(claims: list[dict], outputs: list[dict], gallery: list[dict]) -> dict:
    """Distributions, threshold pick and per-threshold rates from the claims and the verifiers' outputs."""
    kinds = list(dict.fromkeys(c["kind"] for c in claims))
    by_id = [{r["id"]: r for r in out["results"]} for out in outputs]
    per_image: dict[str, list[int]] = {k: [] for k in kinds}
    per_image_dhash: dict[str, list[int]] = {k: [] for k in kinds}
    max_dist: dict[str, np.ndarray] = {}
    image_dist: dict[str, np.ndarray] = {}  # [V, images of all claims of the kind]
    exact: dict[str, list[float]] = {}
    for kind in kinds:
        ids = [c["id"] for c in claims if c["kind"] == kind]
        rows = [[results[i] for i in ids] for results in by_id]  # [V][C]
        max_dist[kind] = np.array([[max(r["phash"]) for r in row] for row in rows])
        image_dist[kind] = np.array([[d for r in row for d in r["phash"]] for row in rows])
        for row in rows:
            for r in row:
                per_image[kind] += r["phash"]
                per_image_dhash[kind] += r["dhash"]
        exact[kind] = [round(float(np.mean([r["exact"] for r in row])), 4) for row in rows]
    nn = nearest_neighbours(gallery)
    honest_images = [d for k in HONEST_KINDS if k in per_image for d in per_image[k]]
    intra_images = per_image.get(INTRA_KIND, []) + nn["same_cluster"] + nn["any"]
    pick = pick_threshold(honest_images, intra_images)

    table = []
    for t in range(HASH_BITS + 1):
        row: dict[str, Any] = {"threshold": t}
        for kind in kinds:
            rates = vote_rates(max_dist[kind], t, honest=kind in HONEST_KINDS)
            row[kind] = rates
        # intra-class false accepts per image: one image claimed as another made from different noise
        img = image_dist.get(INTRA_KIND)
        fa = {} if img is None else vote_rates(img, t, honest=False)
        row["intra_false_accept_per_image"] = {
            **{m: round(1.0 - v, 4) for m, v in fa.items()},
            "nearest_neighbour": round(float(np.mean(np.asarray(nn["any"]) <= t)), 4) if nn["any"] else None,
        }
        tampered = [k for k in kinds if k not in HONEST_KINDS]
        if tampered:
            pooled = np.concatenate([max_dist[k] for k in tampered], axis=1)
            row["all_attacks"] = vote_rates(pooled, t, honest=False)
        table.append(row)

    return {
        "kinds": kinds,
        "claims_per_kind": {k: int(max_dist[k].shape[1]) for k in kinds},
        "phash_per_image": {k: _stats(v) for k, v in per_image.items()},
        "dhash_per_image": {k: _stats(v) for k, v in per_image_dhash.items()},
        "phash_per_claim_max": {k: _stats(max_dist[k].ravel()) for k in kinds},
        "nearest_neighbour": {k: _stats(v) for k, v in nn.items()},
        "histograms": {**{k: _histogram(v) for k, v in per_image.items()},
                       **{f"nearest_neighbour_{k}": _histogram(v) for k, v in nn.items()}},
        "bitwise_identical": exact,
        "threshold": pick,
        "per_threshold": table,
    }


# ----------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------


def plot_histograms(analysis: dict, path: Path) -> Path:
    """Per-image pHash distance histograms (fraction of images) with the recommended threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


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
                   overrides=(), log: Callable[[str], None] = print) -> dict:
    """`ddm consensus-eval`: claims, N verifier processes, analysis; writes the JSON report and histogram."""
    from data.manifest import manifest_sha256
    from ddm.loading import load_run

    t0 = time.perf_counter()
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "eval"
    work = out / "consensus_work"
    work.mkdir(parents=True, exist_ok=True)
    ensemble, _, manifest = load_run(run_dir, overrides)
    manifest_sha = manifest_sha256(manifest)
    claims, gallery = build_claims(ensemble, manifest_sha, settings, log)
    t_claims = time.perf_counter() - t0
    claims_path = work / "claims.json"
    claims_path.write_text(json.dumps({"run_dir": str(run_dir), "claims": claims}) + "\n")
    log(f"{len(claims)} claims ({settings.requests} requests x {settings.images} images) -> {claims_path}; "
        f"starting {len(settings.verifiers)} verifier processes")
    outputs = run_verifiers(run_dir, claims_path, settings.verifiers, settings.images, work, overrides=overrides,
                            parallel=settings.parallel, log=log)
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
    log(format_summary(report))
    log(f"report -> {report_path}, histogram -> {png}")
    return report


# ----------------------------------------------------------------------------------------------------------
# `python -m ddm.consensus worker ...`
# ----------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ddm.consensus")
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("worker", help="one verifier process: regenerate claims, write their distances")
    w.add_argument("--run-dir", required=True)
    w.add_argument("--claims", required=True, help="JSON {'claims': [{'id', 'kind', 'record'}, ...]}")
    w.add_argument("--out", required=True, help="where to write the distances (JSON)")
    w.add_argument("--batch-size", type=int, default=None)
    w.add_argument("--param-mantissa", type=int, default=None, help="round parameters to N mantissa bits")
    w.add_argument("--cpus", type=int, default=None, help="restrict this process to its first N allowed CPUs")
    w.add_argument("--set", action="append", default=[])
    args = parser.parse_args(argv)
    if args.cpus is not None:  # before XLA starts its thread pools
        allowed = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, allowed[: max(1, args.cpus)])
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        verifier_worker(args.run_dir, args.claims, args.out, batch_size=args.batch_size,
                        param_mantissa=args.param_mantissa, overrides=args.set)
    except DDMError as err:
        print(f"ddm consensus worker: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
