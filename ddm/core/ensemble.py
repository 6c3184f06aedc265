"""The routed ensemble: K experts plus a router, sampled as one flow.

    u_t(x_t) = sum_k w_k(x_t, t) v_k(x_t, t),   w = route_weights(softmax(router(x_t, t)), strategy)

Dispatch (why it is built this way): with top-1 routing the ensemble should cost about one expert per sample,
not K. Each velocity evaluation therefore
1. runs the router (one jitted call) to get the weights [B, K] on device;
2. brings those weights to the host (the one small transfer of the step; `full`, `oracle` and `single` know
   their selection without looking, so they skip it);
3. for every expert with at least one selected sample, gathers those samples into a bucket padded to a static
   size (powers of two from the bucket floor, capped at the batch), runs the ONE jitted expert function (params
   are an argument, so the same executable serves every expert) and scatter-adds the weighted velocities into
   the accumulator. Padded rows point at index B and are dropped by the scatter, so they never contribute.
   The floor is `min_bucket`, but never more than B / (available experts), the mean selection of top-1: with
   a floor above it, a small batch spread over K experts would run K * floor rows instead of about B (at B=4,
   K=8, min_bucket=8, top-1 ran 4 rows per sample, measured 0.24x the throughput of one expert).
Compiled executables are cached by jax per (batch, bucket) shape (and shared by ensembles with the same
apply functions), so a batch size B costs at most log2(B / floor) + 2 compilations of the expert function,
whatever the routing decisions.

Determinism: for a (seed, request) the output is a pure function of the parameters. The initial noise is
`jax.random.normal(jax.random.key(seed, impl="threefry2x32"), (n, H, W, C))` for the whole request (batching
does not change it); the `sample` strategy draws sample i's expert at evaluation e (= 2*step + stage, stage 1
being Heun's corrector) from key fold_in(fold_in(fold_in(key(seed), 1), e), i), also independent of batching.
Identical requests on the same hardware and software are bitwise identical; different batch sizes can differ
in the last float bits (different bucket shapes).
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
from flax import nnx

from ddm.core import flow
from ddm.core.errors import DDMError
from ddm.core.codec import Codec
from ddm.core.routing import Strategy, parse_strategy, route_weights

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
        single); None otherwise.
    expert_evals: (sample, expert) velocity evaluations the strategy needed (no padding; a CFG pair counts 1).
    padded_evals: rows the experts actually ran, bucket padding included.
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
    latents: np.ndarray | None = None  # float32 [n, H, W, C]: de-normalised latents (latent runs only)


# ---------------------------------------------------------------------------------------------------------
# Jitted pieces. Module-level pure functions; the apply functions are bound with functools.partial so that
# jax sees them as constants, and everything that varies (params, data, expert index) is a traced argument.
# ---------------------------------------------------------------------------------------------------------


def _route(router_apply, router_params, x, t, y, mask, key, offset, *, strategy: Strategy):
    """Router forward + strategy: weights [B, K] float32. Missing experts get logit -inf (probability 0).

    key: the evaluation's key (only for "sample"); sample i of the batch draws with fold_in(key, offset + i).
    """
    logits = router_apply(router_params, x, t, y).astype(jnp.float32)
    logits = jnp.where(mask[None, :], logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    keys = None
    if strategy.kind == "sample":
        index = offset + jnp.arange(x.shape[0], dtype=jnp.uint32)
        keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, index)
    return route_weights(probs, strategy, mask=mask, rng=keys, t=t)


def _expert_contrib(expert_apply, null_label, trace_counter, params, acc, x, t, y, weights, k, idx, cfg_scale, *, cfg):
    """acc [B, ...] + weights[idx, k] * v_k(x[idx]) scattered back to rows idx; returns the new acc.

    idx [bucket] int32: selected rows, padded with B (out of range: the gather clips it, the scatter drops it).
    k: int32 scalar (traced, so one executable serves every expert). cfg (static): classifier-free guidance,
    v = v_uncond + cfg_scale * (v_cond - v_uncond), both halves in one expert call.
    """
    trace_counter[0] += 1  # runs at trace time only: counts compilations for tests and benchmarks
    xb = x.at[idx].get(mode="clip")
    tb = t.at[idx].get(mode="clip")
    yb = None if y is None else y.at[idx].get(mode="clip")
    if cfg:
        n = xb.shape[0]
        v2 = expert_apply(
            params,
            jnp.concatenate([xb, xb]),
            jnp.concatenate([tb, tb]),
            jnp.concatenate([yb, jnp.full_like(yb, null_label)]),
        ).astype(jnp.float32)
        v_cond, v_uncond = v2[:n], v2[n:]
        v = v_uncond + cfg_scale * (v_cond - v_uncond)
    else:
        v = expert_apply(params, xb, tb, yb).astype(jnp.float32)
    w = weights.at[idx, k].get(mode="clip")
    return acc.at[idx].add(w.reshape((-1,) + (1,) * (v.ndim - 1)) * v, mode="drop")


@functools.lru_cache(maxsize=16)
def _jitted_contrib(expert_apply: ExpertApply, null_label: int) -> tuple[Callable, list[int]]:
    """The jitted `_expert_contrib` for one expert function, and its trace counter.

    Cached per (expert_apply, null_label) so that ensembles built over the same architecture (e.g. one per
    strategy being evaluated) share compiled executables. Bounded, because a loader may build a fresh closure
    per call, which would otherwise pin every old one in memory.
    """
    counter = [0]
    fn = jax.jit(
        functools.partial(_expert_contrib, expert_apply, null_label, counter),
        static_argnames=("cfg",),
        donate_argnames=("acc",),
    )
    return fn, counter


@functools.lru_cache(maxsize=16)
def _jitted_route(router_apply: RouterApply) -> Callable:
    """The jitted `_route` for one router function (strategy static), cached like `_jitted_contrib`."""
    return jax.jit(functools.partial(_route, router_apply), static_argnames=("strategy",))


# route_weights for the router-free strategies (oracle, single), jitted so a request costs one compile, not one
# per eager op.
_route_weights_jit = jax.jit(route_weights, static_argnames=("strategy",))


def _bucket_size(count: int, batch: int, min_bucket: int) -> int:
    """The static bucket for `count` selected rows of a batch of `batch`: next power of two >= max(count,
    min_bucket), capped at `batch` (so a bucket never exceeds the batch, and a full selection costs no padding)."""
    if count >= batch:
        return batch
    return min(batch, max(min_bucket, 1 << (count - 1).bit_length()))


class Ensemble:
    """K experts sharing one architecture (one `expert_apply`, K param trees) and a router.

    expert_apply(params, x [b, H, W, C] f32, t [b] f32, y [b] int32 | None) -> v [b, H, W, C].
    expert_params: list of K param trees; None for a missing expert.
    router_apply(router_params, x, t, y) -> logits [b, K]. May be None (then only oracle/single work).
    image_shape: (H, W, C). num_classes: 0 for unconditional models; otherwise labels are 0..num_classes-1 and
        num_classes is the null label used for unconditional / CFG evaluations.
    available: which experts to use (default: those whose params are not None). Missing experts are masked
        out of routing (the posterior is renormalised over the rest) with a warning.
    min_bucket: the smallest dispatch bucket (bounds recompiles for tiny selections); batches smaller than
        min_bucket * (available experts) use B / (available experts) instead (see the module docstring).

    All params are used as given (device placement included), so a loader only has to restore K param trees
    and the router's and call this constructor.
    """

    def __init__(
        self,
        expert_apply: ExpertApply,
        expert_params: Sequence[Any],
        router_apply: RouterApply | None,
        router_params: Any,
        *,
        image_shape: tuple[int, int, int],
        num_classes: int = 0,
        available: Sequence[bool] | None = None,
        min_bucket: int = 8,
        codec: Codec = Codec(),
    ):
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
        if min_bucket < 1:
            raise DDMError(f"min_bucket must be >= 1, got {min_bucket}")

        self.expert_apply = expert_apply
        self.expert_params = expert_params
        self.router_apply = router_apply
        self.router_params = router_params
        self.image_shape = tuple(int(s) for s in image_shape)
        self.num_classes = int(num_classes)
        self.num_experts = num
        self.available = available
        self.min_bucket = int(min_bucket)
        self.codec = codec
        self._mask = jnp.asarray(available, bool)
        self._route_fn = None if router_apply is None else _jitted_route(router_apply)
        self._contrib_fn, self._trace_counter = _jitted_contrib(expert_apply, self.num_classes)

    def replace(self, **changes: Any) -> Ensemble:
        """A copy with some constructor arguments changed (e.g. `expert_params`, `router_params`); the rest,
        availability included, are this ensemble's, and compiled functions are shared."""
        current = {"expert_apply": self.expert_apply, "expert_params": self.expert_params,
                   "router_apply": self.router_apply, "router_params": self.router_params,
                   "image_shape": self.image_shape, "num_classes": self.num_classes,
                   "available": self.available, "min_bucket": self.min_bucket, "codec": self.codec}
        unknown = sorted(set(changes) - set(current))
        if unknown:
            raise DDMError(f"Ensemble.replace: unknown field {unknown[0]!r} (known: {', '.join(current)})")
        merged = {**current, **changes}
        return Ensemble(merged.pop("expert_apply"), merged.pop("expert_params"), merged.pop("router_apply"),
                        merged.pop("router_params"), **merged)

    @property
    def expert_traces(self) -> int:
        """How many times the shared expert function was traced (one per (batch, bucket, cfg) shape); shared
        by every ensemble with the same `expert_apply`."""
        return self._trace_counter[0]

    # -----------------------------------------------------------------------------------------------------
    # Request validation (host side, before anything runs).
    # -----------------------------------------------------------------------------------------------------

    def _check_strategy(self, strategy: str | Strategy) -> Strategy:
        strategy = parse_strategy(strategy)
        if strategy.needs_router and self._route_fn is None:
            raise DDMError(f"routing strategy {strategy} needs a router, and this ensemble has none")
        if strategy.kind == "single":
            if strategy.expert >= self.num_experts:
                raise DDMError(f"strategy {strategy}: there are only {self.num_experts} experts")
            if not self.available[strategy.expert]:
                raise DDMError(f"strategy {strategy}: expert {strategy.expert} is missing")
        return strategy

    def _check_labels(self, strategy: Strategy, labels: Any, n: int) -> np.ndarray | None:
        """Oracle cluster labels [n] int32 (required for oracle, ignored otherwise)."""
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
        """Class labels [n] int32 (null label where the request is unconditional) and whether CFG is on."""
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

    # -----------------------------------------------------------------------------------------------------
    # One velocity evaluation.
    # -----------------------------------------------------------------------------------------------------

    def _evaluate(
        self,
        x: jax.Array,
        t: jax.Array,
        y: jax.Array | None,
        strategy: Strategy,
        *,
        key: jax.Array | None,
        offset: int,
        fixed: tuple[jax.Array, np.ndarray] | None,
        cfg: bool,
        cfg_scale: float,
    ) -> tuple[jax.Array, jax.Array, int, int]:
        """v [B, ...] f32, weights [B, K] f32 (device), real and padded expert rows.

        fixed: (device, host) weights for oracle/single, whose selection does not depend on x.
        """
        batch = x.shape[0]
        if fixed is not None:
            weights, host = fixed
        else:
            weights = self._route_fn(
                self.router_params, x, t, y, self._mask, key, jnp.uint32(offset), strategy=strategy
            )
            # full uses every available expert on every sample: no need to look at the weights.
            host = None if strategy.kind == "full" else np.asarray(weights)  # the one [B, K] transfer
        acc = jnp.zeros(x.shape, jnp.float32)
        scale = jnp.float32(cfg_scale)
        real = padded = 0
        floor = max(1, min(self.min_bucket, batch // sum(self.available)))  # see the module docstring
        for k in range(self.num_experts):
            if not self.available[k]:
                continue
            if host is None:
                rows = np.arange(batch, dtype=np.int32)
            else:
                rows = np.flatnonzero(host[:, k] > 0).astype(np.int32)
                if rows.size == 0:
                    continue
            size = _bucket_size(rows.size, batch, floor)
            idx = np.full((size,), batch, np.int32)
            idx[: rows.size] = rows
            acc = self._contrib_fn(
                self.expert_params[k], acc, x, t, y, weights, jnp.int32(k), idx, scale, cfg=cfg
            )
            real += rows.size
            padded += size
        return acc, weights, real, padded

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
        y [B] (or scalar): class labels of a conditional ensemble (None: the null label). cfg_scale: guidance.
        """
        strategy = self._check_strategy(strategy)
        x = jnp.asarray(x_t, jnp.float32)
        if x.ndim != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise DDMError(f"x_t must have shape [B, {', '.join(map(str, self.image_shape))}], got {x.shape}")
        batch = x.shape[0]
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (batch,))
        if strategy.kind == "sample" and rng is None:
            raise DDMError("routing strategy 'sample' needs an rng key")
        labels = self._check_labels(strategy, labels, batch)
        y_host, cfg = self._check_condition(y, cfg_scale, batch)
        fixed = self._fixed_weights(strategy, labels, batch)
        v, weights, _, _ = self._evaluate(
            x,
            t,
            None if y_host is None else jnp.asarray(y_host),
            strategy,
            key=rng,
            offset=0,
            fixed=fixed,
            cfg=cfg,
            cfg_scale=0.0 if cfg_scale is None else float(cfg_scale),
        )
        return v, weights

    def _fixed_weights(self, strategy: Strategy, labels: np.ndarray | None, n: int):
        """(device, host) weights [n, K] for strategies that ignore the router (oracle, single), else None."""
        if strategy.needs_router:
            return None
        uniform = np.full((n, self.num_experts), 1.0 / self.num_experts, np.float32)
        weights = _route_weights_jit(uniform, strategy=strategy, mask=self._mask, labels=labels)
        return weights, np.asarray(weights)  # independent of x: no wait on pending work

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

        labels [n]: oracle clusters. y [n] or scalar: class labels (conditional ensembles). batch_size: samples
        integrated together (default: all n); it changes memory and speed, not the noise or routing draws.
        """
        if n < 1:
            raise DDMError(f"n must be >= 1, got {n}")
        strategy = self._check_strategy(strategy)
        step = flow.step_function(solver)
        ts = flow.time_grid(steps)
        labels = self._check_labels(strategy, labels, n)
        y_all, cfg = self._check_condition(y, cfg_scale, n)
        batch_size = n if batch_size is None else int(batch_size)
        if batch_size < 1:
            raise DDMError(f"batch_size must be >= 1, got {batch_size}")

        base = jax.random.key(seed, impl="threefry2x32")
        noise = jax.random.normal(base, (n, *self.image_shape), jnp.float32)
        route_base = jax.random.fold_in(base, 1)
        scale = 0.0 if cfg_scale is None else float(cfg_scale)

        finals, step_weights = [], []  # per batch: x [b, ...]; list over steps of weights [b, K]
        real = padded = 0
        for start in range(0, n, batch_size):
            stop = min(n, start + batch_size)
            x = noise[start:stop]
            yb = None if y_all is None else jnp.asarray(y_all[start:stop])
            fixed = self._fixed_weights(strategy, None if labels is None else labels[start:stop], stop - start)
            batch_weights = []
            for i in range(steps):
                stage = [0]

                def velocity(x_s, t_s, i=i, stage=stage):
                    nonlocal real, padded
                    key = jax.random.fold_in(route_base, 2 * i + stage[0]) if strategy.kind == "sample" else None
                    v, w, r, p = self._evaluate(
                        x_s, t_s, yb, strategy, key=key, offset=start, fixed=fixed, cfg=cfg, cfg_scale=scale
                    )
                    if stage[0] == 0:
                        batch_weights.append(w)
                    stage[0] += 1
                    real += r
                    padded += p
                    return v

                x = step(velocity, x, float(ts[i]), float(ts[i + 1]))
            finals.append(x)
            step_weights.append(batch_weights)

        x_final = np.asarray(jnp.concatenate(finals), np.float32)
        weights = np.concatenate([np.stack(jax.device_get(ws)) for ws in step_weights], axis=1).astype(np.float32)
        expert_ids = np.argmax(weights, axis=-1).astype(np.int32) if strategy.one_hot else None
        return SampleResult(
            images=self.codec.preview(x_final),
            x=x_final,
            weights=weights,
            expert_ids=expert_ids,
            strategy=str(strategy),
            solver=solver,
            steps=steps,
            seed=seed,
            expert_evals=real,
            padded_evals=padded,
            latents=self.codec.decode(x_final) if self.codec.latents else None,
        )


def model_apply(model: nnx.Module, *, labels: bool = True) -> tuple[Callable, Any]:
    """A pure apply function and the state of an NNX model, in the form `Ensemble` takes.

    Returns (apply(state, x [b, H, W, C], t [b], y [b] | None) -> output, state). labels=False drops y (for a
    model without a class input).
    """
    graphdef, state = nnx.split(model)

    if labels:
        def apply(state, x, t, y):
            return nnx.merge(graphdef, state)(x, t, y)
    else:
        def apply(state, x, t, y):
            return nnx.merge(graphdef, state)(x, t)

    return apply, state
