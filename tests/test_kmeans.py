"""k-means: recovery of known partitions, determinism, the balanced bound, two-stage, empty clusters, errors.

Most tests share one data shape (N=400, D=8, K=4) so the jitted loops compile once for the file.
"""

import math

import numpy as np
import pytest

from ddm.core.errors import DDMError
from ddm.data import kmeans as kmeans_module
from ddm.data.kmeans import KMeansResult, assign, balanced_capacity, kmeans

N, D, K = 400, 8, 4


def make_blobs(sizes, d=D, spread=0.3, seed=0):
    """Well-separated Gaussian blobs: points [sum(sizes), d] float32 and true labels."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(sizes), d)) * 10.0
    truth = np.repeat(np.arange(len(sizes)), sizes)
    x = centres[truth] + spread * rng.normal(size=(truth.size, d))
    perm = rng.permutation(truth.size)  # interleave so no mode can lean on input order
    return x[perm].astype(np.float32), truth[perm]


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """True when labelings a and b induce the same partition (equal up to a permutation of labels)."""
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def numpy_inertia(x, result: KMeansResult) -> float:
    diff = x.astype(np.float64) - result.centroids.astype(np.float64)[result.labels]
    return float(np.sum(diff * diff))


def check_result(x, result: KMeansResult, k: int) -> None:
    assert result.centroids.shape == (k, x.shape[1]) and result.centroids.dtype == np.float32
    assert result.labels.shape == (x.shape[0],) and result.labels.dtype == np.int32
    assert result.sizes.dtype == np.int64
    np.testing.assert_array_equal(result.sizes, np.bincount(result.labels, minlength=k))
    assert result.sizes.min() >= 1, result.sizes  # never an empty cluster
    assert result.labels.min() >= 0 and result.labels.max() < k
    assert result.inertia == pytest.approx(numpy_inertia(x, result), rel=1e-5)


@pytest.fixture(scope="module")
def blobs():
    return make_blobs([100, 100, 100, 100])


@pytest.fixture(scope="module")
def unbalanced():
    return make_blobs([280, 60, 40, 20], seed=1)


@pytest.mark.parametrize("mode", ["lloyd", "balanced", "two_stage"])
def test_recovers_separated_blobs(blobs, mode):
    x, truth = blobs
    result = kmeans(x, K, mode=mode, fine_k=32, seed=0)
    check_result(x, result, K)
    assert same_partition(result.labels, truth)
    # Converged on separated blobs: the centroids are the blob means, and assign() agrees with the labels.
    np.testing.assert_array_equal(assign(x, result.centroids), result.labels)


def test_two_stage_recovers_unbalanced_blobs(unbalanced):
    x, truth = unbalanced
    result = kmeans(x, K, mode="two_stage", fine_k=32, seed=3)
    check_result(x, result, K)
    assert same_partition(result.labels, truth)
    # Its centroids are the means of each coarse cluster's points.
    for j in range(K):
        np.testing.assert_allclose(result.centroids[j], x[result.labels == j].mean(axis=0), rtol=1e-5, atol=1e-5)


def test_deterministic_for_a_seed():
    x = np.random.default_rng(0).uniform(size=(N, D)).astype(np.float32)  # no clear structure: seeds matter
    a = kmeans(x, K, seed=5, max_iter=5)
    b = kmeans(x, K, seed=5, max_iter=5)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.centroids.tobytes() == b.centroids.tobytes()
    assert a.inertia == b.inertia and a.n_iter == b.n_iter
    others = [kmeans(x, K, seed=s, max_iter=5).centroids.tobytes() for s in range(6, 10)]
    assert any(o != a.centroids.tobytes() for o in others)


@pytest.mark.parametrize(("slack", "cap"), [(1.0, 100), (1.1, 110), (1.5, 150)])
def test_balanced_respects_bound(unbalanced, slack, cap):
    x, _ = unbalanced
    assert balanced_capacity(N, K, slack) == cap == math.ceil(round(slack * N / K, 6))
    result = kmeans(x, K, mode="balanced", balance_slack=slack, seed=0)
    check_result(x, result, K)
    assert result.sizes.max() <= cap, (result.sizes, cap)
    plain = kmeans(x, K, mode="lloyd", seed=0)
    assert plain.sizes.max() > cap  # the bound is doing something on this data
    assert result.inertia >= plain.inertia * (1 - 1e-6)


def test_balanced_capacity_rounds_up():
    assert balanced_capacity(53, 4, 1.0) == 14
    assert balanced_capacity(10, 3, 1.0) == 4  # K caps always hold N points
    assert balanced_capacity(10, 3, 1.25) == 5


def test_empty_cluster_is_reseeded(blobs):
    x, truth = blobs
    # One starting centroid far from every point: the first assignment leaves it empty.
    init = np.stack([x[truth == j].mean(axis=0) for j in range(K - 1)] + [np.full(D, 1e4)]).astype(np.float32)
    for mode in ("lloyd", "balanced"):
        result = kmeans(x, K, init=init, mode=mode)
        check_result(x, result, K)
    # Even when it is the last thing done: zero iterations still returns no empty cluster.
    check_result(x, kmeans(x, K, init=init, max_iter=0), K)


# The next two tests share shapes (6 points, 3 features, 6 clusters) so they compile once.


def test_every_point_its_own_cluster():
    x = np.random.default_rng(1).normal(size=(6, 3)).astype(np.float32)
    result = kmeans(x, 6)
    check_result(x, result, 6)
    assert result.inertia == pytest.approx(0.0, abs=1e-6)


def test_fewer_distinct_points_than_k_raises():
    x = np.random.default_rng(1).normal(size=(6, 3)).astype(np.float32)
    x[5] = x[0]  # 5 distinct points
    with pytest.raises(DDMError, match="only 5 distinct point"):
        kmeans(x, 6)
    with pytest.raises(DDMError, match="only 5 distinct point"):
        kmeans(x, 6, mode="two_stage", fine_k=8)
    # k within the distinct count is fine, even for two_stage with more fine centroids than distinct points.
    result = kmeans(x, 4, mode="two_stage", fine_k=8)
    check_result(x, result, 4)
    assert result.labels[5] == result.labels[0]


def test_tol_zero_runs_exactly_max_iter(blobs):
    x, _ = blobs
    assert kmeans(x, K, tol=0.0, max_iter=17).n_iter == 17
    assert kmeans(x, K, tol=1e-4, max_iter=100).n_iter < 100


def test_inertia_matches_numpy_on_large_offsets():
    # Features far from the origin make the expanded ||x||^2 - 2xc + ||c||^2 form cancel badly; the reported
    # inertia must still be the direct sum of squared distances.
    x, _ = make_blobs([100, 100, 100, 100], seed=4)
    x = x + 1000.0
    result = kmeans(x, K)
    check_result(x, result, K)


def test_blocked_assignment_matches_unblocked(blobs, monkeypatch):
    x, _ = blobs
    full = kmeans(x, K, seed=1, max_iter=10, tol=0)
    # Blocks of 256 rows: N=400 is not a multiple, which exercises the zero-weight padding rows.
    monkeypatch.setattr(kmeans_module, "CHUNK_ELEMENTS", 64 * K)
    blocked = kmeans(x, K, seed=1, max_iter=10, tol=0)
    check_result(x, blocked, K)
    np.testing.assert_array_equal(blocked.labels, full.labels)
    np.testing.assert_allclose(blocked.centroids, full.centroids, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(assign(x, full.centroids), full.labels)


def test_onehot_reduction_matches_scatter(monkeypatch):
    # CPU forms per-cluster sums by scatter-add, accelerators by a one-hot matmul: both must agree.
    x, _ = make_blobs([150, 100, 100, 50], seed=5)
    scatter = kmeans(x, K, seed=2, max_iter=10, tol=0)
    monkeypatch.setattr(kmeans_module, "_reduce_kind", lambda: "onehot")
    onehot = kmeans(x, K, seed=2, max_iter=10, tol=0)
    check_result(x, onehot, K)
    np.testing.assert_array_equal(onehot.labels, scatter.labels)
    np.testing.assert_allclose(onehot.centroids, scatter.centroids, rtol=1e-5, atol=1e-5)


def test_assign_is_nearest_centroid():
    rng = np.random.default_rng(2)
    x, c = rng.normal(size=(50, 5)), rng.normal(size=(7, 5))
    expected = np.argmin(((x[:, None, :] - c[None]) ** 2).sum(-1), axis=1)
    labels = assign(x, c)
    assert labels.dtype == np.int32
    np.testing.assert_array_equal(labels, expected)


def test_log_reports_progress(blobs, caplog):
    x, _ = blobs
    with caplog.at_level("INFO", logger="ddm.data.kmeans"):
        kmeans(x, K, tol=0.0, max_iter=25, progress=True)
    lines = [r.getMessage() for r in caplog.records]
    assert any("iter 10/25" in line for line in lines) and any("iter 25/25" in line for line in lines)
    assert "done" in lines[-1] and "25 iterations" in lines[-1] and "sizes" in lines[-1]


@pytest.mark.parametrize(
    ("x", "kwargs", "message"),
    [
        (np.zeros((10, 2)), dict(k=0), "k=0"),
        (np.zeros((3, 2)), dict(k=4), "larger than the number of points"),
        (np.zeros((0, 2)), dict(k=1), "N=0"),
        (np.zeros((10,)), dict(k=2), "ndim=1"),
        (np.zeros((4, 2, 2)), dict(k=2), "ndim=3"),
        (np.zeros((10, 2)), dict(k=2, mode="spectral"), "mode 'spectral'"),
        (np.zeros((10, 2)), dict(k=2, init=np.zeros((3, 2))), "init must have shape"),
        (np.zeros((10, 2)), dict(k=2, balance_slack=0.9), "balance_slack"),
        (np.array([["a", "b"]]), dict(k=1), "real numbers"),
    ],
)
def test_bad_input_raises(x, kwargs, message):
    with pytest.raises(DDMError, match=message):
        kmeans(x, **kwargs)


def test_nan_and_inf_rows_are_counted():
    x = np.ones((10, 3), np.float32)
    x[2, 0], x[7, 1], x[7, 2] = np.nan, np.inf, -np.inf
    with pytest.raises(DDMError, match="2 row.*NaN/Inf.*row 2"):
        kmeans(x, 2)
    big = np.ones((4, 2))
    big[1, 1] = 1e300  # finite in float64, Inf as float32
    with pytest.raises(DDMError, match="1 row"):
        kmeans(big, 2)
    with pytest.raises(DDMError, match="NaN/Inf"):
        assign(np.ones((3, 2)), np.array([[np.nan, 0.0]]))
