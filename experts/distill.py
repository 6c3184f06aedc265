"""Ensemble distillation (the paper's section 4.4): one student DiT regresses the trained ensemble's velocity.

On noisy training samples x_t = (1 - t) x0 + t eps (t drawn as for the experts), the student learns
v_student(x_t, t, y) ~ teacher(x_t, t, cluster of x0, y), with the teacher's velocity as a fixed target (no
gradient flows into it). The teacher is built by the caller (the app layer: `ddm.sampling.teacher`, from the
run's pinned experts and router) and passed in as a pure, jit-able function, so this job imports neither the
router nor the sampling layer. Which teacher (`distill.teacher`):

- "cluster" (the paper's): each sample's target is the velocity of the expert of its own cluster, one expert
  forward per sample;
- "full": the router-weighted sum of every expert, u_t = sum_k p(k | x_t, t, y) v_k (K expert forwards and
  the router per sample), the flow the routed ensemble samples.

The student runs on the shared trainer (resumable like every job), its EMA weights land in RUN/student/final/
and are pinned by SHA-256 in the manifest's `student` entry; `ddm.sampling.load.load_single(run, "student")`
samples it like the monolith.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from ddm.core.config import to_dict
from ddm.core.flow import conditions_of, drop_conditions, noisy_batch
from ddm.data.components import STUDENT
from ddm.data.run import Run
from ddm.data.shards import ShardReader, check_conditioned, check_labelled
from ddm.experts.train import draw_grid, make_dit
from ddm.train.monitor import HeldOut
from ddm.train.trainer import Task, Trainer, TrainResult

logger = logging.getLogger(__name__)

# (x_t [B, H, W, C] float32, t [B] float32, clusters [B] int32, y [B] int32 | float32 [B, *condition_shape] |
# None) -> v [B, H, W, C] float32.
# Pure and jit-able; its parameters are closed over (constants of the compiled step).
Teacher = Callable[[jax.Array, jax.Array, jax.Array, jax.Array | None], jax.Array]


def distill_loss(teacher: Teacher, t_sampling: str, class_dropout: float, num_classes: int, model: nnx.Module,
                 x: jax.Array, clusters: jax.Array, classes: jax.Array, rng: jax.Array, *,
                 condition_shape: tuple[int, ...] = ()):
    """MSE between the student's and the teacher's velocity at the same noisy points.

    x: [B, H, W, C] float32 in [-1, 1]; clusters, classes: [B] int32 (classes: float [B, *condition_shape]
    condition embeddings when `condition_shape` is non-empty). On conditioned data both see the same condition,
    dropped to the null one with probability `class_dropout` (so the student also learns the teacher's
    unconditional flow, which guidance needs). Returns (loss float32 scalar, {}).
    """
    x_t, t, _ = noisy_batch(rng, x, t_sampling)
    y = conditions_of(classes, num_classes, condition_shape)
    if y is not None:
        y = drop_conditions(jax.random.fold_in(rng, 1), y, class_dropout, num_classes)
    target = jax.lax.stop_gradient(teacher(x_t, t, clusters, y).astype(jnp.float32))
    v = (model(x_t, t) if y is None else model(x_t, t, y)).astype(jnp.float32)
    return jnp.mean(jnp.square(v - target)), {}


def train_student(run_dir: str | Path, teacher: Teacher, teacher_kind: str,
                  overrides: list[str] | tuple[str, ...] = (), *, progress: bool = False) -> TrainResult:
    """Trains (or resumes) the student of the run against `teacher` (built as `distill.teacher` = teacher_kind
    says) on every training shard, and pins its EMA weights in the manifest's `student` entry."""
    run = Run.open(run_dir, overrides)
    cfg = run.config
    train, model_cfg = cfg.distill.train, cfg.distill.model
    reader = ShardReader(run.shard_paths(), batch_size=train.batch_size, seed=train.seed,
                         cluster_ids=run.cluster_ids, process_index=jax.process_index(),
                         process_count=jax.process_count(), digests=run.shard_digests(),
                         shuffle_buffer=train.shuffle_buffer, prefetch=train.prefetch)
    check_labelled(reader, model_cfg.num_classes)
    check_conditioned(reader, model_cfg.condition_shape)
    held = run.holdout_set()
    task = Task(
        name=STUDENT.name,
        make_model=functools.partial(make_dit, model_cfg, run.image_shape),
        loss=functools.partial(distill_loss, teacher, train.t_sampling, train.class_dropout, model_cfg.num_classes,
                               condition_shape=tuple(model_cfg.condition_shape or ())),
        reader=reader,
        out_dir=run.component_dir(STUDENT),
        meta={"config": to_dict(cfg), "image_shape": list(run.image_shape), "teacher": teacher_kind},
        holdout=None if held is None else HeldOut(*held),
        sample=functools.partial(draw_grid, train.sample_steps),
        codec=run.codec,
    )
    t0 = time.perf_counter()
    result = Trainer(task, train, progress=progress).run()
    if jax.process_index() == 0:
        run.record(STUDENT.name, None, {"status": "finished", "step": result.step, "sha256": result.ema_sha256,
                                   "path": run.relative(result.final_path),
                                   "seconds": round(time.perf_counter() - t0, 1), "teacher": teacher_kind,
                                   "model": to_dict(model_cfg), "train": to_dict(train)})
    logger.info(f"student ({teacher_kind} teacher): finished at step {result.step}, "
                f"EMA sha256 {result.ema_sha256[:16]}")
    return result
