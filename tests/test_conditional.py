"""Class-conditional experts and classifier-free guidance end to end (issue 12).

`trained_run` (conftest) is a tiny conditional ensemble: the digits with their labels, K=3 experts and a router
that all see the class. On it: labels change the output, guidance at scale 1 is the conditional velocity, and
with `full` routing the guided ensemble is exactly the router-weighted sum of each expert's own guided velocity
(CFG per expert, as in the paper). Then the CLI (`--class`, `--labels`, `--cfg-scale`, records, bad input,
the guided grids of `ddm run`), and a test-size version of the done-when check: guidance makes a classifier
trained on real digits read the samples as the class asked for.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddm.app.cli import main
from ddm.core.config import load_config
from ddm.data.run import Run
from ddm.sampling.load import load_ensemble

NUM_CLASSES = 10


@pytest.fixture(scope="module")
def ensemble(trained_run):
    return load_ensemble(trained_run)


def _inputs(n: int = 12, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((n, 8, 8, 1)).astype(np.float32))
    return x, np.arange(n, dtype=np.int32) % NUM_CLASSES


def test_the_run_is_class_conditional_and_labels_reach_training(trained_run, ensemble):
    """The trap of issue 12 was a label table left at its initialisation. Here training moves the rows of the
    classes an expert's shard holds (and the null row, through label dropout), and no other."""
    from flax import nnx

    from ddm.core.dit import dit_from_config

    run = Run.open(trained_run)
    assert run.num_classes == NUM_CLASSES and run.config.expert.model.num_classes == NUM_CLASSES
    assert ensemble.num_classes == NUM_CLASSES and run.manifest["router"]["num_classes"] == NUM_CLASSES
    # The trainer's initialisation: parameters from fold_in(key(seed), 0).
    init = dit_from_config(run.config.expert.model, run.image_shape,
                           nnx.Rngs(params=jax.random.fold_in(jax.random.key(run.config.expert.train.seed), 0)))
    before = np.asarray(init.cond.labels.embedding[...])
    for k, params in enumerate(ensemble.expert_params):
        after = np.asarray(params["cond"]["labels"]["embedding"][...])
        assert after.shape == (NUM_CLASSES + 1, before.shape[1])
        moved = np.abs(after - before).max(axis=1)
        counts = np.array(run.cluster(k)["class_counts"])
        common = counts >= 0.05 * counts.sum()  # (a class seen a few times gets a few tiny updates)
        assert common.sum() >= 2 and (moved[:NUM_CLASSES][common] > 1e-4).all(), (k, moved)
        assert moved[NUM_CLASSES] > 1e-4, (k, moved)
        assert (moved[:NUM_CLASSES][counts == 0] < 1e-6).all(), (k, moved)


def test_labels_change_the_output(ensemble):
    """Experts and router depend on y (after 40 steps only slightly: the label pathway starts behind zero-init
    modulation layers; `test_guidance_makes_samples_of_the_asked_class` shows the grown-up effect). Identical
    inputs are bitwise identical, so any difference is the labels'."""
    x, y = _inputs()
    v_a, w_a = ensemble.velocity(x, 0.5, "full", y=y)
    v_b, w_b = ensemble.velocity(x, 0.5, "full", y=(y + 1) % NUM_CLASSES)
    v_null, _ = ensemble.velocity(x, 0.5, "full")  # no labels: the null label, the unconditional flow
    assert np.array_equal(np.asarray(v_a), np.asarray(ensemble.velocity(x, 0.5, "full", y=y)[0]))
    assert float(jnp.abs(v_a - v_b).max()) > 1e-6 and float(jnp.abs(v_a - v_null).max()) > 1e-6
    assert float(jnp.abs(w_a - w_b).max()) > 1e-6  # the router sees the class too
    a = ensemble.sample(4, "top1", steps=3, seed=0, y=1).x
    b = ensemble.sample(4, "top1", steps=3, seed=0, y=7).x
    assert np.abs(a - b).max() > 1e-6


@pytest.mark.parametrize("strategy", ["full", "top1"])
def test_guidance_scale_1_is_the_conditional_velocity(ensemble, strategy):
    x, y = _inputs(seed=1)
    guided, w_guided = ensemble.velocity(x, 0.4, strategy, y=y, cfg_scale=1.0)
    conditional, w_conditional = ensemble.velocity(x, 0.4, strategy, y=y)
    np.testing.assert_allclose(np.asarray(guided), np.asarray(conditional), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(w_guided), np.asarray(w_conditional))


def test_full_cfg_is_the_router_weighted_sum_of_guided_expert_velocities(ensemble):
    """u = sum_k p(k | x_t, t, y) [v_k(x, t, null) + s (v_k(x, t, y) - v_k(x, t, null))]: each expert applies
    guidance to its own velocity, the router (given the real class) weights the guided velocities."""
    x, y = _inputs(seed=2)
    t, scale = 0.6, 2.5
    v, weights = ensemble.velocity(x, t, "full", y=y, cfg_scale=scale)
    tb = jnp.full((x.shape[0],), t, jnp.float32)
    yb = jnp.asarray(y)
    null = jnp.full_like(yb, NUM_CLASSES)
    logits = ensemble.router_apply(ensemble.router_params, x, tb, yb)
    np.testing.assert_allclose(np.asarray(weights), np.asarray(jax.nn.softmax(logits, -1)), rtol=1e-5, atol=1e-6)
    expected = jnp.zeros_like(x)
    for k, params in enumerate(ensemble.expert_params):
        cond = ensemble.expert_apply(params, x, tb, yb)
        uncond = ensemble.expert_apply(params, x, tb, null)
        expected += weights[:, k, None, None, None] * (uncond + scale * (cond - uncond))
    np.testing.assert_allclose(np.asarray(v), np.asarray(expected), rtol=1e-4, atol=1e-5)


# --- the command line -------------------------------------------------------------------------------------


def _sample(run, *args) -> int:
    return main(["sample", "--run-dir", str(run), "--steps", "2", *map(str, args)])


def test_sample_class_labels_and_record(trained_run_copy):
    run = trained_run_copy
    out, rec = run / "c3.png", run / "c3.json"
    assert _sample(run, "--n", 6, "--class", 3, "--out", out, "--record", rec) == 0
    request = json.loads(str(np.load(out.with_suffix(".npz"))["request"]))
    # All n images of class 3, guided at the config's sample.cfg_scale.
    assert request["labels"] == [3] * 6 and request["cfg_scale"] == load_config(None).sample.cfg_scale
    assert json.loads(rec.read_text())["request"]["labels"] == [3] * 6
    assert main(["verify", str(rec), "--run-dir", str(run)]) == 0  # regenerated from the record: labels and scale
    assert _sample(run, "--labels", "0,1,2", "--cfg-scale", 1.5, "--out", run / "l.png") == 0  # n = 3 labels
    request = json.loads(str(np.load(run / "l.npz")["request"]))
    assert request["labels"] == [0, 1, 2] and request["n"] == 3 and request["cfg_scale"] == 1.5
    assert _sample(run, "--n", 2, "--out", run / "u.png") == 0  # no class: unguided, null label
    assert json.loads(str(np.load(run / "u.npz")["request"]))["labels"] is None


def _refused(capsys, *needles) -> None:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ddm: error:"), err
    for needle in needles:
        assert needle in err[0], err[0]


def test_bad_class_requests_are_one_line_errors_and_write_nothing(trained_run_copy, tmp_path, capsys):
    run, outputs = trained_run_copy, tmp_path / "outputs"
    outputs.mkdir()
    out = outputs / "bad.png"
    cases = [
        (["--n", 4, "--class", 10], ["class 10 is outside [0, 10)"]),
        (["--n", 4, "--class", -1], ["--class -1"]),
        (["--n", 4, "--labels", "1,2,3"], ["3 labels for --n 4"]),
        (["--labels", "1,x"], ["--labels"]),
        (["--class", 1, "--labels", "1,2"], ["not both"]),
        (["--n", 2, "--cfg-scale", 2], ["needs class labels"]),
        (["--n", 2, "--class", 1, "--set", "expert.model.num_classes=4"], ["num_classes=4", "10 classes"]),
        (["--n", 10**9, "--class", 1], ["exceeds sample.max_n"]),  # before 10^9 labels are made
    ]
    for args, needles in cases:
        assert _sample(run, *args, "--out", out, "--record", outputs / "r.json") == 2, args
        _refused(capsys, *needles)
    assert not list(outputs.iterdir()) and not (run / "samples").exists()


def test_classes_on_an_unconditional_run_are_refused(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["prepare", "--run-dir", str(run), "--set", "data.labels=none", "--set", "data.k=2"]) == 0
    capsys.readouterr()
    assert Run.open(run).num_classes == 0 and Run.open(run).config.expert.model.num_classes == 0
    for args in (["--class", 1], ["--labels", "0,1"], ["--cfg-scale", 2]):
        assert _sample(run, *args, "--out", tmp_path / "x.png") == 2
        _refused(capsys, "the run is unconditional")
    assert not (tmp_path / "x.png").exists()


def test_run_writes_guided_grids_one_row_per_class(trained_run_copy):
    """`ddm run` on a finished run only samples: per strategy the unguided grid and a guided one whose rows are
    the classes, GUIDED_PER_CLASS images each, at sample.cfg_scale."""
    from conftest import REPO, TINY_RUN_OVERRIDES

    from ddm.app.pipeline import GUIDED_PER_CLASS, run_all

    overrides = [*TINY_RUN_OVERRIDES, "sample.strategies=[top1]"]
    outputs = run_all(load_config(REPO / "configs" / "digits.yaml", overrides), trained_run_copy, overrides)
    samples = trained_run_copy / "samples"
    assert outputs["top1 guided"] == samples / "top1_guided.png"
    with np.load(samples / "top1_guided.npz") as guided:
        request = json.loads(str(guided["request"]))
        assert guided["images"].shape == (NUM_CLASSES * GUIDED_PER_CLASS, 8, 8, 1)
    assert request["labels"] == np.repeat(np.arange(NUM_CLASSES), GUIDED_PER_CLASS).tolist()
    assert request["cfg_scale"] == load_config(None).sample.cfg_scale
    assert json.loads(str(np.load(samples / "top1.npz")["request"]))["labels"] is None
    for name in ("top1.png", "top1_guided.png", "strategies.png", "strategies_guided.png"):
        assert (samples / name).stat().st_size > 0


# --- guidance works (the done-when check of issue 12, at test size) ---------------------------------------

BAR_CLASSES = 4
OFF_CLASS = 0.15  # share of each class whose bar is drawn at random: p(bar = y | y) = 0.85 + 0.15 / 4


def bars(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """8x8 images with a bright 2-row horizontal bar at rows 2r, 2r+1 over a noisy background, labelled y in
    0..3: the bar is at r = y, except for OFF_CLASS of the images, whose bar is anywhere. The true p(x | y) thus
    puts 89% of its mass on class y's bar: unguided conditional samples are read as y about that often, while
    guidance (sampling towards p(y | x)^s) pushes towards y's own bar."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, BAR_CLASSES, n)
    row = np.where(rng.random(n) < OFF_CLASS, rng.integers(0, BAR_CLASSES, n), y)
    images = rng.normal(30, 12, (n, 8, 8))
    for r in range(BAR_CLASSES):
        images[row == r, 2 * r:2 * r + 2, :] += 170
    return np.clip(images, 0, 255).astype(np.uint8)[..., None], y


@pytest.fixture(scope="module")
def bars_run(tmp_path_factory):
    """A conditional K=2 ensemble (micro DiT experts, micro conv router) trained on 1,200 labelled bar images."""
    root = tmp_path_factory.mktemp("bars")
    images, labels = bars(1200, seed=0)
    np.savez(root / "bars.npz", images=images, labels=labels)
    sets = [f"data.source={root / 'bars.npz'}", "data.k=2", "data.embedding=pixels", "expert.model.preset=micro",
            "expert.train.steps=300", "expert.train.batch_size=64", "expert.train.lr=0.01",
            "expert.train.warmup_steps=10", "expert.train.ema_decay=0.95", "expert.train.checkpoint_every=300",
            "expert.train.log_every=300", "router.preset=micro", "router.train.steps=400",
            "router.train.batch_size=64", "router.train.lr=0.01", "router.train.warmup_steps=10",
            "router.train.ema_decay=0.9", "router.train.checkpoint_every=400", "router.train.log_every=400"]
    run_dir = root / "run"
    assert main(["prepare", "--run-dir", str(run_dir), *[a for s in sets for a in ("--set", s)]]) == 0
    # 1,000 training steps: trained by the CLI in processes with one CPU device and XLA's usual optimisation
    # (this session fakes 8 devices and compiles at backend level 0, which trains a micro expert ~2x slower).
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    # The three share nothing (the router reads the shards, not the experts), so they train side by side.
    procs = [subprocess.Popen([sys.executable, "-m", "ddm", *command, "--run-dir", str(run_dir), "--no-progress"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for command in (["train-expert", "--cluster", "0"], ["train-expert", "--cluster", "1"], ["train-router"])]
    for proc in procs:
        output, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, output[-3000:]
    return run_dir, images, labels


@pytest.mark.slow
def test_guidance_makes_samples_of_the_asked_class(bars_run):
    """A classifier trained on the real images (and their labels) reads guided samples (scale 3, top-1 routing,
    as `ddm sample --class C --cfg-scale 3`) as the class asked for, >= 90% for every class; without guidance
    (scale 1, the conditional model alone) it reads fewer of them so."""
    from sklearn.linear_model import LogisticRegression

    run_dir, images, labels = bars_run
    classifier = LogisticRegression(max_iter=2000).fit(images.reshape(len(images), -1) / 255.0, labels)
    ensemble = load_ensemble(run_dir)
    assert ensemble.num_classes == BAR_CLASSES
    y = np.repeat(np.arange(BAR_CLASSES), 20)
    accuracy = {}
    for scale in (1.0, 3.0):
        result = ensemble.sample(len(y), "top1", steps=20, seed=0, y=y, cfg_scale=scale)
        read = classifier.predict(result.images.reshape(len(y), -1) / 255.0) == y
        accuracy[scale] = [float(read[y == c].mean()) for c in range(BAR_CLASSES)]
    assert min(accuracy[3.0]) >= 0.9, accuracy
    assert np.mean(accuracy[1.0]) < np.mean(accuracy[3.0]), accuracy
    # The labels matter: samples asked for class 0 and for class 3 from the same noise differ.
    a = ensemble.sample(8, "top1", steps=20, seed=1, y=0, cfg_scale=3.0).images
    b = ensemble.sample(8, "top1", steps=20, seed=1, y=3, cfg_scale=3.0).images
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 20
