"""Island jobs: one flow-matching DiT expert on one cluster shard, or the monolith on all of them.

Both are the shared `Trainer` with a DiT and the flow-matching loss; they differ only in which shards the
reader sees and where the results go (`RUN_DIR/experts/k/` or `RUN_DIR/monolith/`).
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Callable

import jax
from flax import nnx

from data import manifest as mf
from data.shards import ShardReader
from ddm.config import Config, ModelConfig, config_from_data, to_dict
from ddm.dit import dit_from_config
from ddm.errors import DDMError
from ddm.flow import flow_matching_loss
from ddm.trainer import Task, Trainer, TrainResult


def run_config(manifest: dict, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The run's stored config with this command's `--set` overrides applied."""
    return config_from_data(manifest["config"], overrides)


def flow_loss(t_sampling: str, model: nnx.Module, x: jax.Array, labels: jax.Array, rng: jax.Array):
    """Flow-matching loss of an unconditional DiT. x: [B, H, W, C] float32 in [-1, 1]."""
    return flow_matching_loss(lambda x_t, t: model(x_t, t), x, rng, t_sampling), {}


def make_dit(model_cfg: ModelConfig, image_shape: tuple[int, int, int], rngs: nnx.Rngs) -> nnx.Module:
    return dit_from_config(model_cfg, image_shape, rngs)


def _reader(paths: list[str], labels: list[int], cfg: Config) -> ShardReader:
    train = cfg.expert.train
    return ShardReader(paths, batch_size=train.batch_size, seed=train.seed, labels=labels,
                       process_index=jax.process_index(), process_count=jax.process_count())


def _diffusion_task(name: str, cfg: Config, manifest: dict, reader: ShardReader, out_dir: Path) -> Task:
    image_shape = tuple(manifest["dataset"]["image_shape"])
    return Task(
        name=name,
        make_model=functools.partial(make_dit, cfg.expert.model, image_shape),
        loss=functools.partial(flow_loss, cfg.expert.train.t_sampling),
        reader=reader,
        out_dir=out_dir,
        meta={"config": to_dict(cfg), "image_shape": list(image_shape)},
    )


def cluster_entry(manifest: dict, cluster: int) -> dict:
    clusters = manifest["clusters"]
    if not 0 <= cluster < len(clusters):
        raise DDMError(f"cluster {cluster} does not exist: the run has clusters 0..{len(clusters) - 1}")
    return clusters[cluster]


def _record(run_dir: Path, section: str, key, result: TrainResult, cfg: Config, seconds: float) -> None:
    if jax.process_index() != 0:
        return
    entry = {"status": "finished", "step": result.step, "sha256": result.ema_sha256,
             "path": str(result.final_path.relative_to(run_dir.absolute())), "seconds": round(seconds, 1),
             "model": to_dict(cfg.expert.model), "train": to_dict(cfg.expert.train)}
    mf.record_component(run_dir, section, key, entry)


def train_expert(run_dir: str | Path, cluster: int, overrides: list[str] | tuple[str, ...] = (), *,
                 log: Callable[[str], None] = print, progress: bool = True) -> TrainResult:
    """Trains (or resumes) expert `cluster` of the run and records its EMA SHA-256 in the manifest."""
    run_dir = Path(run_dir)
    manifest = mf.read_manifest(run_dir)
    cfg = run_config(manifest, overrides)
    entry = cluster_entry(manifest, cluster)
    reader = _reader([mf.resolve(run_dir, entry["shard"])], [cluster], cfg)
    task = _diffusion_task(f"expert {cluster}", cfg, manifest, reader, run_dir.absolute() / "experts" / str(cluster))
    t0 = time.perf_counter()
    result = Trainer(task, cfg.expert.train, log=log, progress=progress).run()
    _record(run_dir, "experts", cluster, result, cfg, time.perf_counter() - t0)
    log(f"expert {cluster}: finished at step {result.step}, EMA sha256 {result.ema_sha256[:16]}")
    return result


def train_monolith(run_dir: str | Path, overrides: list[str] | tuple[str, ...] = (), *,
                   log: Callable[[str], None] = print, progress: bool = True) -> TrainResult:
    """The baseline: the same trainer and model on the union of all shards, under `RUN_DIR/monolith/`."""
    run_dir = Path(run_dir)
    manifest = mf.read_manifest(run_dir)
    cfg = run_config(manifest, overrides)
    paths = [mf.resolve(run_dir, c["shard"]) for c in manifest["clusters"]]
    reader = _reader(paths, [c["id"] for c in manifest["clusters"]], cfg)
    task = _diffusion_task("monolith", cfg, manifest, reader, run_dir.absolute() / "monolith")
    t0 = time.perf_counter()
    result = Trainer(task, cfg.expert.train, log=log, progress=progress).run()
    _record(run_dir, "monolith", None, result, cfg, time.perf_counter() - t0)
    return result
