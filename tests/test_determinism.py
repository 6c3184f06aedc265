"""Sampling is a pure function of (manifest hash, request): across calls, batch sizes, processes, device counts
and thread counts (docs/verification.md has the axes and what each one does to the bits)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ddm.core.errors import DDMError
from ddm.core.hashing import images_sha256
from ddm.sampling.request import Request, generate
from ddm.verify.phash import hamming, hex_to_hash, perceptual_hashes

REQUEST = Request(seed=11, n=6, strategy="sample", steps=2, solver="heun")  # random routing + corrector stage


@pytest.fixture(scope="module")
def ensemble(trained_run):
    from ddm.sampling.load import load_ensemble

    return load_ensemble(trained_run)


@pytest.fixture(scope="module")
def reference(ensemble):
    """REQUEST generated in this process (8 fake devices, multi-threaded XLA, the whole batch at once)."""
    return generate(ensemble, REQUEST)


def test_request_is_json_and_validated():
    request = Request(seed=3, n=2, strategy="threshold:0.2", steps=5, solver="heun", labels=(1, 0), cfg_scale=2.0)
    assert Request.from_json(json.loads(json.dumps(request.to_json()))) == request
    for bad in ({"seed": "1"}, {"n": 0}, {"steps": 1.5}, {"solver": "rk4"}, {"labels": [1, 2]}, {"labels": "ab"},
                {"labels": [1.5]}, {"cfg_scale": float("nan")}, {"cfg_scale": True}, {"strategy": 3}, {"x": 1}):
        with pytest.raises(DDMError):
            Request.from_json({"n": 1, **bad})


def test_batch_size_changes_no_image(ensemble, reference):
    """Noise and routing draws do not depend on batching; the float state may differ in its last bits (other
    matmul shapes), which the uint8 images and their hashes absorb."""
    assert np.array_equal(reference.images, generate(ensemble, REQUEST).images)
    part = generate(ensemble, REQUEST, batch_size=3)
    assert np.array_equal(part.expert_ids, reference.expert_ids)
    np.testing.assert_allclose(part.x, reference.x, rtol=0, atol=1e-5)
    assert np.abs(part.images.astype(int) - reference.images).max() <= 1
    assert [hamming(hex_to_hash(a["phash"]), hex_to_hash(b["phash"])) for a, b in
            zip(perceptual_hashes(part.images), perceptual_hashes(reference.images))] == [0] * REQUEST.n


def test_bitwise_identical_in_another_process_with_other_devices_and_threads(trained_run, reference, tmp_path):
    """`ddm sample --record` in a fresh process on 1 device, single-threaded XLA and one CPU reproduces the
    in-process batch (8 fake devices, multi-threaded) bit for bit."""
    rec = tmp_path / "rec.json"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1 --xla_cpu_multi_thread_eigen=false",
               JAX_PLATFORMS="cpu")
    script = ("import os, sys; os.sched_setaffinity(0, [min(os.sched_getaffinity(0))]); "
              "from ddm.app.cli import main; sys.exit(main(sys.argv[1:]))")
    cmd = [sys.executable, "-c", script,
           "sample", "--run-dir", str(trained_run), "--n", str(REQUEST.n), "--strategy", REQUEST.strategy,
           "--steps", str(REQUEST.steps), "--solver", REQUEST.solver, "--seed", str(REQUEST.seed),
           "--out", str(tmp_path / "s.png"), "--record", str(rec)]
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(rec.read_text())
    assert record["request"] == REQUEST.to_json()
    assert record["sha256"] == images_sha256(reference.images)


@pytest.mark.parametrize("strategy,solver", [("prior", "euler"), ("top1", "euler"), ("sample", "heun"),
                                             ("threshold:0.2", "euler")])
def test_merged_requests_keep_their_own_draws(ensemble, strategy, solver):
    """Two requests in one merged device call (`generate_many`) get each its lone call's noise and routing
    draws: the same experts at every step and values within 1e-5 (bitwise where the backend's rounding allows:
    docs/serving.md)."""
    from ddm.sampling.request import generate_many

    labels = (3, 1, 4) if ensemble.num_classes else None
    requests = [Request(seed=5, n=3, strategy=strategy, steps=2, solver=solver, labels=labels),
                Request(seed=9, n=5, strategy=strategy, steps=2, solver=solver)]
    merged = generate_many(ensemble, requests, pad_to=16 if strategy == "sample" else None)  # padding: same
    for request, result in zip(requests, merged):
        alone = generate(ensemble, request)
        assert result.seed == request.seed and result.x.shape == alone.x.shape
        if alone.expert_ids is not None:
            assert np.array_equal(result.expert_ids, alone.expert_ids)
        if alone.experts is not None:
            assert np.array_equal(result.experts, alone.experts)
        np.testing.assert_allclose(result.weights, alone.weights, rtol=0, atol=1e-5)
        np.testing.assert_allclose(result.x, alone.x, rtol=0, atol=1e-5)
    with pytest.raises(DDMError, match="one \\(strategy"):
        generate_many(ensemble, [requests[0], Request(seed=1, n=1, strategy=strategy, steps=3, solver=solver)])
