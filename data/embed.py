"""Features for clustering: raw pixels, PCA of pixels, precomputed vectors from a file, or the images' condition
embeddings (`data.embedding: conditions`, the text of a captioned dataset: `condition_features`).

No pretrained Flax image encoder ships offline, so semantic clustering (e.g. DINOv2 features, as in the DDM
paper) comes in through `embedding: file`: compute the vectors anywhere, one row per image, and point
`data.features_path` at a `.npy` or `.parquet` file.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from ddm.core.config import DataConfig
from ddm.core.errors import DDMError
from ddm.core.images import to_model_range


def embed(images: np.ndarray, cfg: DataConfig, base_dir: Path | None = None) -> np.ndarray:
    """Features for k-means. images: [N, H, W, C] uint8 -> [N, D] float32."""
    if cfg.embedding == "file":
        return load_features(cfg, len(images), base_dir)
    pixels = to_model_range(images.reshape(len(images), -1))
    if cfg.embedding == "pixels":
        return pixels
    return pca(pixels, cfg.embed_dim, cfg.seed)


def pca(x: np.ndarray, dim: int, seed: int) -> np.ndarray:
    """Projects x: [N, D] onto its top `dim` principal components -> [N, min(dim, N, D)] float32."""
    return fit_pca(x, dim, seed)[0]


def fit_pca(x: np.ndarray, dim: int, seed: int):
    """(x projected [N, min(dim, N, D)] float32, the fitted scikit-learn PCA to project further rows with)."""
    from sklearn.decomposition import PCA

    dim = min(dim, x.shape[0], x.shape[1])
    model = PCA(n_components=dim, random_state=seed)
    return model.fit_transform(x).astype(np.float32), model


Encode = Callable[[np.ndarray], np.ndarray]  # stored rows [n, H, W, C] -> model space float32 [n, H, W, C]


def fit_embedding(sample: np.ndarray, encode: Encode, cfg: DataConfig) -> tuple[np.ndarray, Encode]:
    """Fits the embedding on a bounded sample of stored rows [S, H, W, C] (images or latents, seen through
    `encode`); returns (the sample's features [S, D] float32, a function giving any further rows' features).

    With the whole dataset as the sample this is `embed` exactly. `embedding: file` is not fitted: see
    `load_features`.
    """
    def pixels(rows: np.ndarray) -> np.ndarray:
        return np.asarray(encode(rows), np.float32).reshape(len(rows), -1)

    if cfg.embedding == "pixels":
        return pixels(sample), pixels
    if cfg.embedding != "pca":
        raise DDMError(f"embedding {cfg.embedding!r} is not fitted on images")
    features, model = fit_pca(pixels(sample), cfg.embed_dim, cfg.seed)
    return features, lambda rows: model.transform(pixels(rows)).astype(np.float32)


def condition_features(conditions: np.ndarray) -> np.ndarray:
    """Clustering features of condition embeddings: [n, D] pooled as they are, [n, L, D] tokens averaged over
    L; float32 [n, D]."""
    conditions = np.asarray(conditions, np.float32)
    return conditions.mean(axis=1) if conditions.ndim == 3 else conditions


def load_features(cfg: DataConfig, n: int, base_dir: Path | None = None) -> np.ndarray:
    """Reads precomputed features ([N, D], one row per image in dataset order) and checks them."""
    path = Path(cfg.features_path).expanduser()
    if not path.is_absolute() and not path.exists() and base_dir is not None:
        path = base_dir / path
    if not path.is_file():
        raise DDMError(f"features file not found: {cfg.features_path}")
    if path.suffix == ".npy":
        try:
            features = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise DDMError(f"cannot read features file {path}: {err}") from None
    elif path.suffix == ".parquet":
        features = _parquet_column(path, cfg.features_column)
    else:
        raise DDMError(f"features file {path} must be .npy or .parquet")
    if features.ndim != 2:
        raise DDMError(f"features in {path} have shape {features.shape}; expected [N, D]")
    if cfg.limit is not None:
        features = features[: cfg.limit]
    if len(features) != n:
        raise DDMError(f"features in {path} have {len(features)} rows but the dataset has {n} images")
    features = features.astype(np.float32)
    bad = ~np.isfinite(features).all(axis=1)
    if bad.any():
        raise DDMError(f"features in {path} contain NaN or Inf in {int(bad.sum())} row(s), first row {int(np.argmax(bad))}")
    return features


def _parquet_column(path: Path, column: str | None) -> np.ndarray:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    if column is None:
        if table.num_columns != 1:
            raise DDMError(f"{path} has columns {table.column_names}; set data.features_column")
        column = table.column_names[0]
    if column not in table.column_names:
        raise DDMError(f"{path} has no column {column!r} (columns: {table.column_names})")
    values = table.column(column).to_pylist()
    try:
        return np.asarray(values, dtype=np.float64)
    except ValueError:
        raise DDMError(f"column {column!r} of {path} is not a list of equal-length vectors") from None
