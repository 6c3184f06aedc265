"""Router training: cross-entropy of p(cluster | x_t, t[, y]) on noisy samples, on the shared trainer.

x0 is drawn from the union of all shards shuffled as one dataset, so clusters appear in proportion to their
sizes: the cluster-size prior is part of the posterior the router must learn (at t = 1 it should predict the
cluster proportions, not a uniform distribution).

On labelled data the router also sees the class y of x0 (as the paper's router sees the condition), replaced
by the null label with probability `router.train.class_dropout`. It then learns p(k | x_t, t, y), whose value
at pure noise is p(k | y), the share of class y's images in cluster k, and under the null label the
class-blind p(k | x_t, t) that unguided sampling uses. On a run with condition embeddings the embedding takes
the class's place (a NaN row is the null), unless `router.condition` is off: then the router learns
p(k | x_t, t) alone.

With `router.source: experts` the rows come from a `TrainingSet` instead (`ddm.router.synthetic`: images the
experts drew, each labelled with the expert that drew it and the class it was drawn for, in the proportions of
the manifest's counts); everything else is the same.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ddm.core import documents
from ddm.core.config import to_dict
from ddm.core.errors import DDMError
from ddm.core.flow import conditions_of, drop_conditions, noisy_batch
from ddm.data.run import Run
from ddm.data.shards import ShardReader, check_conditioned, check_labelled
from ddm.router.model import router_condition_shape
from ddm.router.synthetic import ArrayReader, TrainingSet
from ddm.router.trained import router_factory
from ddm.train.monitor import HeldOut
from ddm.train.trainer import Task, Trainer, TrainResult

logger = logging.getLogger(__name__)


def router_loss(t_sampling: str, class_dropout: float, num_classes: int, model: nnx.Module, x: jax.Array,
                clusters: jax.Array, classes: jax.Array, rng: jax.Array, *, condition_shape: tuple[int, ...] = ()):
    """Mean cross-entropy of the router on noisy x. x: [B, H, W, C] in [-1, 1], clusters: [B] cluster ids (the
    target), classes: [B] class labels, or float [B, *condition_shape] condition embeddings for a router that
    takes them (`condition_shape` non-empty): an input then, dropped to the null condition with probability
    class_dropout; unused otherwise."""
    x_t, t, _ = noisy_batch(rng, x, t_sampling)
    y = conditions_of(classes, num_classes, condition_shape)
    if y is not None:
        y = drop_conditions(jax.random.fold_in(rng, 1), y, class_dropout, num_classes)
    logits = model(x_t, t, y).astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, clusters).mean()
    return loss, {"accuracy": (jnp.argmax(logits, -1) == clusters).mean()}


def check_router_inputs(run: Run) -> list[str]:
    """Shard paths of every cluster; DDMError if the manifest lists none or a shard is missing."""
    if not run.clusters:
        raise DDMError(f"manifest in {run.root} lists no clusters to route between")
    paths = run.shard_paths()
    for k, path in zip(run.cluster_ids, paths):
        if "://" not in path and not Path(path).exists():
            raise DDMError(f"shard of cluster {k} is missing: {path}")
    return paths


SOURCE_FILE = "source.json"  # RUN/router/source.json: what the router's checkpoints were trained on


def check_source(out_dir: Path, source: dict) -> None:
    """Writes `source` ({"source": "data"} or the training set's source and digest) to OUT/source.json, after
    checking that checkpoints already in OUT (which training would resume) were trained on the same: a router
    trained on other data is never continued on this one. Checkpoints without the file are from the shards."""
    path = out_dir / SOURCE_FILE
    held = documents.read(path, None, "router source file") if path.is_file() else None
    if held is not None and not (isinstance(held, dict) and isinstance(held.get("source"), str)):
        raise DDMError(f"router source file {path} is not an object naming a source")
    if held is None and any((out_dir / "checkpoints").glob("[0-9]*")):
        held = {"source": "data"}
    if held is not None and held != source:
        raise DDMError(f"the router checkpoints in {out_dir} were trained on {_source_text(held)}, not on "
                       f"{_source_text(source)}: move {out_dir} away to train a new router")
    if jax.process_index() == 0:
        documents.write(path, source)


def _source_text(source: dict) -> str:
    if source.get("source") == "data":
        return "the shards (router.source=data)"
    return f"expert samples {str(source.get('sha256', '?'))[:16]} (router.source={source.get('source')})"


def train_router(run_dir: str | Path, overrides: list[str] | tuple[str, ...] = (), *,
                 progress: bool = False, training_set: TrainingSet | None = None) -> TrainResult:
    """Trains (or resumes) the run's router and records its SHA-256 in the manifest.

    training_set None: on the shards (`router.source` must be "data"); else on those rows (what
    `ddm.sampling.router_set.draw_router_set` draws for `router.source: experts`), and the manifest entry
    records the set's digest."""
    run = Run.open(run_dir, overrides)
    train = run.config.router.train
    if training_set is None:
        if run.config.router.source != "data":
            raise DDMError(f"router.source={run.config.router.source}: the training set is drawn by the experts "
                           f"first (`ddm train-router --run-dir {run.root} --source experts`)")
        paths = check_router_inputs(run)
        reader = ShardReader(paths, batch_size=train.batch_size, seed=train.seed, cluster_ids=run.cluster_ids,
                             process_index=jax.process_index(), process_count=jax.process_count(),
                             digests=run.shard_digests(), shuffle_buffer=train.shuffle_buffer,
                             prefetch=train.prefetch)
        check_conditioned(reader, run.condition_shape)
        source = {"source": "data"}
    else:
        if not run.clusters:
            raise DDMError(f"manifest in {run.root} lists no clusters to route between")
        reader = ArrayReader(training_set, batch_size=train.batch_size, seed=train.seed,
                             process_index=jax.process_index(), process_count=jax.process_count())
        source = {"source": training_set.info.get("source", "experts"), "sha256": training_set.sha256}
    check_labelled(reader, run.num_classes)
    out_dir = run.component_dir("router")
    check_source(out_dir, source)
    task = Task(
        name="router",
        make_model=router_factory(run),
        loss=functools.partial(router_loss, train.t_sampling, train.class_dropout, run.num_classes,
                               condition_shape=router_condition_shape(run.config.router, run.condition_shape)),
        reader=reader,
        out_dir=out_dir,
        meta={"config": to_dict(run.config), "num_clusters": run.num_clusters, "num_classes": run.num_classes,
              "source": source},
        # Every held-out image with its nearest cluster (and class): held-out loss and accuracy at every log step.
        # A coordinator without raw data has none: the router then trains without the held-out monitor.
        holdout=HeldOut(*held) if (held := _holdout(run, training_set)) is not None else None,
        codec=run.codec,
    )
    t0 = time.perf_counter()
    result = Trainer(task, train, progress=progress).run()
    if jax.process_index() == 0:
        entry = {"status": "finished", "step": result.step, "sha256": result.ema_sha256,
                 "path": run.relative(result.final_path), "num_clusters": run.num_clusters,
                 "clusters": run.cluster_ids,  # the members it routes between (`ddm.data.membership`)
                 "num_classes": run.num_classes, "seconds": round(time.perf_counter() - t0, 1),
                 "router": to_dict(run.config.router), "source": source["source"]}
        if training_set is not None:
            entry["training_set"] = training_set.describe()
        run.record("router", None, entry)
    logger.info(f"router: finished at step {result.step}, EMA sha256 {result.ema_sha256[:16]}")
    return result


def _holdout(run: Run, training_set: TrainingSet | None):
    """The run's held-out set, or None; from expert samples, also None when its shard is not here."""
    path = run.holdout_path()
    if training_set is not None and (path is None or ("://" not in str(path) and not Path(path).exists())):
        return None
    return run.holdout_set()
