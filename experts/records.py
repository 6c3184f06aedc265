"""`OUT/expert.json`: what an island hands back with its weights.

Schema (format "ddm-expert/v1"):

    run_id, cluster, bundle_sha256, shard_sha256   which plan, island and data it was trained from
    model_digest, config_digest                    SHA-256 of the model config / the whole expert config
    ema_sha256, step, final                        the EMA weights' `pytree_sha256`, steps, their folder in OUT
    model, train                                   the configs it trained with (`ddm assemble` compares them
                                                   with the plan's)
    hardware, seconds, finished                    what trained it, how long, when (recorded, never checked)
    audit                                          optional: the training audit's summary (`ddm.train.checkpoint`)
    signature                                      optional: the island's Ed25519 signature (below)

An island writes it last, whole, after `final/`: an OUT without it is unfinished. OUT may be a folder or a URL
(`ddm.data.storage`). A reader checks it against `EXPERT_SCHEMA`, so a damaged or hand-edited record is a
one-line error naming the field.

Signed records (`ddm train-expert --key KEY`): the signature (`ddm.core.signatures`, context line
``ddm-expert-signature/v1``) covers the canonical JSON of the whole document but its `signature` field, so every
field, whichever a later version adds, is covered; the weights are covered through `ema_sha256`, which
`ddm assemble` recomputes from the files.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import jax
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ddm.core import documents, signatures
from ddm.core.config import Config, ModelConfig, to_dict
from ddm.core.errors import DDMError
from ddm.core.schema import Anything, Hex, Int, Num, Obj, Str
from ddm.data import storage
from ddm.data.islands import Bundle
from ddm.data.manifest_schema import MAX_CLUSTERS

EXPERT_JSON = "expert.json"
EXPERT_FORMAT = "ddm-expert/v1"
EXPERT_SIGNATURE_CONTEXT = b"ddm-expert-signature/v1\n"

# Its form only: `ddm.core.signatures.check` decodes and verifies it.
SIGNATURE = Obj({"algorithm": Str(choices=(signatures.ALGORITHM,)), "public_key": Str(max_len=64),
                 "value": Str(max_len=128)}, closed=True)

EXPERT_SCHEMA = Obj(
    {"format": Str(),
     "run_id": Hex(64),
     "cluster": Int(min=0, max=MAX_CLUSTERS - 1),
     "shard_sha256": Hex(64),
     "model_digest": Hex(64),
     "ema_sha256": Hex(64),
     "step": Int(min=0),
     # a folder of OUT: a name, never a path that could lead out of it
     "final": Str(pattern=r"(?!\.\.?$)[A-Za-z0-9._-]+", name="a folder name (letters, digits, . _ -)"),
     "bundle_sha256": Hex(64),
     # compared field by field with the plan's config by `ddm assemble`
     "model": Anything(dict, "an object"), "train": Anything(dict, "an object")},
    optional={"config_digest": Hex(64), "seconds": Num(min=0),
              "hardware": Anything(), "finished": Anything(),  # recorded, never checked
              "audit": Anything((dict, list), "an object or a list"),  # the training audit's own reader checks it
              "signature": SIGNATURE},
)


def model_digest(model_cfg: ModelConfig) -> str:
    """SHA-256 of an expert's model config (canonical JSON): the architecture its weights fit."""
    return documents.digest(to_dict(model_cfg))


def hardware() -> dict:
    """What trained an expert (recorded, never checked)."""
    devices = jax.devices()
    return {"platform": devices[0].platform, "device_kind": devices[0].device_kind, "devices": len(devices),
            "processes": jax.process_count(), "host": socket.gethostname()}


def expert_record(bundle: Bundle, cfg: Config, ema_sha256: str, step: int, seconds: float,
                  audit: dict | None = None) -> dict:
    """expert.json's content for an expert trained from `bundle` with config `cfg`; `audit`: the audit chain's
    summary (`ddm.train.checkpoint.write_chain`), when the trainer recorded one."""
    record = {"format": EXPERT_FORMAT, "run_id": bundle.run_id, "cluster": bundle.cluster,
              "bundle_sha256": bundle.sha256, "shard_sha256": bundle.shard_sha256,
              "model_digest": model_digest(cfg.expert.model), "config_digest": documents.digest(to_dict(cfg.expert)),
              "ema_sha256": ema_sha256, "step": step, "final": "final",
              "model": to_dict(cfg.expert.model), "train": to_dict(cfg.expert.train),
              "hardware": hardware(), "seconds": round(seconds, 1), "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    return record if audit is None else {**record, "audit": audit}


def write_expert_json(out: str | Path, record: dict) -> None:
    storage.write_bytes(storage.join(out, EXPERT_JSON), documents.dumps(record))


def sign_expert_record(record: dict, key: Ed25519PrivateKey) -> dict:
    """A copy of `record` signed by the island's `key` (module docstring)."""
    return signatures.sign(record, key, EXPERT_SIGNATURE_CONTEXT)


def check_expert_signature(record: dict, required: Ed25519PublicKey | None = None) -> signatures.SignatureCheck:
    """Checks expert.json's signature: by `required` when given; else valid under the key it names, if any."""
    return signatures.check(record, EXPERT_SIGNATURE_CONTEXT, required)


def read_expert_json(out: str | Path) -> dict:
    """OUT/expert.json (OUT: a folder or a URL); DDMError if the island has not finished (or the file is not an expert record)."""
    path = storage.join(out, EXPERT_JSON)
    raw = storage.read_bytes(path)
    if raw is None:
        raise DDMError(f"no {EXPERT_JSON} in {out}: the island has not finished training")
    return documents.load(raw, EXPERT_SCHEMA, f"expert record {path}", fmt=EXPERT_FORMAT)
