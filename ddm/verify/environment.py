"""The software and hardware that decide the bits of a generation.

A record carries its claimant's environment as information: who made it, on what. It is a claim like any other
and never chooses how a verifier compares (`ddm.verify.verdict`: bit for bit, unless the verifier holds
thresholds it calibrated itself). A verifier's own environment names its calibrations
(`ddm.verify.thresholds`): thresholds measured in another environment are not its own. What is in it follows
the measurements in docs/verification.md: the jax / jaxlib versions, the backend and device kind, the CPU, XLA
flags and the numerics switches. Left out because they were measured not to change a bit: the device count
(`--xla_force_host_platform_device_count`), thread counts and CPU affinity.
"""

from __future__ import annotations

import os
import platform

import jax
import jaxlib

from ddm.core.machine import cpu_model

IGNORED_XLA_FLAGS = ("--xla_force_host_platform_device_count",)


def xla_flags(text: str) -> str:
    """XLA_FLAGS as the environment states them: tokens sorted, bit-neutral flags dropped."""
    kept = [f for f in text.split() if f.split("=")[0] not in IGNORED_XLA_FLAGS]
    return " ".join(sorted(kept))


def environment(emulation: str | None = None) -> dict[str, str]:
    """This process's environment: {"jax", "jaxlib", "backend", "device", "machine", "cpu", "xla_flags",
    "matmul_precision", "x64", "threefry_partitionable"} as strings, plus "emulation" when given (a verifier
    that emulates other hardware or regenerates differently, e.g. "param_mantissa=10; batch_size=3")."""
    env = {
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind,
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "xla_flags": xla_flags(os.environ.get("XLA_FLAGS", "")),
        "matmul_precision": str(jax.config.jax_default_matmul_precision),
        "x64": str(bool(jax.config.jax_enable_x64)),
        "threefry_partitionable": str(bool(jax.config.jax_threefry_partitionable)),
    }
    if emulation:
        env["emulation"] = emulation
    return env


def environment_differences(a: dict[str, str], b: dict[str, str]) -> list[str]:
    """The keys whose values differ between two environments (a key one of them lacks differs), sorted."""
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
