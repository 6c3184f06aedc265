"""Sampling requests: everything that determines a generation besides the run itself.

(run identity, request) pins a generation: that is what verifiers regenerate. A request of a run conditioned
on embeddings names its conditions by their digest only (`conditions_sha256`): the embeddings themselves travel
beside it (a file, `generate(..., conditions=...)`), and a generation refuses conditions of another digest.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np

from ddm.core.config import SEED_MAX, SampleConfig
from ddm.core.errors import DDMError
from ddm.core.flow import SOLVERS
from ddm.core.hashing import array_sha256
from ddm.data.shards import CONDITIONS_TAG
from ddm.sampling.routing import parse_strategy

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Request:
    """One generation request (JSON-serialisable)."""

    seed: int = SampleConfig.seed  # the defaults are the config's `sample` section's
    n: int = SampleConfig.n
    strategy: str = "top1"
    steps: int = SampleConfig.steps
    solver: str = SampleConfig.solver
    labels: tuple[int, ...] | None = None  # class labels, for class-conditional experts
    cfg_scale: float | None = None
    # the `oracle` strategy's cluster per image (and only its: other strategies choose their experts); left out
    # of the JSON when None, so requests of every other strategy read and digest as they always did
    clusters: tuple[int, ...] | None = None
    # runs conditioned on embeddings: `conditions_sha256` of the float32 [n, *condition_shape] embeddings the
    # images were drawn for (None: every image the null condition); left out of the JSON when None, as clusters
    conditions_sha256: str | None = None

    def __post_init__(self) -> None:
        parse_strategy(self.strategy)  # raises DDMError listing the accepted forms
        if self.solver not in SOLVERS:
            raise DDMError(f"solver {self.solver!r} is not one of {', '.join(SOLVERS)}")
        for name in ("n", "steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise DDMError(f"request {name}={value!r} must be a positive integer")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise DDMError(f"request seed={self.seed!r} must be a non-negative integer")
        if self.seed > SEED_MAX:  # seeds are 32-bit threefry keys: a larger one would overflow in jax
            raise DDMError(f"request seed {self.seed} is outside 0..{SEED_MAX}")
        if self.labels is not None:
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in self.labels):
                raise DDMError(f"request labels must be non-negative integers, got {list(self.labels)!r}")
            if len(self.labels) != self.n:
                raise DDMError(f"request has {len(self.labels)} labels for n={self.n} images")
        oracle = parse_strategy(self.strategy).kind == "oracle"
        if oracle and self.clusters is None:
            raise DDMError("routing strategy 'oracle' needs each image's cluster (`ddm sample --clusters 0,3,...`)")
        if self.clusters is not None:
            if not oracle:
                raise DDMError(f"clusters feed the oracle strategy; strategy {self.strategy} chooses its own experts")
            if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**31 for v in self.clusters):
                raise DDMError(f"request clusters must be non-negative integers, got {list(self.clusters)!r}")
            if len(self.clusters) != self.n:
                raise DDMError(f"request has {len(self.clusters)} clusters for n={self.n} images")
        if self.conditions_sha256 is not None:
            if not isinstance(self.conditions_sha256, str) or len(self.conditions_sha256) != 64 or \
                    any(ch not in "0123456789abcdef" for ch in self.conditions_sha256):
                raise DDMError(f"request conditions_sha256={self.conditions_sha256!r} must be 64 lowercase hex digits")
            if self.labels is not None:
                raise DDMError("a request is conditioned on class labels or on condition embeddings, not both")
        if self.cfg_scale is not None and (not isinstance(self.cfg_scale, (int, float))
                                           or isinstance(self.cfg_scale, bool) or not math.isfinite(self.cfg_scale)):
            raise DDMError(f"request cfg_scale={self.cfg_scale!r} must be a finite number or null")

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["labels"] = list(self.labels) if self.labels is not None else None
        if self.clusters is None:
            del d["clusters"]
        else:
            d["clusters"] = list(self.clusters)
        if self.conditions_sha256 is None:
            del d["conditions_sha256"]
        return d

    @classmethod
    def from_json(cls, data: dict) -> Request:
        if not isinstance(data, dict):
            raise DDMError("request must be a JSON object")
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise DDMError(f"request has unknown field {unknown[0]!r}")
        data = dict(data)
        for name in ("labels", "clusters"):
            if data.get(name) is not None:
                if not isinstance(data[name], list):
                    raise DDMError(f"request {name} must be a list of integers or null, got {data[name]!r}")
                data[name] = tuple(data[name])
        return cls(**data)


def conditions_sha256(conditions: np.ndarray) -> str:
    """The digest a request names its condition embeddings by: `ddm.core.hashing.array_sha256` of their float32
    little-endian bytes and shape [n, *condition_shape], tagged as the shards' conditions are
    (`ddm.data.shards.CONDITIONS_TAG`)."""
    return array_sha256(np.ascontiguousarray(conditions, "<f4"), CONDITIONS_TAG)


def condition_rows(conditions, n: int, condition_shape: tuple[int, ...], what: str = "conditions") -> np.ndarray:
    """float32 [n, *condition_shape] (C-contiguous) out of `conditions`: float [n, *condition_shape], or one row
    [*condition_shape] for all n. DDMError (one line, naming `what`) for another shape, a non-float dtype, or NaN /
    Inf (NaN is the null condition)."""
    shape = tuple(condition_shape)
    rows = np.asarray(conditions)
    if not np.issubdtype(rows.dtype, np.floating):
        raise DDMError(f"{what} hold {rows.dtype} values; condition embeddings are floats (float16 or float32)")
    if rows.shape == shape and rows.ndim < len(shape) + 1:
        rows = np.broadcast_to(rows, (n, *shape))
    if rows.shape != (n, *shape):
        raise DDMError(f"{what} have shape {list(rows.shape)}; this run takes [n={n}, "
                       f"{', '.join(map(str, shape))}] (one row per image)")
    finite = np.isfinite(rows).reshape(n, -1).all(axis=1)
    if not finite.all():
        raise DDMError(f"{what} contain NaN or Inf (first at row {int(np.argmin(finite))}): NaN is reserved for the "
                       "null condition")
    return np.ascontiguousarray(rows, np.float32)


def check_conditions(request: Request, conditions, condition_shape: tuple[int, ...], *, claim: str = "request",
                     source: str = "the conditions", give: str = "the file it was sampled with") -> np.ndarray | None:
    """The condition embeddings to (re)generate `request` with: float32 [n, *condition_shape] (`condition_rows`)
    whose digest is its `conditions_sha256`; None for a request that names none (every image the null
    condition). DDMError (one line; `claim` names what carries the request, `source` where the conditions come
    from, `give` how to supply them) when they are missing, given to a request that names none, given to a run
    not conditioned on embeddings, or of another digest."""
    if request.conditions_sha256 is None:
        if conditions is not None:
            raise DDMError(f"{source} were given, but the {claim} names no condition embeddings")
        return None
    if conditions is None:
        raise DDMError(f"the {claim} was made for condition embeddings (sha256 {request.conditions_sha256[:16]}...): "
                       f"give {give}")
    if not condition_shape:
        raise DDMError(f"the {claim} names condition embeddings, but the run is not conditioned on embeddings")
    rows = condition_rows(conditions, request.n, condition_shape, source)
    actual = conditions_sha256(rows)
    if actual != request.conditions_sha256:
        raise DDMError(f"{source} do not match the {claim} (their sha256 is {actual[:16]}..., the {claim} names "
                       f"{request.conditions_sha256[:16]}...)")
    return rows


def check_condition(request: Request, num_classes: int, condition_shape: tuple[int, ...] = ()) -> None:
    """DDMError unless the request's class labels, conditions and guidance fit a model with `num_classes` classes
    (0: unconditional) or conditioned on embeddings of `condition_shape` (non-empty): labels only for a class-
    conditional model, each in [0, num_classes); conditions (`conditions_sha256`) only for an embedding model;
    a scale only with one of them."""
    if condition_shape:
        if request.labels is not None:
            raise DDMError("class labels given, but the run is conditioned on condition embeddings of shape "
                           f"{list(condition_shape)}, not classes: give --conditions FILE or --prompt TEXT")
        if request.cfg_scale is not None and request.conditions_sha256 is None:
            raise DDMError("classifier-free guidance (cfg_scale) needs conditions: give --conditions or --prompt")
        return
    if request.conditions_sha256 is not None:
        raise DDMError("condition embeddings given, but the run is not conditioned on embeddings"
                       + (" (it takes class labels: --class / --labels)" if num_classes else ""))
    if num_classes == 0 and (request.labels is not None or request.cfg_scale is not None):
        what = "class labels" if request.labels is not None else "a guidance scale"
        raise DDMError(f"{what} given, but the run is unconditional (its data has no class labels)")
    if request.labels is None:
        if request.cfg_scale is not None:
            raise DDMError("classifier-free guidance (cfg_scale) needs class labels: give --class or --labels")
        return
    outside = sorted({v for v in request.labels if v >= num_classes})
    if outside:
        raise DDMError(f"class {outside[0]} is outside [0, {num_classes}): the run's classes are 0..{num_classes - 1}")


def check_clusters(request: Request, available: list[bool]) -> None:
    """DDMError unless every oracle cluster of the request names an available expert (`available`: one entry
    per cluster of the run, True where its expert is trained)."""
    if request.clusters is None:
        return
    outside = sorted({v for v in request.clusters if v >= len(available)})
    if outside:
        raise DDMError(f"cluster {outside[0]} is outside [0, {len(available)}): the run's clusters are "
                       f"0..{len(available) - 1}")
    missing = sorted({v for v in request.clusters if not available[v]})
    if missing:
        raise DDMError(f"cluster {missing[0]}'s expert is not trained; oracle cannot route to it")


def check_image_count(n: int, max_n: int) -> None:
    """DDMError unless n images are within the run's bound `sample.max_n`."""
    if n > max_n:
        raise DDMError(f"n={n} images exceeds sample.max_n={max_n} (--set sample.max_n=N to allow more)")


def check_limits(request: Request, sample: SampleConfig) -> Request:
    """`request` if it is within the run's bounds (`sample.max_n` images, `sample.max_steps` steps); DDMError
    otherwise. (Class labels are checked against the run by `check_condition`.)"""
    check_image_count(request.n, sample.max_n)
    if request.steps > sample.max_steps:
        raise DDMError(f"steps={request.steps} exceeds sample.max_steps={sample.max_steps} "
                       f"(--set sample.max_steps=N to allow more)")
    return request


def warn_topk(strategy: str, available: int) -> bool:
    """Logs a warning (and returns True) when a top-k strategy keeps more experts than the `available` ones: it
    then keeps them all, which is the full posterior at K times top-1's cost, probably not what was asked."""
    parsed = parse_strategy(strategy)
    if parsed.kind != "topk" or parsed.k <= available:
        return False
    logger.warning(f"warning: strategy {strategy} keeps {parsed.k} experts, but only {available} are available: "
                   "it routes with all of them (the full posterior)")
    return True


def generate(ensemble, request: Request, *, conditions=None, batch_size: int | None = None):
    """Runs `request` on `ensemble`; returns its `SampleResult` (images uint8 [n, H, W, C]).

    conditions: for a request that names condition embeddings (`conditions_sha256`), those embeddings, float
    [n, *condition_shape] (`check_conditions`: DDMError for another digest). batch_size: samples integrated
    together (default all n). It is not part of the request: it changes memory and speed, not the noise or
    routing draws (docs/verification.md says what it does to the bits).
    """
    check_condition(request, ensemble.num_classes, ensemble.condition_shape)
    warn_topk(request.strategy, sum(ensemble.available))
    y = check_conditions(request, conditions, ensemble.condition_shape)
    if request.labels is not None:
        y = np.asarray(request.labels, np.int32)
    clusters = None if request.clusters is None else np.asarray(request.clusters, np.int32)
    return ensemble.sample(request.n, request.strategy, steps=request.steps, solver=request.solver,
                           seed=request.seed, labels=clusters, y=y, cfg_scale=request.cfg_scale,
                           batch_size=batch_size)


def merge_key(request: Request) -> tuple:
    """What requests must share to run merged in one `generate_many` call: (strategy, steps, solver, guidance on
    or off). Guidance scales may differ: each request's rows get its own."""
    return (request.strategy, request.steps, request.solver, request.cfg_scale is not None)


def generate_many(ensemble, requests: list[Request], *, conditions: list | None = None,
                  batch_size: int | None = None, pad_to: int | None = None) -> list:
    """Runs requests that share `merge_key` as one merged batch (`Ensemble.sample_rows`); one `SampleResult` per
    request, in order. Each request gets its own noise and routing draws, exactly those of `generate(request)`;
    its values may differ from the lone call's by rounding only (docs/serving.md, what batching does). Requests
    of different guidance scales run with a per-row scale, those of one scale with that scale as a scalar (the
    program a merge of one scale always ran). conditions: per request, its condition embeddings or None (as
    `generate` takes them); None: none for any. pad_to: solve at least this many rows (`Ensemble.sample_rows`)."""
    if not requests:
        return []
    keys = {merge_key(r) for r in requests}
    if len(keys) != 1:
        raise DDMError(f"generate_many needs requests of one (strategy, steps, solver, guidance on/off), got "
                       f"{len(keys)}")
    conditions = [None] * len(requests) if conditions is None else list(conditions)
    if len(conditions) != len(requests):
        raise DDMError(f"generate_many: {len(conditions)} conditions for {len(requests)} requests")
    for request in requests:
        check_condition(request, ensemble.num_classes, ensemble.condition_shape)
    first = requests[0]
    warn_topk(first.strategy, sum(ensemble.available))
    rows = [check_conditions(r, c, ensemble.condition_shape) for r, c in zip(requests, conditions)]
    labels = [None if r.labels is None else np.asarray(r.labels, np.int32) for r in requests]
    if ensemble.condition_shape:  # the embeddings take the labels' slot
        labels = rows
    clusters = [None if r.clusters is None else np.asarray(r.clusters, np.int32) for r in requests]
    scales = [r.cfg_scale for r in requests]
    return ensemble.sample_rows([(r.seed, r.n) for r in requests], first.strategy, steps=first.steps,
                                solver=first.solver, labels=clusters, y=labels,
                                cfg_scale=first.cfg_scale if len(set(scales)) == 1 else scales,
                                batch_size=batch_size, pad_to=pad_to)
