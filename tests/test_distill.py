"""`ddm distill` (ensemble distillation), `ddm sample --model student`, and the teacher it regresses."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

DISTILL = ["--set", "distill.train.steps=4", "--set", "distill.train.batch_size=16",
           "--set", "distill.train.warmup_steps=1", "--set", "distill.train.checkpoint_every=2",
           "--set", "distill.train.log_every=2"]


def test_teachers_are_the_cluster_expert_and_the_router_weighted_ensemble(trained_run):
    """cluster: sample i gets exactly expert clusters[i]'s velocity; full: sum_k softmax(router)_k v_k."""
    from ddm.data.run import Run
    from ddm.sampling.load import load_ensemble
    from ddm.sampling.teacher import build_teacher

    run = Run.open(trained_run)
    ens = load_ensemble(run)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((4, *run.image_shape), dtype=np.float32))
    t = jnp.asarray([0.9, 0.5, 0.3, 0.1], jnp.float32)
    clusters = jnp.asarray([2, 0, 1, 2], jnp.int32)
    y = jnp.asarray([3, 10, 7, 0], jnp.int32)  # 10: the null label
    each = np.stack([np.asarray(ens.expert_apply(p, x, t, y)) for p in ens.expert_params])  # [K, B, ...]
    cluster_v = np.asarray(jax.jit(build_teacher(run, "cluster"))(x, t, clusters, y))
    np.testing.assert_allclose(cluster_v, each[np.asarray(clusters), np.arange(4)], rtol=1e-4, atol=1e-5)
    w = np.asarray(jax.nn.softmax(ens.router_apply(ens.router_params, x, t, y), -1))  # [B, K]
    full_v = np.asarray(jax.jit(build_teacher(run, "full"))(x, t, clusters, y))
    np.testing.assert_allclose(full_v, np.einsum("bk,kb...->b...", w, each), rtol=1e-4, atol=1e-5)
    assert np.abs(full_v - cluster_v).max() > 1e-3  # the two teachers differ


def test_ddm_distill_trains_pins_resumes_and_samples_the_student(trained_run_copy, tmp_path, capsys):
    from ddm.app.cli import main
    from ddm.data import manifest as mf
    from ddm.data.run import Run
    from ddm.sampling.load import load_single

    run = trained_run_copy
    capsys.readouterr()
    # Before distillation: sampling the student is a one-line error naming the command to run.
    assert main(["sample", "--run-dir", str(run), "--model", "student", "--n", "2", "--steps", "2",
                 "--out", str(tmp_path / "none.png")]) == 2
    assert "ddm distill" in capsys.readouterr().err

    assert main(["distill", "--run-dir", str(run), *DISTILL, "--no-progress"]) == 0
    entry = mf.read_manifest(run)["student"]
    assert entry["status"] == "finished" and entry["step"] == 4 and entry["teacher"] == "cluster"
    assert len(entry["sha256"]) == 64 and entry["model"]["num_classes"] == 10 and entry["train"]["batch_size"] == 16
    rows = [json.loads(line) for line in (run / "student" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [2, 4] and all(np.isfinite(r["loss"]) for r in rows if "loss" in r)

    # A rerun resumes the finished job: same weights, same pin.
    assert main(["distill", "--run-dir", str(run), *DISTILL, "--no-progress"]) == 0
    assert mf.read_manifest(run)["student"]["sha256"] == entry["sha256"]
    # The pin is checked on load: a tampered pin refuses to load.
    student = load_single(Run.open(run), "student")
    assert student is not None and student.num_experts == 1
    mf.update_manifest(run, lambda m: m["student"].update(sha256="0" * 64))
    with pytest.raises(Exception, match="SHA-256"):
        load_single(Run.open(run), "student")
    mf.update_manifest(run, lambda m: m["student"].update(sha256=entry["sha256"]))

    # ddm sample --model student: unguided and guided, deterministic, and a one-model request refuses routing
    # options and verification records.
    out = tmp_path / "s.png"
    assert main(["sample", "--run-dir", str(run), "--model", "student", "--n", "4", "--steps", "2",
                 "--out", str(out)]) == 0
    with np.load(out.with_suffix(".npz")) as z:
        images = z["images"]
    assert images.shape == (4, 8, 8, 1) and images.dtype == np.uint8
    assert main(["sample", "--run-dir", str(run), "--model", "student", "--n", "4", "--steps", "2", "--class", "3",
                 "--out", str(tmp_path / "g.png")]) == 0
    assert "student" in capsys.readouterr().out
    for extra, message in [(["--strategy", "top1"], "--strategy"), (["--record", str(tmp_path / "r.json")], "--record")]:
        assert main(["sample", "--run-dir", str(run), "--model", "student", "--n", "2", "--steps", "2",
                     "--out", str(tmp_path / "x.png"), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0]
    # The full teacher is a choice of its own (recorded), and a bad teacher name is rejected by the config.
    assert main(["distill", "--run-dir", str(run), "--set", "distill.teacher=oracle"]) == 2
    assert "distill.teacher" in capsys.readouterr().err


def test_cluster_teacher_groups_rows_by_cluster_on_the_grouped_dispatch(trained_run):
    """On GPU/TPU the cluster teacher runs each expert on one bucket of its own rows ("grouped"; the test above
    covers CPU's "unrolled" chunks): uneven clusters, one of them empty, still give every sample exactly its own
    expert's velocity."""
    from ddm.data.run import Run
    from ddm.sampling.load import load_ensemble
    from ddm.sampling.teacher import ensemble_teacher

    run = Run.open(trained_run)
    ens = load_ensemble(run, with_router=False)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((8, *run.image_shape), dtype=np.float32))
    t = jnp.asarray(rng.uniform(0.05, 0.95, 8), jnp.float32)
    clusters = jnp.asarray([0, 2, 0, 1, 0, 2, 0, 2], jnp.int32)  # K=4: buckets of 4, 2 and 4 rows, expert 3 idle
    y = jnp.asarray(rng.integers(0, 11, 8), jnp.int32)  # 10: the null label
    each = np.stack([np.asarray(ens.expert_apply(p, x, t, y)) for p in ens.expert_params])  # [K, B, ...]
    got = np.asarray(jax.jit(ensemble_teacher(ens.replace(dispatch="grouped"), "cluster"))(x, t, clusters, y))
    np.testing.assert_allclose(got, each[np.asarray(clusters), np.arange(8)], rtol=1e-4, atol=1e-5)
