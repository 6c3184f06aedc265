"""Open membership: islands that join a finished run (`ddm add-island`) and leave it (`ddm remove-island`).

The scenario of docs/membership.md at a tiny scale: digits prepared without the 9s (`data.exclude_classes`), an
island holding only the 9s joins, trains a few steps and is assembled; `prior --class 9` then draws every
sample from it, and no other file changed; after it leaves, `--class 9` is a one-line error again. Records made
with earlier memberships verify against the membership history while their weights exist. The experts train
2 steps: every check here is an identity that holds for any weights.
"""

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ddm.app.cli import main
from ddm.data import manifest as mf
from ddm.data import membership
from ddm.data.run import Run

REPO = Path(__file__).resolve().parents[1]
TINY = ["data.k=2", "expert.train.steps=2", "expert.train.batch_size=16", "expert.train.warmup_steps=1",
        "expert.train.checkpoint_every=2", "expert.train.log_every=2", "router.train.steps=2",
        "router.train.batch_size=16", "router.train.warmup_steps=1", "router.train.checkpoint_every=2",
        "router.train.log_every=2", "expert.train.holdout_loss=false", "router.train.holdout_loss=false",
        "sample.steps=2"]
ONLY_NINES = "data.exclude_classes=[0,1,2,3,4,5,6,7,8]"


def sets(overrides):
    return [arg for o in overrides for arg in ("--set", o)]


@pytest.fixture(scope="module")
def no_nines(tmp_path_factory) -> Path:
    """digits without the 9s, K=2, prepared once (tests copy it)."""
    path = tmp_path_factory.mktemp("membership") / "run"
    assert main(["prepare", "--config", str(REPO / "configs" / "digits.yaml"), "--run-dir", str(path),
                 *sets([*TINY, "data.exclude_classes=[9]"])]) == 0
    return path


def digests(root: Path, below=("experts", "islands", "shards", "clusters")) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for part in below for p in sorted((root / part).rglob("*")) if p.is_file()}


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ddm: error: "), err
    return err[0]


def sample(run: Path, tmp: Path, name: str, *args: str) -> int:
    return main(["sample", "--run-dir", str(run), "--n", "4", "--out", str(tmp / f"{name}.png"), *args])


def test_prepare_excludes_classes_but_keeps_them(no_nines):
    run = Run.open(no_nines)
    assert run.num_classes == 10 and run.class_names[9] == "9"
    assert all(c["class_counts"][9] == 0 for c in run.clusters) and run.dataset["num_images"] == 1797 - 180
    assert membership.history(run.manifest)[0]["change"] == "prepare"


def test_join_train_assemble_sample_then_leave(no_nines, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(no_nines, run_dir)
    for k in (0, 1):
        assert main(["train-expert", "--run-dir", str(run_dir), "--cluster", str(k), "--no-progress"]) == 0
    before = Run.open(run_dir)
    plan, ids = before.run_id, [before.membership_id]
    # no expert holds a 9: prior refuses in one line
    assert sample(run_dir, tmp_path, "none", "--strategy", "prior", "--class", "9") == 2
    assert "no available expert's cluster holds data of class 9" in error_line(capsys)
    assert sample(run_dir, tmp_path, "early", "--strategy", "prior", "--class", "3", "--record",
                  str(tmp_path / "early.json")) == 0
    # a router of the two-cluster membership (its weights are never loaded here: it goes stale at the join)
    before = before.record("router", None, {"status": "finished", "step": 2, "sha256": "0" * 64,
                                            "path": "router/final", "num_clusters": 2, "clusters": [0, 1]})
    ids.append(before.membership_id)
    files = digests(run_dir)

    assert main(["add-island", "--run-dir", str(run_dir), "--set", ONLY_NINES]) == 0
    joined = Run.open(run_dir)
    assert joined.num_clusters == 3 and joined.cluster(2)["class_counts"] == [0] * 9 + [162]
    assert joined.run_id == plan and joined.membership_id not in ids
    ids.append(joined.membership_id)
    assert {k: v for k, v in digests(run_dir).items() if k in files} == files  # nothing existing was rewritten
    assert main(["verify", str(tmp_path / "early.json"), "--run-dir", str(run_dir)]) == 0  # the record made before
    capsys.readouterr()
    assert sample(run_dir, tmp_path, "stale", "--strategy", "top1") == 2
    assert "router was trained without cluster 2, which joined later; run ddm train-router" in error_line(capsys)

    # the island trains as any other, and assemble admits it; nothing else changes
    assert main(["train-expert", "--run-dir", str(run_dir), "--cluster", "2", "--no-progress"]) == 0
    full = Run.open(run_dir)
    assert full.finished_experts() == [0, 1, 2] and full.run_id == plan and full.membership_id not in ids
    ids.append(full.membership_id)
    assert {k: v for k, v in digests(run_dir).items() if k in files} == files
    assert [full.expert(k)["sha256"] for k in (0, 1)] == [before.expert(k)["sha256"] for k in (0, 1)]
    assert sample(run_dir, tmp_path, "nines", "--strategy", "prior", "--class", "9", "--record",
                  str(tmp_path / "nines.json")) == 0
    assert (np.load(tmp_path / "nines.npz")["experts"] == 2).all()
    assert main(["train-router", "--run-dir", str(run_dir), "--no-progress"]) == 0  # the refresh: K+1 outputs
    assert sample(run_dir, tmp_path, "routed", "--strategy", "top1") == 0
    ids.append(Run.open(run_dir).membership_id)
    changes = [e["change"] for e in membership.history(Run.open(run_dir).manifest)]
    assert changes == ["prepare", "assemble 0", "assemble 1", "router", "join 2", "assemble 2", "router"]

    # leaving: --class 9 is a one-line error again; the record made with the 9s verifies while the weights exist
    capsys.readouterr()
    assert main(["remove-island", "--run-dir", str(run_dir), "--cluster", "2"]) == 0
    left = Run.open(run_dir)
    assert left.run_id == plan and left.membership_id not in ids and left.cluster_ids == [0, 1]
    assert sample(run_dir, tmp_path, "gone", "--strategy", "prior", "--class", "9") == 2
    assert "class 9" in error_line(capsys)
    assert sample(run_dir, tmp_path, "stale2", "--strategy", "top1") == 2
    assert "router was trained with cluster 2, which left the membership" in error_line(capsys)
    assert main(["verify", str(tmp_path / "nines.json"), "--run-dir", str(run_dir)]) == 0
    capsys.readouterr()
    assert main(["train-expert", "--run-dir", str(run_dir), "--cluster", "2", "--no-progress"]) == 2
    assert "cluster 2 was removed" in error_line(capsys)
    # expert 1 leaves with its files: the record that needs it fails in one line, naming it
    assert main(["remove-island", "--run-dir", str(run_dir), "--cluster", "1", "--delete"]) == 0
    assert not (run_dir / "experts" / "1").exists() and not (run_dir / "islands" / "1").exists()
    capsys.readouterr()
    assert main(["verify", str(tmp_path / "nines.json"), "--run-dir", str(run_dir)]) == 2
    assert "expert 1 (sha256" in error_line(capsys)


def test_add_island_refuses_data_that_contradicts_the_plan(no_nines, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(no_nines, run_dir)
    files, manifest = digests(run_dir), mf.manifest_path(run_dir).read_bytes()
    foreign = tmp_path / "letters.npz"
    np.savez(foreign, images=np.zeros((20, 8, 8, 1), np.uint8), labels=np.array(["a", "b"] * 10))
    unlabelled = tmp_path / "plain.npz"
    np.savez(unlabelled, images=np.zeros((20, 8, 8, 1), np.uint8))
    cases = [(["data.image_size=16"], "has images of shape [16, 16, 1], the plan's are [8, 8, 1]"),
             ([f"data.source={foreign}", "data.exclude_classes=[]"], "holds class 'a', which the plan does not have"),
             ([f"data.source={unlabelled}", "data.exclude_classes=[]"], "has no class labels, the plan is 10 classes"),
             (["expert.train.steps=3"], "add-island takes only the new data's settings")]
    for overrides, message in cases:
        assert main(["add-island", "--run-dir", str(run_dir), *sets(overrides)]) == 2
        assert message in error_line(capsys)
    assert digests(run_dir) == files and mf.manifest_path(run_dir).read_bytes() == manifest
    assert sorted(p.name for p in (run_dir / "islands").iterdir()) == ["0", "1"]


def test_membership_id_covers_joins_and_removals_and_plan_id_does_not(no_nines):
    manifest = mf.read_manifest(no_nines)
    plan, member = mf.plan_sha256(manifest), mf.manifest_sha256(manifest)
    joined = json.loads(json.dumps(manifest))
    joined["clusters"].append({**manifest["clusters"][1], "id": 2, "shard": "islands/2/shard", "bundle": "islands/2",
                               "joined": {"source": "x", "fingerprint": "0" * 64, "holdout": 10,
                                          "num_images": manifest["clusters"][1]["count"] + 10}})
    joined["clusters"][2].pop("share")
    mf.validate_manifest(joined, "test")
    assert mf.plan_sha256(joined) == plan and mf.manifest_sha256(joined) != member
    left = json.loads(json.dumps(joined))
    left["membership"] = {"removed": [2], "history": []}
    assert mf.plan_sha256(left) == plan and mf.manifest_sha256(left) not in (member, mf.manifest_sha256(joined))
    # a run that never changed members keeps its id without the history section (records made before it exist)
    bare = {k: v for k, v in manifest.items() if k != "membership"}
    assert mf.manifest_sha256(bare) == member
    # a manifest written before histories existed gets its old membership as the first entry on its next change
    membership.tracked(lambda m: m["clusters"].append(joined["clusters"][2]))(bare)
    assert [e["change"] for e in membership.history(bare)] == ["earlier", "join 2"]
    assert membership.history(bare)[0]["id"] == member
