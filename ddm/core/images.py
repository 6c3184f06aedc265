"""Images as ddm stores and shows them: uint8 <-> model range conversions and PNG grids.

Convention (docs/design.md): images are stored as uint8 [N, H, W, C]; models see float32 in [-1, 1]
(`x / 127.5 - 1`); outputs go back with round(clip((x + 1) * 127.5, 0, 255)). These two functions are the only
place the mapping is written.
"""

from __future__ import annotations

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from ddm.core.errors import DDMError


def to_model_range(images: np.ndarray | jax.Array) -> np.ndarray | jax.Array:
    """uint8 [..., H, W, C] -> float32 in [-1, 1]. numpy in, numpy out; a jax array (traced too) stays jax."""
    if isinstance(images, jax.Array):
        return images.astype(jnp.float32) / 127.5 - 1.0
    return np.asarray(images).astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def to_uint8(x: np.ndarray | jax.Array) -> np.ndarray:
    """Images in [-1, 1] (float [..., H, W, C]) -> uint8, round(clip((x + 1) * 127.5, 0, 255)), on the host."""
    x = np.asarray(x, np.float32)
    return np.round(np.clip((x + 1.0) * np.float32(127.5), 0.0, 255.0)).astype(np.uint8)


def make_grid(images: np.ndarray, ncols: int, *, pad: int = 1, pad_value: int = 0) -> np.ndarray:
    """Tiles uint8 images [n, H, W, C] into one uint8 image [rows*(H+pad)+pad, ncols*(W+pad)+pad, C].

    Cells fill row by row; unused cells and the `pad`-pixel borders are `pad_value`.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise DDMError(f"make_grid needs uint8 images [n, H, W, C], got {images.dtype} {images.shape}")
    n, h, w, c = images.shape
    if n == 0:
        raise DDMError("make_grid needs at least one image")
    if ncols < 1:
        raise DDMError(f"make_grid needs ncols >= 1, got {ncols}")
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), pad_value, np.uint8)
    for i in range(n):
        r, q = divmod(i, ncols)
        top, left = pad + r * (h + pad), pad + q * (w + pad)
        grid[top : top + h, left : left + w] = images[i]
    return grid


def grid_image(images: np.ndarray, ncols: int | None = None, scale: int | None = None, pad: int = 1) -> np.ndarray:
    """uint8 images [n, H, W, C] (C = 1 or 3) tiled into one viewable uint8 image [H', W', C].

    ncols: default ceil(sqrt(n)). scale: integer nearest-neighbour upscaling of each image (default: enough
    to make cells at least 64 pixels, so 8x8 digits are viewable), applied before tiling so borders stay thin.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise DDMError(f"a grid needs images [n, H, W, 1 or 3], got {images.shape}")
    n, h, w, _ = images.shape
    if scale is None:
        scale = max(1, math.ceil(64 / max(1, min(h, w))))
    if scale < 1:
        raise DDMError(f"scale must be >= 1, got {scale}")
    if scale > 1:
        images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    return make_grid(images, ncols or math.ceil(math.sqrt(n)), pad=pad)


def save_png(image: np.ndarray, path: str | Path, title: str | None = None) -> Path:
    """Writes one uint8 image [H, W, C] (C = 1: mode "L", C = 3: "RGB") as a PNG, with an optional Title text
    chunk (what the image shows); returns the path."""
    from PIL.PngImagePlugin import PngInfo

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = None
    if title:
        info = PngInfo()
        info.add_text("Title", title)
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path, format="PNG", pnginfo=info)
    return path


def save_grid_png(
    images: np.ndarray, path: str | Path, ncols: int | None = None, scale: int | None = None, pad: int = 1
) -> Path:
    """Writes uint8 images [n, H, W, C] (C = 1 or 3) as one PNG grid (`grid_image`); returns the path."""
    return save_png(grid_image(images, ncols, scale, pad), path)
