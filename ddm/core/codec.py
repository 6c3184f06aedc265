"""What a model sees of the stored data, and back: one small codec per run, chosen by its manifest.

Shards hold exact values: uint8 images, or float16 / float32 latents (e.g. SD-VAE latents [N, 32, 32, 4]).
Models see float32 in a normalised range:

    images   uint8 x   -> x / 127.5 - 1                  (`ddm.core.images.to_model_range`)
    latents  float x   -> (x - mean[c]) / std[c]         per channel c (mean, std computed at prepare time and
                                                          stored in the manifest; or mean 0, std 1 / latent_scale
                                                          for a single factor such as SD's 0.18215)

and sampled outputs go back through the inverse (`decode`). `preview` turns model-space outputs into uint8
images for grids and perceptual hashes: the images themselves, or for latents a fixed visualisation of
channels 0..2 (or channel 0), each mapped from [-2, 2] standard deviations to [0, 255].
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ddm.core.config import DATA_KINDS as KINDS
from ddm.core.errors import DDMError
from ddm.core.images import to_model_range, to_uint8

PREVIEW_SPAN = 2.0  # the latent preview maps [-PREVIEW_SPAN, PREVIEW_SPAN] standard deviations to [0, 255]
LATENT_PREVIEW_TITLE = (f"latent channels 0-2 as RGB, +-{PREVIEW_SPAN:g} std per channel (a fixed visualisation, "
                        "not decoded: set sample.decoder)")


@dataclasses.dataclass(frozen=True)
class Codec:
    """kind "images": uint8 <-> [-1, 1]. kind "latents": float <-> per-channel standardised float32."""

    kind: str = "images"
    mean: tuple[float, ...] = ()  # [C] per-channel mean of the stored latents (latents only)
    std: tuple[float, ...] = ()  # [C] per-channel scale: model value = (x - mean) / std

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise DDMError(f"data kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.kind == "latents":
            if not self.std or len(self.mean) != len(self.std):
                raise DDMError(f"latent normalisation needs one mean and std per channel, got {self.mean}, {self.std}")
            if not all(np.isfinite(s) and s > 0 for s in self.std) or not all(np.isfinite(m) for m in self.mean):
                raise DDMError(f"latent normalisation has a non-finite mean or a std <= 0: {self.mean}, {self.std}")

    @property
    def latents(self) -> bool:
        return self.kind == "latents"

    def encode(self, stored: np.ndarray | jax.Array) -> np.ndarray | jax.Array:
        """Stored values [..., C] (uint8 images or float latents) -> float32 model space; numpy stays numpy,
        jax (traced too) stays jax."""
        if not self.latents:
            return to_model_range(stored)
        xp = jnp if isinstance(stored, jax.Array) else np
        mean, std = np.asarray(self.mean, np.float32), np.asarray(self.std, np.float32)
        return (xp.asarray(stored).astype(xp.float32) - mean) / std

    def decode(self, x: np.ndarray | jax.Array) -> np.ndarray:
        """Model space float [..., C] -> stored values on the host: uint8 images, or float32 latents."""
        if not self.latents:
            return to_uint8(x)
        x = np.asarray(x, np.float32)
        return x * np.asarray(self.std, np.float32) + np.asarray(self.mean, np.float32)

    def preview(self, x: np.ndarray | jax.Array) -> np.ndarray:
        """Model space float [n, H, W, C] -> viewable uint8 [n, H, W, 1 or 3] (for grids and perceptual hashes)."""
        if not self.latents:
            return to_uint8(x)
        x = np.asarray(x, np.float32)
        channels = x[..., :3] if x.shape[-1] >= 3 else x[..., :1]
        return to_uint8(channels / PREVIEW_SPAN)


    def to_dict(self) -> dict:
        return {"kind": self.kind, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, values: dict | None) -> Codec:
        """The codec a manifest's `dataset.codec` describes; runs prepared before latents existed are images."""
        if not values:
            return cls()
        return cls(kind=values["kind"], mean=tuple(float(m) for m in values.get("mean", ())),
                   std=tuple(float(s) for s in values.get("std", ())))


def latent_codec(sums: np.ndarray, sq_sums: np.ndarray, count: int, scale: float | None) -> Codec:
    """The codec of latents from per-channel float64 sums [C] and sums of squares [C] over `count` values per
    channel, or, with `scale`, the single factor std = 1 / scale and mean 0 (SD's 0.18215)."""
    channels = len(sums)
    if scale is not None:
        return Codec("latents", (0.0,) * channels, (1.0 / scale,) * channels)
    mean = sums / count
    var = np.maximum(sq_sums / count - mean**2, 0.0)
    std = np.sqrt(var)
    if (std <= 0).any():
        raise DDMError(f"latent channel {int(np.argmax(std <= 0))} is constant: it cannot be normalised "
                       "(set data.latent_scale)")
    return Codec("latents", tuple(float(m) for m in mean), tuple(float(s) for s in std))
