"""`ddm verify`: judge a record by regenerating its request, in one of three modes.

A record is honest only if (1) its signature passes (`ddm.verify.signing`; required with --public-key), (2) it
is consistent: its batch digest and every per-image sha256 / pHash / dHash are the digests of its own values
(`ddm.verify.records.contradictions`), and (3) every image agrees with the regeneration under the mode:

- exact: the regenerated values are bit for bit the claimed ones (so are the images, the batch digest and
  every hash). For a verifier on the claimant's software and hardware;
- tolerance: per image, max |dx| <= max_abs and RMS dx <= rms between regenerated and claimed values (float32,
  model range), and for claims of 5 or more images the medians over images of both within median_max_abs and
  median_rms, with 5% of the images (at least one) allowed up to outlier_max_abs: honest drift is heavy-tailed
  (`ddm.verify.thresholds`);
- phash: per image, pHash Hamming distance <= phash bits (the old perceptual check, blind to small changes on
  8x8 images: docs/verification.md);
- auto (the default): a bitwise identical regeneration is exact; any other is judged in tolerance mode when
  this verifier holds thresholds it calibrated itself (`ddm verify --calibrate`, `ddm consensus-eval`), else
  in exact mode (not honest, saying that a claim from another platform needs a calibration).

The verifier, not the claimant, chooses the comparison: the record's `environment` is information only, and
tolerance and phash thresholds come only from the verifier's own calibration in its present environment
(`ddm.verify.thresholds.own_thresholds`), replaced value by value by the verifier's flags. Tolerance or phash
mode without them is refused (DDMError, exit 2): there are no built-in thresholds.

A record that names each image's expert (`experts`: prior, oracle, single) must name the regeneration's: a
prior record whose draws were edited is not honest even when its images are.

A record of a run conditioned on embeddings names them by digest (`request.conditions_sha256`); the verifier
regenerates with the embeddings it is given (`ddm verify --conditions FILE`) and refuses, before regenerating,
when none are given or their digest is not the record's (DDMError, exit 2). Images drawn for other conditions
than the ones the record names regenerate differently: not honest.

(1) and (2) need no model: a record that fails them is judged without regenerating anything. dHash is part of
the verdict only through (2); the distances each mode does not use are printed for information, labelled so.
"""

from __future__ import annotations

import collections
import dataclasses
from pathlib import Path

import numpy as np

from ddm.core.codec import Codec
from ddm.core.documents import canonical_bytes
from ddm.core.errors import DDMError
from ddm.data.membership import find as find_membership
from ddm.data.run import Run
from ddm.sampling.load import load_ensemble
from ddm.sampling.request import Request, check_conditions, generate
from ddm.verify.environment import environment
from ddm.verify.limits import DEFAULT_LIMITS, MODES, VerifyLimits
from ddm.verify.phash import hamming, hex_to_hash, perceptual_hashes
from ddm.verify.records import claimed_values, contradictions, read_record, record_codec
from ddm.verify.signing import SignatureCheck, check_signature
from ddm.verify.thresholds import (CALIBRATE_COMMAND, MEDIAN_MIN_IMAGES, OwnThresholds, Thresholds, outlier_allowance,
                                   own_thresholds)

__all__ = ["MODES", "ImageCheck", "Verdict", "Verifier", "compare", "format_verdict", "verify_record"]

NO_CALIBRATION = OwnThresholds(None, "no thresholds given")


@dataclasses.dataclass(frozen=True)
class ImageCheck:
    """One image, claimed vs regenerated. identical: the float32 values are bit for bit equal. phash, dhash:
    Hamming distances of the perceptual hashes of the two uint8 images. max_abs, rms: of the value difference
    (inf when a regenerated value is not finite)."""

    identical: bool
    phash: int
    dhash: int
    max_abs: float
    rms: float

    def passes(self, mode: str, thresholds: Thresholds | None) -> bool:
        """Whether this image passes a resolved mode (thresholds: None only in exact mode)."""
        if mode == "exact":
            return self.identical
        if mode == "tolerance":
            return self.max_abs <= thresholds.max_abs and self.rms <= thresholds.rms
        if mode == "phash":
            return self.phash <= thresholds.phash
        raise DDMError(f"mode {mode!r} is not one of exact, tolerance, phash")


def value_distances(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per image max |a - b| and RMS(a - b) of float batches [n, ...]: two float64 [n]; inf where either is
    not finite (NaN never compares as small)."""
    diff = (np.asarray(a, np.float64) - np.asarray(b, np.float64)).reshape(len(a), -1)
    finite = np.isfinite(diff).all(axis=1)
    diff = np.where(np.isfinite(diff), diff, 0.0)
    max_abs = np.where(finite, np.abs(diff).max(axis=1), np.inf)
    rms = np.where(finite, np.sqrt(np.mean(diff * diff, axis=1)), np.inf)
    return max_abs, rms


def image_checks(claimed: np.ndarray, regenerated: np.ndarray, codec: Codec = Codec()) -> list[ImageCheck]:
    """Per-image comparison of two float32 batches [n, H, W, C] (claimed, regenerated); perceptual hashes of
    what `codec` shows (the images, or the latent preview)."""
    claimed, regenerated = np.asarray(claimed, np.float32), np.asarray(regenerated, np.float32)
    if claimed.shape != regenerated.shape:
        raise DDMError(f"regenerated values have shape {list(regenerated.shape)}, the record claims "
                       f"{list(claimed.shape)}")
    n = len(claimed)
    same = (claimed.view(np.uint32) == regenerated.view(np.uint32)).reshape(n, -1).all(axis=1)
    # a non-finite regeneration never passes (value_distances); hash it as zeros rather than cast NaN to uint8
    ha, hb = perceptual_hashes(codec.preview(claimed)), perceptual_hashes(codec.preview(np.nan_to_num(regenerated)))
    max_abs, rms = value_distances(claimed, regenerated)
    return [ImageCheck(identical=bool(same[i]),
                       phash=hamming(hex_to_hash(ha[i]["phash"]), hex_to_hash(hb[i]["phash"])),
                       dhash=hamming(hex_to_hash(ha[i]["dhash"]), hex_to_hash(hb[i]["dhash"])),
                       max_abs=float(max_abs[i]), rms=float(rms[i])) for i in range(n)]


def check_mode(mode: str, own: OwnThresholds) -> None:
    """DDMError unless `mode` is known and, for tolerance and phash, the verifier holds thresholds of its own."""
    if mode not in MODES:
        raise DDMError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    if mode in ("tolerance", "phash") and own.thresholds is None:
        raise DDMError(f"{mode} mode needs thresholds this verifier calibrated itself, and {own.note}: run "
                       f"{CALIBRATE_COMMAND} first")


def resolve_mode(mode: str, identical: bool | None, own: OwnThresholds) -> tuple[str, str]:
    """(exact | tolerance | phash, why) for `mode` (`check_mode` passed). identical: whether the regeneration
    is bitwise the claimed values (None: not regenerated). The record has no say."""
    if mode != "auto":
        return mode, "chosen"
    if identical:
        return "exact", "auto: the regeneration is bitwise identical"
    if own.thresholds is not None:
        return "tolerance", "auto: not bitwise identical, and this verifier has calibrated the run"
    return "exact", f"auto: {own.note}, so only bit for bit passes"


def describe_claim(record: dict, signer: str | None) -> str:
    """Who claimed what, in one line."""
    r = record["request"]
    extra = "".join(f" {k}={r[k]}" for k in ("labels", "cfg_scale") if r.get(k) is not None)
    if isinstance(r.get("conditions_sha256"), str):
        extra += f" conditions={r['conditions_sha256'][:16]}"
    return (f"{signer or 'an unsigned claimant'} claims {r['n']} images {record['shape'][1:]} of run "
            f"{record['manifest_sha256'][:16]}: seed={r['seed']} strategy={r['strategy']} steps={r['steps']} "
            f"solver={r['solver']}{extra}")


@dataclasses.dataclass(frozen=True)
class Verdict:
    """honest: the record passed every check. mode: exact | tolerance | phash (auto resolved; mode_reason says
    why). checks: per image (empty when the record failed before regeneration). problems: why it is not
    honest, one line each."""

    honest: bool
    mode: str
    mode_reason: str
    thresholds: Thresholds | None
    checks: tuple[ImageCheck, ...]
    problems: tuple[str, ...]
    claim: str
    signature: str

    @property
    def exact(self) -> bool:
        return bool(self.checks) and all(c.identical for c in self.checks)

    def to_json(self) -> dict:
        return {"honest": self.honest, "mode": self.mode, "mode_reason": self.mode_reason,
                "thresholds": None if self.thresholds is None else self.thresholds.to_json(), "exact": self.exact,
                "images": [dataclasses.asdict(c) for c in self.checks], "problems": list(self.problems),
                "claim": self.claim, "signature": self.signature}


def claim_failures(checks: list[ImageCheck], mode: str, thresholds: Thresholds | None) -> list[str]:
    """Why a claim's regeneration fails a resolved mode (empty: it passes): images that fail on their own, and in
    tolerance mode, for 5 or more images, medians over the images beyond their thresholds. In tolerance mode
    up to `outlier_allowance(n)` images beyond the per-image bounds but within `outlier_max_abs` are the honest
    tail, not failures. thresholds: None only in exact mode."""
    failures = []
    failed = [i for i, c in enumerate(checks) if not c.passes(mode, thresholds)]
    if mode == "tolerance":
        tail = [i for i in failed if checks[i].max_abs <= thresholds.outlier_max_abs]
        if len(tail) <= outlier_allowance(len(checks)):
            failed = [i for i in failed if i not in tail]
    if failed:
        failures.append(f"{len(failed)} of {len(checks)} images fail {mode} mode (images {failed[:8]}"
                        f"{' ...' if len(failed) > 8 else ''})")
    if mode == "tolerance" and len(checks) >= MEDIAN_MIN_IMAGES:
        for name, limit in (("max_abs", thresholds.median_max_abs), ("rms", thresholds.median_rms)):
            median = float(np.median([getattr(c, name) for c in checks]))
            if not median <= limit:
                label = "max|dx|" if name == "max_abs" else "rms dx"
                failures.append(f"the median {label} over the images, {_fmt(median)}, exceeds {limit:g}")
    return failures


def decide(checks: list[ImageCheck] | None, problems: list[str], mode: str,
           thresholds: Thresholds | None) -> tuple[bool, list[str]]:
    """(honest, problems) of a record under a resolved mode: any earlier problem, or `claim_failures`."""
    problems = list(problems)
    if checks is None:
        return False, problems or ["not regenerated"]
    problems += claim_failures(checks, mode, thresholds)
    return not problems, problems


def record_problems(record: dict, signature: SignatureCheck | None = None) -> list[str]:
    """What is wrong with a validated record before any regeneration: a failed signature, contradictions."""
    problems = [] if signature is None or signature.ok else [f"signature: {signature.message}"]
    return problems + [f"contradictory record: {p}" for p in contradictions(record, claimed_values(record))]


def expert_problems(record: dict, experts: np.ndarray | None, strategy: str) -> list[str]:
    """Where a record's claimed per-image experts (`experts`, if it has them) disagree with the regeneration's
    (`SampleResult.experts`: int [n], None when `strategy` fixes no expert per image)."""
    if "experts" not in record:
        return []
    if experts is None:
        return [f"the record names each image's expert, but strategy {strategy} fixes none"]
    wrong = np.flatnonzero(np.asarray(record["experts"]) != np.asarray(experts)).tolist()
    if wrong:
        more = " ..." if len(wrong) > 8 else ""
        return [f"the claimed experts of images {wrong[:8]}{more} are not the request's "
                + f"(regenerated: {[int(experts[i]) for i in wrong[:8]]})"]
    return []


def compare(record: dict, regenerated: np.ndarray | None, *, mode: str = "auto",
            own: OwnThresholds = NO_CALIBRATION, signature: SignatureCheck | None = None,
            extra_problems: tuple[str, ...] = ()) -> Verdict:
    """Judges a validated record against regenerated values (float32 [n, H, W, C], the final ODE state; None
    when the verifier did not regenerate) under `mode`, with the thresholds the verifier calibrated itself
    (`own`; DDMError for tolerance or phash without them). extra_problems: what else the verifier found
    (`expert_problems`), each enough to make the record not honest."""
    check_mode(mode, own)
    problems = record_problems(record, signature) + list(extra_problems)
    claimed = claimed_values(record)
    checks = None if regenerated is None else image_checks(claimed, regenerated, record_codec(record))
    resolved, reason = resolve_mode(mode, None if checks is None else all(c.identical for c in checks), own)
    thresholds = None if resolved == "exact" else own.thresholds
    honest, problems = decide(checks, problems, resolved, thresholds)
    if mode == "auto" and own.thresholds is None:
        # the claimant may be honest on another platform: say in the failure's own line what would settle it
        hint = (f"; only bit for bit passes, as {own.note}: a claim made on another platform needs "
                f"{CALIBRATE_COMMAND} first")
        problems = [p + hint if " images fail exact mode" in p else p for p in problems]
    signer = None if signature is None else signature.signer
    return Verdict(honest=honest, mode=resolved, mode_reason=reason, thresholds=own.thresholds,
                   checks=tuple(checks or ()), problems=tuple(problems), claim=describe_claim(record, signer),
                   signature="not checked" if signature is None else signature.message)


def check_record_fits_run(record: dict, run: Run) -> None:
    """DDMError unless the record names this run (manifest SHA-256) and its image shape."""
    run_dir = run.root
    actual = run.sha256
    if actual != record["manifest_sha256"]:
        raise DDMError(f"run {run_dir} has manifest SHA-256 {actual[:16]}, the record names "
                       f"{record['manifest_sha256'][:16]}: not the same run")
    image_shape = list(run.image_shape)
    if list(record["shape"][1:]) != image_shape:
        raise DDMError(f"record claims images of shape {record['shape'][1:]}, but run {run_dir} makes {image_shape}")
    if record_codec(record) != run.codec:
        raise DDMError(f"record's outputs are {record_codec(record).kind} with another normalisation than run "
                       f"{run_dir}'s {run.codec.kind}")


def run_thresholds(run: Run, verifier_env: dict | None = None, **flags) -> OwnThresholds:
    """The thresholds this verifier (environment `verifier_env`, default this process's) calibrated itself for
    `run` (`own_thresholds`), with any of phash / max_abs / rms given in `flags` (not None) replacing the
    calibrated value. Flags alone are not a calibration: DDMError for flags without one."""
    own = own_thresholds(run.eval_dir, run.sha256, environment() if verifier_env is None else verifier_env)
    given = {k: v for k, v in flags.items() if v is not None}
    if not given:
        return own
    names = ", ".join({"phash": "--threshold"}.get(name, "--" + name.replace("_", "-")) for name in given)
    if own.thresholds is None:
        raise DDMError(f"{names} replace{'s' if len(given) == 1 else ''} a threshold this verifier calibrated, and "
                       f"{own.note}: run {CALIBRATE_COMMAND} first")
    changes = dict(given)
    if "max_abs" in given:  # the tail's bound is never below the per-image one
        changes["outlier_max_abs"] = max(own.thresholds.outlier_max_abs, given["max_abs"])
    return OwnThresholds(dataclasses.replace(own.thresholds, **changes, source=f"{own.thresholds.source}, with {names}"),
                         f"{own.note}, with {names}")


class Verifier:
    """A run opened once for many records (a verifier serving a network, or the fuzz benchmark): the ensemble
    loads on first use, and the last `cache_size` distinct requests' regenerations are kept.

    mode: auto | exact | tolerance | phash. public_key: an Ed25519 public key every record must be signed by
    (None: unsigned records pass). own: the thresholds this verifier calibrated itself (None: `run_thresholds`
    of the run, in this process's environment); DDMError for tolerance or phash mode without them. limits: what
    a record may ask. ensemble: the run's loaded ensemble to regenerate with (None: loaded on first use). The
    thresholds are read once, here: a verifier calibrated later judges with them once it is made anew.
    """

    def __init__(self, run: Run, *, mode: str = "auto", public_key=None, own: OwnThresholds | None = None,
                 limits: VerifyLimits = DEFAULT_LIMITS, cache_size: int = 32, ensemble=None):
        self.environment = environment()
        self.own = run_thresholds(run, self.environment) if own is None else own
        check_mode(mode, self.own)
        self.run, self.mode, self.public_key, self.limits = run, mode, public_key, limits
        self._ensemble = ensemble  # the run's `load_ensemble`, when the caller has it loaded already
        self._earlier: dict[str, object] = {}  # earlier memberships' ensembles, by membership id
        # per (membership, request): (final state float32 [n, H, W, C], each image's expert int32 [n] or None)
        self._regenerated: collections.OrderedDict[bytes, tuple] = collections.OrderedDict()
        self._cache_size = cache_size

    @property
    def ensemble(self):
        """The run's ensemble (`load_ensemble`), loaded on first use."""
        if self._ensemble is None:
            self._ensemble = load_ensemble(self.run)
        return self._ensemble

    def ensemble_of(self, membership: str | None):
        """The ensemble of membership `membership` of the run (None or the current id: `ensemble`; an earlier one
        is rebuilt from the membership history, `load_ensemble(membership=...)`), loaded on first use."""
        if membership is None or membership == self.run.sha256:
            return self.ensemble
        if membership not in self._earlier:
            self._earlier[membership] = load_ensemble(self.run, membership=membership)
        return self._earlier[membership]

    def regenerate(self, request: Request, membership: str | None = None, conditions=None) -> np.ndarray:
        """The run's output for `request`: float32 [n, H, W, C] final ODE state (cached per request), with the
        current membership or the earlier one `membership` names; conditions: the request's condition
        embeddings (`ddm.sampling.request.generate` checks them against its digest)."""
        return self._regeneration(request, membership, conditions)[0]

    def regenerated_experts(self, request: Request, membership: str | None = None,
                            conditions=None) -> np.ndarray | None:
        """Each image's expert in the regeneration of `request` (`SampleResult.experts`), or None."""
        return self._regeneration(request, membership, conditions)[1]

    def _regeneration(self, request: Request, membership: str | None = None,
                      conditions=None) -> tuple[np.ndarray, np.ndarray | None]:
        membership = None if membership == self.run.sha256 else membership
        # the request names its conditions by digest, and `generate` refuses others: the key pins them too
        key = (membership or "").encode("ascii") + canonical_bytes(request.to_json())
        if key not in self._regenerated:
            result = generate(self.ensemble_of(membership), request, conditions=conditions)
            self._regenerated[key] = (result.x, result.experts)
            while len(self._regenerated) > self._cache_size:
                self._regenerated.popitem(last=False)
        self._regenerated.move_to_end(key)
        return self._regenerated[key]

    def verify(self, record_path: str | Path, *, mode: str | None = None, conditions=None) -> Verdict:
        """Reads, checks and (when signature and consistency pass) regenerates one record, in `mode` (default:
        the verifier's). DDMError if the record is malformed or beyond the limits, or the run does not match it
        (manifest SHA-256, image shape, a checkpoint that fails its SHA-256 pin). A record naming an earlier
        membership of the run (in its history) is regenerated with that membership's experts and router, while
        their weights exist (else a one-line DDMError naming the one that is gone). conditions: the condition
        embeddings float [n, *condition_shape] a record of a run conditioned on embeddings was made for
        (`ddm.sampling.request.check_conditions`)."""
        mode = self.mode if mode is None else mode
        check_mode(mode, self.own)
        record, request = read_record(record_path, self.limits)
        signature = check_signature(record, self.public_key)
        membership = record["manifest_sha256"]
        # a record of an earlier membership of the run is judged against that membership (its history entry)
        earlier = membership != self.run.sha256 and find_membership(self.run.manifest, membership) is not None
        run = self.run.at(membership) if earlier else self.run
        check_record_fits_run(record, run)
        conditions = check_conditions(request, conditions, run.condition_shape, claim="record",
                                      source="the conditions of --conditions",
                                      give="the file it was sampled with, --conditions FILE")
        # a bad signature or a contradictory record is judged without regenerating anything
        regenerated = (None if record_problems(record, signature)
                       else self.regenerate(request, membership, conditions))
        extra = () if regenerated is None else tuple(
            expert_problems(record, self.regenerated_experts(request, membership, conditions), request.strategy))
        return compare(record, regenerated, mode=mode, own=self.own, signature=signature, extra_problems=extra)


def verify_record(run_dir: str, record_path: str | Path, *, mode: str = "auto", public_key=None,
                  flags: dict | None = None, limits: VerifyLimits = DEFAULT_LIMITS, overrides=(),
                  conditions=None) -> Verdict:
    """`ddm verify`: one record against `run_dir` (see `Verifier`), with the thresholds this verifier
    calibrated itself, `flags` (phash / max_abs / rms, None: unchanged) replacing calibrated values.
    conditions: the condition embeddings the record names (`ddm verify --conditions FILE`), or None."""
    if mode not in MODES:
        raise DDMError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    record_path = Path(record_path)
    read_record(record_path, limits)  # the cheap checks before the run is opened
    run = Run.open(run_dir, overrides)
    own = run_thresholds(run, **(flags or {}))
    return Verifier(run, mode=mode, public_key=public_key, own=own, limits=limits).verify(record_path,
                                                                                         conditions=conditions)


def _fmt(x: float) -> str:
    return "inf" if not np.isfinite(x) else f"{x:.1e}"


def format_verdict(verdict: Verdict) -> str:
    t = verdict.thresholds
    if verdict.mode == "exact":
        rule = "bit for bit"
    elif verdict.mode == "tolerance":
        tail = (f" (or max|dx| <= {t.outlier_max_abs:g} for 5% of 5+ images)"
                if t.outlier_max_abs > t.max_abs else "")
        rule = (f"max|dx| <= {t.max_abs:g} and rms <= {t.rms:g} per image{tail}, medians <= {t.median_max_abs:g} "
                f"and {t.median_rms:g}; thresholds from {t.source}")
    else:
        rule = f"pHash distance <= {t.phash}; thresholds from {t.source}"
    lines = [f"claim: {verdict.claim}", f"signature: {verdict.signature}",
             f"mode: {verdict.mode} ({verdict.mode_reason}); passes when {rule}"]
    if verdict.checks:
        lines.append(f"{'image':>5}  {'bitwise':>7}  {'pHash':>5}  {'max|dx|':>8}  {'rms dx':>8}  verdict "
                     f"(dHash distance, not judged)")
        for i, c in enumerate(verdict.checks):
            ok = "ok" if c.passes(verdict.mode, t) else "MISMATCH"  # exact never reads the thresholds
            if ok != "ok" and verdict.mode == "tolerance" and c.max_abs <= t.outlier_max_abs:
                ok = "tail"  # allowed as one of the claim's few outliers unless there are too many
            lines.append(f"{i:>5}  {'yes' if c.identical else 'no':>7}  {c.phash:>5}  {_fmt(c.max_abs):>8}  "
                         f"{_fmt(c.rms):>8}  {ok} ({c.dhash})")
    for p in verdict.problems:
        lines.append(f"problem: {p}")
    if verdict.honest:
        checks = verdict.checks
        detail = {"exact": "bitwise identical",
                  "tolerance": f"max|dx| {_fmt(max(c.max_abs for c in checks))}, max rms "
                               f"{_fmt(max(c.rms for c in checks))}",
                  "phash": f"max pHash distance {max(c.phash for c in checks)}"}[verdict.mode]
        lines.append(f"overall: HONEST ({verdict.mode} mode: {detail})")
    else:
        lines.append(f"overall: NOT HONEST ({verdict.problems[0]})")
    return "\n".join(lines)
