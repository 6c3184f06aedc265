"""Zarr shards through tensorstore, the seeded ShardReader, and the run manifest."""

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from ddm.core.errors import DDMError
from ddm.data import manifest as mf
from ddm.data.shards import NO_LABEL, ReaderPosition, ShardReader, open_shard, read_labels, read_shard, write_shard

REPO = Path(__file__).resolve().parents[1]


def _images(n: int, seed: int = 0, shape=(4, 4, 1)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n,) + shape, dtype=np.uint8)


# --- shards -----------------------------------------------------------------------------------------------


def test_write_read_round_trip_and_chunking(tmp_path):
    images = _images(23, shape=(5, 6, 3))
    path = str(tmp_path / "s")
    write_shard(path, images, chunk=8)
    back = read_shard(path)
    assert back.dtype == np.uint8 and back.tobytes() == images.tobytes() and back.shape == images.shape
    store = open_shard(path)
    assert list(store.chunk_layout.read_chunk.shape) == [8, 5, 6, 3]  # chunked along N only
    meta = json.loads((tmp_path / "s" / "images" / ".zarray").read_text())
    assert meta["chunks"] == [8, 5, 6, 3] and meta["shape"] == [23, 5, 6, 3]
    assert sorted(p.name for p in (tmp_path / "s" / "images").iterdir() if p.name != ".zarray") == [
        "0.0.0.0", "1.0.0.0", "2.0.0.0"]
    np.testing.assert_array_equal(store[9:17].read().result(), images[9:17])
    # A chunk longer than the shard is clipped; rewriting replaces the old array; file:// URLs work.
    write_shard("file://" + path, images[:3], chunk=256)
    assert open_shard(path).shape == (3, 5, 6, 3)
    assert read_shard(path).tobytes() == images[:3].tobytes()


def test_bad_shards(tmp_path):
    with pytest.raises(DDMError, match="uint8"):
        write_shard(str(tmp_path / "f"), np.zeros((2, 3, 3, 1), np.float64))  # float16 / float32 are latents
    with pytest.raises(DDMError, match="uint8"):
        write_shard(str(tmp_path / "f"), np.zeros((2, 3, 3), np.uint8))
    with pytest.raises(DDMError, match="cannot open shard .*missing"):
        open_shard(str(tmp_path / "missing"))
    with pytest.raises(DDMError, match="at least one"):
        ShardReader([], batch_size=4, seed=0)
    write_shard(str(tmp_path / "a"), _images(5))
    write_shard(str(tmp_path / "b"), _images(5, shape=(4, 4, 3)))
    with pytest.raises(DDMError, match="different image shapes"):
        ShardReader([str(tmp_path / "a"), str(tmp_path / "b")], batch_size=4, seed=0)
    with pytest.raises(DDMError, match="not divisible"):
        ShardReader([str(tmp_path / "a")], batch_size=5, seed=0, process_count=2)
    with pytest.raises(DDMError, match="process index 2"):
        ShardReader([str(tmp_path / "a")], batch_size=4, seed=0, process_index=2, process_count=2)


# --- reader -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def three_shards(tmp_path_factory):
    """Three shards of sizes 60, 30, 10 whose pixel (0, 0, 0) holds the shard id and (0, 1, 0) the row."""
    root = tmp_path_factory.mktemp("shards")
    paths, sizes = [], (60, 30, 10)
    for k, n in enumerate(sizes):
        images = _images(n, seed=k)
        images[:, 0, 0, 0] = k
        images[:, 0, 1, 0] = np.arange(n)
        write_shard(str(root / f"cluster_{k}"), images, chunk=16)
        paths.append(str(root / f"cluster_{k}"))
    return paths, sizes


def _ids(images: np.ndarray) -> np.ndarray:
    """(shard, row) of each image of the union, as one int: shard * 1000 + row."""
    return images[:, 0, 0, 0].astype(np.int64) * 1000 + images[:, 0, 1, 0]


def test_reader_epoch_is_a_permutation(three_shards):
    paths, sizes = three_shards
    reader = ShardReader(paths, batch_size=20, seed=3)
    assert reader.num_images == 100 and reader.image_shape == (4, 4, 1)
    everything = set(k * 1000 + r for k, n in enumerate(sizes) for r in range(n))
    for epoch in range(2):
        seen = np.concatenate([_ids(reader.batch(epoch * 5 + s)[0]) for s in range(5)])
        assert len(seen) == 100 and set(seen.tolist()) == everything  # each image exactly once per epoch
    first = np.concatenate([_ids(reader.batch(s)[0]) for s in range(5)])
    second = np.concatenate([_ids(reader.batch(s)[0]) for s in range(5, 10)])
    assert not np.array_equal(first, second)  # a fresh permutation every epoch
    # Batches that straddle an epoch boundary (100 % 30 != 0) still see every image once per epoch.
    wide = ShardReader(paths, batch_size=30, seed=3)
    stream = np.concatenate([_ids(wide.batch(s)[0]) for s in range(10)])  # 300 = three epochs
    for e in range(3):
        assert set(stream[e * 100 : (e + 1) * 100].tolist()) == everything


def test_reader_is_deterministic_and_labels_match_shards(three_shards):
    paths, _ = three_shards
    a = ShardReader(paths, batch_size=16, seed=7)
    b = ShardReader(paths, batch_size=16, seed=7)
    c = ShardReader(paths, batch_size=16, seed=8)
    for step in (0, 5, 3, 40):  # any order: a pure function of the step
        ia, la, _ = a.batch(step)
        ib, lb, _ = b.batch(step)
        assert ia.tobytes() == ib.tobytes() and np.array_equal(la, lb)
        assert la.dtype == np.int32 and np.array_equal(la, ia[:, 0, 0, 0])  # label = shard the image came from
    assert not np.array_equal(a.batch(0)[0], c.batch(0)[0])
    relabelled = ShardReader(paths, batch_size=16, seed=7, cluster_ids=[5, 6, 7])
    assert np.array_equal(relabelled.batch(5)[1], a.batch(5)[1] + 5)


def test_label_frequencies_follow_shard_sizes(three_shards):
    paths, sizes = three_shards
    reader = ShardReader(paths, batch_size=50, seed=0)
    labels = np.concatenate([reader.batch(s)[1] for s in range(40)])  # 20 epochs
    np.testing.assert_array_equal(np.bincount(labels), np.array(sizes) * 20)  # whole epochs: exact
    first_batches = np.bincount(np.concatenate([reader.batch(2 * e)[1] for e in range(20)]), minlength=3)
    share = first_batches / first_batches.sum()
    np.testing.assert_allclose(share, np.array(sizes) / 100, atol=0.06)  # within an epoch: natural distribution


def test_process_slicing(three_shards):
    paths, _ = three_shards
    whole = ShardReader(paths, batch_size=24, seed=1)
    parts = [ShardReader(paths, batch_size=24, seed=1, process_index=i, process_count=2) for i in range(2)]
    assert parts[0].local_batch_size == 12
    for step in (0, 4, 9):
        images, labels, _ = whole.batch(step)
        local = [p.batch(step) for p in parts]
        assert all(x.shape == (12, 4, 4, 1) for x, _, _ in local)
        np.testing.assert_array_equal(np.concatenate([x for x, _, _ in local]), images)
        np.testing.assert_array_equal(np.concatenate([y for _, y, _ in local]), labels)


def test_position(three_shards):
    paths, _ = three_shards
    reader = ShardReader(paths, batch_size=30, seed=0)
    assert reader.position(0) == ReaderPosition(epoch=0, offset=0)
    assert reader.position(3) == ReaderPosition(epoch=0, offset=90)
    assert reader.position(4) == ReaderPosition(epoch=1, offset=20)
    assert reader.position(10) == ReaderPosition(epoch=3, offset=0)
    # Step 3's batch straddles the epochs (last 10 of epoch 0, first 20 of epoch 1); step 4 starts at offset 20.
    np.testing.assert_array_equal(reader.global_indices(3)[:10], reader._epoch_permutation(0)[90:])
    np.testing.assert_array_equal(reader.global_indices(3)[10:], reader._epoch_permutation(1)[:20])
    np.testing.assert_array_equal(reader.global_indices(4), reader._epoch_permutation(1)[20:50])


@pytest.mark.parametrize("batch_size, process_count", [(16, 1), (30, 2), (128, 1)])  # 128 > N: repeats in a batch
def test_streaming_equals_in_memory(three_shards, batch_size, process_count):
    paths, _ = three_shards
    kw = dict(batch_size=batch_size, seed=11, process_index=process_count - 1, process_count=process_count)
    memory = ShardReader(paths, in_memory=True, **kw)
    stream = ShardReader(paths, in_memory=False, **kw)
    assert memory._cache is not None and stream._cache is None
    for step in (0, 1, 7):
        mi, ml, _ = memory.batch(step)
        si, sl, _ = stream.batch(step)
        assert mi.tobytes() == si.tobytes() and np.array_equal(ml, sl)


def test_reader_streams_large_shards_by_default(three_shards, monkeypatch):
    import ddm.data.shards

    monkeypatch.setattr(ddm.data.shards, "IN_MEMORY_LIMIT_BYTES", 10)
    assert ShardReader(three_shards[0], batch_size=4, seed=0)._cache is None
    monkeypatch.undo()
    assert ShardReader(three_shards[0], batch_size=4, seed=0)._cache is not None


# --- class labels -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def labelled_shards(tmp_path_factory):
    """Two labelled shards (sizes 40, 25): pixel (0, 0, 0) holds the shard id, (0, 1, 0) the row, and the
    label of row r of shard k is (7 * r + k) % 5."""
    root = tmp_path_factory.mktemp("labelled")
    paths = []
    for k, n in enumerate((40, 25)):
        images = _images(n, seed=10 + k)
        images[:, 0, 0, 0], images[:, 0, 1, 0] = k, np.arange(n)
        write_shard(str(root / f"c{k}"), images, (7 * np.arange(n) + k) % 5, chunk=8)
        paths.append(str(root / f"c{k}"))
    return paths


@pytest.mark.parametrize("in_memory, process_count", [(True, 1), (False, 1), (False, 2)])
def test_reader_gives_each_image_its_own_class(labelled_shards, in_memory, process_count):
    reader = ShardReader(labelled_shards, batch_size=26, seed=4, in_memory=in_memory,
                         process_index=process_count - 1, process_count=process_count)
    assert reader.labelled
    for step in (0, 3, 11):
        images, clusters, classes = reader.batch(step)
        shard, row = images[:, 0, 0, 0].astype(np.int64), images[:, 0, 1, 0].astype(np.int64)
        assert classes.dtype == np.int32 and clusters.dtype == np.int32
        np.testing.assert_array_equal(classes, (7 * row + shard) % 5)
        np.testing.assert_array_equal(clusters, shard)


def test_labels_round_trip_and_rewrites(tmp_path, three_shards):
    path = str(tmp_path / "s")
    labels = np.array([3, 0, 2, 2, 9], np.int64)
    write_shard(path, _images(5), labels)
    back = read_labels(path)
    assert back.dtype == np.int32 and back.tolist() == labels.tolist()
    assert read_labels(three_shards[0][0]) is None  # an unlabelled shard
    reader = ShardReader(three_shards[0], batch_size=8, seed=0)
    assert not reader.labelled and (reader.batch(0).classes == NO_LABEL).all()
    # Rewriting without labels drops the old ones: the shard never keeps labels of other rows.
    write_shard(path, _images(3))
    assert read_labels(path) is None and read_shard(path).shape == (3, 4, 4, 1)


def test_bad_labels(tmp_path, labelled_shards, three_shards):
    with pytest.raises(DDMError, match="labels must be integers"):
        write_shard(str(tmp_path / "a"), _images(3), np.array([0.5, 1, 2]))
    with pytest.raises(DDMError, match="labels must be integers"):
        write_shard(str(tmp_path / "a"), _images(3), np.array([0, 1]))
    with pytest.raises(DDMError, match=">= 0"):
        write_shard(str(tmp_path / "a"), _images(3), np.array([0, -1, 1]))
    with pytest.raises(DDMError, match=r"has no class labels but shard .*c0 has"):
        ShardReader([three_shards[0][0], labelled_shards[0]], batch_size=4, seed=0)
    # Labels that do not match the images row for row (a shard tampered with by hand) are refused.
    import tensorstore as ts

    write_shard(str(tmp_path / "t"), _images(5), np.zeros(5, np.int32))
    ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(tmp_path / "t" / "labels")}}, create=True,
            delete_existing=True, dtype=ts.int32, shape=[4]).result()
    with pytest.raises(DDMError, match=r"labels int32 \[4\] for 5 images"):
        ShardReader([str(tmp_path / "t")], batch_size=4, seed=0)


# --- manifest ---------------------------------------------------------------------------------------------


def _manifest(**extra) -> dict:
    """The smallest manifest its schema accepts (one cluster of 3 images)."""
    return {"format": mf.FORMAT, "created": "2025-01-01T00:00:00",
            "dataset": {"source": "digits", "fingerprint": "ab" * 32, "num_images": 3, "image_shape": [8, 8, 1]},
            "clustering": {"method": "lloyd", "k": 1},
            "clusters": [{"id": 0, "count": 3, "share": 1.0, "shard": "shards/cluster_0"}], "config": {}, **extra}


def test_manifest_round_trip_and_atomic_write(tmp_path, monkeypatch):
    mf.write_manifest(tmp_path, _manifest(experts={}))
    assert mf.read_manifest(tmp_path) == _manifest(experts={})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]  # no temp file left behind

    # The new content goes to a temp file that replaces the manifest in one rename.
    seen = {}
    real_replace = os.replace

    def spy(src, dst):
        seen["target_before"] = Path(dst).read_text()
        seen["src"] = json.loads(Path(src).read_text())
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)  # the one atomic write (ddm.core.files) renames through os.replace
    mf.write_manifest(tmp_path, _manifest(experts={"0": {"status": "finished"}}))
    assert json.loads(seen["target_before"]) == _manifest(experts={})
    assert seen["src"]["experts"] == {"0": {"status": "finished"}}
    monkeypatch.undo()

    # A refused write leaves the old manifest intact: content the schema refuses (checked before anything is
    # written), and content that passes it but cannot be written as JSON.
    with pytest.raises(DDMError, match="refusing to write .*experts.0 must be an object"):
        mf.write_manifest(tmp_path, _manifest(experts={"0": object()}))
    assert mf.read_manifest(tmp_path)["experts"] == {"0": {"status": "finished"}}
    with pytest.raises(DDMError, match="cannot write as JSON|refusing to write"):
        mf.write_manifest(tmp_path, _manifest(experts={"0": {"status": "finished", "hardware": object()}}))
    assert mf.read_manifest(tmp_path)["experts"] == {"0": {"status": "finished"}}


def test_readers_never_see_a_partial_manifest(tmp_path):
    big = _manifest(experts={str(i): {"status": "finished", "sha256": "f" * 64, "step": i} for i in range(3000)})
    mf.write_manifest(tmp_path, big)
    errors, stop = [], threading.Event()

    def read_loop():
        while not stop.is_set():
            try:
                assert len(mf.read_manifest(tmp_path)["experts"]) == 3000
            except Exception as err:  # noqa: BLE001
                errors.append(err)
                return

    thread = threading.Thread(target=read_loop)
    thread.start()
    for _ in range(40):
        mf.write_manifest(tmp_path, big)
    stop.set()
    thread.join()
    assert not errors


@pytest.mark.parametrize(
    "content, match",
    [
        (None, "no manifest"),
        ("{not json", "not valid JSON"),
        ("[1, 2]", "not a ddm-run/v2 manifest"),
        (json.dumps({"format": "other/v9"}), "not a ddm-run/v2 manifest"),
        (json.dumps({"format": "ddm-run/v1"}), r"ddm-run/v1 \(its shards are .*without class labels\): prepare"),
        (json.dumps({"format": mf.FORMAT, "dataset": {}, "clustering": {}, "config": {}}), "no 'clusters'"),
        (json.dumps({"format": mf.FORMAT, "dataset": {}, "clustering": {}, "config": {}, "clusters": []}),
         "no clusters"),
    ],
)
def test_manifest_read_errors(tmp_path, content, match):
    if content is not None:
        mf.manifest_path(tmp_path).write_text(content)
    with pytest.raises(DDMError, match=match) as err:
        mf.read_manifest(tmp_path)
    assert "\n" not in str(err.value)


_WORKER = """
import sys
from ddm.data import manifest as mf
run_dir, who, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
def change(m):
    m["counter"] = m.get("counter", 0) + 1
    m.setdefault("log", []).append(who)
for _ in range(n):
    mf.update_manifest(run_dir, change)
"""


def test_update_manifest_without_a_run(tmp_path):
    with pytest.raises(DDMError, match="no manifest"):
        mf.update_manifest(tmp_path / "nope", lambda m: None)
    with pytest.raises(DDMError, match="no manifest"):
        mf.record_component(tmp_path, "router", None, {})
    assert not (tmp_path / "nope").exists()


def test_update_manifest_under_concurrency(tmp_path):
    mf.write_manifest(tmp_path, _manifest())
    n = 150
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(tmp_path), who, str(n)], cwd=REPO)
             for who in ("a", "b")]
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    final = mf.read_manifest(tmp_path)
    assert final["counter"] == 2 * n  # no lost update
    assert sorted(final["log"]) == ["a"] * n + ["b"] * n
    entry = mf.record_component(tmp_path, "experts", 3, {"status": "finished"})
    assert entry["experts"] == {"3": {"status": "finished"}} and final["counter"] == entry["counter"]
    assert mf.record_component(tmp_path, "router", None, {"status": "running"})["router"] == {"status": "running"}


def test_manifest_sha256():
    base = _manifest()
    digest = mf.manifest_sha256(base)
    assert len(digest) == 64
    assert mf.manifest_sha256({**base, "created": "2030-12-31T23:59:59"}) == digest  # history is not content
    assert mf.manifest_sha256(dict(reversed(list(base.items())))) == digest  # key order is not content
    assert mf.manifest_sha256({**base, "clusters": [{"id": 0, "count": 4}]}) != digest
    assert mf.manifest_sha256({**base, "experts": {"0": {"sha256": "x"}}}) != digest


def test_resolve():
    assert mf.resolve("/runs/a", "shards/cluster_0") == "/runs/a/shards/cluster_0"
    assert mf.resolve("/runs/a", "gs://bucket/x") == "gs://bucket/x"
