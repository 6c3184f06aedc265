"""Text prompts to condition embeddings, through the user's encoder (`sample.condition_encoder`).

The encoder is "module:function": a list of n strings -> float [n, *condition_shape]. It is imported only when
prompts are given, so runs without one (and runs given their embeddings directly) never import it. `ddm sample
--prompt` and `ddm serve`'s `prompt` field both go through `prompt_image_count` and `encode_prompts`.
"""

from __future__ import annotations

import numpy as np

from ddm.core.errors import DDMError
from ddm.core.plugins import import_function
from ddm.sampling.request import check_image_count, condition_rows


def prompt_image_count(prompts: list[str], n: int | None, default_n: int) -> int:
    """How many images `prompts` ask for: `n` when given, else one per prompt when there are several, else
    `default_n` (one prompt for all). Whether n and several prompts agree is `encode_prompts`' check. DDMError for
    an empty list."""
    if not prompts:
        raise DDMError("prompt is an empty list")
    return n if n is not None else len(prompts) if len(prompts) > 1 else default_n


def encode_prompts(spec: str | None, prompts: list[str], n: int, condition_shape: tuple[int, ...], *, max_n: int,
                   alternative: str = "--conditions FILE") -> np.ndarray:
    """float32 [n, *condition_shape]: `prompts` (n of them, or one for all n) through the encoder `spec`.

    DDMError (one line) for n beyond the run's `max_n` (before any copy of a prompt is made), without an encoder
    (`alternative` names the other way to give embeddings), for one that does not import, or for output of
    another shape or dtype, or with NaN / Inf."""
    check_image_count(n, max_n)
    if not spec:
        raise DDMError("prompts need a text encoder: set sample.condition_encoder: module:function (e.g. "
                       f"--set sample.condition_encoder=my_encoder:encode), or give {alternative}")
    if len(prompts) not in (1, n):
        raise DDMError(f"{len(prompts)} prompts for {n} images: give one prompt for all, or one per image")
    encoder = import_function(spec, "sample.condition_encoder")
    texts = list(prompts) * n if len(prompts) == 1 else list(prompts)
    out = encoder(texts)
    try:
        out = np.asarray(out)
    except (TypeError, ValueError):
        raise DDMError(f"sample.condition_encoder={spec!r} returned {type(out).__name__}, not an array of "
                       f"[{n}, {', '.join(map(str, condition_shape))}] floats") from None
    if out.shape != (n, *condition_shape) or not np.issubdtype(out.dtype, np.floating):
        raise DDMError(f"sample.condition_encoder={spec!r} returned {out.dtype} {list(out.shape)} for {n} prompts; "
                       f"this run takes float [{n}, {', '.join(map(str, condition_shape))}]")
    return condition_rows(out, n, condition_shape, f"the embeddings of sample.condition_encoder={spec!r}")
