"""Trust between strangers, the smaller cases (issue 30): each was a silent wrong behaviour (exit 0, a file
overwritten, an orphaned process) and is now a one-line refusal (exit 2) or a fixed behaviour.

Most run on a prepared, untrained run (`helpers.fresh_run`): each refusal comes before any model loads. The
sampling cases use the session's `trained_run`; the signal cases run real `ddm` processes (the local launcher
with stand-in islands, then real islands that checkpoint and resume).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from helpers import child_env, fresh_run, process_alive
from oracles.badinput import refusing_folder

from ddm.app import cli
from ddm.app.sample import default_out
from ddm.data import manifest as mf
from ddm.sampling.request import Request, generate, warn_topk
from ddm.train.preemption import PREEMPTED_EXIT
from ddm.verify.limits import VerifyLimits

REPO = Path(__file__).resolve().parents[1]
DIGITS = str(REPO / "configs" / "digits.yaml")


def _error(capsys) -> str:
    """The command's one `ddm: error:` line (and nothing else on stderr)."""
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("ddm: error: "), lines
    return lines[0]


@pytest.fixture
def run(tmp_path_factory) -> Path:
    return fresh_run(tmp_path_factory, "robust")


# ---------------------------------------------------------------------------------------------------------
# Launchers: what the user types cannot add a line to the SLURM script or the Kubernetes manifest.
# ---------------------------------------------------------------------------------------------------------


def test_a_newline_in_partition_or_a_run_dir_sbatch_cannot_carry_is_refused(run, tmp_path, capsys):
    injected = "gpu\necho owned > /tmp/owned"
    assert cli.main(["train-islands", "--run-dir", str(run), "--launcher", "slurm", "--partition", injected]) == 2
    assert "--partition 'gpu\\necho owned" in _error(capsys)
    assert not (run / "slurm").exists()

    spaced = tmp_path / "my run"
    spaced.symlink_to(run, target_is_directory=True)  # #SBATCH --output would split at the space
    assert cli.main(["train-islands", "--run-dir", str(spaced), "--launcher", "slurm"]) == 2
    assert "which an #SBATCH line cannot carry" in _error(capsys)
    assert not (run / "slurm").exists()

    assert cli.main(["train-islands", "--run-dir", str(run), "--launcher", "slurm", "--partition", "gpu,debug",
                     "--set", "expert.train.steps=7"]) == 0
    lines = (run / "slurm" / "islands.sbatch").read_text().splitlines()
    assert "#SBATCH --partition=gpu,debug" in lines and not any("owned" in line for line in lines)


@pytest.mark.parametrize("argv, says", [
    (("--image", "ghcr.io/x/ddm:1", "--experts", "s3://b/e\nspec: {}"),
     "--experts 's3://b/e\\nspec: {}' holds a control"),
    (("--image", "ghcr.io/x/ddm:1", "--bundles", "s3://b/i\r"), "--bundles"),
    (("--image", "ghcr.io/x/ddm:1 --privileged"), "must be a container image reference"),
    (("--image", "ghcr.io/x/ddm:1", "--accelerator", "tpu", "--tpu-type", "v5e\nx: y"), "Kubernetes label value"),
    (("--image", "ghcr.io/x/ddm:1", "--set", "expert.train.steps=4\n# x"), "--set"),
])
def test_unsafe_k8s_fields_are_refused(run, capsys, argv, says):
    assert cli.main(["train-islands", "--run-dir", str(run), "--launcher", "k8s", *argv]) == 2
    assert says in _error(capsys)
    assert not (run / "k8s").exists()


def test_the_k8s_job_lists_only_unfinished_islands(run, tmp_path, capsys):
    def finish(m):  # island 0 assembled (the launcher reads nothing but the manifest's entry)
        m["experts"]["0"] = {"status": "finished", "step": 10**6, "sha256": "0" * 64, "path": "experts/0/final"}

    mf.update_manifest(run, finish)
    assert cli.main(["train-islands", "--run-dir", str(run), "--launcher", "k8s", "--image", "ghcr.io/x/ddm:1",
                     "--bundles", "s3://bucket/my islands", "--parallel", "5", "--set", "expert.train.steps=7"]) == 0
    spec = yaml.safe_load((run / "k8s" / "islands.yaml").read_text())["spec"]
    assert spec["completions"] == 1 and spec["parallelism"] == 1
    command = spec["template"]["spec"]["containers"][0]["command"]
    assert command[:2] == ["sh", "-c"]
    # Run the pod's line with a stand-in `ddm`: index 0 must train island 1, with every argument intact.
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "ddm").write_text("#!/bin/sh\nfor a in \"$@\"; do echo \"$a\"; done\n")
    (fake / "ddm").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "JOB_COMPLETION_INDEX": "0"}
    argv = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout.splitlines()
    assert argv == ["train-expert", "--island", "s3://bucket/my islands/1", "--out", f"{run.absolute()}/experts/1",
                    "--no-progress", "--set", "expert.train.steps=7"]

    mf.update_manifest(run, lambda m: m["experts"].update({"1": m["experts"]["0"]}))
    assert cli.main(["train-islands", "--run-dir", str(run), "--launcher", "k8s", "--image", "x"]) == 2
    assert "nothing to launch" in _error(capsys)


# ---------------------------------------------------------------------------------------------------------
# Checked before the work, not after it.
# ---------------------------------------------------------------------------------------------------------


def test_islands_to_an_unwritable_place_is_refused_before_preparing(tmp_path, capsys):
    below_file = tmp_path / "plain.txt"
    below_file.write_text("x")
    locked = refusing_folder(tmp_path)  # a chmod-0500 folder, or /sys as root
    for target in [below_file / "bundles", *([] if locked is None else [locked / "bundles"])]:
        run_dir = tmp_path / "run"
        t0 = time.perf_counter()
        assert cli.main(["prepare", "--config", DIGITS, "--run-dir", str(run_dir), "--set", "data.k=2",
                         "--islands-to", str(target)]) == 2
        assert "--islands-to" in _error(capsys)
        assert not run_dir.exists() and time.perf_counter() - t0 < 5  # nothing prepared: no data loaded


def test_cfg_scale_beyond_what_verify_accepts_is_refused(run, tmp_path, capsys):
    bound = VerifyLimits.max_cfg_scale
    for argv in (("--cfg-scale", "1e300"), ("--cfg-scale", str(bound * 1.5)), ("--set", "sample.cfg_scale=1e300")):
        assert cli.main(["sample", "--run-dir", str(run), "--class", "3", "--out", str(tmp_path / "s.png"), *argv]) == 2
        assert "the largest guidance scale ddm verify accepts" in _error(capsys)
        assert not (tmp_path / "s.png").exists()
    fresh = tmp_path / "fresh"
    assert cli.main(["run", "--config", DIGITS, "--run-dir", str(fresh), "--set", "sample.cfg_scale=1e300"]) == 2
    assert "sample.cfg_scale=1e+300 is beyond" in _error(capsys)
    assert not fresh.exists()


def test_info_with_two_different_run_dirs_is_refused(run, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    assert cli.main(["info", str(run), "--run-dir", str(other)]) == 2
    assert "two run directories" in _error(capsys)
    assert cli.main(["info", str(run), "--run-dir", str(run) + "/"]) == 0  # the same one twice is one
    assert "manifest" in capsys.readouterr().out


def test_a_refused_consensus_eval_leaves_no_consensus_work(run, tmp_path, capsys):
    assert cli.main(["consensus-eval", "--run-dir", str(run)]) == 2  # no expert is trained
    assert "is trained yet" in _error(capsys)
    assert not (run / "eval").exists()
    kept = tmp_path / "kept"
    (kept / "consensus_work").mkdir(parents=True)
    (kept / "consensus_work" / "earlier.json").write_text("{}")
    assert cli.main(["consensus-eval", "--run-dir", str(run), "--out", str(kept)]) == 2
    _error(capsys)
    assert (kept / "consensus_work" / "earlier.json").exists()  # only what the refused run made goes


# ---------------------------------------------------------------------------------------------------------
# Sampling: a default --out of its own, and a word when top-k asks for more experts than there are.
# ---------------------------------------------------------------------------------------------------------


def test_sample_without_out_never_overwrites_another_commands_output(trained_run_copy, capsys):
    samples = trained_run_copy / "samples"
    samples.mkdir(exist_ok=True)
    grid = samples / "sample.png"  # what `ddm run` writes for its `sample` strategy
    grid.write_bytes(b"ddm run's grid")
    argv = ["sample", "--run-dir", str(trained_run_copy), "--n", "2", "--steps", "2", "--seed", "5"]
    assert cli.main([*argv, "--strategy", "sample"]) == 0
    assert cli.main([*argv, "--strategy", "sample"]) == 0
    capsys.readouterr()
    assert grid.read_bytes() == b"ddm run's grid"
    made = sorted(p.name for p in samples.iterdir() if p.name != "sample.png")
    assert made == ["sample-sample-seed5-n2-2.npz", "sample-sample-seed5-n2-2.png", "sample-sample-seed5-n2.npz",
                    "sample-sample-seed5-n2.png"]
    request = Request(seed=0, n=4, strategy="top1+full:0.5", labels=(1, 1, 2, 2))
    assert default_out(samples, request).name == "sample-top1+full_0.5-seed0-n4-guided.png"
    assert default_out(samples, request, "monolith").name == "sample-monolith-seed0-n4-guided.png"


def test_topk_beyond_the_available_experts_warns(trained_run_copy, capsys):
    argv = ["sample", "--run-dir", str(trained_run_copy), "--n", "2", "--steps", "2"]
    assert cli.main([*argv, "--strategy", "topk:9"]) == 0  # K = 3
    assert "strategy topk:9 keeps 9 experts, but only 3 are available" in capsys.readouterr().err
    assert cli.main([*argv, "--strategy", "top2"]) == 0
    assert "are available" not in capsys.readouterr().err


def test_warn_topk_counts_the_available_experts_not_k(caplog):
    class Stub:  # what generate needs of an ensemble: its conditioning, which experts are present, a sampler
        num_classes, condition_shape, available = 0, (), [True, False, True, True]

        def sample(self, *args, **kwargs):
            return "sampled"

    with caplog.at_level(logging.WARNING, logger="ddm"):
        assert generate(Stub(), Request(n=1, strategy="topk:4")) == "sampled"  # 4 experts, 3 available
        assert "only 3 are available" in caplog.text
    assert warn_topk("top3", 3) is False and warn_topk("top1+full:0.5", 1) is False
    assert warn_topk("topk:2+full:0.5", 1) is True and warn_topk("full", 1) is False


# ---------------------------------------------------------------------------------------------------------
# Signals: the local launcher passes SIGTERM / SIGINT on, waits for its islands, and exits 75.
# ---------------------------------------------------------------------------------------------------------

# A stand-in island: writes its pid, and on SIGTERM / SIGINT writes which one and exits PREEMPTED_EXIT.
STAND_IN = textwrap.dedent("""
    import os, pathlib, signal, sys, time
    out = pathlib.Path(sys.argv[1])
    def stop(signum, frame):
        (out / "stopped").write_text(signal.Signals(signum).name)
        sys.exit(75)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pid").write_text(str(os.getpid()))
    while True:
        time.sleep(0.05)
""")
LAUNCH = textwrap.dedent("""
    import sys
    from ddm.experts import islands
    islands.island_command = lambda bundle, out, overrides: [sys.executable, "-c", sys.argv[1], str(out)]
    from ddm.app import cli
    sys.exit(cli.main(sys.argv[2:]))
""")


def _stop_when(proc: subprocess.Popen, ready, sig: signal.Signals, timeout: float = 300) -> float:
    """Sends `sig` to `proc` once `ready()` holds; the seconds `proc` then took to exit."""
    deadline = time.monotonic() + timeout
    while not ready() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the command ended before the signal"
    proc.send_signal(sig)
    t0 = time.monotonic()
    proc.wait(timeout=120)
    return time.monotonic() - t0


def test_sigint_to_ddm_run_reaches_every_island_and_exits_75(run, tmp_path_factory):
    """`ddm run` (prepared already, so straight to the islands) with stand-in islands that only wait."""
    pids = [run / "experts" / str(k) / "pid" for k in (0, 1)]
    proc = subprocess.Popen([sys.executable, "-c", LAUNCH, STAND_IN, "run", "--config", DIGITS, "--run-dir", str(run),
                             "--set", "data.k=2", "--parallel", "2"], cwd=REPO, env=child_env(tmp_path_factory),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _stop_when(proc, lambda: all(p.exists() and p.read_text() for p in pids), signal.SIGINT, timeout=120)
        out, err = proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in pids:
            if p.exists() and process_alive(int(p.read_text())):
                os.kill(int(p.read_text()), signal.SIGKILL)
    assert proc.returncode == PREEMPTED_EXIT, out[-2000:] + err[-2000:]
    assert [(run / "experts" / str(k) / "stopped").read_text() for k in (0, 1)] == ["SIGINT", "SIGINT"]
    assert not any(process_alive(int(p.read_text())) for p in pids)
    assert err.strip().splitlines()[-1] == ("ddm: train-islands: stopped by SIGINT; islands [0, 1] stopped too, at "
                                            "their last checkpoints; rerun to resume")


@pytest.mark.slow
def test_sigterm_to_train_islands_checkpoints_every_island_exits_75_and_a_rerun_resumes(run, tmp_path_factory):
    sets = [a for s in ("expert.train.steps=32", "expert.train.batch_size=16", "expert.train.checkpoint_every=8",
                        "expert.train.log_every=2", "expert.train.warmup_steps=4") for a in ("--set", s)]
    argv = [sys.executable, "-m", "ddm", "train-islands", "--run-dir", str(run), "--parallel", "2", *sets]
    env = child_env(tmp_path_factory)
    metrics = [run / "experts" / str(k) / "metrics.jsonl" for k in (0, 1)]
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:  # mid-training: an island has logged its first step
        stopped_in = _stop_when(proc, lambda: any(p.exists() and p.read_text() for p in metrics), signal.SIGTERM)
        out, err = proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
    pids = [int(line.split("(pid ")[1].rstrip(")")) for line in out.splitlines() if "started (pid" in line]
    assert proc.returncode == PREEMPTED_EXIT, out[-3000:] + err[-3000:]
    assert len(pids) == 2 and not any(process_alive(p) for p in pids), pids  # no island outlives the launcher
    assert stopped_in < 90 and "ddm: train-islands: stopped by SIGTERM" in err
    saved = {k: sorted(int(p.name) for p in (run / "experts" / str(k) / "checkpoints").glob("[0-9]*"))
             for k in (0, 1) if (run / "experts" / str(k) / "checkpoints").is_dir()}
    assert any(saved.values()), out
    assert not mf.read_manifest(run)["experts"]

    rerun = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    experts = mf.read_manifest(run)["experts"]
    assert all(experts[str(k)]["status"] == "finished" and experts[str(k)]["step"] == 32 for k in (0, 1))
    for k, steps in saved.items():
        if steps:
            log = (run / "experts" / str(k) / "train.log").read_text()
            assert f"resumed from step {steps[-1]}" in log, log[-2000:]
    assert json.loads((run / "experts" / "0" / "expert.json").read_text())["step"] == 32
