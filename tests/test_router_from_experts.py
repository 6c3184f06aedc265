"""A router trained on images the experts draw (`ddm train-router --source experts`): no shard is read."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from ddm.app.cli import main
from ddm.core.errors import DDMError
from ddm.data.run import Run
from ddm.router.synthetic import ArrayReader, TrainingSet, allocate
from ddm.sampling.load import load_ensemble
from ddm.sampling.router_set import CHUNK_ROWS, draw_router_set, plan_rows, request_seed

SMALL = ["--set", "router.expert_samples=8", "--set", "router.expert_steps=2", "--set", "router.train.steps=20",
         "--no-progress"]
SMALL_SET = ["router.expert_samples=8", "router.expert_steps=2"]


def test_allocate_follows_the_counts():
    counts = np.array([[5, 0, 3], [2, 2, 0]])
    rows = allocate(counts, 25)
    assert rows.shape == (2, 3) and rows.sum() == 25
    assert (rows[counts == 0] == 0).all()  # a class a cluster never saw is never drawn for it
    assert np.abs(rows - counts * 25 / counts.sum()).max() < 1
    np.testing.assert_array_equal(allocate(np.array([1, 1, 1]), 4), [2, 1, 1])  # ties go to the lower index
    with pytest.raises(DDMError, match="all 0"):
        allocate(np.zeros(3), 4)


def test_array_reader_reads_every_row_once_per_epoch():
    n = 10
    data = TrainingSet(np.arange(n, dtype=np.uint8).reshape(n, 1, 1, 1), np.arange(n, dtype=np.int32) % 3,
                       np.full(n, -1, np.int32), {})
    reader = ArrayReader(data, batch_size=4, seed=1)
    rows = np.concatenate([reader.batch(s).images.ravel() for s in range(5)])  # 20 rows: two epochs
    assert sorted(rows[:10]) == list(range(n)) and sorted(rows[10:]) == list(range(n))
    assert not np.array_equal(rows[:10], rows[10:])  # each epoch its own order
    batch = reader.batch(3)
    np.testing.assert_array_equal(batch.clusters, batch.images.ravel() % 3)  # targets travel with their rows
    halves = [ArrayReader(data, batch_size=4, seed=1, process_index=p, process_count=2).batch(3) for p in (0, 1)]
    np.testing.assert_array_equal(np.concatenate([h.images for h in halves]), batch.images)


def test_expert_set_is_deterministic_and_labelled_by_its_expert(trained_run):
    run = Run.open(trained_run, SMALL_SET)
    ensemble = load_ensemble(run, with_router=False)
    first, again = draw_router_set(run, ensemble), draw_router_set(run, ensemble)
    assert first.sha256 == again.sha256
    np.testing.assert_array_equal(first.images, again.images)
    rows = plan_rows(run)  # [K, C]: 8 x K in all, in proportion to the manifest's class counts
    assert rows.sum() == 8 * run.num_clusters and first.images.shape == (rows.sum(), *run.image_shape)
    for i, k in enumerate(run.cluster_ids):
        mine = first.clusters == k
        np.testing.assert_array_equal(np.bincount(first.classes[mine], minlength=run.num_classes), rows[i])
    # Each row is what its cluster's expert draws alone for its class: the label is the generating expert.
    k = run.cluster_ids[1]
    mine = first.clusters == k
    alone = ensemble.replace(min_bucket=CHUNK_ROWS).sample(
        int(mine.sum()), "single:1", steps=2, solver="heun", seed=request_seed(run.config.router.train.seed, k),
        y=first.classes[mine])
    np.testing.assert_array_equal(run.codec.decode(alone.x), first.images[mine])
    other = draw_router_set(Run.open(trained_run, [*SMALL_SET, "router.train.seed=1"]), ensemble)
    assert other.sha256 != first.sha256


def test_router_trains_from_experts_without_any_shard(trained_run_copy, capsys):
    run_dir = trained_run_copy
    router_dir = run_dir / "router"
    data_sha = Run.open(run_dir).component("router")["sha256"]
    # The data router's checkpoints are never continued on expert samples: refused, nothing touched.
    assert main(["train-router", "--run-dir", str(run_dir), "--source", "experts", *SMALL]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "trained on the shards" in err
    assert Run.open(run_dir).component("router")["sha256"] == data_sha
    # The coordinator holds the experts and the manifest's counts, no image: every shard and bundle goes.
    shutil.rmtree(router_dir)
    shutil.rmtree(run_dir / "shards")
    shutil.rmtree(run_dir / "islands")
    assert main(["train-router", "--run-dir", str(run_dir), "--source", "experts", *SMALL]) == 0
    run = Run.open(run_dir)
    entry = run.component("router")
    assert entry["status"] == "finished" and entry["source"] == "experts" and entry["sha256"] != data_sha
    made = entry["training_set"]
    assert made["num_images"] == 8 * run.num_clusters and len(made["sha256"]) == 64
    assert made["experts"] == {str(k): run.expert(k)["sha256"] for k in run.cluster_ids}
    assert json.loads((router_dir / "source.json").read_text()) == {"source": "experts", "sha256": made["sha256"]}
    capsys.readouterr()
    assert main(["info", "--run-dir", str(run_dir)]) == 0
    assert f"trained on {made['num_images']} expert samples (set sha256 {made['sha256'][:12]})" in capsys.readouterr().out
    # Drawn again, the set has the digest the manifest records.
    assert draw_router_set(Run.open(run_dir, SMALL_SET)).sha256 == made["sha256"]
    # And a data router cannot resume these checkpoints either (nor could it read the shards).
    assert main(["train-router", "--run-dir", str(run_dir), "--no-progress"]) == 2


@pytest.mark.parametrize("args, message", [
    (["--source", "bogus"], "router.source='bogus' is not one of data, experts"),
    (["--source", "experts", "--set", "router.expert_samples=0"], "router.expert_samples=0 must be > 0"),
    (["--source", "experts", "--set", "router.expert_steps=0"], "router.expert_steps=0 must be > 0"),
    (["--source", "experts", "--set", "router.expert_solver=rk4"], "router.expert_solver='rk4' is not one of"),
])
def test_bad_values_are_one_line_errors(trained_run, capsys, args, message):
    assert main(["train-router", "--run-dir", str(trained_run), *args, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
