"""Cluster shards as zarr arrays (through tensorstore) and a seeded, resumable batch reader.

A shard is a folder of zarr arrays with one row per image, all in the same order:

    SHARD/images/   uint8 [N_k, H, W, C], chunked along N so an island reads only the chunks it needs
    SHARD/labels/   int32 [N_k] class labels (only when the dataset has them)
    SHARD/conditions/  float16 / float32 [N_k, D] or [N_k, L, D] condition embeddings, as given (only when the
                    dataset has them: `data.conditions`), chunked along N like the images
    SHARD/shard.json  which cluster the shard holds, its row count and its content digest (`shard_sha256`)

Paths may be local or any kvstore URL tensorstore understands (gs://, s3://, file://). Further per-row arrays
(latents, digests) go beside these two.

The reader is a pure function of the step: the global batch for step s is the s-th block of B indices in the
stream of per-epoch orders (seeded by (seed, epoch); `ddm.data.order`). Its "position" is therefore just the
step, which makes resume exact, and each process of a multi-host job reads only its own rows of that block.
Shards held in memory use a uniform permutation; shards streamed from the store (larger than
`IN_MEMORY_LIMIT_BYTES`) a chunk-aware one (shuffled chunks, rows mixed within a shuffle buffer of a few
chunks), so each zarr chunk is decoded once per pass. With `prefetch`, a background thread reads the next
batches while the trainer trains (`ddm.data.prefetch`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import tensorstore as ts

from ddm.core.errors import DDMError
from ddm.core.hashing import array_hasher, array_sha256
from ddm.data import storage
from ddm.data.order import (LatestEpoch, chunk_shuffled_permutation, chunk_spans, global_permutation, rows_of_span,
                            window_chunks)
from ddm.data.prefetch import Prefetcher

logger = logging.getLogger(__name__)

# Above this many bytes a reader streams rows from the store instead of caching the whole shard in memory.
IN_MEMORY_LIMIT_BYTES = 2 << 30
IMAGES, LABELS, CONDITIONS = "images", "labels", "conditions"  # the arrays inside a shard folder
SHARD_INFO = "shard.json"  # beside the arrays: {"format", "cluster", "count", "sha256"}
SHARD_FORMAT = "ddm-shard/v1"
# The digests a shard's content digest combines (the conditions' only when it has them).
IMAGES_TAG, LABELS_TAG, CONDITIONS_TAG = "ddm-images:v1", "ddm-labels:v1", "ddm-conditions:v1"
CONDITION_DTYPES = ("float16", "float32")
_VERIFY_ROWS, _VERIFY_BYTES = 4096, 64 << 20  # at most this many rows / bytes per read while a shard is digested
NO_LABEL = -1  # the class a reader gives rows of unlabelled shards
SHUFFLES = ("global", "chunks")  # a reader's epoch orders (`ddm.data.order`)


def _kvstore(path: str, array: str) -> dict | str:
    """The kvstore of array `array` inside shard folder `path` (local, or a URL: `ddm.data.storage`)."""
    return storage.kvstore(path, f"{array}/" if array else "")


def _spec(path: str, array: str) -> dict:
    return {"driver": "zarr", "kvstore": _kvstore(path, array)}


STORED_DTYPES = ("uint8", "float16", "float32")  # images, or latents kept at their own precision


def _create_array(path: str, array: str, shape: tuple[int, ...], dtype: np.dtype, chunk: int) -> ts.TensorStore:
    chunk_shape = [max(1, min(chunk, shape[0]))] + list(shape[1:])
    try:
        return ts.open(
            _spec(path, array), create=True, delete_existing=True, dtype=ts.dtype(np.dtype(dtype).name),
            shape=shape, chunk_layout=ts.ChunkLayout(chunk_shape=chunk_shape),
        ).result()
    except ValueError as err:
        raise DDMError(f"cannot write shard {path}: {str(err).splitlines()[0]}") from None


def _delete_array(path: str, array: str) -> None:
    """Removes array `array` of a shard (if present), so a rewritten shard never keeps stale rows."""
    try:
        ts.KvStore.open(_kvstore(path, array)).result().delete_range(ts.KvStore.KeyRange()).result()
    except ValueError as err:
        raise DDMError(f"cannot write shard {path}: {str(err).splitlines()[0]}") from None


def _checked_labels(path: str, labels, n: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise DDMError(f"shard {path}: labels must be integers [{n}], got {labels.dtype} {labels.shape}")
    if len(labels) and labels.min() < 0:
        raise DDMError(f"shard {path}: labels must be >= 0, got {labels.min()}")
    return labels


class ShardWriter:
    """Writes shard folder `path` (replacing any shard there) a block of rows at a time: images [N, H, W, C]
    (uint8, or float16 / float32 latents, stored exactly), for labelled data labels [N] int32, and with a
    non-empty `condition_shape` condition embeddings [N, *condition_shape] of `condition_dtype` (float16 /
    float32, stored exactly, chunked along N like the images).

    Blocks that start at multiples of `chunk` rows write whole chunks: no chunk is read back and rewritten.
    """

    def __init__(self, path: str, num_rows: int, row_shape: tuple[int, ...], dtype, labelled: bool,
                 chunk: int = 256, condition_shape: tuple[int, ...] = (), condition_dtype="float32"):
        dtype = np.dtype(dtype)
        if dtype.name not in STORED_DTYPES or len(row_shape) != 3:
            raise DDMError(f"shard {path}: expected [N, H, W, C] of {', '.join(STORED_DTYPES)}, got {dtype} "
                           f"[{num_rows}, {', '.join(map(str, row_shape))}]")
        condition_shape = tuple(int(d) for d in condition_shape)
        if condition_shape and (np.dtype(condition_dtype).name not in CONDITION_DTYPES
                                or len(condition_shape) not in (1, 2) or min(condition_shape) < 1):
            raise DDMError(f"shard {path}: conditions must be float16 / float32 [N, D] or [N, L, D], got "
                           f"{np.dtype(condition_dtype).name} [N, {', '.join(map(str, condition_shape))}]")
        self.path, self.num_rows, self.dtype = path, num_rows, dtype
        self.images = _create_array(path, IMAGES, (num_rows, *row_shape), dtype, chunk)
        if labelled:
            # Labels are tiny: one chunk per image chunk keeps a streamed read of a row range to one chunk each.
            self.labels = _create_array(path, LABELS, (num_rows,), np.int32, chunk)
        else:
            self.labels = None
            _delete_array(path, LABELS)
        self.condition_dtype = np.dtype(condition_dtype) if condition_shape else None
        if condition_shape:
            self.conditions = _create_array(path, CONDITIONS, (num_rows, *condition_shape), self.condition_dtype,
                                            chunk)
        else:
            self.conditions = None
            _delete_array(path, CONDITIONS)
        # The content digest is taken as the rows arrive (in order), so a streamed write never reads back.
        self._next = 0
        self._images_hash = array_hasher(IMAGES_TAG, (num_rows, *row_shape))
        self._labels_hash = array_hasher(LABELS_TAG, (num_rows,)) if labelled else None
        self._conditions_hash = array_hasher(CONDITIONS_TAG, (num_rows, *condition_shape)) if condition_shape else None

    def write(self, start: int, images: np.ndarray, labels: np.ndarray | None = None,
              conditions: np.ndarray | None = None) -> None:
        """Rows [start, start + len(images)): images of the shard's dtype and shape, labels [n] integers >= 0,
        conditions [n, *condition_shape] of the shard's condition dtype."""
        if images.dtype != self.dtype or tuple(images.shape[1:]) != tuple(self.images.shape[1:]):
            raise DDMError(f"shard {self.path}: expected {self.dtype} [n, {', '.join(map(str, self.images.shape[1:]))}]"
                           f", got {images.dtype} {images.shape}")
        if (labels is None) != (self.labels is None):
            raise DDMError(f"shard {self.path}: labels {'missing' if labels is None else 'given'} for a "
                           f"{'labelled' if self.labels is not None else 'unlabelled'} shard")
        if labels is not None:
            labels = _checked_labels(self.path, labels, len(images))
        if conditions is not None:
            conditions = np.asarray(conditions)
        if (conditions is None) != (self.conditions is None) or (conditions is not None and (
                conditions.dtype != self.condition_dtype or conditions.shape[1:] != tuple(self.conditions.shape[1:])
                or len(conditions) != len(images))):
            want = "none" if self.conditions is None else \
                f"{self.condition_dtype} [{len(images)}, {', '.join(map(str, self.conditions.shape[1:]))}]"
            got = "none" if conditions is None else f"{conditions.dtype} {list(conditions.shape)}"
            raise DDMError(f"shard {self.path}: conditions must be {want}, got {got}")
        if start != self._next:
            raise DDMError(f"shard {self.path}: rows must be written in order (next {self._next}, got {start})")
        end = start + len(images)
        try:
            self.images[start:end].write(images).result()
            if labels is not None:
                self.labels[start:end].write(labels.astype(np.int32)).result()
            if conditions is not None:
                self.conditions[start:end].write(conditions).result()
        except ValueError as err:
            raise DDMError(f"cannot write shard {self.path}: {str(err).splitlines()[0]}") from None
        self._images_hash.update(np.ascontiguousarray(images).tobytes())
        if labels is not None:
            self._labels_hash.update(np.ascontiguousarray(labels, "<i4").tobytes())
        if conditions is not None:
            self._conditions_hash.update(np.ascontiguousarray(conditions).tobytes())
        self._next = end

    def finish(self, cluster: int | str | None = None) -> str:
        """After the last row: the shard's `shard_sha256`; with `cluster` (an id, or "holdout") also writes
        `shard.json`, so the shard knows which cluster it holds."""
        if self._next != self.num_rows:
            raise DDMError(f"shard {self.path}: {self._next} of {self.num_rows} rows written")
        labels_part = "-" if self._labels_hash is None else self._labels_hash.hexdigest()
        digest = _combine(self._images_hash.hexdigest(), labels_part,
                          None if self._conditions_hash is None else self._conditions_hash.hexdigest())
        if cluster is not None:
            info = {"format": SHARD_FORMAT, "cluster": cluster, "count": int(self.num_rows), "sha256": digest}
            _kv_write(self.path, SHARD_INFO, json.dumps(info, indent=2).encode())
        return digest


def write_shard(path: str, images: np.ndarray, labels: np.ndarray | None = None, chunk: int = 256,
                cluster: int | str | None = None, conditions: np.ndarray | None = None) -> str:
    """Writes shard folder `path` (replacing any shard there) in one go: images [N, H, W, C] uint8 (or float16 /
    float32 latents), for labelled data labels [N] integer class labels in the same row order (stored int32), and
    condition embeddings [N, D] / [N, L, D] float16 / float32 (stored as given). With `cluster` (an id, or
    "holdout") it also writes `shard.json`. Returns the `shard_sha256`."""
    if images.ndim != 4:
        raise DDMError(f"shard {path}: expected [N, H, W, C], got {images.dtype} {images.shape}")
    if labels is not None:
        labels = _checked_labels(path, labels, len(images))
    shape, dtype = ((), "float32") if conditions is None else (np.shape(conditions)[1:], np.asarray(conditions).dtype)
    writer = ShardWriter(path, len(images), images.shape[1:], images.dtype, labels is not None, chunk,
                         condition_shape=shape, condition_dtype=dtype)
    writer.write(0, images, labels, conditions)
    return writer.finish(cluster)


def _kv_write(path: str, key: str, value: bytes) -> None:
    try:
        ts.KvStore.open(_kvstore(path, "")).result().write(key, value).result()
    except ValueError as err:
        raise DDMError(f"cannot write {path}/{key}: {str(err).splitlines()[0]}") from None


def _kv_read(path: str, key: str) -> bytes | None:
    """The bytes of `path/key` in any kvstore; None if absent."""
    try:
        result = ts.KvStore.open(_kvstore(path, "")).result().read(key).result()
    except ValueError as err:
        raise DDMError(f"cannot read {path}/{key}: {str(err).splitlines()[0]}") from None
    return bytes(result.value) if result.state == "value" else None


# ---------------------------------------------------------------------------------------------------------
# Content digests: what a shard holds, independent of chunking, compression or where it is stored.
# ---------------------------------------------------------------------------------------------------------


def shard_sha256(images: np.ndarray, labels: np.ndarray | None, conditions: np.ndarray | None = None) -> str:
    """SHA-256 of a shard's content: ``"ddm-shard:v1\n"``, the `ddm-images:v1` digest of its images uint8
    [N, H, W, C], a newline, and the `ddm-labels:v1` digest of its int32 [N] labels (``-`` when unlabelled); with
    condition embeddings, then a newline and the `ddm-conditions:v1` digest of their stored bytes (a shard
    without them keeps the digest it always had)."""
    labels_part = "-" if labels is None else array_sha256(np.asarray(labels, "<i4"), LABELS_TAG)
    conditions_sha = None if conditions is None else array_sha256(conditions, CONDITIONS_TAG)
    return _combine(array_sha256(images, IMAGES_TAG), labels_part, conditions_sha)


def _combine(images_sha: str, labels_part: str, conditions_sha: str | None = None) -> str:
    text = f"ddm-shard:v1\n{images_sha}\n{labels_part}" + ("" if conditions_sha is None else f"\n{conditions_sha}")
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _streamed_sha256(store: ts.TensorStore, tag: str) -> str:
    """`array_sha256(array, tag)` of a stored array (images, conditions), read a block of rows at a time."""
    digest = array_hasher(tag, tuple(store.shape))
    row_bytes = int(np.prod(store.shape[1:])) * store.dtype.numpy_dtype.itemsize
    rows = max(1, min(_VERIFY_ROWS, _VERIFY_BYTES // max(1, row_bytes)))
    for lo in range(0, store.shape[0], rows):
        digest.update(np.ascontiguousarray(store[lo:min(lo + rows, store.shape[0])].read().result()).tobytes())
    return digest.hexdigest()


def read_shard_info(path: str) -> dict | None:
    """The shard's `shard.json` (which cluster it holds, count, sha256); None for a shard written without one."""
    raw = _kv_read(path, SHARD_INFO)
    if raw is None:
        return None
    try:
        info = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DDMError(f"shard {path}: {SHARD_INFO} is not valid JSON") from None
    if not isinstance(info, dict) or info.get("format") != SHARD_FORMAT:
        raise DDMError(f"shard {path}: {SHARD_INFO} is not a {SHARD_FORMAT} record")
    return info


# Shards already checked by this process: a process checks each shard once (again if its files changed).
_VERIFIED: set[tuple] = set()


def _files_signature(path: str) -> tuple:
    """(name, size, mtime) of a local shard's files; () for a URL (checked once per process and path)."""
    if "://" in path and not path.startswith("file://"):
        return ()
    root = Path(path.removeprefix("file://"))
    return tuple((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns)
                 for p in sorted(root.rglob("*")) if p.is_file())


def check_shard_holds(path: str, cluster: int | str) -> None:
    """DDMError unless the shard at `path` says (in its shard.json) that it holds `cluster`: one small read, for a
    manifest that points a cluster at another cluster's shard (swapped or copied entries)."""
    info = read_shard_info(path)
    if info is None or info.get("cluster") != cluster:
        held = "no cluster id" if info is None else f"cluster {info.get('cluster')}"
        raise DDMError(f"shard {path} holds {held}, not cluster {cluster}: the manifest points at the wrong shard")


def verify_shard(path: str, sha256: str, cluster: int | str | None, *, images: np.ndarray | None = None,
                 labels: np.ndarray | None = None, conditions: np.ndarray | None = None) -> None:
    """DDMError unless the shard at `path` holds `cluster` (its shard.json says so) and its content digest is
    `sha256`. `images`/`labels`/`conditions`: the shard's rows when the caller already holds them (no second
    read). Checked once per process and (path, digest)."""
    key = (path, sha256, cluster, _files_signature(path))
    if key in _VERIFIED:
        return
    if cluster is not None:
        check_shard_holds(path, cluster)
    try:
        images_sha = (array_sha256(images, IMAGES_TAG) if images is not None
                      else _streamed_sha256(open_shard(path), IMAGES_TAG))
        if labels is None:
            labels = read_labels(path)
        if conditions is not None:
            conditions_sha = array_sha256(conditions, CONDITIONS_TAG)
        else:
            store = open_conditions(path)
            conditions_sha = None if store is None else _streamed_sha256(store, CONDITIONS_TAG)
    except ValueError as err:  # a damaged chunk fails to decode
        raise DDMError(f"shard {path} is damaged: {str(err).splitlines()[0][:200]}") from None
    actual = _combine(images_sha, "-" if labels is None else array_sha256(np.asarray(labels, "<i4"), LABELS_TAG),
                      conditions_sha)
    if actual != sha256:
        raise DDMError(f"shard {path} does not match its digest (expected {sha256[:16]}, got {actual[:16]}): "
                       "refusing to train on it")
    _VERIFIED.add(key)


def open_shard(path: str) -> ts.TensorStore:
    """Opens an existing shard's images for reading; DDMError if they are missing or not an [N, H, W, C] array of
    uint8 images or float16 / float32 latents."""
    try:
        store = ts.open(_spec(path, IMAGES), open=True, read=True).result()
    except ValueError as err:
        raise DDMError(f"cannot open shard {path}: {str(err).splitlines()[0]}") from None
    if store.dtype.name not in STORED_DTYPES or store.rank != 4:
        raise DDMError(f"shard {path} is {store.dtype.name} rank {store.rank}; expected [N, H, W, C] of "
                       f"{', '.join(STORED_DTYPES)}")
    return store


def read_shard(path: str) -> np.ndarray:
    """The whole shard's images: [N, H, W, C] uint8 (or its float16 / float32 latents)."""
    return open_shard(path).read().result()


def _open_optional(path: str, name: str) -> ts.TensorStore | None:
    """A shard's optional per-row array `name` (labels, conditions) opened for reading, or None when the shard
    has none; DDMError (one line) when it exists but cannot be opened."""
    try:
        return ts.open(_spec(path, name), open=True, read=True).result()
    except ValueError as err:
        if "NOT_FOUND" in str(err):
            return None
        raise DDMError(f"cannot open the {name} of shard {path}: {str(err).splitlines()[0]}") from None


def read_labels(path: str) -> np.ndarray | None:
    """The shard's class labels, int32 [N] (same rows as its images), or None for an unlabelled shard.

    DDMError if the labels are not int32 [N] or not one per image.
    """
    store = _open_optional(path, LABELS)
    if store is None:
        return None
    count = open_shard(path).shape[0]
    if store.dtype != ts.int32 or store.shape != (count,):
        raise DDMError(f"shard {path} has labels {store.dtype.name} {list(store.shape)} for {count} images; "
                       f"expected int32 [{count}]")
    return store.read().result()


def open_conditions(path: str) -> ts.TensorStore | None:
    """Opens a shard's condition embeddings for reading; None for a shard without them. DDMError unless they are
    float16 / float32 [N, D] or [N, L, D] with one row per image."""
    store = _open_optional(path, CONDITIONS)
    if store is None:
        return None
    count = open_shard(path).shape[0]
    if store.dtype.name not in CONDITION_DTYPES or store.rank not in (2, 3) or store.shape[0] != count:
        raise DDMError(f"shard {path} has conditions {store.dtype.name} {list(store.shape)} for {count} images; "
                       f"expected float16 / float32 [{count}, D] or [{count}, L, D]")
    return store


def read_conditions(path: str) -> np.ndarray | None:
    """The shard's condition embeddings as stored (float16 / float32 [N, D] or [N, L, D], same rows as its
    images), or None for a shard without them."""
    store = open_conditions(path)
    return None if store is None else store.read().result()


class Batch(NamedTuple):
    """This process's rows of one step's global batch."""

    images: np.ndarray  # [B/P, H, W, C] uint8 (or the shards' float latents)
    clusters: np.ndarray  # [B/P] int32: the cluster id of each row's shard (the router's target)
    # What the model is conditioned on: [B/P] int32 class labels (NO_LABEL, -1, for unlabelled shards), or for
    # shards with condition embeddings float32 [B/P, *condition_shape] (the one conditioning slot).
    classes: np.ndarray


@dataclass(frozen=True)
class ReaderPosition:
    """Where a reader is in its stream; stored in checkpoints so a resumed job continues exactly."""

    epoch: int
    offset: int

    @classmethod
    def at(cls, step: int, batch_size: int, num_rows: int) -> ReaderPosition:
        """Where step `step` of batches of `batch_size` rows starts in the epochs of `num_rows` rows."""
        start = step * batch_size
        return cls(epoch=start // num_rows, offset=start % num_rows)


class ShardReader:
    """Seeded batches from one or more shards: images, each row's cluster id (its shard's entry of
    `cluster_ids`, default the shard's index) and its class label, or its condition embedding (float32) for
    shards with conditions (`Batch`).

    With several shards (router, monolith) the union is shuffled as one dataset, so batches follow the natural
    data distribution: each cluster appears in proportion to its size. Shards are all labelled or all not, and
    all have conditions of one shape and dtype or none. Class labels are always held in memory (4 bytes a row);
    images and conditions are, up to `IN_MEMORY_LIMIT_BYTES` together, and are streamed alike above it.

    `digests`: each shard's expected `shard_sha256`; when given, a shard that does not hold its cluster id or
    whose content differs is refused before the first batch (`verify_shard`).

    `shuffle`: each epoch's order, "global" (a uniform permutation) or "chunks" (shuffled zarr chunks, rows
    mixed within windows of about `shuffle_buffer` rows: `ddm.data.order`); default "chunks" for shards above
    `IN_MEMORY_LIMIT_BYTES`, which are streamed (`in_memory` False) keeping only the decoded chunks of the
    windows in use, so each chunk is decoded once per pass. The order depends on the data only, never on
    `in_memory`. `prefetch`: batches read ahead on a background thread (0: none); `close()` stops it.
    """

    def __init__(self, paths: list[str], *, batch_size: int, seed: int, cluster_ids: list[int] | None = None,
                 process_index: int = 0, process_count: int = 1, in_memory: bool | None = None,
                 digests: list[str] | None = None, shuffle: str | None = None, shuffle_buffer: int = 8192,
                 prefetch: int = 0):
        if not paths:
            raise DDMError("a reader needs at least one shard")
        if not 0 <= process_index < process_count:
            raise DDMError(f"process index {process_index} is not in [0, {process_count})")
        if batch_size % process_count:
            raise DDMError(f"batch size {batch_size} is not divisible by the {process_count} processes")
        self.stores = [open_shard(p) for p in paths]
        shapes = {tuple(s.shape[1:]) for s in self.stores}
        if len(shapes) != 1:
            raise DDMError(f"shards have different image shapes: {sorted(shapes)}")
        self.image_shape: tuple[int, int, int] = shapes.pop()
        dtypes = {s.dtype.name for s in self.stores}
        if len(dtypes) != 1:
            raise DDMError(f"shards hold different dtypes: {sorted(dtypes)}")
        self.dtype = np.dtype(dtypes.pop())
        self.sizes = np.array([s.shape[0] for s in self.stores], np.int64)
        if (self.sizes == 0).any():
            raise DDMError(f"shard {paths[int(np.argmax(self.sizes == 0))]} is empty")
        self.num_images = int(self.sizes.sum())
        self.batch_size, self.seed = batch_size, seed
        self.process_index, self.process_count = process_index, process_count
        self.shard_clusters = np.asarray(cluster_ids if cluster_ids is not None else range(len(paths)), np.int32)
        if self.shard_clusters.shape != (len(paths),):
            raise DDMError(f"{len(self.shard_clusters)} cluster ids for {len(paths)} shards")
        labels = [read_labels(p) for p in paths]
        unlabelled = [p for p, label in zip(paths, labels) if label is None]
        if unlabelled and len(unlabelled) < len(paths):
            labelled = next(p for p, label in zip(paths, labels) if label is not None)
            raise DDMError(f"shard {unlabelled[0]} has no class labels but shard {labelled} has")
        self.labelled = not unlabelled
        self._classes = np.concatenate(labels) if self.labelled else None
        self._offsets = np.concatenate([[0], np.cumsum(self.sizes)])
        self.condition_stores = _condition_stores(paths)
        first = (self.condition_stores or [None])[0]
        # (D,) or (L, D) of the shards' condition embeddings, () without; their stored dtype (None without)
        self.condition_shape: tuple[int, ...] = () if first is None else tuple(first.shape[1:])
        self.condition_dtype = None if first is None else np.dtype(first.dtype.name)
        nbytes = self.num_images * int(np.prod(self.image_shape)) * self.dtype.itemsize
        if first is not None:
            nbytes += self.num_images * int(np.prod(self.condition_shape)) * self.condition_dtype.itemsize
        if in_memory is None:
            in_memory = nbytes <= IN_MEMORY_LIMIT_BYTES
        self.shuffle = shuffle or ("global" if nbytes <= IN_MEMORY_LIMIT_BYTES else "chunks")
        if self.shuffle not in SHUFFLES:
            raise DDMError(f"reader shuffle {self.shuffle!r} is not one of {', '.join(SHUFFLES)}")
        if shuffle_buffer < 1 or prefetch < 0:
            raise DDMError(f"reader shuffle buffer must be >= 1 and prefetch >= 0, got {shuffle_buffer}, {prefetch}")
        self.paths, self.shuffle_buffer = list(paths), shuffle_buffer
        self._epoch_permutation = LatestEpoch(self._permutation)
        self._cache = np.concatenate([s.read().result() for s in self.stores]) if in_memory else None
        self._condition_cache = (np.concatenate([s.read().result() for s in self.condition_stores])
                                 if in_memory and self.condition_stores else None)
        self._spans = chunk_spans(self.sizes, [s.chunk_layout.read_chunk.shape[0] for s in self.stores])
        if self._cache is None:
            # Room for the windows one batch can span (two when batch_size <= shuffle_buffer): the chunks of a
            # window stay until the batches have moved past it, so each chunk is decoded once per pass.
            windows = 1 + -(-batch_size // shuffle_buffer)
            self._chunk_capacity = window_chunks(self._spans, shuffle_buffer) * windows + 1
            # chunk id -> (its images, its conditions or None)
            self._chunks: OrderedDict[int, tuple[np.ndarray, np.ndarray | None]] = OrderedDict()
        self._prefetcher = Prefetcher(self._read_batch, prefetch) if prefetch else None
        if digests is not None:  # each shard must hold its cluster and match its digest (`verify_shard`)
            for i, (path, sha) in enumerate(zip(paths, digests)):
                rows = slice(self._offsets[i], self._offsets[i + 1])
                verify_shard(path, sha, int(self.shard_clusters[i]),
                             images=None if self._cache is None else self._cache[rows],
                             labels=None if self._classes is None else self._classes[rows],
                             conditions=None if self._condition_cache is None else self._condition_cache[rows])

    @property
    def local_batch_size(self) -> int:
        return self.batch_size // self.process_count

    def position(self, step: int) -> ReaderPosition:
        return ReaderPosition.at(step, self.batch_size, self.num_images)

    def _permutation(self, epoch: int) -> np.ndarray:
        return (global_permutation(self.num_images, self.seed, epoch) if self.shuffle == "global"
                else chunk_shuffled_permutation(self._spans, self.seed, epoch, self.shuffle_buffer))

    def global_indices(self, step: int) -> np.ndarray:
        """Indices into the union of shards for the global batch of `step`: [B] int64."""
        return rows_of_span(step * self.batch_size, self.batch_size, self.num_images, self._epoch_permutation)

    def batch(self, step: int) -> Batch:
        """This process's rows of step's global batch (see `Batch`)."""
        return self._read_batch(step) if self._prefetcher is None else self._prefetcher.get(step)

    def close(self) -> None:
        """Stops the prefetch thread, if any (a later `batch` starts it again)."""
        if self._prefetcher is not None:
            self._prefetcher.close()

    def _read_batch(self, step: int) -> Batch:
        lo = self.process_index * self.local_batch_size
        indices = self.global_indices(step)[lo:lo + self.local_batch_size]
        shard = np.searchsorted(self._offsets, indices, side="right") - 1
        clusters = self.shard_clusters[shard]
        classes = self._classes[indices] if self.labelled else np.full(len(indices), NO_LABEL, np.int32)
        if self._cache is not None:
            conditions = None if self._condition_cache is None else self._condition_cache[indices]
            return self._batch(self._cache[indices], clusters, classes, conditions)
        if self.shuffle == "global":  # rows all over the data: read just them (each touched chunk decoded once)
            images = self._read_rows(self.stores, indices, shard, self.image_shape, self.dtype)
            conditions = None if not self.condition_stores else self._read_rows(
                self.condition_stores, indices, shard, self.condition_shape, self.condition_dtype)
            return self._batch(images, clusters, classes, conditions)
        chunk = np.searchsorted(self._spans[:, 0], indices, side="right") - 1
        needed = np.unique(chunk)
        self._load_chunks(needed)
        images = np.empty((len(indices),) + self.image_shape, self.dtype)
        conditions = (np.empty((len(indices),) + self.condition_shape, self.condition_dtype)
                      if self.condition_stores else None)
        order = np.argsort(chunk, kind="stable")
        cuts = np.searchsorted(chunk[order], needed)
        for c, rows in zip(needed, np.split(order, cuts[1:])):
            held_images, held_conditions = self._chunks[c]
            images[rows] = held_images[indices[rows] - self._spans[c, 0]]
            if conditions is not None:
                conditions[rows] = held_conditions[indices[rows] - self._spans[c, 0]]
        return self._batch(images, clusters, classes, conditions)

    @staticmethod
    def _batch(images: np.ndarray, clusters: np.ndarray, classes: np.ndarray,
               conditions: np.ndarray | None) -> Batch:
        """The batch; shards with conditions put them, as float32, where class labels go."""
        return Batch(images, clusters, classes if conditions is None else conditions.astype(np.float32))

    def _read_rows(self, stores: list[ts.TensorStore], indices: np.ndarray, shard: np.ndarray,
                   row_shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """Rows `indices` (of shards `shard`) read from `stores` (the images', or the conditions'):
        [len(indices), *row_shape] of `dtype`."""
        out = np.empty((len(indices),) + tuple(row_shape), dtype)
        for k in np.unique(shard):
            rows = shard == k
            local = indices[rows] - self._offsets[k]
            order = np.argsort(local)  # sorted reads touch each chunk once
            try:
                out[np.flatnonzero(rows)[order]] = stores[k][local[order]].read().result()
            except ValueError as err:  # a damaged or vanished chunk
                raise DDMError(f"cannot read shard {self.paths[k]}: {str(err).splitlines()[0][:200]}") from None
        return out

    def _load_chunks(self, needed: np.ndarray) -> None:
        """Decodes the chunks of `needed` (chunk ids, rows of `_spans`) not yet held, all reads in flight at
        once, and drops the least recently used beyond the capacity."""
        for c in needed:
            if c in self._chunks:
                self._chunks.move_to_end(c)
        missing = [int(c) for c in needed if c not in self._chunks]
        reads = []
        for c in missing:
            start, end = self._spans[c]
            k = int(np.searchsorted(self._offsets, start, side="right") - 1)
            rows = slice(start - self._offsets[k], end - self._offsets[k])
            reads.append((k, self.stores[k][rows].read(),
                          self.condition_stores[k][rows].read() if self.condition_stores else None))
        for c, (k, images, conditions) in zip(missing, reads):
            try:
                self._chunks[c] = (images.result(), None if conditions is None else conditions.result())
            except ValueError as err:  # a damaged or vanished chunk
                raise DDMError(f"cannot read shard {self.paths[k]}: {str(err).splitlines()[0][:200]}") from None
        while len(self._chunks) > max(self._chunk_capacity, len(needed)):
            self._chunks.popitem(last=False)


def _condition_stores(paths: list[str]) -> list[ts.TensorStore] | None:
    """Each shard's condition store, or None when no shard has conditions; DDMError when some have them and some
    do not, or their shapes or dtypes differ."""
    stores = [open_conditions(p) for p in paths]
    if all(s is None for s in stores):
        return None
    without = [p for p, s in zip(paths, stores) if s is None]
    if without:
        conditioned = next(p for p, s in zip(paths, stores) if s is not None)
        raise DDMError(f"shard {without[0]} has no conditions but shard {conditioned} has")
    kinds = {(tuple(s.shape[1:]), s.dtype.name) for s in stores}
    if len(kinds) != 1:
        raise DDMError(f"shards have conditions of different shapes or dtypes: {sorted(kinds)}")
    return stores


def check_conditioned(reader: ShardReader, condition_shape: tuple[int, ...]) -> None:
    """DDMError unless the reader's shards carry condition embeddings of exactly `condition_shape` (() : none),
    the shape the model is conditioned on."""
    shape = tuple(condition_shape or ())
    if shape != reader.condition_shape:
        held = f"conditions of shape {list(reader.condition_shape)}" if reader.condition_shape else "no conditions"
        model = f"conditions of shape {list(shape)}" if shape else "no condition embeddings"
        raise DDMError(f"the model takes {model} but the shards have {held}")


def check_labelled(reader: ShardReader, num_classes: int) -> None:
    """DDMError unless the reader's shards carry class labels exactly when the model is class-conditional."""
    if num_classes and not reader.labelled:
        raise DDMError(f"the model is class-conditional ({num_classes} classes) but the shards have no class labels")
    if not num_classes and reader.labelled:
        raise DDMError("the shards have class labels but the model is unconditional (num_classes=0)")
