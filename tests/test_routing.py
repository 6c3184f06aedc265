"""Routing strategies: parsing, and the weights each strategy gives."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddm.core.errors import DDMError
from ddm.sampling.routing import Strategy, parse_strategy, route_weights

K = 5
ALL = np.ones(K, bool)


def _probs(batch: int = 64, seed: int = 0) -> np.ndarray:
    """Random posteriors [batch, K] float32 with no ties."""
    logits = np.random.default_rng(seed).normal(size=(batch, K)) * 2.0
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)).astype(np.float32)


# --------------------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("full", Strategy("full")),
        ("top1", Strategy("topk", k=1)),
        ("top2", Strategy("topk", k=2)),
        ("topk:3", Strategy("topk", k=3)),
        ("threshold:0.1", Strategy("threshold", tau=0.1)),
        ("sample", Strategy("sample")),
        ("oracle", Strategy("oracle")),
        ("single:2", Strategy("single", expert=2)),
        ("  TOP2 ", Strategy("topk", k=2)),
        ("threshold:1", Strategy("threshold", tau=1.0)),
        ("threshold:1e-2", Strategy("threshold", tau=0.01)),
        ("top1+full:0.8", Strategy("topk", k=1, full_above=0.8)),
        (" top2 + FULL:0.25", Strategy("topk", k=2, full_above=0.25)),
        ("threshold:0.1+full:0.5", Strategy("threshold", tau=0.1, full_above=0.5)),
        ("sample+full:0", Strategy("sample", full_above=0.0)),
    ],
)
def test_parse_and_round_trip(text, expected):
    strategy = parse_strategy(text)
    assert strategy == expected
    assert parse_strategy(str(strategy)) == strategy
    assert hash(parse_strategy(str(strategy))) == hash(strategy)  # usable as a jit static argument


def test_canonical_text():
    assert str(parse_strategy("topk:3")) == "top3"
    assert str(parse_strategy("threshold:0.1")) == "threshold:0.1"
    assert str(parse_strategy("single:2")) == "single:2"
    assert parse_strategy(Strategy("full")) == Strategy("full")
    # Fields a kind does not use are normalised, so equal strategies are equal.
    assert Strategy("full", k=3, tau=0.5) == Strategy("full")


@pytest.mark.parametrize(
    "text",
    ["", "top", "top0", "topk:0", "topk:", "threshold", "threshold:0", "threshold:1.5", "threshold:-0.1",
     "single", "single:-1", "single:x", "best", "top1 full", "sample:2",
     "full+full:0.5", "oracle+full:0.5", "single:1+full:0.5", "top1+full:1", "top1+full:1.5", "top1+full:",
     "top1+full:-0.1", "top1+full:0.5+full:0.2", "+full:0.5"],
)
def test_parse_errors_name_accepted_forms(text):
    with pytest.raises(DDMError, match="accepted|needs"):
        parse_strategy(text)


def test_full_start_is_not_one_hot_and_needs_a_sparse_kind():
    assert parse_strategy("top1").one_hot and not parse_strategy("top1+full:0.5").one_hot
    assert not parse_strategy("sample+full:0.5").one_hot
    with pytest.raises(DDMError, match="top-k, threshold and sample"):
        Strategy("full", full_above=0.5)
    with pytest.raises(DDMError, match="0 <= T < 1"):
        Strategy("topk", k=1, full_above=-0.5)


def test_unknown_kind_error():
    with pytest.raises(DDMError, match="accepted"):
        Strategy("top")
    with pytest.raises(DDMError, match="accepted"):
        parse_strategy("nonsense")


# --------------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["full", "top1", "top2", "topk:3", "threshold:0.2", "sample", "oracle", "single:4"])
def test_rows_sum_to_one_and_float32(text):
    probs = _probs()
    labels = np.arange(64) % K
    w = route_weights(probs, parse_strategy(text), mask=ALL, rng=jax.random.key(0), labels=labels)
    assert w.dtype == jnp.float32 and w.shape == probs.shape
    np.testing.assert_allclose(np.asarray(w).sum(-1), 1.0, atol=1e-6)
    assert (np.asarray(w) >= 0).all()


@pytest.mark.parametrize("text", ["top1+full:0.5", "top2+full:0.5", "threshold:0.3+full:0.5", "sample+full:0.5"])
def test_full_start_uses_the_posterior_above_t_and_the_strategy_below(text):
    probs = _probs()
    t = np.linspace(0.0, 1.0, 64, dtype=np.float32)  # half of the rows above 0.5
    strategy = parse_strategy(text)
    base = parse_strategy(text.split("+")[0])
    key = jax.random.key(3)
    w = np.asarray(route_weights(probs, strategy, mask=ALL, rng=key, t=t))
    below = np.asarray(route_weights(probs, base, mask=ALL, rng=key))
    above = t > 0.5
    assert 0 < above.sum() < 64
    np.testing.assert_allclose(w[above], probs[above], rtol=1e-6)
    np.testing.assert_array_equal(w[~above], below[~above])
    # jitted with the strategy static, as the ensemble runs it
    jitted = jax.jit(route_weights, static_argnames=("strategy",))(probs, strategy=strategy, mask=ALL, rng=key, t=t)
    np.testing.assert_allclose(np.asarray(jitted), w, rtol=1e-6)


def test_full_start_needs_times():
    with pytest.raises(DDMError, match="needs the samples' times"):
        route_weights(_probs(), parse_strategy("top1+full:0.5"), mask=ALL)


def test_full_is_posterior():
    probs = _probs()
    np.testing.assert_allclose(route_weights(probs, parse_strategy("full"), mask=ALL), probs, rtol=1e-6)


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_topk_exactly_k_largest(k):
    probs = _probs()
    w = np.asarray(route_weights(probs, Strategy("topk", k=k), mask=ALL))
    assert ((w > 0).sum(-1) == k).all()
    order = np.argsort(-probs, axis=-1)
    for row in range(len(probs)):
        chosen = order[row, :k]
        assert set(np.flatnonzero(w[row])) == set(chosen)
        np.testing.assert_allclose(w[row, chosen], probs[row, chosen] / probs[row, chosen].sum(), rtol=1e-5)


def test_topk_is_per_sample():
    w = np.asarray(route_weights(_probs(), Strategy("topk", k=1), mask=ALL))
    assert len(set(np.argmax(w, -1))) > 1  # different samples pick different experts


def test_topk_more_than_experts_is_full():
    probs = _probs()
    np.testing.assert_allclose(route_weights(probs, Strategy("topk", k=9), mask=ALL), probs, rtol=1e-6)


def test_threshold_semantics():
    probs = np.array([[0.5, 0.3, 0.15, 0.05, 0.0], [0.22, 0.2, 0.2, 0.19, 0.19]], np.float32)
    w = np.asarray(route_weights(probs, Strategy("threshold", tau=0.2), mask=ALL))
    np.testing.assert_allclose(w[0], [0.5 / 0.8, 0.3 / 0.8, 0, 0, 0], rtol=1e-6)
    np.testing.assert_allclose(w[1], [0.22 / 0.62, 0.2 / 0.62, 0.2 / 0.62, 0, 0], rtol=1e-6)
    # Nothing passes tau: the sample falls back to its top-1 expert.
    w = np.asarray(route_weights(probs, Strategy("threshold", tau=0.9), mask=ALL))
    np.testing.assert_array_equal(w, np.eye(K, dtype=np.float32)[[0, 0]])
    # A tiny tau keeps every expert with positive posterior.
    w = np.asarray(route_weights(probs, Strategy("threshold", tau=1e-6), mask=ALL))
    np.testing.assert_allclose(w, probs / probs.sum(-1, keepdims=True), rtol=1e-6)


def test_masking_zeroes_and_renormalises():
    probs = _probs()
    mask = np.array([True, False, True, False, True])
    w = np.asarray(route_weights(probs, Strategy("full"), mask=mask))
    expected = probs * mask
    np.testing.assert_allclose(w, expected / expected.sum(-1, keepdims=True), rtol=1e-6)
    for text in ["top1", "top2", "threshold:0.3", "sample", "single:1", "oracle"]:
        w = np.asarray(
            route_weights(probs, parse_strategy(text), mask=mask, rng=jax.random.key(1), labels=np.ones(64, int))
        )
        assert (w[:, ~mask] == 0).all(), text
        np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-6)
    # top-1 under a mask is the best *available* expert.
    w = np.asarray(route_weights(probs, Strategy("topk", k=1), mask=mask))
    np.testing.assert_array_equal(np.argmax(w, -1), np.argmax(np.where(mask, probs, -1), -1))


def test_mask_with_all_available_mass_zero_is_uniform_over_available():
    probs = np.array([[1.0, 0.0, 0.0, 0.0, 0.0]], np.float32)
    mask = np.array([False, True, True, False, False])
    w = np.asarray(route_weights(probs, Strategy("full"), mask=mask))
    np.testing.assert_allclose(w, [[0, 0.5, 0.5, 0, 0]])


def test_sample_frequencies_match_posterior():
    """Each sample's draw follows its own posterior; over many draws the frequencies match."""
    p = np.array([0.5, 0.25, 0.15, 0.1, 0.0], np.float32)
    q = np.array([0.0, 0.1, 0.2, 0.3, 0.4], np.float32)
    n = 20_000
    probs = np.concatenate([np.tile(p, (n, 1)), np.tile(q, (n, 1))])
    w = np.asarray(jax.jit(route_weights, static_argnames="strategy")(
        probs, strategy=Strategy("sample"), mask=ALL, rng=jax.random.key(7)))
    assert ((w == 0) | (w == 1)).all() and (w.sum(-1) == 1).all()
    # Standard error of a frequency is <= 0.5 / sqrt(n) = 0.0035; 0.015 is > 4 sigma.
    np.testing.assert_allclose(w[:n].mean(0), p, atol=0.015)
    np.testing.assert_allclose(w[n:].mean(0), q, atol=0.015)
    assert w[:n, 4].sum() == 0 and w[n:, 0].sum() == 0  # zero-probability experts are never drawn


def test_sample_per_sample_keys_and_determinism():
    probs = _probs(256)
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.key(3), jnp.arange(256))
    fn = jax.jit(route_weights, static_argnames="strategy")
    a = np.asarray(fn(probs, strategy=Strategy("sample"), mask=ALL, rng=keys))
    b = np.asarray(fn(probs, strategy=Strategy("sample"), mask=ALL, rng=keys))
    np.testing.assert_array_equal(a, b)
    # The first 64 samples' draws do not depend on the rest of the batch.
    head = np.asarray(fn(probs[:64], strategy=Strategy("sample"), mask=ALL, rng=keys[:64]))
    np.testing.assert_array_equal(head, a[:64])
    c = np.asarray(fn(probs, strategy=Strategy("sample"), mask=ALL, rng=jax.random.key(4)))
    assert (a != c).any()
    with pytest.raises(DDMError, match="rng"):
        route_weights(probs, Strategy("sample"), mask=ALL)


def test_oracle_and_single():
    probs = _probs(10)
    labels = np.array([0, 1, 2, 3, 4, 4, 3, 2, 1, 0])
    w = np.asarray(route_weights(probs, Strategy("oracle"), mask=ALL, labels=labels))
    np.testing.assert_array_equal(w, np.eye(K, dtype=np.float32)[labels])
    w = np.asarray(route_weights(probs, Strategy("single", expert=3), mask=ALL))
    np.testing.assert_array_equal(w, np.eye(K, dtype=np.float32)[[3] * 10])
    with pytest.raises(DDMError, match="labels"):
        route_weights(probs, Strategy("oracle"), mask=ALL)
    with pytest.raises(DDMError, match="only 5"):
        route_weights(probs, Strategy("single", expert=5), mask=ALL)


def test_jit_matches_eager():
    probs = _probs()
    mask = np.array([True, True, False, True, True])
    fn = jax.jit(route_weights, static_argnames="strategy")
    for text in ["full", "top2", "threshold:0.25", "single:0"]:
        strategy = parse_strategy(text)
        jitted, eager = fn(probs, strategy=strategy, mask=mask), route_weights(probs, strategy, mask=mask)
        np.testing.assert_allclose(jitted, eager, rtol=1e-6)  # fusion may change the last bit, not more
