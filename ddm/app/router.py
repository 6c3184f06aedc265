"""`ddm train-router`: the router on the run's shards, or on images its experts draw (`router.source`)."""

from __future__ import annotations

from pathlib import Path

from ddm.data.run import Run
from ddm.router.train import train_router
from ddm.sampling.router_set import draw_router_set
from ddm.train.trainer import TrainResult


def train_router_command(run_dir: str | Path, overrides: list[str] | tuple[str, ...] = (), *,
                         progress: bool = False) -> TrainResult:
    """Trains the run's router from `router.source`: "data" reads every shard; "experts" first has each expert
    draw its cluster's rows (`ddm.sampling.router_set`), so no shard is read."""
    run = Run.open(run_dir, overrides)
    training_set = draw_router_set(run) if run.config.router.source == "experts" else None
    return train_router(run_dir, overrides, progress=progress, training_set=training_set)
