"""`ddm run`: the main job end to end — prepare, train every island, train the router, sample per strategy."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

import numpy as np

from ddm.config import Config
from ddm.errors import DDMError


def save_strategy_figure(grids: dict[str, np.ndarray], path: Path, ncols: int = 8) -> None:
    """One PNG with a titled sample grid per strategy, side by side. grids: name -> uint8 [n, H, W, C]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ddm.ensemble import make_grid

    fig, axes = plt.subplots(1, len(grids), figsize=(2.6 * len(grids), 2.9), dpi=120, squeeze=False)
    for ax, (name, images) in zip(axes[0], grids.items()):
        grid = make_grid(images, ncols)
        ax.imshow(grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=255,
                  interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run_all(cfg: Config, run_dir: str | Path, overrides: list[str], *, base_dir: Path | None = None,
            overwrite: bool = False, parallel: int | None = None, log: Callable[[str], None] = print) -> dict:
    """Runs every stage; returns {stage: output path}. Finished stages are skipped on a rerun."""
    from data.manifest import manifest_sha256, read_manifest
    from data.prepare import prepare
    from ddm.loading import load_run
    from ddm.sampling import Request, generate, save_outputs, usage_summary
    from experts.islands import launch_local
    from router.train import train_router

    run_dir = Path(run_dir)
    t0 = time.perf_counter()
    log("== 1/4 prepare")
    prepare(cfg, run_dir, overwrite=overwrite, base_dir=base_dir, log=log)
    log("== 2/4 train islands (one process each)")
    parallel = parallel or max(1, min(cfg.data.k, os.cpu_count() or 1))
    islands = launch_local(run_dir, overrides, parallel=parallel, log=log)
    failed = [i.cluster for i in islands if i.status == "failed"]
    if len(failed) == len(islands):
        raise DDMError(f"every island failed; see {run_dir}/experts/<k>/train.log")
    log("== 3/4 train router")
    manifest = read_manifest(run_dir)
    router = manifest.get("router") or {}
    if router.get("status") == "finished" and router.get("step", 0) >= cfg.router.train.steps:
        log("router already trained")
    else:
        train_router(run_dir, overrides, log=log)
    log("== 4/4 sample")
    ensemble, cfg, manifest = load_run(str(run_dir), overrides)
    manifest_sha = manifest_sha256(manifest)
    samples_dir = run_dir / "samples"
    grids, outputs = {}, {}
    for strategy in cfg.sample.strategies:
        request = Request(seed=cfg.sample.seed, n=cfg.sample.n, strategy=strategy, steps=cfg.sample.steps,
                          solver=cfg.sample.solver)
        t1 = time.perf_counter()
        result = generate(ensemble, request)
        png = samples_dir / f"{strategy.replace(':', '_')}.png"
        save_outputs(result, request, png, manifest_sha=manifest_sha)
        grids[strategy], outputs[strategy] = result.images, png
        log(f"  {strategy:<14} {time.perf_counter() - t1:5.1f}s  {png}  ({usage_summary(result)})")
    figure = samples_dir / "strategies.png"
    save_strategy_figure(grids, figure)
    log(f"done in {time.perf_counter() - t0:.0f}s. Everything is in {run_dir}:")
    log(f"  manifest          {run_dir / 'manifest.json'}  (ddm info {run_dir})")
    log(f"  experts           {run_dir / 'experts'}/<k>/ (checkpoints, metrics.jsonl, loss.png)")
    log(f"  router            {run_dir / 'router'}")
    log(f"  sample grids      {figure}")
    if failed:
        log(f"warning: islands {failed} failed and were left out of the ensemble; rerun to retry them")
    return {"figure": figure, **outputs}
