"""Island jobs: one flow-matching DiT expert on one cluster shard, or the monolith on all of them.

Both are the shared `Trainer` with a DiT and the flow-matching loss; they differ only in which shards the
reader sees and where the results go. An expert trains from its island bundle alone into an OUT folder of its
own (`train_island`), and writes `OUT/expert.json` for the coordinator's `ddm assemble`; the monolith trains
on the run's shards into `RUN_DIR/monolith/` with its own settings (`monolith.*`, by default the expert's:
`ddm.core.config.monolith_job`). On labelled data both are class-conditional: the DiT sees each image's class,
replaced by the null label with probability `train.class_dropout`, so one network learns the conditional and the
unconditional flow that classifier-free guidance combines. A run with condition embeddings (`data.conditions`)
is the same with each image's embedding in the label's place and a NaN row as the null (`ddm.core.dit`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from pathlib import Path

import jax
from flax import nnx

from ddm.core.codec import Codec
from ddm.core.config import Config, ExpertConfig, ModelConfig, monolith_job, to_dict
from ddm.core.dit import dit_from_config
from ddm.core.errors import DDMError
from ddm.core.flow import conditions_of, drop_conditions, flow_matching_loss, integrate
from ddm.core.signatures import key_id, load_private_key
from ddm.data import storage
from ddm.data.components import MONOLITH
from ddm.data.islands import Bundle
from ddm.data.mirror import Mirror
from ddm.data.run import Run
from ddm.data.shards import ShardReader, check_conditioned, check_labelled, check_shard_holds
from ddm.experts.assemble import assemble_experts, island_key, plan_bundle
from ddm.experts.lease import LEASE, Lease
from ddm.experts.records import EXPERT_JSON, expert_record, sign_expert_record, write_expert_json
from ddm.train.checkpoint import AuditPolicy
from ddm.train.monitor import HeldOut
from ddm.train.trainer import Task, Trainer, TrainResult

logger = logging.getLogger(__name__)

ISLAND_AUDIT = AuditPolicy()  # what an island records for audits of its training (`ddm.verify.audit`)



def flow_loss(t_sampling: str, class_dropout: float, num_classes: int, model: nnx.Module, x: jax.Array,
              clusters: jax.Array, classes: jax.Array, rng: jax.Array, *, condition_shape: tuple[int, ...] = ()):
    """Flow-matching loss of a DiT. x: [B, H, W, C] float32 in [-1, 1]; classes: [B] int32 class labels, or
    for a model conditioned on embeddings (`condition_shape` non-empty) float [B, *condition_shape].

    No classes and no condition_shape: unconditional (classes unused). Otherwise each row's condition becomes the
    null condition (`ddm.core.flow.drop_conditions`: the null label `num_classes`, or a NaN row) with probability
    `class_dropout`, drawn from a key of its own, so the noise draws are those of an unconditional run.
    """
    y = conditions_of(classes, num_classes, condition_shape)
    if y is None:
        return flow_matching_loss(lambda x_t, t: model(x_t, t), x, rng, t_sampling), {}
    y = drop_conditions(jax.random.fold_in(rng, 1), y, class_dropout, num_classes)
    return flow_matching_loss(lambda x_t, t: model(x_t, t, y), x, rng, t_sampling), {}


def draw_grid(steps: int, model: nnx.Module, noise: jax.Array) -> jax.Array:
    """The grid drawn while training: `steps` Euler steps from noise [n, H, W, C] float32 -> [n, H, W, C]
    (a conditional model draws unguided, with the null label or null condition)."""
    return integrate(lambda x_t, t, evaluation: (model(x_t, t), None), noise, steps, "euler")[0]


def make_dit(model_cfg: ModelConfig, image_shape: tuple[int, int, int], rngs: nnx.Rngs) -> nnx.Module:
    """The expert (and monolith) network; a seam tests replace with a smaller model."""
    return dit_from_config(model_cfg, image_shape, rngs)


def _reader(paths: list[str], cluster_ids: list[int], job: ExpertConfig, digests: list[str] | None) -> ShardReader:
    train = job.train
    reader = ShardReader(paths, batch_size=train.batch_size, seed=train.seed, cluster_ids=cluster_ids,
                         process_index=jax.process_index(), process_count=jax.process_count(), digests=digests,
                         shuffle_buffer=train.shuffle_buffer, prefetch=train.prefetch)
    check_labelled(reader, job.model.num_classes)
    check_conditioned(reader, job.model.condition_shape)
    return reader


def _diffusion_task(name: str, cfg: Config, job: ExpertConfig, image_shape: tuple[int, int, int],
                    reader: ShardReader, out_dir: Path, held: tuple | None, codec: Codec) -> Task:
    """The DiT job `name` with the model and training settings `job` (the expert's, or `monolith_job`)."""
    train = job.train
    return Task(
        name=name,
        make_model=functools.partial(make_dit, job.model, image_shape),
        loss=functools.partial(flow_loss, train.t_sampling, train.class_dropout, job.model.num_classes,
                               condition_shape=tuple(job.model.condition_shape or ())),
        reader=reader,
        out_dir=out_dir,
        meta={"config": to_dict(cfg), "image_shape": list(image_shape)},
        holdout=None if held is None else HeldOut(*held),
        sample=functools.partial(draw_grid, train.sample_steps),
        codec=codec,
    )


# ---------------------------------------------------------------------------------------------------------
# An island: bundle in, OUT out, nothing else touched.
# ---------------------------------------------------------------------------------------------------------


def _working_folder(out: str | Path):
    """Where the trainer writes OUT's files: OUT itself, or for a URL a local working copy mirrored to it."""
    if not storage.is_url(out):
        return contextlib.nullcontext(Path(out))
    if jax.process_count() > 1:
        raise DDMError(f"--out {out}: a multi-process island writes its checkpoints to a folder all its processes "
                       "share; a bucket OUT is supported for single-process islands only")
    return Mirror(str(out), skip=(LEASE, EXPERT_JSON))


def train_island(bundle_dir: str | Path, out: str | Path, overrides: list[str] | tuple[str, ...] = (), *,
                 progress: bool = False, audit: AuditPolicy | None = ISLAND_AUDIT,
                 key: str | Path | None = None) -> TrainResult:
    """Trains (or resumes) the expert of an island bundle into `out`, reading nothing but the bundle and writing
    nothing outside `out`: checkpoints, final/, metrics, the audit chain (`audit`, the policy; None: none) and
    last `out/expert.json` (`EXPERT_FORMAT`).

    `out` is a folder or a URL (`s3://`, `gs://`): then training writes a local working copy that is pushed to
    the URL while it runs and on exit (`ddm.data.mirror`), and a resume starts from the URL's checkpoints.
    The shard is checked against its digest first; a second trainer of the same `out` is refused (`Lease`).
    `key`: an Ed25519 private key file (`ddm keygen`) that signs expert.json (`ddm.experts.records`), read
    before training starts.
    """
    signing_key = None if key is None else load_private_key(key)
    bundle = Bundle.open(bundle_dir, overrides)
    out = str(out).rstrip("/") if storage.is_url(out) else Path(out).absolute()
    cfg, k = bundle.config, bundle.cluster
    working = _working_folder(out)  # a bucket OUT it cannot write is refused before the lease is taken
    lease = Lease(out) if jax.process_index() == 0 else contextlib.nullcontext()
    with lease:
        reader = _reader([bundle.shard_path], [k], cfg.expert, [bundle.shard_sha256])
        with working as work:
            task = _diffusion_task(f"expert {k}", cfg, cfg.expert, bundle.image_shape, reader, work,
                                   bundle.holdout_set(), bundle.codec)
            t0 = time.perf_counter()
            result = Trainer(task, cfg.expert.train, progress=progress, audit=audit).run()
        if jax.process_index() == 0:  # last, once final/ is in OUT
            record = expert_record(bundle, cfg, result.ema_sha256, result.step, time.perf_counter() - t0,
                                   audit=result.audit)
            write_expert_json(out, record if signing_key is None else sign_expert_record(record, signing_key))
    logger.info(f"expert {k}: finished at step {result.step}, EMA sha256 {result.ema_sha256[:16]}")
    return result


def island_trainer(bundle: Bundle, work_dir: Path) -> Trainer:
    """The trainer `train_island` runs for `bundle` (same task, config, reader and compiled step), for replaying
    stretches of an island's training (`Trainer.advance`); it writes nothing unless run. Close its reader
    (`trainer.task.reader.close()`) when done."""
    cfg, k = bundle.config, bundle.cluster
    reader = _reader([bundle.shard_path], [k], cfg.expert, [bundle.shard_sha256])
    task = _diffusion_task(f"expert {k}", cfg, cfg.expert, bundle.image_shape, reader, work_dir, None, bundle.codec)
    return Trainer(task, cfg.expert.train)


def train_expert(run_dir: str | Path, cluster: int, overrides: list[str] | tuple[str, ...] = (), *,
                 progress: bool = False, assemble: bool = True, key: str | Path | None = None) -> TrainResult:
    """Trains (or resumes) expert `cluster` of the run from its bundle (RUN/islands/k) into RUN/experts/k, then
    (with `assemble`, process 0) checks it and registers it in the manifest (`ddm.experts.assemble`).
    `key`: signs expert.json (`train_island`); it must be island k's key when the manifest lists one."""
    run = Run.open(run_dir, overrides)
    run.cluster(cluster)  # a cluster outside the run is a clear error before anything starts
    # The island reads its bundle's shard, but it registers into this manifest: one that points cluster k at
    # another cluster's shard is refused before training, not assembled into.
    check_shard_holds(run.shard_path(cluster), cluster)
    plan_bundle(run, cluster)  # an edited island.json is refused before training, not after
    listed = island_key(run, cluster)
    if key is not None and listed is not None:
        signer = key_id(load_private_key(key).public_key())
        if signer != key_id(listed):
            raise DDMError(f"--key {key} is {signer}, but island {cluster}'s key in the plan is {key_id(listed)}: "
                           "its expert would be refused")
    result = train_island(run.bundle_dir(cluster), run.expert_dir(cluster), overrides, progress=progress, key=key)
    if assemble and jax.process_index() == 0:  # the digest was just computed from the state: no read-back
        assemble_experts(run, [run.expert_dir(cluster)], weights_sha256=result.ema_sha256)
    return result


def _record(run: Run, section: str, key, job: ExpertConfig, result: TrainResult, seconds: float) -> None:
    if jax.process_index() != 0:
        return
    entry = {"status": "finished", "step": result.step, "sha256": result.ema_sha256,
             "path": run.relative(result.final_path), "seconds": round(seconds, 1),
             "model": to_dict(job.model), "train": to_dict(job.train)}
    run.record(section, key, entry)


def train_monolith(run_dir: str | Path, overrides: list[str] | tuple[str, ...] = (), *,
                   progress: bool = False) -> TrainResult:
    """The baseline: the same trainer and a DiT on the union of all shards, under `RUN_DIR/monolith/`, with the
    `monolith` config section (null parts: the expert's)."""
    run = Run.open(run_dir, overrides)
    job = monolith_job(run.config)
    reader = _reader(run.shard_paths(), run.cluster_ids, job, run.shard_digests())
    task = _diffusion_task(MONOLITH.name, run.config, job, run.image_shape, reader, run.component_dir(MONOLITH),
                           run.holdout_set(), run.codec)
    t0 = time.perf_counter()
    result = Trainer(task, job.train, progress=progress).run()
    _record(run, MONOLITH.name, None, job, result, time.perf_counter() - t0)
    return result
