"""`ddm assemble`: check experts trained elsewhere against the run's plan, then register them.

An island hands back an OUT folder (`final/` + `expert.json`). Each one is checked before anything is
registered: the run id (an expert of another run), the cluster, the shard digest it trained on, its bundle's
digest, the model config, and the weight SHA-256 recomputed from the files. Any mismatch is a one-line
DDMError and the manifest is left as it was. Checked experts are copied into RUN/experts/<k>/ (unless they
already are there) and registered in one manifest update. Re-assembling the same expert is a no-op.

An OUT may be a URL (`s3://`, `gs://`): its expert.json is read and checked there, and only then are its
weights downloaded into a staging folder inside the run, checked from the files like a local OUT's, and
moved into place.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import shutil
import tempfile
from pathlib import Path

from ddm.core.dit import dit_from_config
from ddm.core.errors import DDMError
from ddm.data import storage
from ddm.data.islands import Bundle
from ddm.data.run import Run
from ddm.experts.records import EXPERT_JSON, model_digest, read_expert_json, write_expert_json
from ddm.train.checkpoint import load_pinned_tree

logger = logging.getLogger(__name__)


def check_expert(run: Run, out: str | Path, weights_sha256: str | None = None, *,
                 fetch_to: Path | None = None) -> dict:
    """expert.json of `out` after checking it (and its weights) against `run`'s plan; DDMError otherwise.

    `weights_sha256`: the weights' digest as the caller just computed it from the trained state (the local
    trainer); then the files are not read back (a multi-process island's checkpoint cannot be restored by
    process 0 alone). `fetch_to`: for a URL `out`, the local folder its final/ and expert.json are downloaded
    to once the record passed its checks; the weights are checked there."""
    record = read_expert_json(out)
    if record["run_id"] != run.run_id:
        raise DDMError(f"expert in {out} belongs to another run (run id {str(record['run_id'])[:16]}, this run "
                       f"{run.run_id[:16]}): refusing to assemble it")
    k = record["cluster"]
    if not isinstance(k, int):
        raise DDMError(f"expert in {out}: cluster must be an integer, got {k!r}")
    cluster = run.cluster(k)
    if record["shard_sha256"] != cluster.get("sha256"):
        raise DDMError(f"expert {k} in {out} was trained on a shard with digest {str(record['shard_sha256'])[:16]}, "
                       f"the plan's is {str(cluster.get('sha256'))[:16]}: refusing to assemble it")
    bundle = Bundle.open(run.bundle_dir(k))
    if record.get("bundle_sha256") != bundle.sha256:
        raise DDMError(f"expert {k} in {out} was trained from a different bundle (digest "
                       f"{str(record.get('bundle_sha256'))[:16]}, the run's {bundle.sha256[:16]})")
    if record["model_digest"] != model_digest(run.config.expert.model):
        raise DDMError(f"expert {k} in {out} has a different model config than the run (expert.model): "
                       "refusing to assemble it")
    if weights_sha256 is not None:
        if record["ema_sha256"] != weights_sha256:
            raise DDMError(f"expert {k} in {out}: expert.json names weights {str(record['ema_sha256'])[:16]}, the "
                           f"trainer computed {weights_sha256[:16]}")
        return record
    final = record["final"]
    if not isinstance(final, str) or final in ("", ".", "..") or "/" in final or "\\" in final:
        raise DDMError(f"expert {k} in {out}: 'final' must name a folder inside OUT, got {final!r}")
    files = Path(out)
    if storage.is_url(out):
        files = fetch_to
        storage.copy_tree(storage.join(out, record["final"]), str(files / record["final"]))
        write_expert_json(files, record)  # the record just checked, not a second read of the bucket
    make = functools.partial(dit_from_config, run.config.expert.model, run.image_shape)
    try:
        load_pinned_tree(files / record["final"], record["ema_sha256"], make, f"expert {k}")
    except DDMError as err:
        raise DDMError(f"{err} (assembling {out})") from None
    return record


def _same(a: Path, b: Path) -> bool:
    return a.absolute().resolve() == b.absolute().resolve()


def assemble_experts(run: Run | str | Path, outs: list[str | Path], overrides: list[str] | tuple[str, ...] = (), *,
                     weights_sha256: str | None = None) -> Run:
    """Checks every expert in `outs` (`check_expert`), then registers them all in one manifest update; returns
    the run re-read. Nothing is registered (or copied) if any check fails. `weights_sha256` (one OUT only):
    the digest the caller computed from the trained state, instead of reading the weights back."""
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
        return _register(run, records)


def _register(run: Run, records: list[tuple[str | Path, Path, dict]]) -> Run:
    """Registers checked experts, (OUT as given, where its files are here, expert.json), in one update."""
    clusters = [r["cluster"] for _, _, r in records]
    if len(set(clusters)) != len(clusters):
        raise DDMError(f"two experts for the same cluster among {[str(o) for o, _, _ in records]}")
    entries = {}
    for name, out, record in records:
        k = record["cluster"]
        old = run.expert(k)
        if run.finished(old) and old.get("sha256") == record["ema_sha256"]:
            logger.info(f"expert {k}: already assembled (sha256 {record['ema_sha256'][:16]})")
            continue
        target = run.expert_dir(k)
        if not _same(out, target):  # an expert trained elsewhere: its weights move into the run
            target.mkdir(parents=True, exist_ok=True)
            tmp = target / "final.incoming"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(out / record["final"], tmp)
            shutil.rmtree(target / "final", ignore_errors=True)
            tmp.rename(target / "final")
            shutil.copy2(out / EXPERT_JSON, target / EXPERT_JSON)
        entries[str(k)] = {"status": "finished", "step": record["step"], "sha256": record["ema_sha256"],
                           "path": run.relative(target / "final"), "seconds": record.get("seconds"),
                           "model": record.get("model"), "train": record.get("train"),
                           "bundle_sha256": record.get("bundle_sha256"), "hardware": record.get("hardware")}
        logger.info(f"expert {k}: assembled from {name} (step {record['step']}, sha256 {record['ema_sha256'][:16]})")
    if not entries:
        return run
    return run.update(lambda manifest: manifest.setdefault("experts", {}).update(entries))
