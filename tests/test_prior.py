"""The `prior` routing strategy (ancestral sampling): k ~ p(k | y) once per sample, then expert k alone.

On the analytic Gaussian mixture of test_ensemble_exact.py (exact experts, no training): prior sampling
reproduces the mixture with one expert evaluation per sample per step and never touches the router; its draws
follow p(k | y) (chi-square) and renormalise over the present experts. On the tiny trained class-conditional
run (`trained_run`): prior is a hand-written ancestral sampler bit for bit (guidance within the drawn expert),
batching changes nothing, and the CLI writes, records and verifies the per-sample experts, and feeds `oracle`
with `--clusters`.
"""

import json
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats
from test_ensemble_exact import CLUSTER_OF, MU, PI, SHAPE, D, K, _mixture_stats, expert_apply, expert_params

from ddm.app.cli import main
from ddm.core import flow
from ddm.core.errors import DDMError
from ddm.data.run import Run
from ddm.sampling.ensemble import Ensemble
from ddm.sampling.load import load_ensemble, prior_counts
from ddm.sampling.request import Request
from ddm.sampling.routing import PRIOR_TAG, parse_strategy, prior_probs
from ddm.verify.claims import EvalSettings

SIZES = np.bincount(CLUSTER_OF, weights=PI) * 1000  # cluster sizes of the mixture: shares 0.4, 0.5, 0.1


def raising_router(params, x, t, y):
    raise AssertionError("the prior strategy evaluated the router")


def mixture(available=None, **kwargs) -> Ensemble:
    params = [expert_params(k) if available is None or available[k] else None for k in range(K)]
    return Ensemble(expert_apply, params, raising_router, None, image_shape=SHAPE, available=available,
                    prior_counts=kwargs.pop("prior_counts", SIZES), **kwargs)


def hand_drawn(seed: int, probs: np.ndarray) -> np.ndarray:
    """The ancestral draw written out: sample i takes categorical(log p_i) with key fold_in(fold_in(key(seed), 2), i)."""
    key = jax.random.fold_in(jax.random.key(seed, impl="threefry2x32"), 2)
    out = []
    for i, p in enumerate(np.asarray(probs, np.float32)):
        p = jnp.asarray(p)
        logp = jnp.where(p > 0, jnp.log(jnp.where(p > 0, p, 1.0)), -jnp.inf)
        out.append(int(jax.random.categorical(jax.random.fold_in(key, i), logp)))
    return np.asarray(out, np.int32)


# --- the strategy ---------------------------------------------------------------------------------------------


def test_prior_parses_and_needs_no_router():
    s = parse_strategy(" Prior ")
    assert str(s) == "prior" and parse_strategy(str(s)) == s
    assert not s.needs_router and s.one_hot and s.fixed
    assert PRIOR_TAG == 2
    with pytest.raises(DDMError, match="'\\+full:T' applies"):
        parse_strategy("prior+full:0.5")


def test_prior_samples_the_mixture_with_one_expert_per_sample_and_no_router():
    """Exact when each expert models its cluster: the components' weights come out right (unlike top-1, which
    test_ensemble_exact shows biased), at one expert evaluation per sample per step."""
    n, steps = 4000, 40
    result = mixture().sample(n, "prior", steps=steps, solver="euler", seed=1)
    weights, means, _ = _mixture_stats(result.x.reshape(n, D))
    np.testing.assert_allclose(weights, PI, atol=0.03)
    assert np.isfinite(means).all()  # every component reached
    assert result.expert_evals == n * steps
    assert result.strategy == "prior" and result.experts.shape == (n,)
    np.testing.assert_array_equal(result.expert_ids, np.broadcast_to(result.experts, (steps, n)))
    np.testing.assert_array_equal(result.weights.argmax(-1), result.expert_ids)


def test_the_draws_follow_p_k_given_y():
    """20,000 draws of the selection alone (no solve): chi-square against p(k | y), per class and unguided."""
    counts = np.array([[50, 10], [30, 0], [20, 90]], np.float64)  # [K=3 clusters, C=2 classes]
    params = [expert_params(k) for k in range(K)]
    ens = Ensemble(expert_apply, params, None, None, image_shape=SHAPE, num_classes=2, prior_counts=counts)
    n = 20_000
    for y, expected in ((0, counts[:, 0] / 100), (1, counts[:, 1] / 100), (2, counts.sum(1) / 200)):  # 2 = null
        drawn = ens.prior_experts(n, seed=3, y=y)
        observed = np.bincount(drawn, minlength=K)
        assert observed[expected == 0].sum() == 0  # a cluster without the class is never drawn for it
        live = expected > 0
        assert stats.chisquare(observed[live], n * expected[live]).pvalue > 1e-3, (y, observed)
        # the check has power: the unguided shares are far from class 1's distribution
        if y == 1:
            shares = counts.sum(1) / 200
            assert stats.chisquare(observed, n * shares).pvalue < 1e-6
    assert ens.prior_experts(n, seed=3, y=None).tolist() == ens.prior_experts(n, seed=3, y=2).tolist()


def test_draws_depend_only_on_seed_index_and_class():
    ens = mixture()
    long = ens.prior_experts(64, seed=5)
    np.testing.assert_array_equal(ens.prior_experts(16, seed=5), long[:16])  # n does not move a draw
    np.testing.assert_array_equal(long, hand_drawn(5, prior_probs(SIZES, np.zeros(64, int), [True] * K,
                                                                   null_label=0)))
    assert not np.array_equal(ens.prior_experts(64, seed=6), long)


def test_missing_experts_renormalise_over_the_present():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ens = mixture(available=[True, False, True])
    n = 20_000
    drawn = ens.prior_experts(n, seed=0)
    observed = np.bincount(drawn, minlength=K)
    assert observed[1] == 0
    expected = np.array([SIZES[0], SIZES[2]]) / (SIZES[0] + SIZES[2])  # 0.8, 0.2
    assert stats.chisquare(observed[[0, 2]], n * expected).pvalue > 1e-3
    # the present clusters' data only: cluster 1's components are not sampled
    x = ens.sample(1000, "prior", steps=30, solver="euler", seed=0).x.reshape(-1, D)
    nearest = np.argmin(((x[:, None, :] - MU[None]) ** 2).sum(-1), axis=1)
    cluster_weights = np.bincount(CLUSTER_OF[nearest], minlength=K) / len(x)
    assert cluster_weights[1] < 0.01 and abs(cluster_weights[0] - 0.8) < 0.05
    # a class whose every image lies in a missing cluster has no prior left to renormalise
    with pytest.raises(DDMError, match="no available expert's cluster holds data of class 1"):
        prior_probs(np.array([[5, 0], [1, 3], [2, 0]]), np.array([0, 1]), [True, False, True], null_label=2)


def test_prior_refuses_what_it_cannot_do():
    params = [expert_params(k) for k in range(K)]
    bare = Ensemble(expert_apply, params, None, None, image_shape=SHAPE)
    with pytest.raises(DDMError, match="needs the clusters' data counts"):
        bare.sample(4, "prior", steps=2)
    with pytest.raises(DDMError, match="labels are oracle's"):
        mixture().sample(4, "prior", steps=2, labels=[0, 1, 2, 0])
    with pytest.raises(DDMError, match="once per request"):
        mixture().velocity(np.zeros((2, *SHAPE), np.float32), 0.5, "prior")
    with pytest.raises(DDMError, match="prior_counts must be"):
        Ensemble(expert_apply, params, None, None, image_shape=SHAPE, prior_counts=[1.0, 2.0])
    sizes_only = Ensemble(expert_apply, params, None, None, image_shape=SHAPE, num_classes=2, prior_counts=SIZES)
    with pytest.raises(DDMError, match="needs each cluster's class counts"):
        sizes_only.prior_experts(4, y=0)
    assert sizes_only.prior_experts(4, y=None).shape == (4,)  # unguided samples: the shares suffice


def test_requests_carry_oracle_clusters_only():
    with pytest.raises(DDMError, match="needs each image's cluster"):
        Request(n=2, strategy="oracle")
    with pytest.raises(DDMError, match="clusters feed the oracle strategy"):
        Request(n=2, strategy="prior", clusters=(0, 1))
    with pytest.raises(DDMError, match="2 clusters for n=3"):
        Request(n=3, strategy="oracle", clusters=(0, 1))
    assert "clusters" not in Request(n=2, strategy="prior").to_json()  # other requests read as they always did
    request = Request(n=2, strategy="oracle", clusters=(2, 0))
    assert Request.from_json(request.to_json()) == request
    EvalSettings(strategy="prior")  # consensus-eval accepts it


# --- the trained class-conditional run --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ensemble(trained_run):
    return load_ensemble(trained_run)


def test_the_run_hands_its_class_counts_to_the_ensemble(trained_run, ensemble):
    run = Run.open(trained_run)
    counts = prior_counts(run)
    assert counts.shape == (run.num_clusters, run.num_classes)
    np.testing.assert_array_equal(counts.sum(1), [c["count"] for c in run.clusters])
    np.testing.assert_array_equal(ensemble.prior_counts, counts)


def test_prior_is_the_hand_written_ancestral_sampler_bit_for_bit(trained_run, ensemble):
    """Guided: k_i ~ p(k | y_i) from the manifest's counts, then expert k_i alone with CFG (each k's
    `single:k` solve of the same request, row i taken from the one its sample drew)."""
    n, seed = 12, 4
    y = np.arange(n, dtype=np.int32) % 10
    kwargs = {"steps": 3, "solver": "heun", "seed": seed, "y": y, "cfg_scale": 2.0}
    result = ensemble.sample(n, "prior", **kwargs)
    counts = prior_counts(Run.open(trained_run))
    drawn = hand_drawn(seed, counts[:, y].T / counts[:, y].T.sum(1, keepdims=True))
    np.testing.assert_array_equal(result.experts, drawn)
    expected = np.zeros_like(result.x)
    for k in np.unique(drawn):
        single = ensemble.sample(n, f"single:{k}", **kwargs).x
        expected[drawn == k] = single[drawn == k]
        # and `single:k` is expert k's plain solve of the whole request as one program, no Ensemble in it
        assert np.array_equal(single.view(np.uint32), _plain_solve(ensemble, k, n, **kwargs).view(np.uint32))
    assert np.array_equal(result.x.view(np.uint32), expected.view(np.uint32))
    assert result.expert_evals == n * flow.evaluations("heun", 3)  # one (guided) expert call per sample each


def _plain_solve(ensemble, k, n, *, steps, solver, seed, y, cfg_scale):
    """Expert k alone on all n rows of a request, CFG in the same call, as one jitted program (no Ensemble)."""
    params, null = ensemble.expert_params[k], ensemble.num_classes

    def solve(params, x1, y, scale):
        def velocity(x, t, evaluation):
            v2 = ensemble.expert_apply(params, jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                                       jnp.concatenate([y, jnp.full_like(y, null)])).astype(jnp.float32)
            return v2[n:] + scale * (v2[:n] - v2[n:]), None
        return flow.integrate(velocity, x1, steps, solver)[0]

    noise = jax.random.normal(jax.random.key(seed, impl="threefry2x32"), (n, *ensemble.image_shape), jnp.float32)
    return np.asarray(jax.jit(solve)(params, noise, jnp.asarray(y, jnp.int32), jnp.float32(cfg_scale)))


def test_batch_size_changes_nothing(ensemble):
    """The same draws and the same bits: every expert's group runs in chunks of one static size, so a row's
    floats do not depend on its companions (`min_bucket`; the routed strategies do not have this:
    docs/verification.md). A served request merged with others is the same as the lone one."""
    n = 16
    one = ensemble.sample(n, "prior", steps=3, seed=7)
    batched = ensemble.sample(n, "prior", steps=3, seed=7, batch_size=5)
    np.testing.assert_array_equal(batched.experts, one.experts)
    assert np.array_equal(batched.x.view(np.uint32), one.x.view(np.uint32))
    merged = ensemble.sample_rows([(3, 5), (7, n), (9, 2)], "prior", steps=3)[1]
    np.testing.assert_array_equal(merged.experts, one.experts)
    assert np.array_equal(merged.x.view(np.uint32), one.x.view(np.uint32))
    assert one.dispatch == "groups" and one.padded_evals >= one.expert_evals
    assert one.dispatch == "groups" and one.padded_evals >= one.expert_evals


def _sample(run, out, *args) -> int:
    return main(["sample", "--run-dir", str(run), "--out", str(out), *map(str, args)])


def test_cli_prior_is_reproducible_and_records_its_experts(trained_run, tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    rec = tmp_path / "a.json"
    assert _sample(trained_run, a, "--strategy", "prior", "--n", 8, "--seed", 0, "--record", rec) == 0
    assert _sample(trained_run, b, "--strategy", "prior", "--n", 8, "--seed", 0) == 0
    assert a.read_bytes() == b.read_bytes()
    assert a.with_suffix(".npz").read_bytes() == b.with_suffix(".npz").read_bytes()
    with np.load(a.with_suffix(".npz")) as saved:
        experts = saved["experts"]
        assert experts.shape == (8,) and experts.dtype == np.int32
        np.testing.assert_array_equal(saved["expert_ids"], np.broadcast_to(experts, saved["expert_ids"].shape))
    record = json.loads(rec.read_text())
    assert record["experts"] == experts.tolist() and "clusters" not in record["request"]
    assert main(["verify", str(rec), "--run-dir", str(trained_run)]) == 0
    # the same images, other experts claimed: not honest
    record["experts"][0] = (record["experts"][0] + 1) % 3
    forged = tmp_path / "forged.json"
    forged.write_text(json.dumps(record))
    assert main(["verify", str(forged), "--run-dir", str(trained_run)]) == 1


def test_cli_clusters_feed_oracle(trained_run, tmp_path, capsys):
    out, rec = tmp_path / "o.png", tmp_path / "o.json"
    assert _sample(trained_run, out, "--clusters", "2,0,1", "--steps", 2, "--record", rec) == 0  # n = 3, oracle
    with np.load(out.with_suffix(".npz")) as saved:
        assert saved["experts"].tolist() == [2, 0, 1]
        request = json.loads(str(saved["request"]))
    assert request["strategy"] == "oracle" and request["clusters"] == [2, 0, 1] and request["n"] == 3
    assert main(["verify", str(rec), "--run-dir", str(trained_run)]) == 0
    for args, message in ((("--clusters", "0,1", "--n", 3), "gives 2 clusters for --n 3"),
                          (("--clusters", "0,3"), "cluster 3 is outside \\[0, 3\\)"),
                          (("--clusters", "0,x"), "comma-separated cluster indices"),
                          (("--clusters", "0,1", "--strategy", "top1"), "clusters feed the oracle strategy"),
                          (("--strategy", "oracle", "--n", 2), "needs each image's cluster")):
        capsys.readouterr()
        assert _sample(trained_run, tmp_path / "bad.png", *args) == 2, args
        assert re.search(message, capsys.readouterr().err), (args, message)
