"""Routing strategies: which experts' velocities are mixed, and with what weights, at each solver step.

The exact marginal flow is u_t(x_t) = sum_k p(k | x_t, t) v_k(x_t) (the `full` strategy). Cheaper strategies keep
only part of the posterior; the paper's best ImageNet result was top-1 (McAllister et al., README.md):

| text              | Strategy                         | weights [B, K] per sample                                 |
|-------------------|----------------------------------|-----------------------------------------------------------|
| `full`            | kind="full"                      | the router posterior                                      |
| `top1`, `top2`    | kind="topk", k=1 / 2             | the k most probable experts, renormalised                 |
| `topk:N`          | kind="topk", k=N                 | same, any N (printed back as `topN`)                      |
| `threshold:TAU`   | kind="threshold", tau=TAU        | experts with posterior >= TAU, renormalised               |
| `sample`          | kind="sample"                    | one expert drawn from the posterior (one-hot)             |
| `oracle`          | kind="oracle"                    | one-hot of the sample's known cluster label               |
| `prior`           | kind="prior"                     | one-hot of an expert drawn once per sample from p(k | y)   |
| `single:K`        | kind="single", expert=K          | one-hot of expert K for every sample                      |
| `S+full:T`        | S with full_above=T              | the posterior while t > T, strategy S below (S: top-k,    |
|                   |                                  | threshold or sample), e.g. `top1+full:0.8`                |

Why `+full:T`: near t = 1 the posterior is close to the cluster prior, so top-1 commits each sample to the
argmax of an almost flat distribution, biased towards the largest cluster, and a flow committed early stays
there (docs/results.md). Mixing with the full posterior over the first, noisiest part of the solve and
routing sparsely once the posterior is sharp costs K expert calls per step only while t > T.

Why `prior` (ancestral sampling): the data is the mixture p(x | y) = sum_k p(k | y) p_k(x | y), and p(k | y) is
known exactly from the counts of each class in each cluster. Drawing k ~ p(k | y) once per sample and integrating
expert k alone samples the mixture exactly when each expert models its cluster: no router, one expert per sample
per step, the choice fixed for the whole solve (docs/design.md). `prior_probs` builds p(k | y) from the counts,
`prior_choice` draws from it; the weights are then the one-hot of the drawn experts, as for `oracle`.

Strategies are plain hashable data, so they can be static arguments of `jax.jit`. `route_weights` is a pure,
jit-able function; the decisions are per sample (two samples of a batch may pick different experts).
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np

from ddm.core.errors import DDMError

KINDS = ("full", "topk", "threshold", "sample", "oracle", "single", "prior")
ACCEPTED_FORMS = ("full, top1, top2, topN, topk:N, threshold:TAU (0 < TAU <= 1), sample, oracle, prior, single:K; "
                  "topN, threshold:TAU and sample also as S+full:T (the full posterior while t > T, 0 <= T < 1)")
# Strategies whose weights come from the router's posterior (oracle, single and prior need no router).
ROUTED_KINDS = ("full", "topk", "threshold", "sample")
# Strategies that fix each sample's one expert before the solve, for every step of it.
FIXED_KINDS = ("oracle", "single", "prior")
# The fold of the request's key (`jax.random.key(seed)`) that `prior` draws from (1 is `sample`'s).
PRIOR_TAG = 2
# Strategies that take the `+full:T` modifier (full itself needs none; oracle and single ignore the router).
SPARSE_KINDS = ("topk", "threshold", "sample")

_DEFAULTS = {"k": 1, "tau": 0.0, "expert": 0}
_USED_FIELDS = {"full": (), "topk": ("k",), "threshold": ("tau",), "sample": (), "oracle": (), "single": ("expert",),
                "prior": ()}


@dataclasses.dataclass(frozen=True)
class Strategy:
    """A routing strategy. Only the field its kind uses matters; the others are reset to their defaults so
    that equal strategies compare (and hash, as jit static arguments) equal.

    kind: one of KINDS. k: experts kept by "topk" (>= 1). tau: posterior threshold of "threshold", in (0, 1].
    expert: the expert index of "single" (>= 0).
    full_above: for the sparse kinds (topk, threshold, sample), use the full posterior at times t > full_above;
    in [0, 1), or None (the default) for never.
    """

    kind: str
    k: int = 1
    tau: float = 0.0
    expert: int = 0
    full_above: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise DDMError(f"unknown routing strategy kind {self.kind!r}; accepted: {', '.join(KINDS)}")
        for name, default in _DEFAULTS.items():
            if name not in _USED_FIELDS[self.kind]:
                object.__setattr__(self, name, default)
        object.__setattr__(self, "tau", float(self.tau))
        if self.full_above is not None:
            object.__setattr__(self, "full_above", float(self.full_above))
            if self.kind not in SPARSE_KINDS:
                raise DDMError(f"'+full:T' applies to top-k, threshold and sample routing, not {self.kind}; "
                               f"accepted: {ACCEPTED_FORMS}")
            if not 0.0 <= self.full_above < 1.0:
                raise DDMError(f"'+full:T' needs 0 <= T < 1, got {self.full_above}")
        if self.kind == "topk" and (not isinstance(self.k, int) or self.k < 1):
            raise DDMError(f"routing strategy top-k needs k >= 1, got {self.k}")
        if self.kind == "threshold" and not 0.0 < self.tau <= 1.0:
            raise DDMError(f"routing strategy threshold needs 0 < tau <= 1, got {self.tau}")
        if self.kind == "single" and (not isinstance(self.expert, int) or self.expert < 0):
            raise DDMError(f"routing strategy single needs an expert index >= 0, got {self.expert}")

    def __str__(self) -> str:
        suffix = f"+full:{self.full_above!r}" if self.full_above is not None else ""  # float repr round-trips
        if self.kind == "topk":
            return f"top{self.k}{suffix}"
        if self.kind == "threshold":
            return f"threshold:{self.tau!r}{suffix}"
        if self.kind == "single":
            return f"single:{self.expert}"
        return self.kind + suffix

    @property
    def needs_router(self) -> bool:
        """Whether the weights depend on the router's posterior."""
        return self.kind in ROUTED_KINDS

    @property
    def one_hot(self) -> bool:
        """Whether every sample gets exactly one expert at every step (so a chosen expert id is meaningful)."""
        if self.full_above is not None:
            return False
        return self.kind in ("sample", "oracle", "single", "prior") or (self.kind == "topk" and self.k == 1)

    @property
    def fixed(self) -> bool:
        """Whether each sample's one expert is chosen before the solve and kept for all of it (oracle, single,
        prior): then `SampleResult.experts` names it."""
        return self.kind in FIXED_KINDS


_INT = r"(\d+)"
_FLOAT = r"([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)"


def parse_strategy(text: str | Strategy) -> Strategy:
    """Parses "full", "top1", "top2", "topk:3", "threshold:0.1", "sample", "oracle", "prior", "single:2", and the sparse
    ones with a "+full:T" suffix ("top1+full:0.8") (case and surrounding spaces ignored); a `Strategy` passes
    through. `parse_strategy(str(s)) == s` for every strategy."""
    if isinstance(text, Strategy):
        return text
    if not isinstance(text, str):
        raise DDMError(f"routing strategy must be text, got {type(text).__name__}; accepted: {ACCEPTED_FORMS}")
    s = text.strip().lower()
    if m := re.fullmatch(r"(.+?)\s*\+\s*full:" + _FLOAT, s):
        base = parse_strategy(m.group(1))
        if base.full_above is not None:
            raise DDMError(f"routing strategy {text!r} has two '+full' parts; accepted: {ACCEPTED_FORMS}")
        return dataclasses.replace(base, full_above=float(m.group(2)))
    if s in ("full", "sample", "oracle", "prior"):
        return Strategy(s)
    if m := (re.fullmatch(r"top" + _INT, s) or re.fullmatch(r"topk:" + _INT, s)):
        return Strategy("topk", k=int(m.group(1)))
    if m := re.fullmatch(r"threshold:" + _FLOAT, s):
        return Strategy("threshold", tau=float(m.group(1)))
    if m := re.fullmatch(r"single:" + _INT, s):
        return Strategy("single", expert=int(m.group(1)))
    raise DDMError(f"unknown routing strategy {text!r}; accepted: {ACCEPTED_FORMS}")


def masked_posterior(probs: jax.Array, mask: jax.Array) -> jax.Array:
    """probs [B, K] with masked-out experts (mask [K] bool False) zeroed and each row renormalised.

    A row whose available probability is all zero (underflow) becomes uniform over the available experts, so
    the result is always a distribution over available experts. float32 [B, K].
    """
    probs = jnp.asarray(probs, jnp.float32)
    mask = jnp.asarray(mask, bool)
    p = jnp.where(mask[None, :], probs, 0.0)
    total = p.sum(-1, keepdims=True)
    uniform = jnp.broadcast_to(mask / jnp.maximum(mask.sum(), 1), p.shape).astype(jnp.float32)
    return jnp.where(total > 0, p / jnp.where(total > 0, total, 1.0), uniform)


def _renormalise(p: jax.Array, selected: jax.Array) -> jax.Array:
    """p [B, K] restricted to `selected` [B, K] bool and renormalised; every row selects >= 1 positive entry."""
    w = jnp.where(selected, p, 0.0)
    return w / w.sum(-1, keepdims=True)


def _one_hot_or_top1(p: jax.Array, choice: jax.Array, mask: jax.Array) -> jax.Array:
    """One-hot of choice [B] int; a choice that is out of range or masked out falls back to argmax p."""
    num = p.shape[-1]
    valid = (choice >= 0) & (choice < num) & mask[jnp.clip(choice, 0, num - 1)]
    choice = jnp.where(valid, choice, jnp.argmax(p, axis=-1))
    return jax.nn.one_hot(choice, num, dtype=jnp.float32)


def _as_keys(rng: jax.Array) -> jax.Array:
    """Typed PRNG key(s): raw uint32 keys ([2] or [B, 2]) are wrapped, typed keys pass through."""
    rng = jnp.asarray(rng) if not isinstance(rng, jax.Array) else rng
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return rng
    return jax.random.wrap_key_data(rng)


def route_weights(
    probs: jax.Array,
    strategy: Strategy,
    *,
    mask: jax.Array,
    rng: jax.Array | None = None,
    labels: jax.Array | None = None,
    t: jax.Array | None = None,
) -> jax.Array:
    """Mixing weights [B, K] float32 (rows sum to 1) from the router posterior `probs` [B, K].

    mask [K] bool: available experts. Masked-out experts get weight 0 and the posterior is renormalised over
    the rest before any strategy is applied (see `masked_posterior`).
    - full: the (masked) posterior.
    - topk: the min(k, K) most probable experts per sample, renormalised. Ties go to the lower index
      (`lax.top_k`). If fewer than k experts are available the extra picks have zero weight.
    - threshold: experts with posterior >= tau, renormalised; a sample where none passes (tau above its largest
      posterior) falls back to its top-1 expert, so every sample always gets an expert.
    - sample: one expert per sample drawn from the posterior, one-hot. `rng` is one key (all samples drawn from
      it at once) or per-sample keys [B] (what `Ensemble` uses, so draws do not depend on batching).
    - oracle: one-hot of `labels` [B] int (the samples' known clusters).
    - prior: one-hot of `labels` [B] int, the experts drawn once per sample from p(k | y) (`prior_choice`).
    - single: one-hot of `strategy.expert`.
    - `+full:T` (strategy.full_above = T): samples whose time t [B] (required then) is > T get the full
      posterior, the others the strategy's weights.
    oracle/prior/single choices that are masked out or out of range fall back to the top-1 available expert
    (`Ensemble` refuses such requests up front; this only keeps the function total under jit).

    Pure and deterministic; jit it with `strategy` static.
    """
    strategy = parse_strategy(strategy)
    probs = jnp.asarray(probs, jnp.float32)
    if probs.ndim != 2:
        raise DDMError(f"route_weights needs probs [B, K], got shape {probs.shape}")
    num = probs.shape[1]
    mask = jnp.asarray(mask, bool)
    if mask.shape != (num,):
        raise DDMError(f"route_weights mask must have shape ({num},), got {mask.shape}")
    p = masked_posterior(probs, mask)
    if strategy.full_above is None:
        return _sparse_weights(p, strategy, mask, rng, labels)
    if t is None:
        raise DDMError(f"routing strategy {strategy} needs the samples' times t")
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (probs.shape[0],))
    sparse = _sparse_weights(p, dataclasses.replace(strategy, full_above=None), mask, rng, labels)
    return jnp.where(t[:, None] > strategy.full_above, p, sparse)


def _sparse_weights(p: jax.Array, strategy: Strategy, mask: jax.Array, rng: jax.Array | None,
                    labels: jax.Array | None) -> jax.Array:
    """`route_weights` of one strategy (no `+full` part) from the masked posterior p [B, K]."""
    num = p.shape[1]
    kind = strategy.kind

    if kind == "full":
        return p
    if kind == "topk":
        if strategy.k == 1:
            # Exactly one-hot: p / p can round to 1 - ulp when XLA turns the division into a reciprocal multiply.
            return jax.nn.one_hot(jnp.argmax(p, axis=-1), num, dtype=jnp.float32)
        _, idx = jax.lax.top_k(p, min(strategy.k, num))
        selected = jax.nn.one_hot(idx, num, dtype=jnp.float32).sum(-2) > 0
        return _renormalise(p, selected)
    if kind == "threshold":
        selected = (p >= strategy.tau) & mask[None, :]
        top1 = jax.nn.one_hot(jnp.argmax(p, axis=-1), num, dtype=jnp.float32) > 0
        selected = jnp.where(selected.any(-1, keepdims=True), selected, top1)
        return _renormalise(p, selected)
    if kind == "sample":
        if rng is None:
            raise DDMError("routing strategy 'sample' needs an rng key")
        keys = _as_keys(rng)
        logp = jnp.where(p > 0, jnp.log(jnp.where(p > 0, p, 1.0)), -jnp.inf)
        if keys.shape == ():
            choice = jax.random.categorical(keys, logp, axis=-1)
        elif keys.shape == (p.shape[0],):
            choice = jax.vmap(jax.random.categorical)(keys, logp)
        else:
            raise DDMError(f"routing rng must be one key or [B]={p.shape[0]} keys, got shape {keys.shape}")
        return jax.nn.one_hot(choice, num, dtype=jnp.float32)
    if kind in ("oracle", "prior"):
        if labels is None:
            raise DDMError(f"routing strategy '{kind}' needs the samples' cluster labels")
        labels = jnp.asarray(labels, jnp.int32)
        if labels.shape != (p.shape[0],):
            raise DDMError(f"{kind} labels must have shape ({p.shape[0]},), got {labels.shape}")
        return _one_hot_or_top1(p, labels, mask)
    # single
    if strategy.expert >= num:
        raise DDMError(f"routing strategy {strategy} names expert {strategy.expert}, but there are only {num}")
    choice = jnp.full((p.shape[0],), strategy.expert, jnp.int32)
    return _one_hot_or_top1(p, choice, mask)


PRIOR_WITHOUT_COUNTS = ("routing strategy 'prior' draws from p(k | class) by the clusters' class counts, and condition "
                        "embeddings have no counts: use a router strategy (top1, top2, full, threshold:TAU, sample)")


def prior_available(condition_shape: tuple[int, ...]) -> bool:
    """Whether `prior` can sample a run conditioned by `condition_shape` (() for class labels or none): it draws
    from the clusters' counts per class, and condition embeddings have no counts to draw from. The refusal's
    message is PRIOR_WITHOUT_COUNTS."""
    return not condition_shape


def prior_probs(counts, y, mask, *, null_label: int) -> np.ndarray:
    """p(k | y_i) over the available experts, float32 [n, K] (rows sum to 1), from the clusters' data counts.

    counts: [K, C] images of class c in cluster k (a labelled run's `class_counts`), or [K] cluster sizes.
    y: [n] int class labels; a sample whose label is `null_label` (unconditional or unguided) gets the cluster
    shares p(k) = size_k / N, as does every sample when counts are only sizes. mask [K] bool: available experts;
    the missing ones get 0 and each row is renormalised over the rest, which samples the data of the present
    clusters only (p(x | y, k present)), not the whole dataset.

    DDMError when a real class label meets counts without classes, or when no available cluster holds an image
    of a requested class (then p(k | y) has nothing to renormalise).
    """
    counts = np.asarray(counts, np.float64)
    mask = np.asarray(mask, bool)
    y = np.asarray(y, np.int64)
    if counts.ndim == 2 and counts.shape[1] != null_label:
        raise DDMError(f"prior counts have {counts.shape[1]} classes; the labels have {null_label} (+ the null label)")
    if (y < 0).any() or (y > null_label).any():
        raise DDMError(f"class labels must be in [0, {null_label}] for prior routing ({null_label} = null)")
    if counts.ndim == 1 and (y != null_label).any():
        raise DDMError("routing strategy 'prior' with class labels needs each cluster's class counts [K, C], "
                       "not only its size")
    sizes = counts if counts.ndim == 1 else counts.sum(1)
    # rows: classes 0..C-1 (p(k | c) up to normalisation), then the null label (the cluster sizes)
    table = np.concatenate([counts.T if counts.ndim == 2 else np.zeros((null_label, len(sizes))), sizes[None, :]])
    table = np.where(mask[None, :], table, 0.0)
    rows = table[y]
    empty = sorted({int(c) for c in y[rows.sum(1) == 0]})
    if empty:
        what = "the unconditional prior" if empty == [null_label] else f"class {empty[0]}"
        raise DDMError(f"routing strategy 'prior': no available expert's cluster holds data of {what}")
    return (rows / rows.sum(1, keepdims=True)).astype(np.float32)


def prior_choice(key: jax.Array, probs: jax.Array, start: jax.Array | int = 0) -> jax.Array:
    """Each sample's expert under `prior`: int32 [n], sample i drawn from probs[i] [K] (`prior_probs`) with the key
    fold_in(key, start + i). key: the request's prior key, fold_in(jax.random.key(seed), PRIOR_TAG), so sample
    i's draw depends only on (seed, i, its probabilities), never on the batch it is solved in. Pure; jit-able."""
    probs = jnp.asarray(probs, jnp.float32)
    index = jnp.asarray(start, jnp.uint32) + jnp.arange(probs.shape[0], dtype=jnp.uint32)
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(_as_keys(key), index)
    logp = jnp.where(probs > 0, jnp.log(jnp.where(probs > 0, probs, 1.0)), -jnp.inf)
    return jax.vmap(jax.random.categorical)(keys, logp).astype(jnp.int32)
