"""Verification records and `ddm verify` / `ddm hash` through the CLI: honest, dishonest, bad input (exit 0/1/2);
consistent verdicts, the modes, signatures, limits and a seeded fuzz."""

import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ddm.app.cli import main
from ddm.core.errors import DDMError
from ddm.core.images import to_model_range
from ddm.sampling.request import Request
from ddm.verify.phash import hash_hex, hex_to_hash, perceptual_hashes
from ddm.verify.records import claimed_values, encode_values, make_record
from ddm.verify.thresholds import OwnThresholds, Thresholds
from ddm.verify.verdict import compare

MANIFEST_SHA = "ab" * 32
ENV = {"jax": "test"}


def _own(phash=2, max_abs=1e-3, rms=1e-3, median_max_abs=1e-3, median_rms=1e-3) -> OwnThresholds:
    """Thresholds a verifier holds as its own (values of the test's choosing, as if calibrated)."""
    return OwnThresholds(Thresholds(phash=phash, max_abs=max_abs, rms=rms, median_max_abs=median_max_abs,
                                    median_rms=median_rms, source="the test"), "the test's thresholds")


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ddm: error: "), err
    return err[0]


@pytest.fixture(scope="module")
def honest_record(trained_run, tmp_path_factory) -> Path:
    """A record written by `ddm sample --record` (4 images, top1, 2 euler steps)."""
    rec = tmp_path_factory.mktemp("records") / "rec.json"
    code = main(["sample", "--run-dir", str(trained_run), "--n", "4", "--strategy", "top1", "--steps", "2",
                 "--solver", "euler", "--seed", "7", "--out", str(rec.with_suffix(".png")), "--record", str(rec)])
    assert code == 0
    return rec


@pytest.fixture(scope="module")
def verifier(trained_run):
    """One `Verifier` for the tests that need no CLI: the ensemble loads once, each request regenerates once."""
    from ddm.data.run import Run
    from ddm.verify.verdict import Verifier

    return Verifier(Run.open(trained_run))


@pytest.fixture(scope="module")
def calibrated(verifier):
    """A verifier of the same run (and ensemble) that holds thresholds of its own (`_own`)."""
    from ddm.verify.verdict import Verifier

    return Verifier(verifier.run, own=_own(), ensemble=verifier.ensemble)


def _write(path: Path, record) -> Path:
    path.write_text(json.dumps(record) if not isinstance(record, str) else record)
    return path


# --- `ddm hash` ---------------------------------------------------------------------------------------------


def test_hash_cli_png_and_npz_agree(tmp_path, capsys):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 8, 8, 1), dtype=np.uint8)
    Image.fromarray(images[1, :, :, 0]).save(tmp_path / "one.png")
    np.savez(tmp_path / "batch.npz", images=images)
    assert main(["hash", str(tmp_path / "one.png"), str(tmp_path / "batch.npz")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["file", "index", "sha256", "phash", "dhash"] and len(lines) == 1 + 1 + 3
    rows = [line.split() for line in lines[1:]]
    assert rows[0][1] == "-" and [r[1] for r in rows[1:]] == ["0", "1", "2"]
    assert rows[0][2:] == rows[2][2:]  # the PNG holds image 1 of the batch: same sha256, phash, dhash
    assert rows[1][2:] != rows[2][2:]
    expected = perceptual_hashes(images)
    assert [r[3] for r in rows[1:]] == [h["phash"] for h in expected]


def test_hash_cli_bad_input_exits_2(tmp_path, capsys):
    assert main(["hash", str(tmp_path / "missing.png")]) == 2
    assert "no such file" in _one_error_line(capsys)
    np.savez(tmp_path / "floats.npz", images=np.zeros((2, 8, 8, 1), np.float32))
    assert main(["hash", str(tmp_path / "floats.npz")]) == 2
    assert "uint8" in _one_error_line(capsys)


# --- compare (no regeneration) ----------------------------------------------------------------------------


def test_compare_exact_within_threshold_and_beyond():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (3, 8, 8, 1), dtype=np.uint8)
    values = to_model_range(images)
    record = make_record(MANIFEST_SHA, Request(seed=0, n=3, steps=2), values, ENV)
    exact = compare(record, values, mode="exact")
    assert exact.honest and exact.exact and [c.phash for c in exact.checks] == [0, 0, 0]
    # another machine's regeneration: image 2 drifts by 1e-4 (tolerance passes, exact does not)
    drifted = values.copy()
    drifted[2] += np.float32(1e-4)
    assert not compare(record, drifted, mode="exact").honest
    verdict = compare(record, drifted, mode="tolerance", own=_own(max_abs=2e-4, rms=2e-4))
    assert verdict.honest and not verdict.exact and [c.identical for c in verdict.checks] == [True, True, False]
    assert not compare(record, drifted, mode="tolerance", own=_own(max_abs=5e-5, rms=2e-4)).honest
    # the old "cross-hardware" pass: 2 pHash bits and the batch digest altered. Now a contradiction in every mode
    near = json.loads(json.dumps(record))
    near["images"][2]["phash"] = hash_hex(hex_to_hash(near["images"][2]["phash"]) ^ 0b101)  # 2 bits off
    near["sha256"] = "0" * 64
    for mode in ("exact", "tolerance", "phash", "auto"):
        verdict = compare(near, values, mode=mode, own=_own(phash=2))
        assert not verdict.honest and verdict.problems[0].startswith("contradictory record: the batch sha256")
    with pytest.raises(DDMError, match="shape"):
        compare(record, values[:, :4], mode="phash", own=_own())


def test_compare_nan_regeneration_never_passes():
    values = np.zeros((2, 8, 8, 1), np.float32)
    record = make_record(MANIFEST_SHA, Request(seed=0, n=2, steps=2), values, ENV)
    broken = values.copy()
    broken[1, 0, 0, 0] = np.nan
    verdict = compare(record, broken, mode="tolerance", own=_own(max_abs=10.0, rms=10.0))
    assert not verdict.honest and np.isinf(verdict.checks[1].max_abs) and verdict.checks[0].max_abs == 0


def test_tolerance_holds_the_median_of_a_claim_to_typical_drift():
    """One image may drift as far as max_abs (an honest outlier); all of them that far is a lazy claim."""
    values = np.zeros((6, 8, 8, 1), np.float32)
    record = make_record(MANIFEST_SHA, Request(seed=0, n=6, steps=2), values, ENV)
    t = _own(max_abs=1e-2, rms=1e-2, median_max_abs=1e-3, median_rms=1e-2)
    one = values.copy()
    one[2, 0, 0, 0] = 5e-3
    assert compare(record, one, mode="tolerance", own=t).honest
    every = values.copy()
    every[:, 0, 0, 0] = 5e-3
    verdict = compare(record, every, mode="tolerance", own=t)
    assert not verdict.honest and verdict.problems == ("the median max|dx| over the images, 5.0e-03, exceeds 0.001",)
    few = make_record(MANIFEST_SHA, Request(seed=0, n=4, steps=2), values[:4], ENV)
    assert compare(few, every[:4], mode="tolerance", own=t).honest  # 4 images: no median test


def test_auto_mode_is_exact_unless_the_verifier_calibrated_itself():
    """Bit for bit passes; anything else needs the verifier's own thresholds. The record's environment, equal to
    the verifier's or not, changes nothing."""
    from ddm.verify.verdict import NO_CALIBRATION

    values = np.zeros((1, 8, 8, 1), np.float32)
    for env in (ENV, {"jax": "other", "xla_flags": "--xla_cpu_enable_fast_math=true"}, {}):
        record = make_record(MANIFEST_SHA, Request(seed=0, n=1, steps=2), values, env)
        same = compare(record, values, mode="auto")
        assert same.honest and same.mode == "exact" and "bitwise identical" in same.mode_reason
        drifted = compare(record, values + np.float32(1e-5), mode="auto", own=NO_CALIBRATION)
        assert not drifted.honest and drifted.mode == "exact"
        assert "needs ddm verify --calibrate --run-dir RUN first" in drifted.problems[0]
        calibrated = compare(record, values + np.float32(1e-5), mode="auto", own=_own(max_abs=2e-5, rms=2e-5))
        assert calibrated.honest and calibrated.mode == "tolerance"
    for mode in ("tolerance", "phash"):
        with pytest.raises(DDMError, match=f"{mode} mode needs thresholds this verifier calibrated itself"):
            compare(record, values, mode=mode)


# --- `ddm sample --record` + `ddm verify` -------------------------------------------------------------------


def test_verify_honest_record_exits_0(trained_run, honest_record, capsys):
    capsys.readouterr()
    assert main(["verify", str(honest_record), "--run-dir", str(trained_run)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("claim: an unsigned claimant claims 4 images [8, 8, 1] of run ")
    assert "seed=7 strategy=top1 steps=2 solver=euler" in out[0]
    assert out[2] == "mode: exact (auto: the regeneration is bitwise identical); passes when bit for bit"
    assert out[3].split()[:6] == ["image", "bitwise", "pHash", "max|dx|", "rms", "dx"]
    assert [line.split()[1:3] + line.split()[5:6] for line in out[4:8]] == [["yes", "0", "ok"]] * 4
    assert out[-1] == "overall: HONEST (exact mode: bitwise identical)"


def test_verify_dishonest_claim_exits_1(trained_run, honest_record, tmp_path, capsys):
    record = json.loads(honest_record.read_text())
    record["images"][1]["phash"] = hash_hex(hex_to_hash(record["images"][1]["phash"]) ^ (2**64 - 1))  # 64 bits
    record["images"][3]["phash"] = hash_hex(hex_to_hash(record["images"][3]["phash"]) ^ 1)  # 1 bit
    record["sha256"] = "f" * 64
    forged = _write(tmp_path / "forged.json", record)
    capsys.readouterr()
    assert main(["verify", str(forged), "--run-dir", str(trained_run)]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    problems = [line for line in out if line.startswith("problem: ")]
    assert problems == ["problem: contradictory record: the batch sha256 is not the digest of the record's own pixels",
                        "problem: contradictory record: image 1: phash not the digest of its own pixels",
                        "problem: contradictory record: image 3: phash not the digest of its own pixels"]
    assert out[-1] == ("overall: NOT HONEST (contradictory record: the batch sha256 is not the digest of the "
                       "record's own pixels)")


def _verify(trained_run, record, tmp_path, capsys, *extra) -> tuple[int, list[str]]:
    path = _write(tmp_path / "claim.json", record)
    capsys.readouterr()
    code = main(["verify", str(path), "--run-dir", str(trained_run), *extra])
    return code, capsys.readouterr().out.strip().splitlines()


def test_fewer_steps_fail_in_the_default_mode(verifier, honest_record, tmp_path):
    """The claimant ran 1 step and claims the record's 2: every image differs, even where pHash cannot see it."""
    from ddm.verify.verdict import format_verdict

    honest = json.loads(honest_record.read_text())
    cheap = Request.from_json({**honest["request"], "steps": 1})
    record = make_record(honest["manifest_sha256"], cheap, verifier.regenerate(cheap), honest["environment"])
    record["request"]["steps"] = 2  # the images are the 1-step output, consistent with their digests
    verdict = verifier.verify(_write(tmp_path / "fewer.json", record))
    lines = format_verdict(verdict).splitlines()
    assert not verdict.honest and lines[-1].startswith("overall: NOT HONEST (4 of 4 images fail exact mode")
    assert [line.split()[1] for line in lines[4:8]] == ["no"] * 4 and verdict.mode == "exact"


@pytest.mark.parametrize("case", ["swap pHashes", "swap rows", "flip 32 pHash bits", "dHash", "image sha256",
                                  "batch sha256 only", "one value ulp"])
def test_altered_digests_and_values_fail(case, trained_run, verifier, calibrated, honest_record, tmp_path, capsys):
    """Every digest must be the digest of the record's own values: no mode lets a contradiction through."""
    record = json.loads(honest_record.read_text())
    images = record["images"]
    if case == "swap pHashes":
        images[0]["phash"], images[1]["phash"] = images[1]["phash"], images[0]["phash"]
    elif case == "swap rows":
        images[0], images[2] = images[2], images[0]
    elif case == "flip 32 pHash bits":
        images[1]["phash"] = hash_hex(hex_to_hash(images[1]["phash"]) ^ 0xFFFFFFFF)
    elif case == "dHash":
        images[2]["dhash"] = hash_hex(hex_to_hash(images[2]["dhash"]) ^ 1)
    elif case == "image sha256":
        images[3]["sha256"] = "0" * 64
    elif case == "batch sha256 only":
        record["sha256"] = "1" * 64
    else:
        values = claimed_values(record)
        values.reshape(-1).view(np.uint32)[5] ^= 1
        record["values"] = encode_values(values)
    path = _write(tmp_path / "altered.json", record)
    if case == "one value ulp":  # consistent (the pixels are the same), but not the bits: exact mode alone sees it
        assert not verifier.verify(path).honest
        assert calibrated.verify(path).honest  # within the drift this verifier calibrated (1e-3), by design
        return
    code, lines = _verify(trained_run, record, tmp_path, capsys)
    assert code == 1 and lines[-1].startswith("overall: NOT HONEST (contradictory record"), lines
    for mode in ("auto", "tolerance", "phash"):
        verdict = calibrated.verify(path, mode=mode)
        assert not verdict.honest and verdict.problems[0].startswith("contradictory record"), (mode, verdict)


def _set(key, value):
    def change(record):
        record[key] = value
    return change


def _set_image(i, key, value):
    def change(record):
        record["images"][i][key] = value
    return change


def _set_request(key, value):
    def change(record):
        record["request"][key] = value
    return change


BAD_RECORDS = {
    "not json": ("{not json", "not valid JSON"),
    "not a record": ([1, 2], "is not a ddm-record/v2 record"),
    "no sha256": (lambda r: r.pop("sha256"), "no 'sha256' field"),
    "short phash": (_set_image(0, "phash", "abc"), "16 hex digits"),
    "long dhash": (_set_image(2, "dhash", "0" * 17), "16 hex digits"),
    "non-hex phash": (_set_image(1, "phash", "zz" * 8), "16 hex digits"),
    "short sha256": (_set("sha256", "ab" * 31), "sha256 must be 64"),
    "short manifest sha": (_set("manifest_sha256", "ab"), "manifest_sha256 must be 64"),
    "too few hashes": (lambda r: r["images"].pop(), "3 image hashes for n=4"),
    "shape not 4-d": (_set("shape", [4, 8, 8]), "shape must be [n, H, W, C] of positive integers, got [4, 8, 8]"),
    "shape n mismatch": (_set("shape", [5, 8, 8, 1]), "does not fit a request of n=4"),
    "wrong image shape": (_set("shape", [4, 16, 16, 3]), "claims images of shape [16, 16, 3], but run"),
    "unknown request field": (_set_request("temperature", 0.5), "unknown field 'temperature'"),
    "bad strategy": (_set_request("strategy", "best3"), "best3"),
    "negative seed": (_set_request("seed", -1), "seed=-1"),
    "bad cfg_scale": (_set_request("cfg_scale", "high"), "cfg_scale"),
    "other run": (_set("manifest_sha256", "cd" * 32), "not the same run"),
    "old format": (_set("format", "ddm-record/v1"), "is not a ddm-record/v2 record"),
    "missing request field": (lambda r: r["request"].pop("cfg_scale"), "request has no 'cfg_scale' field"),
    "short values": (lambda r: r.update(values=r["values"][:-4]), "values must be base64 of 256 float32"),
    "values not base64": (lambda r: r.update(values="*" + r["values"][1:]), "values are not valid base64"),
    "NaN value": (lambda r: r.update(values=encode_values(np.full((4, 8, 8, 1), np.nan, np.float32))),
                  "values contain NaN or Inf"),
    "duplicate key": ('{"format": "ddm-record/v2", "format": "ddm-record/v2"}', "duplicate key 'format'"),
    "NaN literal": ('{"format": NaN}', "NaN is not a JSON number"),
    "deep nesting": ("[" * 100_000 + "]" * 100_000, "not valid JSON"),
    "too many images": (_set_request("n", 10_000), "n=10000 images exceeds the limit of 256"),
    "too many steps": (_set_request("steps", 10**9), "steps=1000000000 exceeds the limit of 1000"),
    "too much work": (lambda r: r["request"].update(n=200, steps=200), "n * steps = 40000 exceeds the limit of 16384"),
    "seed beyond 32 bits": (_set_request("seed", 2**32), "seed 4294967296 is outside 0..4294967295"),
    "huge label": (_set_request("labels", [2**40] * 4), "a class label exceeds"),
    "huge integer": ('{"n": ' + "9" * 5000 + "}", "not valid JSON"),
    "unknown field": (_set("comment", "hi"), "unknown field 'comment'"),
    "environment not strings": (_set("environment", {"jax": 1}), "environment must be an object"),
}


@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
def test_verify_bad_record_exits_2_with_one_line(case, trained_run, honest_record, tmp_path, capsys):
    change, message = BAD_RECORDS[case]
    if isinstance(change, str):
        bad = _write(tmp_path / "bad.json", change)
    elif callable(change):
        record = json.loads(honest_record.read_text())
        change(record)
        bad = _write(tmp_path / "bad.json", record)
    else:
        bad = _write(tmp_path / "bad.json", change)
    capsys.readouterr()
    assert main(["verify", str(bad), "--run-dir", str(trained_run)]) == 2
    assert message in _one_error_line(capsys)


def test_verify_bad_arguments_exit_2(trained_run, honest_record, tmp_path, capsys):
    assert main(["verify", str(tmp_path / "missing.json"), "--run-dir", str(trained_run)]) == 2
    assert "record not found" in _one_error_line(capsys)
    assert main(["verify", str(honest_record), "--run-dir", str(tmp_path / "no_run")]) == 2
    assert "no manifest" in _one_error_line(capsys)
    assert main(["verify", str(honest_record), "--run-dir", str(trained_run), "--threshold", "-1"]) == 2
    assert "threshold" in _one_error_line(capsys)
    assert main(["verify", str(honest_record), "--run-dir", str(trained_run), "--max-n", "0"]) == 2
    assert "max_n=0" in _one_error_line(capsys)
    assert main(["verify", str(honest_record), "--run-dir", str(trained_run), "--max-n", "3"]) == 2
    assert "n=4 images exceeds the limit of 3 (--max-n)" in _one_error_line(capsys)
    assert main(["verify", str(honest_record), "--run-dir", str(trained_run), "--public-key",
                 str(honest_record)]) == 2
    assert "is not a PEM public key" in _one_error_line(capsys)


def test_flipped_checkpoint_byte_is_refused_before_sampling(trained_run_copy, honest_record, capsys):
    from ddm.sampling.load import load_ensemble

    final = trained_run_copy / "experts" / "1" / "final"
    data = max((p for p in final.rglob("*") if p.is_file() and p.parent.name == "d"), key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data.write_bytes(bytes(raw))
    with pytest.raises(DDMError, match="expert 1 checkpoint"):
        load_ensemble(trained_run_copy)
    capsys.readouterr()
    assert main(["verify", str(honest_record), "--run-dir", str(trained_run_copy)]) == 2
    line = _one_error_line(capsys)
    assert "expert 1" in line and ("SHA-256" in line or "corrupted" in line)


# --- signatures ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, Path]:
    """Two key pairs written by `ddm keygen`: "alice" (the claimant) and "mallory"."""
    folder = tmp_path_factory.mktemp("keys")
    for name in ("alice", "mallory"):
        assert main(["keygen", "--out", str(folder / name)]) == 0
    return {name: folder / name for name in ("alice", "mallory")}


@pytest.fixture(scope="module")
def signed_record(trained_run, keys, tmp_path_factory) -> Path:
    rec = tmp_path_factory.mktemp("signed") / "rec.json"
    assert main(["sample", "--run-dir", str(trained_run), "--n", "4", "--strategy", "top1", "--steps", "2",
                 "--solver", "euler", "--seed", "7", "--out", str(rec.with_suffix(".png")), "--record", str(rec),
                 "--key", str(keys["alice"])]) == 0
    return rec


def test_keygen_writes_a_pair_and_never_overwrites(keys, capsys):
    private, public = keys["alice"], keys["alice"].with_name("alice.pub")
    assert private.read_text().startswith("-----BEGIN PRIVATE KEY-----") and (private.stat().st_mode & 0o777) == 0o600
    assert public.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    before = private.read_bytes()
    capsys.readouterr()
    assert main(["keygen", "--out", str(private)]) == 2
    assert "already exists" in _one_error_line(capsys) and private.read_bytes() == before


def test_signed_record_verifies_and_names_its_signer(trained_run, verifier, signed_record, honest_record, keys,
                                                    capsys):
    from ddm.verify.signing import key_id, load_public_key

    alice = key_id(load_public_key(keys["alice"].with_name("alice.pub")))
    record = json.loads(signed_record.read_text())
    assert record["signature"]["algorithm"] == "ed25519"
    unsigned = {k: v for k, v in record.items() if k != "signature"}
    assert unsigned == json.loads(honest_record.read_text())  # the same claim as the unsigned one, plus a signature
    capsys.readouterr()
    assert main(["verify", str(signed_record), "--run-dir", str(trained_run), "--public-key",
                 str(keys["alice"].with_name("alice.pub"))]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"claim: {alice} claims 4 images")
    assert out[1] == f"signature: valid, signed by {alice} (the required key)"
    verdict = verifier.verify(signed_record)  # no key required: the signature is still checked
    assert verdict.honest and "key not pinned" in verdict.signature


@pytest.mark.parametrize("case", ["altered seed", "altered environment", "unsigned", "wrong key", "forged by mallory",
                                  "mangled signature"])
def test_signature_failures_exit_1(case, trained_run, signed_record, keys, tmp_path, capsys):
    from ddm.verify.signing import load_private_key, sign_record

    record = json.loads(signed_record.read_text())
    key = keys["alice"].with_name("alice.pub")
    if case == "altered seed":
        record["request"]["seed"] = 8
        expected = "does not match the record (altered after signing"
    elif case == "altered environment":
        record["environment"]["jax"] = "0.0.1"  # metadata too is covered
        expected = "does not match the record (altered after signing"
    elif case == "unsigned":
        del record["signature"]
        expected = "unsigned, but a signature by ed25519:"
    elif case == "wrong key":
        key = keys["mallory"].with_name("mallory.pub")
        expected = "not by the required key"
    elif case == "forged by mallory":  # mallory re-signs alice's claim with her own key
        record = sign_record(record, load_private_key(keys["mallory"]))
        expected = "not by the required key"
    else:
        record["signature"]["value"] = "A" * 10
        expected = "malformed signature field"
    code, lines = _verify(trained_run, record, tmp_path, capsys, "--public-key", str(key))
    assert code == 1 and "overall: NOT HONEST (signature: " in lines[-1] and expected in lines[-1], lines
    assert not any(line.split()[:1] == ["image"] for line in lines)  # judged before any regeneration


def test_sample_key_errors_exit_2(trained_run, keys, tmp_path, capsys):
    assert main(["sample", "--run-dir", str(trained_run), "--n", "1", "--steps", "1", "--out",
                 str(tmp_path / "a.png"), "--key", str(keys["alice"])]) == 2
    assert "pass --record too" in _one_error_line(capsys)
    assert main(["sample", "--run-dir", str(trained_run), "--n", "1", "--steps", "1", "--out",
                 str(tmp_path / "a.png"), "--record", str(tmp_path / "r.json"),
                 "--key", str(keys["alice"].with_name("alice.pub"))]) == 2
    assert "not an unencrypted PEM private key" in _one_error_line(capsys)
    assert not (tmp_path / "r.json").exists() and not (tmp_path / "a.png").exists()


# --- thresholds file --------------------------------------------------------------------------------------------


def test_verify_reads_its_own_calibrated_thresholds(trained_run_copy, verifier, honest_record, tmp_path, capsys):
    """Tolerance needs a calibration file of this run written in this verifier's environment; --max-abs / --rms
    replace its values; another run's file is refused (exit 2), another environment's is not this verifier's."""
    from ddm.data.run import Run
    from ddm.verify.environment import environment
    from ddm.verify.thresholds import own_thresholds, write_thresholds
    from ddm.verify.verdict import run_thresholds

    run = Run.open(trained_run_copy)
    assert run_thresholds(run).thresholds is None  # not calibrated: no thresholds at all
    record = json.loads(honest_record.read_text())
    values = claimed_values(record)
    values[0, 0, 0, 0] += np.float32(3e-4)  # a claimant on other hardware: drift in one value, same pixels
    forged_env = dict(record["environment"], device="another GPU")
    drifted = make_record(record["manifest_sha256"], Request.from_json(record["request"]), values, forged_env)
    path = _write(tmp_path / "drift.json", drifted)
    capsys.readouterr()
    assert main(["verify", str(path), "--run-dir", str(trained_run_copy)]) == 1  # exact: the bits differ
    assert "needs ddm verify --calibrate --run-dir RUN first" in capsys.readouterr().out.splitlines()[-1]
    assert main(["verify", str(path), "--run-dir", str(trained_run_copy), "--max-abs", "1"]) == 2
    assert "--max-abs replaces a threshold this verifier calibrated" in _one_error_line(capsys)

    loose = Thresholds(phash=2, max_abs=1e-3, rms=1e-3, median_max_abs=1e-3, median_rms=1e-3)
    write_thresholds(run.eval_dir, run.sha256, loose, {"note": "test"})
    assert own_thresholds(run.eval_dir, run.sha256, environment()).thresholds.max_abs == 1e-3
    assert main(["verify", str(path), "--run-dir", str(trained_run_copy)]) == 0  # within this verifier's 1e-3
    out = capsys.readouterr().out
    assert "mode: tolerance (auto: not bitwise identical, and this verifier has calibrated the run)" in out
    assert "verify_thresholds.json" in out
    assert main(["verify", str(path), "--run-dir", str(trained_run_copy), "--max-abs", "1e-4"]) == 1  # tighter
    assert "with --max-abs" in capsys.readouterr().out

    write_thresholds(run.eval_dir, run.sha256, loose, {}, verifier_env=dict(environment(), jax="0.0.1"))
    assert main(["verify", str(path), "--run-dir", str(trained_run_copy)]) == 1  # someone else's calibration
    assert "calibrated in another environment (differs in jax)" in capsys.readouterr().out.splitlines()[-1]
    write_thresholds(run.eval_dir, "cd" * 32, loose, {})
    assert main(["verify", str(path), "--run-dir", str(trained_run_copy)]) == 2
    assert "calibrated on another run" in _one_error_line(capsys)


# --- fuzz ------------------------------------------------------------------------------------------------------


def test_seeded_fuzz_no_altered_claim_passes_and_no_traceback(verifier, honest_record, tmp_path):
    """220 mutants of an honest record (20 per category): no altered claim exits 0, nothing tracebacks, each
    judged within 60 s (the first regeneration compiles; benchmarks/fuzz_records.py runs 1,000)."""
    from oracles.fuzz import CATEGORIES, run_fuzz

    record = json.loads(honest_record.read_text())
    t0 = time.perf_counter()
    result = run_fuzz(verifier, record, 20 * len(CATEGORIES), seed=0, work=tmp_path)
    table = result["by_category"]
    assert result["tracebacks"] == [] and result["altered_exit0"] == []
    assert all(row["records"] == 20 for row in table.values())
    assert table["environment"]["exit0"] == 20  # metadata only: the claim is still true
    for category in ("swapped_hashes", "values", "forged_values", "truncated_json", "altered_digest"):
        assert table[category]["altered"] == 20 and table[category]["exit0"] == 0
    assert table["request"]["exit1"] > 0 and table["forged_values"]["exit1"] == 20
    assert result["max_seconds"] < 60, result
    assert time.perf_counter() - t0 < 300


def test_the_issues_93_false_accepts_now_fail(verifier, honest_record, tmp_path):
    """Issue 18's 93 alterations that v1 judged HONEST (per-image hashes with the batch digest intact, request
    changes, batch digests, dHashes), rebuilt on a v2 record: none exits 0."""
    from oracles.fuzz import issue_cases, judge_mutants

    record = json.loads(honest_record.read_text())
    cases = issue_cases(record)
    assert len(cases) == 93
    result = judge_mutants(verifier, record, cases, tmp_path)
    assert result["tracebacks"] == [] and result["altered_exit0"] == []
    table = result["by_category"]
    assert {k: v["records"] for k, v in table.items()} == {"per_image_hashes": 28, "request": 18,
                                                           "batch_sha256": 26, "dhash": 21}
    assert sum(v["exit0"] for v in table.values()) == 0 and table["request"]["altered"] == 18
