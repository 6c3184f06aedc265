"""Router training: cross-entropy of p(cluster | x_t, t) on noisy samples, on the shared trainer.

x0 is drawn from the union of all shards shuffled as one dataset, so clusters appear in proportion to their
sizes: the cluster-size prior is part of the posterior the router must learn (at t = 1 it should predict the
cluster proportions, not a uniform distribution).
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from data import manifest as mf
from data.shards import ShardReader
from ddm.config import Config, RouterConfig, to_dict
from ddm.errors import DDMError
from ddm.flow import interpolate, sample_t
from ddm.trainer import Task, Trainer, TrainResult
from experts.train import run_config
from router.model import router_from_config


def make_router(router_cfg: RouterConfig, image_shape: tuple[int, int, int], num_clusters: int,
                rngs: nnx.Rngs) -> nnx.Module:
    return router_from_config(router_cfg, image_shape, num_clusters, rngs=rngs)


def router_factory(manifest: dict, cfg: Config) -> Callable[[nnx.Rngs], nnx.Module]:
    """The router constructor for a run (what checkpoints are restored into)."""
    return functools.partial(make_router, cfg.router, tuple(manifest["dataset"]["image_shape"]),
                             len(manifest["clusters"]))


def noisy_inputs(x: jax.Array, rng: jax.Array, t_sampling: str) -> tuple[jax.Array, jax.Array]:
    """(x_t, t) for clean x: [B, H, W, C], with t drawn by `t_sampling` and Gaussian noise."""
    k_t, k_eps = jax.random.split(rng)
    t = sample_t(k_t, x.shape[0], t_sampling)
    return interpolate(x, jax.random.normal(k_eps, x.shape, x.dtype), t), t


def router_loss(t_sampling: str, model: nnx.Module, x: jax.Array, labels: jax.Array, rng: jax.Array):
    """Mean cross-entropy of the router on noisy x. x: [B, H, W, C] in [-1, 1], labels: [B] cluster ids."""
    x_t, t = noisy_inputs(x, rng, t_sampling)
    logits = model(x_t, t).astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, {"accuracy": (jnp.argmax(logits, -1) == labels).mean()}


def check_router_inputs(run_dir: Path, manifest: dict) -> list[str]:
    """Shard paths of every cluster; DDMError if the manifest lists none or a shard is missing."""
    clusters = manifest.get("clusters") or []
    if not clusters:
        raise DDMError(f"manifest in {run_dir} lists no clusters to route between")
    paths = [mf.resolve(run_dir, c["shard"]) for c in clusters]
    for c, path in zip(clusters, paths):
        if "://" not in path and not Path(path).exists():
            raise DDMError(f"shard of cluster {c['id']} is missing: {path}")
    return paths


def train_router(run_dir: str | Path, overrides: list[str] | tuple[str, ...] = (), *,
                 log: Callable[[str], None] = print, progress: bool = True) -> TrainResult:
    """Trains (or resumes) the run's router and records its SHA-256 in the manifest."""
    run_dir = Path(run_dir)
    manifest = mf.read_manifest(run_dir)
    cfg = run_config(manifest, overrides)
    paths = check_router_inputs(run_dir, manifest)
    train = cfg.router.train
    reader = ShardReader(paths, batch_size=train.batch_size, seed=train.seed,
                         labels=[c["id"] for c in manifest["clusters"]],
                         process_index=jax.process_index(), process_count=jax.process_count())
    task = Task(
        name="router",
        make_model=router_factory(manifest, cfg),
        loss=functools.partial(router_loss, train.t_sampling),
        reader=reader,
        out_dir=run_dir.absolute() / "router",
        meta={"config": to_dict(cfg), "num_clusters": len(manifest["clusters"])},
    )
    t0 = time.perf_counter()
    result = Trainer(task, train, log=log, progress=progress).run()
    if jax.process_index() == 0:
        mf.record_component(run_dir, "router", None, {
            "status": "finished", "step": result.step, "sha256": result.ema_sha256,
            "path": str(result.final_path.relative_to(run_dir.absolute())), "num_clusters": len(paths),
            "seconds": round(time.perf_counter() - t0, 1), "router": to_dict(cfg.router)})
    log(f"router: finished at step {result.step}, EMA sha256 {result.ema_sha256[:16]}")
    return result
