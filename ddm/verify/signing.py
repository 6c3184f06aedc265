"""Ed25519 signatures on verification records (through `cryptography`): who claimed what.

Keys: `generate_keypair(KEY)` writes KEY (the private key, PEM PKCS#8, unencrypted, mode 0600) and KEY.pub (the
public key, PEM SubjectPublicKeyInfo); `openssl pkey -in KEY -pubout` gives the same KEY.pub. A key is named by
`key_id`: "ed25519:" + the first 16 hex digits of SHA-256 of its 32 raw public-key bytes.

What is signed (`signed_bytes`): the ASCII line ``ddm-record-signature/v1`` and a newline, followed by the
canonical JSON (`ddm.core.documents.canonical_bytes`: sorted keys, no whitespace, ASCII) of the record without its
`signature` field. The signature field is
``{"algorithm": "ed25519", "public_key": base64 of the 32 raw bytes, "value": base64 of the 64-byte signature}``.
Any change to any other field after signing (a digest, a request field, a value, the environment) breaks it.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ddm.core.documents import canonical_bytes
from ddm.core.errors import DDMError
from ddm.core.files import check_output_dir

ALGORITHM = "ed25519"
SIGNATURE_CONTEXT = b"ddm-record-signature/v1\n"


def _raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(key: Ed25519PublicKey) -> str:
    """A short, stable name for a public key: "ed25519:" + 16 hex digits of SHA-256 of its raw bytes."""
    return f"{ALGORITHM}:{hashlib.sha256(_raw_public(key)).hexdigest()[:16]}"


def generate_keypair(out: str | Path) -> tuple[Path, Path]:
    """Writes a new private key to `out` (mode 0600) and its public key to `out`.pub; refuses to overwrite."""
    private_path = Path(out)
    public_path = private_path.with_name(private_path.name + ".pub")
    for path in (private_path, public_path):
        if path.exists():
            raise DDMError(f"{path} already exists; keys are never overwritten")
    if not private_path.parent.is_dir():
        raise DDMError(f"no directory {private_path.parent} for the key")
    check_output_dir(private_path.parent, "the folder of the key")  # writable, found by trying (root too)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    public_path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                          serialization.PublicFormat.SubjectPublicKeyInfo))
    return private_path, public_path


def _read_key_file(path: str | Path, what: str) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise DDMError(f"{what} not found: {path}")
    if path.stat().st_size > 64 * 1024:
        raise DDMError(f"{path} is too large to be an Ed25519 {what}")
    return path.read_bytes()


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """An unencrypted PEM Ed25519 private key; DDMError for anything else."""
    data = _read_key_file(path, "private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise DDMError(f"{path} is not an unencrypted PEM private key ({str(err).splitlines()[0]})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise DDMError(f"{path} is a {type(key).__name__}, not an Ed25519 private key")
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """A PEM Ed25519 public key (as `ddm keygen` writes to KEY.pub); DDMError for anything else."""
    data = _read_key_file(path, "public key")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise DDMError(f"{path} is not a PEM public key ({str(err).splitlines()[0]})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise DDMError(f"{path} is a {type(key).__name__}, not an Ed25519 public key")
    return key


def signed_bytes(record: dict) -> bytes:
    """The exact bytes a record's signature covers (module docstring)."""
    return SIGNATURE_CONTEXT + canonical_bytes({k: v for k, v in record.items() if k != "signature"})


def sign_record(record: dict, key: Ed25519PrivateKey) -> dict:
    """A copy of `record` with its `signature` field (replacing any earlier one)."""
    unsigned = {k: v for k, v in record.items() if k != "signature"}
    value = key.sign(signed_bytes(unsigned))
    return {**unsigned, "signature": {"algorithm": ALGORITHM,
                                      "public_key": base64.b64encode(_raw_public(key.public_key())).decode(),
                                      "value": base64.b64encode(value).decode()}}


@dataclasses.dataclass(frozen=True)
class SignatureCheck:
    """ok: whether the record passes (a valid signature by the required key, or no key required and the record
    is unsigned or validly signed). signer: key_id of the key the record names (None when unsigned).
    message: one line for the verdict."""

    ok: bool
    signer: str | None
    message: str


def _b64(text, length: int) -> bytes | None:
    if not isinstance(text, str) or len(text) != 4 * ((length + 2) // 3):
        return None
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == length else None


def check_signature(record: dict, required: Ed25519PublicKey | None = None) -> SignatureCheck:
    """Checks a record's signature. With `required`, the record must be signed by that key; without, an
    unsigned record passes (and says so) and a signed one must verify under the key it names."""
    sig = record.get("signature")
    if sig is None:
        if required is not None:
            return SignatureCheck(False, None, f"unsigned, but a signature by {key_id(required)} is required")
        return SignatureCheck(True, None, "unsigned (pass --public-key to require a signature)")
    if not isinstance(sig, dict) or set(sig) != {"algorithm", "public_key", "value"} or sig["algorithm"] != ALGORITHM:
        return SignatureCheck(False, None, f"malformed signature field (expected {ALGORITHM}: public_key, value)")
    raw_key, value = _b64(sig["public_key"], 32), _b64(sig["value"], 64)
    if raw_key is None or value is None:
        return SignatureCheck(False, None, "malformed signature field (public_key: 32 bytes, value: 64 bytes, base64)")
    try:
        named = Ed25519PublicKey.from_public_bytes(raw_key)
    except ValueError:
        return SignatureCheck(False, None, "the signature names an invalid public key")
    signer = key_id(named)
    if required is not None and _raw_public(required) != raw_key:
        return SignatureCheck(False, signer, f"signed by {signer}, not by the required key {key_id(required)}")
    try:
        named.verify(value, signed_bytes(record))
    except InvalidSignature:
        return SignatureCheck(False, signer, f"signature by {signer} does not match the record (altered after "
                                             f"signing, or forged)")
    pinned = "the required key" if required is not None else "key not pinned: pass --public-key to require it"
    return SignatureCheck(True, signer, f"valid, signed by {signer} ({pinned})")
