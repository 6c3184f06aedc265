"""The thresholds a verdict compares with, and the file a verifier calibrates them into.

- phash: the largest per-image pHash Hamming distance that passes in phash mode;
- max_abs, rms: the largest per-image max |dx| and RMS dx between the regenerated and the claimed values
  (float32 model range, [-1, 1] spans 255 uint8 levels) that pass in tolerance mode;
- median_max_abs, median_rms: in tolerance mode, for a claim of at least `MEDIAN_MIN_IMAGES` images, the largest
  median over its images of those two distances. Honest drift across platforms is small for most images and
  large for a few (where a near-tie in top-1 routing or a rounding boundary amplifies it); a lazy claim (fewer
  steps, another solver, a perturbed model) moves every image. The per-image bounds must admit the honest
  outliers; the median bounds hold the bulk to the typical drift.

There are no built-in values: thresholds come only from the verifier's own calibration of the run
(RUN/eval/verify_thresholds.json, written by `ddm verify --calibrate` or `ddm consensus-eval`), never from a
record. The file names the run (manifest SHA-256) and the environment of the verifier that measured the drift
(`ddm.verify.environment`): a verifier in another environment did not calibrate it, so it does not count as
calibrated there (`own_thresholds`).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from ddm.core import documents
from ddm.core.errors import DDMError
from ddm.core.schema import Anything, Hex, Int, MapOf, Named, Num, Obj, Str
from ddm.verify.environment import environment, environment_differences
from ddm.verify.phash import HASH_BITS

THRESHOLDS_FORMAT = "ddm-verify-thresholds/v2"
OLD_FORMATS = ("ddm-verify-thresholds/v1",)  # no calibrating environment: never this verifier's own
THRESHOLDS_FILE = "verify_thresholds.json"
MEDIAN_MIN_IMAGES = 5  # below this a median is one or two images: too few to tell outliers from the bulk
CALIBRATE_COMMAND = "ddm verify --calibrate --run-dir RUN"

VALUE_FIELDS = ("max_abs", "rms", "median_max_abs", "median_rms")
THRESHOLDS_SCHEMA = Obj({"format": Str(choices=(THRESHOLDS_FORMAT,)), "manifest_sha256": Hex(64),
                         "environment": Named(MapOf(Str(min_len=0)), "an object of strings"),
                         "phash": Int(min=0, max=HASH_BITS), **{name: Num(min=0) for name in VALUE_FIELDS}},
                        optional={"calibration": Anything()})  # how they were measured: recorded, never checked


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """Every bound of the verdict's modes (module docstring). source: where they come from, for the verdict."""

    phash: int
    max_abs: float
    rms: float
    median_max_abs: float
    median_rms: float
    source: str = "given"

    def __post_init__(self) -> None:
        if isinstance(self.phash, bool) or not isinstance(self.phash, int) or not 0 <= self.phash <= HASH_BITS:
            raise DDMError(f"threshold must be an integer in [0, {HASH_BITS}], got {self.phash!r}")
        for name in VALUE_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise DDMError(f"{name} threshold must be a finite number >= 0, got {value!r}")

    def to_json(self) -> dict:
        return {"phash": self.phash, **{k: getattr(self, k) for k in VALUE_FIELDS}, "source": self.source}


@dataclasses.dataclass(frozen=True)
class OwnThresholds:
    """What a verifier may compare with beyond bit-for-bit equality. thresholds: those it calibrated itself for
    the run in its present environment, or None. note: where they come from, or why there are none (one
    line, for the verdict)."""

    thresholds: Thresholds | None
    note: str


def thresholds_path(eval_dir: str | Path) -> Path:
    return Path(eval_dir) / THRESHOLDS_FILE


def write_thresholds(eval_dir: str | Path, manifest_sha: str, thresholds: Thresholds, calibration: dict,
                     verifier_env: dict[str, str] | None = None) -> Path:
    """Writes the thresholds this verifier calibrated for the run named by `manifest_sha`, with the environment
    that measured them (default: this process's) and how (`calibration`, recorded, never read back)."""
    body = {"format": THRESHOLDS_FORMAT, "manifest_sha256": manifest_sha,
            "environment": dict(environment() if verifier_env is None else verifier_env), "phash": thresholds.phash,
            **{k: getattr(thresholds, k) for k in VALUE_FIELDS}, "calibration": calibration}
    return documents.write(thresholds_path(eval_dir), body, indent=1)


def own_thresholds(eval_dir: str | Path, manifest_sha: str, verifier_env: dict[str, str]) -> OwnThresholds:
    """The run's thresholds if the verifier in `verifier_env` calibrated them (module docstring), else None with
    the reason. DDMError for a file that is unreadable, malformed, or calibrated on another run."""
    path = thresholds_path(eval_dir)
    if not path.is_file():
        return OwnThresholds(None, f"this verifier has not calibrated the run (no {path})")
    body = documents.read(path, None, "thresholds file")
    if isinstance(body, dict) and body.get("format") in OLD_FORMATS:
        return OwnThresholds(None, f"{path} does not say which environment calibrated it ({body['format']})")
    body = documents.read(path, THRESHOLDS_SCHEMA, "thresholds file", fmt=THRESHOLDS_FORMAT)
    if body["manifest_sha256"] != manifest_sha:
        raise DDMError(f"{path} was calibrated on another run (manifest {body['manifest_sha256'][:16]}, this run "
                       f"is {manifest_sha[:16]}); recalibrate: {CALIBRATE_COMMAND}")
    differ = environment_differences(body["environment"], verifier_env)
    if differ:
        return OwnThresholds(None, f"{path} was calibrated in another environment (differs in "
                                   f"{', '.join(differ)}), not by this verifier")
    thresholds = Thresholds(phash=body["phash"], **{k: body[k] for k in VALUE_FIELDS}, source=str(path))
    return OwnThresholds(thresholds, f"calibrated by this verifier: {path}")
