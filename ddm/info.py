"""`ddm info`: a run directory's manifest as a readable summary."""

from __future__ import annotations

from data.manifest import manifest_sha256


def _component(entry: dict | None) -> str:
    if not entry:
        return "not trained"
    if entry.get("status") != "finished":
        return entry.get("status", "?")
    return f"finished, step {entry.get('step')}, sha256 {entry.get('sha256', '')[:12]}"


def describe(manifest: dict, run_dir: str) -> str:
    """Dataset, clustering, per-cluster sizes and what is trained so far."""
    ds, cl = manifest["dataset"], manifest["clustering"]
    experts = manifest.get("experts", {})
    lines = [
        f"run        {run_dir}",
        f"manifest   sha256 {manifest_sha256(manifest)[:16]}",
        f"dataset    {ds['source']}: {ds['num_images']} images {tuple(ds['image_shape'])}, "
        f"fingerprint {ds['fingerprint'][:16]}",
        f"clusters   K={cl['k']} by {cl['method']} partition of {cl.get('embedding', '?')} features"
        + (f", k-means inertia {cl['inertia']:.4g} after {cl.get('n_iter', '?')} iterations" if "inertia" in cl else ""),
        f"holdout    {manifest.get('holdout', {}).get('count', 0)} images",
        "",
        f"{'cluster':>7}  {'size':>7}  {'share':>6}  expert",
    ]
    for c in manifest["clusters"]:
        lines.append(f"{c['id']:>7}  {c['count']:>7}  {c['share']:>6.1%}  {_component(experts.get(str(c['id'])))}")
    done = sum(1 for c in manifest["clusters"] if experts.get(str(c["id"]), {}).get("status") == "finished")
    lines += ["", f"experts    {done}/{len(manifest['clusters'])} finished",
              f"router     {_component(manifest.get('router'))}",
              f"monolith   {_component(manifest.get('monolith'))}"]
    return "\n".join(lines)
