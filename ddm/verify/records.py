"""Verification records: what a claimant publishes about a generation, and how one is read and checked.

A record (format `ddm-record/v2`, docs/verification.md) pins a generation: the run (manifest SHA-256), the
request, the claimed output itself, and digests of it:

- `values`: the final ODE state x, float32 [n, H, W, C] in model range, as base64 of its little-endian C-order
  bytes. The images are `to_uint8(values)`, so the record carries its own pixels;
- `sha256`: `images_sha256` of those uint8 images; `images[i]`: per-image `sha256`, `phash`, `dhash`;
- `codec` (latent runs only): the run's latent normalisation (`ddm.core.codec`). Then the outputs are the
  de-normalised latents `codec.decode(values)`: `sha256` and each image's `sha256` are `latents_sha256` of
  their float32 bytes, and the perceptual hashes are of `codec.preview(values)` (latent channels 0-2);
- `environment`: the claimant's software and hardware (`ddm.verify.environment`);
- `experts` (strategies that fix each image's expert before the solve: prior, oracle, single): the expert each
  image was drawn to or given, n integers, which a verifier compares with its own draws;
- `request.conditions_sha256` (runs conditioned on embeddings): the digest of the condition embeddings the
  images were drawn for (`ddm.sampling.request.conditions_sha256`). The embeddings are not in the record: a
  verifier regenerates with the file they came in (`ddm verify --conditions FILE`), refused unless its digest
  is this one;
- `signature` (optional): Ed25519 over everything else (`ddm.verify.signing`).

Why the values and not a sketch: at our image sizes they cost 256 (8x8) to 3,136 (28x28) bytes per image, and
they make a record self-checking. Every digest is recomputed from them, so a record whose per-image hashes,
batch digest and pixels disagree is caught without regenerating anything (`contradictions`), and tolerance mode
compares values at float precision (honest cross-hardware drift ~1e-3, a solver step ~1e-2; uint8 pixels
would round both to 0-1 levels).

`read_record` parses with bounds (file size, then strict JSON: `ddm.core.documents.parse`); `validate_record`
checks structure (`RECORD_SCHEMA`: closed, every field typed) and how fields relate (`record_rules`: the
request, its limits, shape and hashes against it, the codec against the shape); `claimed_values` decodes the
values; `contradictions` lists disagreements inside the record.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import math
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ddm.core import documents
from ddm.core.codec import Codec
from ddm.core.errors import DDMError
from ddm.core.hashing import array_sha256, images_sha256
from ddm.core.images import to_uint8
from ddm.core.schema import Anything, Hex, Int, ListOf, MapOf, Named, Num, Obj, Str, check
from ddm.sampling.request import Request
from ddm.verify.environment import environment
from ddm.verify.limits import DEFAULT_LIMITS, VerifyLimits
from ddm.verify.phash import HASH_HEX_DIGITS, perceptual_hashes
from ddm.verify.signing import sign_record

RECORD_FORMAT = "ddm-record/v2"
MAX_STRATEGY_CHARS = 64
MAX_ENVIRONMENT_KEYS = 32
MAX_ENVIRONMENT_CHARS = 1024

# What `hex_to_hash` reads back.
_PERCEPTUAL = Str(pattern=f"[0-9a-fA-F]{{{HASH_HEX_DIGITS}}}", name=f"a 64-bit hash ({HASH_HEX_DIGITS} hex digits)")
_NUMBERS = ListOf(Num(), min_len=1, name="a list of finite numbers")
# Closed: a signed record is a claim byte for byte, so a field this version does not know is refused, not kept.
RECORD_SCHEMA = Obj(
    {"format": Str(choices=(RECORD_FORMAT,)),
     "manifest_sha256": Hex(64),
     "request": Anything(dict, "an object"),  # `Request.from_json` and the limits check it (record_rules)
     "shape": Named(ListOf(Int(min=1), min_len=4, max_len=4), "[n, H, W, C] of positive integers"),
     "sha256": Hex(64),
     "images": ListOf(Obj({"sha256": Hex(64), "phash": _PERCEPTUAL, "dhash": _PERCEPTUAL}, closed=True)),
     "values": Str(min_len=0, max_len=sys.maxsize, name="a base64 string"),  # its length: `claimed_values`
     "environment": Named(MapOf(Str(min_len=0, max_len=MAX_ENVIRONMENT_CHARS), max_len=MAX_ENVIRONMENT_KEYS),
                          f"an object of at most {MAX_ENVIRONMENT_KEYS} strings of at most "
                          f"{MAX_ENVIRONMENT_CHARS} characters")},
    optional={"signature": Anything(),  # checked by `ddm.verify.signing`
              "codec": Obj({"kind": Str(choices=("latents",)), "mean": _NUMBERS, "std": _NUMBERS}, closed=True),
              # each image's one expert, for the strategies that fix it before the solve (prior, oracle, single)
              "experts": ListOf(Int(min=0, max=2**31 - 1))},
    closed=True,
)


def image_digests(images: np.ndarray) -> list[dict[str, str]]:
    """Per image of a uint8 batch [n, H, W, C]: {"sha256": images_sha256 of [1, H, W, C], "phash", "dhash"}."""
    return [{"sha256": images_sha256(img[None]), **h} for img, h in zip(images, perceptual_hashes(images))]


def latents_sha256(latents: np.ndarray) -> str:
    """SHA-256 of de-normalised latents float32 [n, h, w, c] (little-endian bytes, tag ``ddm-latents-out:v1``)."""
    return array_sha256(np.ascontiguousarray(latents, "<f4"), "ddm-latents-out:v1")


def output_digests(values: np.ndarray, codec: Codec) -> tuple[str, list[dict[str, str]]]:
    """(batch sha256, per-image {"sha256", "phash", "dhash"}) of the outputs whose final state is `values`
    (float32 [n, H, W, C], model range): the uint8 images, or for latents the de-normalised latent bytes, with
    perceptual hashes of the channel preview."""
    if not codec.latents:
        images = to_uint8(values)
        return images_sha256(images), image_digests(images)
    latents = codec.decode(values)
    hashes = perceptual_hashes(codec.preview(values))
    return latents_sha256(latents), [{"sha256": latents_sha256(z[None]), **h} for z, h in zip(latents, hashes)]


def record_codec(record: dict) -> Codec:
    """The codec a validated record's outputs were made with (images when it names none)."""
    return Codec.from_dict(record.get("codec"))


def encode_values(values: np.ndarray) -> str:
    """float32 [n, H, W, C] -> base64 of its little-endian C-order bytes."""
    return base64.b64encode(np.ascontiguousarray(values, "<f4").tobytes()).decode("ascii")


def make_record(manifest_sha: str, request: Request, values: np.ndarray, environment: dict[str, str],
                codec: Codec = Codec(), experts: np.ndarray | None = None) -> dict:
    """A verification record for the output `values` (float32 [n, H, W, C], the final ODE state in model range)
    of `request` on the run, made in `environment` (`ddm.verify.environment.environment()`); `codec`: the
    run's (`Run.codec`), recorded for latent runs; `experts`: int [n], each image's one expert
    (`SampleResult.experts`: prior, oracle and single), recorded when given."""
    values = np.asarray(values)
    if values.dtype != np.float32 or values.ndim != 4:
        raise DDMError(f"make_record needs float32 values [n, H, W, C], got {values.dtype} {values.shape}")
    batch, per_image = output_digests(values, codec)
    record = {"format": RECORD_FORMAT, "manifest_sha256": manifest_sha, "request": request.to_json(),
              "shape": list(values.shape), "sha256": batch, "images": per_image,
              "values": encode_values(values), "environment": dict(environment)}
    if codec.latents:
        record["codec"] = codec.to_dict()
    if experts is not None:
        record["experts"] = [int(k) for k in np.asarray(experts)]
    return record


def sample_record(manifest_sha: str, request: Request, result, codec: Codec = Codec(), private_key=None,
                  emulation: str | None = None) -> dict:
    """The record of a `SampleResult` of `request` (its final state `x` and, where the strategy fixes them, its
    `experts`) made in this process's environment, signed with `private_key` (Ed25519, `ddm keygen`) when given:
    what `ddm sample --record [--key]` writes and `ddm serve` returns. emulation: how the generation differed
    from a lone `generate` (e.g. `ddm serve`'s merged batches), stated in the environment (information for
    the verifier, which never lets it choose the comparison)."""
    record = make_record(manifest_sha, request, result.x, environment(emulation), codec, experts=result.experts)
    return record if private_key is None else sign_record(record, private_key)


def write_record(path: str | Path, record: dict) -> None:
    documents.write(path, record, indent=1)


def read_record(path: str | Path, limits: VerifyLimits = DEFAULT_LIMITS) -> tuple[dict, Request]:
    """Loads and validates a record; DDMError (exit 2 on the CLI) for anything malformed or beyond `limits`."""
    path = Path(path)
    if not path.is_file():
        raise DDMError(f"record not found: {path}")
    size = path.stat().st_size
    if size > limits.max_record_bytes:
        raise DDMError(f"record {path} has {size} bytes, more than the limit of {limits.max_record_bytes}")
    record = documents.parse(path.read_bytes(), f"record {path}")
    return validate_record(record, str(path), limits), Request.from_json(record["request"])


def record_rules(limits: VerifyLimits = DEFAULT_LIMITS) -> tuple[Callable[[dict], str | None], ...]:
    """How a record's fields relate, checked in order after `RECORD_SCHEMA` (so each rule may rely on the
    types, and on the rules before it): the request is a complete `Request` within `limits`, and the shape,
    the image hashes and the codec fit it."""

    def request_is_complete_and_within_limits(record: dict) -> str | None:
        strategy = record["request"].get("strategy")
        if isinstance(strategy, str) and len(strategy) > MAX_STRATEGY_CHARS:
            return f"strategy has more than {MAX_STRATEGY_CHARS} characters"
        try:
            request = Request.from_json(record["request"])
            # every field spelled out: a signed claim must not lean on defaults that a later version may change
            # (but `clusters`, which only oracle requests have, and `conditions_sha256`, which only requests
            # conditioned on embeddings have: their absence is None, not a default)
            missing = [f.name for f in dataclasses.fields(Request)
                       if f.name not in record["request"] and f.name not in ("clusters", "conditions_sha256")]
            if missing:
                return f"request has no {missing[0]!r} field"
            limits.check_request(request, "request")
        except DDMError as err:
            return str(err)
        return None

    def shape_fits_the_request(record: dict) -> str | None:
        shape, n = record["shape"], record["request"]["n"]
        if shape[0] != n:
            return f"shape {shape} does not fit a request of n={n} images"
        if math.prod(shape) * 4 > limits.max_record_bytes:
            return f"shape {shape} is larger than a record may be ({limits.max_record_bytes} bytes)"
        return None

    def one_hash_per_image(record: dict) -> str | None:
        count, n = len(record["images"]), record["request"]["n"]
        return None if count == n else f"images lists {count} image hashes for n={n} images"

    def one_expert_per_image(record: dict) -> str | None:
        if "experts" not in record:
            return None
        count, n = len(record["experts"]), record["request"]["n"]
        return None if count == n else f"experts lists {count} experts for n={n} images"

    def codec_fits_the_shape(record: dict) -> str | None:
        if "codec" not in record:
            return None
        channels = record["shape"][3]
        for name in ("mean", "std"):
            if len(record["codec"][name]) != channels:
                return f"codec.{name} must hold {channels} numbers (one per channel of shape {record['shape']})"
        try:
            record_codec(record)  # std > 0, else DDMError
        except DDMError as err:
            return f"codec: {err}"
        return None

    return (request_is_complete_and_within_limits, shape_fits_the_request, one_hash_per_image,
            one_expert_per_image, codec_fits_the_shape)


def validate_record(record, where: str = "record", limits: VerifyLimits = DEFAULT_LIMITS) -> dict:
    """Checks a record's structure and bounds (`RECORD_SCHEMA`: format, fields and their types, hash formats;
    `record_rules`: the request within `limits`, the shape, image hashes and codec against it); returns it, else
    a one-line DDMError naming the field. Whether its digests agree with its values is `contradictions`;
    whether they agree with a regeneration is `ddm.verify.verdict`."""
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        raise DDMError(f"{where} is not a {RECORD_FORMAT} record")
    missing = next((key for key in RECORD_SCHEMA.fields if key not in record), None)
    if missing is not None:  # before the schema: a record without a field says so, whatever else is wrong
        raise DDMError(f"{where} has no {missing!r} field")
    return check(record, RECORD_SCHEMA, where, record_rules(limits))


def claimed_values(record: dict, where: str = "record") -> np.ndarray:
    """The claimed output of a validated record: float32 [n, H, W, C]; DDMError if the base64 does not decode
    or a value is NaN / Inf."""
    shape = tuple(record["shape"])
    expected = 4 * math.ceil(math.prod(shape) * 4 / 3)
    if len(record["values"]) != expected:
        raise DDMError(f"{where}: values must be base64 of {math.prod(shape)} float32 ({expected} characters), "
                       f"got {len(record['values'])} characters")
    try:
        raw = base64.b64decode(record["values"], validate=True)
    except (binascii.Error, ValueError):
        raise DDMError(f"{where}: values are not valid base64") from None
    if len(raw) != math.prod(shape) * 4:
        raise DDMError(f"{where}: values hold {len(raw)} bytes, shape {list(shape)} needs {math.prod(shape) * 4}")
    values = np.frombuffer(raw, "<f4").reshape(shape).astype(np.float32)
    if not np.isfinite(values).all():
        raise DDMError(f"{where}: values contain NaN or Inf")
    return values


def contradictions(record: dict, values: np.ndarray) -> list[str]:
    """Where a validated record disagrees with itself: its batch digest, per-image digests and perceptual hashes
    recomputed from its own `values`. An empty list means the record is consistent."""
    batch, per_image = output_digests(values, record_codec(record))
    problems = []
    if batch != record["sha256"]:
        problems.append("the batch sha256 is not the digest of the record's own pixels")
    for i, (claimed, actual) in enumerate(zip(record["images"], per_image)):
        wrong = [name for name in ("sha256", "phash", "dhash") if claimed[name] != actual[name]]
        if wrong:
            problems.append(f"image {i}: {', '.join(wrong)} not the digest of its own pixels")
    return problems
