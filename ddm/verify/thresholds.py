"""The thresholds a verdict uses, and the file `ddm consensus-eval` calibrates them into.

- phash: the largest per-image pHash Hamming distance that passes in phash mode;
- max_abs, rms: the largest per-image max |dx| and RMS dx between the regenerated and the claimed values
  (float32 model range, [-1, 1] spans 255 uint8 levels) that pass in tolerance mode.

`ddm verify` takes them from, in order: its flags, RUN/eval/verify_thresholds.json (written by
`ddm consensus-eval` from the honest drift its verifiers measured), the built-in defaults below.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from ddm.core.errors import DDMError
from ddm.verify.phash import HASH_BITS

THRESHOLDS_FORMAT = "ddm-verify-thresholds/v1"
THRESHOLDS_FILE = "verify_thresholds.json"

# pHash: picked by `ddm consensus-eval` on runs/digits (32 requests x 16 images, heun 30 steps): honest
# regenerations <= 2 bits, nearest different images >= 2 bits (docs/verification.md).
DEFAULT_THRESHOLD = 2
# Tolerance: 2 x the largest honest drift `ddm consensus-eval` measured on runs/digits with its default
# verifiers (the TF32-weight one dominates: max |dx| 3.5e-3, RMS 8.2e-4 at heun 30 steps; docs/verification.md).
DEFAULT_MAX_ABS = 7e-3
DEFAULT_RMS = 1.7e-3


@dataclasses.dataclass(frozen=True)
class Thresholds:
    phash: int = DEFAULT_THRESHOLD
    max_abs: float = DEFAULT_MAX_ABS
    rms: float = DEFAULT_RMS
    source: str = "built-in defaults"

    def __post_init__(self) -> None:
        if isinstance(self.phash, bool) or not isinstance(self.phash, int) or not 0 <= self.phash <= HASH_BITS:
            raise DDMError(f"threshold must be an integer in [0, {HASH_BITS}], got {self.phash!r}")
        for name in ("max_abs", "rms"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise DDMError(f"{name} threshold must be a finite number >= 0, got {value!r}")

    def to_json(self) -> dict:
        return {"phash": self.phash, "max_abs": self.max_abs, "rms": self.rms, "source": self.source}


DEFAULT_THRESHOLDS = Thresholds()


def thresholds_path(eval_dir: str | Path) -> Path:
    return Path(eval_dir) / THRESHOLDS_FILE


def write_thresholds(eval_dir: str | Path, manifest_sha: str, thresholds: Thresholds, calibration: dict) -> Path:
    """Writes the calibrated thresholds (and how they were measured) for the run named by `manifest_sha`."""
    path = thresholds_path(eval_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"format": THRESHOLDS_FORMAT, "manifest_sha256": manifest_sha, "phash": thresholds.phash,
            "max_abs": thresholds.max_abs, "rms": thresholds.rms, "calibration": calibration}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(body, indent=1) + "\n")
    tmp.replace(path)
    return path


def read_thresholds(eval_dir: str | Path, manifest_sha: str) -> Thresholds | None:
    """The run's calibrated thresholds, or None when it has none; DDMError for a file that is unreadable or
    was calibrated on another run."""
    path = thresholds_path(eval_dir)
    if not path.is_file():
        return None
    try:
        body = json.loads(path.read_text())
        if body.get("format") != THRESHOLDS_FORMAT:
            raise ValueError(f"not a {THRESHOLDS_FORMAT} file")
        if body.get("manifest_sha256") != manifest_sha:
            raise DDMError(f"{path} was calibrated on another run (manifest {str(body.get('manifest_sha256'))[:16]}"
                           f", this run is {manifest_sha[:16]}); rerun ddm consensus-eval")
        return Thresholds(phash=body["phash"], max_abs=body["max_abs"], rms=body["rms"], source=str(path))
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise DDMError(f"{path} is not a readable thresholds file: {err}") from None
