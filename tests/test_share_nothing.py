"""Islands that share nothing: bundles, training from a bundle alone, `ddm assemble`, shard digests, the lease
on an expert's OUT, a stable run identity, preemption (SIGTERM), and the SLURM / Kubernetes launchers.

Training here uses the same tiny config as test_trainer.py / test_islands.py (16 steps, batch 16), so
in-process islands compile once and subprocess islands hit the session's compilation cache.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import child_env, fresh_run

from ddm.app import cli
from ddm.data import manifest as mf
from ddm.data import storage
from ddm.data.run import Run
from ddm.data.shards import ShardReader, read_labels, read_shard, write_shard
from ddm.experts import lease as lease_lib
from ddm.experts.train import train_island
from ddm.sampling.load import load_ensemble

REPO = Path(__file__).resolve().parents[1]
TRAIN = ["expert.train.steps=16", "expert.train.batch_size=16", "expert.train.checkpoint_every=4",
         "expert.train.log_every=2", "expert.train.warmup_steps=4"]
SETS = [a for s in TRAIN for a in ("--set", s)]
ROUTER = ["router.train.steps=8", "router.train.batch_size=16", "router.train.warmup_steps=2",
          "router.train.checkpoint_every=8", "router.train.log_every=4"]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _error(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ddm: error:")]
    assert len(lines) == 1, lines
    return lines[0]


# ---------------------------------------------------------------------------------------------------------
# The done-when test: two sites, the run directory out of reach, assemble, router, sample; refusals.
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_sites_train_from_bundles_alone_then_assemble_route_and_sample(tmp_path_factory, tmp_path, capsys):
    run = fresh_run(tmp_path_factory, "sites")
    sites = {k: tmp_path / f"site{k}" for k in (0, 1)}
    for k, site in sites.items():
        shutil.copytree(run / "islands" / str(k), site / "bundle")
    bundle_before = _snapshot(sites[0] / "bundle")

    away = run.with_name("run.unreachable")
    run.rename(away)  # nothing of the run directory can be read while the islands train
    env = child_env(tmp_path_factory)  # one device each, the session's compilation cache
    islands = [subprocess.Popen([sys.executable, "-m", "ddm", "train-expert", "--island", "bundle", "--out", "out",
                                 "--no-progress", *SETS], cwd=site, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for site in sites.values()]
    try:
        for proc in islands:
            out = proc.communicate(timeout=300)[0]
            assert proc.returncode == 0, out[-3000:]
    finally:
        for proc in islands:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    away.rename(run)

    # Each island wrote only its OUT: the bundle is untouched, OUT holds the weights and the expert record.
    assert _snapshot(sites[0] / "bundle") == bundle_before
    assert sorted(p.name for p in sites[0].iterdir()) == ["bundle", "out"]
    record = json.loads((sites[0] / "out" / "expert.json").read_text())
    assert record["cluster"] == 0 and record["step"] == 16 and record["run_id"] == Run.open(run).run_id
    assert not (sites[0] / "out" / "lease.json").exists()  # released
    assert not Run.open(run).finished_experts()  # islands never write the manifest

    # Refusals: each leaves the manifest byte for byte as it was and registers nothing.
    manifest_before = (run / "manifest.json").read_bytes()
    flipped = tmp_path / "flipped"
    shutil.copytree(sites[0] / "out", flipped)
    weights = max((p for p in (flipped / "final").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    cases = {"flipped byte": (flipped, "expert 0 checkpoint"), "other run": (None, "belongs to another run"),
             "other shard": (None, "trained on a shard with digest")}
    for name, (out, needle) in cases.items():
        if out is None:
            out = tmp_path / name.replace(" ", "_")
            shutil.copytree(sites[1] / "out", out)
            record = json.loads((out / "expert.json").read_text())
            record["run_id" if name == "other run" else "shard_sha256"] = "ab" * 32
            (out / "expert.json").write_text(json.dumps(record))
        rc = cli.main(["assemble", "--run-dir", str(run), str(sites[1] / "out"), str(out), *SETS])
        assert rc == 2, name
        assert needle in _error(capsys), name
        assert (run / "manifest.json").read_bytes() == manifest_before, name
    assert not (run / "experts" / "1").exists()  # nothing copied for the good expert either

    # Assemble both (copied into the run; with the islands' --set: the plan they trained), train the router, sample.
    assert cli.main(["assemble", "--run-dir", str(run), str(sites[0] / "out"), str(sites[1] / "out"), *SETS]) == 0
    assert "2 of 2 experts assembled" in capsys.readouterr().out
    experts = mf.read_manifest(run)["experts"]
    assert {k: (e["status"], e["step"], e["path"]) for k, e in experts.items()} == {
        "0": ("finished", 16, "experts/0/final"), "1": ("finished", 16, "experts/1/final")}
    identity = Run.open(run).sha256
    assert cli.main(["assemble", "--run-dir", str(run), str(sites[0] / "out"), *SETS]) == 0  # again: a no-op
    assert "already assembled" in capsys.readouterr().out
    assert Run.open(run).sha256 == identity and mf.read_manifest(run)["experts"] == experts

    assert cli.main(["train-router", "--run-dir", str(run), "--no-progress",
                     *[a for s in ROUTER for a in ("--set", s)]]) == 0
    out = tmp_path / "grid.png"
    assert cli.main(["sample", "--run-dir", str(run), "--n", "4", "--steps", "2", "--out", str(out)]) == 0
    images = np.load(out.with_suffix(".npz"))["images"]
    assert images.shape == (4, 8, 8, 1) and images.dtype == np.uint8 and images.std() > 0

    # The run's identity survives a move.
    moved = tmp_path / "moved"
    routed = Run.open(run).sha256
    run.rename(moved)
    assert Run.open(moved).sha256 == routed != identity  # the router's weights are part of it


# ---------------------------------------------------------------------------------------------------------
# Shard digests and cluster ids, checked on open.
# ---------------------------------------------------------------------------------------------------------


def test_shards_are_checked_against_their_digest_and_cluster(tmp_path_factory, capsys):
    run = fresh_run(tmp_path_factory, "digests")
    opened = Run.open(run)
    assert len(opened.shard_digests()) == 2 and all(len(d) == 64 for d in opened.shard_digests())
    ShardReader(opened.shard_paths(), batch_size=16, seed=0, digests=opened.shard_digests())  # honest: opens

    # The manifest points cluster 0 at a copy of cluster 1's shard (another path, so the manifest schema's
    # one-shard-per-cluster rule does not see it): refused on open, naming what the shard holds.
    shutil.copytree(run / "islands" / "1" / "shard", run / "stray_shard")
    mf.update_manifest(run, lambda m: m["clusters"][0].update(shard="stray_shard"))
    rc = cli.main(["train-router", "--run-dir", str(run), "--no-progress"])
    assert rc == 2 and "holds cluster 1, not cluster 0" in _error(capsys)
    mf.update_manifest(run, lambda m: m["clusters"][0].update(shard="islands/0/shard"))

    # One label changed in cluster 0's shard (its shard.json untouched): refused by every reader of it, and by
    # an island training from the bundle.
    shard = str(run / "islands" / "0" / "shard")
    images, labels = read_shard(shard), read_labels(shard)
    labels[0] = (labels[0] + 1) % 10
    info = (run / "islands" / "0" / "shard" / "shard.json").read_bytes()
    write_shard(shard, images, labels, 256)
    (run / "islands" / "0" / "shard" / "shard.json").write_bytes(info)
    rc = cli.main(["train-expert", "--island", str(run / "islands" / "0"), "--out", str(run / "elsewhere"),
                   "--no-progress", *SETS])
    assert rc == 2 and "does not match its digest" in _error(capsys)
    rc = cli.main(["train-router", "--run-dir", str(run), "--no-progress"])
    assert rc == 2 and "does not match its digest" in _error(capsys)


# ---------------------------------------------------------------------------------------------------------
# One trainer per OUT: a lease with a heartbeat.
# ---------------------------------------------------------------------------------------------------------


def _write_lease(out: Path, host: str, pid: int, age: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / lease_lib.LEASE).write_text(json.dumps({"host": host, "pid": pid, "holder": f"{host}:{pid}",
                                                   "heartbeat": time.time() - age}))


def test_a_second_trainer_of_the_same_out_is_refused_and_a_dead_holder_is_taken_over(tmp_path_factory, tmp_path,
                                                                                     capsys):
    import socket

    run = fresh_run(tmp_path_factory, "lease")
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_lease(out, socket.gethostname(), holder.pid, age=1.0)
        t0 = time.perf_counter()
        rc = cli.main(["train-expert", "--island", str(run / "islands" / "0"), "--out", str(out), "--no-progress",
                       *SETS])
        error = _error(capsys)
        assert rc == 2 and f"being trained by {socket.gethostname()}:{holder.pid}" in error, error
        assert time.perf_counter() - t0 < 30  # at once, before any compilation
        assert not (out / "checkpoints").exists()
    finally:
        holder.kill()
        holder.wait()

    # The holder died (SIGKILL, no release): its lease no longer blocks; nor does a silent one of another host.
    for host, pid, age in ((socket.gethostname(), holder.pid, 1.0), ("elsewhere", 1, lease_lib.STALE_S + 5)):
        _write_lease(out, host, pid, age)
        with lease_lib.Lease(out, heartbeat_s=0.05) as lease:
            time.sleep(0.2)
            held = lease_lib.read_lease(out)
            assert held["holder"] == lease.holder and time.time() - held["heartbeat"] < 1.0  # heartbeating
        assert not (out / lease_lib.LEASE).exists()
    # A live holder of another host with a fresh heartbeat is respected.
    _write_lease(out, "elsewhere", 1, age=1.0)
    with pytest.raises(Exception, match="being trained by elsewhere:1"):
        lease_lib.Lease(out).acquire()


# ---------------------------------------------------------------------------------------------------------
# A stable run identity.
# ---------------------------------------------------------------------------------------------------------


def test_run_identity_ignores_times_durations_paths_and_statuses():
    manifest = {"format": mf.FORMAT, "created": "2026-01-01T00:00:00", "dataset": {"fingerprint": "ab"},
                "clustering": {"k": 2}, "config": {"run_dir": "runs/a", "data": {"k": 2}},
                "clusters": [{"id": 0, "count": 3, "shard": "islands/0/shard", "bundle": "islands/0", "sha256": "c0"},
                             {"id": 1, "count": 4, "shard": "islands/1/shard", "bundle": "islands/1", "sha256": "c1"}],
                "experts": {"0": {"status": "finished", "step": 16, "sha256": "e0", "path": "experts/0/final",
                                  "seconds": 12.5, "hardware": {"host": "a"}}},
                "router": {"status": "finished", "step": 8, "sha256": "r", "path": "router/final", "seconds": 3.0}}
    identity, plan = mf.manifest_sha256(manifest), mf.plan_sha256(manifest)

    def changed(edit) -> dict:
        copy = json.loads(json.dumps(manifest))
        edit(copy)
        return copy

    same = [
        lambda m: m.update(created="2030-01-01T00:00:00"),
        lambda m: m["config"].update(run_dir="/elsewhere/run"),  # moved
        lambda m: m["experts"]["0"].update(seconds=99.0, hardware={"host": "b"}),  # trained again, same weights
        lambda m: m["experts"]["0"].update(path="experts/0/final2"),
        lambda m: m["clusters"][0].update(shard="gs://bucket/islands/0/shard"),
        lambda m: m["router"].update(seconds=1.0),
    ]
    for edit in same:
        assert mf.manifest_sha256(changed(edit)) == identity and mf.plan_sha256(changed(edit)) == plan
    different = [
        lambda m: m["experts"]["0"].update(sha256="e1"),
        lambda m: m["experts"].update({"1": {"sha256": "e2"}}),
        lambda m: m["router"].update(sha256="r2"),
        lambda m: m["clusters"][1].update(sha256="c2"),
        lambda m: m["config"]["data"].update(k=3),
    ]
    for edit in different:
        assert mf.manifest_sha256(changed(edit)) != identity
    assert mf.plan_sha256(changed(different[0])) == plan  # weights are not part of the plan


# ---------------------------------------------------------------------------------------------------------
# Preemption: SIGTERM checkpoints, exits PREEMPTED_EXIT, and the resumed run is bitwise the uninterrupted one.
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_checkpoints_exits_75_and_resumes_bitwise(tmp_path_factory, tmp_path):
    from ddm.train.preemption import PREEMPTED_EXIT

    run = fresh_run(tmp_path_factory, "sigterm")
    bundle, env = run / "islands" / "0", child_env(tmp_path_factory)

    def cmd(out: Path) -> list[str]:
        return [sys.executable, "-m", "ddm", "train-expert", "--island", str(bundle), "--out", str(out),
                "--no-progress", *SETS]

    log = tmp_path / "term.log"
    with open(log, "w") as handle:
        term = subprocess.Popen(cmd(tmp_path / "term"), env=env, cwd=REPO, stdout=handle, stderr=handle)
        ref = subprocess.Popen(cmd(tmp_path / "ref"), env=env, cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + 300
            # Mid-training: the first metrics row is written (step 2 of 16; the step is compiled).
            metrics = tmp_path / "term" / "metrics.jsonl"
            while not (metrics.exists() and metrics.read_text()) and term.poll() is None and time.monotonic() < deadline:
                time.sleep(0.005)
            term.send_signal(signal.SIGTERM)
            t0 = time.monotonic()
            term.wait(timeout=60)
            stopped_in = time.monotonic() - t0
            ref_out = ref.communicate(timeout=300)[0]
        finally:
            for p in (term, ref):
                if p.poll() is None:
                    p.kill()
                    p.wait()
    text = log.read_text()
    assert term.returncode != 0, f"finished before SIGTERM arrived:\n{text[-2000:]}"
    assert term.returncode == PREEMPTED_EXIT, text[-3000:]
    assert stopped_in < 60 and "stopped by SIGTERM after checkpointing step" in text
    assert ref.returncode == 0, ref_out[-3000:]
    saved = sorted(int(p.name) for p in (tmp_path / "term" / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and max(saved) < 16 and not (tmp_path / "term" / "expert.json").exists()
    assert not (tmp_path / "term" / "lease.json").exists()  # released on the way out

    resumed = subprocess.run(cmd(tmp_path / "term"), env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resumed from step {max(saved)}" in resumed.stdout
    final = json.loads((tmp_path / "term" / "expert.json").read_text())
    reference = json.loads((tmp_path / "ref" / "expert.json").read_text())
    assert final["ema_sha256"] == reference["ema_sha256"] and final["step"] == 16


# ---------------------------------------------------------------------------------------------------------
# Launchers: SLURM asks for a signal and requeues; Kubernetes gets an Indexed Job.
# ---------------------------------------------------------------------------------------------------------


def test_slurm_requeues_and_k8s_indexed_job_is_written(tmp_path_factory, capsys):
    run = fresh_run(tmp_path_factory, "launchers")
    assert cli.main(["train-islands", "--run-dir", str(run), "--launcher", "slurm", "--grace-seconds", "90"]) == 0
    script = (run / "slurm" / "islands.sbatch").read_text()
    assert "#SBATCH --signal=TERM@90" in script and "#SBATCH --requeue" in script
    assert "--no-assemble" in script and "if [ $rc -eq 75 ]; then scontrol requeue" in script

    assert cli.main(["train-islands", "--run-dir", str(run), "--launcher", "k8s"]) == 2
    assert "--image" in _error(capsys)
    assert cli.main(["train-islands", "--run-dir", str(run), "--launcher", "k8s", "--image", "ghcr.io/x/ddm:1",
                     "--bundles", "s3://bucket/run/islands", "--experts", "s3://bucket/experts", "--accelerator",
                     "tpu", "--accelerators", "4", "--tpu-type", "tpu-v5-lite-podslice", "--tpu-topology", "2x2",
                     "--grace-seconds", "90", *SETS]) == 0
    job = yaml.safe_load((run / "k8s" / "islands.yaml").read_text())
    spec = job["spec"]
    assert job["kind"] == "Job" and spec["completionMode"] == "Indexed" and spec["completions"] == 2
    pod = spec["template"]["spec"]
    container = pod["containers"][0]
    command = container["command"]
    assert command[:2] == ["ddm", "train-expert"]
    assert command[command.index("--island") + 1] == "s3://bucket/run/islands/$(JOB_COMPLETION_INDEX)"
    assert command[command.index("--out") + 1] == "s3://bucket/experts/$(JOB_COMPLETION_INDEX)"
    assert "expert.train.steps=16" in command
    assert container["resources"]["limits"] == {"google.com/tpu": 4}
    assert pod["nodeSelector"]["cloud.google.com/gke-tpu-topology"] == "2x2"
    assert pod["terminationGracePeriodSeconds"] == 90 and pod["restartPolicy"] == "Never"
    assert spec["podFailurePolicy"]["rules"][0]["onExitCodes"]["values"] == [75]
    assert not Run.open(run).finished_experts()



# ---------------------------------------------------------------------------------------------------------
# A bundle in an S3 bucket (a local S3-compatible server: moto in server mode).
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def s3_bucket(monkeypatch, tmp_path):
    """A bucket on a moto server this test starts on 127.0.0.1; the AWS variables point ddm (and children) at it."""
    import socket

    pytest.importorskip("moto.server", reason="moto[server] is not installed (pip install -e '.[test]')")
    boto3 = pytest.importorskip("boto3")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = open(tmp_path / "moto.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.skip(f"the local S3 server (moto) did not start: {(tmp_path / 'moto.log').read_text()[-300:]}")
                time.sleep(0.2)
        for key, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                           "AWS_REGION": "us-east-1"}.items():
            monkeypatch.setenv(key, value)
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="ddm-islands")
        yield "s3://ddm-islands"
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


@pytest.mark.slow
def test_an_island_trains_from_a_bucket_into_the_bucket_resumes_there_and_assembles_from_it(
        s3_bucket, tmp_path_factory, tmp_path, capsys):
    run = fresh_run(tmp_path_factory, "bucket")
    islands = f"{s3_bucket}/m/islands"
    # `prepare --islands-to`: the run is already prepared (nothing redone); its bundles go to the bucket.
    assert cli.main(["prepare", "--config", str(REPO / "configs" / "digits.yaml"), "--run-dir", str(run),
                     "--set", "data.k=2", "--islands-to", islands]) == 0
    for k in (0, 1):
        assert storage.list_files(f"{islands}/{k}") == storage.list_files(run / "islands" / str(k))

    # A changed label in the bucket's copy of shard 1 is refused before training.
    shard = f"{islands}/1/shard"
    labels = read_labels(shard)
    labels[3] = (labels[3] + 1) % 10
    write_shard(shard, read_shard(shard), labels, 256)
    rc = cli.main(["train-expert", "--island", f"{islands}/1", "--out", str(tmp_path / "x"), *SETS])
    assert rc == 2 and "does not match its digest" in _error(capsys)

    # Island 0 trains from the bucket into the bucket (its own process): checkpoints, metrics, final/ and
    # expert.json land there, the lease is gone, and nothing is left on the island's disk.
    out = f"{s3_bucket}/m/out/0"
    island_tmp = tmp_path / "island-tmp"
    island_tmp.mkdir()
    proc = subprocess.run([sys.executable, "-m", "ddm", "train-expert", "--island", f"{islands}/0", "--out", out,
                           "--no-progress", *SETS], cwd=tmp_path, env={
                               **child_env(tmp_path_factory), "TMPDIR": str(island_tmp),
                               **{k: os.environ[k] for k in os.environ if k.startswith("AWS_")}},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = storage.list_files(out)
    assert {"expert.json", "metrics.jsonl", "loss.png"} <= set(files) and "lease.json" not in files
    assert any(f.startswith("final/") for f in files)
    assert sorted({int(f.split("/")[1]) for f in files if f.startswith("checkpoints/")}) == [12, 16]  # keep 2
    assert not any(island_tmp.iterdir())  # the working copy is removed
    record = json.loads(storage.read_bytes(f"{out}/expert.json"))
    assert record["cluster"] == 0 and record["step"] == 16

    # Killed after its last checkpoint reached the bucket, before its results did: the next start (another
    # machine: nothing local) pulls the bucket's step 16 and writes the same weights without a training step.
    for name in ["expert.json", *(f for f in files if f.startswith("final/"))]:
        storage.delete(f"{out}/{name}")
    result = train_island(f"{islands}/0", out, TRAIN)
    assert result.resumed_from == 16 and result.ema_sha256 == record["ema_sha256"]
    assert json.loads(storage.read_bytes(f"{out}/expert.json"))["ema_sha256"] == record["ema_sha256"]
    assert [f for f in storage.list_files(out) if not f.startswith("final/")] == [
        f for f in files if not f.startswith("final/")]

    # Assemble from the bucket: a flipped weight byte there is refused (manifest unchanged, nothing staged
    # left in the run); the intact expert is checked, copied into the run and samples with the other masked.
    manifest_before = (run / "manifest.json").read_bytes()
    weights = max((f for f in storage.list_files(out) if f.startswith("final/")), key=lambda f: len(storage.read_bytes(f"{out}/{f}")))
    data = bytearray(storage.read_bytes(f"{out}/{weights}"))
    data[len(data) // 2] ^= 0x01
    storage.write_bytes(f"{out}/{weights}", bytes(data))
    assert cli.main(["assemble", "--run-dir", str(run), out, *SETS]) == 2
    assert "expert 0 checkpoint" in _error(capsys) and (run / "manifest.json").read_bytes() == manifest_before
    assert not list(run.glob(".incoming-*")) and not (run / "experts" / "0").exists()
    data[len(data) // 2] ^= 0x01
    storage.write_bytes(f"{out}/{weights}", bytes(data))
    assert cli.main(["assemble", "--run-dir", str(run), out, *SETS]) == 0
    assert Run.open(run).finished_experts() == [0] and not list(run.glob(".incoming-*"))
    assert (run / "experts" / "0" / "expert.json").read_bytes() == storage.read_bytes(f"{out}/expert.json")

    # The sampling path loads it (pin checked) with expert 1 masked. Running the sampler too would add ~8 s
    # (compiling it); the two-sites test samples experts registered the same way.
    with pytest.warns(UserWarning, match=r"experts \[1\] of 2 are missing"):
        assert load_ensemble(Run.open(run), with_router=False).available == [True, False]
