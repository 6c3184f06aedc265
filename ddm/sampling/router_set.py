"""The router's training set drawn by the experts (`router.source: experts`): no raw data needed.

Each expert draws its own cluster's images with the `single:k` strategy (that expert alone, no router), so a
row's target is known without looking at it: the expert that drew it. The rows follow the data the router
would have seen in the shards: `router.expert_samples` x K images in all, split over (cluster, class) in
proportion to the manifest's counts (`ddm.sampling.load.prior_counts`: class counts per cluster for labelled
runs, cluster sizes otherwise; `ddm.router.synthetic.allocate`), so the cluster prior p(k) and p(k | y) the
router must learn at t = 1 are the data's. Labelled runs draw each row for its class, unguided (the expert's
own p(x | y, k), no classifier-free guidance), and the router sees that class as its input. Runs conditioned on
embeddings draw at the null condition (each expert's p(x | k)) for a router without the condition
(`router.condition: false`); a router that takes the condition is refused, as there are no per-image conditions
to draw with.

Determinism: cluster k's rows are one request with seed `request_seed(router.train.seed, k)`; row i is that
request's noise row i. The fixed strategies solve in chunks of one shape (`Ensemble._solve_groups`), so the
set is bitwise reproducible on the same hardware and software, and its digest (`TrainingSet.sha256`, recorded in
the router's manifest entry) pins it.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from ddm.core.errors import DDMError
from ddm.data.run import Run
from ddm.data.shards import NO_LABEL
from ddm.router.model import router_condition_shape
from ddm.router.synthetic import TrainingSet, allocate
from ddm.sampling.ensemble import Ensemble
from ddm.sampling.load import load_ensemble, prior_counts

logger = logging.getLogger(__name__)

CHUNK_ROWS = 64  # rows of each expert solve while drawing the set; fixed, since a row's bits depend on it


def request_seed(seed: int, cluster: int) -> int:
    """The noise seed of cluster `cluster`'s request: a uint32 derived from (seed, cluster) by numpy's
    SeedSequence, so clusters draw independent noise and the same (seed, cluster) always draws the same."""
    return int(np.random.SeedSequence([seed, cluster]).generate_state(1, np.uint32)[0])


def plan_rows(run: Run) -> np.ndarray:
    """int64 [K, C] rows to draw per (cluster slot, class) for labelled runs, [K] per slot otherwise:
    `router.expert_samples` per member cluster in all, in proportion to the manifest's counts (a removed
    cluster's counts, hence its rows, are 0)."""
    counts = prior_counts(run)
    if run.num_classes and counts.ndim != 2:
        raise DDMError(f"manifest in {run.root} has no class counts per cluster: a class-conditional router cannot "
                       "be trained from expert samples without them")
    return allocate(counts, run.config.router.expert_samples * len(run.cluster_ids))


def draw_router_set(run: Run, ensemble: Ensemble | None = None) -> TrainingSet:
    """The router's training set drawn by the run's experts (every expert must be finished). ensemble: the
    run's (`load_ensemble(run, with_router=False)` when None)."""
    cfg, limits = run.config.router, run.config.sample
    if not run.clusters:
        raise DDMError(f"manifest in {run.root} lists no clusters to route between")
    if router_condition_shape(cfg, run.condition_shape):
        raise DDMError("router.source=experts cannot train a router that takes the condition embeddings: expert "
                       "samples have no per-image conditions (use router.source=data, or router.condition=false "
                       "for p(k | x_t, t) from the experts' null-condition samples)")
    missing = run.unfinished_experts()
    if missing:
        raise DDMError(f"experts {missing} of {run.root} are not trained: a router from expert samples needs every "
                       "cluster's expert (its rows are what that expert draws)")
    if cfg.expert_steps > limits.max_steps:
        raise DDMError(f"router.expert_steps={cfg.expert_steps} exceeds sample.max_steps={limits.max_steps}")
    rows = plan_rows(run)
    per_cluster = rows.sum(1) if rows.ndim == 2 else rows
    if per_cluster.max() > limits.max_n:
        raise DDMError(f"router.expert_samples={cfg.expert_samples} asks cluster {int(per_cluster.argmax())} for "
                       f"{int(per_cluster.max())} images, more than sample.max_n={limits.max_n}")
    ensemble = (ensemble or load_ensemble(run, with_router=False)).replace(min_bucket=CHUNK_ROWS)
    images, clusters, classes = [], [], []
    t0 = time.perf_counter()
    for k in run.cluster_ids:  # slots: a removed cluster's id is skipped, never reused
        n = int(per_cluster[k])
        if n == 0:
            continue
        y = np.repeat(np.arange(run.num_classes, dtype=np.int32), rows[k]) if rows.ndim == 2 else None
        result = ensemble.sample(n, f"single:{k}", steps=cfg.expert_steps, solver=cfg.expert_solver,
                                 seed=request_seed(cfg.train.seed, k), y=y)
        images.append(run.codec.decode(result.x))  # what a shard would hold: uint8 images or float32 latents
        clusters.append(np.full(n, k, np.int32))
        classes.append(np.full(n, NO_LABEL, np.int32) if y is None else y)
        logger.info(f"router set: expert {k} drew {n} images ({time.perf_counter() - t0:.1f}s so far)")
    info = {"source": "experts", "expert_samples": cfg.expert_samples, "steps": cfg.expert_steps,
            "solver": cfg.expert_solver, "seed": cfg.train.seed,
            "rows": {str(k): int(per_cluster[k]) for k in run.cluster_ids},
            "experts": {str(k): run.expert(k)["sha256"] for k in run.cluster_ids}}
    data = TrainingSet(np.concatenate(images), np.concatenate(clusters), np.concatenate(classes), info)
    logger.info(f"router set: {len(data.images)} images from {len(images)} experts in {time.perf_counter() - t0:.1f}s, "
                f"sha256 {data.sha256[:16]}")
    return data
