"""Sampling a trained run through the public API and the CLI."""

import json

import numpy as np
import pytest

from ddm.app.cli import main
from ddm.sampling.load import load_ensemble
from ddm.sampling.request import Request, generate


def test_ensemble_load_and_sample_top1(trained_run):
    ensemble = load_ensemble(trained_run)
    assert ensemble.num_experts == 3
    result = ensemble.sample(6, "top1", steps=3, seed=1)
    assert result.images.shape == (6, 8, 8, 1) and result.images.dtype == np.uint8
    assert result.weights.shape == (3, 6, 3)
    np.testing.assert_allclose(result.weights.sum(-1), 1.0, atol=1e-5)
    # top-1: exactly one expert per sample per step, and it ran on only those samples
    assert ((result.weights > 0).sum(-1) == 1).all()
    assert result.expert_evals == 6 * 3  # euler: one evaluation per sample per step, one expert each


def test_same_request_is_bitwise_identical_and_seed_matters(trained_run):
    ensemble = load_ensemble(trained_run)
    request = Request(seed=3, n=4, strategy="full", steps=3, solver="euler")
    a, b = generate(ensemble, request).images, generate(ensemble, request).images
    assert np.array_equal(a, b)
    c = generate(ensemble, Request(seed=4, n=4, strategy="full", steps=3, solver="euler")).images
    assert not np.array_equal(a, c)


def test_sample_cli_writes_grid_npz_and_record(trained_run_copy, capsys):
    out = trained_run_copy / "grid.png"
    rec = trained_run_copy / "rec.json"
    code = main(["sample", "--run-dir", str(trained_run_copy), "--n", "5", "--strategy", "threshold:0.2",
                 "--steps", "3", "--seed", "2", "--out", str(out), "--record", str(rec)])
    assert code == 0
    assert out.is_file()
    arrays = np.load(out.with_suffix(".npz"))
    assert arrays["images"].shape == (5, 8, 8, 1)
    assert json.loads(str(arrays["request"]))["strategy"] == "threshold:0.2"
    record = json.loads(rec.read_text())
    assert len(record["images"]) == 5 and len(record["sha256"]) == 64
    assert "expert usage" in capsys.readouterr().out


def test_unknown_strategy_is_a_clear_error(trained_run, capsys):
    code = main(["sample", "--run-dir", str(trained_run), "--strategy", "best3", "--n", "2", "--steps", "2"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "best3" in err[0]


def test_tampered_expert_checkpoint_refuses_to_load(trained_run_copy):
    manifest_path = trained_run_copy / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["experts"]["1"]["sha256"] = "0" * 64  # as if the weights on disk had been swapped
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(Exception, match="does not match the manifest SHA-256"):
        load_ensemble(trained_run_copy)


def test_missing_expert_is_masked_with_warning(trained_run_copy):
    manifest_path = trained_run_copy / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["experts"]["2"]
    manifest_path.write_text(json.dumps(manifest))
    with pytest.warns(UserWarning, match=r"\[2\]"):
        ensemble = load_ensemble(trained_run_copy)
    result = ensemble.sample(4, "top1", steps=2, solver="euler")
    assert (result.weights[..., 2] == 0).all()
