"""Island jobs: one flow-matching DiT expert on one cluster shard, or the monolith on all of them.

Both are the shared `Trainer` with a DiT and the flow-matching loss; they differ only in which shards the
reader sees and where the results go (`RUN_DIR/experts/k/` or `RUN_DIR/monolith/`). On labelled data both are
class-conditional: the DiT sees each image's class, replaced by the null label with probability
`expert.train.class_dropout`, so one network learns the conditional and the unconditional flow that
classifier-free guidance combines.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path

import jax
from flax import nnx

from ddm.core.config import Config, ModelConfig, to_dict
from ddm.core.dit import dit_from_config
from ddm.core.flow import drop_labels, flow_matching_loss, solve_euler_loop
from ddm.core.monitor import HeldOut
from ddm.core.trainer import Task, Trainer, TrainResult
from ddm.data.run import Run
from ddm.data.shards import ShardReader, check_labelled

logger = logging.getLogger(__name__)


def flow_loss(t_sampling: str, class_dropout: float, num_classes: int, model: nnx.Module, x: jax.Array,
              clusters: jax.Array, classes: jax.Array, rng: jax.Array):
    """Flow-matching loss of a DiT. x: [B, H, W, C] float32 in [-1, 1]; classes: [B] int32 class labels.

    num_classes 0: unconditional (classes unused). Otherwise each label becomes the null label `num_classes`
    with probability `class_dropout`, drawn from a key of its own, so the noise draws are those of an
    unconditional run.
    """
    if num_classes == 0:
        return flow_matching_loss(lambda x_t, t: model(x_t, t), x, rng, t_sampling), {}
    y = drop_labels(jax.random.fold_in(rng, 1), classes, class_dropout, num_classes)
    return flow_matching_loss(lambda x_t, t: model(x_t, t, y), x, rng, t_sampling), {}


def draw_grid(steps: int, model: nnx.Module, noise: jax.Array) -> jax.Array:
    """The grid drawn while training: `steps` Euler steps from noise [n, H, W, C] float32 -> [n, H, W, C]
    (a class-conditional model draws unguided, with the null label)."""
    return solve_euler_loop(lambda x_t, t: model(x_t, t), noise, steps)


def make_dit(model_cfg: ModelConfig, image_shape: tuple[int, int, int], rngs: nnx.Rngs) -> nnx.Module:
    """The expert (and monolith) network; a seam tests replace with a smaller model."""
    return dit_from_config(model_cfg, image_shape, rngs)


def _reader(paths: list[str], cluster_ids: list[int], cfg: Config) -> ShardReader:
    train = cfg.expert.train
    reader = ShardReader(paths, batch_size=train.batch_size, seed=train.seed, cluster_ids=cluster_ids,
                         process_index=jax.process_index(), process_count=jax.process_count())
    check_labelled(reader, cfg.expert.model.num_classes)
    return reader


def holdout(run: Run, clusters: list[int] | None) -> HeldOut | None:
    """Held-out images of these clusters (all: None) with their cluster and class, as the readers give them."""
    held = run.holdout_set(clusters)
    return None if held is None else HeldOut(*held)


def _diffusion_task(name: str, run: Run, reader: ShardReader, out_dir: Path, clusters: list[int] | None) -> Task:
    cfg = run.config
    train = cfg.expert.train
    return Task(
        name=name,
        make_model=functools.partial(make_dit, cfg.expert.model, run.image_shape),
        loss=functools.partial(flow_loss, train.t_sampling, train.class_dropout, cfg.expert.model.num_classes),
        reader=reader,
        out_dir=out_dir,
        meta={"config": to_dict(cfg), "image_shape": list(run.image_shape)},
        holdout=holdout(run, clusters),
        sample=functools.partial(draw_grid, cfg.expert.train.sample_steps),
        codec=run.codec,
    )


def _record(run: Run, section: str, key, result: TrainResult, seconds: float) -> None:
    if jax.process_index() != 0:
        return
    cfg = run.config
    entry = {"status": "finished", "step": result.step, "sha256": result.ema_sha256,
             "path": run.relative(result.final_path), "seconds": round(seconds, 1),
             "model": to_dict(cfg.expert.model), "train": to_dict(cfg.expert.train)}
    run.record(section, key, entry)


def train_expert(run_dir: str | Path, cluster: int, overrides: list[str] | tuple[str, ...] = (), *,
                 progress: bool = False) -> TrainResult:
    """Trains (or resumes) expert `cluster` of the run and records its EMA SHA-256 in the manifest."""
    run = Run.open(run_dir, overrides)
    reader = _reader([run.shard_path(cluster)], [cluster], run.config)
    task = _diffusion_task(f"expert {cluster}", run, reader, run.expert_dir(cluster), [cluster])
    t0 = time.perf_counter()
    result = Trainer(task, run.config.expert.train, progress=progress).run()
    _record(run, "experts", cluster, result, time.perf_counter() - t0)
    logger.info(f"expert {cluster}: finished at step {result.step}, EMA sha256 {result.ema_sha256[:16]}")
    return result


def train_monolith(run_dir: str | Path, overrides: list[str] | tuple[str, ...] = (), *,
                   progress: bool = False) -> TrainResult:
    """The baseline: the same trainer and model on the union of all shards, under `RUN_DIR/monolith/`."""
    run = Run.open(run_dir, overrides)
    reader = _reader(run.shard_paths(), run.cluster_ids, run.config)
    task = _diffusion_task("monolith", run, reader, run.component_dir("monolith"), None)
    t0 = time.perf_counter()
    result = Trainer(task, run.config.expert.train, progress=progress).run()
    _record(run, "monolith", None, result, time.perf_counter() - t0)
    return result
