"""Where `ddm evaluate` measures a latent run (`data.kind: latents`).

The run's feature net (`ddm.eval.featurenet`) and class classifier learn from images, and a latent run's shards
hold latents. So FD / precision / recall are computed:

- with `sample.decoder` set (the user's VAE decoder, latents -> uint8 images): on the decoded images, in the
  user's `--features` if given (e.g. Inception: then FD is FID), else in the raw-pixel PCA of decoded training
  latents;
- without a decoder: on the latents themselves, in the PCA of the standardised training latents (latent-pca).

The report names the space (`featurenet.name`, `featurenet.description`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from ddm.core.codec import Codec
from ddm.core.errors import DDMError
from ddm.eval.features import UserFeatures
from ddm.eval.pixelpca import PixelPCA, fit_pixel_pca

FIT_ROWS = 5000  # the PCA basis is fitted on at most this many training rows (a fixed, seeded sample)


@dataclasses.dataclass(frozen=True)
class LatentSpace:
    """A feature space over a latent run's stored rows: float latents [N, h, w, c] -> float64 [N, D]."""

    name: str
    description: str
    fn: Callable[[np.ndarray], np.ndarray]
    dim: int | None

    def features(self, latents: np.ndarray) -> np.ndarray:
        return self.fn(latents)


def _decoded(decoder: Callable[[np.ndarray], np.ndarray], latents: np.ndarray) -> np.ndarray:
    """decoder(float32 latents [N, h, w, c]) -> uint8 images [N, H, W, C]; DDMError if it returns anything else."""
    images = np.asarray(decoder(np.asarray(latents, np.float32)))
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) != len(latents):
        raise DDMError(f"sample.decoder returned {images.dtype} {images.shape}; expected uint8 "
                       f"[{len(latents)}, H, W, C]")
    return images


def latent_spaces(codec: Codec, train: np.ndarray, decoder: Callable | None,
                  features: UserFeatures | None) -> tuple[LatentSpace, LatentSpace, PixelPCA]:
    """(the space of FD / precision / recall, the space of FD-PCA, the PCA behind the latter) for a latent run
    whose training rows are `train` (float latents [N, h, w, c], de-normalised as stored)."""
    sample = train[np.sort(np.random.default_rng(0).permutation(len(train))[:FIT_ROWS])]
    if decoder is None:
        if features is not None:
            raise DDMError(f"--features {features.name} takes images, and this latent run has no sample.decoder "
                           "to decode its latents with: set sample.decoder=module:function")
        pca = fit_pixel_pca(sample, codec=codec)
        space = LatentSpace(pca.name, "PCA of the run's standardised training latents: **FD on latents, not "
                            "images** (no sample.decoder is set)", pca.features, int(pca.basis.shape[1]))
        return space, space, pca
    pca = fit_pixel_pca(_decoded(decoder, sample))
    second = LatentSpace(f"decoded-{pca.name}", "raw-pixel PCA of the decoded training latents (sample.decoder)",
                         lambda rows: pca.features(_decoded(decoder, rows)), int(pca.basis.shape[1]))
    if features is None:
        return second, second, pca
    main = LatentSpace(features.name, f"the user's feature extractor `{features.name}` on latents decoded by "
                       "sample.decoder", lambda rows: features.features(_decoded(decoder, rows)), features.dim)
    return main, second, pca
