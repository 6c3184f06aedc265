"""`ddm serve`: the HTTP API in-process (FastAPI's TestClient) on the session's trained run, the batching
worker on its own, and one real server process stopped with SIGTERM."""

import base64
import dataclasses
import io
import json
import signal
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

import httpx
from fastapi.testclient import TestClient
from helpers import concurrently, free_port, start_serve
from PIL import Image

from ddm.core.errors import DDMError
from ddm.sampling.request import Request, generate
from ddm.serve.app import create_app
from ddm.serve.batcher import Batcher, Merged, QueueFull, pad_size
from ddm.serve.schemas import decode_array
from ddm.verify.signing import generate_keypair, load_public_key
from ddm.verify.verdict import Verifier


def _pixels(b64: str) -> np.ndarray:
    image = np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))
    return image[..., None] if image.ndim == 2 else image


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return generate_keypair(tmp_path_factory.mktemp("serve-key") / "key")


@pytest.fixture(scope="module")
def client(trained_run, keys):
    app = create_app(trained_run, key=keys[0], max_wait_ms=0)
    with TestClient(app) as c:
        yield c


def test_generations_are_the_pngs_of_generate_for_the_same_request(client):
    body = {"n": 3, "strategy": "prior", "seed": 7, "steps": 3, "class": 4, "size": "8x8"}
    run = client.app.state.run
    if run.image_shape[:2] != (8, 8):
        body["size"] = f"{run.image_shape[1]}x{run.image_shape[0]}"
    r = client.post("/v1/images/generations", json=body)
    assert r.status_code == 200, r.text
    reply = r.json()
    request = Request.from_json(reply["request"])
    assert request == Request(seed=7, n=3, strategy="prior", steps=3, solver=run.config.sample.solver,
                              labels=(4, 4, 4), cfg_scale=run.config.sample.cfg_scale)
    expected = generate(client.app.state.ensemble, request)
    images = np.stack([_pixels(d["b64_json"]) for d in reply["data"]])
    assert images.shape == (3, *run.image_shape)
    np.testing.assert_array_equal(images, expected.images)
    assert reply["experts"] == [int(k) for k in expected.experts]  # prior fixes each image's expert
    assert "record" not in reply and isinstance(reply["created"], int)


def test_a_served_record_verifies_and_a_tampered_one_does_not(client, keys, tmp_path):
    r = client.post("/v1/images/generations", json={"n": 2, "strategy": "prior", "seed": 3, "steps": 2,
                                                    "record": True})
    assert r.status_code == 200, r.text
    record = r.json()["record"]
    assert record["format"] == "ddm-record/v2" and "signature" in record
    assert record["request"] == r.json()["request"]

    path = tmp_path / "record.json"
    path.write_text(json.dumps(record))
    verifier = Verifier(client.app.state.run, public_key=load_public_key(keys[1]),
                        ensemble=client.app.state.ensemble)
    assert verifier.verify(path).honest

    verdict = client.post("/v1/verify", json=record)
    assert verdict.status_code == 200, verdict.text
    assert verdict.json()["honest"] is True and verdict.json()["problems"] == []

    tampered = dict(record, images=[dict(record["images"][0], phash="0" * 16), *record["images"][1:]])
    verdict = client.post("/v1/verify", json=tampered)
    assert verdict.status_code == 200, verdict.text
    assert verdict.json()["honest"] is False and verdict.json()["problems"]

    malformed = client.post("/v1/verify", json={"format": "nope"})
    assert malformed.status_code == 422 and malformed.json()["detail"]


@pytest.mark.parametrize("body, reason", [
    ({"n": 0}, "n"),
    ({"steps": 10**6}, "max_steps"),
    ({"strategy": "bogus"}, "strategy"),
    ({"size": "3x5"}, "size"),
    ({"class": 99}, "class 99"),
    ({"class": 1, "n": 10**9}, "exceeds sample.max_n"),  # refused before 10^9 labels are made
    ({"labels": [1, 2], "n": 3}, "labels"),
    ({"response_format": "url"}, "response_format"),
    ({"prompt": "a cat"}, "prompt gives condition embeddings, but this run is not conditioned on embeddings"),
    ({"conditions": {"dtype": "float32", "shape": [1, 4], "b64": "A" * 22 + "=="}}, "not conditioned on embeddings"),
    ({"strategy": "oracle"}, "oracle"),
    ({"class": 1, "cfg_scale": 1e300}, "cfg_scale"),  # beyond what verify accepts: no NaN image signed
])
def test_bad_requests_get_422_with_a_one_line_reason(client, body, reason):
    r = client.post("/v1/images/generations", json=body)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and reason in detail


def test_models_health_metrics_and_page(client):
    run = client.app.state.run
    models = client.get("/v1/models").json()["data"][0]
    assert models["id"] == run.run_id and models["manifest_sha256"] == run.sha256
    assert models["image_shape"] == list(run.image_shape) and models["classes"] == run.num_classes
    assert [e["sha256"] for e in models["experts"]] == [run.expert(k)["sha256"] for k in run.cluster_ids]
    assert models["router"]["sha256"] == run.component("router")["sha256"] and "prior" in models["strategies"]

    assert client.get("/health").json()["status"] == "ok"

    client.post("/v1/images/generations", json={"n": 1, "steps": 2})
    text = client.get("/metrics").text
    for name in ("ddm_requests_total", "ddm_queue_images", "ddm_images_generated_total",
                 "ddm_request_seconds_bucket"):
        assert name in text
    assert 'path="/v1/images/generations",status="200"' in text

    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for field in ('id="strategy"', 'id="class"', 'id="cfg_scale"', 'id="steps"', 'id="seed"', 'id="n"',
                  'id="routing"', 'id="verify"', "Generate", "v1/images/generations", "v1/verify"):
        assert field in page.text
    assert "http://" not in page.text and "https://" not in page.text  # no external assets


def test_a_full_queue_answers_429_with_retry_after_and_the_server_recovers(trained_run):
    app = create_app(trained_run, max_queue=2, max_wait_ms=0)
    batcher = app.state.batcher
    release, started = threading.Event(), threading.Event()
    real = batcher.generate

    def blocked(request, conditions):
        started.set()
        release.wait(30)
        return real(request, conditions)

    batcher.generate = blocked
    with TestClient(app) as client:
        first = {}
        worker = threading.Thread(target=lambda: first.update(r=client.post(
            "/v1/images/generations", json={"n": 2, "steps": 2})))
        worker.start()
        assert started.wait(30)
        r = client.post("/v1/images/generations", json={"n": 1, "steps": 2})
        assert r.status_code == 429 and r.headers["Retry-After"] == "1" and "queue" in r.json()["detail"]
        too_big = client.post("/v1/images/generations", json={"n": 3, "steps": 2})
        assert too_big.status_code == 422
        release.set()
        worker.join(60)
        assert first["r"].status_code == 200 and len(first["r"].json()["data"]) == 2
        assert client.post("/v1/images/generations", json={"n": 1, "steps": 2}).status_code == 200


def test_batcher_groups_compatible_requests_and_isolates_failures():
    gate = threading.Event()
    calls, batches = [], []

    def fake(request, conditions):
        gate.wait(10)
        if request.seed == 13:
            raise DDMError("unlucky")
        calls.append(request.seed)
        return request.seed

    batcher = Batcher(fake, max_batch=4, max_wait_ms=200, max_queue=10,
                      on_batch=lambda jobs, images: batches.append((jobs, images)))
    try:
        first = batcher.submit(Request(seed=1, n=1, steps=2, strategy="prior"))
        time.sleep(0.05)  # the worker holds the first job, gathering companions
        same = [batcher.submit(Request(seed=s, n=1, steps=2, strategy="prior")) for s in (2, 2, 13)]
        other = batcher.submit(Request(seed=5, n=1, steps=3, strategy="prior"))  # another program: next batch
        with pytest.raises(QueueFull):
            batcher.submit(Request(seed=6, n=6, steps=2, strategy="prior"))
        gate.set()
        assert [f.result(10) for f in (first, *same[:2], other)] == [1, 2, 2, 5]
        with pytest.raises(DDMError, match="unlucky"):
            same[2].result(10)
        assert calls == [1, 2, 5]  # the identical request ran once
        assert batches == [(4, 4), (1, 1)]
        assert batcher.pending_images == 0 and batcher.pending_jobs == 0
    finally:
        batcher.close()


def test_batcher_merges_distinct_compatible_requests_and_retries_a_failed_merge_alone():
    gate = threading.Event()
    merged_calls, alone_calls = [], []

    def one(request, conditions):
        if request.seed == 13:
            raise DDMError("unlucky")
        alone_calls.append(request.seed)
        return request.seed

    def many(requests, pad_to, conditions):
        gate.wait(10)
        merged_calls.append(([r.seed for r in requests], pad_to))
        if any(r.seed == 13 for r in requests):
            raise DDMError("one of them is unlucky")
        return [r.seed * 10 for r in requests]

    batcher = Batcher(one, max_batch=8, max_wait_ms=300, max_queue=20, generate_many=many)
    try:
        futures = [batcher.submit(Request(seed=s, n=n, steps=2, strategy="prior")) for s, n in ((1, 2), (2, 1), (1, 2))]
        futures.append(batcher.submit(Request(seed=4, n=1, steps=2, strategy="prior", cfg_scale=2.0, labels=(1,))))
        gate.set()
        values = [f.result(10) for f in futures]
        assert values[0] == values[2] == Merged(10, requests=2, images=3) and values[1] == Merged(20, 2, 3)
        assert values[3] == 4  # guidance on: alone in the next batch, a plain `generate` value
        assert merged_calls == [([1, 2], 4)]  # identical requests merged once; 3 rows padded to 4

        failing = [batcher.submit(Request(seed=s, n=1, steps=3, strategy="prior")) for s in (13, 6)]
        with pytest.raises(DDMError, match="unlucky"):
            failing[0].result(10)
        assert failing[1].result(10) == 6 and 6 in alone_calls  # the merge failed: each request ran alone
        assert pad_size(3, 8) == 4 and pad_size(5, 8) == 8 and pad_size(9, 8) == 9 and pad_size(1, 8) == 1
    finally:
        batcher.close()


def _calibrated(run_dir):
    """`run_dir` with thresholds its verifier holds as its own, for merged-batch rounding (1e-5, the bound
    docs/serving.md states), as if `ddm verify --calibrate` had measured it: /v1/verify accepts a merged
    record's rounding only with a calibration of its own."""
    from ddm.data.run import Run
    from ddm.verify.thresholds import Thresholds, write_thresholds

    run = Run.open(run_dir)
    write_thresholds(run.eval_dir, run.sha256, Thresholds(phash=0, max_abs=1e-5, rms=1e-5, median_max_abs=1e-5,
                                                          median_rms=1e-5), {"note": "merged-batch rounding"})
    return run_dir


def test_merged_generations_keep_their_draws_and_their_records_verify(trained_run_copy, keys, tmp_path):
    app = create_app(_calibrated(trained_run_copy), key=keys[0], max_wait_ms=500, max_batch=16)
    bodies = [{"n": 3, "strategy": "prior", "seed": 21, "steps": 2, "record": True},
              {"n": 2, "strategy": "prior", "seed": 22, "steps": 2, "record": True}]
    with TestClient(app) as client:
        replies = concurrently(app, client, bodies)
        ensemble = app.state.ensemble
        for reply in replies:
            assert reply.status_code == 200, reply.text
            body = reply.json()
            request = Request.from_json(body["request"])
            alone = generate(ensemble, request)
            images = np.stack([_pixels(d["b64_json"]) for d in body["data"]])
            assert np.abs(images.astype(int) - alone.images).max() <= 1
            assert body["experts"] == [int(k) for k in alone.experts]  # its own prior draws
            record = body["record"]
            assert "merged batch: 2 requests, 5 images" in record["environment"]["emulation"]
            verdict = client.post("/v1/verify", json=record).json()
            assert verdict["honest"] is True and verdict["mode"] in ("exact", "tolerance"), verdict


@pytest.mark.parametrize("strategy", ["prior", "top1"])  # the fixed strategies' group solve, the routed dispatch
def test_requests_of_different_guidance_scales_merge_into_one_batch_with_their_own_scales(trained_run_copy, keys,
                                                                                          strategy):
    app = create_app(_calibrated(trained_run_copy), key=keys[0], max_wait_ms=500, max_batch=16)
    batches = []
    on_batch = app.state.batcher.on_batch
    app.state.batcher.on_batch = lambda jobs, images: (batches.append((jobs, images)), on_batch(jobs, images))
    common = {"strategy": strategy, "steps": 3, "record": True, "arrays": True}
    bodies = [{"n": 3, "seed": 41, "class": 2, "cfg_scale": 1.5, **common},
              {"n": 2, "seed": 42, "labels": [5, 7], "cfg_scale": 3.0, **common}]
    with TestClient(app) as client:
        replies = concurrently(app, client, bodies)
        assert batches == [(2, 5)]  # one batch of both requests, 5 images
        ensemble = app.state.ensemble
        merged_x = []
        for reply in replies:
            assert reply.status_code == 200, reply.text
            body = reply.json()
            request = Request.from_json(body["request"])
            alone = generate(ensemble, request)
            x = decode_array(body["arrays"]["x"])
            merged_x.append(x)
            np.testing.assert_allclose(x, alone.x, rtol=0, atol=1e-5)  # docs/serving.md: rounding only
            np.testing.assert_array_equal(decode_array(body["arrays"]["expert_ids"]), alone.expert_ids)
            images = np.stack([_pixels(d["b64_json"]) for d in body["data"]])
            assert np.abs(images.astype(int) - alone.images).max() <= 1
            record = body["record"]
            assert "merged batch: 2 requests, 5 images" in record["environment"]["emulation"]
            verdict = client.post("/v1/verify", json=record).json()
            assert verdict["honest"] is True, (verdict["mode"], verdict["mode_reason"], verdict["problems"])
        # Each request was guided by its own scale: the first one's rows under the other's scale differ.
        other = generate(ensemble, dataclasses.replace(Request.from_json(replies[0].json()["request"]),
                                                       cfg_scale=3.0))
        assert np.abs(other.x - merged_x[0]).max() > 1e-3


def test_jobs_run_a_generation_asynchronously_and_stream_their_status(client):
    body = {"n": 2, "strategy": "prior", "seed": 31, "steps": 2}
    created = client.post("/v1/jobs", json=body)
    assert created.status_code == 202, created.text
    job = created.json()
    assert job["status"] in ("queued", "running", "done") and job["object"] == "job"

    with client.stream("GET", f"/v1/jobs/{job['id']}/events") as events:
        assert events.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in events.iter_lines() if line]
    kinds = [line.split(": ", 1)[1] for line in lines if line.startswith("event: ")]
    assert kinds[-1] == "done" and set(kinds) <= {"queued", "running", "done"}
    final = json.loads([line for line in lines if line.startswith("data: ")][-1][len("data: "):])
    assert final["status"] == "done" and len(final["result"]["data"]) == 2

    got = client.get(f"/v1/jobs/{job['id']}").json()
    assert got["status"] == "done" and got["result"]["request"] == got["request"]
    expected = generate(client.app.state.ensemble, Request.from_json(got["request"]))
    images = np.stack([_pixels(d["b64_json"]) for d in got["result"]["data"]])
    np.testing.assert_array_equal(images, expected.images)

    missing = client.get("/v1/jobs/nope")
    assert missing.status_code == 404 and "nope" in missing.json()["detail"]
    assert client.post("/v1/jobs", json={"n": 0}).status_code == 422


def test_job_store_keeps_a_bounded_number_of_results_for_a_bounded_time():
    import concurrent.futures

    from ddm.serve.jobs import JobStore

    now = [0.0]
    store = JobStore(max_jobs=2, ttl_s=10, clock=lambda: now[0])
    request = Request(seed=1, n=1, steps=2, strategy="prior")
    first = store.add(request, concurrent.futures.Future())
    store.reserve()
    second = store.add(request, concurrent.futures.Future())
    with pytest.raises(QueueFull):  # both unfinished: no room
        store.reserve()
    store.finish(first, result={"data": []})
    assert first.status == "done" and second.status == "queued"
    store.reserve()  # the oldest finished job makes room
    assert store.get(first.id) is None and store.get(second.id) is second
    assert second.future.set_running_or_notify_cancel() and second.status == "running"
    store.finish(second, error="boom")
    assert second.status == "failed" and second.to_json()["error"] == "boom"
    now[0] = 11.0
    assert store.get(second.id) is None and len(store) == 0  # expired


def test_serve_launcher_k8s_writes_a_deployment_and_a_service(trained_run_copy, capsys):
    import yaml

    from ddm.app.cli import main

    assert main(["serve", "--run-dir", str(trained_run_copy), "--launcher", "k8s", "--image", "reg/ddm:1",
                 "--replicas", "2", "--gpus", "1", "--port", "8080", "--set", "sample.max_n=32"]) == 0
    path = trained_run_copy / "k8s" / "serve.yaml"
    assert str(path) in capsys.readouterr().out
    deployment, service = yaml.safe_load_all(path.read_text())
    assert deployment["kind"] == "Deployment" and deployment["spec"]["replicas"] == 2
    pod = deployment["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] >= 30
    (container,) = pod["containers"]
    assert container["image"] == "reg/ddm:1" and container["resources"]["limits"]["nvidia.com/gpu"] == 1
    command = container["command"]
    assert command[:4] == ["ddm", "serve", "--run-dir", str(trained_run_copy.absolute())]
    assert command[command.index("--host") + 1] == "0.0.0.0" and command[-2:] == ["--set", "sample.max_n=32"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert container["ports"] == [{"name": "http", "containerPort": 8080}]
    assert service["kind"] == "Service" and service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["port"] == 8080
    assert main(["serve", "--run-dir", str(trained_run_copy), "--launcher", "k8s"]) == 2  # no --image



def test_sample_with_server_writes_what_a_local_sample_writes(trained_run, tmp_path):
    import uvicorn

    from ddm.app.cli import main

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(trained_run, max_wait_ms=0), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the loopback server did not start"
            time.sleep(0.05)
        args = ["sample", "--run-dir", str(trained_run), "--n", "3", "--seed", "5", "--steps", "2",
                "--strategy", "prior", "--class", "2"]
        assert main([*args, "--out", str(tmp_path / "remote.png"), "--record", str(tmp_path / "remote.json"),
                     "--server", f"http://127.0.0.1:{port}"]) == 0
        assert main([*args, "--out", str(tmp_path / "local.png"), "--record", str(tmp_path / "local.json")]) == 0
        remote, local = np.load(tmp_path / "remote.npz"), np.load(tmp_path / "local.npz")
        assert sorted(remote.files) == sorted(local.files)
        for name in local.files:
            np.testing.assert_array_equal(remote[name], local[name], err_msg=name)
        assert (tmp_path / "remote.png").read_bytes() == (tmp_path / "local.png").read_bytes()
        remote_record = json.loads((tmp_path / "remote.json").read_text())
        local_record = json.loads((tmp_path / "local.json").read_text())
        assert remote_record["values"] == local_record["values"]
        assert main(["verify", str(tmp_path / "remote.json"), "--run-dir", str(trained_run)]) == 0
        assert main([*args, "--out", str(tmp_path / "x.png"), "--server", "http://127.0.0.1:1"]) == 2  # unreachable
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.mark.slow
def test_ddm_serve_answers_and_stops_cleanly_on_sigterm(trained_run):
    proc, base = start_serve(trained_run, "--max-wait-ms", "0")
    try:
        r = httpx.post(f"{base}/v1/images/generations", json={"n": 2, "steps": 2}, timeout=120)
        assert r.status_code == 200 and len(r.json()["data"]) == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
