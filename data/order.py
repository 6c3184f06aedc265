"""Epoch orders for the shard reader: pure functions of (seed, epoch), so a batch is a pure function of the step.

Two orders over the N rows of the union of shards (row r of shard k is global index offsets[k] + r):

- `global_permutation`: a uniform permutation of all rows. Right when the rows are held in memory: any row
  costs the same.
- `chunk_shuffled_permutation`: the zarr chunks in a shuffled order, cut into windows of a few chunks (the
  *shuffle buffer*), the rows of each window shuffled among themselves. A reader streaming from the store then
  needs only the chunks of the current window, so each chunk is decoded once per pass instead of once per row
  of a random batch. Every row still appears exactly once per epoch; neighbouring batches share windows, so
  batches are less independent than under a global permutation (the classic shuffle-buffer trade-off; a window
  of thousands of rows from dozens of random places in the data keeps them close).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np


def global_permutation(num_rows: int, seed: int, epoch: int) -> np.ndarray:
    """Epoch `epoch`'s order of all rows: [N] int64, uniform. (The reader's order since the first version.)"""
    return np.random.default_rng([seed, epoch]).permutation(num_rows)


def rows_of_span(start: int, count: int, num_rows: int, epoch_order: Callable[[int], np.ndarray]) -> np.ndarray:
    """Positions start .. start + count - 1 of the endless sequence of epochs, epoch e ordered by
    `epoch_order(e)` (a permutation of the `num_rows` rows): [count] int64 row indices. A span (a batch) may
    cross epoch boundaries."""
    out, filled = np.empty(count, np.int64), 0
    while filled < count:
        epoch, offset = divmod(start + filled, num_rows)
        take = min(count - filled, num_rows - offset)
        out[filled:filled + take] = epoch_order(epoch)[offset:offset + take]
        filled += take
    return out


class LatestEpoch:
    """`order(epoch)` (an epoch's row order), computed once and kept until another epoch is asked for: one
    epoch's order serves many steps. The held (epoch, order) is one tuple, replaced whole, so a prefetch thread
    and the caller never see an epoch with another epoch's order."""

    def __init__(self, order: Callable[[int], np.ndarray]):
        self._order = order
        self._held: tuple[int, np.ndarray] = (-1, np.empty(0, np.int64))

    def __call__(self, epoch: int) -> np.ndarray:
        held_epoch, perm = self._held
        if held_epoch != epoch:
            perm = self._order(epoch)
            self._held = (epoch, perm)
        return perm


def chunk_spans(sizes: np.ndarray, chunk_rows: list[int]) -> np.ndarray:
    """[C, 2] int64 (start, end) global row ranges of every stored chunk: shard k (`sizes[k]` rows, chunks of
    `chunk_rows[k]` rows, the last one possibly shorter) after shards 0..k-1."""
    spans, offset = [], 0
    for size, chunk in zip(sizes, chunk_rows):
        starts = np.arange(0, int(size), int(chunk), dtype=np.int64)
        spans.append(np.stack([starts, np.minimum(starts + chunk, size)], axis=1) + offset)
        offset += int(size)
    return np.concatenate(spans)


def window_chunks(spans: np.ndarray, buffer_rows: int) -> int:
    """Chunks per shuffle window: ceil(buffer_rows / mean chunk rows), at least 1."""
    return max(1, -(-int(buffer_rows) * len(spans) // int((spans[:, 1] - spans[:, 0]).sum())))


def chunk_shuffled_permutation(spans: np.ndarray, seed: int, epoch: int, buffer_rows: int) -> np.ndarray:
    """Epoch `epoch`'s chunk-aware order: [N] int64, a permutation of all rows of `spans` ([C, 2], from
    `chunk_spans`). Chunks are shuffled, grouped in consecutive windows of `window_chunks` chunks, and the rows
    of each window are shuffled together."""
    rng = np.random.default_rng([seed, epoch, 1])  # its own stream: never the global permutation's draws
    order = spans[rng.permutation(len(spans))]
    lengths = order[:, 1] - order[:, 0]
    per_window = window_chunks(spans, buffer_rows)
    # Rows of the chunks in shuffled order, then one shuffle per window of `per_window` chunks.
    rows = np.repeat(order[:, 0] - np.cumsum(lengths) + lengths, lengths) + np.arange(int(lengths.sum()))
    bounds = np.concatenate([[0], np.cumsum(lengths)])[::per_window]
    bounds = np.append(bounds, len(rows)) if bounds[-1] != len(rows) else bounds
    for lo, hi in itertools.pairwise(bounds):
        rows[lo:hi] = rows[lo:hi][rng.permutation(hi - lo)]
    return rows
