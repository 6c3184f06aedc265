"""Joining and leaving a finished run: `ddm add-island` and `ddm remove-island` (docs/membership.md).

add-island loads new data with the run's data settings and the given `data.*` overrides (any `data.source`),
checks it against the plan (the image shape and kind, latents' dtype, labelled or not, and that every class it
holds is one of the plan's classes, matched by name; condition embeddings of the plan's shape and dtype, or none
when the plan has none), and writes cluster K (the next id) exactly as
`ddm prepare` writes a cluster: its shard and its island's held-out images inside its bundle RUN/islands/K
(`ddm.data.prepare.write_cluster`) and the bundle's island.json, which names the unchanged run id. Then the
manifest gets the cluster's entry, marked `joined`, which enters the membership id but not the run id: every
bundle handed out and every expert assembled stays valid, and no existing file is rewritten. The island trains
it as any other (`ddm train-expert`, `ddm train-islands`), and `ddm assemble` admits it.

remove-island takes cluster k out of the membership: its expert entry is unregistered, the `prior` counts and
router training leave it out, and it cannot come back under its id. With `delete`, its bundle (shard and
held-out images) and its expert's folder are deleted once the manifest naming the new membership is written.

Both leave the router stale: a router has one output per cluster slot and was trained with the clusters of its
time, so router strategies refuse until `ddm train-router` has trained a new one (`membership.router_problem`).
That retraining starts from scratch: the old router's folder moves to RUN/routers/<its sha256[:16]> (so records
made with it still verify) and every manifest path to it follows.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ddm.core import signatures
from ddm.core.config import config_from_data, parse_override
from ddm.core.errors import DDMError
from ddm.core.hashing import array_sha256, dataset_fingerprint, labels_fingerprint
from ddm.data import manifest as mf
from ddm.data import membership
from ddm.data.components import ROUTER
from ddm.data.manifest_schema import MAX_CLUSTERS
from ddm.data.prepare import BLOCK_ROWS, RETIRED_ROUTERS, split_holdout, write_cluster, write_island
from ddm.data.run import Run
from ddm.data.shards import CONDITIONS_TAG
from ddm.data.sources import Dataset, load_dataset

logger = logging.getLogger(__name__)

# data.* settings add-island takes: where the new data is and which of it to use. The rest of the config (the
# experts' model and training, the clustering) is the plan's.
JOIN_SETTINGS = ("source", "array_key", "image_column", "labels", "label_column", "split", "image_size", "limit",
                 "exclude_classes", "holdout_fraction", "seed", "conditions", "conditions_key")


# ---------------------------------------------------------------------------------------------------------
# Join.
# ---------------------------------------------------------------------------------------------------------


def check_join_settings(overrides: list[str] | tuple[str, ...]) -> None:
    """DDMError unless every override is `data.<one of JOIN_SETTINGS>=VALUE`."""
    for text in overrides:
        key = text.split("=", 1)[0].strip()
        section, _, name = key.partition(".")
        if section != "data" or name not in JOIN_SETTINGS:
            raise DDMError(f"add-island takes only the new data's settings (data.{', data.'.join(JOIN_SETTINGS)}), "
                           f"not {key}: the island trains the plan's expert config")
        parse_override(text)  # a malformed value is the same one-line error as anywhere else


def plan_labels(run: Run, dataset: Dataset) -> np.ndarray | None:
    """The new data's labels as the plan's class indices (int32 [N]; None for unlabelled data), after checking
    that it fits the plan: images of the plan's shape and kind, labelled when the plan is, and only classes the
    plan has (matched by name). DDMError, one line, otherwise."""
    what = f"island data {dataset.source}"
    if tuple(dataset.image_shape) != tuple(run.image_shape):
        raise DDMError(f"{what} has images of shape {list(dataset.image_shape)}, the plan's are "
                       f"{list(run.image_shape)}: refusing to add it")
    plan_dtype = run.dataset.get("dtype", "uint8")
    if dataset.images.dtype.name != plan_dtype:
        raise DDMError(f"{what} is {dataset.images.dtype.name}, the plan's data is {plan_dtype}: refusing to add it")
    check_plan_conditions(run, dataset)
    if (dataset.labels is None) != (run.num_classes == 0):
        held = "no class labels" if dataset.labels is None else f"class labels ({dataset.num_classes} classes)"
        plan = f"{run.num_classes} classes" if run.num_classes else "unlabelled"
        raise DDMError(f"{what} has {held}, the plan is {plan}: refusing to add it")
    if dataset.labels is None:
        return None
    index = {name: i for i, name in enumerate(run.class_names)}
    present = np.unique(dataset.labels)
    foreign = [dataset.class_names[c] for c in present if dataset.class_names[c] not in index]
    if foreign:
        shown = ", ".join(run.class_names[:10]) + (", ..." if run.num_classes > 10 else "")
        raise DDMError(f"{what} holds class {foreign[0]!r}, which the plan does not have (its classes: {shown}): "
                       "refusing to add it")
    to_plan = np.array([index.get(name, -1) for name in dataset.class_names], np.int32)
    return to_plan[dataset.labels]


def check_plan_conditions(run: Run, dataset: Dataset) -> None:
    """DDMError (one line) unless the new data's condition embeddings have the plan's shape and stored dtype, or
    both have none."""
    what = f"island data {dataset.source}"
    plan = (run.condition_shape, run.dataset.get("condition_dtype"))
    held = (dataset.condition_shape, None if dataset.conditions is None else dataset.conditions.dtype.name)
    if held != plan:
        def show(shape, dtype):
            return f"condition embeddings {dtype} {list(shape)}" if shape else "no condition embeddings"
        raise DDMError(f"{what} has {show(*held)}, the plan has {show(*plan)} (data.conditions): refusing to add it")


@contextlib.contextmanager
def _join_lock(run_dir: Path) -> Iterator[None]:
    """One add-island at a time per run: the next cluster id is chosen, and its bundle written, under it."""
    (run_dir / "islands").mkdir(exist_ok=True)
    with open(run_dir / "islands" / ".join.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _island_key(path: str | Path | None) -> dict | None:
    if path is None:
        return None
    key = signatures.load_public_key(path)
    return {"key_id": signatures.key_id(key), "public_key": signatures.public_key_b64(key)}


def add_island(run_dir: str | Path, overrides: list[str] | tuple[str, ...] = (), *,
               island_key: str | Path | None = None, base_dir: Path | None = None,
               block_rows: int = BLOCK_ROWS) -> dict:
    """Joins new data to the run as its next cluster (module docstring); returns the cluster's manifest entry.

    overrides: `data.*` settings of the new data (`JOIN_SETTINGS`) over the run's. island_key: the new island's
    public key file (`ddm keygen`): its expert must then be signed by it. Refuses (DDMError, nothing written) data
    that contradicts the plan."""
    run_dir = Path(run_dir)
    check_join_settings(overrides)
    key = _island_key(island_key)
    run = Run.open(run_dir)
    cfg = config_from_data(run.manifest["config"], overrides).data
    dataset = load_dataset(cfg, base_dir)
    labels = plan_labels(run, dataset)
    images, n = dataset.images, len(dataset.images)
    fingerprint = dataset_fingerprint(images)
    labels_sha = None if labels is None else labels_fingerprint(labels, run.class_names)
    conditions_sha = None if dataset.conditions is None else array_sha256(dataset.conditions, CONDITIONS_TAG)
    for c in run.clusters:
        if c["id"] in run.cluster_ids and (c.get("joined") or {}).get("fingerprint") == fingerprint:
            raise DDMError(f"island data {dataset.source} already joined the run as cluster {c['id']}")
    if run.num_clusters >= MAX_CLUSTERS:
        raise DDMError(f"run {run_dir} has {run.num_clusters} clusters, the most a run can have")
    train_idx, hold_idx = split_holdout(n, cfg.holdout_fraction, 1, cfg.seed)
    with _join_lock(run_dir):
        run = run.reload()
        k = run.num_clusters
        bundle = run_dir / "islands" / str(k)
        if bundle.exists():  # a join that failed before registering it: nothing refers to it
            shutil.rmtree(bundle)
        entry, held = write_cluster(run_dir, k, images, labels, run.num_classes, train_idx, hold_idx,
                                    cfg.chunk_images, block_rows, dataset.conditions)
        entry["joined"] = {"source": dataset.source, "fingerprint": fingerprint, "num_images": n,
                           "holdout": len(hold_idx), **({"labels_sha256": labels_sha} if labels_sha else {}),
                           **({"conditions_sha256": conditions_sha} if conditions_sha else {})}
        write_island(run_dir, entry, held, run.run_id, run.manifest)

        def change(manifest: dict) -> None:
            if len(manifest["clusters"]) != k:
                raise DDMError(f"the clusters of {run_dir} changed while cluster {k} was written; run add-island again")
            manifest["clusters"].append(entry)
            if key is not None:
                manifest.setdefault("island_keys", {})[str(k)] = key

        _change_membership(run, change)
    logger.info(f"cluster {k} joined {run_dir}: {entry['count']} images ({len(hold_idx)} held out) from "
                f"{dataset.source}" + (f", classes {_classes(entry['class_counts'])}" if labels is not None else "")
                + f"; its bundle: {bundle}")
    return entry


def _classes(counts: list[int]) -> str:
    return ", ".join(f"{c}: {n}" for c, n in enumerate(counts) if n)


# ---------------------------------------------------------------------------------------------------------
# Leave.
# ---------------------------------------------------------------------------------------------------------


def remove_island(run_dir: str | Path, cluster: int, *, delete: bool = False) -> Run:
    """Takes `cluster` out of the run's membership (module docstring); returns the run re-read. delete: then
    deletes its bundle (shard and held-out images) and its expert's folder."""
    run = Run.open(run_dir)
    entry = run.cluster(cluster)  # DDMError for a cluster that does not exist or already left
    if run.cluster_ids == [cluster]:
        raise DDMError(f"cluster {cluster} is the last member of run {run.root}: a run keeps at least one")

    def change(manifest: dict) -> None:
        section = manifest.setdefault(membership.SECTION, {})
        section["removed"] = sorted({*section.get("removed", []), cluster})
        (manifest.get("experts") or {}).pop(str(cluster), None)

    run = _change_membership(run, change)
    logger.info(f"cluster {cluster} left {run.root}: membership {run.membership_id[:16]} without it"
                + (f"; {membership.router_problem(run.manifest)}" if membership.router_problem(run.manifest) else ""))
    if delete:
        for path in {Path(run.resolve(entry["bundle"])) if entry.get("bundle") else None,
                     Path(run.resolve(entry["shard"])), run.expert_dir(cluster)} - {None}:
            if _inside(path, run.root) and path.exists():
                shutil.rmtree(path)
                logger.info(f"deleted {path}")
    return run


def _inside(path: Path, folder: Path) -> bool:
    return path.absolute().resolve().is_relative_to(folder.absolute().resolve())


# ---------------------------------------------------------------------------------------------------------
# The router of the previous membership.
# ---------------------------------------------------------------------------------------------------------


def _change_membership(run: Run, change) -> Run:
    """Applies a membership change (one manifest update, with its history entry) and retires the router folder:
    RUN/router moves to RUN/routers/<name> and the manifest's paths into it (router entry, history) follow, so
    the router of the previous membership stays available to verify its records and `ddm train-router` starts a
    new one instead of resuming it."""
    folder = run.component_dir(ROUTER)
    sha = (run.component(ROUTER.name) or {}).get("sha256")
    name = None
    if folder.exists():  # its checkpoints are the recorded router's, or an unrecorded one's in progress
        name = sha[:16] if sha else f"unrecorded-{run.membership_id[:16]}"
    prefix, target = f"{ROUTER.folder}/", f"{RETIRED_ROUTERS}/{name}/"

    def move(entry: dict | None) -> None:
        if name and sha and entry and entry.get("sha256") == sha and entry.get("path", "").startswith(prefix):
            entry["path"] = target + entry["path"][len(prefix):]

    def change_and_retire(manifest: dict) -> None:
        membership.tracked(change)(manifest)  # the history entries first, then the router's path in each
        move(manifest.get(ROUTER.name))
        for e in membership.history(manifest):
            move(e["router"])

    if name is not None and (run.root / RETIRED_ROUTERS / name).exists():
        raise DDMError(f"{run.root / RETIRED_ROUTERS / name} exists already; move it away to retire {folder} there")
    mf.update_manifest(run.root, change_and_retire)
    updated = run.reload()
    if name is not None:
        (run.root / RETIRED_ROUTERS).mkdir(exist_ok=True)
        folder.rename(run.root / RETIRED_ROUTERS / name)
        logger.info(f"the router of the previous membership moved to {run.root / RETIRED_ROUTERS / name}; router "
                    f"strategies need a new one: ddm train-router --run-dir {run.root}")
    return updated

