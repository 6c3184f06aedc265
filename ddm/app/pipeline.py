"""`ddm run`: the main job end to end — prepare, train every island, train the router, sample per strategy.

Per routing strategy it writes the unguided grid (`samples/<strategy>.png`) and, for class-conditional runs,
a guided grid with one row per class (`samples/<strategy>_guided.png`, classifier-free guidance at
`sample.cfg_scale`); `samples/strategies.png` and `samples/strategies_guided.png` put them side by side.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np

from ddm.app.router import train_router_command
from ddm.app.sample import check_cfg_scale
from ddm.core.config import Config
from ddm.core.errors import DDMError
from ddm.data.prepare import prepare
from ddm.data.run import Run
from ddm.experts.islands import launch_local
from ddm.sampling.ensemble import Ensemble
from ddm.sampling.load import load_ensemble
from ddm.sampling.outputs import load_decoder, save_outputs, usage_summary
from ddm.sampling.request import Request, generate
from ddm.train.plots import save_strategy_figure

logger = logging.getLogger(__name__)

GUIDED_PER_CLASS = 8  # images per class (one grid row each) in the guided grids
GUIDED_MAX_CLASSES = 16  # the guided grids show the first classes only beyond this many


def guided_labels(num_classes: int) -> tuple[int, ...]:
    """Class labels of the guided grid: GUIDED_PER_CLASS of each of the first GUIDED_MAX_CLASSES classes, row by
    row."""
    return tuple(int(c) for c in np.repeat(np.arange(min(num_classes, GUIDED_MAX_CLASSES)), GUIDED_PER_CLASS))


def run_all(cfg: Config, run_dir: str | Path, overrides: list[str], *, base_dir: Path | None = None,
            overwrite: bool = False, parallel: int | None = None) -> dict:
    """Runs every stage; returns {stage: output path}. Finished stages are skipped on a rerun. SIGTERM / SIGINT
    while the islands train stop them at a checkpoint (`ddm.experts.islands.IslandsPreempted`)."""
    run_dir = Path(run_dir)
    check_cfg_scale(cfg.sample.cfg_scale, "sample.cfg_scale")  # the guided grids' scale, refused before any work
    t0 = time.perf_counter()
    logger.info("== 1/4 prepare")
    prepare(cfg, run_dir, overwrite=overwrite, base_dir=base_dir)
    logger.info("== 2/4 train islands (one process each)")
    parallel = parallel or max(1, min(cfg.data.k, os.cpu_count() or 1))
    islands = launch_local(run_dir, overrides, parallel=parallel)
    failed = [i.cluster for i in islands if i.status == "failed"]
    if len(failed) == len(islands):
        raise DDMError(f"every island failed; see {run_dir}/experts/<k>/train.log")
    logger.info("== 3/4 train router")
    run = Run.open(run_dir, overrides)
    if run.finished(run.component("router"), cfg.router.train.steps):
        logger.info("router already trained")
    else:
        train_router_command(run_dir, overrides)  # from the shards or the experts (router.source)
        run = run.reload()
    logger.info("== 4/4 sample")
    ensemble = load_ensemble(run)
    cfg = run.config
    grids, guided_grids, outputs = {}, {}, {}
    labels = guided_labels(run.num_classes) if run.num_classes else None
    for strategy in cfg.sample.strategies:
        request = Request(seed=cfg.sample.seed, n=cfg.sample.n, strategy=strategy, steps=cfg.sample.steps,
                          solver=cfg.sample.solver)
        name = strategy.replace(":", "_")
        grids[strategy], outputs[strategy] = _sample(run, ensemble, request, run.samples_dir / f"{name}.png")
        if labels is not None:
            guided = Request(seed=cfg.sample.seed, n=len(labels), strategy=strategy, steps=cfg.sample.steps,
                             solver=cfg.sample.solver, labels=labels, cfg_scale=cfg.sample.cfg_scale)
            guided_grids[f"{strategy} (cfg {cfg.sample.cfg_scale:g})"], outputs[f"{strategy} guided"] = _sample(
                run, ensemble, guided, run.samples_dir / f"{name}_guided.png", ncols=GUIDED_PER_CLASS)
    figure = run.samples_dir / "strategies.png"
    save_strategy_figure(grids, figure)
    if guided_grids:
        save_strategy_figure(guided_grids, run.samples_dir / "strategies_guided.png", ncols=GUIDED_PER_CLASS)
    logger.info(f"done in {time.perf_counter() - t0:.0f}s. Everything is in {run_dir}:")
    logger.info(f"  manifest          {run_dir / 'manifest.json'}  (ddm info --run-dir {run_dir})")
    logger.info(f"  experts           {run_dir / 'experts'}/<k>/ (checkpoints, metrics.jsonl, loss.png)")
    logger.info(f"  router            {run_dir / 'router'}")
    logger.info(f"  sample grids      {figure}"
                + (f", {run.samples_dir / 'strategies_guided.png'} (one row per class)" if guided_grids else ""))
    if failed:
        logger.warning(f"warning: islands {failed} failed and were left out of the ensemble; rerun to retry them")
    return {"figure": figure, **outputs}


def _sample(run: Run, ensemble: Ensemble, request: Request, png: Path,
            ncols: int | None = None) -> tuple[np.ndarray, Path]:
    """Generates `request`, writes its grid + arrays at `png`, logs time and expert usage; (images, png)."""
    t0 = time.perf_counter()
    result = generate(ensemble, request)
    npz = save_outputs(result, request, png, manifest_sha=run.sha256, ncols=ncols,
                       decoder=load_decoder(run.config.sample.decoder))
    what = request.strategy + ("" if request.labels is None else " guided")
    logger.info(f"  {what:<21} {time.perf_counter() - t0:5.1f}s  {png}  ({usage_summary(result)})")
    with np.load(npz) as saved:  # what the grid shows: images, decoded latents or the latent visualisation
        return saved["images"], png
