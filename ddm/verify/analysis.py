"""The analysis of `ddm consensus-eval`: distance distributions, the threshold rules, and vote rates per mode.

Only verifiers whose reveal matched their commitment vote (`ddm.verify.commit`). Distances are pooled per claim
kind. The pHash threshold is picked by `pick_threshold` and scored at every value 0..64; the tolerance
thresholds by `pick_tolerance` from honest drift alone (the attacks are measured, never used to tune). Every
mode (exact, tolerance, phash, and auto: bit for bit passes, anything else is judged within the thresholds
calibrated here, i.e. tolerance; the record's environment has no say) is scored with one verifier (mean over
verifiers), the majority of N (a claim fails when more than half reject it), and the majority with one
Byzantine verifier that votes the wrong way on every claim (worst case over which verifier it is). A verifier's
verdict on a claim is `ddm verify`'s: the record is consistent and every image passes the mode
(`ddm.verify.verdict.ImageCheck.passes`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from ddm.verify.claims import HONEST_KINDS, INTRA_KIND
from ddm.verify.phash import HASH_BITS
from ddm.verify.thresholds import MEDIAN_MIN_IMAGES, Thresholds
from ddm.verify.verdict import ImageCheck, claim_failures

MODES_SCORED = ("exact", "tolerance", "phash", "auto")
# Tolerance thresholds never go below these (max |dx|, RMS), even when the calibrating verifiers drifted less:
# 5x the drift of fast-math XLA on CPU (max |dx| 1.0e-4, RMS 1.9e-5 at worst on runs/digits, heun 30 steps).
TOLERANCE_FLOOR = (5e-4, 1e-4)


def _popcount(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.uint64)
    return np.unpackbits(x.view(np.uint8).reshape(*x.shape, 8), axis=-1).sum(-1).astype(np.int64)


def _different_noise(gallery: list[dict]) -> np.ndarray:
    """[N, N] bool: pairs of gallery images made from different noise (a collision if they match)."""
    noise = np.array([g["noise"] for g in gallery], np.int64)  # [N, 2]: (seed, index in the request)
    return ~((noise[:, None, 0] == noise[None, :, 0]) & (noise[:, None, 1] == noise[None, :, 1]))


def nearest_neighbours(gallery: list[dict]) -> dict[str, list[int]]:
    """For each gallery image, the smallest pHash distance to an image made from different noise:
    "same_cluster" among images of the same single:k expert, "any" among all images (top1 ones included)."""
    if len(gallery) < 2:
        return {"same_cluster": [], "any": []}
    hashes = np.array([int(g["phash"], 16) for g in gallery], np.uint64)
    other = _different_noise(gallery)
    clusters = np.array([-1 if g["cluster"] is None else g["cluster"] for g in gallery])
    dist = _popcount(hashes[:, None] ^ hashes[None, :])
    big = HASH_BITS + 1
    any_ = np.where(other, dist, big).min(1)
    same = np.where(~other | (clusters[:, None] != clusters[None, :]) | (clusters[:, None] < 0), big, dist)
    same = same.min(1)[clusters >= 0]
    return {"same_cluster": [int(d) for d in same if d < big], "any": [int(d) for d in any_ if d < big]}


def value_nearest_neighbours(gallery: list[dict], chunk: int = 32) -> dict[str, list[float]]:
    """For each gallery image, the smallest max |dx| and the smallest RMS dx to an image made from different
    noise (each minimum taken on its own), from the images' values."""
    if len(gallery) < 2:
        return {"max_abs": [], "rms": []}
    x = np.stack([np.asarray(g["x"], np.float32).reshape(-1) for g in gallery])  # [N, D]
    other = _different_noise(gallery)
    best_abs, best_rms = [], []
    for start in range(0, len(x), chunk):
        diff = x[start:start + chunk, None, :] - x[None, :, :]  # [c, N, D]
        mask = other[start:start + chunk]
        best_abs += np.where(mask, np.abs(diff).max(-1), np.inf).min(1).tolist()
        best_rms += np.where(mask, np.sqrt(np.mean(diff * diff, -1)), np.inf).min(1).tolist()
    return {"max_abs": [v for v in best_abs if np.isfinite(v)], "rms": [v for v in best_rms if np.isfinite(v)]}


def _stats(values) -> dict:
    v = np.asarray(list(values), np.float64)
    if v.size == 0:
        return {"count": 0}
    whole = bool(np.all(v == np.round(v)) and np.isfinite(v).all())
    num = (lambda a: int(a)) if whole else (lambda a: float(f"{a:.4g}"))
    return {"count": int(v.size), "min": num(v.min()), "p5": float(np.percentile(v, 5)),
            "median": float(np.median(v)), "mean": round(float(v.mean()), 6), "p95": float(np.percentile(v, 95)),
            "max": num(v.max())}


def _histogram(values) -> list[int]:
    return np.bincount(np.asarray(list(values), np.int64), minlength=HASH_BITS + 1).tolist()


LOG_EDGES = np.arange(-8.0, 1.01, 0.25)  # log10 bins of value distances (0 falls in the first, inf in the last)


def _log_histogram(values) -> list[int]:
    v = np.asarray(list(values), np.float64)
    logs = np.log10(np.clip(np.where(np.isfinite(v), v, 10.0), 10.0 ** LOG_EDGES[0], 10.0 ** LOG_EDGES[-1]))
    return np.histogram(logs, LOG_EDGES)[0].tolist()


def pick_threshold(honest: list[int], intra: list[int]) -> dict:
    """The pHash threshold rule (docs/verification.md), from per-image pHash distances of honest regenerations
    and of intra-class collisions (different noise, same cluster, and nearest neighbours).

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


def pick_tolerance(honest_max_abs: list[float], honest_rms: list[float], intra_max_abs: list[float],
                   intra_rms: list[float], margin: float = 2.0, *, honest_median_max_abs: list[float] = (),
                   honest_median_rms: list[float] = ()) -> dict:
    """The tolerance thresholds rule, per image, from value distances of honest regenerations (across the
    verifiers' setups) and of intra-class collisions (images from different noise).

    Each threshold is margin x the largest honest distance (room for drift the verifiers did not show), raised to
    `TOLERANCE_FLOOR`. If that would accept an intra-class image (max |dx| and RMS both within), each threshold
    is lowered to the geometric midpoint of the honest maximum and the intra-class minimum, when that still
    lies above the honest maximum ("separable"); otherwise the sets overlap and no threshold is safe. The
    median thresholds are margin x the largest honest per-claim median (of claims with enough images), with
    the same floor.
    """
    h_abs = max(honest_max_abs, default=0.0)
    h_rms = max(honest_rms, default=0.0)
    t_abs = max(margin * h_abs, TOLERANCE_FLOOR[0])
    t_rms = max(margin * h_rms, TOLERANCE_FLOOR[1])
    i_abs, i_rms = min(intra_max_abs, default=math.inf), min(intra_rms, default=math.inf)
    rule = f"{margin:g} x the largest honest distance (floor {TOLERANCE_FLOOR[0]:g} / {TOLERANCE_FLOOR[1]:g})"
    collides = any(a <= t_abs and r <= t_rms for a, r in zip(intra_max_abs, intra_rms))
    separable = h_abs < i_abs or h_rms < i_rms
    if collides and separable:
        t_abs = min(t_abs, math.sqrt(max(h_abs, 1e-12) * i_abs)) if h_abs < i_abs else t_abs
        t_rms = min(t_rms, math.sqrt(max(h_rms, 1e-12) * i_rms)) if h_rms < i_rms else t_rms
        rule += ", lowered to the geometric midpoint below the closest intra-class image"
    m_abs = max(margin * max(honest_median_max_abs, default=0.0), TOLERANCE_FLOOR[0])
    m_rms = max(margin * max(honest_median_rms, default=0.0), TOLERANCE_FLOOR[1])
    return {"rule": rule, "margin": margin, "honest_max_abs": h_abs, "honest_max_rms": h_rms,
            "honest_max_median_max_abs": max(honest_median_max_abs, default=0.0),
            "honest_max_median_rms": max(honest_median_rms, default=0.0),
            "median_max_abs": float(f"{min(m_abs, t_abs):.3g}"), "median_rms": float(f"{min(m_rms, t_rms):.3g}"),
            "intra_min_max_abs": None if math.isinf(i_abs) else i_abs,
            "intra_min_rms": None if math.isinf(i_rms) else i_rms, "separable": separable,
            "max_abs": float(f"{t_abs:.3g}"), "rms": float(f"{t_rms:.3g}")}


def vote_rates(reject: np.ndarray, *, honest: bool) -> dict[str, float]:
    """Rejection rates of claims from each verifier's votes.

    reject: [V, C] bool, verifier v rejects claim c. honest: whether these claims are honest (the Byzantine
    verifier then rejects them; otherwise it accepts them). Returns single (mean over verifiers), majority (more
    than half reject) and byzantine (majority with one verifier voting the wrong way; worst case over which).
    """
    reject = np.asarray(reject, bool)
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


def _checks(result: dict) -> list[ImageCheck]:
    d = result["distances"]
    inf = math.inf
    return [ImageCheck(identical=s, phash=p, dhash=q, max_abs=inf if a is None else a, rms=inf if r is None else r)
            for s, p, q, a, r in zip(d["identical"], d["phash"], d["dhash"], d["max_abs"], d["rms"])]


def image_passes(result: dict, mode: str, thresholds: Thresholds) -> list[bool]:
    """Per image of one verifier's result on one claim: whether it passes `mode` (auto: the verifier's)."""
    mode = result["auto_mode"] if mode == "auto" else mode
    return [c.passes(mode, thresholds) for c in _checks(result)]


def claim_rejected(result: dict, mode: str, thresholds: Thresholds) -> bool:
    """Whether a verifier rejects a claim in `mode` at `thresholds`, as `ddm verify` would."""
    mode = result["auto_mode"] if mode == "auto" else mode
    return not result["consistent"] or bool(claim_failures(_checks(result), mode, thresholds))


def _rate_bound(misses: int, total: int) -> float | None:
    """95% upper bound on a rate of which `misses` of `total` were seen (exact for 0: the rule of three)."""
    if total == 0:
        return None
    if misses == 0:
        return round(1 - 0.05 ** (1 / total), 6)
    return None


def analyse(claims: list[dict], reveals: list[dict], reveal_checks: list[dict], gallery: list[dict],
            margin: float = 2.0, thresholds: Thresholds | None = None) -> dict:
    """Distributions, threshold picks and per-mode rates from the claims and the verifiers' reveals; only
    verifiers that passed commit-reveal count. The modes are scored at the thresholds calibrated here, or at
    `thresholds` when given (calibrated on other claims: a held-out evaluation)."""
    voters = [i for i, c in enumerate(reveal_checks) if c["ok"]]
    kinds = list(dict.fromkeys(c["kind"] for c in claims))
    by_id = [{r["claim"]: r for r in reveals[v]["results"]} for v in voters]
    rows: dict[str, list[list[dict]]] = {}  # kind -> [V][C] results
    per_image: dict[str, dict[str, list]] = {}
    for kind in kinds:
        ids = [c["id"] for c in claims if c["kind"] == kind]
        rows[kind] = [[results[i] for i in ids] for results in by_id]
        pooled = {"phash": [], "dhash": [], "max_abs": [], "rms": []}
        for row in rows[kind]:
            for r in row:
                for key in pooled:
                    pooled[key] += [math.inf if v is None else v for v in r["distances"][key]]
        per_image[kind] = pooled
    exact = {k: [round(float(np.mean([all(r["distances"]["identical"]) for r in row])), 4) for row in rows[k]]
             for k in kinds}

    nn = nearest_neighbours(gallery)
    value_nn = value_nearest_neighbours(gallery)
    honest = [k for k in HONEST_KINDS if k in per_image]
    pick = pick_threshold([d for k in honest for d in per_image[k]["phash"]],
                          per_image.get(INTRA_KIND, {}).get("phash", []) + nn["same_cluster"] + nn["any"])
    intra = per_image.get(INTRA_KIND, {"max_abs": [], "rms": []})
    medians = {key: [float(np.median([math.inf if v is None else v for v in r["distances"][key]]))
                     for k in honest for row in rows[k] for r in row
                     if len(r["distances"][key]) >= MEDIAN_MIN_IMAGES] for key in ("max_abs", "rms")}
    tol = pick_tolerance([d for k in honest for d in per_image[k]["max_abs"]],
                         [d for k in honest for d in per_image[k]["rms"]],
                         intra["max_abs"] + value_nn["max_abs"], intra["rms"] + value_nn["rms"], margin,
                         honest_median_max_abs=medians["max_abs"], honest_median_rms=medians["rms"])
    if thresholds is None:
        thresholds = Thresholds(phash=pick["recommended"], max_abs=tol["max_abs"], rms=tol["rms"],
                                median_max_abs=tol["median_max_abs"], median_rms=tol["median_rms"],
                                source="consensus-eval calibration")

    # pHash at every threshold (the rule's input and the sweep in docs/verification.md). A verifier rejects a
    # claim in phash mode when it is inconsistent or its largest pHash distance exceeds the threshold.
    worst = {k: np.array([[max(r["distances"]["phash"]) if r["consistent"] else HASH_BITS + 1 for r in vrow]
                          for vrow in rows[k]]) for k in kinds}
    tampered = [k for k in kinds if k not in HONEST_KINDS]
    per_threshold = []
    for t in range(HASH_BITS + 1):
        at = dataclasses.replace(thresholds, phash=t)
        row: dict[str, Any] = {"threshold": t}
        for kind in kinds:
            row[kind] = vote_rates(worst[kind] > t, honest=kind in HONEST_KINDS)
        row["intra_false_accept_per_image"] = _intra_false_accepts(rows, "phash", at, nn["any"], [])
        if tampered:
            row["all_attacks"] = vote_rates(np.concatenate([worst[k] > t for k in tampered], axis=1), honest=False)
        per_threshold.append(row)

    modes = {}
    for mode in MODES_SCORED:
        table = {}
        for kind in kinds:
            reject = np.array([[claim_rejected(r, mode, thresholds) for r in vrow] for vrow in rows[kind]])
            rates = vote_rates(reject, honest=kind in HONEST_KINDS)
            count = reject.shape[1]
            misses = int((reject.sum(0) * 2 <= reject.shape[0]).sum()) if kind not in HONEST_KINDS else \
                int((reject.sum(0) * 2 > reject.shape[0]).sum())
            table[kind] = {**rates, "claims": count, "majority_errors": misses,
                           "majority_error_bound95": _rate_bound(misses, count)}
        value_nn_pairs = list(zip(value_nn["max_abs"], value_nn["rms"]))
        table["intra_false_accept_per_image"] = _intra_false_accepts(rows, mode, thresholds, nn["any"],
                                                                     value_nn_pairs)
        modes[mode] = table

    return {
        "voters": voters,
        "commit_reveal": reveal_checks,
        "kinds": kinds,
        "claims_per_kind": {k: len(rows[k][0]) if rows[k] else 0 for k in kinds},
        "phash_per_image": {k: _stats(v["phash"]) for k, v in per_image.items()},
        "dhash_per_image": {k: _stats(v["dhash"]) for k, v in per_image.items()},
        "max_abs_per_image": {k: _stats(v["max_abs"]) for k, v in per_image.items()},
        "rms_per_image": {k: _stats(v["rms"]) for k, v in per_image.items()},
        "nearest_neighbour": {k: _stats(v) for k, v in nn.items()},
        "value_nearest_neighbour": {k: _stats(v) for k, v in value_nn.items()},
        "histograms": {**{k: _histogram(v["phash"]) for k, v in per_image.items()},
                       **{f"nearest_neighbour_{k}": _histogram(v) for k, v in nn.items()}},
        "max_abs_histograms": {"log10_edges": LOG_EDGES.tolist(),
                               **{k: _log_histogram(v["max_abs"]) for k, v in per_image.items()},
                               "nearest_neighbour": _log_histogram(value_nn["max_abs"])},
        "bitwise_identical": exact,
        "threshold": pick,
        "tolerance": tol,
        "thresholds": thresholds.to_json(),
        "per_threshold": per_threshold,
        "modes": modes,
    }


def _intra_false_accepts(rows: dict, mode: str, thresholds: Thresholds, nn_phash: list[int],
                         nn_values: list[tuple[float, float]]) -> dict:
    """Intra-class false accepts per image in `mode`: `same_cluster` images (one image claimed as another of the
    same expert from different noise) that pass, by vote; and the share of gallery images with a nearest
    different-noise neighbour that would pass (pHash distance, or max |dx| and RMS, by the mode)."""
    out: dict[str, Any] = {}
    if rows.get(INTRA_KIND):
        reject = np.array([[not p for r in vrow for p in image_passes(r, mode, thresholds)]
                           for vrow in rows[INTRA_KIND]])
        out.update({m: round(1.0 - v, 6) for m, v in vote_rates(reject, honest=False).items()})
        out["images"] = int(reject.shape[1])
    if mode == "phash":
        hits = [d <= thresholds.phash for d in nn_phash]
    elif mode == "exact":
        hits = [False] * len(nn_values)  # different noise is never bit for bit the same image
    else:  # tolerance, and auto (whose non-exact verifiers use tolerance): a conservative count, since the
        # smallest max |dx| and the smallest RMS may come from two different neighbours
        hits = [a <= thresholds.max_abs and r <= thresholds.rms for a, r in nn_values]
    out["nearest_neighbour"] = round(float(np.mean(hits)), 6) if hits else None
    out["nearest_neighbour_images"] = len(hits)
    return out
