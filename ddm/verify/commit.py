"""Commit-reveal between verifiers, so that no verifier can copy another's result instead of regenerating.

Phase 1 (commit): for each claim, a verifier publishes only ``commitment(payload, nonce)``:
SHA-256 of the ASCII line ``ddm-commit/v1`` and a newline, the canonical JSON (`ddm.core.documents.canonical_bytes`)
of its payload (the claim id, its own verifier index, its verdicts and its per-image distances), a newline, and
a fresh 256-bit nonce as 64 hex digits. Phase 2 (reveal) opens only once every verifier has committed; each
then publishes its payloads and nonces, and anyone recomputes the hashes (`check_reveals`).

A verifier that copies another's reveal cannot match its own commitment (made before any reveal existed); one
that copies another's commitment must reveal that verifier's payload, which names that verifier, and its
commitments are identical to another verifier's, which fresh nonces make impossible for honest verifiers. Both
are rejected, and their votes do not count. Verifiers that share results off-channel before committing are
outside what this can see.
"""

from __future__ import annotations

import hashlib
import secrets

from ddm.core.documents import canonical_bytes
from ddm.core.errors import DDMError

COMMIT_CONTEXT = b"ddm-commit/v1\n"


def new_nonce() -> str:
    return secrets.token_hex(32)


def commitment(payload: dict, nonce: str) -> str:
    """The commitment (64 hex digits) to one payload under a nonce (64 hex digits)."""
    return hashlib.sha256(COMMIT_CONTEXT + canonical_bytes(payload) + b"\n" + nonce.encode("ascii")).hexdigest()


def commit(payloads: dict[str, dict]) -> tuple[dict[str, str], dict[str, str]]:
    """(commitments, nonces), each keyed like `payloads` (claim id -> payload), with a fresh nonce per payload."""
    nonces = {key: new_nonce() for key in payloads}
    return {key: commitment(p, nonces[key]) for key, p in payloads.items()}, nonces


def check_reveals(commitments: list[dict[str, str]], reveals: list[dict[str, dict]],
                  nonces: list[dict[str, str]]) -> list[dict]:
    """Checks every verifier's reveal against its commitments. All three lists are indexed by verifier and map a
    claim id to the commitment, the revealed payload and the revealed nonce.

    Returns per verifier {"ok": bool, "problems": {kind: count}, "first": one line or None}; the kinds are
    "missing" (a committed claim not revealed, or revealed without a commitment), "mismatch" (the reveal does not
    hash to the commitment), "names another verifier" (the payload's verifier index is not its own) and
    "duplicate commitment" (equal to another verifier's commitment, and not a valid reveal of its own: copied; the
    verifier it was copied from, whose reveal matches and names itself, is not blamed).
    """
    owner: dict[str, list[int]] = {}
    for v, cs in enumerate(commitments):
        for c in cs.values():
            owner.setdefault(c, []).append(v)
    out = []
    for v, (cs, rs, ns) in enumerate(zip(commitments, reveals, nonces)):
        found: list[tuple[str, str]] = []  # (kind, one line)
        for key in sorted(set(cs) | set(rs)):
            if key not in cs or key not in rs or not isinstance(ns.get(key), str):
                found.append(("missing", f"claim {key}: committed and revealed do not match up"))
                continue
            try:
                matches = commitment(rs[key], ns[key]) == cs[key]
            except (UnicodeEncodeError, ValueError, TypeError, DDMError):
                matches = False
            own = isinstance(rs[key], dict) and rs[key].get("verifier") == v
            if not matches:
                found.append(("mismatch", f"claim {key}: the reveal does not match its commitment"))
            elif not own:
                named = rs[key].get("verifier") if isinstance(rs[key], dict) else None
                found.append(("names another verifier", f"claim {key}: the revealed payload is verifier {named}'s"))
            others = [u for u in owner.get(cs[key], []) if u != v]
            if others and not (matches and own):  # a valid reveal naming itself is the original, not the copy
                found.append(("duplicate commitment", f"claim {key}: the same commitment as verifier {others[0]}"))
        kinds = dict.fromkeys(k for k, _ in found)
        out.append({"ok": not found, "problems": {k: sum(f == k for f, _ in found) for k in kinds},
                    "first": found[0][1] if found else None})
    return out
