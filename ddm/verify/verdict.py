"""`ddm verify`: regenerate a record's claimed output and judge it.

A verifier regenerates from the record's request and compares per image. Bitwise equality
(same SHA-256) is expected on the same software and hardware; across hardware, tiny float differences may
flip a few pixels, so an image passes when its pHash Hamming distance is within the threshold. The default
threshold comes from measured distributions (docs/verification.md, `ddm consensus-eval`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ddm.core.errors import DDMError
from ddm.core.hashing import images_sha256
from ddm.data.run import Run
from ddm.sampling.load import load_ensemble
from ddm.sampling.request import generate
from ddm.verify.phash import HASH_BITS, hamming, hex_to_hash, perceptual_hashes
from ddm.verify.records import read_record

# The largest pHash Hamming distance per image that still passes. Picked by `ddm consensus-eval` on runs/digits
# (32 requests x 16 images, heun 30 steps): honest regenerations <= 2 bits, nearest different images >= 2 bits;
# see docs/verification.md for the distributions and the rule.
DEFAULT_THRESHOLD = 2


@dataclass(frozen=True)
class Verdict:
    honest: bool
    exact: bool  # bitwise-identical batch
    distances: list[int]  # pHash Hamming distance per image
    dhash_distances: list[int]
    threshold: int

    def to_json(self) -> dict:
        return {"honest": self.honest, "exact": self.exact, "distances": self.distances,
                "dhash_distances": self.dhash_distances, "threshold": self.threshold}


def hash_distances(record: dict, hashes: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """Per-image (pHash, dHash) Hamming distances between a record's hashes and `hashes` (same layout)."""
    if len(hashes) != len(record["images"]):
        raise DDMError(f"{len(hashes)} image hashes to compare with a record of {len(record['images'])}")
    dp = [hamming(hex_to_hash(a["phash"]), hex_to_hash(b["phash"])) for a, b in zip(record["images"], hashes)]
    dd = [hamming(hex_to_hash(a["dhash"]), hex_to_hash(b["dhash"])) for a, b in zip(record["images"], hashes)]
    return dp, dd


def compare(record: dict, images: np.ndarray, threshold: int = DEFAULT_THRESHOLD) -> Verdict:
    """Judges a claim against regenerated images: uint8 [n, H, W, C]. Honest when the batch is bitwise
    identical or every image's pHash is within `threshold` bits of the claimed one."""
    if list(images.shape) != list(record["shape"]):
        raise DDMError(f"regenerated images have shape {list(images.shape)}, the record claims {record['shape']}")
    dp, dd = hash_distances(record, perceptual_hashes(images))
    exact = images_sha256(images) == record["sha256"]
    return Verdict(honest=exact or max(dp) <= threshold, exact=exact, distances=dp, dhash_distances=dd,
                   threshold=threshold)


def check_record_fits_run(record: dict, run: Run) -> None:
    """DDMError unless the record names this run (manifest SHA-256) and its image shape."""
    run_dir = run.root
    actual = run.sha256
    if actual != record["manifest_sha256"]:
        raise DDMError(f"run {run_dir} has manifest SHA-256 {actual[:16]}, the record names "
                       f"{record['manifest_sha256'][:16]}: not the same run")
    image_shape = list(run.image_shape)
    if list(record["shape"][1:]) != image_shape:
        raise DDMError(f"record claims images of shape {record['shape'][1:]}, but run {run_dir} makes {image_shape}")


def verify_record(run_dir: str, record_path: str | Path, *, threshold: int = DEFAULT_THRESHOLD,
                  overrides=()) -> Verdict:
    """Regenerates the record's request on `run_dir` and compares. DDMError if the record is malformed or the
    run does not match it (manifest SHA-256, image shape, a checkpoint that fails its SHA-256 pin)."""
    if not isinstance(threshold, int) or not 0 <= threshold <= HASH_BITS:
        raise DDMError(f"threshold must be an integer in [0, {HASH_BITS}], got {threshold!r}")
    record, request = read_record(record_path)
    run = Run.open(run_dir, overrides)
    check_record_fits_run(record, run)
    return compare(record, generate(load_ensemble(run), request).images, threshold)


def format_verdict(verdict: Verdict) -> str:
    lines = [f"{'image':>5}  {'phash dist':>10}  {'dhash dist':>10}  verdict"]
    for i, (dp, dd) in enumerate(zip(verdict.distances, verdict.dhash_distances)):
        t = verdict.threshold
        lines.append(f"{i:>5}  {dp:>10}  {dd:>10}  {f'ok (<= {t})' if dp <= t else f'MISMATCH (> {t})'}")
    overall = "HONEST" if verdict.honest else "NOT HONEST"
    lines.append(f"overall: {overall} ({'bitwise identical' if verdict.exact else 'not bitwise identical'}, "
                 f"max pHash distance {max(verdict.distances)}, threshold {verdict.threshold})")
    return "\n".join(lines)
