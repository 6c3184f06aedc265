"""The chunk-aware reader order (`ddm.data.order`) and background prefetch (`ddm.data.prefetch`)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from ddm.core.errors import DDMError
from ddm.data.order import chunk_shuffled_permutation, chunk_spans
from ddm.data.prefetch import Prefetcher
from ddm.data.shards import ShardReader, write_shard

SIZES, CHUNK = (37, 50, 13), 8


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    """Three labelled float16 shards of SIZES rows in chunks of CHUNK: pixel (0, 0, 0) holds the shard id,
    (0, 1, 0) the row, and the class of row r of shard k is (3 * r + k) % 7."""
    root = tmp_path_factory.mktemp("reader")
    paths = []
    for k, n in enumerate(SIZES):
        rows = np.random.default_rng(k).standard_normal((n, 2, 2, 1)).astype(np.float16)
        rows[:, 0, 0, 0], rows[:, 0, 1, 0] = k, np.arange(n)
        write_shard(str(root / f"c{k}"), rows, (3 * np.arange(n) + k) % 7, chunk=CHUNK)
        paths.append(str(root / f"c{k}"))
    return paths


def test_chunk_order_is_a_permutation_of_whole_chunk_windows():
    spans = chunk_spans(np.array(SIZES), [CHUNK] * 3)
    assert spans.tolist()[:6] == [[0, 8], [8, 16], [16, 24], [24, 32], [32, 37], [37, 45]]
    for epoch in range(3):
        perm = chunk_shuffled_permutation(spans, seed=5, epoch=epoch, buffer_rows=20)
        assert sorted(perm.tolist()) == list(range(sum(SIZES)))  # every row once per epoch
        # Windows of 3 chunks (ceil(20 / mean chunk 7.7)): each window's rows are exactly its chunks' rows.
        chunk_of = np.searchsorted(spans[:, 0], perm, side="right") - 1
        lo = 0
        while lo < len(perm):
            window = set(chunk_of[lo:lo + 1].tolist())
            hi = lo
            while len(window) <= 3 and hi < len(perm):
                hi += 1
                window = set(chunk_of[lo:hi + 1].tolist())
            chunks = set(chunk_of[lo:hi].tolist())
            assert sum(spans[c, 1] - spans[c, 0] for c in chunks) == hi - lo  # whole chunks, none split
            lo = hi
    a, b = (chunk_shuffled_permutation(spans, seed=5, epoch=e, buffer_rows=20) for e in (0, 1))
    assert not np.array_equal(a, b) and np.array_equal(a, chunk_shuffled_permutation(spans, 5, 0, 20))


def test_streaming_chunk_reader_resumes_exactly_and_decodes_each_chunk_once(shards):
    kw = {"batch_size": 12, "seed": 3, "shuffle": "chunks", "shuffle_buffer": 16}
    memory = ShardReader(shards, in_memory=True, **kw)
    stream = ShardReader(shards, in_memory=False, prefetch=2, **kw)
    late = ShardReader(shards, in_memory=False, prefetch=2, **kw)
    decoded = []
    stream._load_chunks = _counting(stream._load_chunks, stream, decoded)
    n, chunks = sum(SIZES), len(chunk_spans(np.array(SIZES), [CHUNK] * 3))
    steps = 3 * n // 12  # three epochs
    seen = []
    for step in range(steps):
        images, clusters, classes = stream.batch(step)
        if step >= 10:  # a reader started at step 10 gives the same batches from there on
            other = late.batch(step)
            assert images.tobytes() == other.images.tobytes() and np.array_equal(classes, other.classes)
        if step in (0, 9, steps - 1):
            assert images.tobytes() == memory.batch(step).images.tobytes()
        shard, row = images[:, 0, 0, 0].astype(int), images[:, 0, 1, 0].astype(int)
        np.testing.assert_array_equal(clusters, shard)
        np.testing.assert_array_equal(classes, (3 * row + shard) % 7)
        seen += list(zip(shard.tolist(), row.tolist()))
    first_epoch = seen[:n]
    assert len(set(first_epoch)) == n  # every row once per epoch
    # Each chunk decoded at most about once per pass (a window may straddle an epoch; chunks still held from the
    # previous epoch are not decoded again), against about one chunk per row for a global order.
    assert chunks <= sum(decoded) <= 3 * chunks + 3
    for reader in (stream, late):
        reader.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("ddm-prefetch")]


def _counting(load, reader, decoded):
    def wrapped(needed):
        decoded.append(sum(1 for c in needed if c not in reader._chunks))
        return load(needed)
    return wrapped


def test_prefetch_gives_fetch_of_any_step_and_raises_its_errors():
    calls = []

    def fetch(step):
        calls.append(step)
        if step == 7:
            raise DDMError("shard x is damaged: step 7")
        return step * step

    pre = Prefetcher(fetch, depth=3)
    assert [pre.get(s) for s in (0, 1, 2, 5, 6, 0)] == [0, 1, 4, 25, 36, 0]  # jumps restart the thread
    with pytest.raises(DDMError, match=r"^shard x is damaged: step 7$"):
        for s in range(1, 10):
            pre.get(s)
    assert pre.get(3) == 9  # afresh after an error
    pre.close()
    pre.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("ddm-prefetch")]


def test_damaged_chunk_is_one_line_error_through_prefetch(shards, tmp_path):
    import shutil

    copy = str(tmp_path / "c1")
    shutil.copytree(shards[1], copy)
    reader = ShardReader([shards[0], copy], batch_size=40, seed=0, in_memory=False, shuffle="chunks", prefetch=2)
    for chunk in Path(copy, "images").glob("[0-9]*"):
        chunk.write_bytes(b"not a chunk")
    with pytest.raises(DDMError, match=r"^cannot read shard .*c1: "):
        for step in range(5):
            reader.batch(step)
    reader.close()
