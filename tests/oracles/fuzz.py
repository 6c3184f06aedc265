"""Seeded adversarial mutations of a verification record, and a harness that puts them before a `Verifier`.

What an adversarial claimant (or a broken network) hands a verifier: records with deleted fields, wrong types,
huge numbers, altered or swapped digests, a changed request, changed values (with and without digests
recomputed to match), truncated JSON, a changed environment or signature. `mutants(record, count, seed)` draws
them; `run_fuzz` judges each (in-process, as `ddm verify` does: honest -> exit 0, not honest -> 1, DDMError ->
2, anything else a traceback) with a wall-clock time per record, and counts the outcomes per category.

A mutant "alters the claim" when what it says about the generation (run, request, output, digests) is no longer
true. Changes to the environment or the signature alone are metadata: the claim stays true, so exit 0 is right
for them unless a signature is required. A request change alters the claim unless the changed request really
generates the claimed values bit for bit (an equivalent request); the harness asks the verifier's regeneration.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from ddm.core.errors import DDMError
from ddm.sampling.request import Request
from ddm.verify.records import claimed_values, encode_values, output_digests, record_codec

CATEGORIES = ("delete_field", "wrong_type", "huge_number", "altered_digest", "swapped_hashes", "request",
              "values", "forged_values", "truncated_json", "environment", "signature")
METADATA = ("environment", "signature")
WRONG_TYPES = (None, True, 0, -1, 1.5, "x", "", [], {}, [1, 2], {"a": 1}, "0" * 64)
HUGE = (-1, 2**31, 2**32, 2**63, 2**64, 10**30, 10**300, 1e308, -(2**63), 1e-300)
STRATEGIES = ("full", "topk:3", "single:0", "sample", "top1+full:0.5", "top2", "threshold:0.3")


@dataclasses.dataclass(frozen=True)
class Mutant:
    """category, detail: what was done. text: the record file. altered: whether the claim changed (None: a
    request change, decided by regeneration). request: the changed request (request mutations only)."""

    category: str
    detail: str
    text: str
    altered: bool | None
    request: dict | None = None


def _paths(record: dict) -> list[tuple]:
    """Every field of a record as a path of keys / indices."""
    paths = [(k,) for k in record]
    paths += [("request", k) for k in record.get("request", {})]
    paths += [("shape", i) for i in range(len(record.get("shape", [])))]
    paths += [("images", i, k) for i, row in enumerate(record.get("images", [])) for k in row]
    paths += [("environment", k) for k in record.get("environment", {})]
    paths += [("signature", k) for k in (record.get("signature") or {})]
    return paths


def _set(record: dict, path: tuple, value) -> None:
    target = record
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value


def _delete(record: dict, path: tuple) -> None:
    target = record
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]


def _flip_hex(text: str, bits: int, rng: np.random.Generator) -> str:
    value = int(text, 16)
    for b in rng.choice(len(text) * 4, size=bits, replace=False):
        value ^= 1 << int(b)
    return f"{value:0{len(text)}x}"


GENERIC = ("delete_field", "wrong_type", "huge_number", "altered_digest", "swapped_hashes")


def _claim_text(record: dict) -> str:
    """What a record claims, as canonical text: everything but the metadata."""
    return json.dumps({k: v for k, v in record.items() if k not in METADATA}, sort_keys=True)


def _with_values(record: dict, values: np.ndarray) -> dict:
    """The record claiming `values` instead, with every digest recomputed to match (a consistent forgery)."""
    batch, per_image = output_digests(values, record_codec(record))
    return {**record, "values": encode_values(values), "sha256": batch, "images": per_image}


def mutate(record: dict, category: str, rng: np.random.Generator) -> Mutant:
    """One mutant of `record` in `category`."""
    rec = copy.deepcopy(record)
    text = None
    altered: bool | None = True
    changed_request = None
    if category == "delete_field":
        path = _paths(rec)[rng.integers(len(_paths(rec)))]
        _delete(rec, path)
        detail = f"del {'.'.join(map(str, path))}"
    elif category == "wrong_type":
        path = _paths(rec)[rng.integers(len(_paths(rec)))]
        value = WRONG_TYPES[rng.integers(len(WRONG_TYPES))]
        _set(rec, path, value)
        detail = f"{'.'.join(map(str, path))}={value!r:.20}"
    elif category == "huge_number":
        path = [("request", "n"), ("request", "steps"), ("request", "seed"), ("request", "cfg_scale"),
                ("request", "labels"), ("shape", 0), ("shape", 1), ("shape", 3)][rng.integers(8)]
        value = HUGE[rng.integers(len(HUGE))]
        if path[-1] == "labels":
            value = [value] * rec["request"]["n"]
        _set(rec, path, value)
        detail = f"{'.'.join(map(str, path))}={value!r:.24}"
    elif category == "altered_digest":
        n = len(rec["images"])
        path = [("sha256",), ("manifest_sha256",), ("images", int(rng.integers(n)), "sha256"),
                ("images", int(rng.integers(n)), "phash"), ("images", int(rng.integers(n)), "dhash")][rng.integers(5)]
        old = rec
        for key in path:
            old = old[key]
        how = ("1 bit", "32 bits", "uppercase")[rng.integers(3)]
        if how == "uppercase":
            new = old.upper() if old.upper() != old else _flip_hex(old, 1, rng)
        else:
            new = _flip_hex(old, 1 if how == "1 bit" else min(32, len(old) * 4), rng)
        _set(rec, path, new)
        detail = f"{'.'.join(map(str, path))}: {how}"
    elif category == "swapped_hashes":
        i, j = rng.choice(len(rec["images"]), size=2, replace=False)
        key = ("phash", "dhash", "sha256", "row")[rng.integers(4)]
        if key == "row":
            rec["images"][i], rec["images"][j] = rec["images"][j], rec["images"][i]
        else:
            rec["images"][i][key], rec["images"][j][key] = rec["images"][j][key], rec["images"][i][key]
        detail = f"images {i} <-> {j}: {key}"
    elif category == "request":
        r = dict(rec["request"])
        s = r["steps"]
        choice = rng.integers(6)
        if choice == 0:
            r["steps"] = int([s - 1, s + 1, max(1, s // 2), 2, 2 * s][rng.integers(5)])
        elif choice == 1:
            r["solver"] = "euler" if r["solver"] == "heun" else "heun"
        elif choice == 2:
            r["strategy"] = STRATEGIES[rng.integers(len(STRATEGIES))]
        elif choice == 3:
            r["seed"] = int(r["seed"] + (1 if rng.integers(2) else -1) * (1 + rng.integers(3)))
        elif choice == 4:
            r["cfg_scale"] = 1.5
        else:
            r["labels"] = [int(rng.integers(10))] * r["n"]
        rec["request"] = r
        detail = f"request {', '.join(f'{k}={r[k]}' for k in r if r[k] != record['request'].get(k))}"
        altered, changed_request = None, r
    elif category in ("values", "forged_values"):
        values = claimed_values(record).copy()
        n = len(values)
        choice = rng.integers(5)
        flat = values.reshape(n, -1)
        i, p = int(rng.integers(n)), int(rng.integers(flat.shape[1]))
        if choice == 0:
            flat.view(np.uint32)[i, p] ^= 1  # one ulp
            detail = f"image {i} value {p}: lowest bit"
        elif choice == 1:
            flat[i, p] += np.float32(1 / 127.5)  # one uint8 level
            detail = f"image {i} value {p}: +1 level"
        elif choice == 2:
            flat[i] = flat[(i + 1) % n]
            detail = f"image {i} := image {(i + 1) % n}"
        elif choice == 3:
            flat += np.float32(0.01)
            detail = "every value +0.01"
        else:
            flat[i] = -flat[i]
            detail = f"image {i} negated"
        if category == "forged_values":
            rec = _with_values(rec, values)
        else:
            rec["values"] = encode_values(values)
        altered = not np.array_equal(values.view(np.uint32), claimed_values(record).view(np.uint32))
    elif category == "truncated_json":
        full = json.dumps(rec, indent=1)
        cut = int(rng.integers(1, len(full)))
        text, detail = full[:cut], f"cut at {cut} of {len(full)} characters"
    elif category == "environment":
        env = rec["environment"]
        key = list(env)[rng.integers(len(env))] if env else "jax"
        how = ("change", "delete", "add")[rng.integers(3)]
        if how == "change":
            env[key] = str(env.get(key, "")) + "-other"
        elif how == "delete":
            env.pop(key, None)
        else:
            env["gpu"] = "H100"
        detail, altered = f"environment {how} {key}", False
    elif category == "signature":
        if "signature" not in rec:
            rec["signature"] = {"algorithm": "ed25519", "public_key": "A" * 43 + "=", "value": "A" * 86 + "=="}
            detail = "a made-up signature"
        else:
            key = ("value", "public_key", "algorithm", "delete")[rng.integers(4)]
            if key == "delete":
                del rec["signature"]
            elif key == "algorithm":
                rec["signature"]["algorithm"] = "rsa"
            else:
                raw = rec["signature"][key]
                rec["signature"][key] = raw[:4] + ("B" if raw[4] != "B" else "C") + raw[5:]
            detail = f"signature {key}"
        altered = False
    else:
        raise DDMError(f"unknown fuzz category {category!r}")
    if category in GENERIC:  # altered unless the claim's canonical text is unchanged (True and 1 differ there)
        altered = _claim_text(rec) != _claim_text(record)
    return Mutant(category, detail, text if text is not None else json.dumps(rec, indent=1), altered,
                  changed_request)


def mutants(record: dict, count: int, seed: int, categories: tuple[str, ...] = CATEGORIES) -> list[Mutant]:
    """`count` mutants of `record`, categories in turn, drawn from `default_rng(seed)`."""
    rng = np.random.default_rng(seed)
    return [mutate(record, categories[i % len(categories)], rng) for i in range(count)]


def _request_is_equivalent(verifier, record: dict, request: dict) -> bool:
    """Whether `request` really generates the record's values bit for bit (then the claim is still true)."""
    try:
        regenerated = verifier.regenerate(Request.from_json(request))
    except DDMError:
        return False
    claimed = claimed_values(record)
    return regenerated.shape == claimed.shape and np.array_equal(regenerated.view(np.uint32), claimed.view(np.uint32))


def run_fuzz(verifier, record: dict, count: int, seed: int, work: str | Path, *,
             categories: tuple[str, ...] = CATEGORIES) -> dict:
    """Judges `count` mutants of `record` with `verifier` (a `ddm.verify.verdict.Verifier`).

    Returns {"records", "by_category": {category: {"records", "altered", "exit0", "exit1", "exit2",
    "traceback", "max_seconds"}}, "altered_exit0": [details], "tracebacks": [details], "max_seconds",
    "median_seconds"}: exit0 on an altered claim is a verifier failure, as is any traceback.
    """
    return _judge(verifier, record, mutants(record, count, seed, categories), Path(work), list(categories))


def verify_outcome(verifier, path, m: Mutant) -> tuple[str, str | None]:
    """How `verifier` answers the record at `path` (mutant `m`): ("exit0" honest | "exit1" refuted | "exit2" a
    one-line DDMError | "traceback", the traceback's line for a traceback, else None)."""
    try:
        return ("exit0" if verifier.verify(path).honest else "exit1"), None
    except DDMError:
        return "exit2", None
    except Exception as err:  # noqa: BLE001 -- counted: a traceback is what the fuzz looks for
        return "traceback", f"{m.category}: {m.detail}: {type(err).__name__}: {err}"


def _judge(verifier, record: dict, cases: list[Mutant], work: Path, categories: list[str]) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    path = work / "mutant.json"
    table = {c: {"records": 0, "altered": 0, "exit0": 0, "exit1": 0, "exit2": 0, "traceback": 0, "max_seconds": 0.0}
             for c in categories}
    altered_exit0, tracebacks, seconds = [], [], []
    for m in cases:
        path.write_text(m.text)
        t0 = time.perf_counter()
        outcome, trace = verify_outcome(verifier, path, m)
        if trace is not None:
            tracebacks.append(trace)
        dt = time.perf_counter() - t0
        seconds.append(dt)
        altered = m.altered
        if altered is None:
            altered = not _request_is_equivalent(verifier, record, m.request)
        row = table[m.category]
        row["records"] += 1
        row["altered"] += int(altered)
        row[outcome] += 1
        row["max_seconds"] = round(max(row["max_seconds"], dt), 3)
        if altered and outcome == "exit0":
            altered_exit0.append(f"{m.category}: {m.detail}")
    return {"records": len(cases), "by_category": table, "altered_exit0": altered_exit0, "tracebacks": tracebacks,
            "max_seconds": round(max(seconds, default=0.0), 3), "median_seconds": round(float(np.median(seconds)), 4)}


def issue_cases(record: dict) -> list[Mutant]:
    """The 93 alterations that issue 18 found judged HONEST under ddm-record/v1, rebuilt on `record` (4 images):
    28 per-image hash changes with the batch digest intact (6 pHash swaps, 6 row swaps, 1 / 2 / 32 / 64 pHash
    bits flipped in each image), 18 request changes (steps, solver, strategy, seed), 26 batch digests altered
    with the per-image hashes intact, 21 dHashes altered."""
    n = len(record["images"])
    out: list[Mutant] = []

    def add(category: str, detail: str, change, altered: bool | None = True) -> None:
        rec = copy.deepcopy(record)
        request = change(rec)
        out.append(Mutant(category, detail, json.dumps(rec, indent=1), altered, request))

    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)][:6]
    for i, j in pairs:
        def swap(rec, i=i, j=j):
            rec["images"][i]["phash"], rec["images"][j]["phash"] = rec["images"][j]["phash"], rec["images"][i]["phash"]
        add("per_image_hashes", f"pHash {i} <-> {j}", swap)
    for i, j in pairs:
        def swap_rows(rec, i=i, j=j):
            rec["images"][i], rec["images"][j] = rec["images"][j], rec["images"][i]
        add("per_image_hashes", f"rows {i} <-> {j}", swap_rows)
    for bits in (1, 2, 32, 64):
        for i in range(min(n, 4)):
            def flip(rec, i=i, bits=bits):
                rec["images"][i]["phash"] = f"{int(rec['images'][i]['phash'], 16) ^ ((1 << bits) - 1):016x}"
            add("per_image_hashes", f"image {i}: {bits} pHash bits", flip)
    s = record["request"]["steps"]
    changes = [{"steps": v} for v in (2, max(1, s // 2), s - 1, s + 1, 2 * s, 29, 31, 1)]
    changes += [{"solver": "euler" if record["request"]["solver"] == "heun" else "heun"}]
    changes += [{"strategy": v} for v in STRATEGIES]
    changes += [{"seed": record["request"]["seed"] + d} for d in (1, 2, 3, 4, 5)]
    seen = [record["request"]]
    for change in changes:
        if {**record["request"], **change} not in seen:  # only requests that differ from each other and the claim
            seen.append({**record["request"], **change})
    for change in [{k: v for k, v in r.items() if record["request"][k] != v} for r in seen[1:19]]:
        def new_request(rec, change=change):
            rec["request"].update(change)
            return rec["request"]
        add("request", ", ".join(f"{k}={v}" for k, v in change.items()), new_request, None)
    rng = np.random.default_rng(18)
    for bit in rng.choice(256, size=26, replace=False):
        def digest(rec, bit=int(bit)):
            rec["sha256"] = f"{int(rec['sha256'], 16) ^ (1 << bit):064x}"
        add("batch_sha256", f"bit {bit}", digest)
    for k, bit in enumerate(rng.integers(64, size=21)):
        def dhash(rec, i=k % n, bit=int(bit)):
            rec["images"][i]["dhash"] = f"{int(rec['images'][i]['dhash'], 16) ^ (1 << bit):016x}"
        add("dhash", f"image {k % n} bit {bit}", dhash)
    return out


def judge_mutants(verifier, record: dict, cases: list[Mutant], work: str | Path) -> dict:
    """`run_fuzz` on given mutants (e.g. `issue_cases`)."""
    return _judge(verifier, record, cases, Path(work), list(dict.fromkeys(m.category for m in cases)))
