"""Test-wide setup: eight fake CPU devices so sharding is tested without accelerators.

XLA reads the flag once, when jax initialises its backend, so it is set here before any test imports jax.
"""

import os

# Tests run tiny programs a few steps each, so compiling dominates: LLVM's backend optimisations cost more time
# than they save (a latent run end to end 75 s -> 56 s, the guidance test 104 s -> 89 s), and XLA:CPU's
# older fusion emitters compile faster than its MLIR ones (seven strategies sampled, a digits expert and router
# trained 10 steps each: 41 -> 28 CPU seconds). Either choice can change the last bits of a result (the backend
# level those of a sample, the emitters those of a training step), so `ddm` child processes of a test compile
# with the same two flags (helpers.CHILD_XLA_FLAGS): a child's results compare bit for bit with the test's own.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
                      "--xla_cpu_use_fusion_emitters=false")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

# Many tests train or sample the same tiny programs (every digits expert is one HLO module), and each Trainer
# or Ensemble jits anew. A persistent compilation cache shared by the whole session, CLI subprocesses included
# (they inherit the environment), compiles each program once: the trained_run fixture's 2nd and 3rd experts
# take 7 s instead of 35-48 s. A fresh directory per session, so every session (and CI) starts cold and no
# test can depend on a previous one's cache.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache_dir = tempfile.mkdtemp(prefix="ddm-test-jax-cache-")
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MNIST10K = REPO.parent / "shared" / "data" / "mnist10k.npz"


@pytest.fixture
def mnist10k_path() -> Path:
    if not MNIST10K.is_file():
        pytest.skip(f"{MNIST10K} not present")
    return MNIST10K


# A small but complete trained run (K=3 experts + router), built once per test session and shared read-only.
# Tests that modify a run copy it first (`trained_run_copy`).
TINY_RUN_OVERRIDES = [
    "data.k=3",
    "expert.train.steps=40",
    "expert.train.batch_size=32",
    "expert.train.warmup_steps=5",
    "expert.train.checkpoint_every=20",
    "expert.train.log_every=20",
    "router.train.steps=40",
    "router.train.batch_size=32",
    "router.train.warmup_steps=5",
    "router.train.checkpoint_every=20",
    "router.train.log_every=20",
    "sample.n=8",
    "sample.steps=4",
]


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    from ddm.core.config import load_config
    from ddm.data.prepare import prepare
    from ddm.experts.train import train_expert
    from ddm.router.train import train_router

    run_dir = tmp_path_factory.mktemp("trained") / "run"
    cfg = load_config(REPO / "configs" / "digits.yaml", TINY_RUN_OVERRIDES)
    prepare(cfg, run_dir)
    for k in range(cfg.data.k):
        train_expert(run_dir, k, TINY_RUN_OVERRIDES)
    train_router(run_dir, TINY_RUN_OVERRIDES)
    return run_dir


# The captioned digits (configs/digits-captions.yaml: 64-d pooled caption embeddings), one cluster and its
# expert trained 4 steps; no router (`single:0` samples). Shared read-only, like trained_run.
CAPTIONS_OVERRIDES = ["data.k=1", "data.limit=120", "expert.train.steps=4", "expert.train.batch_size=16",
                      "expert.train.warmup_steps=1", "expert.train.checkpoint_every=4", "expert.train.log_every=4",
                      "sample.steps=2", "sample.n=4"]


@pytest.fixture(scope="session")
def captions_run(tmp_path_factory) -> Path:
    from ddm.core.config import load_config
    from ddm.data.prepare import prepare
    from ddm.experts.train import train_expert

    run_dir = tmp_path_factory.mktemp("captions") / "run"
    prepare(load_config(REPO / "configs" / "digits-captions.yaml", CAPTIONS_OVERRIDES), run_dir)
    train_expert(run_dir, 0, CAPTIONS_OVERRIDES)
    return run_dir


@pytest.fixture
def trained_run_copy(trained_run, tmp_path) -> Path:
    import shutil

    target = tmp_path / "run"
    shutil.copytree(trained_run, target)
    return target
