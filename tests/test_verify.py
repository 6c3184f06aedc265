"""Verification records and `ddm verify` / `ddm hash` through the CLI: honest, dishonest, bad input (exit 0/1/2)."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ddm.app.cli import main
from ddm.core.errors import DDMError
from ddm.sampling.request import Request
from ddm.verify.phash import hash_hex, hex_to_hash, perceptual_hashes
from ddm.verify.records import make_record
from ddm.verify.verdict import DEFAULT_THRESHOLD, compare

MANIFEST_SHA = "ab" * 32


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
    record = make_record(MANIFEST_SHA, Request(seed=0, n=3, steps=2), images)
    exact = compare(record, images, threshold=0)
    assert exact.honest and exact.exact and exact.distances == [0, 0, 0]
    near = json.loads(json.dumps(record))
    near["images"][2]["phash"] = hash_hex(hex_to_hash(near["images"][2]["phash"]) ^ 0b101)  # 2 bits off
    near["sha256"] = "0" * 64
    verdict = compare(near, images, threshold=2)
    assert verdict.honest and not verdict.exact and verdict.distances == [0, 0, 2]
    assert not compare(near, images, threshold=1).honest
    with pytest.raises(DDMError, match="shape"):
        compare(record, images[:, :4], threshold=4)


# --- `ddm sample --record` + `ddm verify` -------------------------------------------------------------------


def test_verify_honest_record_exits_0(trained_run, honest_record, capsys):
    capsys.readouterr()
    assert main(["verify", str(honest_record), "--run-dir", str(trained_run)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].split() == ["image", "phash", "dist", "dhash", "dist", "verdict"]
    assert [" ".join(line.split()[3:]) for line in out[1:5]] == [f"ok (<= {DEFAULT_THRESHOLD})"] * 4
    assert out[-1].startswith("overall: HONEST (bitwise identical, max pHash distance 0, threshold ")


def test_verify_dishonest_claim_exits_1(trained_run, honest_record, tmp_path, capsys):
    record = json.loads(honest_record.read_text())
    record["images"][1]["phash"] = hash_hex(hex_to_hash(record["images"][1]["phash"]) ^ (2**64 - 1))  # 64 bits
    record["images"][3]["phash"] = hash_hex(hex_to_hash(record["images"][3]["phash"]) ^ 1)  # 1 bit
    record["sha256"] = "f" * 64
    forged = _write(tmp_path / "forged.json", record)
    capsys.readouterr()
    assert main(["verify", str(forged), "--run-dir", str(trained_run), "--threshold", "3"]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    verdicts = [line.split() for line in out[1:5]]
    assert [" ".join(v[3:]) for v in verdicts] == ["ok (<= 3)", "MISMATCH (> 3)", "ok (<= 3)", "ok (<= 3)"]
    assert [int(v[1]) for v in verdicts] == [0, 64, 0, 1]
    assert out[-1] == "overall: NOT HONEST (not bitwise identical, max pHash distance 64, threshold 3)"


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
    "not a record": ([1, 2], "is not a ddm-record/v1 record"),
    "no sha256": (lambda r: r.pop("sha256"), "no 'sha256' field"),
    "short phash": (_set_image(0, "phash", "abc"), "16 hex digits"),
    "long dhash": (_set_image(2, "dhash", "0" * 17), "16 hex digits"),
    "non-hex phash": (_set_image(1, "phash", "zz" * 8), "16 hex digits"),
    "short sha256": (_set("sha256", "ab" * 31), "sha256 must be 64"),
    "short manifest sha": (_set("manifest_sha256", "ab"), "manifest_sha256 must be 64"),
    "too few hashes": (lambda r: r["images"].pop(), "3 image hashes for n=4"),
    "shape not 4-d": (_set("shape", [4, 8, 8]), "is not [n, H, W, C]"),
    "shape n mismatch": (_set("shape", [5, 8, 8, 1]), "does not fit a request of n=4"),
    "wrong image shape": (_set("shape", [4, 16, 16, 3]), "claims images of shape [16, 16, 3], but run"),
    "unknown request field": (_set_request("temperature", 0.5), "unknown field 'temperature'"),
    "bad strategy": (_set_request("strategy", "best3"), "best3"),
    "negative seed": (_set_request("seed", -1), "seed=-1"),
    "bad cfg_scale": (_set_request("cfg_scale", "high"), "cfg_scale"),
    "other run": (_set("manifest_sha256", "cd" * 32), "not the same run"),
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
