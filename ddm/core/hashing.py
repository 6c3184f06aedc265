"""Exact digests: SHA-256 of canonical bytes of image batches, datasets and parameter trees.

Exact hashes pin what must be bit-identical: a checkpoint's parameters, a dataset, or a batch of images
regenerated on the same hardware. Canonical byte layouts, versioned so that a change of layout can never
collide with an old hash:

- `array_sha256(array, tag)`: the ASCII header ``"{tag}:{d0},{d1},...\n"`` followed by the array's C-order
  bytes. `images_sha256` uses tag ``ddm-images:v1`` (uint8 [n, H, W, C] batches), a dataset's fingerprint
  ``ddm-dataset:v1``.
- `pytree_sha256`: the header ``"ddm-pytree:v1:{number of leaves}\n"``, then for every leaf, in order of its
  key-path string (`jax.tree_util.keystr`), the record
  ``"{len(path)}:{path}\n{dtype name}\n{shape, comma-separated}\n{number of bytes}\n"`` followed by the
  leaf's little-endian C-order bytes. Only the key paths, dtypes, shapes and values count: the container
  types and the order in which a dict was filled do not, nor how a checkpoint lays the arrays out on disk.
- `file_sha256(path)`: SHA-256 of a file's bytes, as `sha256sum` prints it (exports' SHA256SUMS, checkpoint
  step digests).

The canonical bytes of JSON documents (what run ids, signatures and commitments digest) are
`ddm.core.documents.canonical_bytes`.
"""


from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from ddm.core.errors import DDMError


HASH_CHUNK_BYTES = 64 << 20  # arrays are hashed a block of rows at a time (memory-mapped inputs stay on disk)


def array_hasher(tag: str, shape: tuple[int, ...]):
    """A hashlib SHA-256 object primed with ``"{tag}:{shape}\n"``: feed it the array's C-order bytes, a block of
    rows at a time, and its hexdigest equals `array_sha256` of the whole array (for writers that stream rows)."""
    return hashlib.sha256(f"{tag}:{','.join(str(int(d)) for d in shape)}\n".encode("ascii"))


def array_sha256(array: np.ndarray, tag: str, dtype: np.dtype | None = None) -> str:
    """SHA-256 hex digest of ``"{tag}:{shape}\n"`` followed by the array's C-order bytes (as `dtype`, if given).

    Hashed a block of rows at a time: anything with `shape` and row slicing works (a memory-mapped file is
    never read whole)."""
    shape = tuple(np.shape(array)) if not hasattr(array, "shape") else tuple(array.shape)
    digest = array_hasher(tag, shape)
    if len(shape) == 0 or shape[0] == 0:
        digest.update(np.ascontiguousarray(array, dtype).tobytes())
        return digest.hexdigest()
    row_bytes = max(1, int(np.prod(shape[1:])) * np.dtype(dtype or array.dtype).itemsize)
    rows = max(1, HASH_CHUNK_BYTES // row_bytes)
    for start in range(0, shape[0], rows):
        digest.update(np.ascontiguousarray(array[start:start + rows], dtype).tobytes())
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    """SHA-256 hex digest of a file's bytes (read in 1 MiB blocks), as `sha256sum` prints it."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def images_sha256(images: np.ndarray) -> str:
    """SHA-256 hex digest of a batch of images, uint8 [n, H, W, C] (tag ``ddm-images:v1``).

    Two batches with the same bytes but different shapes hash differently. Raises DDMError for any dtype
    other than uint8 or any ndim other than 4.
    """
    arr = np.asarray(images)
    if arr.dtype != np.uint8:
        raise DDMError(f"images_sha256 needs uint8 images, got dtype {arr.dtype}")
    if arr.ndim != 4:
        raise DDMError(f"images_sha256 needs images shaped [n, H, W, C], got shape {arr.shape}")
    return array_sha256(arr, "ddm-images:v1")


def dataset_fingerprint(images: np.ndarray) -> str:
    """SHA-256 of a dataset's canonical uint8 images [N, H, W, C], shape included (tag ``ddm-dataset:v1``), or
    of its float latents (little-endian float16 / float32 bytes, tag ``ddm-latents:v1:<dtype>``)."""
    if images.dtype.kind == "f":
        return array_sha256(images, f"ddm-latents:v1:{images.dtype.name}", images.dtype.newbyteorder("<"))
    return array_sha256(np.asarray(images, dtype=np.uint8), "ddm-dataset:v1")


def labels_fingerprint(labels: np.ndarray, class_names: list[str]) -> str:
    """SHA-256 of a dataset's class labels int [N] and the class names they index (tag ``ddm-labels:v1``)."""
    digest = hashlib.sha256(array_sha256(np.asarray(labels, dtype="<i4"), "ddm-labels:v1").encode("ascii"))
    digest.update(json.dumps(list(class_names)).encode())
    return digest.hexdigest()


def _leaf_to_numpy(leaf: Any) -> tuple[np.ndarray, str]:
    """A fully addressable leaf (jax array, numpy array or Python scalar) as (little-endian numpy array,
    dtype name). Typed PRNG keys are hashed through their raw key data under the key dtype's name."""
    dtype = getattr(leaf, "dtype", None)
    if dtype is not None and type(dtype).__module__.startswith("jax"):
        import jax

        if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
            return np.asarray(jax.random.key_data(leaf)), str(dtype)
    arr = np.asarray(leaf)
    if arr.dtype.hasobject:
        raise DDMError(f"cannot hash a pytree leaf of type {type(leaf).__name__} (object dtype)")
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return arr, arr.dtype.name


def pytree_sha256(tree: Any) -> str:
    """SHA-256 hex digest of a pytree of arrays (jax or numpy, any shapes and dtypes).

    Leaves are visited in order of their key-path string, and each contributes its path, dtype name, shape
    and C-order bytes (layout in the module docstring), so the digest depends only on what the tree holds:
    dict insertion order, container types and checkpoint file layout do not change it; any changed byte,
    dtype, shape or path does. Jax arrays are fetched to the host (they must be fully addressable).
    """
    import jax  # here, not at the top: image digests and dataset fingerprints need no jax

    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    keyed = sorted(((jax.tree_util.keystr(path), leaf) for path, leaf in leaves), key=lambda kv: kv[0])
    for (a, _), (b, _) in zip(keyed, keyed[1:]):
        if a == b:
            raise DDMError(f"cannot hash pytree: two leaves share the key path {a}")
    digest = hashlib.sha256(f"ddm-pytree:v1:{len(keyed)}\n".encode("ascii"))
    for path, leaf in keyed:
        arr, dtype_name = _leaf_to_numpy(leaf)
        data = np.ascontiguousarray(arr).tobytes()
        shape = ",".join(str(d) for d in arr.shape)
        digest.update(f"{len(path)}:{path}\n{dtype_name}\n{shape}\n{len(data)}\n".encode("utf-8"))
        digest.update(data)
    return digest.hexdigest()
