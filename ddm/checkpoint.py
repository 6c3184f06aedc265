"""Orbax checkpoints of a training state: periodic async saves, latest-N retention, sharded restore.

A checkpoint step holds two items: `state` (params, EMA params, optimizer state, step, RNG) and `meta` (JSON:
the resolved config and the data-reader position). Orbax writes each step into a temporary directory and
renames it when complete, so a process killed mid-save leaves the previous checkpoint as the latest.
Restoring takes an abstract tree that carries the *current* mesh's shardings, which is what lets a run saved
on 8 devices resume on 4 or 1.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from ddm.errors import DDMError


@functools.cache
def _configure_array_handler() -> None:
    """On CPU, saves each replicated array from one replica instead of slicing it across replicas.

    Orbax's default "replica-parallel" save cuts every replicated array into per-device slices, which on CPU
    compiles one small XLA program per distinct slice shape (about a hundred for a DiT, seconds of start-up)
    to parallelise copies that are host-memory copies anyway. Called before any checkpoint is written; cached
    because registering the handler once per process is enough.
    """
    if jax.default_backend() != "cpu":
        return
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)


class Checkpointer:
    """Periodic checkpoints of one training job under `directory`."""

    def __init__(self, directory: str | Path, *, keep: int, every: int):
        self.directory = Path(directory).absolute()
        self.every = every
        _configure_array_handler()
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.LatestN(keep),
            enable_async_checkpointing=True,
            # A process killed mid-save leaves a temporary directory behind; drop it on the next start.
            cleanup_tmp_directories=True,
            create=True,
        )
        try:
            self.manager = ocp.CheckpointManager(self.directory, options=options)
        except (OSError, ValueError) as err:
            raise DDMError(f"cannot open checkpoint directory {self.directory}: {err}") from None

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, meta: dict, *, force: bool = False) -> bool:
        """Starts an async save of `state` at `step` (every `every` steps, or now if `force`)."""
        if not force and step % self.every:
            return False
        return self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=force,
        )

    def restore(self, abstract_state, step: int | None = None):
        """(state, meta) of `step` (default: latest), placed onto the shardings carried by `abstract_state`."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise DDMError(f"no checkpoint in {self.directory}")
        try:
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()),
            )
        except (ValueError, KeyError, FileNotFoundError) as err:
            raise DDMError(f"checkpoint {self.directory}/{step} does not fit this model: "
                           f"{str(err).splitlines()[0]}") from None
        return restored["state"], restored["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def save_params(path: str | Path, params) -> None:
    """Writes a finished model's parameters (a pytree) as one standalone orbax checkpoint at `path`."""
    _configure_array_handler()
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(Path(path).absolute(), params, force=True)


def load_params(path: str | Path, abstract_params):
    """Reads parameters written by `save_params` into the structure/shardings of `abstract_params`."""
    path = Path(path).absolute()
    if not path.exists():
        raise DDMError(f"no parameters at {path}")
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            return checkpointer.restore(path, abstract_params)
    except (ValueError, KeyError, FileNotFoundError) as err:
        raise DDMError(f"parameters at {path} do not fit this model: {str(err).splitlines()[0]}") from None


def abstract_with_shardings(tree, shardings):
    """ShapeDtypeStructs of `tree` carrying `shardings`, as orbax restore wants."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
