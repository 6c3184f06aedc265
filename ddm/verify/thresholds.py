"""The thresholds a verdict compares with, and the file a verifier calibrates them into.

- phash: the largest per-image pHash Hamming distance that passes in phash mode;
- max_abs, rms: the largest per-image max |dx| and RMS dx between the regenerated and the claimed values
  (float32 model range, [-1, 1] spans 255 uint8 levels) that pass in tolerance mode;
- median_max_abs, median_rms: in tolerance mode, for a claim of at least `MEDIAN_MIN_IMAGES` images, the largest
  median over its images of those two distances. Honest drift across platforms is small for most images and
  large for a few (where a near-tie in top-1 routing or a rounding boundary amplifies it); a lazy claim (fewer
  steps, another solver, a perturbed model) moves every image. The median bounds hold the bulk to the typical
  drift;
- outlier_max_abs: the heavy tail. In a claim of at least `MEDIAN_MIN_IMAGES` images, at most
  `outlier_allowance(n)` images (5%, at least one) may exceed max_abs / rms if their max |dx| is within
  outlier_max_abs. Calibration sets it to half an 8-bit level (`HALF_LEVEL`) for image runs, never below
  max_abs: a change that small cannot move a displayed pixel by more than the rounding of one level, while any
  edit of a stored 8-bit value is a whole level, and a lazy computation moves every image, which the medians
  catch. Latent runs have no levels: there it equals max_abs (no allowance). Absent (older files): max_abs.

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
OUTLIER_SHARE = 0.05  # of a claim's images, beyond the per-image bounds but within outlier_max_abs
HALF_LEVEL = 1.0 / 255.0  # half of one 8-bit level in the model range [-1, 1] (255 levels span 2)
CALIBRATE_COMMAND = "ddm verify --calibrate --run-dir RUN"

VALUE_FIELDS = ("max_abs", "rms", "median_max_abs", "median_rms")
THRESHOLDS_SCHEMA = Obj({"format": Str(choices=(THRESHOLDS_FORMAT,)), "manifest_sha256": Hex(64),
                         "environment": Named(MapOf(Str(min_len=0)), "an object of strings"),
                         "phash": Int(min=0, max=HASH_BITS), **{name: Num(min=0) for name in VALUE_FIELDS}},
                        optional={"outlier_max_abs": Num(min=0),
                                  "calibration": Anything()})  # how they were measured: recorded, never checked


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """Every bound of the verdict's modes (module docstring). source: where they come from, for the verdict."""

    phash: int
    max_abs: float
    rms: float
    median_max_abs: float
    median_rms: float
    outlier_max_abs: float | None = None  # None: max_abs (no outliers allowed)
    source: str = "given"

    def __post_init__(self) -> None:
        if isinstance(self.phash, bool) or not isinstance(self.phash, int) or not 0 <= self.phash <= HASH_BITS:
            raise DDMError(f"threshold must be an integer in [0, {HASH_BITS}], got {self.phash!r}")
        for name in VALUE_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise DDMError(f"{name} threshold must be a finite number >= 0, got {value!r}")
        if self.outlier_max_abs is None:
            object.__setattr__(self, "outlier_max_abs", self.max_abs)
        cap = self.outlier_max_abs
        if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not math.isfinite(cap) or cap < self.max_abs:
            raise DDMError(f"outlier_max_abs threshold must be a finite number >= max_abs ({self.max_abs:g}), "
                           f"got {cap!r}")

    def to_json(self) -> dict:
        return {"phash": self.phash, **{k: getattr(self, k) for k in VALUE_FIELDS},
                "outlier_max_abs": self.outlier_max_abs, "source": self.source}


def outlier_allowance(n: int) -> int:
    """How many of a claim's n images may be tail outliers (module docstring): none below MEDIAN_MIN_IMAGES, else
    5% of them, at least one."""
    return 0 if n < MEDIAN_MIN_IMAGES else max(1, math.ceil(OUTLIER_SHARE * n))


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
            **{k: getattr(thresholds, k) for k in VALUE_FIELDS}, "outlier_max_abs": thresholds.outlier_max_abs,
            "calibration": calibration}
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
    thresholds = Thresholds(phash=body["phash"], **{k: body[k] for k in VALUE_FIELDS},
                            outlier_max_abs=body.get("outlier_max_abs"), source=str(path))
    return OwnThresholds(thresholds, f"calibrated by this verifier: {path}")
