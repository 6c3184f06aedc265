"""Speckle: pixel-scale noise in generated images, measured against the data's own.

    speckle = mean |discrete Laplacian| of the samples / the same of real images

1 for samples as smooth as the data, above 1 for salt-and-pepper noise that FD in a feature net may not
single out. The issue-15 probe used it to ask whether the mnist10k experts' speckled samples come from their
learning rate, their EMA, or neither; nothing is learned, so it reads the same in every run.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def laplacian_energy(images: np.ndarray) -> float:
    """Mean |4 u - (sum of the 4 neighbours)| over interior pixels.

    images: [N, H, W, C] uint8 in [0, 255] (H, W >= 3); scaled to [0, 1] first.
    """
    if images.ndim != 4 or images.shape[1] < 3 or images.shape[2] < 3:
        raise ValueError(f"laplacian_energy needs images [N, H>=3, W>=3, C], got shape {images.shape}")
    u = images.astype(np.float64) / 255.0
    lap = 4 * u[:, 1:-1, 1:-1] - u[:, :-2, 1:-1] - u[:, 2:, 1:-1] - u[:, 1:-1, :-2] - u[:, 1:-1, 2:]
    return float(np.abs(lap).mean())


def speckle_ratios(samples: Mapping[str, np.ndarray], real: np.ndarray) -> dict[str, float]:
    """laplacian_energy of each named sample set / that of `real`, the real images' energy computed once.

    samples: name -> [N, H, W, C] uint8; real: [M, H, W, C] uint8 of the same H, W, C.
    """
    for name, images in samples.items():
        if images.shape[1:] != real.shape[1:]:
            raise ValueError(f"samples {name!r} {images.shape[1:]} and real images {real.shape[1:]} differ in shape")
    reference = laplacian_energy(real)
    if reference <= 1e-12:
        raise ValueError("the real images are constant: their Laplacian energy is 0")
    return {name: laplacian_energy(images) / reference for name, images in samples.items()}


def speckle_ratio(samples: np.ndarray, real: np.ndarray) -> float:
    """laplacian_energy(samples) / laplacian_energy(real); both [N, H, W, C] uint8 of the same H, W, C."""
    return speckle_ratios({"samples": samples}, real)["samples"]
