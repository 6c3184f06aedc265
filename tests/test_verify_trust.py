"""The verifier, not the claimant, chooses how strictly to compare: a record's environment never switches the
mode, tolerance needs thresholds the verifier calibrated itself, and those thresholds accept an honest
regeneration under other XLA flags while rejecting a claim of more solver steps than were run."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from ddm.app.cli import main
from ddm.sampling.request import Request
from ddm.verify.environment import environment
from ddm.verify.records import make_record

FAST_MATH = "--xla_cpu_enable_fast_math=true"
# 6 images (the claim medians apply from 5), 16 Heun steps: the "15 steps claimed as 16" on a small run
CLAIM = Request(seed=3, n=6, strategy="top1", steps=16, solver="heun")
FEWER = dataclasses.replace(CLAIM, steps=15)


@pytest.fixture(scope="module")
def verifier(trained_run):
    from ddm.data.run import Run
    from ddm.verify.verdict import Verifier

    return Verifier(Run.open(trained_run))


def _record(verifier, made: Request, claimed: Request, env: dict) -> dict:
    """A consistent record of `made`'s output (regenerated here) that claims to be `claimed`'s, stating `env`."""
    record = make_record(verifier.run.sha256, made, verifier.regenerate(made), env)
    record["request"] = claimed.to_json()
    return record


def _write(path: Path, record: dict) -> Path:
    path.write_text(json.dumps(record))
    return path


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ddm: error: "), err
    return err[0]


def test_a_forged_environment_does_not_switch_the_mode(verifier, tmp_path):
    """Whatever environment a record states (the verifier's own, fast-math XLA, a GPU, none), an uncalibrated
    verifier compares bit for bit: the honest record passes, 15 steps claimed as 16 does not."""
    own = environment()
    envs = {"the verifier's": own, "fast-math": dict(own, xla_flags=FAST_MATH),
            "a GPU": dict(own, backend="gpu", device="NVIDIA H100"), "none": {}}
    for name, env in envs.items():
        honest = verifier.verify(_write(tmp_path / "honest.json", _record(verifier, CLAIM, CLAIM, env)))
        assert honest.honest and honest.mode == "exact", (name, honest)
        cheat = verifier.verify(_write(tmp_path / "cheat.json", _record(verifier, FEWER, CLAIM, env)))
        assert not cheat.honest and cheat.mode == "exact", (name, cheat)
        assert cheat.problems[0].startswith("6 of 6 images fail exact mode")
        assert "a claim made on another platform needs ddm verify --calibrate --run-dir RUN first" in cheat.problems[0]


def test_tolerance_without_a_calibration_is_refused_with_a_reason(verifier, trained_run, tmp_path, capsys):
    path = _write(tmp_path / "claim.json", _record(verifier, CLAIM, CLAIM, environment()))
    capsys.readouterr()
    for mode in ("tolerance", "phash"):
        assert main(["verify", str(path), "--run-dir", str(trained_run), "--mode", mode]) == 2
        line = _one_error_line(capsys)
        assert f"{mode} mode needs thresholds this verifier calibrated itself" in line
        assert "has not calibrated the run (no " in line and "run ddm verify --calibrate --run-dir RUN first" in line
    assert main(["verify", "--run-dir", str(trained_run)]) == 2
    assert "needs a record" in _one_error_line(capsys)
    assert main(["verify", str(path), "--run-dir", str(trained_run), "--calibrate"]) == 2
    assert "judges no record" in _one_error_line(capsys)


def test_calibrated_thresholds_accept_other_xla_flags_and_reject_fewer_steps(verifier, trained_run_copy, tmp_path):
    """One process with fast-math XLA regenerates 3 calibration requests and a held-out claim (another seed);
    thresholds = the default margin (4) x the drift of the calibration requests. The held-out honest claim passes
    in tolerance mode, 15 steps claimed as 16 (with the fast-math environment forged) does not."""
    from ddm.data.run import Run
    from ddm.verify.calibrate import CalibrationSettings, drift, pick_thresholds, regenerate_elsewhere
    from ddm.verify.thresholds import write_thresholds
    from ddm.verify.verdict import Verifier

    run = Run.open(trained_run_copy)
    calibration = [Request(seed=s, n=5, strategy=st, steps=16, solver=so)
                   for s, (st, so) in enumerate([("top1", "heun"), ("top1", "heun"), ("prior", "euler")])]
    values, env = regenerate_elsewhere(run.root, [*calibration, CLAIM], FAST_MATH, tmp_path)
    assert env["xla_flags"] != environment()["xla_flags"]
    rows = drift(calibration, [verifier.regenerate(r) for r in calibration], values[:-1], verifier.ensemble.codec)
    thresholds, largest = pick_thresholds(rows, CalibrationSettings().margin)
    assert 0 < largest["max_abs"] < 1e-3, largest  # fast math changed bits, by rounding only
    write_thresholds(run.eval_dir, run.sha256, thresholds, {"rows": rows})

    calibrated = Verifier(run, ensemble=verifier.ensemble)
    assert calibrated.own.thresholds.max_abs == thresholds.max_abs
    honest = calibrated.verify(_write(tmp_path / "honest.json", make_record(run.sha256, CLAIM, values[-1], env)))
    assert honest.honest and honest.mode == "tolerance" and not honest.exact, honest
    cheat = calibrated.verify(_write(tmp_path / "cheat.json", _record(verifier, FEWER, CLAIM, env)))
    assert not cheat.honest and cheat.mode == "tolerance", cheat
    # every image beyond the per-image bound, and the claim's medians beyond theirs: not a near miss
    assert cheat.problems[0].startswith("6 of 6 images fail tolerance mode"), cheat.problems
    assert any(p.startswith("the median max|dx| over the images") for p in cheat.problems), cheat.problems
    assert np.median([c.max_abs for c in honest.checks]) <= thresholds.median_max_abs


def test_calibrate_writes_thresholds_this_verifier_then_holds(trained_run_copy, capsys):
    """`ddm.verify.calibrate.calibrate` (merged batches only here: no second process) writes the run's thresholds
    with this verifier's environment, and a verifier in this environment holds them as its own."""
    from ddm.data.run import Run
    from ddm.verify.calibrate import CalibrationSettings, calibrate, format_calibration
    from ddm.verify.verdict import run_thresholds

    settings = CalibrationSettings(images=5, seeds=1, steps=(2,), strategies=("prior",), solvers=("euler",),
                                   other_xla_flags="", margin=3.0)
    report = calibrate(trained_run_copy, settings)
    text = format_calibration(report)
    assert "merged batch" in text and "thresholds (3 x the largest honest drift)" in text
    own = run_thresholds(Run.open(trained_run_copy))
    assert own.thresholds is not None and own.thresholds.source.endswith("verify_thresholds.json")
    assert own.thresholds.max_abs == report["thresholds"]["max_abs"] >= 3 * report["largest"]["max_abs"]
    body = json.loads((trained_run_copy / "eval" / "verify_thresholds.json").read_text())
    assert body["environment"] == environment() and body["calibration"]["settings"]["margin"] == 3
    capsys.readouterr()
    assert main(["verify", "--calibrate", "--run-dir", str(trained_run_copy), "--margin", "0.5"]) == 2
    assert "--margin" in _one_error_line(capsys)


def _checks(max_abs: list[float]):
    from ddm.verify.verdict import ImageCheck

    return [ImageCheck(identical=False, phash=0, dhash=0, max_abs=m, rms=m / 4) for m in max_abs]


@pytest.mark.parametrize("n, outliers, size, passes", [
    (16, 1, 2.4e-3, True),    # the honest fast-math outlier of docs/verification.md: one image of 16
    (16, 1, 5e-3, False),     # beyond half an 8-bit level: an edit of a displayed pixel, not rounding
    (16, 2, 2.4e-3, False),   # 5% of 16 is one image
    (40, 2, 2.4e-3, True),    # 5% of 40 is two
    (4, 1, 2.4e-3, False),    # below 5 images there are no medians to hold the bulk: no tail allowed
])
def test_tolerance_allows_a_few_tail_images_within_half_a_level(n, outliers, size, passes):
    from ddm.verify.thresholds import HALF_LEVEL, Thresholds
    from ddm.verify.verdict import claim_failures

    t = Thresholds(phash=0, max_abs=2e-4, rms=3e-5, median_max_abs=1.5e-5, median_rms=3e-6,
                   outlier_max_abs=HALF_LEVEL)
    checks = _checks([size] * outliers + [1e-6] * (n - outliers))
    assert (claim_failures(checks, "tolerance", t) == []) is passes
    # thresholds without a tail bound (older files, latent runs) allow none
    assert claim_failures(checks, "tolerance", dataclasses.replace(t, outlier_max_abs=None)) != []


def test_calibration_sets_the_tail_bound_for_images_only_and_overrides_keep_it_above_max_abs(tmp_path):
    import types

    from ddm.core.errors import DDMError
    from ddm.verify.calibrate import pick_thresholds
    from ddm.verify.thresholds import HALF_LEVEL, Thresholds, write_thresholds
    from ddm.verify.verdict import run_thresholds

    rows = [{"max_abs": [1e-6, 5e-5], "rms": [1e-7, 5e-6], "phash": [0, 0]}]  # no claim of 5+: no medians
    images, _ = pick_thresholds(rows, 4.0)
    latents, _ = pick_thresholds(rows, 4.0, latents=True)
    assert images.outlier_max_abs == HALF_LEVEL and latents.outlier_max_abs == latents.max_abs == 2e-4
    bitwise, _ = pick_thresholds([{"max_abs": [0.0] * 5, "rms": [0.0] * 5, "phash": [0] * 5}], 4.0)
    assert bitwise.max_abs == bitwise.outlier_max_abs == 0  # no drift seen: as strict as exact mode
    with pytest.raises(DDMError, match="outlier_max_abs"):
        Thresholds(phash=0, max_abs=1e-3, rms=1e-3, median_max_abs=1e-3, median_rms=1e-3, outlier_max_abs=1e-4)
    run = types.SimpleNamespace(eval_dir=tmp_path, sha256="ab" * 32)
    write_thresholds(run.eval_dir, run.sha256, images, {})
    assert run_thresholds(run).thresholds.outlier_max_abs == HALF_LEVEL  # read back from the file
    wide = run_thresholds(run, max_abs=0.01).thresholds
    assert wide.max_abs == wide.outlier_max_abs == 0.01
