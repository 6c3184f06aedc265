"""`ddm run`: the main job end to end — prepare, train every island, train the router, sample per strategy."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from ddm.core.config import Config
from ddm.core.errors import DDMError
from ddm.core.plots import save_strategy_figure
from ddm.data.prepare import prepare
from ddm.data.run import Run
from ddm.experts.islands import launch_local
from ddm.router.train import train_router
from ddm.sampling.load import load_ensemble
from ddm.sampling.outputs import save_outputs, usage_summary
from ddm.sampling.request import Request, generate

logger = logging.getLogger(__name__)


def run_all(cfg: Config, run_dir: str | Path, overrides: list[str], *, base_dir: Path | None = None,
            overwrite: bool = False, parallel: int | None = None) -> dict:
    """Runs every stage; returns {stage: output path}. Finished stages are skipped on a rerun."""
    run_dir = Path(run_dir)
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
        train_router(run_dir, overrides)
        run = run.reload()
    logger.info("== 4/4 sample")
    ensemble = load_ensemble(run)
    cfg = run.config
    grids, outputs = {}, {}
    for strategy in cfg.sample.strategies:
        request = Request(seed=cfg.sample.seed, n=cfg.sample.n, strategy=strategy, steps=cfg.sample.steps,
                          solver=cfg.sample.solver)
        t1 = time.perf_counter()
        result = generate(ensemble, request)
        png = run.samples_dir / f"{strategy.replace(':', '_')}.png"
        save_outputs(result, request, png, manifest_sha=run.sha256)
        grids[strategy], outputs[strategy] = result.images, png
        logger.info(f"  {strategy:<14} {time.perf_counter() - t1:5.1f}s  {png}  ({usage_summary(result)})")
    figure = run.samples_dir / "strategies.png"
    save_strategy_figure(grids, figure)
    logger.info(f"done in {time.perf_counter() - t0:.0f}s. Everything is in {run_dir}:")
    logger.info(f"  manifest          {run_dir / 'manifest.json'}  (ddm info --run-dir {run_dir})")
    logger.info(f"  experts           {run_dir / 'experts'}/<k>/ (checkpoints, metrics.jsonl, loss.png)")
    logger.info(f"  router            {run_dir / 'router'}")
    logger.info(f"  sample grids      {figure}")
    if failed:
        logger.warning(f"warning: islands {failed} failed and were left out of the ensemble; rerun to retry them")
    return {"figure": figure, **outputs}
