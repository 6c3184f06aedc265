"""`ddm info`: a run directory's manifest as a readable summary."""

from __future__ import annotations

from ddm.data import membership
from ddm.data.prepare import cluster_table
from ddm.data.run import Run


def _component(entry: dict | None) -> str:
    if not entry:
        return "not trained"
    if entry.get("status") != "finished":
        return entry.get("status", "?")
    return f"finished, step {entry.get('step')}, sha256 {entry.get('sha256', '')[:12]}"


def _router_source(entry: dict | None) -> str:
    """", trained on the shards" or ", trained on 2048 expert samples (set sha256 ...)"; "" before it finished."""
    if not entry or entry.get("status") != "finished":
        return ""
    if entry.get("source", "data") == "data":  # routers recorded before sources existed read the shards
        return ", trained on the shards"
    made = entry.get("training_set") or {}
    return (f", trained on {made.get('num_images', '?')} expert samples (set sha256 "
            f"{str(made.get('sha256', ''))[:12]})")


def _member(run: Run, cluster: dict) -> str:
    """A cluster's expert, or that it left (or joined later)."""
    if cluster["id"] in run.removed_clusters:
        return "removed"
    joined = cluster.get("joined")
    return _component(run.expert(cluster["id"])) + (f" (joined: {joined['source']})" if joined else "")


def _names(names: list[str], shown: int = 10) -> str:
    return ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")


def _rows(run: Run) -> str:
    """What one row of the dataset is: "images", or e.g. "float16 latents" (with their normalisation)."""
    codec = run.codec
    if not codec.latents:
        return "images"
    return f"{run.dataset.get('dtype', 'float')} latents"


def _normalisation(run: Run) -> list[str]:
    codec = run.codec
    if not codec.latents:
        return []
    per = ", ".join(f"{m:.4g}/{s:.4g}" for m, s in zip(codec.mean, codec.std))
    return [f"latents    model value = (x - mean) / std per channel, mean/std {per}"]


def _conditioning(run: Run) -> str:
    """What the models are conditioned on: class labels, per-image condition embeddings, or nothing."""
    if run.num_classes:
        return f"classes    {run.num_classes} ({_names(run.class_names)}): experts and router are class-conditional"
    if run.condition_shape:
        # a trained router's own setting (its manifest entry), else the one it would train with
        trained = (run.component("router") or {}).get("router") or {}
        takes = trained.get("condition", run.config.router.condition)
        router = "takes them too" if takes else "ignores them (router.condition false)"
        return (f"conditions {list(run.condition_shape)} {run.dataset.get('condition_dtype', '?')} embeddings per image"
                f" (data.conditions {run.config.data.conditions}): experts are conditioned on them, the router {router}")
    return "classes    none (unconditional)"


def describe(run: Run) -> str:
    """Dataset, clustering, per-cluster sizes and what is trained so far."""
    manifest = run.manifest
    ds, cl = manifest["dataset"], manifest["clustering"]
    rows = _rows(run)
    lines = [
        f"run        {run.root}",
        f"manifest   sha256 {run.sha256[:16]}",
        f"dataset    {ds['source']}: {ds['num_images']} {rows} {tuple(ds['image_shape'])}, "
        f"fingerprint {ds['fingerprint'][:16]}",
        *_normalisation(run),
        f"clusters   K={cl['k']} by {cl['method']} partition of {cl.get('embedding', '?')} features"
        + (f", k-means inertia {cl['inertia']:.4g} after {cl.get('n_iter', '?')} iterations" if "inertia" in cl else ""),
        _conditioning(run),
        f"holdout    {run.holdout.get('count', 0)} {rows}",
        "",
    ]
    # shares of the membership's training images (a joined cluster has no planned share; a removed one has 0)
    shared = [{**c, "share": float(share)} for c, share in zip(run.clusters, run.cluster_shares())]
    table = cluster_table(shared, run.class_names).splitlines()
    lines.append(table[0] + "  expert")
    lines += [row + f"  {_member(run, c)}" for row, c in zip(table[1:], run.clusters)]
    removed = run.removed_clusters
    lines += ["", f"membership id {run.membership_id[:16]}: {len(run.cluster_ids)} member clusters"
              + (f", removed {', '.join(map(str, removed))}" if removed else "")
              + f", {len(membership.history(manifest))} memberships in its history",
              f"experts    {len(run.finished_experts())}/{len(run.cluster_ids)} finished",
              f"router     {_component(run.component('router'))}{_router_source(run.component('router'))}",
              f"monolith   {_component(run.component('monolith'))}",
              f"student    {_component(run.component('student'))}"]
    return "\n".join(lines)
