"""Shared helpers of the benchmark scripts: the machine-info table, warmed-up median timings, markdown tables.

Timings on a shared CPU are noisy, so every script reports *ratios measured in the same run*: the callables
being compared are warmed up (compiled) first, then called in turn, round after round (`interleaved`), so that
background load hits all of them alike, and each one's median over the rounds is taken.

Use from a script run as a module from the repo root (`python -m benchmarks.NAME`) as

    from benchmarks.common import interleaved, machine_table, markdown_table
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

from ddm.core.machine import cpu_model


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def load_average() -> str:
    """The 1/5/15-minute load averages as text ("n/a" where the OS has none)."""
    try:
        return "{:.2f} / {:.2f} / {:.2f}".format(*os.getloadavg())
    except OSError:
        return "n/a"


def machine_info(packages: Sequence[str] = ("jax", "jaxlib", "flax")) -> dict[str, str]:
    """What the numbers depend on: CPU count and model, OS, Python, package versions, load average now."""
    info = {
        "cpu count": str(os.cpu_count()),
        "processor": f"{cpu_model()} ({platform.machine()})",
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }
    for name in packages:
        info[name] = _version(name)
    info["load average (1/5/15 min)"] = load_average()
    return info


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; cells are formatted with str()."""
    lines = ["| " + " | ".join(map(str, headers)) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)


def machine_table(packages: Sequence[str] = ("jax", "jaxlib", "flax"), extra: dict[str, Any] | None = None) -> str:
    """`machine_info` (plus `extra` rows, e.g. the command line) as a two-column markdown table."""
    info = {**machine_info(packages), **(extra or {})}
    return markdown_table(["machine", ""], list(info.items()))


@dataclasses.dataclass(frozen=True)
class Timing:
    """Wall times and process CPU times (seconds, all threads) of one callable over the measured rounds.

    On a loaded machine the CPU time is the steadier measure of the work done (it does not count time spent
    waiting for a core), the wall time the one a user sees; scripts report ratios of wall-time medians and
    show the CPU-time ratios beside them as a check.
    """

    times: tuple[float, ...]
    cpu_times: tuple[float, ...] = ()

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu_times) if self.cpu_times else float("nan")

    @property
    def spread(self) -> float:
        """(max - min) / median: how noisy the rounds were."""
        return (max(self.times) - min(self.times)) / self.median if self.median > 0 else 0.0


def _call(fn: Callable[[], Any], block: Callable[[Any], Any] | None) -> tuple[float, float]:
    """(wall, process CPU) seconds of fn() and block(result)."""
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    if block is not None:
        block(out)
    return time.perf_counter() - t0, time.process_time() - c0


def interleaved(
    fns: dict[str, Callable[[], Any]],
    *,
    repeats: int = 5,
    warmup: int = 1,
    block: Callable[[Any], Any] | None = None,
) -> dict[str, Timing]:
    """Times every callable `repeats` times, in turn, after `warmup` untimed calls of each.

    fn() must do the whole measured work; `block(result)` is called inside the timed region (e.g.
    `jax.block_until_ready`) for callables that return before their work is done. Returns name -> Timing.
    """
    for fn in fns.values():
        for _ in range(warmup):
            _call(fn, block)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(_call(fn, block))
    return {name: Timing(tuple(w for w, _ in ts), tuple(c for _, c in ts)) for name, ts in times.items()}


def time_fn(fn: Callable[[], Any], *, repeats: int = 5, warmup: int = 1,
            block: Callable[[Any], Any] | None = None) -> Timing:
    """`interleaved` for one callable."""
    return interleaved({"fn": fn}, repeats=repeats, warmup=warmup, block=block)["fn"]


def fmt(x: float, digits: int = 3) -> str:
    """A number with `digits` significant digits (thousands separated above 1000)."""
    if x >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"
