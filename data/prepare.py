"""`ddm prepare`: dataset -> embeddings -> k-means (or a random partition) -> one zarr shard per cluster + manifest.

The manifest is written last: a crash part-way leaves no manifest, and rerunning simply redoes the work.
An existing run directory is never clobbered by accident: a different dataset or clustering needs
`--overwrite`, the same one is reported as already prepared.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np

from ddm.core.codec import Codec, latent_codec
from ddm.core.config import Config, DataConfig, to_dict, with_condition_shape, with_num_classes
from ddm.core.errors import DDMError
from ddm.core.files import check_output_dir
from ddm.core.hashing import array_sha256, dataset_fingerprint, labels_fingerprint
from ddm.data import islands, membership, storage
from ddm.data import manifest as mf
from ddm.data.components import COMPONENTS
from ddm.data.embed import condition_features, fit_embedding, load_features
from ddm.data.kmeans import assign, kmeans
from ddm.data.shards import CONDITIONS_TAG, ShardWriter
from ddm.data.sources import load_dataset

logger = logging.getLogger(__name__)

BLOCK_ROWS = 4_096  # rows per block when streaming features, assignments and shard writes
STATS_BLOCK_BYTES = 32 << 20  # float64 working set of one block of the latent statistics

RETIRED_ROUTERS = "routers"  # routers of earlier memberships (`ddm.data.join`)
# Everything ddm writes in a run directory; `--overwrite` removes only these.
RUN_CONTENTS = ("manifest.json", "shards", "islands", "clusters", *(c.folder for c in COMPONENTS), "samples", "eval",
                "slurm", "k8s", RETIRED_ROUTERS)


def fit_sample(n: int, fit_samples: int, seed: int) -> np.ndarray:
    """Sorted indices of the rows the embedding and k-means are fitted on: all n, or a seeded subset."""
    if n <= fit_samples:
        return np.arange(n)
    return np.sort(np.random.default_rng([seed, 2]).choice(n, fit_samples, replace=False))


def random_partition(n: int, k: int, seed: int, stream: int) -> np.ndarray:
    """[n] int32 cluster ids in 0..k-1 drawn uniformly at random with equal sizes (within one): a seeded
    permutation dealt round-robin. `stream` separates independent draws of one seed (training / held-out rows)."""
    labels = np.empty(n, np.int32)
    labels[np.random.default_rng([seed, 7, stream]).permutation(n)] = np.arange(n) % k
    return labels


def data_codec(images: np.ndarray, cfg: DataConfig, block_rows: int = BLOCK_ROWS) -> Codec:
    """How the model sees the stored rows: images [-1, 1]; latents standardised per channel with statistics
    over all N rows (float64 sums a block at a time), or by `data.latent_scale`."""
    if cfg.kind == "images":
        return Codec()
    channels = images.shape[-1]
    sums, sq_sums = np.zeros(channels), np.zeros(channels)
    if cfg.latent_scale is None:
        rows = max(1, min(block_rows, STATS_BLOCK_BYTES // (8 * int(np.prod(images.shape[1:])))))
        for lo in range(0, len(images), rows):
            block = np.asarray(images[lo:lo + rows], np.float64).reshape(-1, channels)
            sums += block.sum(axis=0)
            sq_sums += (block**2).sum(axis=0)
    return latent_codec(sums, sq_sums, len(images) * int(np.prod(images.shape[1:-1])), cfg.latent_scale)


def _feature_source(images: np.ndarray, fit_idx: np.ndarray, codec: Codec, cfg: Config, base_dir: Path | None,
                    block_rows: int, conditions=None):
    """A function: sorted row indices [m] -> their clustering features [m, D] float32. The embedding is fitted
    once on the rows `fit_idx`, whose features are kept; any other row is embedded on demand. conditions: the
    images' condition embeddings (`data.embedding: conditions` clusters by them)."""
    if cfg.data.embedding == "file":
        features = load_features(cfg.data, len(images), base_dir)
        return lambda idx: features[idx]
    if cfg.data.embedding == "conditions":
        if conditions is None:
            raise DDMError("data.embedding=conditions needs data.conditions")
        return lambda idx: condition_features(conditions[idx])
    fitted, transform = fit_embedding(np.asarray(images[fit_idx]), codec.encode, cfg.data)
    position = np.full(len(images), -1, np.int64)
    position[fit_idx] = np.arange(len(fit_idx))

    def features_of(idx: np.ndarray) -> np.ndarray:
        out = np.empty((len(idx), fitted.shape[1]), np.float32)
        known = position[idx] >= 0
        out[known] = fitted[position[idx[known]]]
        other = np.flatnonzero(~known)
        for lo in range(0, len(other), block_rows):
            rows = other[lo:lo + block_rows]
            out[rows] = transform(np.asarray(images[idx[rows]]))
        return out

    return features_of


def _write_rows(path: str, images: np.ndarray, labels: np.ndarray | None, rows: np.ndarray, chunk: int,
                block_rows: int, cluster: int | str | None = None, conditions=None) -> str:
    """Shard `path` holding images[rows] (and labels[rows], conditions[rows]) in that order, written `block_rows`
    rows at a time (rounded to whole zarr chunks), with `shard.json` naming `cluster`. Returns its
    `shard_sha256`."""
    shape, dtype = ((), "float32") if conditions is None else (conditions.shape[1:], conditions.dtype)
    writer = ShardWriter(path, len(rows), images.shape[1:], images.dtype, labels is not None, chunk,
                         condition_shape=shape, condition_dtype=dtype)
    step = max(chunk, block_rows // chunk * chunk)
    for lo in range(0, len(rows), step):
        block = rows[lo:lo + step]
        writer.write(lo, np.asarray(images[block]), None if labels is None else labels[block],
                     None if conditions is None else np.asarray(conditions[block]))
    return writer.finish(cluster)


def _clustering_params(cfg: Config) -> dict:
    d = cfg.data
    if d.partition == "random":
        seed = d.seed if d.partition_seed is None else d.partition_seed
        return dict(method="random", k=d.k, partition_seed=seed, seed=d.seed, holdout_fraction=d.holdout_fraction,
                    limit=d.limit, image_size=d.image_size, kind=d.kind,
                    **({"latent_scale": d.latent_scale} if d.kind == "latents" else {}))
    params = dict(method=d.kmeans, k=d.k, embedding=d.embedding, embed_dim=d.embed_dim, seed=d.seed,
                  max_iter=d.max_iter, tol=d.tol, holdout_fraction=d.holdout_fraction, limit=d.limit,
                  image_size=d.image_size, kind=d.kind, fit_samples=d.fit_samples)
    if d.kind == "latents":
        params["latent_scale"] = d.latent_scale
    if d.kmeans == "two_stage":
        params["fine_k"] = d.fine_k
    if d.kmeans == "balanced":
        params["balance_slack"] = d.balance_slack
    if d.embedding == "file":
        params["features_path"] = d.features_path
    return params


def _check_run_dir(run_dir: Path, data_fingerprint: str, labels_sha: str | None, params: dict,
                   overwrite: bool, conditions_sha: str | None = None) -> bool:
    """True if this exact preparation already exists; raises if a different one would be overwritten.

    Removes nothing: with `overwrite` the old contents are cleared by `_clear_run_dir` only once the new
    preparation has loaded, embedded and clustered without error.
    """
    if overwrite or not mf.manifest_path(run_dir).exists():
        return False
    old = mf.read_manifest(run_dir)
    if old["dataset"]["fingerprint"] != data_fingerprint:
        raise DDMError(f"run directory {run_dir} holds a different dataset (fingerprint "
                       f"{old['dataset']['fingerprint'][:12]}); use --overwrite or another --run-dir")
    if old["dataset"].get("labels_sha256") != labels_sha:
        held = "different class labels" if old["dataset"].get("labels_sha256") else "no class labels"
        raise DDMError(f"run directory {run_dir} was prepared with {held} (data.labels, data.label_column); "
                       "use --overwrite or another --run-dir")
    if old["dataset"].get("conditions_sha256") != conditions_sha:
        held = "different condition embeddings" if old["dataset"].get("conditions_sha256") else "no condition embeddings"
        raise DDMError(f"run directory {run_dir} was prepared with {held} (data.conditions); use --overwrite or "
                       "another --run-dir")
    old_params = {k: v for k, v in old["clustering"].items() if k in params}
    if old_params != params:
        changed = sorted(k for k in params if old_params.get(k) != params[k])
        raise DDMError(f"run directory {run_dir} was prepared with different clustering ({', '.join(changed)}); "
                       "use --overwrite or another --run-dir")
    return True


def _clear_run_dir(run_dir: Path) -> None:
    """Removes what an earlier preparation wrote (only ddm's own entries, see RUN_CONTENTS)."""
    for name in RUN_CONTENTS:
        target = run_dir / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def _ensure_writable(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise DDMError(f"cannot write run directory {run_dir}: {err.strerror or err}") from None


def check_islands_to(dest: str) -> str:
    """`dest` (`ddm prepare --islands-to`) if the bundles can be copied there: a local folder that exists or can
    be created and takes writes (`check_output_dir`), or a URL that takes a write (a probe object, deleted at
    once); DDMError otherwise. Called before preparing, so a bad target costs no clustering."""
    if not storage.is_url(dest):
        check_output_dir(dest.removeprefix("file://"), "--islands-to")
        return dest
    probe = storage.join(dest, f".ddm-write-probe-{os.getpid()}")
    try:
        storage.write_bytes(probe, b"")
        storage.delete(probe)
    except DDMError as err:
        raise DDMError(f"--islands-to {dest} does not take writes: {err}") from None
    return dest


def split_holdout(n: int, fraction: float, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, holdout) index arrays; the training part always keeps at least k images."""
    n_hold = min(int(round(n * fraction)), max(0, n - k))
    perm = np.random.default_rng([seed, 1]).permutation(n)
    return np.sort(perm[n_hold:]), np.sort(perm[:n_hold])


def prepare(cfg: Config, run_dir: str | Path, *, overwrite: bool = False, base_dir: Path | None = None,
            block_rows: int = BLOCK_ROWS) -> dict:
    """Runs the data pipeline for `cfg` into `run_dir`; returns the manifest.

    Streams: the dataset may be memory-mapped; statistics, features, assignment and shard writes go
    `block_rows` rows at a time, and only the embedding and k-means see `data.fit_samples` rows at once.
    """
    run_dir = Path(run_dir)
    t0 = time.perf_counter()
    logger.info(f"loading {cfg.data.source} ...")
    dataset = load_dataset(cfg.data, base_dir)
    images, labels, n = dataset.images, dataset.labels, len(dataset.images)
    data_fp = dataset_fingerprint(images)
    labels_sha = None if labels is None else labels_fingerprint(labels, dataset.class_names)
    conditions_sha = None if dataset.conditions is None else array_sha256(dataset.conditions, CONDITIONS_TAG)
    logger.info(f"  {n} images of shape {dataset.image_shape}, fingerprint {data_fp[:16]}, "
                + (f"{dataset.num_classes} classes" if labels is not None else
                   f"condition embeddings {dataset.conditions.dtype.name} {list(dataset.condition_shape)}"
                   if dataset.conditions is not None else "no class labels"))
    cfg = with_num_classes(with_condition_shape(cfg, dataset.condition_shape), dataset.num_classes)
    params = _clustering_params(cfg)
    if cfg.data.k > n:
        raise DDMError(f"data.k={cfg.data.k} is larger than the dataset ({n} images)")
    _ensure_writable(run_dir)
    if _check_run_dir(run_dir, data_fp, labels_sha, params, overwrite, conditions_sha):
        logger.info(f"{run_dir} is already prepared with this dataset and clustering; nothing to do")
        return mf.read_manifest(run_dir)

    train_idx, hold_idx = split_holdout(n, cfg.data.holdout_fraction, cfg.data.k, cfg.data.seed)
    codec = data_codec(images, cfg.data, block_rows)
    if cfg.data.partition == "random":
        logger.info(f"random partition K={cfg.data.k} (seed {params['partition_seed']}) of {len(train_idx):,} "
                    "training images ...")
        train_labels = random_partition(len(train_idx), cfg.data.k, params["partition_seed"], 0)
        hold_labels = random_partition(len(hold_idx), cfg.data.k, params["partition_seed"], 1)
        fitted = {"n_iter": 0}
    else:
        train_labels, hold_labels, fitted = _kmeans_labels(images, train_idx, hold_idx, codec, cfg, base_dir,
                                                           block_rows, dataset.conditions)
    if overwrite and mf.manifest_path(run_dir).exists():
        logger.info(f"--overwrite: removing the earlier preparation in {run_dir}")
        _clear_run_dir(run_dir)
    logger.info("writing shards ...")
    (run_dir / "clusters").mkdir(exist_ok=True)
    if "centroids" in fitted:
        np.save(run_dir / "clusters" / "centroids.npy", fitted.pop("centroids"))
        fitted["centroids"] = "clusters/centroids.npy"
    np.save(run_dir / "clusters" / "labels.npy", train_labels)
    return _write_run(run_dir, cfg, dataset, codec, data_fp, labels_sha, params, fitted, train_idx, hold_idx,
                      train_labels, hold_labels, block_rows, t0, conditions_sha)


def _kmeans_labels(images, train_idx: np.ndarray, hold_idx: np.ndarray, codec: Codec, cfg: Config,
                   base_dir: Path | None, block_rows: int, conditions=None) -> tuple[np.ndarray, np.ndarray, dict]:
    """k-means on the embedding: (train labels [N_train] int32, held-out labels [N_hold] int32: the nearest
    centroid, the manifest's clustering results {inertia, n_iter, centroids [K, D] float32})."""
    n = len(images)
    fit_idx = fit_sample(n, cfg.data.fit_samples, cfg.data.seed)
    logger.info(f"embedding with {cfg.data.embedding} (fitted on {len(fit_idx):,} of {n:,} images) ...")
    features_of = _feature_source(images, fit_idx, codec, cfg, base_dir, block_rows, conditions)
    fit_train = np.isin(train_idx, fit_idx, assume_unique=True)
    fit_features = features_of(train_idx[fit_train])
    logger.info(f"  features {fit_features.shape}; k-means ({cfg.data.kmeans}) K={cfg.data.k} on "
                f"{len(fit_features):,} training images ...")
    result = kmeans(fit_features, cfg.data.k, seed=cfg.data.seed, max_iter=cfg.data.max_iter,
                    tol=cfg.data.tol, mode=cfg.data.kmeans, fine_k=cfg.data.fine_k,
                    balance_slack=cfg.data.balance_slack, progress=True)
    del fit_features
    # Rows outside the fit sample go to their nearest centroid, a block at a time.
    train_labels = np.empty(len(train_idx), np.int32)
    train_labels[fit_train] = result.labels
    rest = np.flatnonzero(~fit_train)
    for lo in range(0, len(rest), block_rows):
        block = rest[lo:lo + block_rows]
        train_labels[block] = assign(features_of(train_idx[block]), result.centroids)
    hold_labels = np.concatenate([assign(features_of(hold_idx[lo:lo + block_rows]), result.centroids)
                                  for lo in range(0, len(hold_idx), block_rows)] or [np.zeros(0, np.int32)])
    return train_labels, hold_labels, {"inertia": float(result.inertia), "n_iter": int(result.n_iter),
                                       "centroids": result.centroids}


def _write_run(run_dir: Path, cfg: Config, dataset, codec: Codec, data_fp: str, labels_sha: str | None, params: dict,
               fitted: dict, train_idx: np.ndarray, hold_idx: np.ndarray, train_labels: np.ndarray,
               hold_labels: np.ndarray, block_rows: int, t0: float, conditions_sha: str | None = None) -> dict:
    """Writes every cluster's shard and island bundle, the holdout and (last) the manifest; returns it."""
    images, labels, conditions, n = dataset.images, dataset.labels, dataset.conditions, len(dataset.images)
    clusters, island_holdouts = [], []
    for k in range(cfg.data.k):
        entry, held = write_cluster(run_dir, k, images, labels, dataset.num_classes, train_idx[train_labels == k],
                                    hold_idx[hold_labels == k], cfg.data.chunk_images, block_rows, conditions)
        clusters.append({**entry, "share": entry["count"] / len(train_idx)})
        island_holdouts.append(held)
    holdout = {"count": int(len(hold_idx))}
    if len(hold_idx):
        holdout["sha256"] = _write_rows(mf.resolve(run_dir, "shards/holdout"), images, labels, hold_idx,
                                        cfg.data.chunk_images, block_rows, cluster="holdout", conditions=conditions)
        np.save(run_dir / "shards" / "holdout_labels.npy", hold_labels.astype(np.int32))
        holdout.update(shard="shards/holdout", labels="shards/holdout_labels.npy")

    manifest = {
        "format": mf.FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "dataset": {"source": dataset.source, "fingerprint": data_fp, "num_images": n,
                    "image_shape": list(dataset.image_shape), "num_classes": dataset.num_classes,
                    "class_names": dataset.class_names, "labels_sha256": labels_sha,
                    # latents only: image runs keep the manifest they always had (no codec means images)
                    **({"dtype": images.dtype.name, "codec": codec.to_dict()} if codec.latents else {}),
                    # condition embeddings only (data.conditions): their row shape, stored dtype and digest
                    **({} if conditions is None else {"condition_shape": list(dataset.condition_shape),
                                                      "condition_dtype": conditions.dtype.name,
                                                      "conditions_sha256": conditions_sha})},
        "clustering": {**params, **fitted, "train_labels": "clusters/labels.npy"},
        "clusters": clusters,
        "holdout": holdout,
        "config": {**to_dict(cfg), "run_dir": str(run_dir)},
        "experts": {},
    }
    run_id = mf.plan_sha256(manifest)
    for c, held in zip(clusters, island_holdouts):
        write_island(run_dir, c, held, run_id, manifest)
    membership.start(manifest)
    mf.write_manifest(run_dir, manifest)
    logger.info(f"prepared {run_dir} in {time.perf_counter() - t0:.1f}s")
    logger.info(cluster_table(clusters, dataset.class_names))
    return manifest


def write_cluster(run_dir: Path, k: int, images, labels: np.ndarray | None, num_classes: int, rows: np.ndarray,
                  held_rows: np.ndarray, chunk: int, block_rows: int = BLOCK_ROWS,
                  conditions=None) -> tuple[dict, dict | None]:
    """Writes cluster k's shard (images[rows] [+ labels or conditions]) and its island's held-out images
    (images[held_rows], likewise) into its bundle RUN/islands/k; returns (its manifest entry {id, count, shard,
    sha256, bundle[, class_counts]}, the bundle's holdout {path, count, sha256} or None when held_rows is empty)."""
    # The cluster's shard lives in its island bundle: the one copy, which the manifest points at.
    bundle = f"islands/{k}"
    rel = f"{bundle}/{islands.SHARD}"
    sha = _write_rows(mf.resolve(run_dir, rel), images, labels, rows, chunk, block_rows, cluster=k,
                      conditions=conditions)
    entry = {"id": k, "count": int(len(rows)), "shard": rel, "sha256": sha, "bundle": bundle}
    if labels is not None:  # the cluster's images per class: p(k | y) is count / the class total
        entry["class_counts"] = np.bincount(labels[rows], minlength=num_classes).tolist()
    held = None if not len(held_rows) else {  # the island's own held-out images, for its held-out loss
        "path": islands.HOLDOUT, "count": int(len(held_rows)),
        "sha256": _write_rows(mf.resolve(run_dir, f"{bundle}/{islands.HOLDOUT}"), images, labels, held_rows, chunk,
                              block_rows, cluster="holdout", conditions=conditions)}
    return entry, held


def write_island(run_dir: Path, cluster: dict, held: dict | None, run_id: str, manifest: dict) -> None:
    """The island.json of `cluster` (its manifest entry) in its bundle: the run id, the run's dataset and config."""
    shard = {"path": islands.SHARD, "sha256": cluster["sha256"], "count": cluster["count"]}
    islands.write_island_json(Path(run_dir) / cluster["bundle"], islands.island_record(
        run_id, cluster["id"], manifest["dataset"], shard, held, manifest["config"]))


def _top_classes(counts: list[int], names: list[str] | None, top: int = 3) -> str:
    """The cluster's largest classes with their shares of it, e.g. "0 61%, 6 20%, 4 9%"."""
    total = max(sum(counts), 1)
    order = sorted(range(len(counts)), key=lambda i: -counts[i])[:top]
    return ", ".join(f"{names[i] if names else i} {counts[i] / total:.0%}" for i in order if counts[i])


def cluster_table(clusters: list[dict], class_names: list[str] | None = None) -> str:
    """A readable table: cluster, size, share (and its largest classes, for labelled data)."""
    labelled = all("class_counts" in c for c in clusters)
    lines = [f"{'cluster':>7}  {'size':>7}  {'share':>6}" + ("  top classes" if labelled else "")]
    lines += [f"{c['id']:>7}  {c['count']:>7}  {c['share']:>6.1%}"
              + (f"  {_top_classes(c['class_counts'], class_names)}" if labelled else "") for c in clusters]
    lines.append(f"{'total':>7}  {sum(c['count'] for c in clusters):>7}  {1:>6.0%}")
    return "\n".join(lines)
