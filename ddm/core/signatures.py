"""Ed25519 keys and signed JSON documents (through `cryptography`): who handed us what.

Keys: `generate_keypair(KEY)` writes KEY (the private key, PEM PKCS#8, unencrypted, mode 0600) and KEY.pub (the
public key, PEM SubjectPublicKeyInfo); `openssl pkey -in KEY -pubout` gives the same KEY.pub. A key is named by
`key_id`: "ed25519:" + the first 16 hex digits of SHA-256 of its 32 raw public-key bytes. A public key travels
inside documents (a signature, the manifest's island keys) as the base64 of those 32 bytes (`public_key_b64`).

What is signed (`signed_bytes`): a context line naming the kind of document (e.g. ``ddm-record-signature/v1``
and a newline: a signature on one kind of document never verifies as another kind), followed by the canonical
JSON (`ddm.core.documents.canonical_bytes`: sorted keys, no whitespace, ASCII) of the document without its
`signature` field. The signature field is
``{"algorithm": "ed25519", "public_key": base64 of the 32 raw bytes, "value": base64 of the 64-byte signature}``.
Any change to any other field after signing breaks it.

Verification records (`ddm.verify.signing`) and the expert records islands hand back (`ddm.experts.records`)
both sign through this module, each with its own context line.
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
PUBLIC_KEY_BYTES, SIGNATURE_BYTES = 32, 64


def raw_public(key: Ed25519PublicKey) -> bytes:
    """The 32 raw bytes of a public key."""
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id_of_raw(raw: bytes) -> str:
    """`key_id` of a public key given as its 32 raw bytes."""
    return f"{ALGORITHM}:{hashlib.sha256(raw).hexdigest()[:16]}"


def key_id(key: Ed25519PublicKey) -> str:
    """A short, stable name for a public key: "ed25519:" + 16 hex digits of SHA-256 of its raw bytes."""
    return key_id_of_raw(raw_public(key))


def public_key_b64(key: Ed25519PublicKey) -> str:
    """How a public key travels inside a JSON document: base64 of its 32 raw bytes (44 characters)."""
    return base64.b64encode(raw_public(key)).decode()


def b64_bytes(text, length: int) -> bytes | None:
    """The `length` bytes `text` holds in strict base64, or None when it is anything else."""
    if not isinstance(text, str) or len(text) != 4 * ((length + 2) // 3):
        return None
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == length else None


def public_key_from_b64(text, what: str) -> Ed25519PublicKey:
    """The public key of `public_key_b64`'s form; DDMError naming `what` for anything else."""
    raw = b64_bytes(text, PUBLIC_KEY_BYTES)
    try:
        return Ed25519PublicKey.from_public_bytes(raw) if raw is not None else None
    except ValueError:
        pass
    raise DDMError(f"{what} is not an Ed25519 public key (base64 of {PUBLIC_KEY_BYTES} bytes)")


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


def signed_bytes(document: dict, context: bytes) -> bytes:
    """The exact bytes a document's signature covers (module docstring)."""
    return context + canonical_bytes({k: v for k, v in document.items() if k != "signature"})


def sign(document: dict, key: Ed25519PrivateKey, context: bytes) -> dict:
    """A copy of `document` with its `signature` field (replacing any earlier one)."""
    unsigned = {k: v for k, v in document.items() if k != "signature"}
    value = key.sign(signed_bytes(unsigned, context))
    return {**unsigned, "signature": {"algorithm": ALGORITHM, "public_key": public_key_b64(key.public_key()),
                                      "value": base64.b64encode(value).decode()}}


@dataclasses.dataclass(frozen=True)
class SignatureCheck:
    """ok: whether the document passes (a valid signature by the required key, or no key required and the
    document is unsigned or validly signed). signer: key_id of the key the document names (None when unsigned).
    message: one line saying which."""

    ok: bool
    signer: str | None
    message: str


def check(document: dict, context: bytes, required: Ed25519PublicKey | None = None, *, unsigned_note: str = "",
          unpinned_note: str = "") -> SignatureCheck:
    """Checks a document's signature. With `required`, it must be signed by that key; without, an unsigned
    document passes (and says so) and a signed one must verify under the key it names. `unsigned_note` /
    `unpinned_note`: what the message adds, in parentheses, when no key was required and the document is
    unsigned / validly signed (how to require one)."""
    sig = document.get("signature")
    if sig is None:
        if required is not None:
            return SignatureCheck(False, None, f"unsigned, but a signature by {key_id(required)} is required")
        return SignatureCheck(True, None, "unsigned" + (f" ({unsigned_note})" if unsigned_note else ""))
    if not isinstance(sig, dict) or set(sig) != {"algorithm", "public_key", "value"} or sig["algorithm"] != ALGORITHM:
        return SignatureCheck(False, None, f"malformed signature field (expected {ALGORITHM}: public_key, value)")
    raw_key, value = b64_bytes(sig["public_key"], PUBLIC_KEY_BYTES), b64_bytes(sig["value"], SIGNATURE_BYTES)
    if raw_key is None or value is None:
        return SignatureCheck(False, None, "malformed signature field (public_key: 32 bytes, value: 64 bytes, base64)")
    try:
        named = Ed25519PublicKey.from_public_bytes(raw_key)
    except ValueError:
        return SignatureCheck(False, None, "the signature names an invalid public key")
    signer = key_id(named)
    if required is not None and raw_public(required) != raw_key:
        return SignatureCheck(False, signer, f"signed by {signer}, not by the required key {key_id(required)}")
    try:
        named.verify(value, signed_bytes(document, context))
    except InvalidSignature:
        return SignatureCheck(False, signer, f"signature by {signer} does not match the record (altered after "
                                             f"signing, or forged)")
    pinned = " (the required key)" if required is not None else (f" ({unpinned_note})" if unpinned_note else "")
    return SignatureCheck(True, signer, f"valid, signed by {signer}{pinned}")
