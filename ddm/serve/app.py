"""The FastAPI app of `ddm serve`: a run's routed ensemble behind an HTTP API (docs/serving.md).

    POST /v1/images/generations   a GenerationRequest -> {"created", "data": [{"b64_json": PNG}], "request",
                                  "experts" (prior / single), "record" (when asked; signed with the server's key)}
    POST /v1/verify               a ddm-record/v2 record -> the verdict of `ddm verify` on this run (JSON)
    POST /v1/jobs                 a GenerationRequest, queued -> 202 {"id", "status", ...} (`ddm.serve.jobs`)
    GET  /v1/jobs/{id}            the job: status queued | running | done | failed, the reply once done
    GET  /v1/jobs/{id}/events     server-sent events: one per status change, the last with the reply
    GET  /v1/models               the run: id, manifest SHA-256, experts' and router's SHA-256, classes, shape
    GET  /health                  {"status": "ok", ...} once the ensemble is loaded
    GET  /metrics                 Prometheus text (`ddm.serve.metrics`)
    GET  /                        an HTML form over the generations endpoint (`ddm.serve.page`)

Errors answer one line in `detail`: 422 for a request the run cannot serve (FastAPI's validation, a DDMError:
limits, classes, strategy, size), 429 with Retry-After when the queue is full, 500 for a bug (logged with its
traceback). Every generation runs on the `Batcher`'s worker thread, so a failing request never takes the server
down. A request served alone is bit for bit `ddm sample`'s; one merged with others into one device call keeps its
own noise, routing draws and guidance scale, and its values may differ by rounding: its record names the merged
batch in its environment (`emulation`, information only), and a verifier accepts it within the thresholds it calibrated
itself (`ddm verify --calibrate` measures merged-batch drift).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import io
import json
import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import Body, FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from PIL import Image
from starlette.concurrency import run_in_threadpool

from ddm.core.errors import DDMError
from ddm.data.membership import router_problem
from ddm.data.run import Run
from ddm.sampling.load import load_ensemble
from ddm.sampling.request import Request, check_condition, check_image_count, check_limits, generate, generate_many
from ddm.sampling.routing import ACCEPTED_FORMS, prior_available
from ddm.serve.batcher import Batcher, Merged, QueueFull
from ddm.serve.jobs import JobStore
from ddm.serve.metrics import Metrics, ObservedApp
from ddm.serve.page import index_page
from ddm.serve.schemas import GenerationRequest, decode_array, encode_array
from ddm.verify.limits import MODES
from ddm.verify.records import sample_record
from ddm.verify.signing import key_id, load_private_key
from ddm.verify.verdict import Verifier

logger = logging.getLogger(__name__)

ROUTES = ("/", "/health", "/metrics", "/v1/models", "/v1/images/generations", "/v1/verify", "/v1/jobs")
HEARTBEAT_S = 15.0  # an event stream sends a comment line this often while its job's status stays the same


def route_label(path: str) -> str:
    """The metrics label of a request path: a known route, the job routes with `{id}`, else "other"."""
    if path in ROUTES:
        return path
    if path.startswith("/v1/jobs/"):
        return "/v1/jobs/{id}/events" if path.endswith("/events") else "/v1/jobs/{id}"
    return "other"
MAX_RECORD_BYTES = 64 * 2**20  # a record body larger than this is refused before it is parsed


class JobNotFound(Exception):
    """No job of that id (never made, or its result expired): 404."""


def png_b64(image: np.ndarray) -> str:
    """One uint8 image [H, W, C] (C = 1 or 3) as a base64 PNG."""
    buffer = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _validation_message(err: RequestValidationError) -> str:
    """FastAPI's first validation error as one line: `field n: Input should be greater than or equal to 1`."""
    errors = err.errors()
    if not errors:
        return "invalid request"
    first = errors[0]
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{'field ' + where + ': ' if where else ''}{first.get('msg', 'invalid')}{more}"


def _jsonable(value: Any) -> Any:
    """numpy scalars to Python, non-finite floats to strings ("inf"): strict JSON."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def model_card(run: Run, with_router: bool) -> dict:
    """What `GET /v1/models` says about the run."""
    experts = []
    for k in run.cluster_ids:
        entry = run.expert(k)
        experts.append({"cluster": k, "sha256": (entry or {}).get("sha256"), "available": run.finished(entry)})
    router = run.component("router") if with_router else None
    available = [e["cluster"] for e in experts if e["available"]]
    strategies = [*(["prior"] if prior_available(run.condition_shape) else []), *(f"single:{k}" for k in available)]
    if with_router:
        strategies = ["top1", "top2", "full", "threshold:0.1", "sample", *strategies]
    default = "prior" if "prior" in strategies else strategies[0] if strategies else None  # top1 with a router
    conditioning = ({"kind": "embeddings", "shape": list(run.condition_shape),
                     "prompts": bool(run.config.sample.condition_encoder)} if run.condition_shape
                    else {"kind": "classes", "classes": run.num_classes} if run.num_classes else {"kind": "none"})
    return {"id": run.run_id, "object": "model", "owned_by": "ddm", "manifest_sha256": run.sha256,
            "image_shape": list(run.image_shape), "size": f"{run.image_shape[1]}x{run.image_shape[0]}",
            "classes": run.num_classes, "class_names": run.class_names, "experts": experts,
            "router": None if router is None else {"sha256": router.get("sha256")},
            "conditioning": conditioning, "strategies": strategies, "default_strategy": default,
            "strategy_forms": ACCEPTED_FORMS, "limits": {
                "max_n": run.config.sample.max_n, "max_steps": run.config.sample.max_steps},
            "defaults": {"steps": run.config.sample.steps, "solver": run.config.sample.solver,
                         "seed": run.config.sample.seed, "cfg_scale": run.config.sample.cfg_scale}}


def verification_body(body: dict) -> tuple[dict, np.ndarray | None]:
    """(record, condition embeddings or None) of a `POST /v1/verify` body: a record itself, or {"record": R,
    "conditions": {dtype, shape, b64}} for a record that names condition embeddings by digest (the verifier
    checks that digest before it regenerates)."""
    if not (isinstance(body.get("record"), dict) and set(body) <= {"record", "conditions"}):
        return body, None
    wire = body.get("conditions")
    return body["record"], None if wire is None else decode_array(wire, "conditions")


def check_size(size: str | None, image_shape: tuple[int, ...]) -> None:
    """DDMError unless `size` ("WIDTHxHEIGHT") is None or the run's image size."""
    if size is None:
        return
    expected = f"{image_shape[1]}x{image_shape[0]}"
    if size.strip().lower() != expected:
        raise DDMError(f"size {size!r} is not this run's image size {expected}")


def create_app(run_dir: str | Path | Run, *, key: str | Path | None = None, max_batch: int = 64,
               max_wait_ms: float = 10.0, max_queue: int = 256, overrides: list[str] | tuple[str, ...] = (),
               max_jobs: int = 1000, job_ttl_s: float = 600.0) -> FastAPI:
    """The service for the run at `run_dir` (opened with `overrides`; a `Run` is used as is). key: an Ed25519
    private key file (`ddm keygen`) that signs the records the server returns. max_batch / max_wait_ms /
    max_queue: the worker's batching and its queue bound in images (`ddm.serve.batcher`). max_jobs / job_ttl_s:
    how many asynchronous jobs are kept, and how long a finished one's result is (`ddm.serve.jobs`). The ensemble loads
    here (a bad run, key or checkpoint fails before the server listens); the worker stops with the app."""
    run = run_dir if isinstance(run_dir, Run) else Run.open(run_dir, overrides)
    private_key = None if key is None else load_private_key(key)
    # a router trained for another membership is not served: router strategies wait for ddm train-router
    with_router = run.finished(run.component("router")) and router_problem(run.manifest) is None
    ensemble = load_ensemble(run, with_router=with_router)
    verifier = Verifier(run, ensemble=ensemble)
    card = model_card(run, with_router)
    page = index_page(card)
    holder: dict[str, Any] = {}
    batcher = Batcher(lambda request, conditions: generate(ensemble, request, conditions=conditions),
                      max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue,
                      on_batch=lambda jobs, images: holder["metrics"].batch(jobs, images),
                      generate_many=lambda requests, pad, conditions: generate_many(
                          ensemble, requests, pad_to=pad, conditions=conditions))
    metrics = holder["metrics"] = Metrics(lambda: batcher.pending_images, lambda: batcher.pending_jobs)
    jobs, tasks = JobStore(max_jobs=max_jobs, ttl_s=job_ttl_s), set()
    signer = None if private_key is None else key_id(private_key.public_key())
    logger.info(f"serving run {run.root} ({run.run_id[:12]}, {sum(e['available'] for e in card['experts'])} "
                f"experts{', router' if with_router else ', no router'}; records "
                f"{'signed by ' + signer if signer else 'unsigned'})")

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        try:
            yield
        finally:
            await run_in_threadpool(batcher.close)

    app = FastAPI(title="ddm serve", version="1", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.run, app.state.ensemble, app.state.batcher, app.state.metrics = run, ensemble, batcher, metrics
    app.state.jobs = jobs

    app.add_middleware(ObservedApp, metrics=metrics, label=route_label)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, err: RequestValidationError):
        return JSONResponse({"detail": _validation_message(err)}, status_code=422)

    @app.exception_handler(DDMError)
    async def refused(_request, err: DDMError):
        return JSONResponse({"detail": one_line(err)}, status_code=422)

    @app.exception_handler(QueueFull)
    async def full(_request, err: QueueFull):
        return JSONResponse({"detail": one_line(err)}, status_code=429, headers={"Retry-After": str(err.retry_after)})

    @app.exception_handler(Exception)
    async def failed(request: HTTPRequest, err: Exception):
        logger.error(f"{request.method} {request.url.path} failed: {type(err).__name__}: {one_line(err)}",
                     exc_info=err)
        return JSONResponse({"detail": f"internal error: {type(err).__name__}: {one_line(err)}"}, status_code=500)

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(page)

    @app.get("/health")
    async def health():
        return {"status": "ok", "run": run.run_id, "queue_images": batcher.pending_images,
                "queue_requests": batcher.pending_jobs}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.text(), media_type=metrics.content_type)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [card]}

    def _checked(body: GenerationRequest) -> tuple[Request, np.ndarray | None]:
        """The request (and its condition embeddings, or None) a body asks for; DDMError (422) when bad."""
        check_image_count(body.n, run.config.sample.max_n)  # before n labels or n prompts are made
        conditions = body.condition_rows(run.condition_shape, run.config.sample.condition_encoder,
                                         run.config.sample.max_n)
        request = body.to_request(run.config.sample, card["default_strategy"], conditions)
        check_limits(request, run.config.sample)
        check_condition(request, run.num_classes, run.condition_shape)
        check_size(body.size, run.image_shape)
        return request, conditions

    @app.post("/v1/images/generations")
    async def generations(body: GenerationRequest):
        request, conditions = await run_in_threadpool(_checked, body)  # a prompt's encoder may take a while
        result = await asyncio.wrap_future(batcher.submit(request, conditions))
        reply = await run_in_threadpool(_reply, request, result, body.record, body.arrays, conditions)
        metrics.images.inc(request.n)
        return JSONResponse(reply)

    def _reply(request: Request, result, record: bool, arrays: bool = False, conditions=None) -> dict:
        emulation = None
        if isinstance(result, Merged):  # values within rounding of a lone call's: records say so (docs/serving.md)
            emulation = f"ddm serve merged batch: {result.requests} requests, {result.images} images"
            result = result.value
        reply = {"created": int(time.time()), "data": [{"b64_json": png_b64(im)} for im in result.images],
                 "request": request.to_json()}
        if result.experts is not None:
            reply["experts"] = [int(k) for k in result.experts]
        if arrays:  # what `ddm sample --server` needs to write the outputs `ddm sample` writes
            reply["arrays"] = {"x": encode_array(result.x), "weights": encode_array(result.weights),
                               "expert_ids": None if result.expert_ids is None else encode_array(result.expert_ids)}
            if conditions is not None:  # what a verifier needs besides the record (the page's verify button)
                reply["arrays"]["conditions"] = encode_array(conditions)  # float32 (`condition_rows`)
        if record:
            reply["record"] = sample_record(run.sha256, request, result, run.codec, private_key, emulation)
        return reply

    @app.post("/v1/jobs", status_code=202)
    async def create_job(body: GenerationRequest):
        request, conditions = await run_in_threadpool(_checked, body)
        jobs.reserve()
        job = jobs.add(request, batcher.submit(request, conditions))
        task = asyncio.create_task(_complete(job, body.record, body.arrays, conditions))
        tasks.add(task)  # a reference until it ends: the loop keeps only weak ones
        task.add_done_callback(tasks.discard)
        return JSONResponse(job.to_json(), status_code=202)

    async def _complete(job, record: bool, arrays: bool, conditions) -> None:
        try:
            result = await asyncio.wrap_future(job.future)
            reply = await run_in_threadpool(_reply, job.request, result, record, arrays, conditions)
        except Exception as err:  # noqa: BLE001 - the job's failure is reported in the job
            jobs.finish(job, error=one_line(err))
            return
        metrics.images.inc(job.request.n)
        jobs.finish(job, result=reply)

    def _job(job_id: str):
        job = jobs.get(job_id)
        if job is None:
            raise JobNotFound(f"no job {job_id!r} (unknown, or its result expired)")
        return job

    @app.exception_handler(JobNotFound)
    async def not_found(_request, err: JobNotFound):
        return JSONResponse({"detail": one_line(err)}, status_code=404)

    @app.get("/v1/jobs/{job_id}")
    async def get_job(job_id: str):
        return JSONResponse(_job(job_id).to_json())

    @app.get("/v1/jobs/{job_id}/events")
    async def job_events(job_id: str):
        job = _job(job_id)

        async def stream():
            last, beat = None, time.monotonic()
            while True:
                status = job.status
                if status != last:
                    last, beat = status, time.monotonic()
                    yield f"event: {status}\ndata: {json.dumps(job.to_json(with_result=status == 'done'))}\n\n"
                    if status in ("done", "failed"):
                        return
                elif time.monotonic() - beat > HEARTBEAT_S:
                    beat = time.monotonic()
                    yield ": waiting\n\n"
                await asyncio.sleep(0.05)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/verify")
    async def verify(body: Annotated[dict, Body()], mode: str | None = None):
        if mode is not None and mode not in MODES:
            raise DDMError(f"mode {mode!r} is not one of {', '.join(MODES)}")
        record, conditions = verification_body(body)
        text = json.dumps(record)
        if len(text) > MAX_RECORD_BYTES:
            raise DDMError(f"record of {len(text)} bytes exceeds {MAX_RECORD_BYTES}")
        shape = record.get("shape")
        images = shape[0] if isinstance(shape, list) and shape and isinstance(shape[0], int) else 0
        verdict = await asyncio.wrap_future(batcher.call(functools.partial(_verify, text, mode, conditions),
                                                         images=min(max(images, 0), max_queue)))
        return JSONResponse(_jsonable(verdict.to_json()))

    def _verify(text: str, mode: str | None, conditions):
        with tempfile.TemporaryDirectory(prefix="ddm-serve-verify-") as tmp:
            path = Path(tmp) / "record.json"
            path.write_text(text)
            return verifier.verify(path, mode=mode, conditions=conditions)

    return app
