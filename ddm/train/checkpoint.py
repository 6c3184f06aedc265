"""Orbax checkpoints of a training state: periodic async saves, latest-N retention, sharded restore.

A checkpoint step holds two items: `state` (params, EMA params, optimizer state, step, RNG) and `meta` (JSON:
the resolved config and the data-reader position). Orbax writes each step into a temporary directory and
renames it when complete, so a process killed mid-save leaves the previous checkpoint as the latest.
Restoring takes an abstract tree that carries the *current* mesh's shardings, which is what lets a run saved
on 8 devices resume on 4 or 1.

Every step carries a digest of its files (`ddm_digest.json`: the SHA-256 of each file). Orbax calls
`Checkpointer._digest_saved_step` once every process has written the step completely and before it commits
it (renames the temporary directory), so a committed step always holds the digest of exactly its own complete
bytes, and a half-written step never gets one. Resuming verifies the latest step against its digest: a step
that does not match (a flipped bit, a truncated or missing file) or has no digest is set aside with a warning
and the previous intact step is used; when no step is intact the resume is a one-line error naming the step.
A changed byte is never trained on silently.

The audit chain (an island's proof of work, checked by `ddm.verify.audit`): the digest of the whole training
state (`pytree_sha256` of params, EMA, optimizer state, buffers, step, RNG) at steps 0, d, 2d, ..., S, folded into
one hash chain whose head the island commits to in expert.json, and the states of every `keep`-th entry (and the
last) kept as `audit/states/<step>.safetensors`, each pinned by its chain digest. The trainer records it
(`AuditPolicy`); this module holds its format.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from ddm.core import documents
from ddm.core.errors import DDMError
from ddm.core.files import atomic_write, temporary_name
from ddm.core.hashing import file_sha256, pytree_sha256
from ddm.core.machine import cpu_model
from ddm.core.schema import Hex, Int, ListOf, Obj, Str
from ddm.core.weights import load_safetensors, tensor_name

logger = logging.getLogger(__name__)

DIGEST_FILE = "ddm_digest.json"
DIGEST_FORMAT = "ddm-checkpoint-digest/v1"
# Orbax's own bookkeeping at the top of a step, rewritten after the digest (the commit time, the commit marker);
# it holds no state, and a damaged copy fails orbax's restore, which is then treated like a digest mismatch.
NOT_DIGESTED = ("_CHECKPOINT_METADATA", "commit_success.txt", DIGEST_FILE)
REJECTED_DIR = "checkpoints-rejected"  # beside the checkpoints folder: steps that failed verification


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


# ---------------------------------------------------------------------------------------------------------
# Step digests.
# ---------------------------------------------------------------------------------------------------------


def step_file_digests(step_dir: Path) -> dict[str, str]:
    """{path relative to the step, POSIX: SHA-256} of every file of a checkpoint step but orbax's top-level
    bookkeeping and the digest itself."""
    return {p.relative_to(step_dir).as_posix(): file_sha256(p) for p in sorted(step_dir.rglob("*"))
            if p.is_file() and not (p.parent == step_dir and p.name in NOT_DIGESTED)}


def write_step_digest(step_dir: Path, step: int) -> None:
    """Records the digest of the (complete) step at `step_dir` inside it."""
    record = {"format": DIGEST_FORMAT, "step": step, "files": step_file_digests(step_dir)}
    atomic_write(step_dir / DIGEST_FILE, json.dumps(record, indent=1) + "\n")


def step_problem(step_dir: Path, step: int) -> str | None:
    """Why the checkpoint step at `step_dir` cannot be trusted (None when every file matches its digest)."""
    try:
        record = json.loads((step_dir / DIGEST_FILE).read_text())
    except FileNotFoundError:
        return "it has no digest: written by an older ddm, or altered"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return f"its {DIGEST_FILE} is unreadable"
    files = record.get("files") if isinstance(record, dict) else None
    if (record.get("format") != DIGEST_FORMAT or record.get("step") != step or not isinstance(files, dict)
            or not all(isinstance(v, str) for v in files.values())):
        return f"its {DIGEST_FILE} is not a digest of step {step}"
    actual = step_file_digests(step_dir)
    for name in sorted(set(files) | set(actual)):
        if name not in actual:
            return f"{name} is missing"
        if name not in files:
            return f"{name} is not in its digest"
        if actual[name] != files[name]:
            return f"{name} does not match its digest"
    return None


class Checkpointer:
    """Periodic checkpoints of one training job under `directory`, each step verified by its digest on restore."""

    def __init__(self, directory: str | Path, *, keep: int, every: int):
        self.directory = Path(directory).absolute()
        self.every = every
        self._saving: int | None = None  # the step orbax is writing (one save in flight at a time)
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.LatestN(keep),
            enable_async_checkpointing=True,
            async_options=ocp.AsyncOptions(post_finalization_callback=self._digest_saved_step),
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
        # Orbax waits for the previous save before starting this one anyway; waiting here first is free and
        # keeps `_saving` naming the step whose digest the callback writes.
        self.manager.wait_until_finished()
        self._saving = step
        return self.manager.save(
            step,
            args=ocp.args.Composite(state=_save_args(state), meta=ocp.args.JsonSave(meta)),
            force=force,
        )

    def _digest_saved_step(self) -> None:
        """Orbax's post-finalization callback: on the primary process, once every process has written step
        `_saving` completely, before the step is committed. On local disks the step is still in its temporary
        directory (committed by a rename after this); on object stores it is in place (committed by a marker
        file written after this)."""
        step = self._saving
        temporary = self.directory / f"{step}{ocp.utils.TMP_DIR_SUFFIX}"
        step_dir = temporary if temporary.is_dir() else self.directory / str(step)
        if not step_dir.is_dir():
            raise DDMError(f"checkpoint step {step} is not in {self.directory}: cannot record its digest")
        write_step_digest(step_dir, step)

    def restore_latest(self, abstract_state, what: str):
        """(state, meta, step) of the latest intact step, placed onto the shardings of `abstract_state`; None
        when there is no checkpoint.

        Steps newer than it that fail their digest are moved to `checkpoints-rejected/` beside the checkpoints
        (a warning names each and why), so training goes on from the intact step and saves those steps anew.
        When no step is intact nothing is moved and the error names the latest step and its problem.
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        rejected, good = [], None
        for step in steps:
            problem = step_problem(self.directory / str(step), step)
            if problem is None:
                good = step
                break
            rejected.append((step, problem))
        if good is None and rejected:
            step, problem = rejected[0]
            raise DDMError(f"{what}: checkpoint step {step} in {self.directory} failed verification ({problem}) "
                           f"and no earlier step is intact: remove {self.directory} to train from scratch")
        if rejected:
            self._set_aside(rejected, good, what)
        if good is None:
            return None
        return (*self.restore(abstract_state, good), good)

    def _set_aside(self, rejected: list[tuple[int, str]], good: int, what: str) -> None:
        aside = self.directory.parent / REJECTED_DIR
        for step, problem in rejected:
            target = aside / str(step)
            for n in range(1, 1000):
                if not target.exists():
                    break
                target = aside / f"{step}-{n}"
            logger.warning(f"{what}: checkpoint step {step} failed verification ({problem}); resuming from step "
                           f"{good}, the rejected step is kept in {target}")
            if jax.process_index() == 0:
                aside.mkdir(parents=True, exist_ok=True)
                (self.directory / str(step)).rename(target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("ddm-checkpoint-set-aside")
        self.manager.reload()

    def restore(self, abstract_state, step: int):
        """(state, meta) of `step` as saved, placed onto the shardings carried by `abstract_state` (not verified:
        `restore_latest` verifies first)."""
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


# ---------------------------------------------------------------------------------------------------------
# The audit chain: a digest of the whole state every few steps, and the states an audit starts from.
# ---------------------------------------------------------------------------------------------------------

AUDIT_DIR = "audit"  # in a job's output folder: CHAIN_FILE and STATES_DIR
CHAIN_FILE = "chain.json"
STATES_DIR = "states"  # <step>.safetensors: the full training state at a chain entry
CHAIN_FORMAT = "ddm-audit-chain/v1"
STATE_FORMAT = "ddm-train-state/v1"  # a kept state's safetensors metadata
MAX_CHAIN_ENTRIES = 1_000_000  # far beyond any policy; bounds what a reader accepts

CHAIN_SCHEMA = Obj(
    {"format": Str(),
     "steps": Int(min=1),  # S: the steps the chain covers
     "every": Int(min=1),  # d: steps between entries
     "keep": Int(min=1),  # every keep-th entry's state is kept (and the last)
     "digests": ListOf(Hex(64), min_len=2, max_len=MAX_CHAIN_ENTRIES)},  # one per step of `chain_steps`
    closed=True)


@dataclasses.dataclass(frozen=True)
class AuditPolicy:
    """What an island records for audits. `entries`: about how many intervals the chain cuts training into (a
    digest every max(1, S // entries) steps); an audit of m one-interval segments replays m / entries of the
    training and misses a lazy stretch of fraction f with probability about (1 - f)^m. `keep`: every keep-th
    entry's state is kept on disk (and the first and last); the others are regenerated from the nearest kept
    one when a challenge names them."""

    entries: int = 320
    keep: int = 16

    def __post_init__(self) -> None:
        if self.entries < 1 or self.keep < 1:
            raise DDMError(f"audit policy entries and keep must be >= 1, got {self.entries}, {self.keep}")

    def every(self, steps: int) -> int:
        return max(1, steps // self.entries)


def chain_steps(steps: int, every: int) -> list[int]:
    """The steps whose state the chain digests: 0, every, 2 every, ..., and `steps` itself (also when `every`
    does not divide it). Entry i is the state before step chain_steps[i]; interval i runs to entry i + 1."""
    return [*range(0, steps, every), steps]


def chain_head(steps: int, every: int, digests: list[str]) -> str:
    """SHA-256 (hex) of the hash chain h_0 = H("ddm-audit-chain:v1:{steps}:{every}"), h_{i+1} = H(h_i ||
    "{step_i}:{digest_i}"): what expert.json commits to. Any changed, missing, added or reordered digest
    changes it; the prefix heads are commitments to the chain so far."""
    at = chain_steps(steps, every)
    if len(digests) != len(at):
        raise DDMError(f"an audit chain of {steps} steps, one entry every {every}, has {len(at)} digests, not "
                       f"{len(digests)}")
    head = hashlib.sha256(f"{CHAIN_FORMAT}:{steps}:{every}".encode("ascii")).digest()
    for step, digest in zip(at, digests):
        head = hashlib.sha256(head + f"{step}:{digest}".encode("ascii")).digest()
    return head.hex()


def kept_entries(count: int, keep: int) -> list[int]:
    """The entries (of `count`) whose states an island keeps: every keep-th one and the last."""
    return sorted({*range(0, count, keep), count - 1})


def chain_document(steps: int, every: int, keep: int, digests: list[str]) -> dict:
    return {"format": CHAIN_FORMAT, "steps": steps, "every": every, "keep": keep, "digests": list(digests)}


def write_chain(out_dir: Path, steps: int, every: int, keep: int, digests: list[str]) -> dict:
    """Writes OUT/audit/chain.json; returns the summary expert.json carries: every, entries, keep, head and the
    `replay_environment` it was recorded in."""
    documents.write(out_dir / AUDIT_DIR / CHAIN_FILE, chain_document(steps, every, keep, digests))
    return {"every": every, "entries": len(digests), "keep": keep, "head": chain_head(steps, every, digests),
            "environment": replay_environment()}


def replay_environment() -> dict:
    """What decides the bits of a training step besides its inputs, as far as this process can tell: backend,
    device kind and count, processes, the CPU cores it may use (XLA:CPU partitions its work by them: a replay
    on 1 core of a run trained on 2 differs), on the CPU backend the CPU model (XLA:CPU compiles for its
    instruction set), jax / jaxlib versions and XLA flags. A replay is bitwise only where it matches."""
    import jaxlib

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    device = jax.devices()[0]
    return {"backend": device.platform, "device_kind": device.device_kind, "devices": jax.device_count(),
            "processes": jax.process_count(), "cpu_cores": cores, "jax": jax.__version__,
            "jaxlib": jaxlib.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""),
            **({"cpu": cpu_model()} if device.platform == "cpu" else {})}


def state_path(out_dir: Path, step: int) -> Path:
    return out_dir / AUDIT_DIR / STATES_DIR / f"{step}.safetensors"


def save_state(path: Path, host_state) -> None:
    """Writes a host copy of a training state as one safetensors file (tensors named by key path, as
    `ddm.core.weights` names them; scalars such as the step keep their shape []), through a temporary name +
    rename. `load_state` reads it back into the trainer's tree."""
    from safetensors.numpy import save_file

    flat = {}
    for key, leaf in jax.tree_util.tree_flatten_with_path(host_state)[0]:
        name = tensor_name(key)
        if name in flat:
            raise DDMError(f"two state leaves share the tensor name {name!r}")
        flat[name] = np.asarray(leaf)
    tmp = temporary_name(path)
    try:
        save_file(flat, str(tmp), metadata={"format": STATE_FORMAT})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_state(path: Path, abstract_state, digest: str) -> tuple[object, str | None]:
    """(state, None) when the file at `path` holds a state whose `pytree_sha256` is `digest`, placed onto the
    shardings of `abstract_state`; (None, why not) when it holds another state. DDMError when it is not a
    state of this model at all (unreadable, other tensors)."""
    state = load_safetensors(path, abstract_state)
    actual = pytree_sha256(jax.device_get(state))
    if actual != digest:
        return None, f"its digest is {actual[:16]}, the chain's {digest[:16]}"
    return state, None
