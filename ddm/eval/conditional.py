"""Condition following of a run conditioned on embeddings, measured without a model of what the embeddings mean.

The protocol of text-to-image evaluation (FID on held-out captions): each model draws one image for each of m
held-out images' condition embeddings, and the samples are scored against the held-out images:

- FD: the conditional samples' Fréchet distance to the held-out images, in the evaluation's feature space;
- condition match: for each sample, its nearest held-out image in that feature space, and the cosine similarity
  between that image's condition embedding and the one the sample was drawn for; the mean over the samples. A
  sample that follows its condition lands near images whose embeddings resemble it. Two references bound it:
  `chance` (each held-out embedding against another's, drawn by a fixed permutation: what a model ignoring its
  condition gets, up to the embeddings' own spread) and `real` (training images, each against its nearest
  held-out image: real data that follows its conditions).

It plays the role class accuracy plays for class labels, with no classifier: any embedding whose cosine similarity
means something (sentence or CLIP embeddings, the captioned digits' `ddm.data.captions.encode`) works.
"""

from __future__ import annotations

import numpy as np

from ddm.eval.metrics import pairwise_distances


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row pair: a, b float [n, *shape] (flattened per row) -> float64 [n] in [-1, 1];
    a zero row gives 0."""
    a = np.asarray(a, np.float64).reshape(len(a), -1)
    b = np.asarray(b, np.float64).reshape(len(b), -1)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.where(norms > 0, (a * b).sum(1) / np.where(norms > 0, norms, 1.0), 0.0)


def condition_match(features: np.ndarray, conditions: np.ndarray, real_features: np.ndarray,
                    real_conditions: np.ndarray) -> float:
    """Mean cosine similarity between each sample's condition and that of its nearest real image in features.

    features: float [n, F] of the samples, drawn for conditions float [n, *condition_shape]; real_features float
    [m, F] of the held-out images, whose embeddings are real_conditions float [m, *condition_shape]."""
    nearest = np.argmin(pairwise_distances(np.asarray(features, np.float64), np.asarray(real_features, np.float64)),
                        axis=1)
    return float(cosine_rows(conditions, np.asarray(real_conditions)[nearest]).mean())


def chance_match(real_conditions: np.ndarray, seed: int = 0) -> float:
    """Mean cosine similarity between each held-out embedding [m, *condition_shape] and the next one in a seeded
    permutation (never itself): what samples that ignore their conditions score, in expectation."""
    order = np.random.default_rng(seed).permutation(len(real_conditions))
    return float(cosine_rows(real_conditions[order], real_conditions[np.roll(order, 1)]).mean())
