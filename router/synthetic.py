"""The router's training set when it is not the shards: arrays in memory (images the experts drew), their
digest, and a reader that batches them exactly as the shard reader batches shards.

`ddm.sampling.router_set` draws the images (sampling sits above the router, so the router trains on what it is
handed and never imports a sampler); `ddm.router.train.train_router` trains on a `TrainingSet` as it trains on
the shards: the same loss, the same trainer, each row's cluster id as the target.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

from ddm.core.errors import DDMError
from ddm.core.hashing import array_sha256
from ddm.data.order import LatestEpoch, global_permutation, rows_of_span
from ddm.data.shards import Batch, ReaderPosition

SET_TAG = "ddm-router-set:v1"


def allocate(counts: np.ndarray, total: int) -> np.ndarray:
    """`total` draws split over the cells of `counts` (any shape, counts >= 0) in proportion to them, by largest
    remainder (ties to the lower flat index): int64 of counts' shape, summing to `total`, and 0 wherever the
    count is 0. DDMError when every count is 0."""
    counts = np.asarray(counts, np.float64)
    mass = counts.sum()
    if not mass > 0:
        raise DDMError("the manifest's counts are all 0: there is nothing to draw in proportion to")
    exact = counts.ravel() * (total / mass)
    out = np.floor(exact).astype(np.int64)
    remainder = exact - out
    order = np.lexsort((np.arange(len(exact)), -remainder))  # largest remainder first, then the lower index
    out[order[:total - int(out.sum())]] += 1
    return out.reshape(counts.shape)


@dataclasses.dataclass(frozen=True)
class TrainingSet:
    """A router training set held in memory.

    images: [N, H, W, C] stored rows (uint8 images, or float32 latents for latent runs), as a shard holds them.
    clusters: [N] int32, the cluster whose expert drew each row (the router's target).
    classes: [N] int32, the class each row was drawn for (-1 for unlabelled runs).
    info: how it was made (source, sizes, solver settings), recorded in the router's manifest entry beside
        `sha256`.
    """

    images: np.ndarray
    clusters: np.ndarray
    classes: np.ndarray
    info: dict

    def __post_init__(self) -> None:
        n = len(self.images)
        if n == 0 or self.images.ndim != 4:
            raise DDMError(f"a router training set needs images [N > 0, H, W, C], got shape {self.images.shape}")
        if self.clusters.shape != (n,) or self.classes.shape != (n,):
            raise DDMError(f"a router training set needs one cluster and one class per image ({n}), got "
                           f"{self.clusters.shape} and {self.classes.shape}")

    @property
    def sha256(self) -> str:
        """SHA-256 over the digests of images (their dtype, little-endian), clusters and classes (int32): equal
        exactly when the three arrays are bitwise equal."""
        dtype = self.images.dtype.newbyteorder("<")
        parts = [array_sha256(self.images, f"{SET_TAG}:images:{dtype.name}", dtype),
                 array_sha256(self.clusters, f"{SET_TAG}:clusters", np.dtype("<i4")),
                 array_sha256(self.classes, f"{SET_TAG}:classes", np.dtype("<i4"))]
        return hashlib.sha256("\n".join(parts).encode("ascii")).hexdigest()

    @property
    def labelled(self) -> bool:
        return bool((self.classes >= 0).all())

    def describe(self) -> dict:
        """What the router's manifest entry records about it: `info` plus the digest and the row count."""
        return {**self.info, "sha256": self.sha256, "num_images": len(self.images)}


class ArrayReader:
    """A `ddm.train.trainer.BatchReader` over a `TrainingSet`: each epoch a uniform permutation of all rows
    (`ddm.data.order.global_permutation`, as the shard reader's in-memory order), so a batch is a pure function
    of (seed, step) and a resumed run reads what an uninterrupted one would."""

    def __init__(self, data: TrainingSet, *, batch_size: int, seed: int, process_index: int = 0,
                 process_count: int = 1):
        if not 0 <= process_index < process_count:
            raise DDMError(f"process index {process_index} is not in [0, {process_count})")
        if batch_size % process_count:
            raise DDMError(f"batch size {batch_size} is not divisible by the {process_count} processes")
        self.data = data
        self.num_images = len(data.images)
        self.image_shape: tuple[int, int, int] = tuple(int(s) for s in data.images.shape[1:])
        self.batch_size, self.seed = batch_size, seed
        self.process_index, self.process_count = process_index, process_count
        self.labelled = data.labelled
        self._epoch_permutation = LatestEpoch(lambda epoch: global_permutation(self.num_images, seed, epoch))

    def position(self, step: int) -> ReaderPosition:
        return ReaderPosition.at(step, self.batch_size, self.num_images)

    def batch(self, step: int) -> Batch:
        local = self.batch_size // self.process_count
        indices = rows_of_span(step * self.batch_size + self.process_index * local, local, self.num_images,
                               self._epoch_permutation)
        return Batch(self.data.images[indices], self.data.clusters[indices], self.data.classes[indices])
