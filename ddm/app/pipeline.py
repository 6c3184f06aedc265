"""`ddm run`: the main job end to end — prepare, train every island, train the router, sample per strategy.

Per routing strategy it writes the unguided grid (`samples/<strategy>.png`) and, for conditioned runs, a guided
grid (`samples/<strategy>_guided.png`, classifier-free guidance at `sample.cfg_scale`) with one row per class, or on
a run conditioned on embeddings one row per condition (`guided_conditions`: a few chosen captions for the captioned
digits, else the first hold-out conditions); `samples/strategies.png` and `samples/strategies_guided.png` put them
side by side.
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
from ddm.data import captions
from ddm.data.prepare import prepare
from ddm.data.run import Run
from ddm.experts.islands import launch_local
from ddm.sampling.ensemble import Ensemble
from ddm.sampling.load import load_ensemble
from ddm.sampling.outputs import load_decoder, save_outputs, usage_summary
from ddm.sampling.request import Request, conditions_sha256, generate
from ddm.train.plots import save_strategy_figure

logger = logging.getLogger(__name__)

GUIDED_PER_CLASS = 8  # images per class (one grid row each) in the guided grids
GUIDED_MAX_CLASSES = 16  # the guided grids show the first classes only beyond this many


def guided_labels(num_classes: int) -> tuple[int, ...]:
    """Class labels of the guided grid: GUIDED_PER_CLASS of each of the first GUIDED_MAX_CLASSES classes, row by
    row."""
    return tuple(int(c) for c in np.repeat(np.arange(min(num_classes, GUIDED_MAX_CLASSES)), GUIDED_PER_CLASS))


# The captioned digits' guided grid: one caption per digit, the nine (thickness, slant) pairs in turn.
GUIDED_CAPTIONS = tuple(captions.caption(d, d % 3, (d // 3) % 3) for d in range(captions.NUM_DIGITS))


def guided_conditions(run: Run) -> tuple[np.ndarray, str] | None:
    """The guided grid's conditions on a run conditioned on embeddings: float32 [rows * GUIDED_PER_CLASS,
    *condition_shape], GUIDED_PER_CLASS of each row's condition, and what the rows are (for the log). The captioned
    digits (`data.conditions: captions`) take GUIDED_CAPTIONS; other runs the first GUIDED_MAX_CLASSES conditions of
    the run's hold-out. None without embeddings, or with no held-out images to take conditions from."""
    shape = run.condition_shape
    if not shape:
        return None
    if run.config.data.conditions == captions.CAPTIONS and shape == (captions.DIM,):
        rows, what = captions.encode(list(GUIDED_CAPTIONS)), "one row per caption: " + ", ".join(GUIDED_CAPTIONS)
    else:
        holdout = run.holdout_set()
        if holdout is None:
            return None
        rows = holdout[2][:GUIDED_MAX_CLASSES]
        what = f"one row per hold-out condition (the first {len(rows)} of the run's held-out images)"
    return np.repeat(np.asarray(rows, np.float32), GUIDED_PER_CLASS, axis=0), what


def guided_request(cfg: Config, strategy: str, labels: tuple[int, ...] | None,
                   conditions: np.ndarray | None) -> Request:
    """The guided grid's request (classifier-free guidance at `sample.cfg_scale`): for class `labels`
    (`guided_labels`), or for the condition embeddings `conditions` (`guided_conditions`), which it names by
    digest."""
    return Request(seed=cfg.sample.seed, n=len(labels if conditions is None else conditions), strategy=strategy,
                   steps=cfg.sample.steps, solver=cfg.sample.solver, labels=labels, cfg_scale=cfg.sample.cfg_scale,
                   conditions_sha256=None if conditions is None else conditions_sha256(conditions))


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
    conditions, rows_are = guided_conditions(run) or (None, "one row per class")
    if run.condition_shape and conditions is None:
        logger.info("no guided grids: the run has no held-out conditions to guide by")
    for strategy in cfg.sample.strategies:
        request = Request(seed=cfg.sample.seed, n=cfg.sample.n, strategy=strategy, steps=cfg.sample.steps,
                          solver=cfg.sample.solver)
        name = strategy.replace(":", "_")
        grids[strategy], outputs[strategy] = _sample(run, ensemble, request, run.samples_dir / f"{name}.png")
        if labels is not None or conditions is not None:
            guided = guided_request(cfg, strategy, labels, conditions)
            guided_grids[f"{strategy} (cfg {cfg.sample.cfg_scale:g})"], outputs[f"{strategy} guided"] = _sample(
                run, ensemble, guided, run.samples_dir / f"{name}_guided.png", ncols=GUIDED_PER_CLASS,
                conditions=conditions)
    figure = run.samples_dir / "strategies.png"
    save_strategy_figure(grids, figure)
    if guided_grids:
        save_strategy_figure(guided_grids, run.samples_dir / "strategies_guided.png", ncols=GUIDED_PER_CLASS)
    logger.info(f"done in {time.perf_counter() - t0:.0f}s. Everything is in {run_dir}:")
    logger.info(f"  manifest          {run_dir / 'manifest.json'}  (ddm info --run-dir {run_dir})")
    logger.info(f"  experts           {run_dir / 'experts'}/<k>/ (checkpoints, metrics.jsonl, loss.png)")
    logger.info(f"  router            {run_dir / 'router'}")
    logger.info(f"  sample grids      {figure}"
                + (f", {run.samples_dir / 'strategies_guided.png'} ({rows_are})" if guided_grids else ""))
    if failed:
        logger.warning(f"warning: islands {failed} failed and were left out of the ensemble; rerun to retry them")
    return {"figure": figure, **outputs}


def _sample(run: Run, ensemble: Ensemble, request: Request, png: Path, ncols: int | None = None,
            conditions: np.ndarray | None = None) -> tuple[np.ndarray, Path]:
    """Generates `request` (with the condition embeddings it names, if any), writes its grid + arrays at `png`, logs
    time and expert usage; (images, png)."""
    t0 = time.perf_counter()
    result = generate(ensemble, request, conditions=conditions)
    npz = save_outputs(result, request, png, manifest_sha=run.sha256, ncols=ncols,
                       decoder=load_decoder(run.config.sample.decoder), conditions=conditions)
    what = request.strategy + ("" if request.cfg_scale is None else " guided")
    logger.info(f"  {what:<21} {time.perf_counter() - t0:5.1f}s  {png}  ({usage_summary(result)})")
    with np.load(npz) as saved:  # what the grid shows: images, decoded latents or the latent visualisation
        return saved["images"], png
