"""Cluster shards as zarr arrays (through tensorstore) and a seeded, resumable batch reader.

A shard is a folder of zarr arrays with one row per image, all in the same order:

    SHARD/images/   uint8 [N_k, H, W, C], chunked along N so an island reads only the chunks it needs
    SHARD/labels/   int32 [N_k] class labels (only when the dataset has them)

Paths may be local or any kvstore URL tensorstore understands (gs://, s3://, file://). Further per-row arrays
(latents, digests) go beside these two.

The reader is a pure function of the step: the global batch for step s is the s-th block of B indices in the
stream of per-epoch permutations (seeded by (seed, epoch)). Its "position" is therefore just the step, which
makes resume exact, and each process of a multi-host job reads only its own rows of that block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import tensorstore as ts

from ddm.core.errors import DDMError

# Above this many bytes a reader streams rows from the store instead of caching the whole shard in memory.
IN_MEMORY_LIMIT_BYTES = 2 << 30
IMAGES, LABELS = "images", "labels"  # the arrays inside a shard folder
NO_LABEL = -1  # the class a reader gives rows of unlabelled shards


def _kvstore(path: str, array: str) -> dict | str:
    """The kvstore of array `array` inside shard folder `path`."""
    if "://" in path and not path.startswith("file://"):
        return f"{path.rstrip('/')}/{array}/"
    return {"driver": "file", "path": f"{path.removeprefix('file://').rstrip('/')}/{array}/"}


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
    (uint8, or float16 / float32 latents, stored exactly) and, for labelled data, labels [N] int32.

    Blocks that start at multiples of `chunk` rows write whole chunks: no chunk is read back and rewritten.
    """

    def __init__(self, path: str, num_rows: int, row_shape: tuple[int, ...], dtype, labelled: bool,
                 chunk: int = 256):
        dtype = np.dtype(dtype)
        if dtype.name not in STORED_DTYPES or len(row_shape) != 3:
            raise DDMError(f"shard {path}: expected [N, H, W, C] of {', '.join(STORED_DTYPES)}, got {dtype} "
                           f"[{num_rows}, {', '.join(map(str, row_shape))}]")
        self.path, self.num_rows, self.dtype = path, num_rows, dtype
        self.images = _create_array(path, IMAGES, (num_rows, *row_shape), dtype, chunk)
        if labelled:
            # Labels are tiny: one chunk per image chunk keeps a streamed read of a row range to one chunk each.
            self.labels = _create_array(path, LABELS, (num_rows,), np.int32, chunk)
        else:
            self.labels = None
            _delete_array(path, LABELS)

    def write(self, start: int, images: np.ndarray, labels: np.ndarray | None = None) -> None:
        """Rows [start, start + len(images)): images of the shard's dtype and shape, labels [n] integers >= 0."""
        if images.dtype != self.dtype or tuple(images.shape[1:]) != tuple(self.images.shape[1:]):
            raise DDMError(f"shard {self.path}: expected {self.dtype} [n, {', '.join(map(str, self.images.shape[1:]))}]"
                           f", got {images.dtype} {images.shape}")
        if (labels is None) != (self.labels is None):
            raise DDMError(f"shard {self.path}: labels {'missing' if labels is None else 'given'} for a "
                           f"{'labelled' if self.labels is not None else 'unlabelled'} shard")
        if labels is not None:
            labels = _checked_labels(self.path, labels, len(images))
        end = start + len(images)
        try:
            self.images[start:end].write(images).result()
            if labels is not None:
                self.labels[start:end].write(labels.astype(np.int32)).result()
        except ValueError as err:
            raise DDMError(f"cannot write shard {self.path}: {str(err).splitlines()[0]}") from None


def write_shard(path: str, images: np.ndarray, labels: np.ndarray | None = None, chunk: int = 256) -> None:
    """Writes shard folder `path` (replacing any shard there) in one go: images [N, H, W, C] uint8 (or float16 /
    float32 latents) and, for labelled data, labels [N] integer class labels in the same row order."""
    if images.ndim != 4:
        raise DDMError(f"shard {path}: expected [N, H, W, C], got {images.dtype} {images.shape}")
    if labels is not None:
        labels = _checked_labels(path, labels, len(images))
    writer = ShardWriter(path, len(images), images.shape[1:], images.dtype, labels is not None, chunk)
    writer.write(0, images, labels)


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


def read_labels(path: str) -> np.ndarray | None:
    """The shard's class labels, int32 [N] (same rows as its images), or None for an unlabelled shard.

    DDMError if the labels are not int32 [N] or not one per image.
    """
    try:
        store = ts.open(_spec(path, LABELS), open=True, read=True).result()
    except ValueError as err:
        if "NOT_FOUND" in str(err):
            return None
        raise DDMError(f"cannot open the labels of shard {path}: {str(err).splitlines()[0]}") from None
    count = open_shard(path).shape[0]
    if store.dtype != ts.int32 or store.shape != (count,):
        raise DDMError(f"shard {path} has labels {store.dtype.name} {list(store.shape)} for {count} images; "
                       f"expected int32 [{count}]")
    return store.read().result()


class Batch(NamedTuple):
    """This process's rows of one step's global batch."""

    images: np.ndarray  # [B/P, H, W, C] uint8 (or the shards' float latents)
    clusters: np.ndarray  # [B/P] int32: the cluster id of each row's shard (the router's target)
    classes: np.ndarray  # [B/P] int32: each row's class label; NO_LABEL (-1) for unlabelled shards


@dataclass(frozen=True)
class ReaderPosition:
    """Where a reader is in its stream; stored in checkpoints so a resumed job continues exactly."""

    epoch: int
    offset: int


class ShardReader:
    """Seeded batches from one or more shards: images, each row's cluster id (its shard's entry of
    `cluster_ids`, default the shard's index) and its class label.

    With several shards (router, monolith) the union is shuffled as one dataset, so batches follow the natural
    data distribution: each cluster appears in proportion to its size. Shards are all labelled or all not.
    Class labels are always held in memory (4 bytes a row); images are, up to `IN_MEMORY_LIMIT_BYTES`.
    """

    def __init__(self, paths: list[str], *, batch_size: int, seed: int, cluster_ids: list[int] | None = None,
                 process_index: int = 0, process_count: int = 1, in_memory: bool | None = None):
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
        nbytes = self.num_images * int(np.prod(self.image_shape)) * self.dtype.itemsize
        if in_memory is None:
            in_memory = nbytes <= IN_MEMORY_LIMIT_BYTES
        self._perm_epoch, self._perm = -1, np.empty(0, np.int64)
        self._cache = np.concatenate([s.read().result() for s in self.stores]) if in_memory else None

    @property
    def local_batch_size(self) -> int:
        return self.batch_size // self.process_count

    def position(self, step: int) -> ReaderPosition:
        start = step * self.batch_size
        return ReaderPosition(epoch=start // self.num_images, offset=start % self.num_images)

    def _epoch_permutation(self, epoch: int) -> np.ndarray:
        # One epoch's permutation serves many steps; keep the latest instead of redrawing it every batch.
        if self._perm_epoch != epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_images)
            self._perm_epoch = epoch
        return self._perm

    def global_indices(self, step: int) -> np.ndarray:
        """Indices into the union of shards for the global batch of `step`: [B] int64."""
        start = step * self.batch_size
        out, filled = np.empty(self.batch_size, np.int64), 0
        while filled < self.batch_size:
            epoch, offset = divmod(start + filled, self.num_images)
            take = min(self.batch_size - filled, self.num_images - offset)
            out[filled:filled + take] = self._epoch_permutation(epoch)[offset:offset + take]
            filled += take
        return out

    def batch(self, step: int) -> Batch:
        """This process's rows of step's global batch (see `Batch`)."""
        lo = self.process_index * self.local_batch_size
        indices = self.global_indices(step)[lo:lo + self.local_batch_size]
        shard = np.searchsorted(self._offsets, indices, side="right") - 1
        clusters = self.shard_clusters[shard]
        classes = self._classes[indices] if self.labelled else np.full(len(indices), NO_LABEL, np.int32)
        if self._cache is not None:
            return Batch(self._cache[indices], clusters, classes)
        images = np.empty((len(indices),) + self.image_shape, self.dtype)
        for k in np.unique(shard):
            rows = shard == k
            local = indices[rows] - self._offsets[k]
            order = np.argsort(local)  # sorted reads touch each chunk once
            images[np.flatnonzero(rows)[order]] = self.stores[k][local[order]].read().result()
        return Batch(images, clusters, classes)


def check_labelled(reader: ShardReader, num_classes: int) -> None:
    """DDMError unless the reader's shards carry class labels exactly when the model is class-conditional."""
    if num_classes and not reader.labelled:
        raise DDMError(f"the model is class-conditional ({num_classes} classes) but the shards have no class labels")
    if not num_classes and reader.labelled:
        raise DDMError("the shards have class labels but the model is unconditional (num_classes=0)")
