"""Launching many islands: local OS processes (one per expert) or a SLURM array script.

Isolation is the point: each island is its own process with its own JAX runtime, sharing nothing but the run
directory. One island failing never stops the others; a rerun skips finished islands and resumes the rest
from their checkpoints.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ddm.data.run import Run

logger = logging.getLogger(__name__)


@dataclass
class Island:
    cluster: int
    status: str  # "finished", "pending", "running", "failed", "skipped"
    seconds: float = 0.0
    log: Path | None = None
    returncode: int | None = None


def island_command(run_dir: Path, cluster: int, overrides: list[str]) -> list[str]:
    sets = [arg for o in overrides for arg in ("--set", o)]
    return [sys.executable, "-m", "ddm", "train-expert", "--run-dir", str(run_dir), "--cluster", str(cluster),
            "--no-progress", *sets]


def launch_local(run_dir: str | Path, overrides: list[str], *, parallel: int = 1,
                 env: dict | None = None) -> list[Island]:
    """Runs every unfinished island as its own process, at most `parallel` at once; returns their outcomes."""
    run_dir = Path(run_dir).absolute()
    run = Run.open(run_dir, overrides)
    todo = run.unfinished_experts(run.config.expert.train.steps)
    islands = {k: Island(k, "pending" if k in todo else "finished") for k in run.cluster_ids}
    logger.info(f"{len(todo)} of {len(islands)} islands to train ({parallel} at a time); logs in {run_dir}/experts/<k>/train.log")
    queue, running = list(todo), {}
    while queue or running:
        while queue and len(running) < max(1, parallel):
            k = queue.pop(0)
            log_path = run_dir / "experts" / str(k) / "train.log"
            log_path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(log_path, "a")
            proc = subprocess.Popen(island_command(run_dir, k, overrides), stdout=handle, stderr=subprocess.STDOUT,
                                    env={**os.environ, **(env or {})})
            running[k] = (proc, handle, time.perf_counter())
            islands[k].status, islands[k].log = "running", log_path
            logger.info(f"  island {k}: started (pid {proc.pid})")
        time.sleep(0.2)
        for k, (proc, handle, t0) in list(running.items()):
            if proc.poll() is None:
                continue
            handle.close()
            island = islands[k]
            island.returncode, island.seconds = proc.returncode, time.perf_counter() - t0
            island.status = "finished" if proc.returncode == 0 else "failed"
            tail = "" if proc.returncode == 0 else f": {_last_line(island.log)}"
            logger.info(f"  island {k}: {island.status} in {island.seconds:.0f}s{tail}")
            del running[k]
    logger.info(status_table(list(islands.values())))
    return list(islands.values())


def _last_line(path: Path) -> str:
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def status_table(islands: list[Island]) -> str:
    lines = [f"{'island':>6}  {'status':<9}  {'seconds':>7}  log"]
    for i in islands:
        lines.append(f"{i.cluster:>6}  {i.status:<9}  {i.seconds:>7.0f}  {i.log or '-'}")
    return "\n".join(lines)


def write_slurm_script(run_dir: str | Path, overrides: list[str], *, nodes: int = 1, gpus_per_node: int = 0,
                       parallel: int | None = None, time_limit: str = "24:00:00",
                       partition: str | None = None) -> Path:
    """Writes (does not submit) `RUN_DIR/slurm/islands.sbatch`: one array task per unfinished island.

    Each task is one island; with `nodes` > 1 it is a multi-node JAX job (one process per node, started by
    srun, which `jax.distributed.initialize()` detects).
    """
    run_dir = Path(run_dir).absolute()
    run = Run.open(run_dir, overrides)
    todo = run.unfinished_experts(run.config.expert.train.steps) or run.cluster_ids
    array = ",".join(map(str, todo)) + (f"%{parallel}" if parallel else "")
    sets = " ".join(f"--set {shlex.quote(o)}" for o in overrides)
    lines = [
        "#!/bin/bash",
        "#SBATCH --job-name=ddm-islands",
        f"#SBATCH --array={array}",
        f"#SBATCH --nodes={nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --time={time_limit}",
        f"#SBATCH --output={run_dir}/experts/%a/slurm-%A_%a.log",
    ]
    if gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={gpus_per_node}")
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    lines += [
        "",
        "# One array task = one island = one expert. Islands never talk to each other; a failed task can be",
        "# resubmitted alone (sbatch --array=<k> ...) and resumes from its last checkpoint.",
        "set -euo pipefail",
        f"srun {shlex.quote(sys.executable)} -m ddm train-expert --run-dir {shlex.quote(str(run_dir))} "
        f"--cluster $SLURM_ARRAY_TASK_ID --no-progress {sets}".rstrip(),
        "",
    ]
    for k in todo:  # SLURM does not create the directories of --output
        (run_dir / "experts" / str(k)).mkdir(parents=True, exist_ok=True)
    path = run_dir / "slurm" / "islands.sbatch"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    path.chmod(0o755)
    return path
