"""Island launcher: `ddm train-islands` (local processes, SLURM script) and `ddm train-monolith`.

Each island is its own OS process (one fake CPU device each, sharing a persistent compilation cache); one
island is broken on purpose (its shard is missing) to check that the others still finish, the command exits
non-zero, and a rerun retries only the failed island.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import CHILD_XLA_FLAGS, prepared_template

from ddm.app import cli
from ddm.data import manifest as mf

REPO = Path(__file__).resolve().parents[1]
# The same training config as test_trainer.py: on one device the island programs are compiled once.
TRAIN = ["expert.train.steps=16", "expert.train.batch_size=16", "expert.train.checkpoint_every=4",
         "expert.train.log_every=2", "expert.train.warmup_steps=4"]
SETS = [a for s in TRAIN for a in ("--set", s)]


@pytest.fixture
def run(tmp_path_factory, monkeypatch) -> Path:
    """A fresh copy of the prepared run; child processes get one CPU device and the session's compile cache."""
    dst = tmp_path_factory.mktemp("islands") / "run"
    shutil.copytree(prepared_template(tmp_path_factory), dst)
    for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "DDM_NUM_CPU_DEVICES"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("XLA_FLAGS", f"--xla_force_host_platform_device_count=1 {CHILD_XLA_FLAGS}")  # children only
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "jax-cache"))
    return dst


def test_slurm_script_is_written_not_submitted(run, capsys):
    rc = cli.main(["train-islands", "--run-dir", str(run), "--launcher", "slurm", "--parallel", "2",
                   "--partition", "gpu", *SETS])
    assert rc == 0
    script = run / "slurm" / "islands.sbatch"
    assert f"wrote {script}" in capsys.readouterr().out
    text = script.read_text()
    lines = text.splitlines()
    assert lines[0] == "#!/bin/bash" and os.access(script, os.X_OK)
    assert "#SBATCH --array=0,1%2" in lines  # one array task per island, at most 2 at once
    assert "#SBATCH --partition=gpu" in lines
    srun = next(line for line in lines if line.startswith("srun "))
    assert "-m ddm train-expert" in srun and "--cluster $SLURM_ARRAY_TASK_ID" in srun
    assert f"--run-dir {run.absolute()}" in srun and "--set expert.train.steps=16" in srun
    assert (run / "experts" / "0").is_dir() and (run / "experts" / "1").is_dir()  # for --output logs
    assert "0" not in mf.read_manifest(run).get("experts", {})  # nothing ran


@pytest.mark.slow
def test_local_islands_failure_rerun_and_monolith(run, capsys):
    shard = run / "islands" / "1" / "shard"
    hidden = run / "islands" / "1" / "shard.hidden"
    shard.rename(hidden)  # island 1 cannot open its data

    rc = cli.main(["train-islands", "--run-dir", str(run), "--parallel", "2", *SETS])
    captured = capsys.readouterr()
    assert rc == 4, captured.out + captured.err  # its own code: 1 means only "not honest", 2 bad input
    assert "2 of 2 islands to train (2 at a time)" in captured.out
    assert "islands [1] failed" in captured.err
    assert captured.err.count("ddm: error:") == 1 and "rerun to retry only them" in captured.err  # one line
    table = captured.out[captured.out.index("island  status"):].splitlines()
    rows = {int(line.split()[0]): line.split()[1] for line in table[1:]}
    assert rows == {0: "finished", 1: "failed"}, captured.out
    assert "cannot open shard" in captured.out  # the failed island's last log line
    experts = mf.read_manifest(run)["experts"]
    assert experts["0"]["status"] == "finished" and experts["0"]["step"] == 16 and "1" not in experts
    sha0 = experts["0"]["sha256"]

    # Fix island 1's data; the rerun trains only island 1.
    hidden.rename(shard)
    rc = cli.main(["train-islands", "--run-dir", str(run), "--parallel", "2", *SETS])
    captured = capsys.readouterr()
    assert rc == 0, captured.out + captured.err
    assert "1 of 2 islands to train" in captured.out
    assert "island 1: started" in captured.out and "island 0: started" not in captured.out
    experts = mf.read_manifest(run)["experts"]
    assert experts["0"]["sha256"] == sha0
    assert experts["1"]["status"] == "finished" and experts["1"]["step"] == 16
    assert experts["0"]["sha256"] != experts["1"]["sha256"]
    assert (run / "experts" / "1" / "final").is_dir()

    # A third run has nothing to do.
    assert cli.main(["train-islands", "--run-dir", str(run), *SETS]) == 0
    assert "0 of 2 islands to train" in capsys.readouterr().out

    # The monolith baseline: same trainer on all shards, stored under RUN/monolith, recorded in the manifest.
    proc = subprocess.run([sys.executable, "-m", "ddm", "train-monolith", "--run-dir", str(run),
                           "--no-progress", *SETS], cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    manifest = mf.read_manifest(run)
    monolith = manifest["monolith"]
    assert monolith["status"] == "finished" and monolith["step"] == 16 and monolith["path"] == "monolith/final"
    assert (run / "monolith" / "final").is_dir() and (run / "monolith" / "metrics.jsonl").is_file()
    total = sum(c["count"] for c in manifest["clusters"])
    assert f"{total} images" in proc.stdout  # all shards, not one cluster
    assert monolith["sha256"] not in (experts["0"]["sha256"], experts["1"]["sha256"])
    assert manifest["experts"] == experts  # the islands' records are untouched


def test_ddm_run_exits_4_naming_the_islands_left_out(run, monkeypatch, capsys):
    """`ddm run` goes on without failed islands (router and samples from the others) and then exits with
    train-islands' code 4, naming them, not 0. The pipeline itself is stubbed: here no island finished."""
    from ddm.app import pipeline

    monkeypatch.setattr(pipeline, "run_all", lambda *args, **kwargs: {})  # the CLI imports it when `run` runs
    assert cli.main(["run", "--config", str(REPO / "configs" / "digits.yaml"), "--run-dir", str(run), *SETS]) == 4
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    expected = ("ddm: error: islands [0, 1] failed and were left out of the ensemble; see their train.log; "
                "rerun to retry only them")
    assert err == [expected], err

