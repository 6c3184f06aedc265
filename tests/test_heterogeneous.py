"""Heterogeneous experts: an island trains its own `expert.model` within the plan's data interface.

One digits run (K=2, a few steps) whose island 0 trains the plan's `micro` DiT in RUN/experts/0 and island 1
a `tiny` DiT (`train-expert --island ... --set expert.model.preset=tiny`) that `ddm assemble` admits. The
routed ensemble runs each architecture with its own program; the pure-function tests use randomly initialised
experts (the identities hold for any weights).
"""

from __future__ import annotations

import functools
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import fresh_run

from ddm.app import cli
from ddm.core import flow
from ddm.core.documents import digest
from ddm.core.errors import DDMError
from ddm.data.run import Run
from ddm.experts.assemble import check_expert
from ddm.sampling.ensemble import Ensemble
from ddm.sampling.load import load_ensemble

SETS = ["expert.train.steps=4", "expert.train.batch_size=16", "expert.train.warmup_steps=1",
        "expert.train.checkpoint_every=4", "expert.train.log_every=4", "router.train.steps=4",
        "router.train.batch_size=16", "router.train.warmup_steps=1", "router.train.checkpoint_every=4",
        "router.train.log_every=4"]
FLAGS = [a for s in SETS for a in ("--set", s)]


@pytest.fixture(scope="module")
def het(tmp_path_factory):
    """(run dir, island 1's OUT): island 0 the plan's micro DiT, island 1 its own tiny one, and a router."""
    run = fresh_run(tmp_path_factory, "het")
    assert cli.main(["train-expert", "--run-dir", str(run), "--cluster", "0", "--no-progress", *FLAGS]) == 0
    out = tmp_path_factory.mktemp("island1") / "out"
    assert cli.main(["train-expert", "--island", str(run / "islands" / "1"), "--out", str(out), "--no-progress",
                     *FLAGS, "--set", "expert.model.preset=tiny"]) == 0
    assert cli.main(["assemble", "--run-dir", str(run), str(out), *FLAGS]) == 0  # weights checked from the files
    assert cli.main(["train-router", "--run-dir", str(run), "--no-progress", *FLAGS]) == 0
    return run, out


@pytest.fixture(scope="module")
def het_ensemble(het):
    return load_ensemble(het[0])


def test_assemble_admits_an_island_model_and_refuses_one_that_changes_the_data_interface(het, tmp_path):
    run_dir, out = het
    run = Run.open(run_dir, SETS)
    assert [run.expert(k)["model"]["preset"] for k in (0, 1)] == ["micro", "tiny"]
    assert run.expert(1)["model"]["num_classes"] == run.num_classes == 10

    def forged(name, change):
        folder = tmp_path / name
        shutil.copytree(out, folder)
        record = json.loads((folder / "expert.json").read_text())
        change(record["model"])
        record["model_digest"] = digest(record["model"])
        record["config_digest"] = digest({"model": record["model"], "train": record["train"]})
        (folder / "expert.json").write_text(json.dumps(record))
        return folder

    cases = [("classes", lambda m: m.update(num_classes=3), "expert.model.num_classes=3, the plan has 10"),
             ("patch", lambda m: m.update(patch_size=3), "not divisible by the patch size 3"),
             ("partial", lambda m: m.pop("remat"), "its model block gives expert.model.remat=absent"),
             ("unknown", lambda m: m.update(preset="huge"), "model.preset='huge' is not one of"),
             # a model block that names another architecture than the weights it hands back
             ("weights", lambda m: m.update(preset="micro"), "do not fit this model")]
    for name, change, needle in cases:
        with pytest.raises(DDMError) as err:
            check_expert(run, forged(name, change))
        assert needle in str(err.value) and "\n" not in str(err.value), (name, str(err.value))


def test_a_two_preset_ensemble_samples_and_single_k_is_that_experts_own_solve(het_ensemble):
    ens = het_ensemble
    assert ens.heterogeneous and ens.apply_of(0) is not ens.apply_of(1)
    with pytest.raises(DDMError, match="do not stack"):
        _ = ens.stacked_params
    for strategy in ("prior", "full", "top1"):
        result = ens.sample(4, strategy, steps=2, seed=1, y=3, cfg_scale=2.0)
        assert result.images.shape == (4, 8, 8, 1) and np.isfinite(result.x).all(), strategy
    # The server's merged path: a request among others gets its lone floats (the fixed strategies' chunks).
    merged = ens.sample_rows([(7, 3), (1, 4)], "prior", steps=2, y=[5, 3], cfg_scale=2.0)
    np.testing.assert_array_equal(merged[1].x, ens.sample(4, "prior", steps=2, seed=1, y=3, cfg_scale=2.0).x)
    # single:1 on the heterogeneous ensemble is expert 1 alone, run as a one-expert (homogeneous) ensemble.
    alone = Ensemble(ens.apply_of(1), [ens.expert_params[1]], None, None, image_shape=ens.image_shape,
                     num_classes=ens.num_classes)
    ours = ens.sample(8, "single:1", steps=2, seed=4, y=5, cfg_scale=2.0)
    theirs = alone.sample(8, "single:0", steps=2, seed=4, y=5, cfg_scale=2.0)
    np.testing.assert_array_equal(ours.x, theirs.x)
    # ... and that is a plain Euler solve of expert 1's own network.
    apply, params = ens.apply_of(1), ens.expert_params[1]
    y, null = jnp.full((8,), 5), jnp.full((8,), ens.num_classes)

    def velocity(x, t, evaluation):
        v_cond, v_uncond = apply(params, x, t, y), apply(params, x, t, null)
        return v_uncond + 2.0 * (v_cond - v_uncond), None

    noise = jax.random.normal(jax.random.key(4, impl="threefry2x32"), (8, *ens.image_shape), jnp.float32)
    np.testing.assert_allclose(ours.x, flow.integrate(velocity, noise, 2, "euler")[0], atol=1e-5)


def test_routed_velocity_of_two_architectures_is_the_weighted_sum_of_each_experts_own(het_ensemble):
    ens = het_ensemble
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((6, *ens.image_shape), dtype=np.float32))
    t = jnp.asarray(rng.uniform(size=6).astype(np.float32))
    own = [np.asarray(ens.apply_of(k)(ens.expert_params[k], x, t, jnp.full((6,), 10))) for k in (0, 1)]
    # top2 of two experts: both groups' sparse dispatch on every row; top1: each row in one group only; full:
    # the dense dispatch (whatever the dispatch setting).
    for dispatch, strategy in (("unrolled", "top1"), ("grouped", "full"), ("capacity", "top2")):
        v, w = ens.replace(dispatch=dispatch).velocity(x, t, strategy)
        w = np.asarray(w)
        assert ((w > 0).sum(1) == (1 if strategy == "top1" else 2)).all()
        expected = sum(w[:, k, None, None, None] * own[k] for k in (0, 1))
        np.testing.assert_allclose(np.asarray(v), expected, atol=1e-5, err_msg=f"{dispatch} {strategy}")


def test_a_heterogeneous_run_verifies_and_exports(het, tmp_path):
    run_dir = het[0]
    rec = tmp_path / "rec.json"
    assert cli.main(["sample", "--run-dir", str(run_dir), "--n", "4", "--strategy", "top1", "--steps", "2",
                     "--solver", "euler", "--class", "2", "--out", str(tmp_path / "a.png"), "--record",
                     str(rec)]) == 0
    assert json.loads(rec.read_text())["manifest_sha256"] == Run.open(run_dir).sha256
    assert cli.main(["verify", str(rec), "--run-dir", str(run_dir), "--mode", "exact"]) == 0
    export = tmp_path / "export"
    assert cli.main(["export", "--run-dir", str(run_dir), "--out", str(export)]) == 0
    assert cli.main(["sample", "--run-dir", str(export), "--n", "4", "--strategy", "top1", "--steps", "2",
                     "--solver", "euler", "--class", "2", "--out", str(tmp_path / "b.png")]) == 0
    ours, theirs = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    for key in ("images", "weights", "manifest_sha256"):
        np.testing.assert_array_equal(ours[key], theirs[key])
    assert cli.main(["verify", str(rec), "--run-dir", str(export), "--mode", "exact"]) == 0
    assert "islands' own sizes (0: `micro` patch 2" in (export / "README.md").read_text()


# ---------------------------------------------------------------------------------------------------------
# The homogeneous path is unchanged (randomly initialised experts: the identities hold for any weights).
# ---------------------------------------------------------------------------------------------------------

SHAPE = (4, 4, 2)


def _expert(params, x, t, y):
    """A small nonlinear expert: params {"w": [C, C], "b": [C]}; y unused."""
    del y
    return jnp.tanh(x @ params["w"] + params["b"]) * (1.0 + t[:, None, None, None])


def _params(k):
    rng = np.random.default_rng(k)
    return {"w": jnp.asarray(rng.standard_normal((2, 2), dtype=np.float32)),
            "b": jnp.asarray(rng.standard_normal(2, dtype=np.float32))}


def _router(params, x, t, y):
    del params, y
    return jnp.stack([x.mean((1, 2, 3)), x.std((1, 2, 3)), t], axis=-1) * 3.0


def test_one_architecture_keeps_the_single_program_and_groups_of_it_add_up_bitwise():
    params = [_params(k) for k in range(3)]
    one = Ensemble(_expert, params, _router, None, image_shape=SHAPE, prior_counts=[1.0, 2.0, 3.0])
    assert not one.heterogeneous and one._plan(parse("top1"), 8, False).groups is None
    # Equal-structure experts handed as two distinct functions: the group path, bitwise the one-function path
    # when the groups are contiguous (the same additions in the same order).
    twin = functools.partial(_expert)
    split = Ensemble([_expert, _expert, twin], params, _router, None, image_shape=SHAPE, prior_counts=[1.0, 2.0, 3.0])
    assert split.heterogeneous and split._plan(parse("top1"), 8, False).groups == ((0, 1), (2,))
    # The fixed strategies solve per expert whatever the dispatch; the routed ones run each dispatch.
    cases = [("unrolled", "full"), ("unrolled", "prior"), ("unrolled", "single:2"), ("unrolled", "top1+full:0.5"),
             *((d, "top2") for d in ("unrolled", "grouped", "capacity"))]
    for dispatch, strategy in cases:
        a, b = one.replace(dispatch=dispatch), split.replace(dispatch=dispatch)
        np.testing.assert_array_equal(a.sample(12, strategy, steps=2, seed=2).x,
                                      b.sample(12, strategy, steps=2, seed=2).x, err_msg=f"{dispatch} {strategy}")
    with pytest.raises(DDMError, match="a list of 3"):
        Ensemble([_expert], params, None, None, image_shape=SHAPE)


def parse(strategy):
    from ddm.sampling.routing import parse_strategy

    return parse_strategy(strategy)
