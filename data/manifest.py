"""`RUN_DIR/manifest.json`: the description of a run directory.

Schema (format "ddm-run/v2"; paths are relative to the run directory):

    dataset:    source, fingerprint (SHA-256 of canonical uint8 data), num_images, image_shape [H, W, C],
                num_classes (0: unlabelled), class_names (null: unlabelled), labels_sha256 (null: unlabelled);
                with condition embeddings (`data.conditions`, then num_classes 0): condition_shape [D] or [L, D],
                condition_dtype, conditions_sha256
    clustering: method, k, embedding, parameters, inertia, n_iter, centroids (path of [K, D] .npy)
    clusters:   [{id, count, share, shard, sha256, bundle, class_counts}]
                one shard folder (images [+ labels or conditions]) per cluster, inside its island bundle `islands/k/`
                (`ddm.data.islands`); sha256: its content digest; class_counts [num_classes] (labelled data).
                The first clustering.k are the plan's; a cluster that joined later (`ddm add-island`) follows
                them, has no share and carries `joined` {source, fingerprint, num_images, holdout,
                labels_sha256 or conditions_sha256} (`ddm.data.membership`)
    membership: {removed: [k...], history: [...]}      optional: the clusters that left (`ddm remove-island`)
                                                        and one entry per membership the run has had
                                                        (`ddm.data.membership`)
    holdout:    {shard, labels, count}                  held-out images (+ class labels in the shard), and
                                                        `labels`: their nearest centroid (.npy)
    config:     the resolved `Config` the run was prepared with
    experts:    {"k": {status, step, sha256, path, ...}}  filled in by `ddm assemble` (never by an island)
    island_keys: {"k": {key_id, public_key}}            optional: the public key island k signs its expert.json
                                                        with (`ddm prepare / assemble --island-key K=KEY.pub`)
    router, monolith, student: {status, step, sha256, path}
                the components (`ddm.data.components`: the one list of them)

Every read checks the manifest against its schema (`ddm.data.manifest_schema`: types, ranges, how fields
relate), so a damaged or hand-edited manifest is a one-line error naming the field; every write checks it
first, so an update that would not read back is a one-line error and the file is left as it was.

Only coordinator commands (prepare, assemble, train-router, train-monolith, distill, the local launcher,
add-island, remove-island) update it; those that change the membership id also append to its history
(`ddm.data.membership.tracked`, through `Run.update`).
Two of them may still run at once on one machine, so every update takes an exclusive lock and writes through
a temporary file + rename: a reader never sees a half-written manifest.

A run has two names. `plan_sha256` (the *run id* islands carry) digests what was planned: dataset,
clustering, each planned cluster's shard digest, the resolved config; no component section enters it, nor the
island keys (who may hand back experts is not what the run computes, so keys can be listed after islands got
their bundles), nor the clusters that joined later or the `membership` section: joining and leaving never change
it, so every bundle and expert of the run stays valid. `manifest_sha256`, the *membership id* (what
verification records name), digests the plan plus the weight SHA-256 (and model config) of each finished
component the routed ensemble samples with (experts, router: `components.ENSEMBLE`), the joined clusters'
entries (counts, class counts, shard digests) and the removed set; the monolith and the student are left out,
so training them after records were made (or after `ddm export`) leaves every record valid. A run that never
had a cluster join or leave has the id it always had. Neither id sees volatile fields (times, durations, paths,
statuses, the membership history), so moving the run, re-running finished work or assembling the same experts
again leaves every record valid.
"""

from __future__ import annotations

import contextlib
import fcntl
from pathlib import Path
from typing import Callable, Iterator

from ddm.core import documents
from ddm.core.errors import DDMError
from ddm.data import components
from ddm.data.manifest_schema import validate_manifest

FORMAT = "ddm-run/v2"
# Formats this version cannot read, and why.
OLD_FORMATS = {"ddm-run/v1": "its shards are bare image arrays without class labels"}
MANIFEST = "manifest.json"
# Keys that describe history rather than what the run computes; they do not enter the manifest hash.
VOLATILE_KEYS = ("created",)
# Who may hand back experts (`ddm.experts.assemble`): not part of the plan, so not of the run id.
TRUST_KEYS = ("island_keys",)


def manifest_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / MANIFEST


def read_manifest(run_dir: str | Path) -> dict:
    """The manifest of `run_dir`; DDMError if there is none or it is not valid."""
    path = manifest_path(run_dir)
    # parsed first, checked below: an old format is named before its fields would be refused one by one
    manifest = documents.read(path, None, "manifest", missing="run `ddm prepare` for this run directory first")
    if isinstance(manifest, dict) and manifest.get("format") in OLD_FORMATS:
        raise DDMError(f"manifest {path} is {manifest['format']} ({OLD_FORMATS[manifest['format']]}): prepare the "
                       f"run again with this version of ddm (ddm prepare --overwrite)")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DDMError(f"manifest {path} is not a {FORMAT} manifest")
    for key in ("dataset", "clustering", "clusters", "config"):
        if key not in manifest:
            raise DDMError(f"manifest {path} has no {key!r} section")
    if not manifest["clusters"]:
        raise DDMError(f"manifest {path} lists no clusters")
    return validate_manifest(manifest, f"manifest {path}")


def write_manifest(run_dir: str | Path, manifest: dict) -> None:
    """Checks `manifest` against the schema (DDMError, nothing written, when it would not read back), then writes
    it atomically (temp file + rename) so a crash never leaves a truncated manifest."""
    path = manifest_path(run_dir)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DDMError(f"refusing to write {path}: not a {FORMAT} manifest")
    validate_manifest(manifest, f"refusing to write {path}")
    documents.write(path, manifest)


@contextlib.contextmanager
def _locked(run_dir: str | Path) -> Iterator[None]:
    if not Path(run_dir).is_dir():  # the lock file could not be created: say what is missing instead
        raise DDMError(f"no manifest at {manifest_path(run_dir)}: run `ddm prepare` for this run directory first")
    with open(Path(run_dir) / ".manifest.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def update_manifest(run_dir: str | Path, change: Callable[[dict], None]) -> dict:
    """Read-modify-write under an exclusive lock; `change` edits the dict in place. Returns the new manifest."""
    with _locked(run_dir):
        manifest = read_manifest(run_dir)
        change(manifest)
        write_manifest(run_dir, manifest)
    return manifest


def component_change(section: str, key: str | int | None, entry: dict) -> Callable[[dict], None]:
    """The manifest edit `manifest[section][key] = entry` (or `manifest[section] = entry` when key is None)."""

    def change(manifest: dict) -> None:
        if key is None:
            manifest[section] = entry
        else:
            manifest.setdefault(section, {})[str(key)] = entry

    return change


def record_component(run_dir: str | Path, section: str, key: str | None, entry: dict) -> dict:
    """Sets `manifest[section][key] = entry` (or `manifest[section] = entry` when key is None)."""
    return update_manifest(run_dir, component_change(section, key, entry))


# Keys of a cluster entry / of the config that say where things are, not what they are.
_PLACE_KEYS = ("shard", "bundle")
_CONFIG_PLACE_KEYS = ("run_dir",)
COMPONENT_SECTIONS = components.SECTIONS
# Which clusters are members and how that changed (`ddm.data.membership`): not part of the plan.
MEMBERSHIP = "membership"
JOINED = "joined"  # the marker of a cluster entry that joined after the plan


def _cluster_fields(cluster) -> dict:
    return {k: v for k, v in cluster.items() if k not in _PLACE_KEYS} if isinstance(cluster, dict) else cluster


def plan_sha256(manifest: dict) -> str:
    """The run id: SHA-256 of the canonical JSON of what was planned (everything but the components, the
    membership, the clusters that joined later and the volatile or place-dependent fields). Island bundles and
    expert records carry it."""
    plan = {k: v for k, v in manifest.items()
            if k not in VOLATILE_KEYS and k not in COMPONENT_SECTIONS and k not in TRUST_KEYS and k != MEMBERSHIP}
    if isinstance(plan.get("clusters"), list):
        plan["clusters"] = [_cluster_fields(c) for c in plan["clusters"]
                            if not (isinstance(c, dict) and JOINED in c)]
    if isinstance(plan.get("config"), dict):
        plan["config"] = {k: v for k, v in plan["config"].items() if k not in _CONFIG_PLACE_KEYS}
    return documents.digest(plan)


def _weights(entry) -> dict | None:
    """What of a component entry determines outputs: its weight digest (and model config when recorded)."""
    if not isinstance(entry, dict) or "sha256" not in entry:
        return None
    return {"sha256": entry["sha256"], **({"model": entry["model"]} if "model" in entry else {})}


def manifest_sha256(manifest: dict) -> str:
    """The membership id, the run's identity in verification records: SHA-256 of the plan's digest, the weights of
    every finished component the routed ensemble uses (`components.ENSEMBLE`), the joined clusters' entries and
    the removed set (see the module docstring)."""
    identity: dict = {"plan": plan_sha256(manifest)}
    for c in components.ENSEMBLE:
        section = manifest.get(c.name)
        if c.per_cluster:
            identity[c.name] = {k: _weights(e) for k, e in sorted((section or {}).items()) if _weights(e)}
        elif _weights(section):
            identity[c.name] = _weights(section)
    # Only when there are any: a run that never changed members keeps the id its records name.
    joined = [_cluster_fields(c) for c in manifest.get("clusters") or [] if isinstance(c, dict) and JOINED in c]
    if joined:
        identity["joined"] = joined
    removed = (manifest.get(MEMBERSHIP) or {}).get("removed") or []
    if removed:
        identity["removed"] = sorted(removed)
    return documents.digest(identity)


def resolve(run_dir: str | Path, relative: str) -> str:
    """A path stored in the manifest, made absolute against the run directory (URLs pass through)."""
    return relative if "://" in relative else str(Path(run_dir) / relative)
