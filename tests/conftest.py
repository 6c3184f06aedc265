"""Test-wide setup: eight fake CPU devices so sharding is tested without accelerators.

XLA reads the flag once, when jax initialises its backend, so it is set here before any test imports jax.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MNIST10K = REPO.parent / "shared" / "data" / "mnist10k.npz"


@pytest.fixture
def mnist10k_path() -> Path:
    if not MNIST10K.is_file():
        pytest.skip(f"{MNIST10K} not present")
    return MNIST10K
