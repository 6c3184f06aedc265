"""The routed ensemble: K experts plus a router, sampled as one flow.

    u_t(x_t) = sum_k w_k(x_t, t) v_k(x_t, t),   w = route_weights(softmax(router(x_t, t)), strategy)

The whole solve is one device program: `Ensemble.sample` jits, per (batch shape, strategy, steps, solver, CFG),
a function that integrates the ODE with `ddm.core.flow.integrate` (a `lax.scan` over the velocity evaluations)
and, at every evaluation, runs the router, turns its posterior into weights (`route_weights`) and dispatches on
the device (`ddm.sampling.dispatch`): each expert runs only on the rows routed to it, and the weighted velocities
are added up. Nothing comes back to the host until the solve ends: one program launch per batch, no per-step
synchronisation, and experts nobody selected cost nothing. `full` knows its selection without looking and runs
every expert on the whole batch.

The fixed strategies know every sample's expert before the solve: `oracle` (given), `single:K`, and `prior`
(ancestral sampling), which draws each sample's expert from p(k | y) once, on the host (`Ensemble.prior_experts`,
from the clusters' data counts given as `prior_counts`). They skip the routed program: the rows are grouped by
expert on the host and each group is that expert's plain solve, in chunks of exactly `min_bucket` rows
(`Ensemble._solve_groups`, dispatch "groups"). The router is never evaluated, each sample costs one expert
evaluation per step, and since every chunk has one shape, a sample's floats do not depend on the batch or the
merged requests it was solved with. For the routed strategies, `dispatch` chooses how the experts are run ("auto": the
backend's best; see `ddm.sampling.dispatch` for the options and docs/benchmarks.md for the measurements):
"unrolled" on CPU (every expert its own code and its own parameters, rows in chunks of a static size),
"grouped" on GPU/TPU (the experts' parameters stacked, one code for all of them, one bucket per expert whose
size is chosen on the device).

Bucket sizes are powers of two from a floor, capped at the batch; the floor is `min_bucket`, but never more
than B / (available experts), the mean selection of top-1 ("grouped" uses these buckets, "unrolled" chunks of
the floor). Every dispatch agrees to float rounding, for every strategy, with a reference that brings the
weights to the host at every evaluation and runs one jitted call per selected expert (the tests' oracle,
tests/oracles/host_dispatch.py; tests/test_ensemble_device.py).

Experts of different architectures (an island may train its own model size, `ddm.experts.assemble`): the
Ensemble then takes one apply function per expert, and experts sharing a function form a *structure group*
(their parameters stack). The routed program computes the weights once per evaluation, runs each group's
dispatch over its own experts (the weights of the others are simply not read), and adds the groups'
velocities in group order (groups ordered by their first expert). The fixed strategies solve each expert with
its own function. With one group (every homogeneous ensemble) the program is exactly the single-architecture
one.

Conditions: the experts take one condition slot y, class labels int32 [n] (`num_classes`) or condition
embeddings float32 [n, *condition_shape] (`condition_shape`: text or any vector per image); every gather, pad,
chunk and merge of y works along its first axis, so both kinds take the same paths. The null condition, for
unconditional rows and the unconditional half of classifier-free guidance, is the label `num_classes` or a row
of NaN (`ddm.core.flow.null_like`), which the models replace by their learned null embedding.

Compilation: one program per (batch, strategy, steps, solver, CFG) shape, cached by jax and shared by
ensembles with the same apply functions. Within it the expert function is traced once per expert ("unrolled";
twice for `S+full:T`, whose full-posterior steps run each expert on the whole batch) or once per bucket size
("grouped").

Determinism: for a (seed, request) the output is a pure function of the parameters. The initial noise is
`jax.random.normal(jax.random.key(seed, impl="threefry2x32"), (n, H, W, C))` for the whole request (batching
does not change it); `prior` draws sample i's expert once, from key fold_in(fold_in(key(seed), 2), i), and the
`sample` strategy draws it at evaluation e (= 2*step + stage, stage 1 being Heun's corrector) from key
fold_in(fold_in(fold_in(key(seed), 1), e), i): both independent of batching. `Ensemble.sample_rows` solves
several requests as one merged batch with exactly these draws per request (each row its own request's noise
row, prior key and routing keys); it is a separate path, so `sample`'s programs and outputs are unchanged.
Identical requests on the same hardware and software are bitwise identical (no dispatch adds velocities
through a scatter with repeated indices, which GPUs make nondeterministic). The fixed strategies are bitwise
invariant to batch composition (chunks of one shape); the routed ones are *not*: a sample shares its expert call with whichever other samples picked the same expert, and
a different bucket shape can change a matmul's last bits, so another batch size or another set of companions
can move a sample's floats by rounding (within 1e-5 after a solve of the tests' digits run, with the same
routing decisions and uint8 images within 1 level: tests/test_determinism.py; docs/verification.md).
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ddm.core import flow
from ddm.core.codec import Codec
from ddm.core.dit import check_condition_shape
from ddm.core.errors import DDMError
from ddm.sampling import dispatch as dispatch_lib
from ddm.sampling.request import condition_rows
from ddm.sampling.routing import (PRIOR_TAG, PRIOR_WITHOUT_COUNTS, Strategy, parse_strategy, prior_available,
                                  prior_choice, prior_probs, route_weights)

ExpertApply = Callable[[Any, jax.Array, jax.Array, jax.Array | None], jax.Array]
RouterApply = Callable[[Any, jax.Array, jax.Array, jax.Array | None], jax.Array]


@dataclasses.dataclass(frozen=True)
class SampleResult:
    """What `Ensemble.sample` returns.

    images: uint8 [n, H, W, C], round(clip((x + 1) * 127.5, 0, 255)); for latent runs the codec's preview
        (latent channels 0-2 as RGB, `ddm.core.codec`).
    x: float32 [n, H, W, C], the final ODE state (model space: [-1, 1] for images, standardised latents).
    weights: float32 [steps, n, K], the routing weights of each step's first velocity evaluation.
    expert_ids: int32 [steps, n], the chosen expert per step, for one-hot strategies (top1, sample, oracle,
        prior, single); None otherwise.
    expert_evals: (sample, expert) velocity evaluations the strategy needed (no padding; a CFG pair counts 1).
    padded_evals: rows the experts actually ran, bucket padding included.
    dispatch: which dispatcher ran ("unrolled", "grouped" or "capacity"; see the module docstring).
    """

    images: np.ndarray
    x: np.ndarray
    weights: np.ndarray
    expert_ids: np.ndarray | None
    strategy: str
    solver: str
    steps: int
    seed: int
    expert_evals: int
    padded_evals: int
    dispatch: str
    latents: np.ndarray | None = None  # float32 [n, H, W, C]: de-normalised latents (latent runs only)
    # int32 [n]: each sample's one expert, for the strategies that fix it before the solve (oracle, prior, single)
    experts: np.ndarray | None = None


# ---------------------------------------------------------------------------------------------------------
# Routing: pure functions (tests/oracles/host_dispatch.py reuses them). The apply functions are bound with
# functools.partial so that jax sees them as constants; everything that varies is a traced argument.
# ---------------------------------------------------------------------------------------------------------


def _route(router_apply, router_params, x, t, y, mask, key, offset, *, strategy: Strategy):
    """Router forward + strategy: weights [B, K] float32. Missing experts get logit -inf (probability 0).

    key: the evaluation's key (only for "sample"); sample i of the batch draws with fold_in(key, offset + i).
    Merged requests pass one key per row (key [B]) and each row's index in its request (offset uint32 [B]):
    row i draws with fold_in(key[i], offset[i]).
    """
    logits = router_apply(router_params, x, t, y).astype(jnp.float32)
    logits = jnp.where(mask[None, :], logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    keys = None
    if strategy.kind == "sample" and key.ndim == 0:  # one request: row i is its sample offset + i
        index = offset + jnp.arange(x.shape[0], dtype=jnp.uint32)
        keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, index)
    elif strategy.kind == "sample":  # merged requests (`Ensemble.sample_rows`): row i draws with its own key
        keys = jax.vmap(jax.random.fold_in)(key, offset)
    return route_weights(probs, strategy, mask=mask, rng=keys, t=t)


def _fixed_route(mask, labels, batch, *, strategy: Strategy):
    """Weights [batch, K] of the router-free strategies (oracle, prior, single): they ignore x and t."""
    num = mask.shape[0]
    uniform = jnp.full((batch, num), 1.0 / num, jnp.float32)
    return route_weights(uniform, strategy, mask=mask, labels=labels)


def _expert_applies(expert_apply: Any, num: int, available: Sequence[bool]) -> list[Any]:
    """Each of the `num` experts' apply function (None for a missing one) out of the Ensemble's `expert_apply`:
    one function shared by all, or one per expert; DDMError naming what is wrong."""
    if callable(expert_apply):
        return [expert_apply] * num
    if not isinstance(expert_apply, Sequence) or len(expert_apply) != num:
        raise DDMError(f"expert_apply must be one function or a list of {num} (one per expert)")
    for k, (a, apply) in enumerate(zip(available, expert_apply)):
        if a and not callable(apply):
            raise DDMError(f"expert {k} is available but its apply function is {type(apply).__name__}")
    return list(expert_apply)


# The prior strategy's draws (`prior_choice`), jitted: one compile per request size, not one per eager op.
_prior_choice_jit = jax.jit(prior_choice)


# --- the device path ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything static about one device evaluation (hashable: a jit static argument).

    present: the K-indices of the available experts, in the order they are passed (a tuple of trees for
    "unrolled", one stack otherwise). chunk: the "unrolled" chunk; buckets: the "grouped" bucket sizes;
    capacity: the "capacity" bucket (all for this batch size). groups: None for experts of one architecture;
    else the K-indices of each structure group (the experts are then passed per group, one apply each).
    """

    strategy: Strategy
    dispatch: str
    present: tuple[int, ...]
    num_experts: int
    null_label: int
    cfg: bool
    chunk: int
    buckets: tuple[int, ...]
    capacity: int
    groups: tuple[tuple[int, ...], ...] | None = None


def _device_velocity(expert_apply, router_apply, experts, router_params, x, t, y, labels, key, offset,
                     cfg_scale, *, plan: _Plan):
    """One routed velocity evaluation on the device: (v [B, ...] f32, weights [B, K] f32, real rows, padded
    rows). experts: the available experts' params (a tuple of trees for "unrolled", their stack otherwise);
    with `plan.groups`, a tuple of those per structure group, and expert_apply a tuple of one apply per group.
    x [B, H, W, C] f32, t [B] f32, y [B] int32 | [B, *condition_shape] f32 | None, labels [B] int32 | None
    (oracle)."""
    strategy, batch = plan.strategy, x.shape[0]
    mask = jnp.asarray([k in plan.present for k in range(plan.num_experts)])
    if strategy.needs_router:
        weights = _route(router_apply, router_params, x, t, y, mask, key, offset, strategy=strategy)
    else:
        weights = _fixed_route(mask, labels, batch, strategy=strategy)
    if plan.groups is None:
        v, real, padded = _dispatch(expert_apply, experts, plan.present, x, t, y, weights, cfg_scale, plan=plan)
        return v, weights, real, padded
    v = real = padded = None
    for apply, group_experts, present in zip(expert_apply, experts, plan.groups):
        parts = _dispatch(apply, group_experts, present, x, t, y, weights, cfg_scale, plan=plan)
        v, real, padded = parts if v is None else (v + parts[0], real + parts[1], padded + parts[2])
    return v, weights, real, padded


def _dispatch(expert_apply, experts, present, x, t, y, weights, cfg_scale, *, plan: _Plan):
    """sum over the experts `present` (K-indices; their params `experts` as `_device_velocity` takes them) of
    weights[:, k] * v_k, by the plan's dispatch: (v [B, ...] f32, real rows, padded rows)."""
    strategy = plan.strategy
    common = {"cfg": plan.cfg, "null_label": plan.null_label}
    args = (expert_apply, experts, present, x, t, y, weights, cfg_scale)
    everyone = tuple(range(len(present)))
    if strategy.kind == "full":
        v, real, padded = dispatch_lib.dense(*args, slots=everyone, **common)
    elif plan.dispatch == "unrolled":
        sparse = functools.partial(dispatch_lib.unrolled, *args, chunk=plan.chunk, **common)
        if strategy.full_above is None:
            v, real, padded = sparse()
        else:  # the steps where every sample takes the full posterior run each expert on the whole batch
            v, real, padded = jax.lax.cond(jnp.all(t > strategy.full_above),
                                           functools.partial(dispatch_lib.dense, *args, slots=everyone, **common),
                                           sparse)
    elif plan.dispatch == "grouped":
        v, real, padded = dispatch_lib.grouped(*args, buckets=plan.buckets, **common)
    else:
        v, real, padded = dispatch_lib.capacity(*args, size=plan.capacity, **common)
    return v, real, padded


def _device_solve(expert_apply, router_apply, experts, router_params, x1, y, labels, route_base, offset,
                  cfg_scale, *, plan: _Plan, steps: int, solver: str):
    """The whole routed ODE solve of one batch, from noise x1 [B, H, W, C] f32 at t=1 to x0 at t=0.

    route_base: the request's routing key (the `sample` strategy: evaluation e draws with fold_in(route_base,
    e)); offset: the batch's first sample index in the request. Merged requests (`Ensemble.sample_rows`) pass
    route_base as one key per row [B] and offset as each row's index in its request, uint32 [B]. Returns (x0 [B, ...] f32, weights [steps, B, K]
    f32 of each step's first evaluation, real rows, padded rows summed over the solve).
    """
    def velocity(x, t, evaluation):
        if route_base is None:
            key = None
        elif route_base.ndim == 0:
            key = jax.random.fold_in(route_base, evaluation)
        else:  # one routing key per row (merged requests)
            key = jax.vmap(jax.random.fold_in, in_axes=(0, None))(route_base, evaluation)
        v, weights, real, padded = _device_velocity(expert_apply, router_apply, experts, router_params, x, t, y,
                                                    labels, key, offset, cfg_scale, plan=plan)
        return v, (weights, real, padded)

    x0, (weights, real, padded) = flow.integrate(velocity, x1, steps, solver)
    first = np.flatnonzero(flow.evaluation_stages(solver, steps) == 0)
    return x0, weights[first], real.sum(), padded.sum()


def _expert_solve(expert_apply, params, x1, y, cfg_scale, *, steps: int, solver: str, cfg: bool, null_label: int):
    """One expert alone on its rows, from noise x1 [b, H, W, C] f32 at t=1 to x0 [b, ...] f32 at t=0: a fixed
    strategy's group (oracle, prior, single), the same arithmetic as one model's plain solve. y [b] int32 |
    [b, *condition_shape] f32 | None; cfg_scale f32 scalar or [b]."""
    def velocity(x, t, evaluation):
        return dispatch_lib.expert_velocity(expert_apply, params, x, t, y, cfg_scale, cfg=cfg,
                                            null_label=null_label), None

    return flow.integrate(velocity, x1, steps, solver)[0]


@functools.lru_cache(maxsize=16)
def _jitted_device(expert_apply: ExpertApply | tuple[ExpertApply, ...],
                   router_apply: RouterApply | None) -> tuple[Callable, Callable, Callable]:
    """(one jitted evaluation, the jitted whole solve, the jitted one-expert solve) for one pair of apply functions
    (expert_apply: one per structure group, a tuple, for an ensemble of several architectures; its one-expert
    solve is then unused: each group's own pair gives it).

    Cached per pair so that ensembles built over the same architecture (e.g. one per strategy being evaluated)
    share compiled executables. Bounded, because a loader may build a fresh closure per call, which would
    otherwise pin every old one in memory.
    """
    evaluate = jax.jit(functools.partial(_device_velocity, expert_apply, router_apply),
                       static_argnames=("plan",))
    solve = jax.jit(functools.partial(_device_solve, expert_apply, router_apply),
                    static_argnames=("plan", "steps", "solver"))
    expert_solve = jax.jit(functools.partial(_expert_solve, expert_apply),
                           static_argnames=("steps", "solver", "cfg", "null_label"))
    return evaluate, solve, expert_solve


class Ensemble:
    """K experts (one architecture, or several: one apply function per expert) and a router.

    router_note: why the ensemble has no router although the run has one (set by `load_ensemble`: the router
    was trained for another membership); router strategies refuse with it.

    expert_apply(params, x [b, H, W, C] f32, t [b] f32, y [b] int32 | [b, *condition_shape] f32 | None) -> v
        [b, H, W, C], shared by every expert; or a list of K such functions (None for a missing expert), for
        experts of different architectures: experts given the same function object form one structure group
        whose parameters stack (the module docstring). Every expert takes the same x, t and y and returns v in the
        flow convention.
    expert_params: list of K param trees; None for a missing expert.
    router_apply(router_params, x, t, y) -> logits [b, K]. May be None (then only oracle/prior/single work).
    image_shape: (H, W, C). num_classes: 0 for unconditional models; otherwise labels are 0..num_classes-1 and
        num_classes is the null label used for unconditional / CFG evaluations.
    condition_shape: () (default), or the shape of one image's condition embedding, (D,) pooled or (L, D)
        tokens, for experts conditioned on embeddings (exclusive with num_classes): y is then float
        [n, *condition_shape], and the null condition (y=None, the CFG branch) is a row of NaN
        (`ddm.core.flow.null_like`). Such ensembles route with the router strategies: `prior` needs class
        counts, and p(k | c) has none.
    available: which experts to use (default: those whose params are not None). Missing experts are masked
        out of routing (the posterior is renormalised over the rest) with a warning.
    min_bucket: the smallest dispatch bucket (bounds the bucket sizes compiled for tiny selections); batches
        smaller than min_bucket * (available experts) use B / (available experts) instead. Also the rows of
        every chunk of the fixed strategies' group solves (padded; 1 avoids padding for a large model serving
        small requests, a larger one suits accelerators), so their bits depend on it.
    dispatch: "auto" (the backend's best: "unrolled" on CPU, "grouped" on GPU/TPU; `resolved_dispatch`),
        "unrolled", "grouped" or "capacity"; see the module docstring and `ddm.sampling.dispatch`.
    expert_sharding: where the stacked expert parameters live, e.g. `NamedSharding(mesh, P("expert"))` to put
        the available experts on the devices of an `expert` mesh axis; None: jax's default device.
    prior_counts: the clusters' training data counts, for the `prior` strategy's p(k | y): [K, num_classes]
        images of class c in cluster k, or [K] cluster sizes (unconditional ensembles, or unguided samples
        only); None: `prior` is refused. `load_ensemble` passes the run manifest's.

    All params are used as given (device placement included), so a loader only has to restore K param trees
    and the router's and call this constructor. The device path stacks the available experts' parameters once,
    on first use (a second copy of them in memory; `stacked_params`).
    """

    def __init__(
        self,
        expert_apply: ExpertApply | Sequence[ExpertApply | None],
        expert_params: Sequence[Any],
        router_apply: RouterApply | None,
        router_params: Any,
        *,
        image_shape: tuple[int, int, int],
        num_classes: int = 0,
        condition_shape: Sequence[int] = (),
        available: Sequence[bool] | None = None,
        min_bucket: int = 8,
        dispatch: str = "auto",
        expert_sharding: jax.sharding.Sharding | None = None,
        codec: Codec = Codec(),
        prior_counts: Any = None,
        router_note: str | None = None,
    ):
        self.router_note = router_note
        expert_params = list(expert_params)
        num = len(expert_params)
        if num == 0:
            raise DDMError("an ensemble needs at least one expert")
        if available is None:
            available = [p is not None for p in expert_params]
        available = [bool(a) for a in available]
        if len(available) != num:
            raise DDMError(f"available has {len(available)} entries for {num} experts")
        for k, (a, p) in enumerate(zip(available, expert_params)):
            if a and p is None:
                raise DDMError(f"expert {k} is marked available but has no parameters")
        present = [k for k in range(num) if available[k]]
        missing = [k for k in range(num) if not available[k]]
        if not present:
            raise DDMError(f"all {num} experts are missing; nothing to sample with")
        if missing:
            warnings.warn(
                f"experts {missing} of {num} are missing; routing renormalises over experts {present}",
                stacklevel=2,
            )
        if len(image_shape) != 3:
            raise DDMError(f"image_shape must be (H, W, C), got {image_shape}")
        if num_classes < 0:
            raise DDMError(f"num_classes must be >= 0, got {num_classes}")
        condition_shape = check_condition_shape(condition_shape)
        if condition_shape and num_classes:
            raise DDMError(f"an ensemble is conditioned on class labels (num_classes={num_classes}) or on condition "
                           f"embeddings (condition_shape={condition_shape}), not both")
        if min_bucket < 1:
            raise DDMError(f"min_bucket must be >= 1, got {min_bucket}")
        if dispatch not in dispatch_lib.DISPATCHES:
            raise DDMError(f"unknown dispatch {dispatch!r}; expected one of {', '.join(dispatch_lib.DISPATCHES)}")
        if prior_counts is not None:
            prior_counts = np.asarray(prior_counts, np.float64)
            if prior_counts.ndim not in (1, 2) or prior_counts.shape[0] != num:
                raise DDMError(f"prior_counts must be [K={num}] cluster sizes or [K, C] class counts, got shape "
                               f"{prior_counts.shape}")
            if not (np.isfinite(prior_counts).all() and (prior_counts >= 0).all()):
                raise DDMError("prior_counts must be finite counts >= 0")
            if prior_counts.ndim == 2 and num_classes == 0:
                prior_counts = prior_counts.sum(1)  # unconditional experts on labelled data: the cluster sizes
            if prior_counts.ndim == 2 and prior_counts.shape[1] != num_classes:
                raise DDMError(f"prior_counts has {prior_counts.shape[1]} classes, the ensemble {num_classes}")

        applies = _expert_applies(expert_apply, num, available)
        self.expert_apply = expert_apply
        self.expert_params = expert_params
        self.router_apply = router_apply
        self.router_params = router_params
        self.image_shape = tuple(int(s) for s in image_shape)
        self.num_classes = int(num_classes)
        self.condition_shape = tuple(int(d) for d in condition_shape)
        self.num_experts = num
        self.available = available
        self.min_bucket = int(min_bucket)
        self.dispatch = dispatch
        self.expert_sharding = expert_sharding
        self._present = tuple(present)
        self.codec = codec
        self.prior_counts = prior_counts
        self._mask = jnp.asarray(available, bool)
        self._stacked = None
        # Structure groups, ordered by their first expert: (apply, K-indices). One group: the program of one
        # architecture, unchanged; several: one apply per group in the routed program (module docstring).
        groups: dict[Callable, list[int]] = {}
        for k in present:
            groups.setdefault(applies[k], []).append(k)
        self._groups = tuple((apply, tuple(ks)) for apply, ks in groups.items())
        self._group_fns = tuple(_jitted_device(apply, router_apply) for apply, _ in self._groups)
        self._group_of = {k: g for g, (_, ks) in enumerate(self._groups) for k in ks}
        self._device_fns = (self._group_fns[0] if len(self._groups) == 1
                            else _jitted_device(tuple(apply for apply, _ in self._groups), router_apply))

    @property
    def heterogeneous(self) -> bool:
        """Whether the available experts span several architectures (structure groups)."""
        return len(self._groups) > 1

    def apply_of(self, k: int) -> ExpertApply:
        """Expert k's apply function (k available)."""
        return self._groups[self._group_of[k]][0]

    def replace(self, **changes: Any) -> Ensemble:
        """A copy with some constructor arguments changed (e.g. `expert_params`, `router_params`, `dispatch`);
        the rest, availability included, are this ensemble's, and compiled functions are shared."""
        current = {"expert_apply": self.expert_apply, "expert_params": self.expert_params,
                   "router_apply": self.router_apply, "router_params": self.router_params,
                   "image_shape": self.image_shape, "num_classes": self.num_classes,
                   "condition_shape": self.condition_shape, "available": self.available,
                   "min_bucket": self.min_bucket, "dispatch": self.dispatch,
                   "expert_sharding": self.expert_sharding, "codec": self.codec, "prior_counts": self.prior_counts,
                   "router_note": self.router_note}
        unknown = sorted(set(changes) - set(current))
        if unknown:
            raise DDMError(f"Ensemble.replace: unknown field {unknown[0]!r} (known: {', '.join(current)})")
        merged = {**current, **changes}
        return Ensemble(merged.pop("expert_apply"), merged.pop("expert_params"), merged.pop("router_apply"),
                        merged.pop("router_params"), **merged)

    @property
    def resolved_dispatch(self) -> str:
        """The dispatch that runs: `dispatch`, with "auto" resolved by the default backend: "unrolled" on CPU
        (XLA:CPU copies dynamically sliced weights slowly), "grouped" on GPU/TPU (docs/benchmarks.md)."""
        if self.dispatch != "auto":
            return self.dispatch
        return "unrolled" if jax.default_backend() == "cpu" else "grouped"

    def _device_experts(self) -> Any:
        """The available experts' params as the resolved dispatch takes them: a tuple of trees ("unrolled") or
        their stack; for several architectures, a tuple of those, one per structure group."""
        unrolled = self.resolved_dispatch == "unrolled"
        if not self.heterogeneous:
            return tuple(self.expert_params[k] for k in self._present) if unrolled else self.stacked_params
        if unrolled:
            return tuple(tuple(self.expert_params[k] for k in ks) for _, ks in self._groups)
        if self._stacked is None:
            self._stacked = tuple(dispatch_lib.stack_params([self.expert_params[k] for k in ks], self.expert_sharding)
                                  for _, ks in self._groups)
        return self._stacked

    @property
    def stacked_params(self) -> Any:
        """The available experts' parameters stacked into one tree with leaves [S, ...] (S = available experts,
        in index order), placed with `expert_sharding`; built on first use and kept. DDMError for experts of
        several architectures (they do not stack; the device path stacks each structure group)."""
        if self.heterogeneous:
            raise DDMError(f"the experts span {len(self._groups)} architectures: their parameters do not stack")
        if self._stacked is None:
            self._stacked = dispatch_lib.stack_params([self.expert_params[k] for k in self._present],
                                                      self.expert_sharding)
        return self._stacked

    def _plan(self, strategy: Strategy, batch: int, cfg: bool) -> _Plan:
        """The static description of a device evaluation on a batch of `batch`."""
        floor = dispatch_lib.bucket_floor(batch, len(self._present), self.min_bucket)
        # Capacity: the mean selection of the sparse part (the `+full` steps just take more rounds).
        per_sample = {"topk": strategy.k, "threshold": 2}.get(strategy.kind, 1)
        return _Plan(strategy=strategy, dispatch=self.resolved_dispatch, present=self._present,
                     num_experts=self.num_experts, null_label=self.num_classes, cfg=cfg, chunk=floor,
                     buckets=dispatch_lib.bucket_sizes(batch, floor),
                     capacity=dispatch_lib.capacity_for(batch, len(self._present), per_sample),
                     groups=tuple(ks for _, ks in self._groups) if self.heterogeneous else None)

    # -----------------------------------------------------------------------------------------------------
    # Request validation (host side, before anything runs).
    # -----------------------------------------------------------------------------------------------------

    def _check_strategy(self, strategy: str | Strategy) -> Strategy:
        strategy = parse_strategy(strategy)
        if strategy.needs_router and self.router_apply is None:
            raise DDMError(self.router_note or f"routing strategy {strategy} needs a router, and this ensemble has none")
        if strategy.kind == "prior" and not prior_available(self.condition_shape):
            raise DDMError(PRIOR_WITHOUT_COUNTS)
        if strategy.kind == "prior" and self.prior_counts is None:
            raise DDMError("routing strategy 'prior' needs the clusters' data counts: build the Ensemble with "
                           "prior_counts ([K, C] class counts or [K] cluster sizes; load_ensemble passes the run's)")
        if strategy.kind == "single":
            if strategy.expert >= self.num_experts:
                raise DDMError(f"strategy {strategy}: there are only {self.num_experts} experts")
            if not self.available[strategy.expert]:
                raise DDMError(f"strategy {strategy}: expert {strategy.expert} is missing")
        return strategy

    def _check_labels(self, strategy: Strategy, labels: Any, n: int) -> np.ndarray | None:
        """Oracle cluster labels [n] int32 (required for oracle, refused for prior, ignored otherwise)."""
        if strategy.kind == "prior" and labels is not None:
            raise DDMError("routing strategy 'prior' draws each sample's expert itself; labels are oracle's")
        if strategy.kind != "oracle":
            return None
        if labels is None:
            raise DDMError("routing strategy 'oracle' needs labels (the cluster of each sample)")
        labels = np.asarray(labels)
        if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
            raise DDMError(f"oracle labels must be integers of shape ({n},), got {labels.dtype} {labels.shape}")
        bad = sorted({int(v) for v in labels if not (0 <= v < self.num_experts and self.available[v])})
        if bad:
            raise DDMError(f"oracle labels name missing or unknown experts {bad}")
        return labels.astype(np.int32)

    def _check_condition(self, y: Any, cfg_scale: float | None, n: int) -> tuple[np.ndarray | None, bool]:
        """Class labels [n] int32 (null label where the request is unconditional), or for an embedding ensemble
        the conditions float32 [n, *condition_shape] (`_check_embeddings`), and whether CFG is on."""
        if self.condition_shape:
            return self._check_embeddings(y, cfg_scale, n)
        if self.num_classes == 0:
            if y is not None:
                raise DDMError("this ensemble is unconditional; y (class labels) must be None")
            if cfg_scale is not None:
                raise DDMError("classifier-free guidance needs a class-conditional ensemble (num_classes > 0)")
            return None, False
        if y is None:
            if cfg_scale is not None:
                raise DDMError("classifier-free guidance needs class labels y")
            return np.full((n,), self.num_classes, np.int32), False  # the unconditional (null-label) model
        y = np.asarray(y)
        if y.ndim == 0:
            y = np.full((n,), y)
        if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer):
            raise DDMError(f"class labels y must be integers of shape ({n},), got {y.dtype} {y.shape}")
        if y.min() < 0 or y.max() > self.num_classes:
            raise DDMError(f"class labels y must be in [0, {self.num_classes}] ({self.num_classes} = null)")
        return y.astype(np.int32), cfg_scale is not None

    def _check_embeddings(self, y: Any, cfg_scale: float | None, n: int) -> tuple[np.ndarray, bool]:
        """Condition embeddings float32 [n, *condition_shape] from y (float [n, *condition_shape], or one row
        [*condition_shape] for all n), and whether CFG is on. y=None: every row the null condition, a row of
        NaN (what `ddm.core.flow.null_like` makes on the device; built here with numpy, as nothing may move to the
        device before the solve). A caller's NaN or Inf is refused: NaN means the null condition."""
        shape = self.condition_shape
        if y is None:
            if cfg_scale is not None:
                raise DDMError("classifier-free guidance needs conditions y (the embeddings to guide towards)")
            return np.full((n, *shape), np.nan, np.float32), False
        return condition_rows(y, n, shape, "conditions y"), cfg_scale is not None

    # -----------------------------------------------------------------------------------------------------
    # One velocity evaluation.
    # -----------------------------------------------------------------------------------------------------

    def velocity(
        self,
        x_t: jax.Array,
        t: jax.Array | float,
        strategy: str | Strategy,
        *,
        rng: jax.Array | None = None,
        labels: Any = None,
        y: Any = None,
        cfg_scale: float | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """The routed velocity at x_t [B, H, W, C], t scalar or [B]: (v [B, H, W, C] f32, weights [B, K] f32).

        rng: key for the `sample` strategy (sample i draws with fold_in(rng, i)). labels [B]: oracle clusters.
        y [B] (or scalar): class labels of a conditional ensemble (None: the null label); for an embedding
        ensemble float [B, *condition_shape] (or one row; None: the null condition). cfg_scale: guidance.
        """
        strategy = self._check_strategy(strategy)
        if strategy.kind == "prior":
            raise DDMError("routing strategy 'prior' draws each sample's expert once per request: use sample(), or "
                           "velocity(..., 'oracle', labels=ensemble.prior_experts(...))")
        x = jnp.asarray(x_t, jnp.float32)
        if x.ndim != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise DDMError(f"x_t must have shape [B, {', '.join(map(str, self.image_shape))}], got {x.shape}")
        batch = x.shape[0]
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (batch,))
        if strategy.kind == "sample" and rng is None:
            raise DDMError("routing strategy 'sample' needs an rng key")
        labels = self._check_labels(strategy, labels, batch)
        y_host, cfg = self._check_condition(y, cfg_scale, batch)
        y_dev = None if y_host is None else jnp.asarray(y_host)
        scale = 0.0 if cfg_scale is None else float(cfg_scale)
        evaluate, _, _ = self._device_fns
        v, weights, _, _ = evaluate(self._device_experts(), self.router_params, x, t, y_dev,
                                    None if labels is None else jnp.asarray(labels), rng, jnp.uint32(0),
                                    jnp.float32(scale), plan=self._plan(strategy, batch, cfg))
        return v, weights

    def prior_experts(self, n: int, *, seed: int = 0, y: Any = None) -> np.ndarray:
        """The experts the `prior` strategy gives a request's n samples: int32 [n], sample i drawn from p(k | y_i)
        over the available experts (`ddm.sampling.routing.prior_probs`; y None or the null label: the cluster
        shares) with the key fold_in(fold_in(jax.random.key(seed), PRIOR_TAG), i), so a sample's expert depends
        only on (seed, i, its class), never on n's batching. y: [n] or scalar class labels, as in `sample`."""
        self._check_strategy("prior")
        y_all, _ = self._check_condition(y, None, n)
        labels = np.zeros((n,), np.int32) if y_all is None else y_all  # unconditional: every row the null label
        probs = prior_probs(self.prior_counts, labels, self.available, null_label=self.num_classes)
        with jax.transfer_guard("allow"):
            key = jax.random.fold_in(jax.random.key(seed, impl="threefry2x32"), PRIOR_TAG)
            return np.asarray(_prior_choice_jit(key, probs))

    # -----------------------------------------------------------------------------------------------------
    # Sampling.
    # -----------------------------------------------------------------------------------------------------

    def sample(
        self,
        n: int,
        strategy: str | Strategy = "top1",
        *,
        steps: int = 50,
        solver: str = "euler",
        seed: int = 0,
        labels: Any = None,
        y: Any = None,
        cfg_scale: float | None = None,
        batch_size: int | None = None,
    ) -> SampleResult:
        """Draws n samples by integrating the routed flow from t=1 to t=0 (see the module docstring).

        labels [n]: oracle clusters (`prior` draws its own: `prior_experts`). y [n] or scalar: class labels
        (conditional ensembles; `prior` draws each sample's expert from p(k | y), CFG within it); for an
        embedding ensemble (`condition_shape`) float [n, *condition_shape] or one row for all (None: the null
        condition; cast to float32, NaN / Inf refused). batch_size: samples
        integrated together (default: all n); it changes memory and speed, not the noise or routing draws.
        Each batch is one program launch, and nothing moves between host and device from the first launch until
        the results come back (one explicit `jax.device_get`).
        """
        if n < 1:
            raise DDMError(f"n must be >= 1, got {n}")
        strategy = self._check_strategy(strategy)
        flow.step_function(solver)  # validates the name
        flow.time_grid(steps)  # validates steps
        labels = self._check_labels(strategy, labels, n)
        y_all, cfg = self._check_condition(y, cfg_scale, n)
        if strategy.kind == "prior":  # drawn once, before the solve; then the oracle path with these labels
            labels = self.prior_experts(n, seed=seed, y=y_all)
        batch_size = n if batch_size is None else int(batch_size)
        if batch_size < 1:
            raise DDMError(f"batch_size must be >= 1, got {batch_size}")

        # The request goes to the device here (the only transfers, allowed explicitly); the solves below move
        # nothing between host and device until their results are fetched (a test holds the device path to
        # it with `jax.transfer_guard("disallow")`).
        if strategy.fixed:  # every sample's expert is known before the solve: one plain solve per group
            if strategy.kind == "single":
                labels = np.full(n, strategy.expert, np.int32)
            with jax.transfer_guard("allow"):
                noise = jax.random.normal(jax.random.key(seed, impl="threefry2x32"), (n, *self.image_shape),
                                          jnp.float32)
            solved = self._solve_groups(noise, y_all, labels, batch_size, steps, solver, cfg,
                                        jnp.float32(0.0 if cfg_scale is None else cfg_scale))
            return self._result(*solved, strategy, solver, steps, seed)
        with jax.transfer_guard("allow"):
            base = jax.random.key(seed, impl="threefry2x32")
            noise = jax.random.normal(base, (n, *self.image_shape), jnp.float32)
            route_base = jax.random.fold_in(base, 1) if strategy.kind == "sample" else None
            scale = jnp.float32(0.0 if cfg_scale is None else cfg_scale)
            inputs = []
            for start in range(0, n, batch_size):
                stop = min(n, start + batch_size)
                inputs.append((noise[start:stop], None if y_all is None else jnp.asarray(y_all[start:stop]),
                               None if labels is None else jnp.asarray(labels[start:stop]), route_base,
                               jnp.uint32(start)))
        solved = self._solve(inputs, strategy, steps, solver, cfg, scale)
        return self._result(*solved, strategy, solver, steps, seed)

    def _solve(self, inputs, strategy: Strategy, steps: int, solver: str, cfg: bool, scale: jax.Array):
        """Runs the one-program solve on each batch of `inputs` ((x1, y, labels, route key(s), offset) on the
        device) with `scale` (f32 scalar, or a list of per-row scales [b], one per batch) and fetches them
        together, the one transfer to the host. Returns (x0 [n, ...] f32, weights
        [steps, n, K] f32, expert ids [steps, n] int32 or None, real rows, padded rows) over all batches."""
        with jax.transfer_guard("allow"):
            experts = self._device_experts()
        _, solve, _ = self._device_fns
        batches = []  # per batch: (x0 [b, ...], weights [steps, b, K], real rows, padded rows), on device
        for i, (x1, yb, lb, route, offset) in enumerate(inputs):
            batches.append(solve(experts, self.router_params, x1, yb, lb, route, offset,
                                 scale[i] if isinstance(scale, list) else scale,
                                 plan=self._plan(strategy, x1.shape[0], cfg), steps=steps, solver=solver))
        fetched = jax.device_get(batches)  # the one transfer to the host
        x_final = np.concatenate([b[0] for b in fetched]).astype(np.float32)
        weights = np.concatenate([b[1] for b in fetched], axis=1).astype(np.float32)
        expert_ids = np.argmax(weights, axis=-1).astype(np.int32) if strategy.one_hot else None
        return x_final, weights, expert_ids, int(sum(b[2] for b in fetched)), int(sum(b[3] for b in fetched))

    def _solve_groups(self, noise, y, labels: np.ndarray, batch_size: int, steps: int, solver: str, cfg: bool,
                      scale: jax.Array):
        """The fixed strategies' solve (oracle, prior, single): within each batch of `batch_size` rows, the rows
        are grouped by their expert on the host (labels [n] int32, available experts only), and each group is
        solved by its expert alone (`_expert_solve`) in chunks of exactly `min_bucket` rows, the last one padded
        with copies of its last row (dropped). The router is never evaluated and no row is gathered or scattered
        per step. Every chunk has the same shape whatever the batch, so a row's floats depend on its own noise,
        class and expert only: bitwise the same alone, in another batch size or merged with other requests
        (a matmul's rounding can change with the number of rows it is given). noise [n, H, W, C] f32, y [n]
        int32 | [n, *condition_shape] f32 | None, scale f32 scalar or [n]. Returns what `_solve` returns."""
        n, chunk = len(labels), self.min_bucket
        evaluations = len(flow.evaluation_stages(solver, steps))
        launches = []  # (rows of the request [<= chunk], x0 [chunk, ...] on the device)
        # The rows are picked on the host: an eager device gather per chunk costs more host time than a small
        # chunk's solve. The noise comes up once; each chunk goes down as its solve's arguments (the same
        # values, so the same bits).
        with jax.transfer_guard("allow"):
            noise = np.asarray(noise)
            y = None if y is None else np.asarray(jnp.asarray(y))  # the device's dtypes (int32, float32)
            scale = np.asarray(scale, np.float32)
            for start in range(0, n, batch_size):
                stop = min(n, start + batch_size)
                for k in self._present:
                    rows = start + np.flatnonzero(labels[start:stop] == k)
                    for at in range(0, len(rows), chunk):
                        real = rows[at:at + chunk]
                        idx = np.concatenate([real, np.repeat(real[-1:], chunk - len(real))])
                        expert_solve = self._group_fns[self._group_of[k]][2]  # expert k's own function
                        x0 = expert_solve(self.expert_params[k], noise[idx], None if y is None else y[idx],
                                          scale if scale.ndim == 0 else scale[idx], steps=steps,
                                          solver=solver, cfg=cfg, null_label=self.num_classes)
                        launches.append((real, x0))
        fetched = jax.device_get([x0 for _, x0 in launches])  # the one transfer to the host
        x_final = np.empty((n, *self.image_shape), np.float32)
        for (real, _), x0 in zip(launches, fetched):
            x_final[real] = x0[:len(real)]
        ids = np.broadcast_to(np.asarray(labels, np.int32), (steps, n)).copy()
        weights = np.eye(self.num_experts, dtype=np.float32)[ids]
        return x_final, weights, ids, n * evaluations, len(launches) * chunk * evaluations

    def _result(self, x, weights, expert_ids, expert_evals: int, padded_evals: int, strategy: Strategy,
                solver: str, steps: int, seed: int) -> SampleResult:
        """The SampleResult of one request's rows: x [n, ...] f32, weights [steps, n, K], expert ids or None."""
        return SampleResult(
            images=self.codec.preview(x), x=x, weights=weights, expert_ids=expert_ids, strategy=str(strategy),
            solver=solver, steps=steps, seed=seed, expert_evals=expert_evals, padded_evals=padded_evals,
            dispatch="groups" if strategy.fixed else self.resolved_dispatch,
            latents=self.codec.decode(x) if self.codec.latents else None,
            experts=expert_ids[0].copy() if strategy.fixed else None)

    def sample_rows(
        self,
        groups: Sequence[tuple[int, int]],
        strategy: str | Strategy = "top1",
        *,
        steps: int = 50,
        solver: str = "euler",
        labels: Sequence[Any] | None = None,
        y: Sequence[Any] | None = None,
        cfg_scale: float | Sequence[float] | None = None,
        batch_size: int | None = None,
        pad_to: int | None = None,
    ) -> list[SampleResult]:
        """Several requests solved as one merged batch: groups [(seed, n), ...], one per request, rows in group
        order. Row j of group r gets exactly the draws `sample(n, seed=seed)` gives its row j: its initial noise
        (row j of normal(key(seed), (n, H, W, C))), its `prior` expert (fold_in(fold_in(key(seed), 2), j)) and
        its `sample`-strategy keys (fold_in(fold_in(fold_in(key(seed), 1), e), j)). What can differ from the lone
        call is only the rounding of the expert calls it shares with other requests' rows (the module docstring,
        determinism; docs/serving.md has what the tests' run measures).

        labels, y: per group, what `sample` takes for that request (oracle clusters [n]; class labels [n],
        scalar or None; condition embeddings [n, *condition_shape], one row or None); None: None for every group.
        strategy, steps and solver are shared by all groups;
        cfg_scale too when it is a number (or None), else it is one number per group, applied to that group's
        rows (a per-row scale [rows] f32 on the device; a shared one stays a scalar). pad_to: solve at least this many rows, the last row repeated and its copies dropped (a server
        pads merged batches to a few sizes so that few programs compile). Returns one `SampleResult` per group, with its own rows of images, x, weights, expert_ids and
        experts, and its own seed; expert_evals, padded_evals are the merged call's, shared by all groups.
        """
        groups = [(int(seed), int(n)) for seed, n in groups]
        if not groups:
            raise DDMError("sample_rows needs at least one (seed, n) group")
        for name, per_group in (("labels", labels), ("y", y)):
            if per_group is not None and len(per_group) != len(groups):
                raise DDMError(f"sample_rows: {name} has {len(per_group)} entries for {len(groups)} groups")
        per_row = cfg_scale is not None and np.ndim(cfg_scale) > 0
        if per_row and (len(cfg_scale) != len(groups) or any(s is None for s in cfg_scale)):
            raise DDMError(f"sample_rows: cfg_scale needs a number for each of the {len(groups)} groups")
        strategy = self._check_strategy(strategy)
        flow.step_function(solver)
        flow.time_grid(steps)
        clusters, classes, cfg = [], [], False
        for r, (seed, n) in enumerate(groups):
            if n < 1:
                raise DDMError(f"n must be >= 1, got {n}")
            clusters.append(self._check_labels(strategy, None if labels is None else labels[r], n))
            y_r, cfg = self._check_condition(None if y is None else y[r], cfg_scale[r] if per_row else cfg_scale, n)
            classes.append(y_r)
            if strategy.kind == "prior":
                clusters[-1] = self.prior_experts(n, seed=seed, y=y_r)
        total = sum(n for _, n in groups)
        y_all = None if classes[0] is None else np.concatenate(classes)
        labels_all = None if clusters[0] is None else np.concatenate(clusters)
        rows = max(total, 0 if pad_to is None else int(pad_to))
        batch_size = rows if batch_size is None else int(batch_size)
        if batch_size < 1:
            raise DDMError(f"batch_size must be >= 1, got {batch_size}")

        # The draws are made on the device with the same calls as `sample`'s, one request at a time, and merged
        # and padded on the host, so that the merged batch's composition compiles no new program.
        with jax.transfer_guard("allow"):
            noise, route_data = [], []
            for seed, n in groups:
                base = jax.random.key(seed, impl="threefry2x32")
                noise.append(np.asarray(jax.random.normal(base, (n, *self.image_shape), jnp.float32)))
                if strategy.kind == "sample":
                    route_data.append(np.repeat(np.asarray(jax.random.key_data(jax.random.fold_in(base, 1)))[None],
                                                n, axis=0))
            noise = np.concatenate(noise)
            index = np.concatenate([np.arange(n, dtype=np.uint32) for _, n in groups])
            route_data = np.concatenate(route_data) if route_data else None
            row_scale = np.repeat(np.asarray(cfg_scale, np.float32), [n for _, n in groups]) if per_row else None
            if rows > total:  # padding: copies of the last row, solved and dropped
                def pad(a):
                    return None if a is None else np.concatenate([a, np.repeat(a[-1:], rows - total, axis=0)])
                noise, index, route_data = pad(noise), pad(index), pad(route_data)
                y_all, labels_all, row_scale = pad(y_all), pad(labels_all), pad(row_scale)
            scale = jnp.float32(0.0 if cfg_scale is None else cfg_scale) if row_scale is None else []
            inputs = []
            for start in range(0, rows, batch_size):
                stop = min(rows, start + batch_size)
                route = offset = None
                if route_data is not None:
                    route = jax.random.wrap_key_data(jnp.asarray(route_data[start:stop]), impl="threefry2x32")
                    offset = jnp.asarray(index[start:stop])
                else:
                    offset = jnp.uint32(0)
                if row_scale is not None:  # per-row scales: one slice per batch
                    scale.append(jnp.asarray(row_scale[start:stop]))
                inputs.append((jnp.asarray(noise[start:stop]), None if y_all is None else jnp.asarray(y_all[start:stop]),
                               None if labels_all is None else jnp.asarray(labels_all[start:stop]), route, offset))
        if strategy.fixed:  # grouped by expert on the host: no padding rows, and no program per merged size
            if strategy.kind == "single":
                labels_all = np.full(rows, strategy.expert, np.int32)
            solved = self._solve_groups(noise[:total], None if y_all is None else y_all[:total], labels_all[:total],
                                        min(batch_size, total), steps, solver, cfg,
                                        scale if row_scale is None else jnp.asarray(row_scale[:total]))
        else:
            solved = self._solve(inputs, strategy, steps, solver, cfg, scale)
        x_final, weights, expert_ids, expert_evals, padded_evals = solved
        results, start = [], 0
        for seed, n in groups:
            part = slice(start, start + n)
            start += n
            ids = None if expert_ids is None else expert_ids[:, part]
            results.append(self._result(x_final[part].copy(), weights[:, part], ids, expert_evals, padded_evals,
                                        strategy, solver, steps, seed))
        return results
