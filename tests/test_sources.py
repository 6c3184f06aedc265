"""Dataset sources (digits, array files, image folders, parquet) and embeddings (pixels, pca, file)."""

import io

import numpy as np
import pytest
from PIL import Image

from ddm.core.config import DataConfig
from ddm.core.errors import DDMError
from ddm.core.hashing import dataset_fingerprint as fingerprint
from ddm.core.images import to_model_range
from ddm.core.images import to_uint8 as from_model_range
from ddm.data.embed import embed
from ddm.data.sources import load_dataset


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(buf, format="PNG")
    return buf.getvalue()


def _save_pngs(folder, images) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        path = folder / f"img_{i:03d}.png"
        path.write_bytes(_png(image))
        paths.append(path)
    return paths


def _load(source, **kw):
    return load_dataset(DataConfig(source=str(source), **kw))


RNG = np.random.default_rng(0)
GRAY = RNG.integers(0, 256, (6, 5, 7, 1), dtype=np.uint8)
RGB = RNG.integers(0, 256, (6, 5, 7, 3), dtype=np.uint8)


# --- digits and array files -------------------------------------------------------------------------------


def test_digits():
    ds = load_dataset(DataConfig(source="digits"))
    assert ds.images.shape == (1797, 8, 8, 1) and ds.images.dtype == np.uint8
    assert ds.images.min() == 0 and ds.images.max() == 255 and ds.source == "digits"
    assert ds.image_shape == (8, 8, 1)
    assert load_dataset(DataConfig(source="digits", limit=100)).images.shape == (100, 8, 8, 1)


def test_fingerprint_tracks_content_and_shape():
    fp = fingerprint(GRAY)
    assert fp == fingerprint(GRAY.copy())
    changed = GRAY.copy()
    changed[3, 2, 1, 0] ^= 1
    assert fingerprint(changed) != fp
    assert fingerprint(GRAY.reshape(6, 7, 5, 1)) != fp  # same bytes, other shape


def test_model_range_round_trip():
    x = to_model_range(RGB)
    assert x.dtype == np.float32 and x.min() >= -1 and x.max() <= 1
    np.testing.assert_array_equal(from_model_range(x), RGB)


@pytest.mark.parametrize("suffix", [".npy", ".npz"])
def test_uint8_array_file(tmp_path, suffix):
    path = tmp_path / f"a{suffix}"
    gray = GRAY[..., 0]  # [N, H, W] gets C=1
    np.save(path, gray) if suffix == ".npy" else np.savez(path, images=gray)
    ds = _load(path)
    assert ds.images.shape == (6, 5, 7, 1) and ds.images.dtype == np.uint8
    np.testing.assert_array_equal(ds.images, GRAY)
    assert ds.source == str(path.resolve())
    np.save(tmp_path / "rgb.npy", RGB)
    np.testing.assert_array_equal(_load(tmp_path / "rgb.npy").images, RGB)


@pytest.mark.parametrize(
    "to_float",
    [
        lambda u: u / 255.0,  # [0, 1]
        lambda u: u / 127.5 - 1.0,  # [-1, 1]
        lambda u: u.astype(np.float32),  # [0, 255] as floats
    ],
)
def test_float_array_ranges(tmp_path, to_float):
    np.save(tmp_path / "f.npy", to_float(RGB.astype(np.float64)))
    np.testing.assert_array_equal(_load(tmp_path / "f.npy").images, RGB)


def test_npz_key_choice(tmp_path):
    np.savez(tmp_path / "two.npz", a=GRAY, b=RGB)
    with pytest.raises(DDMError, match="array_key"):
        _load(tmp_path / "two.npz")
    np.testing.assert_array_equal(_load(tmp_path / "two.npz", array_key="b").images, RGB)


@pytest.mark.parametrize(
    "array, match",
    [
        (np.zeros((0, 8, 8), np.uint8), "no images"),
        (np.zeros((0, 8, 8), np.float32), "no images"),
        (np.where(np.arange(6 * 35).reshape(6, 5, 7) == 40, np.nan, 0.5), "NaN or Inf values in 1 image"),
        (np.where(np.arange(6 * 35).reshape(6, 5, 7) % 50 == 0, np.inf, 0.5), "NaN or Inf"),
        (np.full((2, 4, 4), 300.0), "values in"),
        (np.zeros((2, 4, 4, 2), np.uint8), "shape"),
        (np.zeros((4, 4), np.uint8), "shape"),
    ],
)
def test_bad_arrays(tmp_path, array, match):
    np.savez(tmp_path / "bad.npz", data=array)
    with pytest.raises(DDMError, match=match):
        _load(tmp_path / "bad.npz")


def test_missing_and_unsupported_sources(tmp_path):
    with pytest.raises(DDMError, match="not found: .*nope.npz"):
        _load(tmp_path / "nope.npz")
    (tmp_path / "x.csv").write_text("1,2\n")
    with pytest.raises(DDMError, match="x.csv"):
        _load(tmp_path / "x.csv")
    (tmp_path / "junk.npy").write_bytes(b"not an array")
    with pytest.raises(DDMError, match="junk.npy"):
        _load(tmp_path / "junk.npy")


def test_relative_source_resolves_against_base_dir(tmp_path, monkeypatch):
    np.save(tmp_path / "rel.npy", GRAY)
    monkeypatch.chdir(tmp_path.parent)
    ds = load_dataset(DataConfig(source="rel.npy"), base_dir=tmp_path)
    assert ds.source == str(tmp_path / "rel.npy")


# --- resize + center crop ---------------------------------------------------------------------------------


def _stripes(h: int, w: int) -> np.ndarray:
    """[h, w, 3]: red left quarter, green middle half, blue right quarter."""
    image = np.zeros((h, w, 3), np.uint8)
    image[:, : w // 4, 0] = 255
    image[:, w // 4 : 3 * w // 4, 1] = 255
    image[:, 3 * w // 4 :, 2] = 255
    return image


def test_resize_center_crop(tmp_path):
    # 8x16 to 8: no scaling, the center 8 columns (all green) are kept.
    np.save(tmp_path / "s.npy", np.stack([_stripes(8, 16)] * 2))
    out = _load(tmp_path / "s.npy", image_size=8).images
    assert out.shape == (2, 8, 8, 3)
    assert (out[..., 1] == 255).all() and (out[..., [0, 2]] == 0).all()
    # 32x64 to 8: downscaled by 4, then the center (green) crop; bicubic may ring a little at the edges only.
    np.save(tmp_path / "b.npy", _stripes(32, 64)[None])
    out = _load(tmp_path / "b.npy", image_size=8).images
    assert out.shape == (1, 8, 8, 3)
    assert (out[0, :, 1:-1, 1] >= 250).all() and (out[0, :, 1:-1, [0, 2]] <= 5).all()
    # Grayscale stays C=1, tall images crop rows, upscaling works.
    np.save(tmp_path / "g.npy", GRAY)
    assert _load(tmp_path / "g.npy", image_size=12).images.shape == (6, 12, 12, 1)
    assert _load(tmp_path / "g.npy", image_size=3).images.shape == (6, 3, 3, 1)


# --- image folders and parquet through Hugging Face datasets ----------------------------------------------


@pytest.mark.parametrize("images", [GRAY, RGB], ids=["gray", "rgb"])
def test_image_folder(tmp_path, images):
    _save_pngs(tmp_path / "imgs", images)
    (tmp_path / "imgs" / "metadata.csv").unlink(missing_ok=True)
    ds = _load(tmp_path / "imgs")
    assert ds.images.shape == images.shape  # grayscale keeps C=1, RGB has C=3
    np.testing.assert_array_equal(ds.images, images)  # PNG is lossless, file order kept


def test_image_folder_resize_mixed_sizes(tmp_path):
    folder = tmp_path / "mixed"
    _save_pngs(folder, RGB[:3])
    (folder / "zz_big.png").write_bytes(_png(RNG.integers(0, 256, (9, 11, 3), dtype=np.uint8)))
    with pytest.raises(DDMError, match=r"zz_big\.png .*image_size") as err:
        _load(folder)
    assert "\n" not in str(err.value)
    assert _load(folder, image_size=4).images.shape == (4, 4, 4, 3)


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("notes.txt", b"hello", "non-image file: .*notes.txt"),
        ("broken.png", b"\x89PNG\r\n\x1a\n garbage", "unreadable image file .*broken.png"),
        ("empty.jpg", b"", "unreadable image file .*empty.jpg"),
    ],
)
def test_image_folder_bad_file_is_named(tmp_path, name, content, match):
    _save_pngs(tmp_path / "f", GRAY[:2])
    (tmp_path / "f" / name).write_bytes(content)
    with pytest.raises(DDMError, match=match):
        _load(tmp_path / "f")


def test_empty_image_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DDMError, match="no images"):
        _load(tmp_path / "empty")


def test_parquet_image_column(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    table = pa.table({"image": [{"bytes": _png(a)} for a in RGB], "label": list(range(len(RGB)))})
    pq.write_table(table, tmp_path / "rgb.parquet")
    ds = _load(tmp_path / "rgb.parquet")
    np.testing.assert_array_equal(ds.images, RGB)
    assert _load(tmp_path / "rgb.parquet", limit=2, image_size=4).images.shape == (2, 4, 4, 3)
    pq.write_table(pa.table({"img": [{"bytes": _png(a)} for a in GRAY]}), tmp_path / "gray.parquet")
    with pytest.raises(DDMError, match="no column 'image'"):
        _load(tmp_path / "gray.parquet")
    np.testing.assert_array_equal(_load(tmp_path / "gray.parquet", image_column="img").images, GRAY)


def test_parquet_array_column(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"image": [a[..., 0].tolist() for a in GRAY]}), tmp_path / "ints.parquet")
    np.testing.assert_array_equal(_load(tmp_path / "ints.parquet").images, GRAY)
    # Floats in [-1, 1]: the range is the column's, not each image's (image 0 lies inside [0, 1] by itself).
    floats = RGB / 127.5 - 1.0
    floats[0] = np.abs(floats[0])
    expected = np.rint((floats + 1.0) * 127.5).astype(np.uint8)
    pq.write_table(pa.table({"image": [a.tolist() for a in floats]}), tmp_path / "floats.parquet")
    np.testing.assert_array_equal(_load(tmp_path / "floats.parquet").images, expected)
    bad = floats.copy()
    bad[2, 0, 0, 0] = np.nan
    pq.write_table(pa.table({"image": [a.tolist() for a in bad]}), tmp_path / "nan.parquet")
    with pytest.raises(DDMError, match="NaN"):
        _load(tmp_path / "nan.parquet")


# --- embeddings -------------------------------------------------------------------------------------------

IMAGES = np.random.default_rng(1).integers(0, 256, (40, 4, 4, 1), dtype=np.uint8)


def test_pixel_and_pca_embeddings():
    pixels = embed(IMAGES, DataConfig(embedding="pixels"))
    assert pixels.shape == (40, 16) and pixels.dtype == np.float32
    np.testing.assert_allclose(pixels, IMAGES.reshape(40, -1) / 127.5 - 1.0, atol=1e-6)
    feats = embed(IMAGES, DataConfig(embedding="pca", embed_dim=5))
    assert feats.shape == (40, 5) and feats.dtype == np.float32
    np.testing.assert_allclose(feats.mean(axis=0), 0, atol=1e-4)  # centred
    variances = feats.var(axis=0)
    assert (np.diff(variances) <= 1e-5).all()  # components ordered by variance
    assert embed(IMAGES, DataConfig(embedding="pca", embed_dim=64)).shape == (40, 16)  # capped at D
    np.testing.assert_array_equal(feats, embed(IMAGES, DataConfig(embedding="pca", embed_dim=5)))


def _file_cfg(path, **kw):
    return DataConfig(embedding="file", features_path=str(path), **kw)


def test_features_from_npy_and_parquet(tmp_path):
    feats = np.random.default_rng(2).normal(size=(40, 3))
    np.save(tmp_path / "f.npy", feats)
    out = embed(IMAGES, _file_cfg(tmp_path / "f.npy"))
    assert out.dtype == np.float32 and out.shape == (40, 3)
    np.testing.assert_allclose(out, feats, rtol=1e-6)
    # With data.limit the first `limit` rows pair with the first `limit` images.
    np.testing.assert_allclose(embed(IMAGES[:10], _file_cfg(tmp_path / "f.npy", limit=10)), feats[:10], rtol=1e-6)

    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"emb": feats.tolist(), "id": list(range(40))}), tmp_path / "f.parquet")
    with pytest.raises(DDMError, match="features_column"):
        embed(IMAGES, _file_cfg(tmp_path / "f.parquet"))
    out = embed(IMAGES, _file_cfg(tmp_path / "f.parquet", features_column="emb"))
    np.testing.assert_allclose(out, feats, rtol=1e-6)
    with pytest.raises(DDMError, match="no column 'vec'"):
        embed(IMAGES, _file_cfg(tmp_path / "f.parquet", features_column="vec"))


def test_bad_feature_files(tmp_path):
    feats = np.random.default_rng(3).normal(size=(40, 3)).astype(np.float32)
    np.save(tmp_path / "short.npy", feats[:39])
    with pytest.raises(DDMError, match="39 rows but the dataset has 40"):
        embed(IMAGES, _file_cfg(tmp_path / "short.npy"))
    nan = feats.copy()
    nan[7, 1], nan[20, 0] = np.nan, np.inf
    np.save(tmp_path / "nan.npy", nan)
    with pytest.raises(DDMError, match="NaN or Inf in 2 row.*first row 7"):
        embed(IMAGES, _file_cfg(tmp_path / "nan.npy"))
    np.save(tmp_path / "flat.npy", feats[:, 0])
    with pytest.raises(DDMError, match=r"expected \[N, D\]"):
        embed(IMAGES, _file_cfg(tmp_path / "flat.npy"))
    with pytest.raises(DDMError, match="not found"):
        embed(IMAGES, _file_cfg(tmp_path / "missing.npy"))
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    rows = nan.tolist()
    pq.write_table(pa.table({"emb": rows}), tmp_path / "nan.parquet")
    with pytest.raises(DDMError, match="NaN or Inf in 2 row"):
        embed(IMAGES, _file_cfg(tmp_path / "nan.parquet"))
    pq.write_table(pa.table({"emb": rows[:30]}), tmp_path / "short.parquet")
    with pytest.raises(DDMError, match="30 rows"):
        embed(IMAGES, _file_cfg(tmp_path / "short.parquet"))
    pq.write_table(pa.table({"emb": [[1.0, 2.0]] * 39 + [[1.0]]}), tmp_path / "ragged.parquet")
    with pytest.raises(DDMError, match="equal-length"):
        embed(IMAGES, _file_cfg(tmp_path / "ragged.parquet"))


# --- class labels -----------------------------------------------------------------------------------------


def test_digits_labels_are_the_digits():
    from sklearn.datasets import load_digits

    ds = load_dataset(DataConfig(source="digits"))
    assert ds.labels.dtype == np.int32 and ds.labels.shape == (1797,)
    np.testing.assert_array_equal(ds.labels, load_digits().target)
    assert ds.class_names == [str(i) for i in range(10)] and ds.num_classes == 10
    assert load_dataset(DataConfig(source="digits", limit=100)).labels.shape == (100,)
    unlabelled = load_dataset(DataConfig(source="digits", labels="none"))
    assert unlabelled.labels is None and unlabelled.num_classes == 0


def test_npz_labels(tmp_path):
    ints = np.array([2, 0, 1, 2, 5, 0])
    np.savez(tmp_path / "a.npz", images=GRAY, labels=ints)
    ds = _load(tmp_path / "a.npz")
    np.testing.assert_array_equal(ds.images, GRAY)  # the labels array is never mistaken for the images
    assert ds.labels.tolist() == ints.tolist() and ds.class_names == ["0", "1", "2", "3", "4", "5"]
    # `y` works too, beside an image array of any name; integral floats count as integers.
    np.savez(tmp_path / "b.npz", pixels=GRAY, y=ints.astype(np.float64))
    assert _load(tmp_path / "b.npz").labels.tolist() == ints.tolist()
    # String labels: the sorted distinct strings are the classes.
    np.savez(tmp_path / "c.npz", data=GRAY, labels=np.array(["cat", "dog", "ant", "dog", "cat", "cat"]))
    ds = _load(tmp_path / "c.npz")
    assert ds.class_names == ["ant", "cat", "dog"] and ds.labels.tolist() == [1, 2, 0, 2, 1, 1]
    # An explicit label array, or none at all.
    np.savez(tmp_path / "d.npz", data=GRAY, digit=ints, labels=np.zeros(6, int))
    assert _load(tmp_path / "d.npz", label_column="digit").labels.tolist() == ints.tolist()
    assert _load(tmp_path / "d.npz", labels="none").labels is None
    assert _load(tmp_path / "a.npz", limit=3).labels.tolist() == [2, 0, 1]
    np.savez(tmp_path / "e.npz", data=GRAY)
    assert _load(tmp_path / "e.npz").labels is None  # unlabelled: unconditional


@pytest.mark.parametrize(
    "labels, match",
    [
        (np.arange(5), "5 labels for 6 images"),
        (np.array([0, 1, 2, 3, 4, 5.5]), r"not integers \(row 5: 5.5\)"),
        (np.array([0, 1, np.nan, 3, 4, 5]), "not integers"),
        (np.array([0, 1, -2, 3, 4, 5]), "negative label"),
        (np.array([0, 1, 2, 3, 4, 10_000]), "more than 10,000 classes"),
        (np.array([True, False, True, True, False, False]), "expected integers or strings"),
    ],
)
def test_bad_labels(tmp_path, labels, match):
    np.savez(tmp_path / "l.npz", data=GRAY, labels=labels)
    with pytest.raises(DDMError, match=match) as err:
        _load(tmp_path / "l.npz")
    assert "\n" not in str(err.value)


def test_more_than_10000_string_classes(tmp_path):
    np.savez(tmp_path / "s.npz", data=np.zeros((10_001, 1, 1), np.uint8), labels=np.array([f"c{i}" for i in range(10_001)]))
    with pytest.raises(DDMError, match="10,001 distinct labels, more than 10,000 classes"):
        _load(tmp_path / "s.npz")


def test_label_column_must_exist_where_named(tmp_path):
    np.savez(tmp_path / "a.npz", data=GRAY, labels=np.zeros(6, int))
    with pytest.raises(DDMError, match="no array 'cls'"):
        _load(tmp_path / "a.npz", label_column="cls")
    np.save(tmp_path / "a.npy", GRAY)
    with pytest.raises(DDMError, match="label_column"):
        _load(tmp_path / "a.npy", label_column="labels")
    with pytest.raises(DDMError, match="label_column"):
        load_dataset(DataConfig(source="digits", label_column="target"))
    with pytest.raises(DDMError, match="data.labels='none'"):
        DataConfig(labels="none", label_column="label")
    with pytest.raises(DDMError, match="data.labels"):
        DataConfig(labels="yes")


def test_image_folder_class_subfolders(tmp_path):
    _save_pngs(tmp_path / "pets" / "dog", RGB[:2])
    _save_pngs(tmp_path / "pets" / "cat", RGB[2:5])
    ds = _load(tmp_path / "pets")
    assert ds.class_names == ["cat", "dog"] and sorted(ds.labels.tolist()) == [0, 0, 0, 1, 1]
    # Each image keeps its own folder's label, whatever order the folder is read in.
    for image, label in zip(ds.images, ds.labels):
        is_dog = any(np.array_equal(image, dog) for dog in RGB[:2])
        assert ds.class_names[label] == ("dog" if is_dog else "cat")
    assert _load(tmp_path / "pets", labels="none").labels is None
    _save_pngs(tmp_path / "flat", RGB[:3])
    assert _load(tmp_path / "flat").labels is None  # no subfolders, no classes


def test_parquet_label_column(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    images = [{"bytes": _png(a)} for a in GRAY]
    pq.write_table(pa.table({"image": images, "label": [3, 1, 3, 0, 1, 2]}), tmp_path / "int.parquet")
    ds = _load(tmp_path / "int.parquet")
    assert ds.labels.tolist() == [3, 1, 3, 0, 1, 2] and ds.num_classes == 4
    assert _load(tmp_path / "int.parquet", limit=2).labels.tolist() == [3, 1]
    pq.write_table(pa.table({"image": images, "kind": list("bacabc")}), tmp_path / "str.parquet")
    assert _load(tmp_path / "str.parquet").labels is None  # no "label" column: unlabelled
    ds = _load(tmp_path / "str.parquet", label_column="kind")
    assert ds.class_names == ["a", "b", "c"] and ds.labels.tolist() == [1, 0, 2, 0, 1, 2]
    with pytest.raises(DDMError, match="no label column 'label'"):
        _load(tmp_path / "str.parquet", label_column="label")
    pq.write_table(pa.table({"image": images, "label": [1, None, 0, 1, 0, 1]}), tmp_path / "gap.parquet")
    with pytest.raises(DDMError, match="empty cell"):
        _load(tmp_path / "gap.parquet")
