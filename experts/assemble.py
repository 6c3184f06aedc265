"""`ddm assemble`: check experts trained elsewhere against the run's plan, then register them.

An island hands back an OUT folder (`final/` + `expert.json`). Nothing in it is believed: each one is checked
before anything is registered or copied:

- expert.json's schema (`ddm.experts.records`), and its signature: when the manifest lists island k's public
  key (`island_keys`, `pin_island_keys`), expert k must be signed by that key; a signature is verified even
  when no key is listed. An OUT that is the run's own `RUN/experts/k` (trained here by `train-expert --run-dir`
  or the local launcher: whoever writes there can write the manifest too) needs no signature.
- the run id, the cluster, the shard digest, and the bundle: RUN/islands/k must still be the plan's
  (`plan_bundle`: an edited island.json is refused) and the record must name its digest.
- what it trained: `step` must be the plan's `expert.train.steps`, its `train` block the plan's (but for
  `ISLAND_CHOICES`), `model_digest` the digest of its `model` block and `config_digest` the digest of the two
  blocks it names (a block edited after training). "The plan" is the manifest's config with this command's
  `--set` overrides, so an island told to train with `--set expert.train.steps=N` is assembled with the same.
- its model: an island chooses its own `expert.model` (preset, patch_size, dtype, remat: `train-expert --set
  expert.model.preset=small`), a complete `ModelConfig` whose patch size divides the run's image sides; the
  plan fixes what the ensemble combines its velocity with (`PLAN_MODEL_FIELDS`: the classes, or the shape of
  the condition embeddings, it is conditioned on) and, through the bundle, the image shape and the flow
  convention (`ddm.core.flow`). The manifest entry keeps the expert's own model block, which loads it (and is
  part of the run identity).
- the weights' SHA-256, recomputed from the files.

Any mismatch is a one-line DDMError and nothing is written. A finished expert is replaced only with `replace`
(`--replace`): the new weights go to a folder of their own, the manifest is written (checked first) naming
them, and only then are the old weights deleted; the replacement is logged with the expert digest and run
identity that earlier verification records name, which no longer verify. Re-assembling the same expert is a
no-op.

An OUT may be a URL (`s3://`, `gs://`): its expert.json is read and checked there, and only then are its
weights downloaded into a staging folder inside the run, checked from the files like a local OUT's, and
moved into place.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import logging
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ddm.core import documents, signatures
from ddm.core.config import ModelConfig, from_dict, to_dict
from ddm.core.dit import check_image_shape, dit_from_config
from ddm.core.errors import DDMError
from ddm.data import storage
from ddm.data.islands import Bundle
from ddm.data.manifest_schema import validate_manifest
from ddm.data.run import Run
from ddm.experts.records import check_expert_signature, model_digest, read_expert_json, write_expert_json
from ddm.train.checkpoint import load_pinned_tree

logger = logging.getLogger(__name__)

# expert.train fields an island may set for its own hardware and monitoring: how it lays out and logs the work,
# not what the expert learns. Every other train field must be the plan's.
ISLAND_CHOICES = frozenset({"checkpoint_every", "keep_checkpoints", "log_every", "holdout_loss", "tensorboard",
                            "wandb_project", "sample_every", "sample_images", "sample_steps", "mesh_data",
                            "mesh_fsdp", "grad_accum", "prefetch"})
# expert.model fields the plan fixes: the ensemble adds the experts' velocities row by row, so they must take the
# same inputs. Every other model field (the architecture's size, patches, compute dtype, remat) is the island's.
PLAN_MODEL_FIELDS = ("num_classes", "condition_shape")
_SET_HINT = "an island trained with --set is assembled with the same --set"


# ---------------------------------------------------------------------------------------------------------
# Island keys: who may hand back expert k.
# ---------------------------------------------------------------------------------------------------------


def read_island_keys(specs: list[str], num_clusters: int | None = None) -> dict[str, dict]:
    """{"k": {key_id, public_key}} from specs "K=PATH" (PATH: an Ed25519 public key, `ddm keygen`'s KEY.pub);
    DDMError for a malformed spec, a cluster twice or outside 0..num_clusters-1, or a file that is not a key."""
    keys: dict[str, dict] = {}
    for spec in specs:
        match = re.fullmatch(r"(0|[1-9][0-9]{0,5})=(.+)", spec)
        if match is None:
            raise DDMError(f"--island-key {spec!r} must be K=PATH (a cluster id and a public key file, ddm keygen's "
                           "KEY.pub)")
        k, path = match.groups()
        if num_clusters is not None and int(k) >= num_clusters:
            raise DDMError(f"--island-key {spec}: the run has clusters 0..{num_clusters - 1}")
        if k in keys:
            raise DDMError(f"--island-key names island {k} twice")
        key = signatures.load_public_key(path)
        keys[k] = {"key_id": signatures.key_id(key), "public_key": signatures.public_key_b64(key)}
    return keys


def pin_island_keys(run: Run | str | Path, specs: list[str]) -> Run:
    """Lists island keys in the manifest (`read_island_keys`): from then on `assemble_experts` accepts expert k
    from another folder only when signed by island k's key. The keys stay out of the run id (bundles already
    handed out stay valid); a key listed again replaces the earlier one (logged)."""
    run = run if isinstance(run, Run) else Run.open(run)
    keys = read_island_keys(specs, run.num_clusters)
    if not keys:
        return run
    listed = run.manifest.get("island_keys") or {}
    for k, entry in sorted(keys.items(), key=lambda item: int(item[0])):
        before = listed.get(k, {}).get("key_id")
        if before is None:
            logger.info(f"island {k}: key {entry['key_id']} listed")
        elif before != entry["key_id"]:
            logger.warning(f"island {k}: key {before} replaced by {entry['key_id']}")
    return run.update(lambda manifest: manifest.setdefault("island_keys", {}).update(keys))


def island_key(run: Run, k: int) -> Ed25519PublicKey | None:
    """Island k's listed public key (`Ed25519PublicKey`), or None when the manifest lists none for it."""
    entry = (run.manifest.get("island_keys") or {}).get(str(k))
    return None if entry is None else signatures.public_key_from_b64(entry["public_key"], f"island_keys.{k}")


# ---------------------------------------------------------------------------------------------------------
# Checks.
# ---------------------------------------------------------------------------------------------------------

_ABSENT = object()


def _first_difference(ours: Any, plan: Any, path: str) -> tuple[str, Any, Any] | None:
    """(path, ours, plan's) of the first leaf where two JSON values differ (keys in sorted order); None if
    equal. Leaves compare by their canonical JSON, so 1, 1.0 and true differ."""
    if isinstance(ours, dict) and isinstance(plan, dict):
        for key in sorted(set(ours) | set(plan)):
            found = _first_difference(ours.get(key, _ABSENT), plan.get(key, _ABSENT), f"{path}.{key}")
            if found is not None:
                return found
        return None
    if _ABSENT in (ours, plan) or documents.canonical_bytes(ours) != documents.canonical_bytes(plan):
        return path, ours, plan
    return None


def _show(value: Any) -> str:
    text = "absent" if value is _ABSENT else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _planned(document: dict, keys: set[str]) -> dict:
    """What island.json copies from the manifest (`ddm.data.islands.island_record`), out of either document: the
    config without its place (run_dir) and the dataset fields `keys`."""
    return {"config": {key: v for key, v in document["config"].items() if key != "run_dir"},
            "dataset": {key: document["dataset"].get(key) for key in sorted(keys)}}


def plan_bundle(run: Run, k: int) -> Bundle:
    """Island k's bundle (RUN/islands/k, opened with the run's overrides) after checking it is still the plan's:
    it names this run, cluster k and the manifest's shard digest, and its dataset and config are the manifest's.
    An edited island.json (an lr, a step count) is refused: islands train what the plan says."""
    bundle = Bundle.open(run.bundle_dir(k), run.overrides)
    where = f"island bundle {run.bundle_dir(k)}"
    if bundle.run_id != run.run_id:
        raise DDMError(f"{where} belongs to another run (run id {bundle.run_id[:16]}, this run {run.run_id[:16]})")
    if bundle.cluster != k:
        raise DDMError(f"{where} is island {bundle.cluster}'s, not island {k}'s")
    if bundle.shard_sha256 != run.cluster(k).get("sha256"):
        raise DDMError(f"{where} names shard digest {bundle.shard_sha256[:16]}, the plan's is "
                       f"{str(run.cluster(k).get('sha256'))[:16]}")
    # whatever either has that the island needs: an island.json that drops the plan's codec or conditions is refused
    keys = {"fingerprint", "image_shape", "num_classes", "class_names", *bundle.record["dataset"],
            *({"dtype", "codec", "condition_shape", "condition_dtype"} & set(run.dataset))}
    found = _first_difference(_planned(bundle.record, keys), _planned(run.manifest, keys), "island")
    if found is not None:
        path, got, wanted = found
        raise DDMError(f"{where}: {path.removeprefix('island.')} is {_show(got)}, the plan's is {_show(wanted)}: "
                       f"island.json was edited (copy RUN/islands/{k} from the prepared run again)")
    return bundle


def _check_signature(run: Run, out: str | Path, record: dict, own: bool) -> str | None:
    """The key id that signed expert.json (None: unsigned) after checking it (module docstring)."""
    k = record["cluster"]
    required = island_key(run, k)
    if required is not None and own and "signature" not in record:
        required = None  # the run's own folder: trained here (module docstring)
    result = check_expert_signature(record, required)
    if not result.ok:
        how = (f" (island {k}'s key in the plan; the island signs with ddm train-expert --key)"
               if result.signer is None and required is not None else "")
        raise DDMError(f"expert {k} in {out}: {result.message}{how}: refusing to assemble it")
    return result.signer


def _check_training(run: Run, out: str | Path, record: dict) -> ModelConfig:
    """What the expert trained must be what the plan says (module docstring); returns its own model config."""
    k = record["cluster"]
    expert = run.config.expert
    plan_train, plan_model = to_dict(expert.train), to_dict(expert.model)
    steps = plan_train["steps"]
    if record["step"] < steps:
        raise DDMError(f"expert {k} in {out} trained {record['step']} of {steps} steps: refusing to assemble it "
                       f"({_SET_HINT})")
    if record["step"] > steps:
        raise DDMError(f"expert {k} in {out} trained {record['step']} steps, the plan {steps}: refusing to assemble "
                       f"it ({_SET_HINT})")
    if record.get("config_digest", None) not in (None, documents.digest({"model": record["model"],
                                                                       "train": record["train"]})):
        raise DDMError(f"expert {k} in {out}: expert.json's config_digest is not the digest of its model and train "
                       "blocks (edited after training): refusing to assemble it")
    if record["model_digest"] != documents.digest(record["model"]):
        raise DDMError(f"expert {k} in {out}: expert.json's model_digest is not the digest of its model block "
                       "(edited after training): refusing to assemble it")
    def chosen(train: dict) -> dict:
        return {key: v for key, v in train.items() if key not in ISLAND_CHOICES}

    fixed = {key: plan_model[key] for key in PLAN_MODEL_FIELDS}
    for ours, plan, path in ((chosen(record["train"]), chosen(plan_train), "expert.train"),
                             ({key: record["model"].get(key, _ABSENT) for key in fixed}, fixed, "expert.model")):
        found = _first_difference(ours, plan, path)
        if found is not None:
            name, got, wanted = found
            raise DDMError(f"expert {k} in {out} was trained with {name}={_show(got)}, the plan has {_show(wanted)}: "
                           f"refusing to assemble it ({_SET_HINT})")
    return _island_model(run, out, record)


def _island_model(run: Run, out: str | Path, record: dict) -> ModelConfig:
    """The island's own model config out of its record: a complete `ModelConfig` (every field, valid values)
    that builds a DiT for the run's image shape; DDMError otherwise."""
    k = record["cluster"]
    try:
        model = from_dict(ModelConfig, record["model"])
        check_image_shape(run.image_shape, model.patch_size)
    except DDMError as err:
        raise DDMError(f"expert {k} in {out}: its model block is not a model for this run ({err}): refusing to "
                       "assemble it") from None
    found = _first_difference(record["model"], to_dict(model), "expert.model")
    if found is not None:  # a partial block would let defaults of another version decide the architecture
        raise DDMError(f"expert {k} in {out}: its model block gives {found[0]}={_show(found[1])}, a complete model "
                       f"config has {_show(found[2])}: refusing to assemble it")
    if record["model_digest"] != model_digest(model):  # the same as the block's, checked above
        raise DDMError(f"expert {k} in {out}: model_digest is not its model config's: refusing to assemble it")
    return model


def check_expert(run: Run, out: str | Path, weights_sha256: str | None = None, *,
                 fetch_to: Path | None = None) -> dict:
    """expert.json of `out` after checking it (and its weights) against `run`'s plan; DDMError otherwise. The
    key id that signed it (or None) is returned as the record's "signer" (not a field of the file).

    `weights_sha256`: the weights' digest as the caller just computed it from the trained state (the local
    trainer); then the files are not read back (a multi-process island's checkpoint cannot be restored by
    process 0 alone). `fetch_to`: for a URL `out`, the local folder its final/ and expert.json are downloaded
    to once the record passed its checks; the weights are checked there."""
    record = read_expert_json(out)
    k = record["cluster"]  # an integer in range: the schema checked it
    own = not storage.is_url(out) and _same(Path(out), run.expert_dir(k))
    signer = _check_signature(run, out, record, own)
    if record["run_id"] != run.run_id:
        raise DDMError(f"expert in {out} belongs to another run (run id {str(record['run_id'])[:16]}, this run "
                       f"{run.run_id[:16]}): refusing to assemble it")
    cluster = run.cluster(k)
    if record["shard_sha256"] != cluster.get("sha256"):
        raise DDMError(f"expert {k} in {out} was trained on a shard with digest {str(record['shard_sha256'])[:16]}, "
                       f"the plan's is {str(cluster.get('sha256'))[:16]}: refusing to assemble it")
    bundle = plan_bundle(run, k)
    if record["bundle_sha256"] != bundle.sha256:
        raise DDMError(f"expert {k} in {out} was trained from a different bundle (digest "
                       f"{str(record['bundle_sha256'])[:16]}, the run's {bundle.sha256[:16]})")
    model = _check_training(run, out, record)
    if weights_sha256 is not None:
        if record["ema_sha256"] != weights_sha256:
            raise DDMError(f"expert {k} in {out}: expert.json names weights {str(record['ema_sha256'])[:16]}, the "
                           f"trainer computed {weights_sha256[:16]}")
        return {**record, "signer": signer}
    files = Path(out)
    if storage.is_url(out):
        files = fetch_to
        storage.copy_tree(storage.join(out, record["final"]), str(files / record["final"]))
        write_expert_json(files, record)  # the record just checked, not a second read of the bucket
    make = functools.partial(dit_from_config, model, run.image_shape)  # the island's own architecture
    try:
        load_pinned_tree(files / record["final"], record["ema_sha256"], make, f"expert {k}")
    except DDMError as err:
        raise DDMError(f"{err} (assembling {out})") from None
    return {**record, "signer": signer}


def _same(a: Path, b: Path) -> bool:
    return a.absolute().resolve() == b.absolute().resolve()


# ---------------------------------------------------------------------------------------------------------
# Registering.
# ---------------------------------------------------------------------------------------------------------


def assemble_experts(run: Run | str | Path, outs: list[str | Path], overrides: list[str] | tuple[str, ...] = (), *,
                     weights_sha256: str | None = None, replace: bool = False) -> Run:
    """Checks every expert in `outs` (`check_expert`), then registers them all in one manifest update; returns
    the run re-read. Nothing is registered (or copied) if any check fails. `weights_sha256` (one OUT only):
    the digest the caller computed from the trained state, instead of reading the weights back. `replace`: an
    expert from another folder may replace a finished one (module docstring); without it that is refused."""
    run = run if isinstance(run, Run) else Run.open(run, overrides)
    if weights_sha256 is not None and len(outs) != 1:
        raise DDMError("weights_sha256 is for assembling one expert")
    if weights_sha256 is not None and storage.is_url(outs[0]):
        raise DDMError("weights_sha256 is for assembling a local OUT")
    remote = any(storage.is_url(out) for out in outs)  # their weights are staged inside the run, then moved
    staging = tempfile.TemporaryDirectory(dir=run.root, prefix=".incoming-") if remote else contextlib.nullcontext("")
    with staging as incoming:
        records = []
        for i, out in enumerate(outs):
            fetched = Path(incoming) / str(i)
            record = check_expert(run, out, weights_sha256, fetch_to=fetched)
            records.append((out, fetched if storage.is_url(out) else Path(out), record))
        return _register(run, records, replace)


@dataclasses.dataclass(frozen=True)
class _Move:
    """One checked expert's way into the run: its files (`out`), where its weights go (`final`, inside
    RUN/experts/k) and the manifest entry it was planned against (`before`; None: none)."""

    name: str
    out: Path
    record: dict
    final: Path
    before: dict | None

    @property
    def cluster(self) -> int:
        return self.record["cluster"]

    @property
    def replaces(self) -> dict | None:
        """The finished entry it replaces (None: none)."""
        return self.before if Run.finished(self.before) else None


def _entry(run: Run, move: _Move) -> dict:
    record = move.record
    entry = {"status": "finished", "step": record["step"], "sha256": record["ema_sha256"],
             "path": run.relative(move.final), "seconds": record.get("seconds"), "model": record["model"],
             "train": record["train"], "bundle_sha256": record["bundle_sha256"], "hardware": record.get("hardware"),
             "signer": record.get("signer")}
    return {key: value for key, value in entry.items() if value is not None}


def _plan_moves(run: Run, records: list[tuple[str | Path, Path, dict]], replace: bool) -> list[_Move]:
    """Where each checked expert goes, refusing (before anything is written) two experts for one cluster and a
    finished expert replaced from another folder without `replace`."""
    clusters = [r["cluster"] for _, _, r in records]
    if len(set(clusters)) != len(clusters):
        raise DDMError(f"two experts for the same cluster among {[str(o) for o, _, _ in records]}")
    moves = []
    for name, out, record in records:
        k, sha = record["cluster"], record["ema_sha256"]
        old = run.expert(k)
        if run.finished(old) and old.get("sha256") == sha:
            logger.info(f"expert {k}: already assembled (sha256 {sha[:16]})")
            continue
        target = run.expert_dir(k)
        replaces = old if run.finished(old) else None
        own = _same(out, target)
        if replaces is not None and not own and not replace:
            raise DDMError(f"expert {k} is already assembled (sha256 {str(old.get('sha256'))[:16]}, step "
                           f"{old.get('step')}): {name} (sha256 {sha[:16]}) would replace it and invalidate every "
                           "record made with it; pass --replace to do that")
        # An in-place or first registration keeps final/; a replacement from elsewhere gets a folder of its own,
        # so the old weights stay where the manifest points until the manifest names the new ones.
        final = out / record["final"] if own else target / ("final" if replaces is None else f"final-{sha[:16]}")
        moves.append(_Move(str(name), out, record, final, old))
    return moves


def _copy_weights(move: _Move) -> None:
    """The expert's weights into `move.final` (through a temporary folder beside it: never half-copied)."""
    if _same(move.out / move.record["final"], move.final):
        return
    move.final.parent.mkdir(parents=True, exist_ok=True)
    tmp = move.final.with_name(move.final.name + ".incoming")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(move.out / move.record["final"], tmp)
    shutil.rmtree(move.final, ignore_errors=True)
    tmp.rename(move.final)


def _register(run: Run, records: list[tuple[str | Path, Path, dict]], replace: bool = False) -> Run:
    """Registers checked experts, (OUT as given, where its files are here, checked expert.json), in one
    manifest update: the updated manifest is checked before any weights are copied, and a replaced expert's
    weights are deleted only once the manifest naming its successor is written."""
    moves = _plan_moves(run, records, replace)
    if not moves:
        return run
    entries = {str(m.cluster): _entry(run, m) for m in moves}

    def change(manifest: dict) -> None:
        for move in moves:  # under the manifest's lock: what was checked is still what is there
            if (manifest.get("experts") or {}).get(str(move.cluster)) != move.before:
                raise DDMError(f"expert {move.cluster} was registered by another command while this one assembled "
                               f"{move.name}: nothing registered; run ddm assemble again")
        manifest.setdefault("experts", {}).update(entries)

    candidate = copy.deepcopy(run.manifest)
    change(candidate)
    validate_manifest(candidate, f"assembling into {run.root}")  # a one-line refusal before anything is copied
    before = run.sha256
    for move in moves:
        _copy_weights(move)
    updated = run.update(change)
    for move in moves:
        k, record, target = move.cluster, move.record, updated.expert_dir(move.cluster)
        if not _same(move.out, target):
            write_expert_json(target, {key: v for key, v in record.items() if key != "signer"})
        if move.replaces is not None:
            _forget(updated, move, before)
        logger.info(f"expert {k}: assembled from {move.name} (step {record['step']}, sha256 "
                    f"{record['ema_sha256'][:16]}" + (f", signed by {record['signer']})" if record.get("signer")
                                                       else ")"))
    return updated


def _forget(run: Run, move: _Move, identity_before: str) -> None:
    """After the manifest names its successor: deletes a replaced expert's weights (when they lie in its own
    RUN/experts/k and are not the new ones) and logs which verification records no longer verify."""
    old, k = move.replaces, move.cluster
    old_path = Path(run.resolve(old["path"])) if old.get("path") and "://" not in old["path"] else None
    if old_path is not None and not _same(old_path, move.final) and _inside(old_path, run.expert_dir(k)):
        shutil.rmtree(old_path, ignore_errors=True)
    logger.warning(f"expert {k}: replaced sha256 {str(old.get('sha256'))[:16]} (step {old.get('step')}) with "
                   f"{move.record['ema_sha256'][:16]} (step {move.record['step']}): verification records made with "
                   f"expert {k} sha256 {str(old.get('sha256'))[:16]} (run {identity_before[:16]}) no longer verify "
                   f"against this run (now {run.sha256[:16]})")


def _inside(path: Path, folder: Path) -> bool:
    return path.absolute().resolve().is_relative_to(folder.absolute().resolve())
