"""Launching many islands: local OS processes (one per expert), a SLURM array script, a Kubernetes Indexed Job.

Isolation is the point: each island is its own process with its own JAX runtime, reading only its bundle
(RUN/islands/k) and writing only its OUT (RUN/experts/k, or any folder of its own). Islands never write the
manifest: the local launcher assembles each finished island itself (`ddm.experts.assemble`); after a SLURM or
Kubernetes job, `ddm assemble` does. One island failing never stops the others; a rerun skips finished islands
and resumes the rest from their checkpoints. A preempted island (SIGTERM) checkpoints and exits with
`PREEMPTED_EXIT`, which the SLURM script requeues and the Kubernetes Job retries without counting a failure.
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

import yaml

from ddm.core.errors import DDMError
from ddm.data.run import Run
from ddm.experts.assemble import assemble_experts
from ddm.train.preemption import PREEMPTED_EXIT

logger = logging.getLogger(__name__)

# `ddm train-islands` exits with this when some islands failed (the others finished and were assembled): its own
# code, because 1 means only "not honest" (`ddm verify`) and 2 bad input; a rerun trains only the failed ones.
ISLANDS_FAILED_EXIT = 4


@dataclass
class Island:
    cluster: int
    status: str  # "finished", "pending", "running", "failed", "skipped"
    seconds: float = 0.0
    log: Path | None = None
    returncode: int | None = None


def island_command(bundle: Path, out: Path, overrides: list[str]) -> list[str]:
    sets = [arg for o in overrides for arg in ("--set", o)]
    return [sys.executable, "-m", "ddm", "train-expert", "--island", str(bundle), "--out", str(out),
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
            proc = subprocess.Popen(island_command(run.bundle_dir(k), run.expert_dir(k), overrides), stdout=handle,
                                    stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
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
            if proc.returncode == 0:  # the coordinator (this process) registers what the island handed back
                try:
                    run = assemble_experts(run, [run.expert_dir(k)])
                except DDMError as err:
                    island.status, tail = "failed", f": assemble: {err}"
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
                       partition: str | None = None, grace_seconds: int = 120) -> Path:
    """Writes (does not submit) `RUN_DIR/slurm/islands.sbatch`: one array task per unfinished island.

    Each task is one island; with `nodes` > 1 it is a multi-node JAX job (one process per node, started by
    srun, which `jax.distributed.initialize()` detects). SLURM sends SIGTERM `grace_seconds` before the time
    limit (`--signal`); the island checkpoints and exits with PREEMPTED_EXIT, and the task requeues itself
    (`--requeue`). Islands do not write the manifest (`--no-assemble`): `ddm assemble` registers them after.
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
        f"#SBATCH --signal=TERM@{grace_seconds}",
        "#SBATCH --requeue",
    ]
    if gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={gpus_per_node}")
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    lines += [
        "",
        "# One array task = one island = one expert. Islands never talk to each other; a failed task can be",
        "# resubmitted alone (sbatch --array=<k> ...) and resumes from its last checkpoint.",
        f"# Preempted (SIGTERM, exit {PREEMPTED_EXIT}): the island checkpointed; requeue this task to resume it.",
        f"# When every task has finished: ddm assemble --run-dir {shlex.quote(str(run_dir))} {run_dir}/experts/*",
        "set -uo pipefail",
        f"srun {shlex.quote(sys.executable)} -m ddm train-expert --run-dir {shlex.quote(str(run_dir))} "
        f"--cluster $SLURM_ARRAY_TASK_ID --no-assemble --no-progress {sets}".rstrip(),
        "rc=$?",
        f"if [ $rc -eq {PREEMPTED_EXIT} ]; then scontrol requeue \"${{SLURM_ARRAY_JOB_ID}}_${{SLURM_ARRAY_TASK_ID}}\"; fi",
        "exit $rc",
        "",
    ]
    for k in todo:  # SLURM does not create the directories of --output
        (run_dir / "experts" / str(k)).mkdir(parents=True, exist_ok=True)
    path = run_dir / "slurm" / "islands.sbatch"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    path.chmod(0o755)
    return path


def write_k8s_job(run_dir: str | Path, overrides: list[str], *, image: str, bundles: str | None = None,
                  experts: str | None = None, parallel: int | None = None, accelerator: str = "gpu",
                  accelerators: int = 1, tpu_type: str | None = None, tpu_topology: str | None = None,
                  grace_seconds: int = 120, retries: int = 3) -> Path:
    """Writes (does not apply) `RUN_DIR/k8s/islands.yaml`: a Kubernetes Indexed Job, one index per island.

    Pod i runs `ddm train-expert --island BUNDLES/i --out EXPERTS/i` (`JOB_COMPLETION_INDEX` is i), with
    `accelerators` GPUs (`nvidia.com/gpu`) or TPU chips (`google.com/tpu` + GKE's TPU node selectors). On
    SIGTERM the island checkpoints within one step; `terminationGracePeriodSeconds` is `grace_seconds`, which
    must cover a step plus a checkpoint write. A preempted pod exits PREEMPTED_EXIT, which the pod failure
    policy ignores (the index restarts without using up its `retries`).
    """
    run_dir = Path(run_dir).absolute()
    run = Run.open(run_dir, overrides)
    if accelerator not in ("gpu", "tpu", "cpu"):
        raise DDMError(f"--accelerator must be gpu, tpu or cpu, got {accelerator!r}")
    bundles = (bundles or str(run_dir / "islands")).rstrip("/")
    experts = (experts or str(run_dir / "experts")).rstrip("/")
    sets = [arg for o in overrides for arg in ("--set", o)]
    container = {
        "name": "island",
        "image": image,
        "command": ["ddm", "train-expert", "--island", f"{bundles}/$(JOB_COMPLETION_INDEX)",
                    "--out", f"{experts}/$(JOB_COMPLETION_INDEX)", "--no-progress", *sets],
    }
    pod: dict = {"restartPolicy": "Never", "terminationGracePeriodSeconds": grace_seconds, "containers": [container]}
    if accelerator == "gpu":
        container["resources"] = {"limits": {"nvidia.com/gpu": accelerators}}
    elif accelerator == "tpu":
        container["resources"] = {"limits": {"google.com/tpu": accelerators}}
        pod["nodeSelector"] = {k: v for k, v in (("cloud.google.com/gke-tpu-accelerator", tpu_type),
                                                 ("cloud.google.com/gke-tpu-topology", tpu_topology)) if v}
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": f"ddm-islands-{run.run_id[:12]}", "labels": {"app": "ddm-islands"}},
        "spec": {
            "completionMode": "Indexed",
            "completions": run.num_clusters,
            "parallelism": parallel or run.num_clusters,
            "backoffLimitPerIndex": retries,
            "podFailurePolicy": {"rules": [{"action": "Ignore", "onExitCodes": {
                "containerName": "island", "operator": "In", "values": [PREEMPTED_EXIT]}}]},
            "template": {"metadata": {"labels": {"app": "ddm-islands"}}, "spec": pod},
        },
    }
    path = run_dir / "k8s" / "islands.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    header = (f"# ddm islands of run {run.run_id[:16]}: kubectl apply -f {path}\n"
              f"# then, with the experts where this machine sees them: ddm assemble --run-dir RUN {experts}/*\n")
    path.write_text(header + yaml.safe_dump(job, sort_keys=False))
    return path
