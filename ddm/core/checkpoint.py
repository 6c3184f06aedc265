"""Orbax checkpoints of a training state: periodic async saves, latest-N retention, sharded restore.

A checkpoint step holds two items: `state` (params, EMA params, optimizer state, step, RNG) and `meta` (JSON:
the resolved config and the data-reader position). Orbax writes each step into a temporary directory and
renames it when complete, so a process killed mid-save leaves the previous checkpoint as the latest.
Restoring takes an abstract tree that carries the *current* mesh's shardings, which is what lets a run saved
on 8 devices resume on 4 or 1.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx

from ddm.core.errors import DDMError
from ddm.core.hashing import pytree_sha256
from ddm.core.weights import load_safetensors


@functools.cache
def _type_handlers() -> ocp.type_handlers.TypeHandlerRegistry:
    """Orbax's default type handlers, except that on CPU each replicated array is saved from one replica.

    Orbax's default "replica-parallel" save cuts every replicated array into per-device slices, which on CPU
    compiles one small XLA program per distinct slice shape (about a hundred for a DiT, seconds of start-up)
    to parallelise copies that are host-memory copies anyway. The registry is our handlers' own, so orbax's
    global registry (and anyone else's checkpoints in the process) stay as they are.
    """
    handlers = {ty: ocp.type_handlers.get_type_handler(ty) for ty in ocp.type_handlers.supported_types()}
    if jax.default_backend() == "cpu":
        handlers[jax.Array] = ocp.type_handlers.ArrayHandler(use_replica_parallel=False)
    return ocp.type_handlers.create_type_handler_registry(*handlers.items())


def _pytree_handler() -> ocp.PyTreeCheckpointHandler:
    return ocp.PyTreeCheckpointHandler(type_handler_registry=_type_handlers())


def _save_args(tree):
    return ocp.args.PyTreeSave(tree)


def _restore_args(abstract_tree):
    """Restore `abstract_tree` (ShapeDtypeStructs with shardings) exactly: shapes, dtypes and placement."""
    return ocp.args.PyTreeRestore(item=abstract_tree,
                                  restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_tree))


class Checkpointer:
    """Periodic checkpoints of one training job under `directory`."""

    def __init__(self, directory: str | Path, *, keep: int, every: int):
        self.directory = Path(directory).absolute()
        self.every = every
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.LatestN(keep),
            enable_async_checkpointing=True,
            # A process killed mid-save leaves a temporary directory behind; drop it on the next start.
            cleanup_tmp_directories=True,
            create=True,
        )
        try:
            self.manager = ocp.CheckpointManager(
                self.directory, options=options,
                item_handlers={"state": _pytree_handler(), "meta": ocp.JsonCheckpointHandler()})
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
            args=ocp.args.Composite(state=_save_args(state), meta=ocp.args.JsonSave(meta)),
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
                args=ocp.args.Composite(state=_restore_args(abstract_state), meta=ocp.args.JsonRestore()),
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
    with ocp.Checkpointer(_pytree_handler()) as checkpointer:
        checkpointer.save(Path(path).absolute(), args=_save_args(params), force=True)


def load_params(path: str | Path, abstract_params):
    """Reads parameters written by `save_params` into the structure/shardings of `abstract_params`."""
    path = Path(path).absolute()
    if not path.exists():
        raise DDMError(f"no parameters at {path}")
    try:
        with ocp.Checkpointer(_pytree_handler()) as checkpointer:
            return checkpointer.restore(path, args=_restore_args(abstract_params))
    except (ValueError, KeyError, FileNotFoundError) as err:
        raise DDMError(f"parameters at {path} do not fit this model: {str(err).splitlines()[0]}") from None


def abstract_with_shardings(tree, shardings):
    """ShapeDtypeStructs of `tree` carrying `shardings`, as orbax restore wants."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


# ---------------------------------------------------------------------------------------------------------
# Pinned models: a finished component's `{"ema": params, "rest": buffers}`, checked against its SHA-256.
# ---------------------------------------------------------------------------------------------------------


def abstract_final(make_model: Callable[[nnx.Rngs], nnx.Module]):
    """(graphdef, abstract {"ema", "rest"}) of a model on the first local device, without allocating it."""
    model = nnx.eval_shape(lambda: make_model(nnx.Rngs(params=0)))
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def spec(x):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device)

    abstract = {"ema": jax.tree.map(spec, nnx.state(model, nnx.Param)),
                "rest": jax.tree.map(spec, nnx.state(model, nnx.Not(nnx.Param)))}
    return nnx.graphdef(model), abstract


def load_pinned_tree(path: str | Path, sha256: str | None, make_model: Callable[[nnx.Rngs], nnx.Module],
                     what: str):
    """(graphdef, {"ema", "rest"}) saved at `path`, after checking its `pytree_sha256` equals `sha256`.

    `path` is the trainer's orbax `final/` checkpoint, or a `.safetensors` file written by `ddm export`
    (`ddm.core.weights`); both are checked against the same pin. A corrupted or tampered file (any byte
    changed) is a DDMError naming `what` and `path`: it never reaches sampling or evaluation.
    """
    graphdef, abstract = abstract_final(make_model)
    try:
        if str(path).endswith(".safetensors"):
            tree = load_safetensors(path, abstract)
        else:
            tree = load_params(path, abstract)
    except DDMError:
        raise
    except Exception as err:  # noqa: BLE001 - a damaged file can fail anywhere inside orbax/tensorstore
        raise DDMError(f"{what} checkpoint {path} is corrupted: {str(err).splitlines()[0][:200]}") from None
    actual = pytree_sha256(jax.device_get(tree))
    if actual != sha256:
        raise DDMError(f"{what} checkpoint {path} does not match the manifest SHA-256 "
                       f"(expected {str(sha256)[:16]}, got {actual[:16]}): refusing to load")
    return graphdef, tree


def load_pinned(path: str | Path, sha256: str | None, make_model: Callable[[nnx.Rngs], nnx.Module],
                what: str) -> nnx.Module:
    """The EMA model saved at `path` by the trainer (or exported), checked against its pin (`load_pinned_tree`)."""
    graphdef, tree = load_pinned_tree(path, sha256, make_model, what)
    return nnx.merge(graphdef, tree["ema"], tree["rest"])
