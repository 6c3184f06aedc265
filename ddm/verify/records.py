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
- `signature` (optional): Ed25519 over everything else (`ddm.verify.signing`).

Why the values and not a sketch: at our image sizes they cost 256 (8x8) to 3,136 (28x28) bytes per image, and
they make a record self-checking. Every digest is recomputed from them, so a record whose per-image hashes,
batch digest and pixels disagree is caught without regenerating anything (`contradictions`), and tolerance mode
compares values at float precision (honest cross-hardware drift ~1e-3, a solver step ~1e-2; uint8 pixels
would round both to 0-1 levels).

`read_record` parses with bounds (file size, JSON depth, duplicate keys); `validate_record` checks structure
and limits; `claimed_values` decodes the values; `contradictions` lists disagreements inside the record.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import math
from pathlib import Path

import numpy as np

from ddm.core.errors import DDMError
from ddm.core.codec import Codec
from ddm.core.hashing import array_sha256, images_sha256
from ddm.core.images import to_uint8
from ddm.sampling.request import Request
from ddm.verify.limits import DEFAULT_LIMITS, VerifyLimits
from ddm.verify.phash import hex_to_hash, perceptual_hashes

RECORD_FORMAT = "ddm-record/v2"
RECORD_KEYS = ("format", "manifest_sha256", "request", "shape", "sha256", "images", "values", "environment")
OPTIONAL_KEYS = ("signature", "codec")
MAX_STRATEGY_CHARS = 64
MAX_ENVIRONMENT_KEYS = 32
MAX_ENVIRONMENT_CHARS = 1024


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
                codec: Codec = Codec()) -> dict:
    """A verification record for the output `values` (float32 [n, H, W, C], the final ODE state in model range)
    of `request` on the run, made in `environment` (`ddm.verify.environment.environment()`); `codec`: the
    run's (`Run.codec`), recorded for latent runs."""
    values = np.asarray(values)
    if values.dtype != np.float32 or values.ndim != 4:
        raise DDMError(f"make_record needs float32 values [n, H, W, C], got {values.dtype} {values.shape}")
    batch, per_image = output_digests(values, codec)
    record = {"format": RECORD_FORMAT, "manifest_sha256": manifest_sha, "request": request.to_json(),
              "shape": list(values.shape), "sha256": batch, "images": per_image,
              "values": encode_values(values), "environment": dict(environment)}
    if codec.latents:
        record["codec"] = codec.to_dict()
    return record


def write_record(path: str | Path, record: dict) -> None:
    Path(path).write_text(json.dumps(record, indent=1) + "\n")


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        duplicate = next(k for k in keys if keys.count(k) > 1)
        raise DDMError(f"duplicate key {duplicate!r}")
    return dict(pairs)


def parse_record(text: str | bytes, where: str = "record") -> dict:
    """JSON text -> object; DDMError for anything that is not strict JSON (duplicate keys, NaN, nesting too
    deep to parse, integers too long to convert)."""
    def constant(name: str):
        raise DDMError(f"{name} is not a JSON number")

    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=constant)
    except DDMError as err:
        raise DDMError(f"{where} is not valid JSON: {err}") from None
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise DDMError(f"{where} is not valid JSON: {str(err)[:200]}") from None


def read_record(path: str | Path, limits: VerifyLimits = DEFAULT_LIMITS) -> tuple[dict, Request]:
    """Loads and validates a record; DDMError (exit 2 on the CLI) for anything malformed or beyond `limits`."""
    path = Path(path)
    if not path.is_file():
        raise DDMError(f"record not found: {path}")
    size = path.stat().st_size
    if size > limits.max_record_bytes:
        raise DDMError(f"record {path} has {size} bytes, more than the limit of {limits.max_record_bytes}")
    record = parse_record(path.read_bytes(), f"record {path}")
    return validate_record(record, str(path), limits), Request.from_json(record["request"])


def _is_hex(value, digits: int) -> bool:
    return isinstance(value, str) and len(value) == digits and all(c in "0123456789abcdef" for c in value)


def _is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def validate_record(record, where: str = "record", limits: VerifyLimits = DEFAULT_LIMITS) -> dict:
    """Checks a record's structure and bounds (format, fields and their types, request within `limits`, shape,
    hash formats, the length of `values`); returns it, else DDMError. Whether its digests agree with its values
    is `contradictions`; whether they agree with a regeneration is `ddm.verify.verdict`."""
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        raise DDMError(f"{where} is not a {RECORD_FORMAT} record")
    for key in RECORD_KEYS:
        if key not in record:
            raise DDMError(f"{where} has no {key!r} field")
    unknown = sorted(set(record) - set(RECORD_KEYS) - set(OPTIONAL_KEYS))
    if unknown:
        raise DDMError(f"{where} has unknown field {unknown[0]!r}")
    if not _is_hex(record["manifest_sha256"], 64):
        raise DDMError(f"{where}: manifest_sha256 must be 64 lowercase hex digits")
    strategy = record["request"].get("strategy") if isinstance(record["request"], dict) else None
    if isinstance(strategy, str) and len(strategy) > MAX_STRATEGY_CHARS:
        raise DDMError(f"{where}: strategy has more than {MAX_STRATEGY_CHARS} characters")
    request = Request.from_json(record["request"])
    # every field spelled out: a signed claim must not lean on defaults that a later version may change
    missing = [f.name for f in dataclasses.fields(Request) if f.name not in record["request"]]
    if missing:
        raise DDMError(f"{where}: request has no {missing[0]!r} field")
    limits.check_request(request, where)
    shape = record["shape"]
    if not (isinstance(shape, list) and len(shape) == 4 and all(_is_positive_int(d) for d in shape)):
        raise DDMError(f"{where}: shape {shape!r} is not [n, H, W, C] of positive integers")
    if shape[0] != request.n:
        raise DDMError(f"{where}: shape {shape} does not fit a request of n={request.n} images")
    if math.prod(shape) * 4 > limits.max_record_bytes:
        raise DDMError(f"{where}: shape {shape} is larger than a record may be ({limits.max_record_bytes} bytes)")
    images = record["images"]
    if not isinstance(images, list) or len(images) != request.n:
        count = len(images) if isinstance(images, list) else "no list of"
        raise DDMError(f"{where} has {count} image hashes for n={request.n}")
    for i, row in enumerate(images):
        if not isinstance(row, dict) or set(row) != {"sha256", "phash", "dhash"}:
            raise DDMError(f"{where}: image {i} must have exactly sha256, phash and dhash")
        if not _is_hex(row["sha256"], 64):
            raise DDMError(f"{where}: image {i} sha256 must be 64 lowercase hex digits")
        for name in ("phash", "dhash"):
            try:
                hex_to_hash(row[name])
            except DDMError as err:
                raise DDMError(f"{where}: image {i} {name}: {err}") from None
    if not _is_hex(record["sha256"], 64):
        raise DDMError(f"{where}: sha256 must be 64 lowercase hex digits")
    if not isinstance(record["values"], str):
        raise DDMError(f"{where}: values must be a base64 string")
    if "codec" in record:
        codec = record["codec"]
        if not (isinstance(codec, dict) and set(codec) == {"kind", "mean", "std"} and codec["kind"] == "latents"
                and all(isinstance(v, list) and len(v) == shape[3] and all(isinstance(x, (int, float))
                                                                           and not isinstance(x, bool) for x in v)
                        for v in (codec["mean"], codec["std"]))):
            raise DDMError(f"{where}: codec must be {{kind: latents, mean: [{shape[3]} numbers], std: [...]}}")
        record_codec(record)  # std > 0 and finite, else DDMError
    env = record["environment"]
    if not (isinstance(env, dict) and len(env) <= MAX_ENVIRONMENT_KEYS
            and all(isinstance(v, str) and len(v) <= MAX_ENVIRONMENT_CHARS for v in env.values())):
        raise DDMError(f"{where}: environment must be an object of at most {MAX_ENVIRONMENT_KEYS} short strings")
    return record


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
