"""One way to name where things are: a local path or an object-store URL (`s3://bucket/key`, `gs://bucket/key`).

URLs are read and written through tensorstore kvstores, the same layer that reads the zarr shards, so an
island bundle, an expert's OUT and the records in them can live in a bucket. S3-compatible servers other
than AWS (MinIO, moto, Ceph) are reached through the standard `AWS_ENDPOINT_URL` environment variable (and
`AWS_REGION`, default us-east-1); credentials come from the usual AWS variables or files, and for gs:// from
Google's application default credentials.

Writes of one file are whole: a local file is written through a temporary name and renamed, an object is
one PUT. `read_versioned` / `write_if` are compare-and-swap on one file (tensorstore's conditional writes:
a lock + rename on local disks, `If-None-Match` / `If-Match` on S3, generation preconditions on GCS), which
is what makes a lease safe without a lock server.
"""

from __future__ import annotations

import os
from pathlib import Path

import tensorstore as ts

from ddm.core.errors import DDMError
from ddm.core.files import atomic_write


def is_url(path: str | Path) -> bool:
    """Whether `path` is an object-store URL rather than a local path (file:// counts as local)."""
    text = str(path)
    return "://" in text and not text.startswith("file://")


def join(base: str | Path, *parts: str) -> str:
    """`base/part/...` for a local path or a URL."""
    if is_url(base):
        return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(str(base).removeprefix("file://"), *parts))


def kvstore(path: str, prefix: str = "") -> dict | str:
    """The tensorstore kvstore spec of folder `path` (+ `prefix`, ending in "/" for a folder)."""
    if not is_url(path):
        return {"driver": "file", "path": f"{path.removeprefix('file://').rstrip('/')}/{prefix}"}
    url = f"{path.rstrip('/')}/{prefix}"
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if url.startswith("s3://") and endpoint:
        bucket, _, key = url.removeprefix("s3://").partition("/")
        return {"driver": "s3", "bucket": bucket, "path": key, "endpoint": endpoint,
                "aws_region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"}
    return url


def _store(path: str | Path) -> tuple[ts.KvStore, str]:
    """(kvstore of the folder of file `path`, the file's key in it)."""
    folder, _, name = str(path).rstrip("/").rpartition("/")
    return ts.KvStore.open(kvstore(folder)).result(), name


def _fail(what: str, path, err: Exception) -> DDMError:
    return DDMError(f"cannot {what} {path}: {str(err).splitlines()[0]}")


def read_bytes(path: str | Path) -> bytes | None:
    """The bytes of file `path` (local or URL); None if it does not exist."""
    path = str(path)
    if not is_url(path):
        local = Path(path.removeprefix("file://"))
        return local.read_bytes() if local.is_file() else None
    return read_versioned(path)[0]


def write_bytes(path: str | Path, data: bytes | str) -> None:
    """Writes file `path` (local or URL) whole: readers see the old bytes or the new ones, never a part."""
    if not is_url(path):
        atomic_write(str(path).removeprefix("file://"), data)
        return
    try:
        store, key = _store(path)
        store.write(key, data.encode() if isinstance(data, str) else data).result()
    except ValueError as err:
        raise _fail("write", path, err) from None


def delete(path: str | Path) -> None:
    """Removes file `path` (local or URL); nothing if it does not exist."""
    if not is_url(path):
        Path(str(path).removeprefix("file://")).unlink(missing_ok=True)
        return
    try:
        store, key = _store(path)
        store.write(key, None).result()
    except ValueError as err:
        raise _fail("delete", path, err) from None


def list_files(folder: str | Path) -> list[str]:
    """Every file under `folder` (local or URL), as sorted '/'-separated paths relative to it."""
    if not is_url(folder):
        root = Path(str(folder).removeprefix("file://"))
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    try:
        return sorted(k.decode() for k in ts.KvStore.open(kvstore(str(folder))).result().list().result())
    except ValueError as err:
        raise _fail("list", folder, err) from None


def read_versioned(path: str | Path) -> tuple[bytes | None, bytes]:
    """(bytes of file `path` or None if missing, its generation): the token `write_if` compares against."""
    try:
        store, key = _store(path)
        result = store.read(key).result()
    except ValueError as err:
        raise _fail("read", path, err) from None
    return (bytes(result.value) if result.state == "value" else None), bytes(result.stamp.generation)


def write_if(path: str | Path, data: bytes | str | None, generation: bytes) -> bytes | None:
    """Writes (None: deletes) file `path` only if it still is at `generation` (from `read_versioned`, or a
    previous `write_if`); returns the new generation, None when someone else changed the file first."""
    try:
        store, key = _store(path)
        value = data.encode() if isinstance(data, str) else data
        new = bytes(store.write(key, value, if_equal=generation).result().generation)
    except ValueError as err:
        raise _fail("write", path, err) from None
    return new or None


def copy_tree(src: str, dst: str) -> int:
    """Copies every file under folder `src` to folder `dst` (local or URL, either way); returns the count."""
    try:
        source = ts.KvStore.open(kvstore(src)).result()
        target = ts.KvStore.open(kvstore(dst)).result()
        keys = [k.decode() for k in source.list().result()]
        for key in keys:
            target.write(key, source.read(key).result().value).result()
    except ValueError as err:
        raise DDMError(f"cannot copy {src} to {dst}: {str(err).splitlines()[0]}") from None
    return len(keys)
