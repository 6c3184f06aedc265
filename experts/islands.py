"""Launching many islands: local OS processes (one per expert), a SLURM array script, a Kubernetes Indexed Job.

Isolation is the point: each island is its own process with its own JAX runtime, reading only its bundle
(RUN/islands/k) and writing only its OUT (RUN/experts/k, or any folder of its own). Islands never write the
manifest: the local launcher assembles each finished island itself (`ddm.experts.assemble`); after a SLURM or
Kubernetes job, `ddm assemble` does. One island failing never stops the others; a rerun skips finished islands
and resumes the rest from their checkpoints. A preempted island (SIGTERM) checkpoints and exits with
`PREEMPTED_EXIT`, which the SLURM script requeues and the Kubernetes Job retries without counting a failure;
the local launcher, stopped by SIGTERM / SIGINT, passes the signal on to its islands, waits for them to
checkpoint, and raises `IslandsPreempted` (exit `PREEMPTED_EXIT`): no island outlives it.

What the user types goes into a shell script (SLURM) or a YAML manifest (Kubernetes): every such field is
checked first (`_plain`, `_directive`, `_label_value`), so a newline cannot add a line to either.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from ddm.core.errors import DDMError
from ddm.data.run import Run
from ddm.experts.assemble import assemble_experts
from ddm.train.preemption import PREEMPTED_EXIT, Preempted, StopRequest

logger = logging.getLogger(__name__)

# `ddm train-islands` exits with this when some islands failed (the others finished and were assembled): its own
# code, because 1 means only "not honest" (`ddm verify`) and 2 bad input; a rerun trains only the failed ones.
ISLANDS_FAILED_EXIT = 4
# How an island that was passed a signal ends: checkpointed (PREEMPTED_EXIT), interrupted before training began
# (130, KeyboardInterrupt), or killed by the signal before it could handle it; each resumes from its checkpoints.
STOPPED_EXITS = (PREEMPTED_EXIT, 130, -signal.SIGTERM, -signal.SIGINT)
# SLURM partition names (a comma-separated list of them) and time limits ([days-]hours:minutes:seconds).
_PARTITIONS = re.compile(r"[A-Za-z0-9_.-]+(,[A-Za-z0-9_.-]+)*")
_TIME_LIMIT = re.compile(r"[0-9][0-9:-]*")
# A Kubernetes label value (GKE's TPU node selectors): 63 characters at most, alphanumerics at both ends.
_LABEL_VALUE = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")


class IslandsPreempted(Preempted):
    """The local launcher was stopped by a signal; its running islands got it too and stopped at a checkpoint."""

    def __init__(self, signame: str, stopped: list[int], pending: list[int]):
        parts = [f"train-islands: stopped by {signame}"]
        if stopped:
            parts.append(f"islands {stopped} stopped too, at their last checkpoints")
        if pending:
            parts.append(f"islands {pending} not started")
        Exception.__init__(self, "; ".join([*parts, "rerun to resume"]))
        self.step, self.signame, self.stopped, self.pending = None, signame, stopped, pending


@dataclass
class Island:
    cluster: int
    status: str  # "finished", "pending", "running", "failed", "preempted"
    seconds: float = 0.0
    log: Path | None = None
    returncode: int | None = None


def island_command(bundle: Path, out: Path, overrides: list[str]) -> list[str]:
    sets = [arg for o in overrides for arg in ("--set", o)]
    return [sys.executable, "-m", "ddm", "train-expert", "--island", str(bundle), "--out", str(out),
            "--no-progress", *sets]


def launch_local(run_dir: str | Path, overrides: list[str], *, parallel: int = 1,
                 env: dict | None = None) -> list[Island]:
    """Runs every unfinished island as its own process, at most `parallel` at once; returns their outcomes.

    SIGTERM / SIGINT (a scheduler's preemption, Ctrl-C) start no further island, go on to every running one
    (which checkpoints and exits `PREEMPTED_EXIT`), and raise `IslandsPreempted` once all of them have exited:
    the islands that finished meanwhile are assembled, and a rerun resumes the others.
    """
    run_dir = Path(run_dir).absolute()
    run = Run.open(run_dir, overrides)
    todo = run.unfinished_experts(run.config.expert.train.steps)
    islands = {k: Island(k, "pending" if k in todo else "finished") for k in run.cluster_ids}
    logger.info(f"{len(todo)} of {len(islands)} islands to train ({parallel} at a time); logs in {run_dir}/experts/<k>/train.log")
    with StopRequest() as stop:
        _run_islands(run, overrides, islands, list(todo), parallel, env, stop)
    logger.info(status_table(list(islands.values())))
    if stop.signame is not None:
        raise IslandsPreempted(stop.signame, [k for k, i in islands.items() if i.status == "preempted"],
                               [k for k, i in islands.items() if i.status == "pending"])
    return list(islands.values())


def _run_islands(run: Run, overrides: list[str], islands: dict[int, Island], queue: list[int], parallel: int,
                 env: dict | None, stop: StopRequest) -> None:
    """The launcher's loop: starts the islands of `queue`, waits for them and assembles the finished ones
    (updating `islands` in place). Once `stop` has a signal, it starts no more and passes the signal on to each
    running island (once), then waits for them all."""
    run_dir = run.root.absolute()
    running, signalled = {}, set()
    while (queue and stop.signame is None) or running:
        while queue and stop.signame is None and len(running) < max(1, parallel):
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
        if stop.signame is not None:
            for k in running.keys() - signalled:  # the island checkpoints and exits PREEMPTED_EXIT
                running[k][0].send_signal(signal.Signals[stop.signame])
                logger.info(f"  island {k}: {stop.signame} passed on; waiting for it to checkpoint")
                signalled.add(k)
        for k, (proc, handle, t0) in list(running.items()):
            if proc.poll() is None:
                continue
            handle.close()
            island = islands[k]
            island.returncode, island.seconds = proc.returncode, time.perf_counter() - t0
            island.status = ("finished" if proc.returncode == 0 else
                             "preempted" if k in signalled and proc.returncode in STOPPED_EXITS else "failed")
            tail = "" if proc.returncode == 0 else f": {_last_line(island.log)}"
            if proc.returncode == 0:  # the coordinator (this process) registers what the island handed back
                try:
                    run = assemble_experts(run, [run.expert_dir(k)])
                except DDMError as err:
                    island.status, tail = "failed", f": assemble: {err}"
            logger.info(f"  island {k}: {island.status} in {island.seconds:.0f}s{tail}")
            del running[k]


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
    A field that could change the script's lines (a newline in `partition`, whitespace in an `#SBATCH`
    value) is refused (DDMError) before anything is written.
    """
    run_dir = Path(run_dir).absolute()
    _directive(str(run_dir), "the run directory (in #SBATCH --output)")
    if partition is not None and not _PARTITIONS.fullmatch(partition):
        raise DDMError(f"--partition {partition!r} is not a SLURM partition name (letters, digits, _ . -; several "
                       "separated by commas)")
    if not _TIME_LIMIT.fullmatch(time_limit):
        raise DDMError(f"SLURM time limit {time_limit!r} must be [days-]hours:minutes:seconds")
    for o in overrides:
        _plain(o, "--set")
    run = Run.open(run_dir, overrides)
    todo = run.unfinished_experts(run.config.expert.train.steps) or run.cluster_ids
    array = ",".join(map(str, todo)) + (f"%{parallel}" if parallel else "")
    sets = " ".join(f"--set {shlex.quote(o)}" for o in overrides)
    output = str(run_dir).replace("%", "%%")  # % starts a SLURM filename pattern (%a: the array index)
    lines = [
        "#!/bin/bash",
        "#SBATCH --job-name=ddm-islands",
        f"#SBATCH --array={array}",
        f"#SBATCH --nodes={nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --time={time_limit}",
        f"#SBATCH --output={output}/experts/%a/slurm-%A_%a.log",
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


def _plain(value: str, what: str) -> str:
    """`value` if it holds no control character (a newline would start a new line of a script or manifest);
    DDMError naming `what` otherwise."""
    bad = next((c for c in value if ord(c) < 32 or ord(c) == 127), None)
    if bad is not None:
        raise DDMError(f"{what} {value!r} holds a control character ({bad!r}); launcher fields must be one line")
    return value


def _directive(value: str, what: str) -> str:
    """`value` if it can stand in an `#SBATCH` line as one word: one line, no whitespace or quotes (sbatch
    splits those lines itself); DDMError naming `what` otherwise."""
    _plain(value, what)
    bad = next((c for c in value if c.isspace() or c in "\"'"), None)
    if bad is not None:
        raise DDMError(f"{what} {value!r} holds {bad!r}, which an #SBATCH line cannot carry; use a path without it")
    return value


def _label_value(value: str | None, what: str) -> str | None:
    """`value` (or None) if it is a Kubernetes label value; DDMError naming `what` otherwise."""
    if value is not None and not _LABEL_VALUE.fullmatch(value):
        raise DDMError(f"{what} {value!r} is not a Kubernetes label value (up to 63 letters, digits, - _ ., "
                       "alphanumeric at both ends)")
    return value


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

    Only unfinished islands get an index. When some are finished, index i trains the i-th unfinished island,
    mapped by a `sh -c` line (`exec`s ddm, so the signal and the exit code are ddm's); the image needs a shell.
    Every field is checked first (one line; an image without whitespace; label values for the TPU selectors);
    DDMError when none is left to train.
    """
    run_dir = Path(run_dir).absolute()
    if accelerator not in ("gpu", "tpu", "cpu"):
        raise DDMError(f"--accelerator must be gpu, tpu or cpu, got {accelerator!r}")
    _plain(str(run_dir), "the run directory")
    _plain(image, "--image")
    if not image or any(c.isspace() for c in image):
        raise DDMError(f"--image {image!r} must be a container image reference (no whitespace)")
    for value, what in ((bundles, "--bundles"), (experts, "--experts"), *((o, "--set") for o in overrides)):
        if value is not None:
            _plain(value, what)
    _label_value(tpu_type, "--tpu-type")
    _label_value(tpu_topology, "--tpu-topology")
    run = Run.open(run_dir, overrides)
    todo = run.unfinished_experts(run.config.expert.train.steps)
    if not todo:
        raise DDMError(f"every island of {run_dir} is finished; there is nothing to launch")
    bundles = (bundles or str(run_dir / "islands")).rstrip("/")
    experts = (experts or str(run_dir / "experts")).rstrip("/")
    sets = [arg for o in overrides for arg in ("--set", o)]
    if todo == list(range(run.num_clusters)):  # index i is island i
        command = ["ddm", "train-expert", "--island", f"{bundles}/$(JOB_COMPLETION_INDEX)",
                   "--out", f"{experts}/$(JOB_COMPLETION_INDEX)", "--no-progress", *sets]
    else:  # index i is the i-th unfinished island
        command = ["sh", "-c", f"set -- {' '.join(map(str, todo))}; shift \"$JOB_COMPLETION_INDEX\"; "
                   f"exec ddm train-expert --island {shlex.quote(bundles)}/\"$1\" --out {shlex.quote(experts)}/\"$1\" "
                   + " ".join(["--no-progress", *map(shlex.quote, sets)])]
    container = {"name": "island", "image": image, "command": command}
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
            "completions": len(todo),
            "parallelism": min(parallel or len(todo), len(todo)),
            "backoffLimitPerIndex": retries,
            "podFailurePolicy": {"rules": [{"action": "Ignore", "onExitCodes": {
                "containerName": "island", "operator": "In", "values": [PREEMPTED_EXIT]}}]},
            "template": {"metadata": {"labels": {"app": "ddm-islands"}}, "spec": pod},
        },
    }
    path = run_dir / "k8s" / "islands.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    header = (f"# ddm islands {todo} of run {run.run_id[:16]}: kubectl apply -f {path}\n"
              f"# then, with the experts where this machine sees them: ddm assemble --run-dir RUN {experts}/*\n")
    path.write_text(header + yaml.safe_dump(job, sort_keys=False))
    return path
