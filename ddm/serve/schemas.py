"""The request model of the HTTP API (pydantic) and its translation into a `ddm.sampling.request.Request`.
(Responses are plain JSON built in `ddm.serve.app`: a record inside one must reach the client byte for byte.)

The generation fields follow OpenAI's images API where one exists (`n`, `size`, `response_format`, `prompt`)
and the `ddm sample` flags otherwise (`strategy`, `steps`, `solver`, `seed`, `labels` / `class`, `cfg_scale`,
`conditions`). Unknown fields are refused (422), so a misspelt option never silently falls back to a default.
"""

from __future__ import annotations

import base64
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ddm.core.config import SEED_MAX, SampleConfig
from ddm.core.errors import DDMError
from ddm.sampling.prompts import encode_prompts, prompt_image_count
from ddm.sampling.request import Request, condition_rows, conditions_sha256
from ddm.verify.limits import VerifyLimits

INT_MAX = 2**31 - 1
MAX_PROMPT_CHARS = 10_000  # per prompt
MAX_PROMPTS = 10_000  # per request


class GenerationRequest(BaseModel):
    """`POST /v1/images/generations`. Left out: `strategy` takes the run's default (`default_strategy`),
    `steps`, `solver`, `seed` the run's `sample` config; a guided request (class labels or condition
    embeddings) without `cfg_scale` takes `sample.cfg_scale`."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    n: int = Field(1, ge=1, le=INT_MAX)
    size: str | None = Field(None, max_length=32, description="WIDTHxHEIGHT; must be the run's image size")
    response_format: Literal["b64_json"] = "b64_json"
    strategy: str | None = Field(None, max_length=64)
    steps: int | None = Field(None, ge=1, le=INT_MAX)
    solver: Literal["euler", "heun"] | None = None
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    labels: list[int] | None = Field(None, max_length=100_000)
    class_: int | None = Field(None, alias="class", ge=0, le=INT_MAX)
    cfg_scale: float | None = Field(None, ge=0, le=VerifyLimits.max_cfg_scale, allow_inf_nan=False)  # as verify
    # runs conditioned on embeddings: prompts through the run's sample.condition_encoder, or the embeddings
    prompt: str | list[Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]] | None = Field(
        None, max_length=MAX_PROMPTS, description="one prompt for all n images, or one per image")
    conditions: dict | None = Field(None, description="float32 [n, *condition_shape] as {dtype, shape, b64} "
                                                      "(`encode_array`); n is its row count")
    record: bool = False
    arrays: bool = Field(False, description="also return x, weights and expert_ids (`encode_array`)")

    def condition_rows(self, condition_shape: tuple[int, ...], encoder: str | None, max_n: int) -> np.ndarray | None:
        """The condition embeddings float32 [n, *condition_shape] of `prompt` (through `encoder`, the run's
        `sample.condition_encoder`) or `conditions`; None without either. n is the body's `n`, or the number
        of prompts (more than one) or of rows in `conditions`, which an explicit `n` must equal. DDMError (one
        line) for both fields, either on a run without embeddings, embeddings of another shape, or prompts for
        more than `max_n` images (checked before the encoder runs; rows are bounded with the request)."""
        if self.prompt is None and self.conditions is None:
            return None
        if self.prompt is not None and self.conditions is not None:
            raise DDMError("give prompt or conditions, not both")
        field = "prompt" if self.prompt is not None else "conditions"
        if not condition_shape:
            raise DDMError(f"{field} gives condition embeddings, but this run is not conditioned on embeddings")
        if self.labels is not None or self.class_ is not None:
            raise DDMError(f"{field} and class / labels: a run is conditioned on embeddings or on classes, not both")
        explicit_n = "n" in self.model_fields_set
        if self.prompt is not None:
            prompts = [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)
            n = prompt_image_count(prompts, self.n if explicit_n else None, self.n)
            return encode_prompts(encoder, prompts, n, condition_shape, max_n=max_n,
                                  alternative="the embeddings (conditions)")
        rows = decode_array(self.conditions, "conditions")
        if rows.ndim != len(condition_shape) + 1:
            raise DDMError(f"conditions has shape {list(rows.shape)}; this run takes [n, "
                           f"{', '.join(map(str, condition_shape))}] (one row per image)")
        if explicit_n and len(rows) != self.n:
            raise DDMError(f"conditions has {len(rows)} rows for n={self.n} images (n is taken from the rows: "
                           "leave n out)")
        return condition_rows(rows, len(rows), condition_shape, "conditions")

    def to_request(self, sample: SampleConfig, strategy: str, conditions: np.ndarray | None = None) -> Request:
        """The `Request` this body asks for (defaults from the run's `sample` config, `strategy` when the body
        names none); conditions: `condition_rows`' embeddings, named in the request by their digest (and their
        row count is n). DDMError when its fields disagree (both `labels` and `class`, `labels` of another
        length than `n`)."""
        if self.labels is not None and self.class_ is not None:
            raise DDMError("give class or labels, not both")
        labels = None
        if self.class_ is not None:
            labels = (self.class_,) * self.n
        elif self.labels is not None:
            if len(self.labels) != self.n:
                raise DDMError(f"labels gives {len(self.labels)} labels for n={self.n} images")
            labels = tuple(self.labels)
        guided = labels is not None or conditions is not None
        cfg_scale = self.cfg_scale if self.cfg_scale is not None or not guided else sample.cfg_scale
        return Request(seed=sample.seed if self.seed is None else self.seed,
                       n=self.n if conditions is None else len(conditions), strategy=self.strategy or strategy,
                       steps=sample.steps if self.steps is None else self.steps,
                       solver=self.solver or sample.solver, labels=labels, cfg_scale=cfg_scale,
                       conditions_sha256=None if conditions is None else conditions_sha256(conditions))



ARRAY_DTYPES = ("float32", "int32")


def encode_array(array: np.ndarray) -> dict:
    """A float32 / int32 array on the wire: {"dtype", "shape", "b64": base64 of its little-endian C-order bytes}."""
    array = np.asarray(array)
    if array.dtype.name not in ARRAY_DTYPES:
        raise DDMError(f"arrays on the wire are {' or '.join(ARRAY_DTYPES)}, got {array.dtype}")
    data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
    return {"dtype": array.dtype.name, "shape": list(array.shape), "b64": base64.b64encode(data).decode("ascii")}


def decode_array(wire: dict, what: str = "array in the server's reply") -> np.ndarray:
    """The array `encode_array` sent; DDMError naming `what` when the dtype, shape and byte count disagree."""
    try:
        dtype, shape = np.dtype(wire["dtype"]).newbyteorder("<"), tuple(int(s) for s in wire["shape"])
        if wire["dtype"] not in ARRAY_DTYPES:
            raise ValueError(wire["dtype"])
        raw = base64.b64decode(wire["b64"], validate=True)
        return np.frombuffer(raw, dtype).reshape(shape).astype(dtype.newbyteorder("="))
    except (KeyError, TypeError, ValueError) as err:
        raise DDMError(f"malformed {what}: {type(err).__name__}: {err}") from None
