"""A run's membership: which clusters take part in its ensemble now, and every membership it has had.

The plan (`manifest.plan_sha256`, the run id) is fixed at `ddm prepare`. The *membership* is what the ensemble
samples with: the member clusters (the planned ones and those that joined later with `ddm add-island`, less
those that left with `ddm remove-island`), their experts' weights and the router's. Its id is
`manifest.manifest_sha256` (`Run.membership_id`, the `manifest_sha256` verification records carry).

The manifest keeps it in two places:

    clusters[k].joined   a cluster that joined after the plan (its entry follows the planned ones)
    membership           {removed: [k...], history: [entry...]}

Cluster ids are slots: a cluster keeps its id, and its entry, after it leaves (the plan still names it), and a
removed id is never reused (an island that leaves and comes back joins as a new cluster).

Each command that changes the membership id (assemble, train-router, add-island, remove-island) appends a
history entry describing the new membership (`tracked`):

    {id, created, change ("assemble 0,1", "router", "join 4", "remove 2"), clusters (members), removed,
     experts {k: {sha256, path, step, model (only where it is not the plan's expert.model)}},
     router {sha256, path, num_clusters, num_classes, clusters} | null}

The history is volatile (in no id). It lets a record made with an earlier membership verify later:
`manifest_at` rebuilds that membership's manifest from its entry and checks that it has the entry's id, so the
entry cannot name weights other than those the id pins (`ddm.data.run.Run.at`).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path

from ddm.core.errors import DDMError
from ddm.data import manifest as mf

SECTION = mf.MEMBERSHIP
JOINED = mf.JOINED
# A router entry's fields a history entry keeps: what loads it and what it was trained with.
_ROUTER_KEYS = ("sha256", "path", "num_clusters", "num_classes", "clusters")


def removed(manifest: dict) -> list[int]:
    """Cluster ids that left the membership, sorted."""
    return sorted((manifest.get(SECTION) or {}).get("removed") or [])


def member_ids(manifest: dict) -> list[int]:
    """The member clusters' ids, in order: every cluster of the manifest but the removed ones."""
    gone = set(removed(manifest))
    return [c["id"] for c in manifest["clusters"] if c["id"] not in gone]


def history(manifest: dict) -> list[dict]:
    return list((manifest.get(SECTION) or {}).get("history") or [])


def _trained_with(entry: dict, num_clusters: int) -> list[int]:
    """The clusters a router entry was trained with (routers recorded before they named them: all of
    0..num_clusters-1 of its time)."""
    if "clusters" in entry:
        return list(entry["clusters"])
    return list(range(int(entry.get("num_clusters", num_clusters))))


def router_problem(manifest: dict) -> str | None:
    """Why the finished router cannot route this membership (one line naming the command that refreshes it), or
    None when it can (or there is no finished router)."""
    entry = manifest.get("router")
    if not entry or entry.get("status") != "finished":
        return None
    if entry.get("gone"):  # an earlier membership's router whose weights are no longer there (`manifest_at`)
        return entry["gone"]
    members, total = member_ids(manifest), len(manifest["clusters"])
    trained = _trained_with(entry, total)
    gone = sorted(set(trained) - set(members))
    if gone:
        return f"router was trained with cluster {gone[0]}, which left the membership; run ddm train-router"
    new = sorted(set(members) - set(trained))
    if new:
        return f"router was trained without cluster {new[0]}, which joined later; run ddm train-router"
    if entry.get("num_clusters", total) != total:
        return (f"router was trained for {entry.get('num_clusters')} clusters but the run has {total}; run ddm "
                "train-router")
    return None


# ---------------------------------------------------------------------------------------------------------
# History.
# ---------------------------------------------------------------------------------------------------------


def snapshot(manifest: dict, change: str) -> dict:
    """The history entry of `manifest`'s membership (module docstring)."""
    plan_model = ((manifest.get("config") or {}).get("expert") or {}).get("model")
    experts = {}
    for k, entry in sorted((manifest.get("experts") or {}).items(), key=lambda item: int(item[0])):
        if entry and entry.get("status") == "finished" and "sha256" in entry and "path" in entry:
            experts[k] = {"sha256": entry["sha256"], "path": entry["path"],
                          **({"step": entry["step"]} if "step" in entry else {}),
                          # the plan's model is implied: a history of many experts stays small
                          **({"model": entry["model"]} if "model" in entry and entry["model"] != plan_model else {})}
    router = manifest.get("router")
    router = ({key: router[key] for key in _ROUTER_KEYS if key in router}
              if router and router.get("status") == "finished" and "sha256" in router and "path" in router else None)
    return {"id": mf.manifest_sha256(manifest), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "change": change,
            "clusters": member_ids(manifest), "removed": removed(manifest), "experts": experts, "router": router}


def _weights(section: dict | None) -> dict:
    return {k: (e or {}).get("sha256") for k, e in (section or {}).items()
            if e and e.get("status") == "finished" and e.get("sha256")}


def describe_change(before: dict, after: dict) -> str:
    """What changed between two manifests' memberships, e.g. "join 4", "remove 2", "assemble 0,1", "router"."""
    parts = []
    joined = [c["id"] for c in after["clusters"][len(before["clusters"]):]]
    if joined:
        parts.append("join " + ",".join(map(str, joined)))
    left = sorted(set(removed(after)) - set(removed(before)))
    if left:
        parts.append("remove " + ",".join(map(str, left)))
    old, new = _weights(before.get("experts")), _weights(after.get("experts"))
    assembled = sorted((int(k) for k, sha in new.items() if old.get(k) != sha))
    if assembled:
        parts.append("assemble " + ",".join(map(str, assembled)))
    unregistered = sorted(int(k) for k in old if k not in new and int(k) not in left)
    if unregistered:
        parts.append("unregister " + ",".join(map(str, unregistered)))
    if (before.get("router") or {}).get("sha256") != (after.get("router") or {}).get("sha256"):
        parts.append("router")
    return "; ".join(parts) or "other"


def start(manifest: dict, change: str = "prepare") -> None:
    """Begins `manifest`'s history with its current membership (in place)."""
    manifest.setdefault(SECTION, {})["history"] = [snapshot(manifest, change)]


def tracked(change: Callable[[dict], None]) -> Callable[[dict], None]:
    """`change` (a manifest edit, as `manifest.update_manifest` takes), followed by a history entry when it changed
    the membership id. A manifest without history (prepared before there was one) first gets an entry for the
    membership it had ("earlier"), so records made with it keep verifying."""

    def tracked_change(manifest: dict) -> None:
        before = copy.deepcopy(manifest)
        change(manifest)
        if mf.manifest_sha256(before) == mf.manifest_sha256(manifest):
            return
        entries = history(before) or [snapshot(before, "earlier")]
        manifest.setdefault(SECTION, {})["history"] = entries + [snapshot(manifest, describe_change(before, manifest))]

    return tracked_change


# ---------------------------------------------------------------------------------------------------------
# An earlier membership.
# ---------------------------------------------------------------------------------------------------------


def find(manifest: dict, membership_id: str) -> dict | None:
    """The latest history entry of `membership_id`, or None."""
    return next((e for e in reversed(history(manifest)) if e["id"] == membership_id), None)


def manifest_at(manifest: dict, membership_id: str, run_dir: str | Path) -> dict:
    """The manifest as it was when the membership `membership_id` was current: its clusters, removed set,
    experts and router from its history entry, everything else (the plan) as now. Its `manifest_sha256` is
    `membership_id` (checked). DDMError (one line) when the id is not in the history, the entry does not give
    that id, or an expert or the router it names is gone from `run_dir` (deleted by `ddm assemble --replace`
    or `ddm remove-island --delete`)."""
    entry = find(manifest, membership_id)
    if entry is None:
        raise DDMError(f"membership {membership_id[:16]} is not in the history of run {run_dir}: not the same run")
    view = copy.deepcopy(manifest)
    count = len(entry["clusters"]) + len(entry["removed"])
    if count > len(view["clusters"]):
        raise DDMError(f"membership {membership_id[:16]} of run {run_dir} names {count} clusters, the run has "
                       f"{len(view['clusters'])}: its history was edited")
    view["clusters"] = view["clusters"][:count]
    plan_model = ((view.get("config") or {}).get("expert") or {}).get("model")
    view["experts"] = {k: {"status": "finished", **({"model": plan_model} if plan_model is not None else {}), **e}
                       for k, e in entry["experts"].items()}
    if entry["router"] is None:
        view.pop("router", None)
    else:
        view["router"] = {"status": "finished", **entry["router"]}
    view[SECTION] = {"removed": list(entry["removed"]), "history": history(manifest)}
    if mf.manifest_sha256(view) != membership_id:
        raise DDMError(f"the history entry of membership {membership_id[:16]} in run {run_dir} does not give that "
                       "id (the manifest was edited)")
    for k, e in sorted(entry["experts"].items(), key=lambda item: int(item[0])):
        gone = _gone(run_dir, e, f"expert {k} (sha256 {e['sha256'][:16]}) of membership {membership_id[:16]}")
        if gone:
            raise DDMError(gone)
    if entry["router"] is not None:
        # only router strategies need it: they refuse with this line (`router_problem`), `prior` still works
        view["router"]["gone"] = _gone(run_dir, entry["router"], f"the router (sha256 "
                                       f"{entry['router']['sha256'][:16]}) of membership {membership_id[:16]}")
    return view


def _gone(run_dir: str | Path, entry: dict, what: str) -> str | None:
    """Why the weights of a history entry's model are not there (one line), or None when they are."""
    path = mf.resolve(run_dir, entry["path"])
    if "://" in path or Path(path).exists() or Path(path + ".safetensors").exists():  # (an export's file)
        return None
    return (f"{what} is gone: its weights {entry['path']} were deleted (ddm assemble --replace, ddm remove-island "
            "--delete) or retrained")
