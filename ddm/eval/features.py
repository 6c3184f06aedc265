"""User feature extractors for `ddm evaluate --features module:function`.

FD in the project's own feature net (`ddm.eval.featurenet`) compares runs on one dataset; researchers who have
a standard feature space (Inception, DINOv2, CLIP, computed by their own code) plug it in as a function
`images uint8 [N, H, W, C] -> features [N, D]` and get every metric of `ddm evaluate` in those features.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from ddm.core.errors import DDMError
from ddm.core.plugins import import_function


@dataclasses.dataclass
class UserFeatures:
    """A user's extractor, shaped like `FeatureNet` where `ddm evaluate` uses it (`name`, `features`)."""

    name: str  # the "module:function" spec
    fn: Callable[[np.ndarray], np.ndarray]
    dim: int | None = None

    def features(self, images: np.ndarray) -> np.ndarray:
        """images: uint8 [N, H, W, C] -> float64 [N, D]; DDMError if the extractor returns another shape or
        non-finite values."""
        try:
            out = np.asarray(self.fn(np.asarray(images)), np.float64)
        except DDMError:
            raise
        except Exception as err:  # noqa: BLE001 - the user's code can fail any way it likes
            raise DDMError(f"feature extractor {self.name} failed: {type(err).__name__}: "
                           f"{str(err).splitlines()[0][:200] if str(err) else ''}") from None
        if out.ndim != 2 or out.shape[0] != len(images) or (self.dim is not None and out.shape[1] != self.dim):
            raise DDMError(f"feature extractor {self.name} must return [{len(images)}, D] features, "
                           f"got shape {out.shape}")
        if not np.isfinite(out).all():
            raise DDMError(f"feature extractor {self.name} returned NaN or Inf")
        self.dim = out.shape[1]
        return out


def load_features(spec: str) -> UserFeatures:
    """`"module:function"` (module importable from sys.path) -> UserFeatures; DDMError naming what is wrong."""
    return UserFeatures(spec, import_function(spec, "--features"))
