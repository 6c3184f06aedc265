"""Raw-pixel PCA features: a second feature space for FD, with nothing learned but a linear projection.

FD in the project's feature net (`ddm.eval.featurenet`) depends on what that small net happened to learn; an
ordering of models that holds in both the net's features and the training pixels' principal components is not
an artefact of one feature space. The basis is fitted on the run's training images (every shard), so every
model of a run is measured in the same coordinates. Latent runs use the same projection of the standardised
latents (`ddm.core.codec.Codec.encode`), named latent-pca.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ddm.core.codec import Codec

DEFAULT_DIM = 32


@dataclasses.dataclass(frozen=True)
class PixelPCA:
    """mean: [P] float64 pixel mean; basis: [P, D] float64 orthonormal principal directions (P = H * W * C);
    codec: how stored rows become model values (images: [-1, 1]; latents: standardised)."""

    mean: np.ndarray
    basis: np.ndarray
    codec: Codec = Codec()

    @property
    def name(self) -> str:
        return f"{'latent' if self.codec.latents else 'pixel'}-pca{self.basis.shape[1]}"

    def features(self, images: np.ndarray) -> np.ndarray:
        """images: uint8 [N, H, W, C] (or the run's float latents) -> float64 [N, D], coordinates in model
        units ([-1, 1] pixels, or standard deviations of each latent channel)."""
        return (_model_values(images, self.codec) - self.mean) @ self.basis


def _model_values(images: np.ndarray, codec: Codec) -> np.ndarray:
    """Stored rows [N, ...] -> float64 [N, P] in model units."""
    if codec.latents:
        return np.asarray(codec.encode(np.asarray(images)), np.float64).reshape(len(images), -1)
    return np.asarray(images, np.float64).reshape(len(images), -1) / 127.5 - 1.0


def fit_pixel_pca(images: np.ndarray, dim: int = DEFAULT_DIM, codec: Codec = Codec()) -> PixelPCA:
    """The top-`dim` principal directions (capped at the pixel count and N - 1) of uint8 images [N, H, W, C]
    (or float latents, standardised by `codec`)."""
    x = _model_values(images, codec)
    mean = x.mean(0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    dim = min(dim, vt.shape[0], max(len(images) - 1, 1))
    return PixelPCA(mean, vt[:dim].T.copy(), codec)
