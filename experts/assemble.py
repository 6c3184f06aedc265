"""`ddm assemble`: check experts trained elsewhere against the run's plan, then register them.

An island hands back an OUT folder (`final/` + `expert.json`). Each one is checked before anything is
registered: the run id (an expert of another run), the cluster, the shard digest it trained on, its bundle's
digest, the model config, and the weight SHA-256 recomputed from the files. Any mismatch is a one-line
DDMError and the manifest is left as it was. Checked experts are copied into RUN/experts/<k>/ (unless they
already are there) and registered in one manifest update. Re-assembling the same expert is a no-op.
"""

from __future__ import annotations

import functools
import logging
import shutil
from pathlib import Path

from ddm.core.checkpoint import load_pinned_tree
from ddm.core.dit import dit_from_config
from ddm.core.errors import DDMError
from ddm.data.islands import Bundle
from ddm.data.run import Run
from ddm.experts.records import EXPERT_JSON, model_digest, read_expert_json

logger = logging.getLogger(__name__)


def check_expert(run: Run, out: str | Path, weights_sha256: str | None = None) -> dict:
    """expert.json of `out` after checking it (and its weights) against `run`'s plan; DDMError otherwise.

    `weights_sha256`: the weights' digest as the caller just computed it from the trained state (the local
    trainer); then the files are not read back (a multi-process island's checkpoint cannot be restored by
    process 0 alone)."""
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
    make = functools.partial(dit_from_config, run.config.expert.model, run.image_shape)
    try:
        load_pinned_tree(Path(out) / record["final"], record["ema_sha256"], make, f"expert {k}")
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
    records = [(Path(out), check_expert(run, out, weights_sha256)) for out in outs]
    clusters = [r["cluster"] for _, r in records]
    if len(set(clusters)) != len(clusters):
        raise DDMError(f"two experts for the same cluster among {[str(o) for o, _ in records]}")
    entries = {}
    for out, record in records:
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
        logger.info(f"expert {k}: assembled from {out} (step {record['step']}, sha256 {record['ema_sha256'][:16]})")
    if not entries:
        return run
    return run.update(lambda manifest: manifest.setdefault("experts", {}).update(entries))
