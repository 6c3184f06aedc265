"""Sample-quality metrics on feature vectors: Fréchet distance, k-NN precision/recall, cluster coverage.

Pure numpy in float64; features are [N, D] arrays from any feature extractor.
"""

from __future__ import annotations

import numpy as np

from ddm.core.errors import DDMError

KNN_K = 3


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean [D], covariance [D, D]) of features [N, D] (N >= 2), float64, unbiased covariance."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise DDMError(f"Fréchet distance needs features [N >= 2, D], got {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def frechet_distance_from_stats(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)).

    Tr (S1 S2)^(1/2) = Tr (A S2 A)^(1/2) with A = S1^(1/2): both square roots are of symmetric PSD matrices,
    computed by eigendecomposition (real and stable, unlike a general sqrtm of the non-symmetric S1 S2).
    """
    diff = np.asarray(mu1, np.float64) - np.asarray(mu2, np.float64)
    w, v = np.linalg.eigh(np.asarray(sigma1, np.float64))
    a = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    m = a @ np.asarray(sigma2, np.float64) @ a
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None)).sum()
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean
    return float(max(value, 0.0))


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """FD between the Gaussians fitted to features a [Na, D] and b [Nb, D]."""
    return frechet_distance_from_stats(*gaussian_stats(a), *gaussian_stats(b))


def pairwise_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distances [Na, Nb] (float64) between rows of a [Na, D] and b [Nb, D]."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.sqrt(np.clip(sq, 0.0, None))


def knn_radii(features: np.ndarray, k: int = KNN_K) -> np.ndarray:
    """Distance from each row of features [N, D] to its k-th nearest other row: [N] float64."""
    if len(features) <= k:
        raise DDMError(f"k-NN radii need more than k={k} points, got {len(features)}")
    d = pairwise_distances(features, features)
    return np.partition(d, k, axis=1)[:, k]  # column 0 is the point itself (distance 0)


def _inside(points: np.ndarray, centres: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """[Np] bool: is each point within radius of at least one centre."""
    return (pairwise_distances(points, centres) <= radii[None, :]).any(1)


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = KNN_K) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of fake [Nf, D] against real [Nr, D].

    precision: share of fake points inside the real manifold (balls around each real point reaching its k-th
    nearest real neighbour); recall: share of real points inside the fake manifold, defined the same way.
    """
    precision = _inside(fake, real, knn_radii(real, k)).mean()
    recall = _inside(real, fake, knn_radii(fake, k)).mean()
    return float(precision), float(recall)


def shares(labels: np.ndarray, k: int) -> np.ndarray:
    """Share of each of k classes in labels [N]: [k] float64 summing to 1."""
    return np.bincount(np.asarray(labels), minlength=k)[:k] / max(len(labels), 1)


def total_variation(p: np.ndarray, q: np.ndarray) -> float:
    return float(0.5 * np.abs(np.asarray(p) - np.asarray(q)).sum())


def quality(real: np.ndarray, fake: np.ndarray, k: int = KNN_K) -> dict:
    """FD, precision and recall of fake features against real features."""
    precision, recall = precision_recall(real, fake, k)
    return {"fd": frechet_distance(real, fake), "precision": precision, "recall": recall}
