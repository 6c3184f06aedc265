"""Router training against a known posterior, the prior at pure noise, resume and bad input."""

import json
import shutil

import numpy as np
import pytest
from scipy.special import softmax

from ddm.app.cli import main
from ddm.core.config import load_config
from ddm.data import manifest as mf
from ddm.data.prepare import prepare

# A mixture of 3 well-separated Gaussians in 4x4x1 "images", unequal weights: k-means recovers the components,
# so the cluster posterior p(k | x_t, t) is known in closed form.
WEIGHTS = np.array([0.5, 0.3, 0.2])
STD = 0.12
SIZE = (4, 4, 1)


def _means() -> np.ndarray:
    rng = np.random.default_rng(7)
    base = rng.choice([-0.5, 0.5], size=(3, *SIZE))
    base[1] = -base[0]
    base[2, :2] = base[0, :2]  # cluster 2 shares half of cluster 0's pattern: the posterior is not trivial
    return base


def analytic_posterior(x_t: np.ndarray, t: np.ndarray, means: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """p(k | x_t) with x_t | k ~ N((1-t) mu_k, ((1-t)^2 s^2 + t^2) I). x_t: [B, ...], t: [B] -> [B, K].

    prior: p(k) [K], or one prior per sample [B, K] (p(k | y) of each sample's class y)."""
    var = (1 - t) ** 2 * STD**2 + t**2
    diff = x_t[:, None] - (1 - t)[:, None, None, None, None] * means[None]
    sq = (diff**2).reshape(len(x_t), len(means), -1).sum(-1)
    return softmax(np.log(np.broadcast_to(prior, sq.shape)) - 0.5 * sq / var[:, None], axis=-1)


@pytest.fixture(scope="module")
def mixture_run(tmp_path_factory):
    rng = np.random.default_rng(0)
    n = 3000
    comp = rng.choice(3, size=n, p=WEIGHTS)
    x = np.clip(_means()[comp] + STD * rng.standard_normal((n, *SIZE)), -1, 1)
    root = tmp_path_factory.mktemp("mixture")
    np.savez(root / "mixture.npz", data=x.astype(np.float32))
    # 250 steps leave margin under every bound below (KL 0.021 of 0.05, pure-noise shares off by 0.038 of 0.05).
    overrides = [f"data.source={root / 'mixture.npz'}", "data.k=3", "data.embedding=pixels", "data.holdout_fraction=0.1",
                 "router.arch=conv", "router.preset=micro", "router.train.steps=250", "router.train.batch_size=128",
                 "router.train.lr=0.003", "router.train.warmup_steps=20", "router.train.checkpoint_every=125",
                 "router.train.log_every=125", "router.train.ema_decay=0.9"]
    cfg = load_config(None, overrides)
    run_dir = root / "run"
    prepare(cfg, run_dir)
    assert main(["train-router", "--run-dir", str(run_dir), "--no-progress"]) == 0
    return run_dir


def _router(run_dir):
    """(router(x, t, y=None) -> p(k | x_t, t[, y]) [B, K] float64, manifest) of a run's trained router."""
    from ddm.data.run import Run
    from ddm.router.trained import load_router

    run = Run.open(run_dir)
    manifest = run.manifest
    apply, state = load_router(run)

    def router(x, t, y=None):
        return softmax(np.asarray(apply(state, x, t, y), np.float64), axis=-1)

    return router, manifest


def _cluster_means(manifest, run_dir) -> np.ndarray:
    """The component mean behind each k-means cluster (clusters are numbered arbitrarily)."""
    from ddm.core.images import to_model_range
    from ddm.data.shards import read_shard

    cluster_means = np.stack([to_model_range(read_shard(mf.resolve(run_dir, c["shard"]))).mean(0)
                              for c in manifest["clusters"]])
    order = [int(np.argmin(((_means() - m) ** 2).sum(axis=(1, 2, 3)))) for m in cluster_means]
    assert sorted(order) == [0, 1, 2], "k-means should recover the three components"
    return _means()[order]


def test_router_matches_analytic_posterior(mixture_run):
    router, manifest = _router(mixture_run)
    means = _cluster_means(manifest, mixture_run)
    prior = np.array([c["share"] for c in manifest["clusters"]])
    rng = np.random.default_rng(1)
    n = 2000
    k = rng.choice(3, size=n, p=prior)
    x0 = means[k] + STD * rng.standard_normal((n, *SIZE))
    t = rng.uniform(0.0, 1.0, size=n)
    x_t = (1 - t)[:, None, None, None] * x0 + t[:, None, None, None] * rng.standard_normal(x0.shape)
    p_true = analytic_posterior(x_t, t, means, prior)
    p_router = router(x_t.astype(np.float32), t.astype(np.float32))
    kl = (p_true * (np.log(p_true + 1e-12) - np.log(p_router + 1e-12))).sum(-1).mean()
    kl_prior_only = (p_true * (np.log(p_true + 1e-12) - np.log(prior)[None])).sum(-1).mean()
    assert kl < 0.05, f"mean KL(true || router) = {kl:.4f}"
    assert kl < 0.15 * kl_prior_only  # far better than ignoring x_t


def test_router_predicts_cluster_proportions_at_pure_noise(mixture_run):
    router, manifest = _router(mixture_run)
    prior = np.array([c["share"] for c in manifest["clusters"]])
    noise = np.random.default_rng(2).standard_normal((2000, *SIZE)).astype(np.float32)
    predicted = router(noise, np.ones(len(noise), np.float32)).mean(0)
    assert np.abs(predicted - prior).max() < 0.05, (predicted, prior)
    assert np.abs(predicted - 1 / 3).max() > 0.1  # and that is not the uniform distribution


def test_eval_router_writes_report(mixture_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(mixture_run, run)
    assert main(["eval-router", "--run-dir", str(run)]) == 0
    report = json.loads((run / "eval" / "router.json").read_text())
    assert len(report["per_t_bin"]) == 10 and (run / "eval" / "router.png").is_file()
    accuracy = [b["accuracy"] for b in report["per_t_bin"]]
    assert accuracy[0] > 0.95 and accuracy[0] > accuracy[-1]  # easy near data, hard near noise
    assert report["at_pure_noise"]["total_variation"] < 0.05
    assert np.asarray(report["confusion"]).sum() == report["evaluations"]


def test_router_rerun_is_resume_not_restart(mixture_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(mixture_run, run)
    before = mf.read_manifest(run)["router"]["sha256"]
    assert main(["train-router", "--run-dir", str(run), "--no-progress", "--set", "router.train.steps=270",
                 "--set", "router.train.log_every=10"]) == 0
    out = capsys.readouterr().out
    assert "resumed from step 250" in out
    after = mf.read_manifest(run)["router"]
    assert after["step"] == 270 and after["sha256"] != before


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ddm: error:"), err
    return err[0]


def test_missing_shard_is_a_clear_error(mixture_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(mixture_run, run)
    shutil.rmtree(run / "islands" / "1" / "shard")
    assert main(["train-router", "--run-dir", str(run), "--no-progress"]) == 2
    assert "cluster 1" in _error_line(capsys)


def _copy_with_clusters(run_dir, tmp_path, keep: slice):
    """A copy of the run whose manifest keeps only clusters[keep]."""
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["clusters"] = manifest["clusters"][keep]
    (run / "manifest.json").write_text(json.dumps(manifest))
    return run


def test_manifest_without_clusters_is_a_clear_error(mixture_run, tmp_path, capsys):
    run = _copy_with_clusters(mixture_run, tmp_path, slice(0, 0))
    assert main(["train-router", "--run-dir", str(run), "--no-progress"]) == 2
    assert "no clusters" in _error_line(capsys)


def test_k_mismatch_between_manifest_and_router_is_refused(mixture_run, tmp_path, capsys):
    # as if re-clustered with K=2 behind the router's back
    run = _copy_with_clusters(mixture_run, tmp_path, slice(0, 2))
    assert main(["eval-router", "--run-dir", str(run)]) == 2
    assert "3" in _error_line(capsys)
    # resuming training on the old checkpoint with a different K is refused too, not silently restarted
    assert main(["train-router", "--run-dir", str(run), "--no-progress", "--set", "router.train.steps=260"]) == 2
    _error_line(capsys)



@pytest.mark.parametrize("setting", ["router.preset=tiny", "router.arch=mlp"])
def test_a_router_network_other_than_the_trained_one_is_named(mixture_run, tmp_path, capsys, setting):
    """Loading the trained router under other network settings names the setting, not a restore failure."""
    run = tmp_path / "run"
    shutil.copytree(mixture_run, run)
    assert main(["eval-router", "--run-dir", str(run), "--set", setting]) == 2
    field = setting.split("=")[0]
    assert f"the router was trained with {field}=" in _error_line(capsys)

# --- a class-conditional router ---------------------------------------------------------------------------

# The same three components, now with two classes spread unevenly over them: p(component | class).
CLASS_COMPONENTS = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])


@pytest.fixture(scope="module")
def labelled_mixture_run(tmp_path_factory):
    """The mixture with class labels: class y ~ uniform{0, 1}, component ~ CLASS_COMPONENTS[y]. The router of
    this run sees y, so p(k | x_t, t, y) is known in closed form too (the prior becomes p(k | y))."""
    rng = np.random.default_rng(3)
    n = 3000
    y = rng.integers(0, 2, n)
    comp = (rng.random(n)[:, None] > np.cumsum(CLASS_COMPONENTS[y], axis=1)).sum(1)
    x = np.clip(_means()[comp] + STD * rng.standard_normal((n, *SIZE)), -1, 1)
    root = tmp_path_factory.mktemp("labelled-mixture")
    np.savez(root / "mixture.npz", data=x.astype(np.float32), labels=y)
    # 400 steps: the router given y must beat the class-blind posterior's KL 4x (0.18 of it here; 0.31 after 250).
    overrides = [f"data.source={root / 'mixture.npz'}", "data.k=3", "data.embedding=pixels", "data.holdout_fraction=0.1",
                 "router.arch=conv", "router.preset=micro", "router.train.steps=400", "router.train.batch_size=128",
                 "router.train.lr=0.003", "router.train.warmup_steps=20", "router.train.checkpoint_every=400",
                 "router.train.log_every=200", "router.train.ema_decay=0.9"]
    run_dir = root / "run"
    prepare(load_config(None, overrides), run_dir)
    assert main(["train-router", "--run-dir", str(run_dir), "--no-progress"]) == 0
    return run_dir


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    """Mean KL(p || q) over rows of [B, K] distributions."""
    return float((p * (np.log(p + 1e-12) - np.log(q + 1e-12))).sum(-1).mean())


def test_conditional_router_matches_the_posterior_given_the_class(labelled_mixture_run):
    """p(k | x_t, t, y) = p(k | y) N(x_t; (1-t) mu_k, var_t) / Z: the class changes the prior of the posterior.
    The router given y matches it; the class-blind posterior p(k | x_t, t) does not; under the null label the
    router falls back to that class-blind posterior."""
    from ddm.data.run import Run

    router, manifest = _router(labelled_mixture_run)
    run = Run.open(labelled_mixture_run)
    assert run.num_classes == 2 and manifest["router"]["num_classes"] == 2
    means = _cluster_means(manifest, labelled_mixture_run)
    given_class = run.class_shares().T  # [2, K]: p(k | y), the cluster shares of each class's images
    prior = run.cluster_shares()
    rng = np.random.default_rng(4)
    n = 2000
    y = rng.integers(0, 2, n)
    k = (rng.random(n)[:, None] > np.cumsum(given_class[y], axis=1)).sum(1)
    x0 = means[k] + STD * rng.standard_normal((n, *SIZE))
    t = rng.uniform(0.0, 1.0, size=n)
    x_t = ((1 - t)[:, None, None, None] * x0 + t[:, None, None, None] * rng.standard_normal(x0.shape)).astype(np.float32)
    truth = analytic_posterior(x_t, t, means, given_class[y])
    blind = analytic_posterior(x_t, t, means, prior)
    kl = _kl(truth, router(x_t, t.astype(np.float32), y.astype(np.int32)))
    assert kl < 0.05, f"mean KL(true || router given y) = {kl:.4f}"
    assert kl < 0.25 * _kl(truth, blind)  # knowing y is worth it: the class-blind posterior is far off
    null = _kl(blind, router(x_t, t.astype(np.float32)))
    assert null < 0.1, f"mean KL(class-blind posterior || router under the null label) = {null:.4f}"


def test_eval_router_reports_the_posterior_given_the_class(labelled_mixture_run, tmp_path):
    """At pure noise the posterior given y is p(k | y); eval-router measures the router's distance to it, next to
    the best any class-blind prediction can do (the cluster shares, TV 0.3 for this mixture)."""
    run = tmp_path / "run"
    shutil.copytree(labelled_mixture_run, run)
    assert main(["eval-router", "--run-dir", str(run)]) == 0
    report = json.loads((run / "eval" / "router.json").read_text())
    at_noise = report["given_class"]["at_pure_noise"]
    assert at_noise["classes"] == [0, 1]
    assert at_noise["total_variation"] < 0.06, at_noise
    assert at_noise["cluster_shares_total_variation"] > 0.2
    assert at_noise["null_label_total_variation"] > 0.2  # the null label really hides the class
    assert report["given_class"]["accuracy"] >= report["accuracy"]
