"""Exact hashes (images, pytrees), perceptual hashes against the imagehash reference, and `ddm hash` files."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ddm.core import hashing as exact
from ddm.core.errors import DDMError
from ddm.verify import phash as hashing


def _random_images() -> list[np.ndarray]:
    """Random and structured uint8 images of every accepted layout."""
    rng = np.random.default_rng(0)
    images = []
    for shape in [(8, 8), (28, 28), (32, 32, 3), (32, 32, 4), (28, 28, 1), (17, 40, 3), (64, 48), (5, 3, 3)]:
        for _ in range(6):
            images.append(rng.integers(0, 256, shape, dtype=np.uint8))
    yy, xx = np.mgrid[0:32, 0:32]
    images += [
        np.zeros((32, 32), np.uint8),  # constant: every DCT coefficient ties with the median
        np.full((28, 28, 3), 200, np.uint8),
        ((xx + yy) * 4).astype(np.uint8),  # gradient
        (((xx // 4 + yy // 4) % 2) * 255).astype(np.uint8),  # checkerboard
        np.stack([(xx * 8).astype(np.uint8), (yy * 8).astype(np.uint8), ((xx * yy) % 256).astype(np.uint8)], -1),
        np.dstack([((xx + yy) * 4).astype(np.uint8)] * 3 + [(xx * 8).astype(np.uint8)]),  # RGBA, varying alpha
        (rng.random((28, 28)) < 0.2).astype(np.uint8) * 255,  # sparse, MNIST-like
    ]
    return images


def _reference(image: np.ndarray):
    """imagehash's phash and dhash of the PIL image the array holds ([H, W, 1] as the [H, W] image)."""
    imagehash = pytest.importorskip("imagehash")
    pil = Image.fromarray(image[:, :, 0] if image.ndim == 3 and image.shape[2] == 1 else image)
    return imagehash.phash(pil), imagehash.dhash(pil)


# --- perceptual hashes --------------------------------------------------------------------------------------


def test_phash_dhash_match_imagehash_bit_for_bit():
    for image in _random_images():
        ref_p, ref_d = _reference(image)
        p, d = hashing.phash(image), hashing.dhash(image)
        assert hashing.hash_hex(p) == str(ref_p), image.shape
        assert hashing.hash_hex(d) == str(ref_d), image.shape
        # bit order: bit i (from the most significant end) is the row-major grid cell i
        assert [(p >> (63 - i)) & 1 for i in range(64)] == [int(b) for b in ref_p.hash.flatten()]
        assert [(d >> (63 - i)) & 1 for i in range(64)] == [int(b) for b in ref_d.hash.flatten()]


def test_hex_roundtrip_matches_imagehash_hex_to_hash():
    imagehash = pytest.importorskip("imagehash")
    rng = np.random.default_rng(1)
    for _ in range(20):
        h = hashing.phash(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
        s = hashing.hash_hex(h)
        assert len(s) == 16 and s == s.lower()
        assert hashing.hex_to_hash(s) == h
        assert hashing.hex_to_hash(s.upper()) == h
        assert str(imagehash.hex_to_hash(s)) == s
    assert hashing.hash_hex(0) == "0" * 16
    assert hashing.hash_hex(1) == "0" * 15 + "1"
    assert hashing.hash_hex((1 << 64) - 1) == "f" * 16


def test_hamming_matches_imagehash_difference():
    pytest.importorskip("imagehash")
    assert hashing.hamming(0, 0) == 0
    assert hashing.hamming(0, (1 << 64) - 1) == 64
    assert hashing.hamming(0b1011, 0b0001) == 2
    assert hashing.hamming(5, 9) == hashing.hamming(9, 5)
    images = _random_images()[:10]
    for a, b in zip(images, images[1:]):
        (pa, _), (pb, _) = _reference(a), _reference(b)
        assert hashing.hamming(hashing.phash(a), hashing.phash(b)) == pa - pb


def test_perceptual_hashes_batch():
    rng = np.random.default_rng(2)
    batch = rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    rows = hashing.perceptual_hashes(batch)
    assert rows == [{"phash": hashing.hash_hex(hashing.phash(x)), "dhash": hashing.hash_hex(hashing.dhash(x))}
                    for x in batch]
    assert hashing.perceptual_hashes(np.zeros((0, 8, 8, 1), np.uint8)) == []


@pytest.mark.parametrize(
    "image",
    [
        np.zeros((8, 8), np.float32),  # dtype
        np.zeros((8, 8, 2), np.uint8),  # two channels
        np.zeros((2, 8, 8, 3), np.uint8),  # a batch, not one image
        np.zeros((8,), np.uint8),
        np.zeros((0, 8), np.uint8),
    ],
)
def test_perceptual_hash_rejects_bad_images(image):
    with pytest.raises(DDMError):
        hashing.phash(image)
    with pytest.raises(DDMError):
        hashing.dhash(image)


@pytest.mark.parametrize("bad", ["", "abc", "0" * 15, "0" * 17, "g" * 16, "0x" + "0" * 14, " " + "0" * 15,
                                 "0000_0000_0000_00", None, 123])
def test_hex_to_hash_rejects_malformed(bad):
    with pytest.raises(DDMError):
        hashing.hex_to_hash(bad)


def test_hash_hex_and_hamming_reject_out_of_range():
    for bad in (-1, 1 << 64, "ff", 1.0):
        with pytest.raises(DDMError):
            hashing.hash_hex(bad)
    with pytest.raises(DDMError):
        hashing.hamming(-1, 0)


# --- images_sha256 ------------------------------------------------------------------------------------------


def test_images_sha256_stable_and_sensitive():
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    h = exact.images_sha256(images)
    assert len(h) == 64 and int(h, 16) >= 0
    assert exact.images_sha256(images.copy()) == h
    assert exact.images_sha256(np.asfortranarray(images)) == h  # memory layout does not matter
    changed = images.copy()
    changed[1, 4, 5, 2] ^= 1
    assert exact.images_sha256(changed) != h
    # same bytes, different shape
    assert exact.images_sha256(images.reshape(3, 8, 24, 1)) != h
    assert exact.images_sha256(images.reshape(1, 24, 8, 3)) != h


def test_images_sha256_documented_layout():
    import hashlib

    images = np.arange(2 * 2 * 3 * 1, dtype=np.uint8).reshape(2, 2, 3, 1)
    expected = hashlib.sha256(b"ddm-images:v1:2,2,3,1\n" + images.tobytes()).hexdigest()
    assert exact.images_sha256(images) == expected


@pytest.mark.parametrize("bad", [np.zeros((1, 4, 4, 3), np.float32), np.zeros((4, 4, 3), np.uint8),
                                 np.zeros((1, 4, 4, 3), np.int16)])
def test_images_sha256_rejects(bad):
    with pytest.raises(DDMError):
        exact.images_sha256(bad)


# --- pytree_sha256 ------------------------------------------------------------------------------------------


def _tree():
    rng = np.random.default_rng(4)
    return {
        "dense": {"kernel": rng.standard_normal((4, 3)).astype(np.float32), "bias": np.zeros(3, np.float32)},
        "blocks": [{"w": rng.standard_normal((2, 2)).astype(np.float32)}, {"w": np.ones((2, 2), np.float32)}],
        "step": np.int32(7),
    }


def test_pytree_sha256_order_and_container_independent():
    import jax.numpy as jnp

    tree = _tree()
    h = exact.pytree_sha256(tree)
    reordered = {"step": tree["step"], "blocks": tree["blocks"],
                 "dense": {"bias": tree["dense"]["bias"], "kernel": tree["dense"]["kernel"]}}
    assert list(reordered) != list(tree)
    assert exact.pytree_sha256(reordered) == h
    as_jax = {"dense": {k: jnp.asarray(v) for k, v in tree["dense"].items()},
              "blocks": [{"w": jnp.asarray(b["w"])} for b in tree["blocks"]], "step": jnp.asarray(tree["step"])}
    assert exact.pytree_sha256(as_jax) == h
    assert exact.pytree_sha256(_tree()) == h  # stable


def test_pytree_sha256_sensitive():
    tree = _tree()
    h = exact.pytree_sha256(tree)

    one_byte = _tree()
    one_byte["dense"]["kernel"].reshape(-1).view(np.uint8)[5] ^= 1
    assert exact.pytree_sha256(one_byte) != h

    dtype = _tree()
    dtype["dense"]["bias"] = dtype["dense"]["bias"].astype(np.int32)  # zeros: same bytes, other dtype
    assert exact.pytree_sha256(dtype) != h

    shape = _tree()
    shape["dense"]["kernel"] = shape["dense"]["kernel"].reshape(3, 4)
    assert exact.pytree_sha256(shape) != h

    path = _tree()
    path["dense"]["b"] = path["dense"].pop("bias")
    assert exact.pytree_sha256(path) != h

    swapped = _tree()
    swapped["blocks"].reverse()
    assert exact.pytree_sha256(swapped) != h

    extra = _tree()
    extra["extra"] = np.zeros((0,), np.float32)  # even an empty leaf counts
    assert exact.pytree_sha256(extra) != h


def test_pytree_sha256_bfloat16_and_prng_key():
    import jax
    import jax.numpy as jnp

    x = jnp.arange(6, dtype=jnp.bfloat16).reshape(2, 3)
    assert exact.pytree_sha256({"x": x}) != exact.pytree_sha256({"x": x.astype(jnp.float16)})
    k = jax.random.key(0)
    assert exact.pytree_sha256({"k": k}) == exact.pytree_sha256({"k": jax.random.key(0)})
    assert exact.pytree_sha256({"k": k}) != exact.pytree_sha256({"k": jax.random.key(1)})


def test_pytree_sha256_big_endian_equals_little_endian():
    a = np.arange(5, dtype="<f4")
    assert exact.pytree_sha256({"a": a}) == exact.pytree_sha256({"a": a.astype(">f4")})


def test_pytree_sha256_rejects_object_leaves():
    with pytest.raises(DDMError):
        exact.pytree_sha256({"a": np.array([object()], dtype=object)})


# --- hash_files / format_hash_table -------------------------------------------------------------------------


def test_hash_files_png_and_npz_agree(tmp_path):
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (3, 20, 20, 3), dtype=np.uint8)
    png = tmp_path / "one.png"
    Image.fromarray(images[1]).save(png)
    npz = tmp_path / "batch.npz"
    np.savez(npz, images=images, labels=np.arange(3))

    rows = hashing.hash_files([str(png), str(npz)])
    assert [(r["file"], r["index"]) for r in rows] == [(str(png), None), (str(npz), 0), (str(npz), 1), (str(npz), 2)]
    assert rows[0]["sha256"] == exact.images_sha256(images[1:2])
    keys = ("sha256", "phash", "dhash")
    assert {k: rows[0][k] for k in keys} == {k: rows[2][k] for k in keys}
    for i, row in enumerate(rows[1:]):
        assert row["phash"] == hashing.hash_hex(hashing.phash(images[i]))
        assert row["dhash"] == hashing.hash_hex(hashing.dhash(images[i]))
        ref_p, ref_d = _reference(images[i])
        assert (row["phash"], row["dhash"]) == (str(ref_p), str(ref_d))

    table = hashing.format_hash_table(rows).splitlines()
    assert len(table) == 5
    assert table[0].split() == ["file", "index", "sha256", "phash", "dhash"]
    assert table[1].split()[1] == "-" and table[3].split()[1] == "1"
    starts = {line.index(line.split()[2]) for line in table}
    assert len(starts) == 1  # the sha256 column is aligned


def test_hash_files_grayscale_png_and_only_array_npz(tmp_path):
    rng = np.random.default_rng(6)
    gray = rng.integers(0, 256, (2, 12, 10), dtype=np.uint8)
    png = tmp_path / "g.png"
    Image.fromarray(gray[0]).save(png)
    npz = tmp_path / "mnist_like.npz"
    np.savez(npz, data=gray)  # the only array, [n, H, W] counts as C=1
    rows = hashing.hash_files([str(png), str(npz)])
    assert rows[0]["sha256"] == exact.images_sha256(gray[:1, :, :, None]) == rows[1]["sha256"]
    assert rows[0]["phash"] == rows[1]["phash"] and rows[0]["dhash"] == rows[1]["dhash"]
    assert len(rows) == 3


def test_hash_files_palette_png_and_jpeg(tmp_path):
    rng = np.random.default_rng(7)
    rgb = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    pal = tmp_path / "p.png"
    Image.fromarray(rgb).quantize(8).save(pal)
    jpg = tmp_path / "x.jpg"
    Image.fromarray(rgb).save(jpg, quality=90)
    rows = hashing.hash_files([str(pal), str(jpg)])
    decoded_pal = np.asarray(Image.open(pal).convert("RGB"))
    assert rows[0]["sha256"] == exact.images_sha256(decoded_pal[None])
    assert rows[1]["sha256"] == exact.images_sha256(np.asarray(Image.open(jpg))[None])


def test_hash_files_errors(tmp_path):
    with pytest.raises(DDMError, match="no such file"):
        hashing.hash_files([str(tmp_path / "missing.png")])
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    with pytest.raises(DDMError, match="not a readable image"):
        hashing.hash_files([str(junk)])
    bad_zip = tmp_path / "bad.npz"
    bad_zip.write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(DDMError):
        hashing.hash_files([str(bad_zip)])
    two = tmp_path / "two.npz"
    np.savez(two, a=np.zeros((1, 4, 4, 3), np.uint8), b=np.zeros(3))
    with pytest.raises(DDMError, match="no 'images'"):
        hashing.hash_files([str(two)])
    floats = tmp_path / "floats.npz"
    np.savez(floats, images=np.zeros((1, 4, 4, 3), np.float32))
    with pytest.raises(DDMError, match="expected uint8"):
        hashing.hash_files([str(floats)])
    deep = tmp_path / "deep.png"
    Image.fromarray(np.zeros((4, 4), np.uint16)).save(deep)
    with pytest.raises(DDMError, match="not supported"):
        hashing.hash_files([str(deep)])


def test_hashing_module_does_not_import_imagehash():
    import subprocess
    import sys

    code = "import sys, ddm.verify.phash, ddm.core.hashing; assert 'imagehash' not in sys.modules; assert 'jax' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(__import__("pathlib").Path(__file__).parents[1]))
