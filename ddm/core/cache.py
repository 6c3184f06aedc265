"""ddm's per-user cache folder, and JAX's persistent compilation cache kept in it.

Every Trainer and Ensemble jits its own functions, so without a disk cache each expert of a run compiles the
same program again (docs/benchmarks.md, "Expert training", measures what that costs), and every new `ddm`
process starts cold. The CLI turns the cache on for its process; library users opt in by calling
`enable_compilation_cache` (or setting JAX's own `JAX_COMPILATION_CACHE_DIR`).

The cache is trusted code: JAX loads executables from it. It lives in the user's own cache folder, never in a
run directory that others may write to.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

COMPILE_CACHE_MAX_BYTES = 2 * 1024**3  # least recently used entries are evicted beyond this


def default_cache_dir() -> Path:
    """$DDM_CACHE_DIR, else ~/.cache/ddm."""
    return Path(os.environ.get("DDM_CACHE_DIR") or Path.home() / ".cache" / "ddm")


def enable_compilation_cache(env: os._Environ | dict = os.environ) -> Path | None:
    """Points JAX's persistent compilation cache at `default_cache_dir()/jax` (before the first compile).

    Left alone when `JAX_COMPILATION_CACHE_DIR` is set (JAX reads it itself) or `DDM_COMPILE_CACHE` is `0`/`off`;
    skipped with a debug line when the folder cannot be created (a cache is never worth failing a command).
    Returns the folder in use, or None.
    """
    if env.get("JAX_COMPILATION_CACHE_DIR"):
        return Path(env["JAX_COMPILATION_CACHE_DIR"])
    if env.get("DDM_COMPILE_CACHE", "").strip().lower() in ("0", "off", "false", "no"):
        return None
    folder = default_cache_dir() / "jax"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        logger.debug(f"compilation cache off: cannot create {folder} ({err})")
        return None
    import jax  # here, not above: default_cache_dir serves commands that never load jax

    jax.config.update("jax_compilation_cache_dir", str(folder))
    if importlib.util.find_spec("filelock") is not None:  # JAX's size-bounded cache locks with it (else unbounded)
        jax.config.update("jax_compilation_cache_max_size", COMPILE_CACHE_MAX_BYTES)
    return folder
