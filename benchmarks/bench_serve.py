"""Serving throughput of `ddm serve` over loopback, against `Ensemble.sample` called directly.

    python -m benchmarks.bench_serve [--run-dir RUN] [--quick] [--strategy prior] [--steps 4]
        [--sizes 4,16] [--clients 1,8,32] [--http auto|h11|httptools]

Starts the app (`ddm.serve.app.create_app`) under uvicorn in this process on 127.0.0.1 (a free port) over
`--run-dir`, or over a tiny digits run it trains itself in a temporary directory (the tests' settings: K=3,
40 steps per expert and router). Then, for 1, 8 and 32 concurrent httpx clients and requests of 4 and 16
images (distinct seeds, so no request is a duplicate), every client sends requests back to back until the
cell's request count or its time limit is reached. The clients run in a child process, so this process's CPU
time over a cell is the server's alone (HTTP, validation, PNG and JSON, the worker, the device calls).
Columns: images/s = images answered / wall time of the cell; p50 / p99: request latency (client side, PNG
encoding and JSON included); mean batch: images per worker batch (`Batcher.on_batch`); direct: `Ensemble.sample`
at the merged call's padded size (`pad_size` of the mean batch), warm, median of a few calls, images/s; ratio =
served / direct (wall; the clients' own CPU competes for the same cores); CPU ratio = direct CPU seconds per
image / the server's CPU seconds per image (what serving costs beyond the samples, whoever the clients are).
Every program is compiled before
the timed cells (lone sizes and the padded merged sizes), so no cell pays for a compile, and each cell starts
with one untimed round of `clients` requests. --quick: 4 x clients requests per cell (at least 16), else 16 x
(at least 64).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.common import machine_table, markdown_table

REPO = Path(__file__).resolve().parents[1]
TINY = ["data.k=3", "expert.train.steps=40", "expert.train.batch_size=32", "expert.train.warmup_steps=5",
        "expert.train.checkpoint_every=20", "expert.train.log_every=20", "router.train.steps=40",
        "router.train.batch_size=32", "router.train.warmup_steps=5", "router.train.checkpoint_every=20",
        "router.train.log_every=20"]


def tiny_run(root: Path) -> Path:
    """A tiny trained digits run under `root` (what the tests train)."""
    from ddm.core.config import load_config
    from ddm.data.prepare import prepare
    from ddm.experts.train import train_expert
    from ddm.router.train import train_router

    run_dir = root / "run"
    cfg = load_config(REPO / "configs" / "digits.yaml", TINY)
    prepare(cfg, run_dir, base_dir=REPO)
    for k in range(cfg.data.k):
        train_expert(run_dir, k, TINY, progress=False)
    train_router(run_dir, TINY, progress=False)
    return run_dir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(app, port: int, http: str = "auto"):
    """uvicorn serving `app` on 127.0.0.1:port in a daemon thread (HTTP parser `http`); returns the server once
    it listens."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", http=http))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise SystemExit("the server did not start")
        time.sleep(0.05)
    return server, thread


async def cell(base: str, clients: int, n: int, requests: int, limit_s: float, body: dict, seeds) -> dict:
    """`clients` concurrent clients, `requests` requests of n images in all (or until limit_s): latencies, wall."""
    import httpx

    latencies: list[float] = []
    remaining = [requests]
    stop = time.monotonic() + limit_s

    async def client(http):
        while remaining[0] > 0 and time.monotonic() < stop:
            remaining[0] -= 1
            t0 = time.perf_counter()
            r = await http.post(f"{base}/v1/images/generations", json={**body, "n": n, "seed": next(seeds)})
            r.raise_for_status()
            latencies.append(time.perf_counter() - t0)

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients)) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - t0
    return {"latencies": latencies, "wall": wall, "images": n * len(latencies)}


def run_cell(base: str, clients: int, n: int, requests: int, limit_s: float, body: dict, first_seed: int) -> dict:
    """`cell` in a process of its own (the clients' CPU is not the server's); seeds first_seed, first_seed + 1..."""
    import itertools

    return asyncio.run(cell(base, clients, n, requests, limit_s, body, itertools.count(first_seed)))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", help="a trained run (default: train a tiny one in a temporary directory)")
    parser.add_argument("--quick", action="store_true", help="fewer requests per cell and shorter limits")
    parser.add_argument("--strategy", default="prior")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--sizes", default="4,16", help="images per request, comma-separated")
    parser.add_argument("--clients", default="1,8,32", help="concurrent clients, comma-separated")
    parser.add_argument("--http", default="auto", choices=("auto", "h11", "httptools"),
                        help="uvicorn's HTTP parser (auto: httptools when installed)")
    args = parser.parse_args(argv)

    import itertools

    import numpy as np

    from ddm.sampling.request import Request, generate_many
    from ddm.serve.app import create_app
    from ddm.serve.batcher import pad_size

    tmp = tempfile.TemporaryDirectory(prefix="ddm-bench-serve-")
    run_dir = Path(args.run_dir) if args.run_dir else tiny_run(Path(tmp.name))
    app = create_app(run_dir, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=4096,
                     overrides=[f"sample.max_n={max(args.max_batch, 64)}"])
    ensemble, batcher = app.state.ensemble, app.state.batcher
    batch_images: list[int] = []
    recorded = batcher.on_batch
    batcher.on_batch = lambda jobs, images: (batch_images.append(images), recorded(jobs, images))

    solver = app.state.run.config.sample.solver
    body = {"strategy": args.strategy, "steps": args.steps, "solver": solver}
    sizes = tuple(int(v) for v in args.sizes.split(","))
    concurrency = tuple(int(v) for v in args.clients.split(","))
    padded = sorted({pad_size(b, args.max_batch) for b in range(1, args.max_batch + 1)} | set(sizes))
    print(f"compiling {len(padded)} batch sizes {padded} ...", file=sys.stderr, flush=True)
    direct: dict[int, float] = {}
    direct_cpu: dict[int, float] = {}  # CPU seconds per image
    for b in padded:  # the jit cache is the server's: these compile every program the cells will run
        ensemble.sample(b, args.strategy, steps=args.steps, solver=solver, seed=0)
        if b > 1:  # a merged call (the same program as a lone one, but for the `sample` strategy's keys)
            generate_many(ensemble, [Request(seed=s, n=m, strategy=args.strategy, steps=args.steps, solver=solver)
                                     for s, m in ((1, b // 2), (2, b - b // 2))])
        times, cpu = [], []
        for r in range(3 if args.quick else 5):
            t0, c0 = time.perf_counter(), time.process_time()
            ensemble.sample(b, args.strategy, steps=args.steps, solver=solver, seed=r + 1)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        direct[b] = b / statistics.median(times)
        direct_cpu[b] = statistics.median(cpu) / b

    port = free_port()
    server, thread = start_server(app, port, args.http)
    base, seeds = f"http://127.0.0.1:{port}", itertools.count(1000, 100_000)
    headers = ["clients", "n", "requests", "images/s", "p50 ms", "p99 ms", "mean batch", "direct images/s", "ratio",
               "server CPU ms / image", "direct CPU ms / image", "CPU ratio"]
    rows = []
    pool = multiprocessing.get_context("spawn").Pool(1)
    try:
        for n in sizes:
            for clients in concurrency:
                requests = max(4 * clients, 16) if args.quick else max(16 * clients, 64)
                limit = 60.0 if args.quick else 180.0
                pool.apply(run_cell, (base, clients, n, clients, limit, body, next(seeds)))  # untimed: settles
                batch_images.clear()
                c0 = time.process_time()
                result = pool.apply(run_cell, (base, clients, n, requests, limit, body, next(seeds)))
                server_cpu = (time.process_time() - c0) / max(1, result["images"])
                mean_batch = float(np.mean(batch_images)) if batch_images else float(n)
                at = pad_size(round(mean_batch), args.max_batch)
                served = result["images"] / result["wall"]
                lat = result["latencies"]
                rows.append([clients, n, len(lat), f"{served:.1f}", f"{percentile(lat, 0.5) * 1e3:.0f}",
                             f"{percentile(lat, 0.99) * 1e3:.0f}", f"{mean_batch:.1f}", f"{direct[at]:.1f} (B={at})",
                             f"{served / direct[at]:.2f}", f"{server_cpu * 1e3:.2f}", f"{direct_cpu[at] * 1e3:.2f}",
                             f"{direct_cpu[at] / server_cpu:.2f}"])
                print(markdown_table(headers, rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    finally:
        pool.close()
        server.should_exit = True
        thread.join(60)
        batcher.close()
        tmp.cleanup()

    print(machine_table(("jax", "jaxlib", "fastapi", "uvicorn", "httpx"),
                        {"run": str(run_dir) if args.run_dir else "tiny digits (K=3, trained here)",
                         "strategy": args.strategy, "steps": args.steps, "solver": solver,
                         "max_batch": args.max_batch,
                         "max_wait_ms": args.max_wait_ms, "http": args.http}))
    print()
    print(markdown_table(headers, rows))


if __name__ == "__main__":
    main()
