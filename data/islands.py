"""Island bundles: everything one island needs, and nothing else.

`ddm prepare` writes one bundle per cluster, `RUN/islands/<k>/`:

    island.json   format "ddm-island/v1": run_id (the run's `plan_sha256`), cluster, dataset (fingerprint,
                  image_shape, num_classes, class_names), shard {path, sha256, count}, holdout {path, sha256,
                  count} or null, config (the resolved config; islands train `config.expert`)
    shard/        the cluster's training shard (images [+ labels] + shard.json), the one the manifest points at
    holdout/      the held-out images whose nearest centroid is k (their loss is logged while training)

Copying (or uploading) that folder is how work is handed to an island; the island never sees the run
directory. `Bundle.open` reads island.json and checks it against `ISLAND_SCHEMA` (a damaged or hand-edited
one is a one-line error naming the field); the shard is checked against its digest when the
reader opens it. A bundle's digest (`bundle_sha256`, of island.json's canonical JSON) names it in the expert
record the island writes, so the coordinator can tell which plan an expert was trained from.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from ddm.core import documents
from ddm.core.codec import Codec
from ddm.core.config import Config, config_from_data, with_condition_shape, with_num_classes
from ddm.core.errors import DDMError
from ddm.core.schema import Anything, Hex, Int, ListOf, Nullable, Obj, RelPath, Str
from ddm.data import storage
from ddm.data.manifest_schema import CODEC, CONDITION_FIELDS, MAX_CLASSES, MAX_CLUSTERS, MAX_COUNT, MAX_SIDE
from ddm.data.shards import NO_LABEL, read_conditions, read_labels, read_shard, verify_shard

BUNDLE_FORMAT = "ddm-island/v1"
ISLAND_JSON = "island.json"
SHARD, HOLDOUT = "shard", "holdout"  # the bundle's shard folders

_SHARD = Obj({"path": RelPath(), "sha256": Hex(64), "count": Int(min=0, max=MAX_COUNT)})
ISLAND_SCHEMA = Obj(
    {"format": Str(),
     "run_id": Hex(64),
     "cluster": Int(min=0, max=MAX_CLUSTERS - 1),
     "dataset": Obj({"fingerprint": Hex(64),
                     "image_shape": ListOf(Int(min=1, max=MAX_SIDE), min_len=3, max_len=3,
                                           name=f"a list of 3 integers in 1..{MAX_SIDE} ([H, W, C])")},
                    optional={"num_classes": Nullable(Int(min=0, max=MAX_CLASSES)),
                              "class_names": Nullable(ListOf(Str(), max_len=MAX_CLASSES)),
                              "dtype": Str(), "codec": Nullable(CODEC), **CONDITION_FIELDS}),
     "shard": _SHARD,
     "config": Anything(dict, "an object")},  # checked by the config's own dataclasses
    optional={"holdout": Nullable(_SHARD)},
)


def bundle_dir(run_dir: str | Path, k: int) -> Path:
    return Path(run_dir) / "islands" / str(k)


def island_record(run_id: str, cluster: int, dataset: dict, shard: dict, holdout: dict | None,
                  config: dict) -> dict:
    """island.json's content (paths inside the bundle are relative to it)."""
    return {"format": BUNDLE_FORMAT, "run_id": run_id, "cluster": cluster,
            "dataset": {**{key: dataset.get(key) for key in ("fingerprint", "image_shape", "num_classes", "class_names")},
                        # latent runs: how the model sees the stored rows (image runs have neither key); runs
                        # with condition embeddings: their shape and stored dtype
                        **{key: dataset[key] for key in ("dtype", "codec", "condition_shape", "condition_dtype")
                           if key in dataset}},
            "shard": shard, "holdout": holdout, "config": config}


def write_island_json(bundle: str | Path, record: dict) -> None:
    storage.write_bytes(storage.join(bundle, ISLAND_JSON), documents.dumps(record))


def publish_bundles(run_dir: str | Path, dest: str, clusters: list[int]) -> list[str]:
    """Copies each bundle RUN/islands/<k> to `dest`/<k> (a folder or a URL, e.g. a bucket islands read from);
    returns where each went. The shard digests travel inside island.json: islands check what they read."""
    targets = []
    for k in clusters:
        target = storage.join(dest, str(k))
        storage.copy_tree(str(bundle_dir(run_dir, k)), target)
        targets.append(target)
    return targets


def bundle_sha256(record: dict) -> str:
    """SHA-256 of island.json's canonical JSON: the bundle's name in expert records."""
    return documents.digest(record)


@dataclasses.dataclass(frozen=True)
class Bundle:
    """An opened island bundle. `record` is island.json; `config` its config with this command's overrides."""

    root: Path | str  # a folder, or a URL
    record: dict
    config: Config

    @classmethod
    def open(cls, root: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Bundle:
        """Reads and checks `root/island.json` (`root`: a folder or a URL); DDMError naming what is wrong."""
        path = storage.join(root, ISLAND_JSON)
        raw = storage.read_bytes(path)
        if raw is None:
            raise DDMError(f"no island bundle at {root} ({ISLAND_JSON} missing): copy RUN/islands/<k> from a "
                           "prepared run")
        record = documents.load(raw, ISLAND_SCHEMA, f"island bundle {path}", fmt=BUNDLE_FORMAT)
        num_classes = int(record["dataset"].get("num_classes") or 0)
        condition_shape = tuple(record["dataset"].get("condition_shape") or ())
        config = with_num_classes(with_condition_shape(config_from_data(record["config"], overrides), condition_shape),
                                  num_classes)
        return cls(str(root) if storage.is_url(root) else Path(root), record, config)

    @property
    def run_id(self) -> str:
        return self.record["run_id"]

    @property
    def cluster(self) -> int:
        return int(self.record["cluster"])

    @property
    def sha256(self) -> str:
        return bundle_sha256(self.record)

    @property
    def codec(self) -> Codec:
        """How the model sees the shard's rows: images in [-1, 1], or standardised latents (as `Run.codec`)."""
        return Codec.from_dict(self.record["dataset"].get("codec"))

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.record["dataset"]["image_shape"])

    @property
    def condition_shape(self) -> tuple[int, ...]:
        """One image's condition embedding: (D,), (L, D), or () when the run has none."""
        return tuple(int(s) for s in self.record["dataset"].get("condition_shape") or ())

    @property
    def shard_path(self) -> str:
        return storage.join(self.root, self.record["shard"]["path"])

    @property
    def shard_sha256(self) -> str:
        return self.record["shard"]["sha256"]

    def holdout_set(self) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """The island's held-out images with their cluster id and class (-1 unlabelled), or their condition
        embeddings, as a reader gives them: (uint8 [N, H, W, C], int32 [N], int32 [N] or float32
        [N, *condition_shape]); None when it has none. Checked against its digest."""
        held = self.record.get("holdout")
        if not held or not held.get("count"):
            return None
        path = storage.join(self.root, held["path"])
        images, classes, conditions = read_shard(path), read_labels(path), read_conditions(path)
        verify_shard(path, held["sha256"], "holdout", images=images, labels=classes, conditions=conditions)
        if conditions is not None:
            classes = conditions.astype(np.float32)
        elif classes is None:
            classes = np.full(len(images), NO_LABEL, np.int32)
        return images, np.full(len(images), self.cluster, np.int32), classes
