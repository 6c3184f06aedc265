"""Prometheus metrics of one server (`GET /metrics`), in a registry of its own (two apps in one process, as
in tests, never share counters).

    ddm_requests_total{path, status}       requests answered, by route and HTTP status
    ddm_request_seconds{path}              latency histogram, request in to response out
    ddm_queue_images / ddm_queue_requests  work pending on the generation worker (queued or running)
    ddm_images_generated_total             images returned to clients
    ddm_batches_total, ddm_batch_images    batches the worker formed, and their sizes in images
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Metrics:
    """The counters of one app; `queue_images` / `queue_requests` read the worker's pending counts when scraped."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, queue_images: Callable[[], float], queue_requests: Callable[[], float]):
        self.registry = CollectorRegistry()
        self.requests = Counter("ddm_requests", "HTTP requests answered", ("path", "status"), registry=self.registry)
        self.latency = Histogram("ddm_request_seconds", "HTTP request latency", ("path",), buckets=LATENCY_BUCKETS,
                                 registry=self.registry)
        self.images = Counter("ddm_images_generated", "images returned to clients", registry=self.registry)
        self.batches = Counter("ddm_batches", "batches formed by the generation worker", registry=self.registry)
        self.batch_images = Histogram("ddm_batch_images", "images per batch", buckets=(1, 2, 4, 8, 16, 32, 64, 128,
                                                                                      256, 512, 1024),
                                      registry=self.registry)
        Gauge("ddm_queue_images", "images pending on the worker", registry=self.registry).set_function(queue_images)
        Gauge("ddm_queue_requests", "jobs pending on the worker", registry=self.registry).set_function(queue_requests)

    def observe(self, path: str, status: int, seconds: float) -> None:
        self.requests.labels(path, str(status)).inc()
        self.latency.labels(path).observe(seconds)

    def batch(self, jobs: int, images: int) -> None:
        self.batches.inc()
        self.batch_images.observe(images)

    def text(self) -> bytes:
        return generate_latest(self.registry)


class ObservedApp:
    """ASGI middleware: counts every HTTP request of `app` in `metrics` by route label (`label(path)`) and status,
    with its latency from request in to response headers out. A plain ASGI wrapper rather than Starlette's
    `BaseHTTPMiddleware`, which copies every request and response body through extra tasks and streams."""

    def __init__(self, app, metrics: Metrics, label: Callable[[str], str]):
        self.app, self.metrics, self.label = app, metrics, label

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, path = time.perf_counter(), self.label(scope["path"])

        async def observed_send(message):
            if message["type"] == "http.response.start":
                self.metrics.observe(path, message["status"], time.perf_counter() - t0)
            await send(message)

        await self.app(scope, receive, observed_send)
