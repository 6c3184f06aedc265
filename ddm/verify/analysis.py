"""The analysis of `ddm consensus-eval`: distance distributions, the threshold rule, and vote rates.

Distances are pooled per claim kind; the threshold is picked by `pick_threshold`, and every threshold is scored
with one verifier (mean over verifiers), the majority of N (a claim fails when more than half of the verifiers
reject it), and the majority with one Byzantine verifier that votes the wrong way on every claim (worst case
over which verifier it is). A verifier rejects a claim when any image's pHash distance exceeds the threshold
(as `ddm verify` does).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ddm.verify.claims import HONEST_KINDS, INTRA_KIND
from ddm.verify.phash import HASH_BITS


def _popcount(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.uint64)
    return np.unpackbits(x.view(np.uint8).reshape(*x.shape, 8), axis=-1).sum(-1).astype(np.int64)


def nearest_neighbours(gallery: list[dict]) -> dict[str, list[int]]:
    """For each gallery image, the smallest pHash distance to an image made from different noise:
    "same_cluster" among images of the same single:k expert, "any" among all images (top1 ones included)."""
    if len(gallery) < 2:
        return {"same_cluster": [], "any": []}
    hashes = np.array([int(g["phash"], 16) for g in gallery], np.uint64)
    noise = np.array([g["noise"] for g in gallery], np.int64)  # [N, 2]: (seed, index in the request)
    same_noise = (noise[:, None, 0] == noise[None, :, 0]) & (noise[:, None, 1] == noise[None, :, 1])
    clusters = np.array([-1 if g["cluster"] is None else g["cluster"] for g in gallery])
    dist = _popcount(hashes[:, None] ^ hashes[None, :])
    big = HASH_BITS + 1
    any_ = np.where(same_noise, big, dist).min(1)
    same = np.where(same_noise | (clusters[:, None] != clusters[None, :]) | (clusters[:, None] < 0), big, dist)
    same = same.min(1)[clusters >= 0]
    return {"same_cluster": [int(d) for d in same if d < big], "any": [int(d) for d in any_ if d < big]}


def _stats(values) -> dict:
    v = np.asarray(list(values), np.float64)
    if v.size == 0:
        return {"count": 0}
    return {"count": int(v.size), "min": int(v.min()), "p5": float(np.percentile(v, 5)),
            "median": float(np.median(v)), "mean": round(float(v.mean()), 3), "p95": float(np.percentile(v, 95)),
            "max": int(v.max())}


def _histogram(values) -> list[int]:
    return np.bincount(np.asarray(list(values), np.int64), minlength=HASH_BITS + 1).tolist()


def pick_threshold(honest: list[int], intra: list[int]) -> dict:
    """The threshold rule (docs/verification.md), from per-image pHash distances of honest regenerations and
    of intra-class collisions (different noise, same cluster, and nearest neighbours).

    - largest_zero_false_accept = min(intra) - 1: the largest threshold that accepts no measured collision;
    - if that is >= max(honest) the sets separate, and the recommended threshold is the midpoint
      max(honest) + (min(intra) - max(honest)) // 2, leaving equal margins for unseen honest hardware drift
      and unseen closer collisions;
    - otherwise (overlap) it is the threshold minimising honest false rejects + intra-class false accepts
      (per image).
    """
    h = np.asarray(honest if honest else [0], np.int64)
    c = np.asarray(intra, np.int64)
    honest_max = int(h.max())
    if c.size == 0:
        return {"rule": "no intra-class measurements: the largest honest distance", "honest_max": honest_max,
                "intra_min": None, "largest_zero_false_accept": None, "separable": True,
                "recommended": honest_max}
    intra_min = int(c.min())
    zero_fa = intra_min - 1
    if zero_fa >= honest_max:
        return {"rule": "midpoint between the largest honest and the smallest intra-class distance",
                "honest_max": honest_max, "intra_min": intra_min, "largest_zero_false_accept": zero_fa,
                "separable": True, "recommended": honest_max + (intra_min - honest_max) // 2}
    ts = np.arange(HASH_BITS + 1)
    cost = (h[None, :] > ts[:, None]).mean(1) + (c[None, :] <= ts[:, None]).mean(1)
    return {"rule": "overlap: minimum of honest false-reject + intra-class false-accept rate per image",
            "honest_max": honest_max, "intra_min": intra_min, "largest_zero_false_accept": max(zero_fa, -1),
            "separable": False, "recommended": int(np.argmin(cost))}


def vote_rates(max_dist: np.ndarray, threshold: int, *, honest: bool) -> dict[str, float]:
    """Rejection rates of claims at `threshold`.

    max_dist: [V, C] each verifier's largest per-image pHash distance for each claim (a verifier rejects when
    it exceeds the threshold). honest: whether these claims are honest (the Byzantine verifier then rejects
    them; otherwise it accepts them). Returns single (mean over verifiers), majority (more than half reject)
    and byzantine (majority with one verifier voting the wrong way; worst case over which one).
    """
    reject = np.asarray(max_dist) > threshold  # [V, C]
    n_verifiers = reject.shape[0]
    single = float(reject.mean())
    majority = float((reject.sum(0) * 2 > n_verifiers).mean())
    byz = []
    for b in range(n_verifiers):
        votes = reject.copy()
        votes[b] = honest  # honest claims: always reject; tampered: always accept
        byz.append(float((votes.sum(0) * 2 > n_verifiers).mean()))
    byzantine = max(byz) if honest else min(byz)
    return {"single": round(single, 4), "majority": round(majority, 4), "byzantine": round(byzantine, 4)}


def analyse(claims: list[dict], outputs: list[dict], gallery: list[dict]) -> dict:
    """Distributions, threshold pick and per-threshold rates from the claims and the verifiers' outputs."""
    kinds = list(dict.fromkeys(c["kind"] for c in claims))
    by_id = [{r["id"]: r for r in out["results"]} for out in outputs]
    per_image: dict[str, list[int]] = {k: [] for k in kinds}
    per_image_dhash: dict[str, list[int]] = {k: [] for k in kinds}
    max_dist: dict[str, np.ndarray] = {}
    image_dist: dict[str, np.ndarray] = {}  # [V, images of all claims of the kind]
    exact: dict[str, list[float]] = {}
    for kind in kinds:
        ids = [c["id"] for c in claims if c["kind"] == kind]
        rows = [[results[i] for i in ids] for results in by_id]  # [V][C]
        max_dist[kind] = np.array([[max(r["phash"]) for r in row] for row in rows])
        image_dist[kind] = np.array([[d for r in row for d in r["phash"]] for row in rows])
        for row in rows:
            for r in row:
                per_image[kind] += r["phash"]
                per_image_dhash[kind] += r["dhash"]
        exact[kind] = [round(float(np.mean([r["exact"] for r in row])), 4) for row in rows]
    nn = nearest_neighbours(gallery)
    honest_images = [d for k in HONEST_KINDS if k in per_image for d in per_image[k]]
    intra_images = per_image.get(INTRA_KIND, []) + nn["same_cluster"] + nn["any"]
    pick = pick_threshold(honest_images, intra_images)

    table = []
    for t in range(HASH_BITS + 1):
        row: dict[str, Any] = {"threshold": t}
        for kind in kinds:
            rates = vote_rates(max_dist[kind], t, honest=kind in HONEST_KINDS)
            row[kind] = rates
        # intra-class false accepts per image: one image claimed as another made from different noise
        img = image_dist.get(INTRA_KIND)
        fa = {} if img is None else vote_rates(img, t, honest=False)
        row["intra_false_accept_per_image"] = {
            **{m: round(1.0 - v, 4) for m, v in fa.items()},
            "nearest_neighbour": round(float(np.mean(np.asarray(nn["any"]) <= t)), 4) if nn["any"] else None,
        }
        tampered = [k for k in kinds if k not in HONEST_KINDS]
        if tampered:
            pooled = np.concatenate([max_dist[k] for k in tampered], axis=1)
            row["all_attacks"] = vote_rates(pooled, t, honest=False)
        table.append(row)

    return {
        "kinds": kinds,
        "claims_per_kind": {k: int(max_dist[k].shape[1]) for k in kinds},
        "phash_per_image": {k: _stats(v) for k, v in per_image.items()},
        "dhash_per_image": {k: _stats(v) for k, v in per_image_dhash.items()},
        "phash_per_claim_max": {k: _stats(max_dist[k].ravel()) for k in kinds},
        "nearest_neighbour": {k: _stats(v) for k, v in nn.items()},
        "histograms": {**{k: _histogram(v) for k, v in per_image.items()},
                       **{f"nearest_neighbour_{k}": _histogram(v) for k, v in nn.items()}},
        "bitwise_identical": exact,
        "threshold": pick,
        "per_threshold": table,
    }
