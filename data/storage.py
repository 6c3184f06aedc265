"""One way to name where things are: a local path or an object-store URL (`s3://bucket/key`, `gs://bucket/key`).

URLs are read and written through tensorstore kvstores, the same layer that reads the zarr shards, so an
island bundle can live in a bucket. S3-compatible servers other than AWS (MinIO, moto, Ceph) are reached
through the standard `AWS_ENDPOINT_URL` environment variable (and `AWS_REGION`, default us-east-1);
credentials come from the usual AWS variables or files.
"""

from __future__ import annotations

import os
from pathlib import Path

import tensorstore as ts

from ddm.core.errors import DDMError


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


def read_bytes(path: str) -> bytes | None:
    """The bytes of file `path` (local or URL); None if it does not exist."""
    if not is_url(path):
        local = Path(path.removeprefix("file://"))
        return local.read_bytes() if local.is_file() else None
    folder, _, name = path.rpartition("/")
    try:
        result = ts.KvStore.open(kvstore(folder)).result().read(name).result()
    except ValueError as err:
        raise DDMError(f"cannot read {path}: {str(err).splitlines()[0]}") from None
    return bytes(result.value) if result.state == "value" else None


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
