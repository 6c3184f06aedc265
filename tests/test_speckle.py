"""ddm.eval.speckle: the Laplacian-energy ratio that tells speckled samples from smooth ones."""

from __future__ import annotations

import numpy as np
import pytest

from ddm.eval.speckle import laplacian_energy, speckle_ratio


def _strokes(n: int, seed: int) -> np.ndarray:
    """Smooth blobs: [n, 16, 16, 1] uint8."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:16, :16]
    centres = rng.uniform(4, 12, (n, 2))
    blobs = np.exp(-((yy - centres[:, :1, None]) ** 2 + (xx - centres[:, 1:, None]) ** 2) / 8.0)
    return (blobs[..., None] * 255).astype(np.uint8)


def test_laplacian_energy_of_a_known_pattern():
    """A constant image has none; one bright pixel in the interior gives |4| at itself and |-1| at its four
    neighbours: 8 over the 14 x 14 interior."""
    flat = np.full((1, 16, 16, 1), 77, np.uint8)
    assert laplacian_energy(flat) == pytest.approx(0.0, abs=1e-12)
    dot = np.zeros((1, 16, 16, 1), np.uint8)
    dot[0, 8, 8, 0] = 255
    assert laplacian_energy(dot) == pytest.approx(8 / 14**2)


def test_speckle_ratio_is_one_for_the_data_and_grows_with_pixel_noise():
    real = _strokes(64, 0)
    assert speckle_ratio(real, real) == pytest.approx(1.0)
    assert speckle_ratio(_strokes(64, 1), real) == pytest.approx(1.0, abs=0.15)  # other smooth images
    rng = np.random.default_rng(2)
    noisy = np.clip(real.astype(int) + rng.integers(-40, 41, real.shape), 0, 255).astype(np.uint8)
    assert speckle_ratio(noisy, real) > 3.0


def test_speckle_refuses_mismatched_or_constant_inputs():
    real = _strokes(4, 0)
    with pytest.raises(ValueError, match="differ in shape"):
        speckle_ratio(real[:, :8], real)
    with pytest.raises(ValueError, match="constant"):
        speckle_ratio(real, np.zeros_like(real))
    with pytest.raises(ValueError, match=r"\[N, H>=3"):
        laplacian_energy(real[0])
