"""Loading finished components (experts, router, monolith) pinned by their SHA-256 in the manifest.

A component ships `{"ema": params, "rest": buffers}` written by the trainer. We restore it, hash it with the
canonical `pytree_sha256`, and refuse to use it unless the hash equals the manifest's: a corrupted or tampered
checkpoint (any byte changed) never reaches sampling.
"""

from __future__ import annotations

from typing import Callable

import jax
from flax import nnx

from data import manifest as mf
from ddm.checkpoint import load_params
from ddm.errors import DDMError
from ddm.hashing import pytree_sha256


def abstract_final(make_model: Callable[[nnx.Rngs], nnx.Module]):
    """(graphdef, abstract {"ema", "rest"}) of a model, without allocating its parameters."""
    model = nnx.eval_shape(lambda: make_model(nnx.Rngs(params=0)))
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def spec(x):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device)

    abstract = {"ema": jax.tree.map(spec, nnx.state(model, nnx.Param)),
                "rest": jax.tree.map(spec, nnx.state(model, nnx.Not(nnx.Param)))}
    return nnx.graphdef(model), abstract


def load_component(run_dir: str, entry: dict | None, make_model: Callable[[nnx.Rngs], nnx.Module],
                   what: str) -> nnx.Module:
    """The EMA model of a finished component, after checking its SHA-256 against `entry["sha256"]`."""
    if not entry or entry.get("status") != "finished":
        raise DDMError(f"{what} is not trained (status: {(entry or {}).get('status', 'missing')})")
    path = mf.resolve(run_dir, entry["path"])
    graphdef, abstract = abstract_final(make_model)
    try:
        tree = load_params(path, abstract)
    except DDMError:
        raise
    except Exception as err:  # noqa: BLE001 - a damaged file can fail anywhere inside orbax/tensorstore
        raise DDMError(f"{what} checkpoint {path} is corrupted: {str(err).splitlines()[0][:200]}") from None
    actual = pytree_sha256(jax.device_get(tree))
    if actual != entry.get("sha256"):
        raise DDMError(f"{what} checkpoint {path} does not match the manifest SHA-256 "
                       f"(expected {str(entry.get('sha256'))[:16]}, got {actual[:16]}): refusing to load")
    return nnx.merge(graphdef, tree["ema"], tree["rest"])
