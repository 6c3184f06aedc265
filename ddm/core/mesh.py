"""The island's device mesh (data, fsdp) and the sharding rules, kept as data.

Rules: the batch is split over both axes (every device gets B / D rows); a parameter (and its optimizer
moments and EMA copy) is split over `fsdp` along its largest dimension that divides evenly, unless it is small
enough that gathering it would cost more than storing it everywhere.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ddm.core.errors import DDMError

AXES = ("data", "fsdp")
BATCH_AXES = AXES  # batch rows are split over every device of the mesh
# Parameters with fewer elements than this stay replicated (biases, norms, small embeddings).
MIN_SHARDED_SIZE = 2**12


def make_mesh(data: int = -1, fsdp: int = 1) -> Mesh:
    """A (data, fsdp) mesh over all devices of the job (every process); `data=-1` takes what fsdp leaves."""
    n = jax.device_count()
    if fsdp < 1 or n % fsdp:
        raise DDMError(f"mesh fsdp={fsdp} does not divide the {n} devices")
    if data == -1:
        data = n // fsdp
    if data * fsdp != n:
        raise DDMError(f"mesh ({data} x {fsdp}) does not use exactly the {n} devices")
    # Auto axes: shardings are given at jit boundaries and XLA propagates them inside.
    axis_types = (AxisType.Auto, AxisType.Auto)
    mesh = jax.make_mesh((data, fsdp), AXES, axis_types=axis_types)
    if not _process_major(mesh):
        # The batch is split over the flattened mesh and every process reads rows
        # [p * B / P, (p + 1) * B / P) of it, so process p's devices must be the p-th block of the flattening.
        devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
        mesh = Mesh(np.array(devices, dtype=object).reshape(data, fsdp), AXES, axis_types=axis_types)
    return mesh


def _process_major(mesh: Mesh) -> bool:
    """Whether the flattened mesh lists process 0's devices first, then process 1's, and so on."""
    owners = [d.process_index for d in mesh.devices.reshape(-1)]
    return owners == sorted(owners)


def fsdp_spec(shape: tuple[int, ...], fsdp: int) -> P:
    """PartitionSpec for one parameter: shard its largest evenly divisible dimension over `fsdp`."""
    if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < MIN_SHARDED_SIZE:
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp == 0:
            spec = [None] * len(shape)
            spec[dim] = "fsdp"
            return P(*spec)
    return P()


def state_shardings(abstract_state, mesh: Mesh):
    """NamedShardings for a pytree of arrays / ShapeDtypeStructs under the FSDP rule."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), fsdp)), abstract_state)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over every device."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_batch(batch_size: int, mesh: Mesh) -> None:
    if batch_size % mesh.size:
        raise DDMError(f"batch size {batch_size} is not divisible by the {mesh.size} devices of the mesh")
