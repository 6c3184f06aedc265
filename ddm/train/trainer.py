"""The one training loop, shared by experts, the router and the monolith.

A job is a `Task` (which model, which loss, which data, where to write) plus a `TrainConfig`. The loop:

    setup       mesh, abstract state -> shardings, init straight into shards (no unsharded copy)
    resume      latest intact orbax checkpoint if any (verified against its digest; onto the current mesh,
                any device count)
    loop        batch = reader(step) -> train_step (jit, donated state) -> log / checkpoint
                (log steps also evaluate the held-out set and feed the metrics writers; `ddm.train.monitor`)
    finish      final EMA params saved standalone, their SHA-256 returned for the manifest

Everything random is a pure function of (seed, step): `fold_in(key, step)` for noise, the reader's
permutation for data. So a run killed at any moment and resumed from its last checkpoint reproduces, bitwise
on the same devices, the run that was never interrupted, and `advance` replays any stretch of a run from its
state at the stretch's first step. With an `AuditPolicy` the loop also records the audit chain (the state's
digest every few steps, some of the states themselves: `ddm.train.checkpoint`), carried in checkpoint metadata
across resumes and written to `audit/` at the end.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from ddm.core import mesh as mesh_lib
from ddm.core.codec import Codec
from ddm.core.config import TrainConfig
from ddm.core.errors import DDMError
from ddm.core.hashing import pytree_sha256
from ddm.train.checkpoint import (
    AuditPolicy,
    Checkpointer,
    abstract_with_shardings,
    chain_steps,
    kept_entries,
    save_params,
    save_state,
    state_path,
    write_chain,
)
from ddm.train.monitor import HeldOut, Monitor, Sampler
from ddm.train.plots import plot_loss_curve
from ddm.train.preemption import Preempted, StopRequest

logger = logging.getLogger(__name__)

# loss(model, images [B,H,W,C] float32 in [-1,1], clusters [B] int32, classes, rng)
#   -> (scalar loss, dict of scalars). clusters: the row's cluster id (the router's target); classes: its class
#   label, int32 [B] (-1 for unlabelled data), or on a run with condition embeddings its embedding, float16 /
#   float32 [B, *condition_shape]. The trainer treats every batch element alike: split along the batch axis.
LossFn = Callable[[nnx.Module, jax.Array, jax.Array, jax.Array, jax.Array], tuple[jax.Array, dict]]


class BatchReader(Protocol):
    """What the trainer reads batches from (`ddm.data.shards.ShardReader` is the implementation). A reader may
    also have `close()`, which the trainer calls when it stops (e.g. to end a prefetch thread)."""

    num_images: int
    seed: int
    process_index: int
    image_shape: tuple[int, int, int]

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """This process's rows of step's global batch: (images [B/P, H, W, C] uint8, clusters [B/P] int32,
        classes [B/P] int32 or condition embeddings [B/P, *condition_shape] float). A pure function of (seed,
        step): that is what makes resume exact."""

    def position(self, step: int) -> Any:
        """Where the stream is at `step` (an object with `epoch` and `offset`), stored in checkpoints."""


@dataclasses.dataclass(frozen=True)
class Task:
    """What distinguishes one training job from another."""

    name: str  # for messages, e.g. "expert 3"
    make_model: Callable[[nnx.Rngs], nnx.Module]
    loss: LossFn
    reader: BatchReader
    out_dir: Path
    meta: dict  # resolved config etc., stored beside every checkpoint
    holdout: HeldOut | None = None  # held-out images of the job's own data: loss at every log step
    sample: Sampler | None = None  # how the EMA model draws the grid every `train.sample_every` steps
    codec: Codec = Codec()  # how the model sees the reader's stored rows (images or latents)


class NonFiniteError(DDMError):
    """Loss or gradients became NaN/Inf; the last good checkpoint is left in place."""


# ---------------------------------------------------------------------------------------------------------
# Pure pieces: optimizer, state, step.
# ---------------------------------------------------------------------------------------------------------


def learning_rate(cfg: TrainConfig) -> optax.Schedule:
    warmup = min(cfg.warmup_steps, cfg.steps)
    if cfg.schedule == "constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, cfg.lr, max(warmup, 1)), optax.constant_schedule(cfg.lr)], [warmup])
    return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup, max(cfg.steps, warmup + 1), end_value=0.0)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    adamw = optax.adamw(learning_rate(cfg), b1=0.9, b2=0.99, weight_decay=cfg.weight_decay)
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw) if cfg.grad_clip > 0 else adamw


def init_state(make_model, tx: optax.GradientTransformation, seed: int) -> dict:
    """The full training state as a pytree of arrays (traceable: used under eval_shape and jit)."""
    key = jax.random.key(seed)
    model = make_model(nnx.Rngs(params=jax.random.fold_in(key, 0)))
    params = nnx.state(model, nnx.Param)
    return {
        "params": params,
        # Non-trainable model variables (buffers), carried unchanged so the model can be rebuilt from state.
        "rest": nnx.state(model, nnx.Not(nnx.Param)),
        "ema": jax.tree.map(jnp.copy, params),
        "opt": tx.init(params),
        "step": jnp.zeros((), jnp.int32),
        "rng": jax.random.key_data(jax.random.fold_in(key, 1)),
        # (step, loss, grad norm, param norm) of the first non-finite step; step -1 while all is well.
        "bad": jnp.array([-1.0, 0.0, 0.0, 0.0], jnp.float32),
    }


def loss_and_grads(graphdef, loss: LossFn, params, rest, x, clusters, classes, rng, accum: int = 1):
    """(loss, aux), grads of `loss` on one batch, averaged over `accum` micro-batches.

    x: [B, ...] float32, clusters: [B] int32, classes: [B, ...] (see `LossFn`). With accum = N, micro-batch i
    is rows i, i + N, i + 2N, ... (a strided view keeps each device's rows on that device: the batch axis stays
    sharded as it came), its noise drawn from fold_in(rng, i), and the N gradients, losses and aux values are
    averaged: for a loss that is a mean over rows this is the gradient of the whole batch, holding one
    micro-batch's activations.
    accum = 1 is the plain step, bit for bit.
    """

    def objective(p, x, clusters, classes, rng):
        return loss(nnx.merge(graphdef, p, rest), x, clusters, classes, rng)

    grad_fn = jax.value_and_grad(objective, has_aux=True)
    if accum == 1:
        return grad_fn(params, x, clusters, classes, rng)

    def micro(i, a):  # micro-batch i of a [B, ...] array: rows i::accum
        a = a.reshape(a.shape[0] // accum, accum, *a.shape[1:])
        return jax.lax.dynamic_index_in_dim(a, i, axis=1, keepdims=False)

    def body(i, carry):
        (loss_sum, aux_sum), grad_sum = carry
        (value, aux), grads = grad_fn(params, micro(i, x), micro(i, clusters), micro(i, classes),
                                      jax.random.fold_in(rng, i))
        return ((loss_sum + value, jax.tree.map(jnp.add, aux_sum, aux)), jax.tree.map(jnp.add, grad_sum, grads))

    shapes = jax.eval_shape(grad_fn, params, micro(0, x), micro(0, clusters), micro(0, classes), rng)
    zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    total = jax.lax.fori_loop(0, accum, body, zero)
    return jax.tree.map(lambda a: a / accum, total)


def ema_decay_at(decay: float, step: jax.Array, warmup: bool) -> jax.Array | float:
    """The EMA decay of the update made at `step` (int32 scalar, 0 for the first update).

    warmup False: `decay` itself. warmup True: min(decay, (1 + step) / (10 + step)), diffusers' EMAModel
    warmup: 0.1 at the first update, so the average soon forgets the random initial weights instead of
    carrying them for ~1 / (1 - decay) steps. A float32 scalar, a function of the step alone (resumes exactly).
    """
    if not warmup:
        return decay
    step = step.astype(jnp.float32)
    return jnp.minimum(jnp.float32(decay), (1.0 + step) / (10.0 + step))


def train_step(graphdef, loss: LossFn, tx, ema_decay: float, state: dict, images, clusters, classes, *,
               accum: int = 1, codec: Codec = Codec(), ema_warmup: bool = True):
    """One optimisation step. images: [B, H, W, C] stored rows (uint8 images or float latents, which `codec`
    maps to model space), clusters [B] int32, classes [B, ...] (see `LossFn`); accum: micro-batches the batch is
    split into (`loss_and_grads`); ema_warmup: the EMA decay follows `ema_decay_at`. Returns (state, metrics).

    A non-finite loss or gradient leaves params/optimizer untouched and records the step in `state["bad"]`,
    so the host can stop with the last good state still intact.
    """
    rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    x = codec.encode(images)
    (loss_value, aux), grads = loss_and_grads(graphdef, loss, state["params"], state["rest"], x, clusters, classes,
                                              rng, accum)
    updates, opt = tx.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    decay = ema_decay_at(ema_decay, state["step"], ema_warmup)
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state["ema"], params)
    grad_norm, param_norm = optax.tree.norm(grads), optax.tree.norm(state["params"])
    # Finite loss and gradients can still overflow the parameters (a huge learning rate): check them too,
    # element-wise, since a global norm overflows float32 long before the parameters themselves do.
    params_finite = jnp.stack([jnp.isfinite(p).all() for p in jax.tree.leaves(params)]).all()
    ok = jnp.isfinite(loss_value) & jnp.isfinite(grad_norm) & params_finite & (state["bad"][0] < 0)

    def keep_if_ok(new, old):
        return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)

    first_bad = (state["bad"][0] < 0) & ~ok
    new_state = {
        "params": keep_if_ok(params, state["params"]),
        "ema": keep_if_ok(ema, state["ema"]),
        "opt": keep_if_ok(opt, state["opt"]),
        "rest": state["rest"],
        "step": state["step"] + 1,
        "rng": state["rng"],
        "bad": jnp.where(first_bad, jnp.stack([state["step"].astype(jnp.float32), loss_value, grad_norm,
                                               param_norm]), state["bad"]),
    }
    metrics = {"loss": loss_value, "grad_norm": grad_norm, "param_norm": param_norm,
               "update_norm": optax.tree.norm(updates), **aux}
    return new_state, metrics


# ---------------------------------------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainResult:
    step: int
    ema_sha256: str
    final_path: Path
    metrics_path: Path
    resumed_from: int | None
    audit: dict | None = None  # the audit chain's summary for expert.json (`write_chain`); None without one


class Trainer:
    """Builds the sharded state for a `Task` and runs it to `cfg.steps`, resuming if a checkpoint exists."""

    def __init__(self, task: Task, cfg: TrainConfig, *, progress: bool = False, audit: AuditPolicy | None = None):
        self.task, self.cfg, self.progress, self.audit = task, cfg, progress, audit
        self._chain: list[str] | None = None  # the audit chain's digests so far (None: not recorded)
        if audit is not None:
            self._every = audit.every(cfg.steps)
            self._chain_at = {step: i for i, step in enumerate(chain_steps(cfg.steps, self._every))}
            self._kept = set(kept_entries(len(self._chain_at), audit.keep))
        self.mesh = mesh_lib.make_mesh(cfg.mesh_data, cfg.mesh_fsdp)
        mesh_lib.check_batch(cfg.batch_size, self.mesh)
        self.tx = make_optimizer(cfg)
        abstract_model = nnx.eval_shape(lambda: task.make_model(nnx.Rngs(params=0)))
        self.graphdef = nnx.graphdef(abstract_model)
        self.num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract_model, nnx.Param)))
        make_state = functools.partial(init_state, task.make_model, self.tx, cfg.seed)
        abstract = jax.eval_shape(make_state)
        self.shardings = mesh_lib.state_shardings(abstract, self.mesh)
        self.abstract = abstract_with_shardings(abstract, self.shardings)
        self._init = jax.jit(make_state, out_shardings=self.shardings)
        self.batch_sharding = mesh_lib.batch_sharding(self.mesh)
        _check_process_rows(task.reader, self.batch_sharding, cfg.batch_size)
        self._lr = jax.jit(learning_rate(cfg))  # host-side, for the log; one compile instead of one per op
        mesh_lib.check_batch(cfg.batch_size // cfg.grad_accum, self.mesh)  # each micro-batch splits evenly too
        step_fn = functools.partial(train_step, self.graphdef, task.loss, self.tx, cfg.ema_decay,
                                    accum=cfg.grad_accum, codec=task.codec, ema_warmup=cfg.ema_warmup)
        self._step = jax.jit(step_fn, donate_argnums=0,
                             in_shardings=(self.shardings, self.batch_sharding, self.batch_sharding,
                                           self.batch_sharding),
                             out_shardings=(self.shardings, mesh_lib.replicated(self.mesh)))
        self.monitor = Monitor(name=task.name, cfg=cfg, out_dir=task.out_dir, graphdef=self.graphdef, loss=task.loss,
                               shardings=self.shardings, mesh=self.mesh, batch_sharding=self.batch_sharding,
                               holdout=task.holdout, sampler=task.sample,
                               image_shape=getattr(task.reader, "image_shape", None),
                               config=task.meta.get("config"), writes=jax.process_index() == 0, codec=task.codec)

    def _global_batch(self, step: int) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(images, clusters, classes) of `step` as global arrays, each process contributing its rows."""
        return tuple(jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(part))
                     for part in self.task.reader.batch(step))

    def _meta(self, step: int) -> dict:
        pos = self.task.reader.position(step)
        meta = {**self.task.meta, "step": step, "reader": {"epoch": pos.epoch, "offset": pos.offset,
                                                          "seed": self.task.reader.seed}}
        if self._chain is not None:
            meta["audit_chain"] = {"every": self._every, "digests": list(self._chain)}
        return meta

    def _resume_chain(self, meta: dict | None, start: int) -> list[str] | None:
        """The chain's digests up to step `start` from the restored checkpoint's metadata ([] for a fresh run);
        None (with a warning) when the checkpoint has no chain that fits this run."""
        if meta is None:
            return []
        chain = meta.get("audit_chain")
        expected = sum(1 for step in self._chain_at if step <= start)
        if (not isinstance(chain, dict) or chain.get("every") != self._every
                or not isinstance(chain.get("digests"), list) or len(chain["digests"]) != expected):
            logger.warning(f"{self.task.name}: the checkpoint of step {start} carries no audit chain for this run: "
                           "training goes on without one (expert.json will have no audit field)")
            return None
        return list(chain["digests"])

    def _record_chain(self, step: int, state: dict) -> None:
        """Appends the digest of the state at chain step `step`; at a kept entry also writes the state itself."""
        host = _to_host(state)
        self._chain.append(pytree_sha256(host))
        if len(self._chain) - 1 in self._kept and jax.process_index() == 0:
            path = state_path(self.task.out_dir, step)
            path.parent.mkdir(parents=True, exist_ok=True)
            save_state(path, host)

    def initial_state(self) -> dict:
        """The state at step 0, created in its shards (what a fresh run starts from)."""
        with jax.set_mesh(self.mesh):
            return self._init()

    def advance(self, state: dict, start: int, stop: int) -> dict:
        """The state at step `stop`, from `state` at step `start`: steps start..stop-1 as the loop runs them (the
        same batches and compiled step), without logs, checkpoints or the chain. `state` is donated."""
        previous = None
        with jax.set_mesh(self.mesh):
            for step in range(start, stop):
                state, metrics = self._step(state, *self._global_batch(step))
                if previous is not None:  # the loop's bounded dispatch queue
                    previous.block_until_ready()
                previous = metrics["loss"]
        return state

    def _check_finite(self, state: dict) -> None:
        bad = np.asarray(jax.device_get(state["bad"]))
        if bad[0] >= 0:
            raise NonFiniteError(
                f"{self.task.name}: non-finite loss or gradient at step {int(bad[0])} (loss={bad[1]:.4g}, "
                f"grad_norm={bad[2]:.4g}, param_norm={bad[3]:.4g}); last good checkpoint kept")

    def run(self) -> TrainResult:
        """Trains to `cfg.steps`; `Preempted` if SIGTERM / SIGINT arrived first (after checkpointing)."""
        with StopRequest() as stop:  # from here on a signal stops at a step boundary instead of killing
            return self._run(stop)

    def _run(self, stop: StopRequest) -> TrainResult:
        cfg, task = self.cfg, self.task
        task.out_dir.mkdir(parents=True, exist_ok=True)
        checkpointer = Checkpointer(task.out_dir / "checkpoints", keep=cfg.keep_checkpoints, every=cfg.checkpoint_every)
        metrics_path = task.out_dir / "metrics.jsonl"
        try:
            restored = checkpointer.restore_latest(self.abstract, task.name)  # verified against its digest
        except DDMError:
            checkpointer.close()
            raise
        resumed_from = None if restored is None else restored[2]
        if restored is not None:
            state = restored[0]
            logger.info(f"{task.name}: resumed from step {resumed_from}")
        else:
            with jax.set_mesh(self.mesh):
                state = self._init()
        start = int(jax.device_get(state["step"]))
        if self.audit is not None:
            self._chain = self._resume_chain(None if restored is None else restored[1], start)
            if restored is None:
                self._record_chain(0, state)
        if jax.process_index() == 0:
            _truncate_metrics(metrics_path, start)
        logger.info(f"{task.name}: {self.num_params:,} parameters, {task.reader.num_images} images, "
                 f"mesh {dict(self.mesh.shape)}, batch {cfg.batch_size}, steps {start}->{cfg.steps}")
        try:
            self.monitor.open(start)
            state, done = self._loop(state, start, checkpointer, metrics_path, stop)
            self._check_finite(state)
            if done < cfg.steps:  # preempted: checkpoint where the loop stopped, then say so
                if checkpointer.latest_step() != done:
                    checkpointer.save(done, state, self._meta(done), force=True)
            elif start < cfg.steps or checkpointer.latest_step() != cfg.steps:
                checkpointer.save(cfg.steps, state, self._meta(cfg.steps), force=True)
        finally:
            checkpointer.close()
            self.monitor.close()
            if callable(close_reader := getattr(task.reader, "close", None)):
                close_reader()  # its prefetch thread, if any
        if done < cfg.steps:
            raise Preempted(task.name, done, stop.signame)
        final_path = task.out_dir / "final"
        final = final_params(state)
        save_params(final_path, final)
        ema_sha = pytree_sha256(_to_host(final))
        audit = None
        if self._chain is not None and jax.process_index() == 0:
            audit = write_chain(task.out_dir, cfg.steps, self._every, self.audit.keep, self._chain)
        if jax.process_index() == 0:
            plot_loss_curve(read_metrics(metrics_path), task.out_dir / "loss.png", title=task.name)
        return TrainResult(cfg.steps, ema_sha, final_path, metrics_path, resumed_from, audit)

    def _loop(self, state: dict, start: int, checkpointer: Checkpointer, metrics_path: Path,
              stop: StopRequest) -> tuple[dict, int]:
        """Steps start..cfg.steps; returns (state, steps done), fewer than cfg.steps when `stop` was signalled."""
        cfg = self.cfg
        done = start
        bar = _progress_bar(start, cfg.steps, self.task.name) if self.progress and jax.process_index() == 0 else None
        t_last, step_last = time.perf_counter(), start
        previous_loss = None
        with jax.set_mesh(self.mesh):
            for step in range(start, cfg.steps):
                state, metrics = self._step(state, *self._global_batch(step))
                # Bound the dispatch queue to two steps: wait for step s-1 while step s is queued, so the device
                # never idles, but hundreds of queued multi-device programs never pile up. Unbounded queues of
                # tiny steps deadlock XLA:CPU's collectives (a rendezvous timeout abort with 8 fake devices).
                if previous_loss is not None:
                    previous_loss.block_until_ready()
                previous_loss = metrics["loss"]
                done = step + 1
                if self._chain is not None and done in self._chain_at:  # before a checkpoint of `done` saves it
                    self._record_chain(done, state)
                if bar is not None:
                    bar.update(1)
                if done % cfg.log_every == 0 or done == cfg.steps:
                    self._check_finite(state)
                    now = time.perf_counter()
                    rate = (done - step_last) * cfg.batch_size / max(now - t_last, 1e-9)
                    eta = (cfg.steps - done) * cfg.batch_size / max(rate, 1e-9)
                    row = {"step": done, **{k: float(v) for k, v in jax.device_get(metrics).items()},
                           "lr": float(self._lr(step)), "images_per_s": rate, "time": time.time()}
                    row.update(self.monitor.holdout(state))
                    if jax.process_index() == 0:
                        with open(metrics_path, "a") as f:
                            f.write(json.dumps(row) + "\n")
                    self.monitor.row(done, row)
                    held_out = f" (held-out {row['holdout_loss']:.4f})" if "holdout_loss" in row else ""
                    message = (f"{self.task.name}: step {done}/{cfg.steps} loss {row['loss']:.4f}{held_out} "
                               f"grad {row['grad_norm']:.3f} {rate:,.0f} img/s eta {eta:,.0f}s")
                    logger.info(message)
                    t_last, step_last = time.perf_counter(), done  # held-out evaluation is not training time
                if self.monitor.sample_due(done):
                    t0 = time.perf_counter()
                    self.monitor.sample(done, state)
                    t_last += time.perf_counter() - t0
                if done % cfg.checkpoint_every == 0 and done < cfg.steps:
                    self._check_finite(state)  # never checkpoint a poisoned state
                    checkpointer.save(done, state, self._meta(done))
                if stop.signame is not None and done < cfg.steps:
                    logger.info(f"{self.task.name}: {stop.signame} at step {done}: checkpointing and stopping")
                    break
        if bar is not None:
            bar.close()
        return state, done


def final_params(state: dict) -> dict:
    """What a finished model ships: EMA weights plus buffers; this tree is what the manifest's SHA-256 pins."""
    return {"ema": state["ema"], "rest": state["rest"]}


def _to_host(tree):
    """Numpy copy of a (possibly multi-host sharded) pytree, identical on every process."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.device_get(tree)


def _progress_bar(start: int, total: int, name: str):
    return tqdm(total=total, initial=start, desc=name, unit="step", file=sys.stderr, dynamic_ncols=True,
                mininterval=1.0, disable=None)


def _check_process_rows(reader, sharding, batch_size: int) -> None:
    """Each process feeds rows [p * B / P, (p + 1) * B / P) of the global batch (what `ShardReader.batch`
    returns); its devices must hold exactly those rows, or the batch would be silently permuted."""
    rows = sorted({i for idx in sharding.addressable_devices_indices_map((batch_size,)).values()
                   for i in range(*idx[0].indices(batch_size))})
    local = batch_size // jax.process_count()
    lo = getattr(reader, "process_index", jax.process_index()) * local
    if rows != list(range(lo, lo + local)):
        raise DDMError(f"process {jax.process_index()} holds batch rows {rows[:1]}..{rows[-1:]} but reads "
                       f"[{lo}, {lo + local}): the mesh is not process-major")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drops metric rows past `step` (logged after the checkpoint we resume from), so the curve has no repeats.

    A process killed while appending may leave a torn last line; it is dropped too.
    """
    if not path.exists():
        return
    text = path.read_text()
    rows = text.splitlines()
    kept = []
    for line in rows:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and row.get("step", 0) <= step:
            kept.append(line)
    if len(kept) != len(rows) or not text.endswith("\n"):  # a complete row without its newline: add it
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
