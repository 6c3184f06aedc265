"""What a valid `manifest.json` holds: types and ranges of every field (`SCHEMA`) and how fields relate
(`RULES`), checked on every read (`ddm.data.manifest.read_manifest`), so a damaged or hand-edited manifest is a
one-line error naming the field instead of a traceback (or a silently wrong run) later.

To add a field: put it in `SCHEMA` where it lives (in `optional` when manifests written before it lack it),
and a rule below when it must agree with other fields. The `config` section is checked by the config's own
dataclasses (`ddm.core.config.config_from_data`) when the run is opened.
"""

from __future__ import annotations

import base64
import math

from ddm.core.schema import Anything, Hex, Int, ListOf, MapOf, Nullable, Num, Obj, RelPath, Str, check
from ddm.core.signatures import key_id_of_raw
from ddm.data.components import COMPONENTS

MAX_COUNT = 2**40  # images; far beyond any dataset, small enough that sums stay exact
MAX_SIDE = 65_536  # pixels (or latent cells) per side, and channels
MAX_CLUSTERS = 2**16
MAX_CLASSES = 2**20  # class labels travel as int32; a million classes is far beyond any dataset here
MAX_CONDITION_SIDE = 2**20  # tokens or dimensions of one image's condition embedding

# One image's condition embedding (`data.conditions`): its shape ((D,) or (L, D)) and stored dtype.
CONDITION_FIELDS = {
    "condition_shape": ListOf(Int(min=1, max=MAX_CONDITION_SIDE), min_len=1, max_len=2,
                              name="a list of 1 or 2 integers >= 1 ([D] or [L, D])"),
    "condition_dtype": Str(choices=("float16", "float32"))}
STATUSES = ("finished", "pending", "running", "failed")
KEY_ID = r"ed25519:[0-9a-f]{16}"  # `ddm.core.signatures.key_id`
CLUSTER_KEY = r"0|[1-9][0-9]{0,5}"  # a cluster id as an object key

# A trained component (an expert, the router, the monolith, the student) as its job records it.
COMPONENT = Obj(
    {"status": Str(choices=STATUSES)},
    optional={"step": Int(min=0), "sha256": Hex(64), "path": RelPath(), "seconds": Num(min=0),
              "num_clusters": Int(min=1, max=MAX_CLUSTERS), "model": Anything(dict, "an object"),
              "train": Anything(dict, "an object"), "router": Anything(dict, "an object"), "teacher": Str(),
              # experts (`ddm assemble`): the bundle it trained from, the key that signed its record
              "bundle_sha256": Hex(64), "signer": Nullable(Str(pattern=KEY_ID, name="a key id (ed25519:16 hex)")),
              "hardware": Anything(),
              # the router: what it trained on (`router.source`), and the drawn set's digest and sizes
              "source": Str(choices=("data", "experts")), "training_set": Anything(dict, "an object")},
)

# How stored rows map to model space (`ddm.core.codec.Codec.from_dict`): images, or standardised latents.
CODEC = Obj({"kind": Str(choices=("images", "latents"))},
            optional={"mean": ListOf(Num(), max_len=MAX_SIDE, name="a list of finite numbers (one per channel)"),
                      "std": ListOf(Num(min=0), max_len=MAX_SIDE,
                                    name="a list of finite numbers >= 0 (one per channel)")})

# The islands' public keys (`ddm prepare / assemble --island-key K=KEY.pub`): island k's expert.json must be
# signed by its key. Who may hand back experts is not part of the plan: these stay out of the run id.
ISLAND_KEY = Obj({"key_id": Str(pattern=KEY_ID, name="a key id (ed25519:16 hex)"),
                  "public_key": Str(pattern=r"[A-Za-z0-9+/]{43}=", name="base64 of 32 bytes")}, closed=True)

# A cluster that joined after the plan (`ddm add-island`): where its data came from.
JOINED = Obj({"source": Str(), "fingerprint": Hex(64), "num_images": Int(min=1, max=MAX_COUNT),
              "holdout": Int(min=0, max=MAX_COUNT)},
             optional={"labels_sha256": Nullable(Hex(64)), "conditions_sha256": Hex(64)}, closed=True)

# Which clusters left, and every membership the run has had (`ddm.data.membership`; volatile, in no id).
_CLUSTER_IDS = ListOf(Int(min=0, max=MAX_CLUSTERS - 1), max_len=MAX_CLUSTERS)
HISTORY_ENTRY = Obj(
    {"id": Hex(64), "change": Str(), "clusters": _CLUSTER_IDS, "removed": _CLUSTER_IDS,
     "experts": MapOf(Obj({"sha256": Hex(64), "path": RelPath()}, optional={"step": Int(min=0),
                                                                            "model": Anything(dict, "an object")}),
                      key_pattern=CLUSTER_KEY, key_name="cluster ids"),
     "router": Nullable(Obj({"sha256": Hex(64), "path": RelPath()},
                            optional={"num_clusters": Int(min=1, max=MAX_CLUSTERS),
                                      "num_classes": Int(min=0, max=MAX_CLASSES), "clusters": _CLUSTER_IDS}))},
    optional={"created": Str()})
MEMBERSHIP = Obj({}, optional={"removed": _CLUSTER_IDS, "history": ListOf(HISTORY_ENTRY)}, closed=True)

SCHEMA = Obj(
    {
        "format": Str(),
        "dataset": Obj({"source": Str(),
                        "fingerprint": Hex(64),
                        "num_images": Int(min=1, max=MAX_COUNT),
                        "image_shape": ListOf(Int(min=1, max=MAX_SIDE), min_len=3, max_len=3,
                                              name=f"a list of 3 integers in 1..{MAX_SIDE} ([H, W, C])")},
                       optional={"num_classes": Int(min=0, max=MAX_CLASSES),
                                 "class_names": Nullable(ListOf(Str(), max_len=MAX_CLASSES)),
                                 "labels_sha256": Nullable(Hex(64)), "dtype": Str(), "codec": Nullable(CODEC),
                                 **CONDITION_FIELDS, "conditions_sha256": Hex(64)}),
        "clustering": Obj({"method": Str(), "k": Int(min=1, max=MAX_CLUSTERS)},
                          optional={"centroids": RelPath(), "train_labels": RelPath(), "inertia": Num(min=0),
                                    "n_iter": Int(min=0), "seed": Int(min=0, max=2**32 - 1)}),
        "clusters": ListOf(Obj({"id": Int(min=0, max=MAX_CLUSTERS - 1),
                                "count": Int(min=0, max=MAX_COUNT),
                                "shard": RelPath()},
                               optional={"share": Num(min=0, max=1),  # planned clusters (rule `shares_fit`)
                                         "class_counts": ListOf(Int(min=0, max=MAX_COUNT), max_len=MAX_CLASSES),
                                         "joined": JOINED}),
                           min_len=1, max_len=MAX_CLUSTERS),
        "config": Anything(dict, "an object"),
    },
    optional={
        "created": Str(),
        "holdout": Obj({"count": Int(min=0, max=MAX_COUNT)}, optional={"shard": RelPath(), "labels": RelPath()}),
        "experts": MapOf(Nullable(COMPONENT), key_pattern=CLUSTER_KEY, key_name="cluster ids"),
        "island_keys": MapOf(ISLAND_KEY, key_pattern=CLUSTER_KEY, key_name="cluster ids"),
        "membership": MEMBERSHIP,
        # router, monolith, student: one entry per run (`ddm.data.components`)
        **{c.name: Nullable(COMPONENT) for c in COMPONENTS if not c.per_cluster},
    },
)


# ---------------------------------------------------------------------------------------------------------
# Rules: relations between fields (each returns a problem, or None).
# ---------------------------------------------------------------------------------------------------------


def _planned(m: dict) -> list[dict]:
    """The clusters of the plan (the first clustering.k; the joined ones follow them)."""
    return [c for c in m["clusters"] if "joined" not in c]


def clusters_match_k(m: dict) -> str | None:
    planned = _planned(m)
    if len(planned) != m["clustering"]["k"]:
        return f"clustering.k is {m['clustering']['k']} but clusters lists {len(planned)} planned clusters"
    if any("joined" in c for c in m["clusters"][:len(planned)]):
        return "clusters that joined later must follow the planned ones"
    return None


def shares_fit(m: dict) -> str | None:
    for c in m["clusters"]:
        if ("share" in c) == ("joined" in c):
            return (f"clusters[{c['id']}] " + ("joined later and has no share" if "joined" in c else
                                                "is planned and needs its share"))
    return None


def cluster_ids_in_order(m: dict) -> str | None:
    for i, cluster in enumerate(m["clusters"]):
        if cluster["id"] != i:
            return f"clusters[{i}].id must be {i}, got {cluster['id']}"
    return None


def one_shard_per_cluster(m: dict) -> str | None:
    seen: dict[str, int] = {}
    for cluster in m["clusters"]:
        if cluster["shard"] in seen:
            return f"clusters {seen[cluster['shard']]} and {cluster['id']} name the same shard {cluster['shard']!r}"
        seen[cluster["shard"]] = cluster["id"]
    return None


def counts_add_up(m: dict) -> str | None:
    train = sum(c["count"] for c in _planned(m))
    held = (m.get("holdout") or {}).get("count", 0)
    if train + held != m["dataset"]["num_images"]:
        return (f"cluster counts ({train}) plus holdout.count ({held}) must equal dataset.num_images "
                f"({m['dataset']['num_images']})")
    if train == 0:
        return "every cluster is empty"
    for c in m["clusters"]:
        if "joined" in c:
            if c["count"] + c["joined"]["holdout"] != c["joined"]["num_images"]:
                return (f"clusters[{c['id']}].count plus joined.holdout must equal joined.num_images "
                        f"({c['joined']['num_images']})")
            continue
        if not math.isclose(c["share"], c["count"] / train, rel_tol=1e-9, abs_tol=1e-12):
            return f"clusters[{c['id']}].share must be its count / {train} = {c['count'] / train:.6g}, got {c['share']}"
    return None


def class_counts_match(m: dict) -> str | None:
    num_classes = m["dataset"].get("num_classes", 0)
    for c in m["clusters"]:
        counts = c.get("class_counts")
        if counts is None:
            continue
        if len(counts) != num_classes:
            return f"clusters[{c['id']}].class_counts lists {len(counts)} classes but dataset.num_classes is {num_classes}"
        if sum(counts) != c["count"]:
            return f"clusters[{c['id']}].class_counts add up to {sum(counts)}, not its count {c['count']}"
    return None


def conditions_described(m: dict) -> str | None:
    fields = [k for k in ("condition_shape", "condition_dtype", "conditions_sha256") if k in m["dataset"]]
    if fields and len(fields) != 3:
        return "dataset.condition_shape, condition_dtype and conditions_sha256 come together"
    if fields and m["dataset"].get("num_classes"):
        return "dataset has condition embeddings and class labels: a run is conditioned on one of them"
    return None


def island_keys_fit(m: dict) -> str | None:
    for k, entry in (m.get("island_keys") or {}).items():
        if int(k) >= len(m["clusters"]):
            return f"island_keys names island {k}, but the run has clusters 0..{len(m['clusters']) - 1}"
        if key_id_of_raw(base64.b64decode(entry["public_key"])) != entry["key_id"]:
            return f"island_keys.{k}.key_id {entry['key_id']} is not the id of its public_key"
    return None


def membership_fits(m: dict) -> str | None:
    removed = (m.get("membership") or {}).get("removed") or []
    if len(set(removed)) != len(removed):
        return "membership.removed names a cluster twice"
    for k in removed:
        if k >= len(m["clusters"]):
            return f"membership.removed names cluster {k}, but the run has clusters 0..{len(m['clusters']) - 1}"
        if str(k) in (m.get("experts") or {}):
            return f"cluster {k} was removed but experts still lists it"
    if len(removed) == len(m["clusters"]):
        return "membership.removed names every cluster"
    return None


RULES = [clusters_match_k, shares_fit, cluster_ids_in_order, one_shard_per_cluster, counts_add_up,
         class_counts_match, conditions_described, island_keys_fit, membership_fits]


def validate_manifest(manifest, where: str) -> dict:
    """`manifest` if it fits `SCHEMA` and `RULES`; else DDMError `"{where}: {field} must be ..."`."""
    return check(manifest, SCHEMA, where, RULES)
