"""Bounds on what a verifier agrees to read and regenerate, so that no record makes `ddm verify` run for ever,
exhaust memory, or fail with a traceback.

A record is attacker-controlled input: its request decides how much work the verifier does (images x solver
steps) and how much it reads. Everything beyond these limits is refused as bad input (exit 2) before any
model is loaded. The defaults are far above what sampling needs (`ddm sample` defaults: 64 images, 30-50
steps) and are overridden per command (`ddm verify --max-n/--max-steps/--max-image-steps`).
"""

from __future__ import annotations

import dataclasses

from ddm.core.config import SEED_MAX
from ddm.core.errors import DDMError

LABEL_MAX = 2**31 - 1  # class labels travel as int32
MODES = ("auto", "exact", "tolerance", "phash")  # ddm.verify.verdict's modes; here, the CLI parses without jax


@dataclasses.dataclass(frozen=True)
class VerifyLimits:
    """max_n: images per record. max_steps: solver steps. max_image_steps: n * steps, the regeneration work
    (16,384: 8x `ddm sample`'s default 64 images x 30 steps; the time of the worst case is measured in
    docs/verification.md).
    max_record_bytes: the size of the record file. max_cfg_scale: |cfg_scale|."""

    max_n: int = 256
    max_steps: int = 1000
    max_image_steps: int = 16_384
    max_record_bytes: int = 16 * 2**20
    max_cfg_scale: float = 1000.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise DDMError(f"verify limit {f.name}={value!r} must be a positive number")

    def check_request(self, request, where: str = "record") -> None:
        """DDMError unless a `Request` is within the limits (seed, labels, n, steps, n * steps, cfg_scale)."""
        if request.seed > SEED_MAX:
            raise DDMError(f"{where}: seed {request.seed} is outside 0..{SEED_MAX}")
        if request.n > self.max_n:
            raise DDMError(f"{where}: n={request.n} images exceeds the limit of {self.max_n} (--max-n)")
        if request.steps > self.max_steps:
            raise DDMError(f"{where}: steps={request.steps} exceeds the limit of {self.max_steps} (--max-steps)")
        if request.n * request.steps > self.max_image_steps:
            raise DDMError(f"{where}: n * steps = {request.n * request.steps} exceeds the limit of "
                           f"{self.max_image_steps} (--max-image-steps)")
        if request.labels is not None and any(v > LABEL_MAX for v in request.labels):
            raise DDMError(f"{where}: a class label exceeds {LABEL_MAX}")
        if request.cfg_scale is not None and abs(request.cfg_scale) > self.max_cfg_scale:
            raise DDMError(f"{where}: cfg_scale={request.cfg_scale} is beyond +-{self.max_cfg_scale:g}")


DEFAULT_LIMITS = VerifyLimits()
