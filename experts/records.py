"""`OUT/expert.json`: what an island hands back with its weights.

Schema (format "ddm-expert/v1"):

    run_id, cluster, bundle_sha256, shard_sha256   which plan, island and data it was trained from
    model_digest, config_digest                    SHA-256 of the model config / the whole expert config
    ema_sha256, step, final                        the EMA weights' `pytree_sha256`, steps, their folder in OUT
    model, train                                   the configs themselves (for reading, not checking)
    hardware, seconds, finished                    what trained it, how long, when (recorded, never checked)

An island writes it last, whole, after `final/`: an OUT without it is unfinished. OUT may be a folder or a URL
(`ddm.data.storage`). A reader checks it against `EXPERT_SCHEMA`, so a damaged or hand-edited record is a
one-line error naming the field.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import jax

from ddm.core import documents
from ddm.core.config import Config, ModelConfig, to_dict
from ddm.core.errors import DDMError
from ddm.core.schema import Anything, Hex, Int, Num, Obj, Str
from ddm.data import storage
from ddm.data.islands import Bundle
from ddm.data.manifest_schema import MAX_CLUSTERS

EXPERT_JSON = "expert.json"
EXPERT_FORMAT = "ddm-expert/v1"

EXPERT_SCHEMA = Obj(
    {"format": Str(),
     "run_id": Hex(64),
     "cluster": Int(min=0, max=MAX_CLUSTERS - 1),
     "shard_sha256": Hex(64),
     "model_digest": Hex(64),
     "ema_sha256": Hex(64),
     "step": Int(min=0),
     # a folder of OUT: a name, never a path that could lead out of it
     "final": Str(pattern=r"(?!\.\.?$)[A-Za-z0-9._-]+", name="a folder name (letters, digits, . _ -)")},
    optional={"bundle_sha256": Hex(64), "config_digest": Hex(64), "seconds": Num(min=0),
              "model": Anything(dict, "an object"), "train": Anything(dict, "an object"),
              "hardware": Anything(), "finished": Anything()},  # recorded, never checked
)


def model_digest(model_cfg: ModelConfig) -> str:
    """SHA-256 of an expert's model config (canonical JSON): the architecture its weights fit."""
    return documents.digest(to_dict(model_cfg))


def hardware() -> dict:
    """What trained an expert (recorded, never checked)."""
    devices = jax.devices()
    return {"platform": devices[0].platform, "device_kind": devices[0].device_kind, "devices": len(devices),
            "processes": jax.process_count(), "host": socket.gethostname()}


def expert_record(bundle: Bundle, cfg: Config, ema_sha256: str, step: int, seconds: float) -> dict:
    """expert.json's content for an expert trained from `bundle` with config `cfg`."""
    return {"format": EXPERT_FORMAT, "run_id": bundle.run_id, "cluster": bundle.cluster,
            "bundle_sha256": bundle.sha256, "shard_sha256": bundle.shard_sha256,
            "model_digest": model_digest(cfg.expert.model), "config_digest": documents.digest(to_dict(cfg.expert)),
            "ema_sha256": ema_sha256, "step": step, "final": "final",
            "model": to_dict(cfg.expert.model), "train": to_dict(cfg.expert.train),
            "hardware": hardware(), "seconds": round(seconds, 1), "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def write_expert_json(out: str | Path, record: dict) -> None:
    storage.write_bytes(storage.join(out, EXPERT_JSON), documents.dumps(record))


def read_expert_json(out: str | Path) -> dict:
    """OUT/expert.json (OUT: a folder or a URL); DDMError if the island has not finished (or the file is not an expert record)."""
    path = storage.join(out, EXPERT_JSON)
    raw = storage.read_bytes(path)
    if raw is None:
        raise DDMError(f"no {EXPERT_JSON} in {out}: the island has not finished training")
    return documents.load(raw, EXPERT_SCHEMA, f"expert record {path}", fmt=EXPERT_FORMAT)
