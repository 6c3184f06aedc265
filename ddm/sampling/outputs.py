"""What a generation leaves on disk: a PNG grid and, beside it, an .npz of images, routing and request."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ddm.core.ensemble import SampleResult
from ddm.core.images import save_grid_png, save_png
from ddm.sampling.request import Request


def _in_place(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def save_outputs(result: SampleResult, request: Request, out_png: Path, *, manifest_sha: str,
                 ncols: int | None = None, stage: Callable[[Path], Path] = _in_place) -> Path:
    """Writes the grid PNG and, beside it, an .npz of images + routing decisions + request. Returns the npz.

    npz keys: images uint8 [n, H, W, C], weights float32 [steps, n, K], expert_ids int32 [steps, n] (one-hot
    strategies only), request (JSON text), manifest_sha256 (text).
    stage: where each file's bytes go first (`ddm.core.files.Staged.stage`: a temporary name renamed once every
    output is written); default: straight to the file.
    """
    npz = out_png.with_suffix(".npz")
    save_grid_png(result.images, stage(out_png), ncols=ncols)
    arrays = {"images": result.images, "weights": result.weights,
              "request": np.array(json.dumps(request.to_json())), "manifest_sha256": np.array(manifest_sha)}
    if result.expert_ids is not None:
        arrays["expert_ids"] = result.expert_ids
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
