"""Loading finished components (experts, router, monolith) pinned by their SHA-256 in the manifest.

A component ships `{"ema": params, "rest": buffers}` written by the trainer. We restore it, hash it with the
canonical `pytree_sha256`, and refuse to use it unless the hash equals the manifest's: a corrupted or tampered
checkpoint (any byte changed) never reaches sampling.
"""

from __future__ import annotations

import functools
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


def load_run(run_dir: str, overrides: list[str] | tuple[str, ...] = (), *, with_router: bool = True):
    """Everything sampling needs from a run directory: (Ensemble, Config, manifest).

    Experts that are not finished are left out (the ensemble masks them and warns); the router is required
    unless `with_router` is False (then only `oracle`/`single:k` strategies work).
    """
    from ddm.ensemble import Ensemble
    from experts.train import make_dit, run_config

    manifest = mf.read_manifest(run_dir)
    cfg = run_config(manifest, overrides)
    image_shape = tuple(manifest["dataset"]["image_shape"])
    make_expert = functools.partial(make_dit, cfg.expert.model, image_shape)
    experts = manifest.get("experts", {})
    states, graphdef = [], None
    for cluster in manifest["clusters"]:
        entry = experts.get(str(cluster["id"]))
        if not entry or entry.get("status") != "finished":
            states.append(None)
            continue
        model = load_component(run_dir, entry, make_expert, f"expert {cluster['id']}")
        graphdef, state = nnx.split(model)
        states.append(state)
    if graphdef is None:
        raise DDMError(f"no expert of {run_dir} is trained yet: run `ddm train-islands --run-dir {run_dir}`")

    def expert_apply(state, x, t, y):
        return nnx.merge(graphdef, state)(x, t, y)

    router_apply = router_state = None
    if with_router:
        router_apply, router_state = load_router(run_dir, manifest, cfg)
    ensemble = Ensemble(expert_apply, states, router_apply, router_state, image_shape=image_shape,
                        num_classes=cfg.expert.model.num_classes)
    return ensemble, cfg, manifest


def load_router(run_dir: str, manifest: dict, cfg):
    from router.train import router_factory

    entry = manifest.get("router")
    if not entry or entry.get("status") != "finished":
        raise DDMError(f"the router of {run_dir} is not trained: run `ddm train-router --run-dir {run_dir}`")
    if entry.get("num_clusters") != len(manifest["clusters"]):
        raise DDMError(f"router was trained for {entry.get('num_clusters')} clusters but the manifest has "
                       f"{len(manifest['clusters'])}")
    model = load_component(run_dir, entry, router_factory(manifest, cfg), "router")
    graphdef, state = nnx.split(model)

    def router_apply(state, x, t, y):
        return nnx.merge(graphdef, state)(x, t)

    return router_apply, state
