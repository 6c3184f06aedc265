"""`Run`: one object for a prepared run directory.

Every command that works on a run (train an island, the router or the monolith, sample, evaluate, verify)
opens it the same way: read and check `manifest.json`, resolve the stored config with this command's
`--set` overrides, and ask the run where its shards, components and outputs live. Paths inside the manifest
are relative to the run directory, so a run can be moved or copied as a whole.

An *export* (`ddm export`: the finished models as safetensors files beside the same manifest, no shards) opens
the same way: `Run.open` checks its SHA256SUMS first, and `weights_path` names the exported file of a
component instead of its orbax checkpoint; everything that loads models works on either.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ddm.core.codec import Codec
from ddm.core.config import Config, config_from_data, with_condition_shape, with_num_classes
from ddm.core.errors import DDMError
from ddm.data import manifest as mf
from ddm.data import membership
from ddm.data.components import EXPERTS, Component, component
from ddm.data.shards import NO_LABEL, read_conditions, read_labels, read_shard
from ddm.data.sums import check_sums

EXPORT_INFO = "export.json"  # marks an exported run folder
WEIGHTS_SUFFIX = ".safetensors"  # an exported component's file: its manifest path + this suffix


@dataclasses.dataclass(frozen=True)
class Run:
    """A prepared run directory. `manifest` is as read when the Run was opened (see `reload`)."""

    root: Path
    manifest: dict
    config: Config
    overrides: tuple[str, ...] = ()

    @classmethod
    def open(cls, root: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Run:
        """Reads and checks `root/manifest.json` and resolves its config with `overrides` (`--set` values).
        An export's files are first checked against its SHA256SUMS. The resolved `expert.model.num_classes` must
        be the data's (an override cannot make a conditional run unconditional, or the other way round), and so
        must `condition_shape`.
        """
        if (Path(root) / EXPORT_INFO).is_file():
            check_sums(Path(root))
        manifest = mf.read_manifest(root)
        config = with_condition_shape(config_from_data(manifest["config"], overrides),
                                      tuple(manifest["dataset"].get("condition_shape") or ()))
        config = with_num_classes(config, int(manifest["dataset"].get("num_classes", 0)))
        return cls(Path(root), manifest, config, tuple(overrides))

    def reload(self) -> Run:
        """The same run with its manifest read again (after another process recorded a component)."""
        return Run.open(self.root, self.overrides)

    # -----------------------------------------------------------------------------------------------------
    # Identity and dataset.
    # -----------------------------------------------------------------------------------------------------

    @property
    def sha256(self) -> str:
        """The membership id, the run's identity in verification records: its plan, the weight digests of the
        finished experts and router (what an ensemble sample uses; not the monolith or student), the joined
        clusters and the removed set; no times, durations or paths (`ddm.data.manifest.manifest_sha256`)."""
        return mf.manifest_sha256(self.manifest)

    @property
    def membership_id(self) -> str:
        """The id of the run's current membership (`ddm.data.membership`): the same value as `sha256`."""
        return self.sha256

    def at(self, membership_id: str) -> Run:
        """The run as it was when `membership_id` was its membership (`ddm.data.membership.manifest_at`: its
        clusters, experts and router from the history); `self` when that is the current one. DDMError (one line)
        when the id is not in the history or a model of that membership is gone."""
        if membership_id == self.sha256:
            return self
        return dataclasses.replace(self, manifest=membership.manifest_at(self.manifest, membership_id, self.root))

    @property
    def run_id(self) -> str:
        """The plan's digest, which island bundles and expert records carry (`manifest.plan_sha256`)."""
        return mf.plan_sha256(self.manifest)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.manifest["dataset"]["image_shape"])

    @property
    def dataset(self) -> dict:
        return self.manifest["dataset"]

    @property
    def codec(self) -> Codec:
        """How models see this run's stored rows: images in [-1, 1], or standardised latents."""
        return Codec.from_dict(self.dataset.get("codec"))

    @property
    def is_export(self) -> bool:
        """Whether this is an exported folder (`ddm export`) rather than a training run directory."""
        return (self.root / EXPORT_INFO).is_file()

    @property
    def num_classes(self) -> int:
        """Number of class labels of the data (0: unlabelled, the models are unconditional)."""
        return int(self.dataset.get("num_classes", 0))

    @property
    def condition_shape(self) -> tuple[int, ...]:
        """One image's condition embedding: (D,) pooled, (L, D) tokens, or () when the run has none."""
        return tuple(int(s) for s in self.dataset.get("condition_shape") or ())

    @property
    def class_names(self) -> list[str] | None:
        """Name of each class (None: unlabelled)."""
        return self.dataset.get("class_names")

    def class_shares(self) -> np.ndarray:
        """[K, num_classes] float64: p(cluster k | class y), each class's training images over the member clusters
        (the router's posterior at pure noise given y; 0 for a removed cluster). DDMError for unlabelled data."""
        if not self.num_classes:
            raise DDMError(f"run {self.root} has no class labels")
        counts = self._member_rows(np.array([c["class_counts"] for c in self.clusters], np.float64))
        return counts / np.maximum(counts.sum(0, keepdims=True), 1.0)

    def resolve(self, relative: str) -> str:
        """A path stored in the manifest, made absolute against the run directory (URLs pass through)."""
        return mf.resolve(self.root, relative)

    # -----------------------------------------------------------------------------------------------------
    # Clusters and shards.
    # -----------------------------------------------------------------------------------------------------

    @property
    def clusters(self) -> list[dict]:
        return self.manifest["clusters"]

    @property
    def num_clusters(self) -> int:
        """Cluster slots: the planned clusters and those that joined later, removed ones included (ids are
        never reused), so K of the experts list and the router's outputs."""
        return len(self.clusters)

    @property
    def removed_clusters(self) -> list[int]:
        """Clusters that left the membership (`ddm remove-island`)."""
        return membership.removed(self.manifest)

    @property
    def cluster_ids(self) -> list[int]:
        """The member clusters' ids, in order (every slot but the removed ones)."""
        return membership.member_ids(self.manifest)

    def cluster(self, k: int) -> dict:
        """The manifest entry of member cluster k; DDMError naming the valid range if there is none, or saying
        that k left."""
        if not 0 <= k < self.num_clusters:
            raise DDMError(f"cluster {k} does not exist: the run has clusters 0..{self.num_clusters - 1}")
        if k in self.removed_clusters:
            raise DDMError(f"cluster {k} was removed from run {self.root} (ddm remove-island); its data joins "
                           "again only as a new cluster (ddm add-island)")
        return self.clusters[k]

    def shard_path(self, k: int) -> str:
        return self.resolve(self.cluster(k)["shard"])

    def shard_paths(self) -> list[str]:
        """Every member cluster's shard, in `cluster_ids` order."""
        return [self.shard_path(k) for k in self.cluster_ids]

    def shard_digests(self) -> list[str] | None:
        """Every member cluster's shard digest (`ddm.data.shards.shard_sha256`), in `cluster_ids` order; None for
        a run prepared before shards had digests (readers then skip the check)."""
        digests = [self.clusters[k].get("sha256") for k in self.cluster_ids]
        return None if None in digests else digests

    def bundle_dir(self, k: int) -> Path:
        """Island k's bundle (RUN/islands/k, absolute); DDMError for a run prepared without bundles."""
        bundle = self.cluster(k).get("bundle")
        if bundle is None:
            raise DDMError(f"run {self.root} has no island bundles (prepared by an older ddm): prepare it again "
                           "with --overwrite")
        return Path(self.resolve(bundle)).absolute()

    def _member_rows(self, rows: np.ndarray) -> np.ndarray:
        """`rows` [K, ...] with the removed clusters' rows zeroed."""
        rows[self.removed_clusters] = 0
        return rows

    def cluster_shares(self) -> np.ndarray:
        """[K] float64: each cluster's share of the member clusters' training images (the router's prior; 0 for a
        removed cluster)."""
        counts = self._member_rows(np.array([c["count"] for c in self.clusters], np.float64))
        return counts / counts.sum()

    @property
    def holdout(self) -> dict:
        return self.manifest.get("holdout") or {}

    def holdout_path(self) -> str | None:
        """The held-out images' shard, or None when the run was prepared without a holdout."""
        holdout = self.holdout
        return self.resolve(holdout["shard"]) if holdout.get("shard") and holdout.get("count") else None

    def holdout_labels(self) -> np.ndarray:
        """[N_holdout] int32: the nearest centroid (cluster) of each held-out image. Their class labels are
        in the holdout shard (`ddm.data.shards.read_labels`)."""
        return np.load(self.resolve(self.holdout["labels"]))

    def holdout_set(self, clusters: list[int] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """Held-out images whose nearest centroid is one of `clusters` (default: the members), with that cluster id and
        their class label (-1 for unlabelled data) or condition embedding, as a reader gives them: (uint8
        [N, H, W, C], int32 [N], int32 [N] or float32 [N, *condition_shape]). None when the run has no held-out
        images or none in these clusters."""
        if self.holdout_path() is None:
            return None
        images, labels = read_shard(self.holdout_path()), self.holdout_labels().astype(np.int32)
        classes, conditions = read_labels(self.holdout_path()), read_conditions(self.holdout_path())
        if conditions is not None:
            classes = conditions.astype(np.float32)
        elif classes is None:
            classes = np.full(len(labels), NO_LABEL, np.int32)
        keep = np.isin(labels, self.cluster_ids if clusters is None else clusters)
        return (images[keep], labels[keep], classes[keep]) if keep.any() else None

    # -----------------------------------------------------------------------------------------------------
    # Components (`ddm.data.components`: experts, router, monolith, student).
    # -----------------------------------------------------------------------------------------------------

    def component(self, section: str, key: int | str | None = None) -> dict | None:
        """The manifest entry of a component: `component("experts", 3)`, `component("router")`; None if absent."""
        entry = self.manifest.get(section)
        if key is not None:
            entry = (entry or {}).get(str(key))
        return entry or None

    def expert(self, k: int) -> dict | None:
        return self.component("experts", k)

    @staticmethod
    def finished(entry: dict | None, steps: int | None = None) -> bool:
        """Whether a component entry is finished (and, if `steps` is given, reached at least that many)."""
        return bool(entry) and entry.get("status") == "finished" and (steps is None or entry.get("step", 0) >= steps)

    def trained(self, section: str, key: int | str | None = None, *, what: str, hint: str = "") -> dict:
        """The entry of a finished component; DDMError naming `what` (and `hint`, what to run) otherwise."""
        entry = self.component(section, key)
        if not self.finished(entry):
            raise DDMError(f"{what} is not trained (status: {(entry or {}).get('status', 'missing')})"
                           + (f": {hint}" if hint else ""))
        missing = [name for name in ("sha256", "path") if name not in entry]
        if missing:
            raise DDMError(f"manifest {mf.manifest_path(self.root)}: {what} is finished but has no {missing[0]!r}")
        return entry

    def weights_path(self, entry: dict) -> str:
        """Where a finished component's pinned weights are: its orbax `final/` checkpoint in a run directory,
        the `.safetensors` file beside that path in an export."""
        return self.resolve(entry["path"] + (WEIGHTS_SUFFIX if self.is_export else ""))

    def finished_experts(self) -> list[int]:
        return [k for k in self.cluster_ids if self.finished(self.expert(k))]

    def unfinished_experts(self, steps: int | None = None) -> list[int]:
        """Clusters whose expert has not finished (`steps` steps, when given)."""
        return [k for k in self.cluster_ids if not self.finished(self.expert(k), steps)]

    def expert_dir(self, k: int) -> Path:
        return self.root.absolute() / EXPERTS.folder / str(k)

    def component_dir(self, name: str | Component) -> Path:
        """RUN/router, RUN/monolith, ... (absolute): the folder of a registered component."""
        return self.root.absolute() / (name if isinstance(name, Component) else component(name)).folder

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    @property
    def samples_dir(self) -> Path:
        return self.root / "samples"

    def relative(self, path: Path) -> str:
        """`path` (inside the run) as the manifest stores it: relative to the run directory."""
        return str(Path(path).absolute().relative_to(self.root.absolute()))

    def record(self, section: str, key: int | str | None, entry: dict) -> Run:
        """Sets a component's manifest entry (under the manifest lock); returns the run re-read."""
        return self.update(mf.component_change(section, key, entry))

    def update(self, change: Callable[[dict], None]) -> Run:
        """Read-modify-write of the manifest under its lock, with a membership history entry when it changes the
        membership id (`ddm.data.membership.tracked`); returns the run re-read."""
        mf.update_manifest(self.root, membership.tracked(change))
        return self.reload()
