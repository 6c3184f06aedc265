"""What a generation leaves on disk: a PNG grid and, beside it, an .npz of images, routing and request."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ddm.core.codec import LATENT_PREVIEW_TITLE
from ddm.core.errors import DDMError
from ddm.core.images import grid_image, save_png
from ddm.core.plugins import import_function
from ddm.sampling.ensemble import SampleResult
from ddm.sampling.request import Request


def _in_place(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def load_decoder(spec: str | None) -> Callable[[np.ndarray], np.ndarray] | None:
    """`sample.decoder` ("module:function", e.g. a user's VAE decoder) -> the function, or None when unset.
    The function maps de-normalised latents float32 [n, h, w, c] to uint8 images [n, H, W, 1 or 3]."""
    return import_function(spec, "sample.decoder") if spec else None


def viewable(result: SampleResult, decoder: Callable | None = None) -> tuple[np.ndarray, str]:
    """(uint8 images [n, H, W, C] to show, what they show). Images as sampled; latents through `decoder`, or
    without one the fixed channel visualisation of `ddm.core.codec` (the title says so)."""
    if result.latents is None:
        return result.images, ""
    if decoder is None:
        return result.images, LATENT_PREVIEW_TITLE
    images = np.asarray(decoder(result.latents))
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) != len(result.latents):
        raise DDMError(f"sample.decoder returned {images.dtype} {images.shape}; expected uint8 "
                       f"[{len(result.latents)}, H, W, C]")
    return images, "decoded latents"


def save_outputs(result: SampleResult, request: Request, out_png: Path, *, manifest_sha: str,
                 ncols: int | None = None, decoder: Callable | None = None,
                 stage: Callable[[Path], Path] = _in_place, conditions: np.ndarray | None = None) -> Path:
    """Writes the grid PNG and, beside it, an .npz of images + routing decisions + request. Returns the npz.

    npz keys: images uint8 [n, H, W, C], weights float32 [steps, n, K], expert_ids int32 [steps, n] (one-hot
    strategies only), experts int32 [n] (each image's one expert, for the strategies that fix it before the
    solve: prior, oracle, single), request (JSON text), manifest_sha256 (text); for latent runs also latents float32
    [n, h, w, c] (de-normalised: the values the shards store), and `images` are what the grid shows (decoded
    by `decoder`, or the channel visualisation, named in the PNG's Title); for runs conditioned on embeddings
    conditions float32 [n, *condition_shape], the `conditions` given (what the request's conditions_sha256
    names: `ddm sample --conditions` and `ddm verify --conditions` read them back from this file).
    stage: where each file's bytes go first (`ddm.core.files.Staged.stage`: a temporary name renamed once every
    output is written); default: straight to the file.
    """
    images, title = viewable(result, decoder)
    save_png(grid_image(images, ncols), stage(out_png), title=title or None)
    npz = out_png.with_suffix(".npz")
    arrays = {"images": images, "weights": result.weights,
              "request": np.array(json.dumps(request.to_json())), "manifest_sha256": np.array(manifest_sha)}
    if result.latents is not None:
        arrays["latents"] = result.latents
    if result.expert_ids is not None:
        arrays["expert_ids"] = result.expert_ids
    if result.experts is not None:
        arrays["experts"] = result.experts
    if conditions is not None:
        arrays["conditions"] = np.ascontiguousarray(conditions, np.float32)
    with open(stage(npz), "wb") as f:  # a file object: numpy would append .npz to a temporary name
        np.savez_compressed(f, **arrays)
    return npz


def save_pngs(images: np.ndarray, folder: str | Path, stage: Callable[[Path], Path] = _in_place) -> list[Path]:
    """One PNG per image (uint8 [n, H, W, C], C = 1 or 3) as folder/000000.png, 000001.png, ... at native size:
    what clean-fid, torch-fidelity and other folder-based metrics read. Returns the paths."""
    folder = Path(folder)
    width = max(6, len(str(len(images) - 1)))
    paths = [folder / f"{i:0{width}d}.png" for i in range(len(images))]
    for image, path in zip(np.asarray(images), paths):
        save_png(image, stage(path))
    return paths


def usage_summary(result: SampleResult) -> str:
    """Share of routing weight each expert received, over all steps and samples."""
    share = np.asarray(result.weights).reshape(-1, result.weights.shape[-1]).mean(0)
    return "expert usage: " + " ".join(f"{k}:{s:.2f}" for k, s in enumerate(share))
