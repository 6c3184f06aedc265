"""The thresholds a verdict uses, and the file `ddm consensus-eval` calibrates them into.

- phash: the largest per-image pHash Hamming distance that passes in phash mode;
- max_abs, rms: the largest per-image max |dx| and RMS dx between the regenerated and the claimed values
  (float32 model range, [-1, 1] spans 255 uint8 levels) that pass in tolerance mode;
- median_max_abs, median_rms: in tolerance mode, for a claim of at least `MEDIAN_MIN_IMAGES` images, the largest
  median over its images of those two distances. Honest drift across hardware is small for most images and
  large for a few (where a near-tie in top-1 routing or a rounding boundary amplifies it); a lazy claim (fewer
  steps, another solver, a perturbed model) moves every image. The per-image bounds must admit the honest
  outliers; the median bounds hold the bulk to the typical drift.

`ddm verify` takes them from, in order: its flags, RUN/eval/verify_thresholds.json (written by
`ddm consensus-eval` from the honest drift its verifiers measured), the built-in defaults below.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from ddm.core import documents
from ddm.core.errors import DDMError
from ddm.core.schema import Anything, Hex, Int, Num, Obj, Str
from ddm.verify.phash import HASH_BITS

THRESHOLDS_FORMAT = "ddm-verify-thresholds/v1"
THRESHOLDS_FILE = "verify_thresholds.json"

# pHash: picked by `ddm consensus-eval` on runs/digits (32 requests x 16 images, heun 30 steps): honest
# regenerations <= 2 bits, nearest different images >= 2 bits (docs/verification.md).
DEFAULT_THRESHOLD = 2
# Tolerance: 2 x the largest honest drift `ddm consensus-eval` measured on runs/digits with its default
# verifiers (32 requests x 16 images, heun 30 steps; the TF32-weight verifier dominates: per image max |dx| 3.2e-2
# and RMS 8.2e-3 at worst, per-claim medians 1.2e-3 and 3.1e-4; docs/verification.md).
DEFAULT_MAX_ABS = 0.064
DEFAULT_RMS = 0.016
DEFAULT_MEDIAN_MAX_ABS = 2.4e-3
DEFAULT_MEDIAN_RMS = 6.2e-4
MEDIAN_MIN_IMAGES = 5  # below this a median is one or two images: too few to tell outliers from the bulk


VALUE_FIELDS = ("max_abs", "rms", "median_max_abs", "median_rms")
THRESHOLDS_SCHEMA = Obj({"format": Str(), "manifest_sha256": Hex(64), "phash": Int(min=0, max=HASH_BITS),
                         **{name: Num(min=0) for name in VALUE_FIELDS}},
                        optional={"calibration": Anything()})  # how they were measured: recorded, never checked


@dataclasses.dataclass(frozen=True)
class Thresholds:
    phash: int = DEFAULT_THRESHOLD
    max_abs: float = DEFAULT_MAX_ABS
    rms: float = DEFAULT_RMS
    median_max_abs: float = DEFAULT_MEDIAN_MAX_ABS
    median_rms: float = DEFAULT_MEDIAN_RMS
    source: str = "built-in defaults"

    def __post_init__(self) -> None:
        if isinstance(self.phash, bool) or not isinstance(self.phash, int) or not 0 <= self.phash <= HASH_BITS:
            raise DDMError(f"threshold must be an integer in [0, {HASH_BITS}], got {self.phash!r}")
        for name in VALUE_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise DDMError(f"{name} threshold must be a finite number >= 0, got {value!r}")

    def to_json(self) -> dict:
        return {"phash": self.phash, **{k: getattr(self, k) for k in VALUE_FIELDS}, "source": self.source}


DEFAULT_THRESHOLDS = Thresholds()


def thresholds_path(eval_dir: str | Path) -> Path:
    return Path(eval_dir) / THRESHOLDS_FILE


def write_thresholds(eval_dir: str | Path, manifest_sha: str, thresholds: Thresholds, calibration: dict) -> Path:
    """Writes the calibrated thresholds (and how they were measured) for the run named by `manifest_sha`."""
    body = {"format": THRESHOLDS_FORMAT, "manifest_sha256": manifest_sha, "phash": thresholds.phash,
            **{k: getattr(thresholds, k) for k in VALUE_FIELDS}, "calibration": calibration}
    return documents.write(thresholds_path(eval_dir), body, indent=1)


def read_thresholds(eval_dir: str | Path, manifest_sha: str) -> Thresholds | None:
    """The run's calibrated thresholds, or None when it has none; DDMError for a file that is unreadable or
    was calibrated on another run."""
    path = thresholds_path(eval_dir)
    if not path.is_file():
        return None
    body = documents.read(path, THRESHOLDS_SCHEMA, "thresholds file", fmt=THRESHOLDS_FORMAT)
    if body["manifest_sha256"] != manifest_sha:
        raise DDMError(f"{path} was calibrated on another run (manifest {body['manifest_sha256'][:16]}, this run "
                       f"is {manifest_sha[:16]}); rerun ddm consensus-eval")
    return Thresholds(phash=body["phash"], **{k: body[k] for k in VALUE_FIELDS}, source=str(path))
