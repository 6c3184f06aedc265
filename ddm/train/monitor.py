"""What the trainer reports besides the training loss: held-out metrics and sample grids, through the writers.

A job hands the data and the way to draw through its `Task`: `holdout` (held-out images of its own cluster
with their cluster ids and class labels) and `sample` ((model, noise) -> images in [-1, 1]). This module
evaluates them at fixed randomness, so a held-out curve is comparable across steps and every grid starts from the same noise:

- held-out metrics, every log step: the task's own loss (and its aux metrics, e.g. the router's accuracy) on
  one global batch of held-out rows (fewer images are cycled, each copy at other noise), with the training
  parameters and one fixed key for t and noise; logged as `holdout_<name>`.
- sample grids, every `train.sample_every` steps and at the end: the EMA weights integrate fixed noise;
  `samples/step_XXXXXX.png` in the component's folder and the `samples` image of the writers.

Both run as jitted functions over the training mesh (parameters stay in their shards), on every process of a
multi-host island; only process 0 writes files.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ddm.core import mesh as mesh_lib
from ddm.core.codec import Codec
from ddm.core.config import TrainConfig
from ddm.core.images import grid_image, save_png
from ddm.train.writers import HOLDOUT_PREFIX, Writers, check_available, open_writers

# (model, noise [n, H, W, C] float32) -> samples [n, H, W, C] float32 in about [-1, 1]; traceable.
Sampler = Callable[[nnx.Module, jax.Array], jax.Array]

# fold_in constants of the monitor's fixed keys (the trainer uses 0 for init and 1 for the step stream).
HOLDOUT_KEY, GRID_KEY = 2, 3


@dataclasses.dataclass(frozen=True)
class HeldOut:
    """Held-out images of a component's data with what its loss expects, as a reader gives them."""

    images: np.ndarray  # uint8 [N, H, W, C]
    clusters: np.ndarray  # int32 [N]: each image's cluster (the router's target)
    # int32 [N]: each image's class label (-1 for unlabelled data); or float [N, *condition_shape]: its condition
    # embedding, on a run conditioned on those
    classes: np.ndarray

    def rows(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Exactly n rows, cycling through the set: (uint8 [n, H, W, C], int32 [n], int32 [n] or float32
        [n, *condition_shape])."""
        index = np.arange(n) % len(self.images)
        classes = np.asarray(self.classes)
        classes = classes.astype(np.float32 if np.issubdtype(classes.dtype, np.floating) else np.int32)
        return self.images[index], np.asarray(self.clusters, np.int32)[index], classes[index]


def holdout_metrics(graphdef, loss, seed: int, params, rest, images, clusters, classes, *,
                    codec: Codec = Codec()) -> dict:
    """The task's loss and aux metrics on held-out rows (stored images or latents [B, H, W, C], seen through
    `codec`; clusters int32 [B], classes as `HeldOut.rows` gives them) at the fixed key
    fold_in(key(seed), HOLDOUT_KEY): the same t, noise and label dropout at every step."""
    rng = jax.random.fold_in(jax.random.key(seed), HOLDOUT_KEY)
    value, aux = loss(nnx.merge(graphdef, params, rest), codec.encode(images), clusters, classes, rng)
    return {"loss": value, **aux}


def grid_samples(graphdef, sampler: Sampler, seed: int, shape: tuple[int, ...], ema, rest) -> jax.Array:
    """The sampler on fixed noise N(0, I) of `shape` [n, H, W, C] from fold_in(key(seed), GRID_KEY)."""
    noise = jax.random.normal(jax.random.fold_in(jax.random.key(seed), GRID_KEY), shape, jnp.float32)
    return sampler(nnx.merge(graphdef, ema, rest), noise)


def _host(x: jax.Array) -> np.ndarray:
    """A replicated (possibly multi-host) array on this host."""
    return np.asarray(x.addressable_data(0))


class Monitor:
    """Held-out metrics, sample grids and metrics writers of one training job."""

    def __init__(self, *, name: str, cfg: TrainConfig, out_dir: Path, graphdef, loss, shardings: dict, mesh,
                 batch_sharding, holdout: HeldOut | None, sampler: Sampler | None,
                 image_shape: tuple[int, ...] | None, config: dict | None = None, writes: bool = True,
                 codec: Codec = Codec()):
        self.name, self.cfg, self.out_dir, self.config, self.writes = name, cfg, out_dir, config, writes
        self.codec = codec
        self.writers = Writers([])
        if writes:
            check_available(tensorboard=cfg.tensorboard, wandb_project=cfg.wandb_project)
        replicated = mesh_lib.replicated(mesh)
        self._holdout = self._holdout_fn = None
        if cfg.holdout_loss and holdout is not None and len(holdout.images):
            self._holdout = tuple(jax.make_array_from_callback(a.shape, batch_sharding, lambda i, a=a: a[i])
                                  for a in holdout.rows(cfg.batch_size))
            fn = functools.partial(holdout_metrics, graphdef, loss, cfg.seed, codec=codec)
            self._holdout_fn = jax.jit(fn, in_shardings=(shardings["params"], shardings["rest"], batch_sharding,
                                                         batch_sharding, batch_sharding), out_shardings=replicated)
        self._grid_fn = None
        if cfg.sample_every and sampler is not None and image_shape is not None:
            shape = (cfg.sample_images, *image_shape)
            fn = functools.partial(grid_samples, graphdef, sampler, cfg.seed, shape)
            self._grid_fn = jax.jit(fn, in_shardings=(shardings["ema"], shardings["rest"]), out_shardings=replicated)

    def open(self, start_step: int) -> None:
        if self.writes:
            self.writers = open_writers(tensorboard=self.cfg.tensorboard, wandb_project=self.cfg.wandb_project,
                                        out_dir=self.out_dir, name=self.name, start_step=start_step,
                                        config=self.config)

    def holdout(self, state: dict) -> dict[str, float]:
        """`{"holdout_loss": ..., "holdout_<aux>": ...}` of the current parameters; {} without held-out data."""
        if self._holdout_fn is None:
            return {}
        metrics = self._holdout_fn(state["params"], state["rest"], *self._holdout)
        return {HOLDOUT_PREFIX + k: float(_host(v)) for k, v in metrics.items()}

    def row(self, step: int, row: dict) -> None:
        self.writers.row(step, row)

    def sample_due(self, step: int) -> bool:
        return self._grid_fn is not None and (step % self.cfg.sample_every == 0 or step == self.cfg.steps)

    def sample(self, step: int, state: dict) -> Path | None:
        """Draws the EMA grid; writes samples/step_XXXXXX.png and the writers' `samples` image (process 0)."""
        images = self.codec.preview(_host(self._grid_fn(state["ema"], state["rest"])))
        if not self.writes:
            return None
        grid = grid_image(images)
        path = save_png(grid, self.out_dir / "samples" / f"step_{step:06d}.png")
        self.writers.image(step, "samples", grid)
        return path

    def close(self) -> None:
        self.writers.close()

