"""The path layer under bundles and expert outputs (`ddm.data.storage`), the working copy that mirrors a job's
output to a URL (`ddm.data.mirror`) and the lease's compare-and-swap. Local folders stand in for the bucket
here (the same kvstore calls); tests/test_share_nothing.py runs the real thing against a local S3 server."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from ddm.core.errors import DDMError
from ddm.data import storage
from ddm.data.mirror import Mirror
from ddm.experts import lease as lease_lib


def test_write_if_is_a_compare_and_swap_and_writes_are_whole(tmp_path):
    path = tmp_path / "a" / "record.json"
    assert storage.read_versioned(path)[0] is None
    first = storage.write_if(path, "one", storage.read_versioned(path)[1])
    assert first is not None and storage.read_bytes(path) == b"one"
    assert storage.write_if(path, "again", storage.read_versioned(tmp_path / "a" / "missing")[1]) is None  # exists
    second = storage.write_if(path, "two", first)
    assert second is not None and storage.write_if(path, "three", first) is None  # first is no longer current
    assert storage.read_bytes(path) == b"two"
    assert storage.write_if(path, None, second) is not None and not path.exists()  # conditional delete
    storage.write_bytes(path, "whole")
    assert sorted(p.name for p in path.parent.iterdir()) == ["record.json"]  # no temporary left behind


def test_mirror_pulls_intact_steps_pushes_changes_and_deletes_what_the_job_deleted(tmp_path):
    bucket = tmp_path / "bucket"
    intact = {"checkpoints/4/state/data": b"s4", "checkpoints/4/ddm_digest.json": b"d4",
              "metrics.jsonl": b'{"step": 4}\n', "lease.json": b"held"}
    torn = {"checkpoints/8/state/data": b"s8"}  # its upload was cut short before the digest
    for rel, data in {**intact, **torn}.items():
        storage.write_bytes(bucket / rel, data)

    with Mirror(str(bucket), skip=("lease.json",), every_s=3600) as work:
        assert storage.list_files(work) == ["checkpoints/4/ddm_digest.json", "checkpoints/4/state/data",
                                            "metrics.jsonl"]
        # The job: a new committed step, an uncommitted one, a staged file, step 4 dropped by retention.
        for rel in ("checkpoints/8/state/data", "checkpoints/8/ddm_digest.json",
                    "checkpoints/12.orbax-checkpoint-tmp-1/state/data", "metrics.jsonl.ddm-tmp7"):
            (work / rel).parent.mkdir(parents=True, exist_ok=True)
            (work / rel).write_bytes(b"new " + rel.encode())
        (work / "metrics.jsonl").write_bytes(b'{"step": 4}\n{"step": 8}\n')
        for name in ("ddm_digest.json", "state/data"):
            (work / "checkpoints" / "4" / name).unlink()
    assert not work.exists()  # the working copy is gone once pushed
    assert storage.list_files(bucket) == ["checkpoints/8/ddm_digest.json", "checkpoints/8/state/data", "lease.json",
                                          "metrics.jsonl"]
    assert storage.read_bytes(bucket / "checkpoints/8/state/data") == b"new checkpoints/8/state/data"
    assert storage.read_bytes(bucket / "metrics.jsonl") == b'{"step": 4}\n{"step": 8}\n'
    assert storage.read_bytes(bucket / "lease.json") == b"held"  # never the mirror's to touch


def test_a_job_that_fails_or_is_preempted_still_pushes_what_it_wrote(tmp_path):
    bucket = tmp_path / "bucket"
    with pytest.raises(KeyboardInterrupt), Mirror(str(bucket), every_s=3600) as work:
        (work / "checkpoints" / "4").mkdir(parents=True)
        (work / "checkpoints" / "4" / "ddm_digest.json").write_text("{}")
        raise KeyboardInterrupt  # e.g. `Preempted` after the trainer's last checkpoint
    assert storage.list_files(bucket) == ["checkpoints/4/ddm_digest.json"] and not work.exists()


def test_a_stale_lease_taken_over_by_someone_else_first_is_not_taken_twice(tmp_path, monkeypatch):
    out = tmp_path / "out"
    path = out / lease_lib.LEASE
    storage.write_bytes(path, json.dumps({"host": "elsewhere", "pid": 1, "holder": "elsewhere:1",
                                          "heartbeat": time.time() - lease_lib.STALE_S - 5}))
    judged = storage.read_versioned(path)  # what this trainer reads and judges stale ...
    storage.write_bytes(path, json.dumps({"host": "winner", "pid": 2, "holder": "winner:2", "heartbeat": time.time()}))
    monkeypatch.setattr(storage, "read_versioned", lambda p: judged)  # ... before another took it over
    with pytest.raises(DDMError, match="being trained by winner:2"):
        lease_lib.Lease(out).acquire()
    monkeypatch.undo()
    assert lease_lib.read_lease(out)["holder"] == "winner:2"


def test_a_lease_lost_to_a_takeover_is_not_overwritten_by_its_heartbeat(tmp_path):
    out = tmp_path / "out"
    with lease_lib.Lease(out, heartbeat_s=0.05) as lease:
        storage.write_bytes(out / lease_lib.LEASE, json.dumps({"holder": "other:9", "heartbeat": time.time()}))
        time.sleep(0.3)
        assert lease_lib.read_lease(out)["holder"] == "other:9"
    assert lease_lib.read_lease(out)["holder"] == "other:9"  # release removes only its own lease
    assert lease.holder != "other:9"


def test_path_helpers_name_local_paths_and_urls_alike():
    assert storage.join("s3://b/run/", "islands", "0") == "s3://b/run/islands/0"
    assert storage.join("/r", "islands", "0") == str(Path("/r/islands/0"))
    assert storage.is_url("gs://b/x") and not storage.is_url("file:///x") and not storage.is_url("/x")


def test_a_multi_process_island_is_refused_a_bucket_out(monkeypatch):
    import jax

    from ddm.experts import train

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(DDMError, match="single-process islands only"):
        train._working_folder("s3://bucket/out/0")
    with train._working_folder("/tmp/out/0") as work:  # a shared folder is written in place, as before
        assert work == Path("/tmp/out/0")
