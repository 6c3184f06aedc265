"""Helpers shared by several test files (pytest puts tests/ on sys.path, so `from helpers import ...`)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from oracles.badinput import refusing_folder

REPO = Path(__file__).resolve().parents[1]


def prepared_template(tmp_path_factory) -> Path:
    """digits, K=2, prepared once per session (a few seconds) and shared by the training tests; tests copy it."""
    from ddm.app import cli

    path = tmp_path_factory.getbasetemp() / "ddm-digits-k2"
    if not (path / "manifest.json").exists():
        assert cli.main(["prepare", "--config", str(REPO / "configs" / "digits.yaml"), "--run-dir", str(path),
                         "--set", "data.k=2"]) == 0
    return path


def fresh_run(tmp_path_factory, name: str) -> Path:
    """A private copy of the prepared template."""
    dst = tmp_path_factory.mktemp(name) / "run"
    shutil.copytree(prepared_template(tmp_path_factory), dst)
    return dst


def perturb(module: nnx.Module, seed: int = 0, scale: float = 0.05) -> None:
    """Adds N(0, scale^2) noise (drawn with numpy: no XLA compile) to every parameter, so zero-initialised
    layers stop being zero."""
    rng = np.random.default_rng(seed)
    state = nnx.state(module, nnx.Param)
    noisy = jax.tree.map(lambda a: jnp.asarray(np.asarray(a) + scale * rng.standard_normal(a.shape, np.float32)),
                         state)
    nnx.update(module, noisy)


@nnx.jit
def forward(model, x, t, y=None):
    return model(x, t, y)


def model_inputs(shape, batch=3, seed=0):
    """(x [batch, *shape] standard normal, t [batch] uniform) as jax arrays."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, *shape), dtype=np.float32)
    return jnp.asarray(x), jnp.asarray(rng.uniform(size=batch).astype(np.float32))


def unwritable_folder(tmp_path: Path) -> Path:
    """A folder this user cannot create files in (a chmod-0500 one, or /sys for root); skips where none refuses."""
    folder = refusing_folder(tmp_path)
    if folder is None:
        pytest.skip("no folder here refuses this user's writes (root, and no /sys)")
    return folder


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_serve(run_dir: Path, *args: str, timeout: float = 180) -> tuple[subprocess.Popen, str]:
    """A `ddm serve` process of `run_dir` on a free 127.0.0.1 port (extra CLI `args`), once /health answers:
    (the process, its base URL). The caller stops it."""
    import httpx

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "ddm", "serve", "--run-dir", str(run_dir), "--port", str(port),
                             *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ))
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"ddm serve exited {proc.returncode}: {proc.stdout.read()}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return proc, base
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.terminate()
            raise AssertionError("ddm serve did not come up")
        time.sleep(0.3)


@contextlib.contextmanager
def serving(run_dir: Path, *args: str):
    """`start_serve` as a context: yields the base URL, and stops the server (SIGTERM, then SIGKILL after 60 s)."""
    proc, base = start_serve(run_dir, *args)
    try:
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# XLA flags of a `ddm` child process besides its device count: the compile settings of the session itself
# (conftest), so that a child's results are bitwise comparable with the test's. A child trains or samples a few
# steps, so compiling dominates (a cold 16-step `train-expert` child at backend level 0: 25 -> 18 CPU seconds).
CHILD_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"


def child_env(tmp_path_factory, devices: int = 1) -> dict:
    """The environment for a `ddm` child process of a test: `devices` CPU devices, no inherited multi-process
    settings, the session's compilation cache."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "DDM_NUM_CPU"))}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {CHILD_XLA_FLAGS}", JAX_PLATFORMS="cpu",
               TF_CPP_MIN_LOG_LEVEL="2", JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.getbasetemp() / "jax-cache"))
    return env


def process_alive(pid: int) -> bool:
    """Whether a process with this pid exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def concurrently(app, client, bodies: list[dict]) -> list:
    """The replies to `bodies` posted at once while the worker is held, so that they queue together."""
    gate = threading.Event()
    blocker = app.state.batcher.call(lambda: gate.wait(30))  # holds the worker while the requests queue
    replies = [None] * len(bodies)
    threads = [threading.Thread(target=lambda i=i: replies.__setitem__(
        i, client.post("/v1/images/generations", json=bodies[i]))) for i in range(len(bodies))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while app.state.batcher.pending_jobs < len(bodies) + 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    gate.set()
    blocker.result(30)
    for t in threads:
        t.join(120)
    return replies
