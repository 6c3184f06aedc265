"""Cluster shards as zarr arrays (through tensorstore) and a seeded, resumable batch reader.

A shard is uint8 [N_k, H, W, C], chunked along N so an island reads only the chunks it needs. Paths may be
local or any kvstore URL tensorstore understands (gs://, s3://, file://).

The reader is a pure function of the step: the global batch for step s is the s-th block of B indices in the
stream of per-epoch permutations (seeded by (seed, epoch)). Its "position" is therefore just the step, which
makes resume exact, and each process of a multi-host job reads only its own rows of that block.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tensorstore as ts

from ddm.core.errors import DDMError

# Above this many bytes a reader streams rows from the store instead of caching the whole shard in memory.
IN_MEMORY_LIMIT_BYTES = 2 << 30


def _spec(path: str) -> dict:
    if "://" in path and not path.startswith("file://"):
        return {"driver": "zarr", "kvstore": path}
    return {"driver": "zarr", "kvstore": {"driver": "file", "path": path.removeprefix("file://")}}


def write_shard(path: str, images: np.ndarray, chunk: int = 256) -> None:
    """Writes images: [N, H, W, C] uint8 as a zarr array at `path` (replacing any array there)."""
    if images.dtype != np.uint8 or images.ndim != 4:
        raise DDMError(f"shard {path}: expected uint8 [N, H, W, C], got {images.dtype} {images.shape}")
    chunk_shape = [max(1, min(chunk, len(images)))] + list(images.shape[1:])
    try:
        store = ts.open(
            _spec(path), create=True, delete_existing=True, dtype=ts.uint8, shape=images.shape,
            chunk_layout=ts.ChunkLayout(chunk_shape=chunk_shape),
        ).result()
        store.write(images).result()
    except ValueError as err:
        raise DDMError(f"cannot write shard {path}: {str(err).splitlines()[0]}") from None


def open_shard(path: str) -> ts.TensorStore:
    """Opens an existing shard for reading; DDMError if it is missing or not a uint8 image array."""
    try:
        store = ts.open(_spec(path), open=True, read=True).result()
    except ValueError as err:
        raise DDMError(f"cannot open shard {path}: {str(err).splitlines()[0]}") from None
    if store.dtype != ts.uint8 or store.rank != 4:
        raise DDMError(f"shard {path} is {store.dtype} rank {store.rank}; expected uint8 [N, H, W, C]")
    return store


def read_shard(path: str) -> np.ndarray:
    """The whole shard: [N, H, W, C] uint8."""
    return open_shard(path).read().result()


@dataclass(frozen=True)
class ReaderPosition:
    """Where a reader is in its stream; stored in checkpoints so a resumed job continues exactly."""

    epoch: int
    offset: int


class ShardReader:
    """Seeded batches from one or more shards, with the shard index as label.

    With several shards (router, monolith) the union is shuffled as one dataset, so batches follow the natural
    data distribution: each cluster appears in proportion to its size.
    """

    def __init__(self, paths: list[str], *, batch_size: int, seed: int, labels: list[int] | None = None,
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
        self.sizes = np.array([s.shape[0] for s in self.stores], np.int64)
        if (self.sizes == 0).any():
            raise DDMError(f"shard {paths[int(np.argmax(self.sizes == 0))]} is empty")
        self.num_images = int(self.sizes.sum())
        self.batch_size, self.seed = batch_size, seed
        self.process_index, self.process_count = process_index, process_count
        self.shard_labels = np.asarray(labels if labels is not None else range(len(paths)), np.int32)
        self._offsets = np.concatenate([[0], np.cumsum(self.sizes)])
        nbytes = self.num_images * int(np.prod(self.image_shape))
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

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """This process's rows of step's global batch: (images [B/P, H, W, C] uint8, labels [B/P] int32)."""
        lo = self.process_index * self.local_batch_size
        indices = self.global_indices(step)[lo:lo + self.local_batch_size]
        shard = np.searchsorted(self._offsets, indices, side="right") - 1
        labels = self.shard_labels[shard]
        if self._cache is not None:
            return self._cache[indices], labels
        images = np.empty((len(indices),) + self.image_shape, np.uint8)
        for k in np.unique(shard):
            rows = shard == k
            local = indices[rows] - self._offsets[k]
            order = np.argsort(local)  # sorted reads touch each chunk once
            images[np.flatnonzero(rows)[order]] = self.stores[k][local[order]].read().result()
        return images, labels
