"""Ed25519 signatures on verification records: who claimed what.

Keys and the signing itself are `ddm.core.signatures` (shared with the expert records islands hand back);
this module fixes what a verification record's signature covers (`signed_bytes`): the ASCII line
``ddm-record-signature/v1`` and a newline, followed by the canonical JSON (`ddm.core.documents.canonical_bytes`:
sorted keys, no whitespace, ASCII) of the record without its `signature` field. The signature field is
``{"algorithm": "ed25519", "public_key": base64 of the 32 raw bytes, "value": base64 of the 64-byte signature}``.
Any change to any other field after signing (a digest, a request field, a value, the environment) breaks it.
"""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ddm.core import signatures
from ddm.core.signatures import (  # noqa: F401 - the key functions `ddm keygen`, serve and sample use
    ALGORITHM,
    SignatureCheck,
    generate_keypair,
    key_id,
    load_private_key,
    load_public_key,
)

SIGNATURE_CONTEXT = b"ddm-record-signature/v1\n"


def signed_bytes(record: dict) -> bytes:
    """The exact bytes a record's signature covers (module docstring)."""
    return signatures.signed_bytes(record, SIGNATURE_CONTEXT)


def sign_record(record: dict, key: Ed25519PrivateKey) -> dict:
    """A copy of `record` with its `signature` field (replacing any earlier one)."""
    return signatures.sign(record, key, SIGNATURE_CONTEXT)


def check_signature(record: dict, required: Ed25519PublicKey | None = None) -> SignatureCheck:
    """Checks a record's signature. With `required`, the record must be signed by that key; without, an
    unsigned record passes (and says so) and a signed one must verify under the key it names."""
    return signatures.check(record, SIGNATURE_CONTEXT, required,
                            unsigned_note="pass --public-key to require a signature",
                            unpinned_note="key not pinned: pass --public-key to require it")
