"""`ddm export`: a run's finished models as a folder to hand to someone else (or push to the Hugging Face Hub).

    OUT/
      manifest.json                    the run's manifest, byte for byte: same run identity (manifest SHA-256),
                                       so verification records made on the run hold on the export (also
                                       after the run trains a monolith or student: they are not part of it)
      experts/k/final.safetensors      every finished expert's {"ema", "rest"} tree (`ddm.core.weights`)
      router/final.safetensors         the router; monolith/, student/final.safetensors when trained
      config.yaml                      the resolved config the run was trained with
      eval/                            the run's evaluation reports, when present
      export.json                      format, source, components with their SHA-256 pins
      README.md                        a model card: data, K, cluster sizes, training budget, evaluation
      SHA256SUMS                       every file's SHA-256 (`sha256sum -c SHA256SUMS`)

`load_ensemble(OUT)` and `ddm sample --run-dir OUT` work on it as on the run directory: `Run.open` checks
SHA256SUMS, and each model is checked against the same manifest pin as its orbax checkpoint. The training data
(shards, held-out images) is not exported. The folder is written under a temporary name and renamed when
complete, so an interrupted export leaves nothing that looks finished.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
from flax import nnx

import ddm
from ddm.core.config import ModelConfig, to_yaml
from ddm.core.errors import DDMError
from ddm.core.weights import save_safetensors
from ddm.data.components import COMPONENTS
from ddm.data.manifest import MANIFEST
from ddm.data.run import EXPORT_INFO, WEIGHTS_SUFFIX, Run
from ddm.data.sums import SUMS, write_sums
from ddm.router.trained import router_factory
from ddm.sampling.load import entry_model, expert_factory, open_run, single_factory
from ddm.train.checkpoint import load_pinned_tree

logger = logging.getLogger(__name__)

FORMAT = "ddm-export/v1"
EVAL_FILES = ("router.json", "report.json", "report.md")


def pinned_components(run: Run) -> list[tuple[str, dict, Callable[[nnx.Rngs], nnx.Module]]]:
    """(name, manifest entry, constructor) of every finished component, in the registry's order
    (`ddm.data.components`: experts as "expert k", then router, monolith, student)."""
    found = []
    for c in COMPONENTS:
        if c.per_cluster:
            found += [(f"expert {k}", run.expert(k), expert_factory(run, k)) for k in run.finished_experts()]
            continue
        entry = run.component(c.name)
        if run.finished(entry):
            make = router_factory(run) if c.builds == "router" else single_factory(run, entry)[1]
            found.append((c.name, entry, make))
    return found


def export_run(run: Run | str | Path, out: str | Path) -> Path:
    """Writes the export folder `out` (which must not exist, or be empty); returns its path."""
    run = open_run(run)
    if run.is_export:
        raise DDMError(f"{run.root} is already an export; copy the folder instead")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DDMError(f"export folder {out} already exists and is not empty")
    components = pinned_components(run)
    if not any(name.startswith("expert") for name, _, _ in components):
        raise DDMError(f"no expert of {run.root} is trained yet: nothing to export")
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        exported = {}
        for name, entry, make in components:
            _, tree = load_pinned_tree(run.weights_path(entry), entry.get("sha256"), make, name)
            host = jax.device_get(tree)
            file = entry["path"] + WEIGHTS_SUFFIX
            save_safetensors(tmp / file, host, metadata={"component": name, "sha256": entry["sha256"]})
            exported[name] = {"file": file, "sha256": entry["sha256"], "step": entry.get("step"),
                              "parameters": int(sum(np.size(x) for x in jax.tree.leaves(host["ema"]))),
                              "seconds": entry.get("seconds")}
            logger.info(f"  {name:<10} -> {file}")
        shutil.copyfile(run.root / MANIFEST, tmp / MANIFEST)
        (tmp / "config.yaml").write_text(to_yaml(run.config))
        evals = {}
        for file in EVAL_FILES:
            if (run.eval_dir / file).is_file():
                (tmp / "eval").mkdir(exist_ok=True)
                shutil.copyfile(run.eval_dir / file, tmp / "eval" / file)
                if file.endswith(".json"):
                    evals[file] = json.loads((run.eval_dir / file).read_text())
        info = {"format": FORMAT, "ddm_version": ddm.__version__, "source": run.root.absolute().name,
                "created": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "manifest_sha256": run.sha256,
                "components": exported}
        (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
        (tmp / "README.md").write_text(model_card(run, info, evals))
        write_sums(tmp)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info(f"exported {len(exported)} models of {run.root} -> {out} (manifest sha256 {run.sha256[:16]})")
    return out


# ---------------------------------------------------------------------------------------------------------
# The model card.
# ---------------------------------------------------------------------------------------------------------


def _train_line(train: dict | None) -> str:
    if not train:
        return "-"
    return (f"{train.get('steps')} steps x batch {train.get('batch_size')}, lr {train.get('lr')} "
            f"({train.get('schedule')}), EMA {train.get('ema_decay')}")


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} hours" if seconds >= 3600 else f"{seconds / 60:.1f} minutes"


def _eval_section(evals: dict) -> list[str]:
    lines = []
    router = evals.get("router.json")
    if router:
        lines += [f"Router on {router['holdout_images']} held-out images at all noise levels: top-1 accuracy "
                  f"{router['accuracy']:.3f}, cross-entropy {router['cross_entropy']:.3f}, ECE {router['ece']:.3f}.", ""]
    report = evals.get("report.json")
    if report:
        metric = report.get("featurenet", {}).get("metric_name", "FD")
        request = report.get("request", {})
        lines += [f"Sample quality ({metric}; {request.get('n')} samples, {request.get('steps')} "
                  f"{request.get('solver')} steps, against {report.get('holdout_count')} held-out images):", "",
                  "| model | FD | precision | recall |", "|---|---:|---:|---:|"]
        for name, row in report.get("results", {}).items():
            lines.append(f"| {name} | {row['fd']:.3f} | {row['precision']:.3f} | {row['recall']:.3f} |")
        lines.append("")
    return lines or ["No evaluation was run before the export (`ddm evaluate`, `ddm eval-router`).", ""]


def _conditioning(model: ModelConfig) -> str:
    """What the model card says the experts are conditioned on (`model`: the run's resolved `expert.model`)."""
    if model.num_classes:
        return f"{model.num_classes} classes (CFG)"
    if model.condition_shape:
        return f"condition embeddings {list(model.condition_shape)} per image (CFG)"
    return "unconditional"


def _experts_line(run: Run, experts: dict, one: dict) -> str:
    """The model card's line on the experts' architecture: the plan's, or each island's own when they differ."""
    models = {k: entry_model(run, run.expert(k), f"expert {k}") for k, e in experts.items() if e}
    if len(set(models.values())) == 1:
        model = next(iter(models.values()))
        return (f"- experts: DiT preset `{model.preset}`, patch {model.patch_size}, {one['parameters']:,} parameters "
                "each, ")
    each = ", ".join(f"{k}: `{m.preset}` patch {m.patch_size}, {experts[k]['parameters']:,} parameters"
                     for k, m in models.items())
    return f"- experts: DiTs of the islands' own sizes ({each}), "


def model_card(run: Run, info: dict, evals: dict) -> str:
    """README.md of an export: what the models are, what they were trained on and how, and how to use them."""
    manifest, cfg = run.manifest, run.config
    ds, cl = manifest["dataset"], manifest["clustering"]
    comps = info["components"]
    experts = {k: comps.get(f"expert {k}") for k in run.cluster_ids}
    expert_steps = sum(e["step"] or 0 for e in experts.values() if e)
    expert_seconds = sum(e["seconds"] or 0 for e in experts.values() if e)
    one = next(e for e in experts.values() if e)
    router = comps.get("router")
    lines = [
        "---",
        "library_name: ddm",
        "tags: [diffusion, flow-matching, decentralized-diffusion, mixture-of-experts, jax]",
        "---",
        "",
        f"# Decentralized diffusion model: {len([e for e in experts.values() if e])} experts + router",
        "",
        f"Exported by ddm {info['ddm_version']} from `{run.root.name}` on {info['created']}. A decentralized "
        "diffusion model (McAllister et al., CVPR 2025): the data was split into K clusters by k-means, one "
        "flow-matching DiT expert was trained on each cluster in isolation, and a router p(cluster | x_t, t) "
        "combines them at sampling time.",
        "",
        f"Run identity (manifest SHA-256, the name verification records give it): `{info['manifest_sha256']}`",
        "",
        "## Data",
        "",
        f"- source: `{ds['source']}`, {ds['num_images']} images of shape {tuple(ds['image_shape'])} (uint8), "
        f"dataset fingerprint `{ds['fingerprint'][:16]}...`",
        f"- clustering: K={cl['k']}, {cl['method']} k-means on {cl.get('embedding', '?')} features",
        f"- held out from training: {run.holdout.get('count', 0)} images",
        "- the images themselves are not part of this export",
        "",
        "| cluster | images | share | expert steps | expert pin (SHA-256) |",
        "|---:|---:|---:|---:|---|",
    ]
    for c, share in zip(run.clusters, run.cluster_shares()):  # shares of the membership (a removed cluster: 0)
        e = experts.get(c["id"])
        lines.append(f"| {c['id']} | {c['count']} | {share:.1%} | {e['step'] if e else 'not trained'} | "
                     + (f"`{e['sha256'][:16]}`" if e else "-") + " |")
    lines += [
        "",
        "## Models and training budget",
        "",
        _experts_line(run, experts, one)
        + _conditioning(cfg.expert.model)
        + f"; {_train_line(run.expert(next(k for k, e in experts.items() if e)).get('train'))}",
        f"- all experts together: {expert_steps:,} optimisation steps, {_duration(expert_seconds)} of wall-clock "
        "training (summed over islands)",
    ]
    if router:
        lines.append(f"- router: {cfg.router.arch} preset `{cfg.router.preset}`, {router['parameters']:,} parameters, "
                     f"{router['step']} steps")
    if comps.get("monolith"):
        mono = comps["monolith"]
        lines.append(f"- monolith baseline (one DiT on all data): {mono['parameters']:,} parameters, {mono['step']} steps")
    lines += ["", "## Evaluation", "", *_eval_section(evals)]
    lines += [
        "## Use",
        "",
        "```bash",
        "pip install -e .   # in a clone of the ddm repository",
        "ddm sample --run-dir THIS_FOLDER --n 64 --strategy top1 --out grid.png",
        "```",
        "",
        "```python",
        "from ddm.sampling.load import load_ensemble",
        "",
        'ensemble = load_ensemble("THIS_FOLDER")   # every file checked against SHA256SUMS and its pin',
        'result = ensemble.sample(16, "top1", steps=30, solver="heun", seed=0)',
        "result.images                               # uint8 [16, H, W, C]",
        "```",
        "",
        "## Files and pins",
        "",
        f"Each `*.safetensors` file holds one model's EMA weights (`ema.*`) and buffers (`rest.*`). Loading "
        "recomputes the SHA-256 of the weights and refuses a file that does not match the pin in `manifest.json`; "
        f"`{SUMS}` lists the SHA-256 of every file (`sha256sum -c {SUMS}`).",
        "",
        "| component | file | pin (SHA-256 of the weights) |",
        "|---|---|---|",
    ]
    for name, c in comps.items():
        lines.append(f"| {name} | `{c['file']}` | `{c['sha256']}` |")
    return "\n".join(lines) + "\n"
