"""Metrics writers beside `metrics.jsonl`: TensorBoard event files and Weights & Biases, both optional.

The trainer hands each log row and each sample grid to `Writers`, which fans them out to whatever the
component's `TrainConfig` asks for (`train.tensorboard`, `train.wandb_project`). Both backends are optional
packages, imported only when asked for (TensorBoard through `tensorboardX`: `pip install -e '.[tb]'`; W&B:
`pip install wandb`, and `WANDB_MODE=offline` runs without a network). A config that asks for one that is
not installed is a one-line DDMError before the first step.

Tags: `train/<name>` for the step's metrics, `holdout/<name>` for held-out ones, `speed/images_per_s`, and
`samples` for the grid. Only process 0 of a multi-host island writes (the trainer opens no writers elsewhere).
"""

from __future__ import annotations

import importlib.util
import logging
import secrets
from pathlib import Path
from typing import Protocol

import numpy as np

from ddm.core.errors import DDMError

logger = logging.getLogger(__name__)

HOLDOUT_PREFIX = "holdout_"  # metrics row keys of held-out evaluations (ddm.train.monitor)
NOT_SCALARS = ("step", "time")


class MetricWriter(Protocol):
    def scalars(self, step: int, values: dict[str, float]) -> None:
        """values: tag -> number."""

    def image(self, step: int, tag: str, image: np.ndarray) -> None:
        """image: uint8 [H, W, C], C = 1 or 3."""

    def close(self) -> None: ...


def scalar_tags(row: dict) -> dict[str, float]:
    """A metrics row (`{"step", "loss", "holdout_loss", "lr", ...}`) as tag -> value for the writers."""
    tags = {}
    for key, value in row.items():
        if key in NOT_SCALARS or not isinstance(value, (int, float)):
            continue
        if key.startswith(HOLDOUT_PREFIX):
            tags[f"holdout/{key[len(HOLDOUT_PREFIX):]}"] = float(value)
        elif key == "images_per_s":
            tags["speed/images_per_s"] = float(value)
        else:
            tags[f"train/{key}"] = float(value)
    return tags


class TensorBoardWriter:
    """Event files under `logdir` through tensorboardX (no TensorFlow needed)."""

    def __init__(self, logdir: Path, start_step: int):
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise DDMError("train.tensorboard=true needs tensorboardX: pip install -e '.[tb]'") from None
        # A resumed run starts a new event file; purge_step makes TensorBoard drop what an interrupted attempt
        # logged after the checkpoint it resumes from, so the curves have no doubled segments.
        self._writer = SummaryWriter(str(logdir), purge_step=start_step)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self._writer.add_scalar(tag, value, step)

    def image(self, step: int, tag: str, image: np.ndarray) -> None:
        self._writer.add_image(tag, image, step, dataformats="HWC")

    def close(self) -> None:
        self._writer.close()


class WandbWriter:
    """One W&B run per component; its id is kept in `directory/wandb_id` so a resumed job continues it."""

    def __init__(self, project: str, name: str, directory: Path, config: dict | None):
        try:
            import wandb
        except ImportError:
            raise DDMError(f"train.wandb_project={project!r} needs the wandb package: pip install wandb") from None
        self._wandb = wandb
        id_file = directory / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(8)
        id_file.write_text(run_id + "\n")
        try:
            self._run = wandb.init(project=project, name=name, id=run_id, resume="allow", dir=str(directory),
                                   config=config)
        except Exception as err:  # noqa: BLE001 - wandb raises its own error types (login, network, ...)
            raise DDMError(f"wandb could not start ({str(err).splitlines()[0][:200]}); "
                           "WANDB_MODE=offline logs without a network") from None

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self._run.log(values, step=step)

    def image(self, step: int, tag: str, image: np.ndarray) -> None:
        self._run.log({tag: self._wandb.Image(image[..., 0] if image.shape[-1] == 1 else image)}, step=step)

    def close(self) -> None:
        self._run.finish()


class Writers:
    """Fans rows and images out to every open writer; `Writers([])` writes nothing."""

    def __init__(self, writers: list[MetricWriter]):
        self.writers = writers

    def row(self, step: int, row: dict) -> None:
        values = scalar_tags(row)
        for writer in self.writers:
            writer.scalars(step, values)

    def image(self, step: int, tag: str, image: np.ndarray) -> None:
        for writer in self.writers:
            writer.image(step, tag, image)

    def close(self) -> None:
        for writer in self.writers:
            writer.close()


def check_available(*, tensorboard: bool, wandb_project: str | None) -> None:
    """DDMError now, before a job writes anything, if a writer the config asks for is not installed."""
    if tensorboard and importlib.util.find_spec("tensorboardX") is None:
        raise DDMError("train.tensorboard=true needs tensorboardX: pip install -e '.[tb]'")
    if wandb_project and importlib.util.find_spec("wandb") is None:
        raise DDMError(f"train.wandb_project={wandb_project!r} needs the wandb package: pip install wandb")


def open_writers(*, tensorboard: bool, wandb_project: str | None, out_dir: Path, name: str, start_step: int,
                 config: dict | None = None) -> Writers:
    """The writers a component's config asks for: TensorBoard in `out_dir/tb`, W&B run `name` in `project`."""
    writers: list[MetricWriter] = []
    try:
        if tensorboard:
            writers.append(TensorBoardWriter(out_dir / "tb", start_step))
            logger.info(f"{name}: TensorBoard events in {out_dir / 'tb'} (tensorboard --logdir {out_dir / 'tb'})")
        if wandb_project:
            writers.append(WandbWriter(wandb_project, name, out_dir, config))
    except BaseException:
        Writers(writers).close()
        raise
    return Writers(writers)
