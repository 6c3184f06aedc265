"""The claimant's side of `ddm consensus-eval`: honest and tampered claims to put before the verifiers.

For request i (seed `seed + i`, the chosen strategy, steps and solver) and S_i = the same request with strategy
`single:k` (k = i mod K over present experts):

| kind                  | claims to be the output of | but its images are                                      |
|-----------------------|----------------------------|---------------------------------------------------------|
| honest                | R_i                        | R_i's output                                            |
| honest_single         | S_i                        | S_i's output                                            |
| same_cluster          | S_i                        | S_i with another seed: same expert, other noise         |
| seed                  | R_i                        | R_i with another seed                                   |
| strategy              | R_i                        | R_i with another routing strategy                       |
| steps                 | R_i                        | R_i with half the solver steps                          |
| steps_minus1/_plus1   | R_i                        | R_i with one solver step fewer / more                   |
| solver                | R_i                        | R_i with the other solver (euler <-> heun)              |
| perturbed_expert:S    | R_i                        | R_i after adding N(0, (S * rms of the leaf)^2) noise to |
|                       |                            | every parameter of the expert R_i used most             |
| swapped_experts       | R_i                        | R_i with the two most used experts' parameters swapped  |
| pixel_noise           | R_i                        | R_i's output + N(0, sigma^2) noise (sigma in uint8      |
|                       |                            | levels, added to the values)                            |
| ignored_conditions    | R_i                        | R_i drawn at the null condition (only with conditions)  |

With condition embeddings (a run conditioned on embeddings, `conditions` [m, *condition_shape]), request i names
rows (i * images + j) mod m, j < images, by their digest, and every claim of request i is drawn for them; the
`ignored_conditions` cheat is a server that serves unconditioned images for a prompt.

Every claim is a consistent `ddm-record/v2` record of the images it really holds (values, digests), made in the
claimant's environment: the cheats are in what it claims those images are. `same_cluster` pairs and the nearest
neighbours among all generated images that come from different noise are the intra-class collision measurements:
a threshold that accepts them lets a different image pass.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import jax
import numpy as np

from ddm.core.errors import DDMError
from ddm.sampling.ensemble import Ensemble
from ddm.sampling.request import Request, conditions_sha256, generate
from ddm.sampling.routing import parse_strategy
from ddm.verify.environment import environment
from ddm.verify.phash import perceptual_hashes
from ddm.verify.records import claimed_values, make_record, record_codec
from ddm.verify.worker import COPY_MODES, DEFAULT_VERIFIERS, VerifierSpec

logger = logging.getLogger(__name__)

HONEST_KINDS = ("honest", "honest_single")
INTRA_KIND = "same_cluster"
OTHER_SEED_OFFSET = 1_000_000  # the seed of "another seed" claims: seed + this (never a request's own seed)
# the "strategy" tamper cycles over those that differ from the request's
ALT_STRATEGIES = ("full", "top2", "sample", "top1+full:0.5", "top1")


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
    copiers: tuple[str, ...] = COPY_MODES  # one copying verifier (of verifier 0) per mode; () for none
    margin: float = 2.0  # tolerance thresholds = margin x the largest honest drift measured

    def __post_init__(self) -> None:
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
        if any(c not in COPY_MODES for c in self.copiers):
            raise DDMError(f"copiers must be among {', '.join(COPY_MODES)}, got {self.copiers}")
        if not self.margin >= 1:
            raise DDMError(f"margin={self.margin} must be >= 1 (thresholds below the measured honest drift)")
        if parse_strategy(self.strategy).kind in ("oracle", "single"):
            raise DDMError(f"consensus-eval strategy must be routed (top1, full, ...), not {self.strategy}")
        Request(seed=self.seed, n=self.images, strategy=self.strategy, steps=self.steps, solver=self.solver)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["verifiers"] = [v.describe() for v in self.verifiers]
        return d

    def all_verifiers(self) -> tuple[VerifierSpec, ...]:
        """The honest verifiers, then one copier of verifier 0 per `copiers` mode."""
        return self.verifiers + tuple(VerifierSpec(copy_of=0, copy_mode=m) for m in self.copiers)


def perturb_params(params, scale: float, rng: np.random.Generator):
    """Every floating leaf x of a param tree -> x + scale * rms(x) * N(0, 1) (same dtype and placement)."""
    def noise(leaf):
        arr = np.asarray(leaf)
        if not np.issubdtype(arr.dtype, np.floating):
            return leaf
        rms = float(np.sqrt(np.mean(np.square(arr, dtype=np.float64)))) or 1.0
        new = (arr + scale * rms * rng.standard_normal(arr.shape)).astype(arr.dtype)
        return jax.device_put(new, leaf.sharding) if hasattr(leaf, "sharding") else new

    return jax.tree.map(noise, params)


def _alt_strategy(strategy: str, i: int) -> str:
    options = [s for s in ALT_STRATEGIES if parse_strategy(s) != parse_strategy(strategy)]
    return options[i % len(options)]


def gallery(claims: list[dict]) -> list[dict]:
    """Every claimed image that is a faithful output of some request from its own noise (the honest, seed,
    honest_single and same_cluster claims), as {"noise": [seed, index], "cluster": k or None (routed), "phash":
    hex, "x": float32 [H, W, C] values}: the images among which nearest neighbours are collisions."""
    out = []
    for claim in claims:
        kind, meta, record = claim["kind"], claim["meta"], claim["record"]
        if kind not in ("honest", "seed", "honest_single", INTRA_KIND):
            continue
        seed = meta["seed"] if kind in ("seed", INTRA_KIND) else record["request"]["seed"]
        cluster = meta["expert"] if kind in ("honest_single", INTRA_KIND) else None
        values = claimed_values(record)
        for j, h in enumerate(perceptual_hashes(record_codec(record).preview(values))):
            out.append({"noise": [seed, j], "cluster": cluster, "phash": h["phash"], "x": values[j]})
    return out


def request_conditions(conditions: np.ndarray | None, i: int, images: int) -> np.ndarray | None:
    """Request i's condition rows float32 [images, *condition_shape]: rows (i * images + j) mod m of `conditions`
    [m, *condition_shape] (cycled, so a few prompts serve every request); None without conditions."""
    if conditions is None:
        return None
    return np.ascontiguousarray(conditions[(i * images + np.arange(images)) % len(conditions)], np.float32)


def build_claims(ensemble: Ensemble, manifest_sha: str, settings: EvalSettings,
                 conditions: np.ndarray | None = None) -> tuple[list[dict], dict[str, np.ndarray]]:
    """The claims, each {"id", "kind", "meta", "record"} (record: `ddm.verify.records.make_record`, made in this
    process's environment), and the condition rows the records name, by digest ({} without `conditions`).

    conditions: float32 [m, *condition_shape] (`ddm.sampling.request.condition_rows`) for a run conditioned on
    embeddings, cycled over the requests (`request_conditions`); None draws every claim at the null condition.
    DDMError when given to a run without embeddings."""
    if conditions is not None and not ensemble.condition_shape:
        raise DDMError("condition embeddings were given, but this run is not conditioned on embeddings")
    present = [k for k in range(ensemble.num_experts) if ensemble.available[k]]
    table: dict[str, np.ndarray] = {}
    rng = np.random.default_rng(settings.seed)
    env = environment()
    claims: list[dict] = []

    def add(kind: str, request: Request, values: np.ndarray, **meta) -> None:
        claims.append({"id": len(claims), "kind": kind, "meta": meta,
                       "record": make_record(manifest_sha, request, values, env, ensemble.codec)})

    t0 = time.perf_counter()
    for i in range(settings.requests):
        seed = settings.seed + i
        other_seed = seed + OTHER_SEED_OFFSET
        rows = request_conditions(conditions, i, settings.images)
        digest = None if rows is None else conditions_sha256(rows)
        if rows is not None:
            table[digest] = rows
        req = Request(seed=seed, n=settings.images, strategy=settings.strategy, steps=settings.steps,
                      solver=settings.solver, conditions_sha256=digest)

        def drawn(request: Request, on: Ensemble = ensemble, rows=rows) -> np.ndarray:
            return generate(on, request, conditions=rows).x

        honest = generate(ensemble, req, conditions=rows)
        add("honest", req, honest.x)

        add("seed", req, drawn(dataclasses.replace(req, seed=other_seed)), seed=other_seed)
        alt = _alt_strategy(req.strategy, i)
        add("strategy", req, drawn(dataclasses.replace(req, strategy=alt)), strategy=alt)
        for kind, steps in (("steps", req.steps // 2), ("steps_minus1", req.steps - 1),
                            ("steps_plus1", req.steps + 1)):
            add(kind, req, drawn(dataclasses.replace(req, steps=steps)), steps=steps)
        solver = "euler" if req.solver == "heun" else "heun"
        add("solver", req, drawn(dataclasses.replace(req, solver=solver)), solver=solver)

        usage = np.asarray(honest.weights, np.float64).sum(axis=(0, 1))  # [K] routing weight per expert
        order = [int(k) for k in np.argsort(-usage, kind="stable") if ensemble.available[int(k)]]
        a = order[0]
        for scale in settings.perturb_scales:
            params = list(ensemble.expert_params)
            params[a] = perturb_params(params[a], scale, rng)
            add(f"perturbed_expert:{scale:g}", req, drawn(req, ensemble.replace(expert_params=params)),
                expert=a, scale=scale)
        if len(order) >= 2:
            b = order[1]
            params = list(ensemble.expert_params)
            params[a], params[b] = params[b], params[a]
            add("swapped_experts", req, drawn(req, ensemble.replace(expert_params=params)), experts=[a, b])
        # uint8 levels -> model range (for latents: the same share of the [-1, 1] span, in standard deviations)
        noise = rng.normal(0.0, settings.pixel_noise / 127.5, honest.x.shape)
        add("pixel_noise", req, (honest.x + noise).astype(np.float32), std=settings.pixel_noise)
        if rows is not None:
            unconditioned = generate(ensemble, dataclasses.replace(req, conditions_sha256=None)).x
            add("ignored_conditions", req, unconditioned)

        k = present[i % len(present)]
        single = dataclasses.replace(req, strategy=f"single:{k}")
        add("honest_single", single, drawn(single), expert=k)
        add(INTRA_KIND, single, drawn(dataclasses.replace(single, seed=other_seed)), expert=k, seed=other_seed)
        logger.info(f"claimant: request {i + 1}/{settings.requests} done ({time.perf_counter() - t0:.1f}s)")
    return claims, table
