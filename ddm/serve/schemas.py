"""The request model of the HTTP API (pydantic) and its translation into a `ddm.sampling.request.Request`.
(Responses are plain JSON built in `ddm.serve.app`: a record inside one must reach the client byte for byte.)

The generation fields follow OpenAI's images API where one exists (`n`, `size`, `response_format`) and the
`ddm sample` flags otherwise (`strategy`, `steps`, `solver`, `seed`, `labels` / `class`, `cfg_scale`). Unknown
fields are refused (422), so a misspelt option never silently falls back to a default.
"""

from __future__ import annotations

import base64
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ddm.core.config import SEED_MAX, SampleConfig
from ddm.core.errors import DDMError
from ddm.sampling.request import Request
from ddm.verify.limits import VerifyLimits

INT_MAX = 2**31 - 1


class GenerationRequest(BaseModel):
    """`POST /v1/images/generations`. Left out: `steps`, `solver`, `seed` take the run's `sample` config; a
    class-conditional request without `cfg_scale` takes `sample.cfg_scale`."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    n: int = Field(1, ge=1, le=INT_MAX)
    size: str | None = Field(None, max_length=32, description="WIDTHxHEIGHT; must be the run's image size")
    response_format: Literal["b64_json"] = "b64_json"
    strategy: str = Field("prior", max_length=64)
    steps: int | None = Field(None, ge=1, le=INT_MAX)
    solver: Literal["euler", "heun"] | None = None
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    labels: list[int] | None = Field(None, max_length=100_000)
    class_: int | None = Field(None, alias="class", ge=0, le=INT_MAX)
    cfg_scale: float | None = Field(None, ge=0, le=VerifyLimits.max_cfg_scale, allow_inf_nan=False)  # as verify
    record: bool = False
    arrays: bool = Field(False, description="also return x, weights and expert_ids (`encode_array`)")

    def to_request(self, sample: SampleConfig) -> Request:
        """The `Request` this body asks for (defaults from the run's `sample` config); DDMError when its fields
        disagree (both `labels` and `class`, `labels` of another length than `n`)."""
        if self.labels is not None and self.class_ is not None:
            raise DDMError("give class or labels, not both")
        labels = None
        if self.class_ is not None:
            labels = (self.class_,) * self.n
        elif self.labels is not None:
            if len(self.labels) != self.n:
                raise DDMError(f"labels gives {len(self.labels)} labels for n={self.n} images")
            labels = tuple(self.labels)
        cfg_scale = self.cfg_scale if self.cfg_scale is not None or labels is None else sample.cfg_scale
        return Request(seed=sample.seed if self.seed is None else self.seed, n=self.n, strategy=self.strategy,
                       steps=sample.steps if self.steps is None else self.steps,
                       solver=self.solver or sample.solver, labels=labels, cfg_scale=cfg_scale)



ARRAY_DTYPES = ("float32", "int32")


def encode_array(array: np.ndarray) -> dict:
    """A float32 / int32 array on the wire: {"dtype", "shape", "b64": base64 of its little-endian C-order bytes}."""
    array = np.asarray(array)
    if array.dtype.name not in ARRAY_DTYPES:
        raise DDMError(f"arrays on the wire are {' or '.join(ARRAY_DTYPES)}, got {array.dtype}")
    data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
    return {"dtype": array.dtype.name, "shape": list(array.shape), "b64": base64.b64encode(data).decode("ascii")}


def decode_array(wire: dict) -> np.ndarray:
    """The array `encode_array` sent; DDMError when the dtype, shape and byte count disagree."""
    try:
        dtype, shape = np.dtype(wire["dtype"]).newbyteorder("<"), tuple(int(s) for s in wire["shape"])
        if wire["dtype"] not in ARRAY_DTYPES:
            raise ValueError(wire["dtype"])
        raw = base64.b64decode(wire["b64"], validate=True)
        return np.frombuffer(raw, dtype).reshape(shape).astype(dtype.newbyteorder("="))
    except (KeyError, TypeError, ValueError) as err:
        raise DDMError(f"malformed array in the server's reply: {err}") from None
