"""Condition embeddings as data (`data.conditions`): loading and its one-line refusals, the rows following their
images through prepare (clustering, shards, bundles, the hold-out, the reader, add-island), clustering by them,
shard digests, and the captioned digits (`ddm.data.captions`)."""

import dataclasses
import shutil

import numpy as np
import pytest

from ddm.app.cli import main
from ddm.core.config import DataConfig, config_from_data, with_condition_shape
from ddm.core.errors import DDMError
from ddm.data import captions
from ddm.data.islands import Bundle
from ddm.data.join import add_island
from ddm.data.prepare import prepare
from ddm.data.run import Run
from ddm.data.shards import (ShardReader, check_conditioned, read_conditions, read_shard, shard_sha256,
                             verify_shard, write_shard)
from ddm.data.sources import load_dataset

N, L, D = 240, 2, 3


def _indexed_images(n: int, offset: int = 0) -> np.ndarray:
    """uint8 [n, 4, 4, 1] random pixels whose first two hold the row index (offset + i) in base 256."""
    images = np.random.default_rng(offset).integers(0, 256, (n, 4, 4, 1), dtype=np.uint8)
    rows = offset + np.arange(n)
    images[:, 0, 0, 0], images[:, 0, 1, 0] = rows % 256, rows // 256
    return images


def _row_of(images: np.ndarray) -> np.ndarray:
    return images[:, 0, 0, 0].astype(np.int64) + 256 * images[:, 0, 1, 0].astype(np.int64)


def _indexed_conditions(n: int, dtype=np.float16, offset: int = 0) -> np.ndarray:
    """[n, L, D]: row i holds offset + i everywhere but its last entry, which is -(offset + i) (exact in float16)."""
    rows = (offset + np.arange(n)).astype(np.float64)
    out = np.repeat(rows[:, None, None], L, 1).repeat(D, 2)
    out[:, -1, -1] = -rows
    return out.astype(dtype)


def _check_rows(images: np.ndarray, conditions: np.ndarray) -> None:
    """Every row's condition encodes the row its image came from."""
    rows = _row_of(images).astype(np.float32)
    assert conditions.shape == (len(images), L, D) and len(images)
    np.testing.assert_array_equal(conditions[:, 0, 0], rows)
    np.testing.assert_array_equal(conditions[:, -1, -1], -rows)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """images.npz (N indexed images, labels i % 3) and conditions.npy ([N, L, D] float16 encoding the row)."""
    root = tmp_path_factory.mktemp("cond_source")
    np.savez(root / "images.npz", images=_indexed_images(N), labels=np.arange(N) % 3)
    np.save(root / "conditions.npy", _indexed_conditions(N))
    return root


def _cfg(source, **data):
    values = {"source": str(source / "images.npz"), "conditions": str(source / "conditions.npy"), "k": 3,
              "embed_dim": 4, "holdout_fraction": 0.2, "chunk_images": 16, **data}
    return config_from_data({"data": values, "expert": {"train": {"batch_size": 8}}})


@pytest.fixture(scope="module")
def prepared(source, tmp_path_factory):
    """A run of the indexed images with conditions, rows 1, 4, 7 ... (class 1) excluded and limited to 150."""
    run_dir = tmp_path_factory.mktemp("cond_run")
    prepare(_cfg(source, exclude_classes=[1], limit=150), run_dir)
    return run_dir


# --- loading ------------------------------------------------------------------------------------------------


def _refusal(source, tmp_path, conditions, match: str, **data) -> str:
    path = tmp_path / ("c.npz" if isinstance(conditions, dict) else "c.npy")
    (np.savez(path, **conditions) if isinstance(conditions, dict) else np.save(path, conditions))
    with pytest.raises(DDMError, match=match) as err:
        load_dataset(DataConfig(source=str(source / "images.npz"), conditions=str(path), **data))
    assert "\n" not in str(err.value)
    return str(err.value)


def test_bad_conditions_are_one_line_errors(source, tmp_path):
    good = _indexed_conditions(N)
    _refusal(source, tmp_path, good[:-1], f"{N - 1} rows but the data source has {N} images")
    _refusal(source, tmp_path, good[:, 0, 0], r"shape \[240\]; expected \[N, D\]")
    _refusal(source, tmp_path, good[:, :, :, None], r"expected \[N, D\]")
    _refusal(source, tmp_path, good.astype(np.int32), "hold int32 values; condition embeddings must be float16 or float32")
    _refusal(source, tmp_path, good.astype(np.float64), "float64")
    for bad in (np.nan, np.inf):
        broken = good.copy()
        broken[17, 1, 0] = bad
        _refusal(source, tmp_path, broken, "NaN or Inf .first at row 17.: NaN is reserved for the null condition")
    _refusal(source, tmp_path, {"other": good}, "no array 'conditions'.*data.conditions_key")
    # N counts the source's rows: conditions of the limited rows alone are refused
    _refusal(source, tmp_path, good[:100], "100 rows but the data source has 240", limit=100)
    with pytest.raises(DDMError, match="captions the built-in digits only"):
        load_dataset(DataConfig(source=str(source / "images.npz"), conditions="captions"))
    with pytest.raises(DDMError, match="not found"):
        load_dataset(DataConfig(source=str(source / "images.npz"), conditions=str(tmp_path / "none.npy")))


def test_conditions_and_class_labels_exclude_each_other(source):
    with pytest.raises(DDMError, match="not both"):
        DataConfig(conditions="captions", label_column="labels")
    with pytest.raises(DDMError, match="needs data.conditions"):
        DataConfig(embedding="conditions")
    cfg = _cfg(source, exclude_classes=[1], limit=150)
    explicit = config_from_data({"expert": {"model": {"num_classes": 3}}})
    with pytest.raises(DDMError, match="num_classes=3 and data.conditions both"):
        with_condition_shape(explicit, (L, D))
    for shape, match in (([4], r"condition_shape=\[4\], but the data has condition embeddings of shape \[2, 3\]"),
                         ([], r"condition_shape=\[\], but the data has condition")):
        wrong = dataclasses.replace(cfg, expert=dataclasses.replace(
            cfg.expert, model=dataclasses.replace(cfg.expert.model, condition_shape=tuple(shape))))
        with pytest.raises(DDMError, match=match):
            with_condition_shape(wrong, (L, D))
    dataset = load_dataset(cfg.data)  # the source has labels: they choose the rows, and are then dropped
    assert dataset.labels is None and dataset.num_classes == 0 and dataset.condition_shape == (L, D)
    kept = np.flatnonzero(np.arange(N) % 3 != 1)[:150]
    np.testing.assert_array_equal(_row_of(dataset.images), kept)
    _check_rows(dataset.images, np.asarray(dataset.conditions, np.float32))


def test_parquet_and_npz_conditions(source, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    conditions = _indexed_conditions(N, np.float32)
    table = pa.table({"emb": pa.array([[list(map(float, tok)) for tok in row] for row in conditions],
                                      pa.list_(pa.list_(pa.float32())))})
    pq.write_table(table, tmp_path / "c.parquet")
    np.savez(tmp_path / "c.npz", emb=conditions[:, 0])
    for path, shape in ((tmp_path / "c.parquet", (L, D)), (tmp_path / "c.npz", (D,))):
        dataset = load_dataset(DataConfig(source=str(source / "images.npz"), conditions=str(path),
                                          conditions_key="emb", limit=50))
        assert dataset.condition_shape == shape and dataset.conditions.dtype == np.float32
        np.testing.assert_array_equal(np.asarray(dataset.conditions).reshape(50, -1)[:, 0], np.arange(50))
    ragged = pa.table({"conditions": [[1.0, 2.0]] * (N - 1) + [[1.0]]})
    pq.write_table(ragged, tmp_path / "ragged.parquet")
    with pytest.raises(DDMError, match="lists of different lengths"):
        load_dataset(DataConfig(source=str(source / "images.npz"), conditions=str(tmp_path / "ragged.parquet")))
    doubles = pa.table({"conditions": [[1.0, 2.0]] * N})  # pyarrow's default: float64
    pq.write_table(doubles, tmp_path / "doubles.parquet")
    with pytest.raises(DDMError, match="hold float64 values; condition embeddings must be float16 or float32"):
        load_dataset(DataConfig(source=str(source / "images.npz"), conditions=str(tmp_path / "doubles.parquet")))


def test_prepare_refuses_bad_conditions_with_exit_2(source, tmp_path, capsys):
    broken = _indexed_conditions(N)
    broken[5] = np.nan
    np.save(tmp_path / "nan.npy", broken)
    code = main(["prepare", "--run-dir", str(tmp_path / "run"), "--set", f"data.source={source / 'images.npz'}",
                 "--set", f"data.conditions={tmp_path / 'nan.npy'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "NaN or Inf (first at row 5)" in err, err
    assert not (tmp_path / "run" / "manifest.json").exists()


# --- alignment through prepare ------------------------------------------------------------------------------


def test_condition_rows_follow_their_images(prepared):
    run = Run.open(prepared)
    assert run.num_classes == 0 and run.condition_shape == (L, D)
    assert run.dataset["condition_dtype"] == "float16" and run.config.expert.model.condition_shape == (L, D)
    assert run.config.expert.model.num_classes == 0 and run.config.distill.model.condition_shape == (L, D)
    seen = []
    for k in run.cluster_ids:
        images, conditions = read_shard(run.shard_path(k)), read_conditions(run.shard_path(k))
        assert conditions.dtype == np.float16  # stored as given
        _check_rows(images, conditions)
        seen.append(_row_of(images))
        bundle = Bundle.open(run.bundle_dir(k))
        assert bundle.condition_shape == (L, D) and bundle.config.expert.model.condition_shape == (L, D)
        held = bundle.holdout_set()
        assert held[2].dtype == np.float32 and (held[1] == k).all()
        _check_rows(held[0], held[2])
        seen.append(_row_of(held[0]))
    images, clusters, conditions = run.holdout_set()
    _check_rows(images, conditions)
    rows = np.sort(np.concatenate(seen))
    np.testing.assert_array_equal(rows, np.flatnonzero(np.arange(N) % 3 != 1)[:150])  # each kept row once
    assert len(images) == run.holdout["count"] == 30
    for in_memory, shuffle in ((True, "global"), (False, "global"), (False, "chunks")):
        reader = ShardReader(run.shard_paths(), batch_size=8, seed=1, digests=run.shard_digests(),
                             in_memory=in_memory, shuffle=shuffle, shuffle_buffer=16)
        check_conditioned(reader, (L, D))
        for step in (0, 7, 15, 16):  # past an epoch (120 rows)
            batch = reader.batch(step)
            assert batch.classes.dtype == np.float32 and batch.classes.shape == (8, L, D)
            _check_rows(batch.images, batch.classes)
    with pytest.raises(DDMError, match=r"takes conditions of shape \[4\] but the shards have conditions of shape"):
        check_conditioned(reader, (4,))


def test_shards_with_and_without_conditions(tmp_path):
    images = _indexed_images(20)
    conditions = _indexed_conditions(20)
    with_c = write_shard(str(tmp_path / "a"), images, chunk=8, cluster=0, conditions=conditions)
    without = write_shard(str(tmp_path / "b"), images, chunk=8, cluster=1)
    assert with_c == shard_sha256(images, None, conditions) != without == shard_sha256(images, None)
    with pytest.raises(DDMError, match="shard .*b has no conditions but shard .*a has"):
        ShardReader([str(tmp_path / "a"), str(tmp_path / "b")], batch_size=4, seed=0)
    reader = ShardReader([str(tmp_path / "b")], batch_size=4, seed=0)
    assert reader.condition_shape == () and reader.batch(0).classes.dtype == np.int32
    with pytest.raises(DDMError, match=r"takes conditions of shape \[2, 3\] but the shards have no conditions"):
        check_conditioned(reader, (L, D))
    # An altered condition fails the shard's digest.
    write_shard(str(tmp_path / "a"), images, chunk=8, cluster=0, conditions=conditions + np.float16(1))
    with pytest.raises(DDMError, match="does not match its digest"):
        verify_shard(str(tmp_path / "a"), with_c, 0)
    with pytest.raises(DDMError, match="float16 / float32"):
        write_shard(str(tmp_path / "c"), images, conditions=np.zeros((20, 3), np.int8))


def test_shard_digests_without_conditions_are_unchanged(tmp_path):
    """Digests computed before shards could hold conditions (the same arrays, written by that code)."""
    rng = np.random.default_rng(29)
    images = rng.integers(0, 256, (37, 4, 4, 1), dtype=np.uint8)
    labels = rng.integers(0, 5, 37)
    latents = rng.standard_normal((11, 2, 2, 3)).astype(np.float16)
    assert write_shard(str(tmp_path / "a"), images, chunk=8) == \
        "d3155694b4722c33b295ab37d14160cf4124b0f15a4dd4b283fb6c31897ad478"
    assert write_shard(str(tmp_path / "b"), images, labels, chunk=8) == \
        "4ca6e130032d854235acc06d8bf42fee22a2c8e80363d6792c286fbf5815b029"
    assert write_shard(str(tmp_path / "c"), latents, chunk=4) == \
        "91c2f907308156f9429310112c6b95a1a265dcb7e06ffeefe5c1ba34445069fc"
    # the digits' hold-out (300 images, 10%: its rows depend on the seed alone) of a prepared run
    cfg = config_from_data({"data": {"source": "digits", "k": 2, "limit": 300, "embed_dim": 8,
                                     "partition": "random"}})
    assert prepare(cfg, tmp_path / "run")["holdout"]["sha256"] == \
        "f03ccedb546d3edc6471f3cf4018dee20eefa67b07e7cddc81e16ef6db2a741d"


def test_embedding_conditions_clusters_by_them(tmp_path):
    n, k = 200, 4
    group = np.random.default_rng(3).integers(0, k, n)
    pooled = np.eye(k, dtype=np.float32)[group]
    tokens = np.stack([pooled, pooled, np.zeros_like(pooled)], axis=1) * np.float32(1.5)  # mean over L: one-hot
    np.savez(tmp_path / "images.npz", images=_indexed_images(n))
    for name, conditions in (("pooled", pooled), ("tokens", tokens)):
        np.save(tmp_path / f"{name}.npy", conditions)
        cfg = config_from_data({"data": {"source": str(tmp_path / "images.npz"), "embedding": "conditions",
                                         "conditions": str(tmp_path / f"{name}.npy"), "k": k, "chunk_images": 32}})
        manifest = prepare(cfg, tmp_path / name)
        run = Run.open(tmp_path / name)
        for cluster in run.cluster_ids:
            rows = _row_of(read_shard(run.shard_path(cluster)))
            assert len(np.unique(group[rows])) == 1, (name, cluster)  # a cluster is one group
        assert sorted(len(np.unique(group[_row_of(read_shard(run.shard_path(c)))])) for c in range(k)) == [1] * k
        images, clusters, _ = run.holdout_set()
        for cluster in range(k):  # held-out rows go to their group's cluster too
            train_groups = np.unique(group[_row_of(read_shard(run.shard_path(cluster)))])
            assert set(group[_row_of(images[clusters == cluster])]) <= set(train_groups)
        assert manifest["clustering"]["embedding"] == "conditions"


def test_add_island_checks_conditions_against_the_plan(prepared, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(prepared, run_dir)
    m = 40
    np.savez(tmp_path / "new.npz", images=_indexed_images(m, offset=1000))
    np.save(tmp_path / "new16.npy", _indexed_conditions(m, offset=1000))
    np.save(tmp_path / "new32.npy", _indexed_conditions(m, np.float32, offset=1000))
    new = [f"data.source={tmp_path / 'new.npz'}", "data.exclude_classes=[]", "data.limit=null"]
    with pytest.raises(DDMError, match=r"has no condition embeddings, the plan has condition embeddings float16 "
                                       r"\[2, 3\] \(data.conditions\): refusing to add it"):
        add_island(run_dir, [*new, "data.conditions=null"])
    with pytest.raises(DDMError, match="float32 .*the plan has condition embeddings float16"):
        add_island(run_dir, [*new, f"data.conditions={tmp_path / 'new32.npy'}"])
    entry = add_island(run_dir, [*new, f"data.conditions={tmp_path / 'new16.npy'}"])
    run = Run.open(run_dir)
    _check_rows(read_shard(run.shard_path(entry["id"])), read_conditions(run.shard_path(entry["id"])))
    assert "conditions_sha256" in entry["joined"]
    held = Bundle.open(run.bundle_dir(entry["id"])).holdout_set()
    _check_rows(held[0], held[2])


# --- the captioned digits -----------------------------------------------------------------------------------


def test_digit_captions():
    images, classes = captions.digits()
    texts = captions.digit_captions(images, classes)
    assert texts == captions.digit_captions(images, classes) and len(texts) == len(images)
    attrs = captions.caption_attributes(images, classes)
    for c in range(10):  # tertiles within each class: every value of both attributes, about a third each
        for name in ("thickness", "slant"):
            shares = np.bincount(attrs[name][classes == c], minlength=3) / (classes == c).sum()
            assert (shares > 0.25).all(), (c, name, shares)
    for text, c, t, s in zip(texts[:50], classes, attrs["thickness"], attrs["slant"]):
        assert captions.parse_caption(text) == (c, t, s) and text.split()[2] == str(c)
    assert "a thick 7 leaning right" in texts and "a thin 6 upright" in texts
    with pytest.raises(DDMError, match="not a digits caption"):
        captions.parse_caption("a huge 7 leaning right")
    # a digit drawn thicker (more ink) and sheared to the right reads so
    thick = np.minimum(images[classes == 1][:1].astype(int) * 3, 255).astype(np.uint8)
    assert captions.caption_attributes(thick, [1])["thickness"][0] == 2


def test_encode():
    every = [captions.caption(d, t, s) for d in range(10) for t in range(3) for s in range(3)]
    pooled = captions.encode(every)
    assert pooled.dtype == np.float32 and pooled.shape == (90, captions.DIM)
    np.testing.assert_allclose(np.linalg.norm(pooled, axis=1), 1.0, rtol=1e-6)
    assert len({row.tobytes() for row in pooled}) == 90  # every caption its own embedding
    np.testing.assert_array_equal(pooled, captions.encode(list(every)))
    tokens = captions.encode(["a thick 7 leaning right", "a 7"], dim=16, tokens=6)
    assert tokens.shape == (2, 6, 16) and tokens.dtype == np.float32
    assert (np.abs(tokens).sum(axis=2) == [[1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0]]).all()  # one row per word
    np.testing.assert_array_equal(tokens[0, 2], tokens[1, 1])  # the same word, the same row
    with pytest.raises(DDMError, match="5 words, more than the 4 token rows"):
        captions.encode(["a thick 7 leaning right"], tokens=4)
    assert not captions.encode([""]).any()


def test_captions_dataset():
    full = load_dataset(DataConfig(conditions="captions"))
    images, classes = captions.digits()
    assert full.labels is None and full.condition_shape == (captions.DIM,) and full.conditions.dtype == np.float32
    np.testing.assert_array_equal(full.conditions, captions.encode(captions.digit_captions(images, classes)))
    part = load_dataset(DataConfig(conditions="captions", limit=100, exclude_classes=[0]))
    keep = np.flatnonzero(classes != 0)[:100]
    np.testing.assert_array_equal(part.images, images[keep])
    np.testing.assert_array_equal(part.conditions, full.conditions[keep])  # captions of the whole dataset
