"""`ddm prepare` and `ddm info` through the CLI: the happy paths, reruns, and every refused input.

The CLI runs in-process (`ddm.app.cli.main`) so JAX compiles once for the whole module; one test runs it as a real
subprocess to check the user-facing contract (exit code 2, one line on stderr, no traceback) end to end.
"""

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import unwritable_folder
from PIL import Image

from ddm.app.cli import main
from ddm.app.info import describe
from ddm.core.config import DataConfig
from ddm.core.hashing import dataset_fingerprint as fingerprint
from ddm.core.hashing import labels_fingerprint
from ddm.data.prepare import split_holdout
from ddm.data.run import Run
from ddm.data.shards import ShardReader, read_labels, read_shard
from ddm.data.sources import load_dataset

REPO = Path(__file__).resolve().parents[1]
DIGITS_YAML = str(REPO / "configs" / "digits.yaml")


def cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


def prepare(run_dir, *sets: str, config: str = DIGITS_YAML, overwrite: bool = False) -> tuple[int, str, str]:
    args = ["prepare", "--config", config, "--run-dir", run_dir]
    for s in sets:
        args += ["--set", s]
    return cli(*args, *(["--overwrite"] if overwrite else []))


def assert_refused(result: tuple[int, str, str], *needles: str) -> str:
    """Exit 2, one `ddm: error:` line (the last on stderr) naming the problem, no traceback."""
    rc, _, err = result
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert sum(line.startswith("ddm: error:") for line in lines) == 1 and lines[-1].startswith("ddm: error: ")
    for needle in needles:
        assert needle in lines[-1], lines[-1]
    return lines[-1]


def snapshot(run_dir: Path) -> dict:
    """Every file ddm wrote in a run directory -> its bytes (shards are small)."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name != ".manifest.lock"}


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("digits") / "run"
    rc, out, err = prepare(run_dir)
    assert rc == 0, err
    return run_dir, out


# --- the happy path ---------------------------------------------------------------------------------------


def test_prepare_digits_end_to_end(digits_run):
    run_dir, out = digits_run
    manifest = json.loads((run_dir / "manifest.json").read_text())
    dataset = load_dataset(DataConfig(source="digits"))
    images, classes = dataset.images, dataset.labels
    assert manifest["format"] == "ddm-run/v2"
    ds = manifest["dataset"]
    assert ds == {"source": "digits", "fingerprint": fingerprint(images), "num_images": 1797, "image_shape": [8, 8, 1],
                  "num_classes": 10, "class_names": [str(i) for i in range(10)],
                  "labels_sha256": labels_fingerprint(classes, dataset.class_names)}
    assert manifest["config"]["expert"]["model"]["num_classes"] == 10  # resolved from the data
    cl = manifest["clustering"]
    assert (cl["k"], cl["method"], cl["embedding"], cl["embed_dim"]) == (4, "balanced", "pca", 16)
    assert cl["inertia"] > 0 and cl["n_iter"] >= 1
    assert np.load(run_dir / cl["centroids"]).shape == (4, 16)
    assert manifest["config"]["data"]["k"] == 4 and manifest["config"]["run_dir"] == str(run_dir)

    clusters = manifest["clusters"]
    assert [c["id"] for c in clusters] == [0, 1, 2, 3] and all(c["count"] > 0 for c in clusters)
    holdout = manifest["holdout"]
    assert holdout["count"] == 180 and sum(c["count"] for c in clusters) + holdout["count"] == 1797
    assert sum(c["share"] for c in clusters) == pytest.approx(1.0)

    # Each shard holds exactly the training images k-means put in its cluster, in dataset order.
    train_idx, hold_idx = split_holdout(1797, 0.1, 4, 0)
    labels = np.load(run_dir / cl["train_labels"])
    assert labels.shape == (1617,) and np.array_equal(np.bincount(labels), [c["count"] for c in clusters])
    for c in clusters:
        assert (run_dir / c["shard"] / "images" / ".zarray").is_file()
        assert read_shard(str(run_dir / c["shard"])).tobytes() == images[train_idx][labels == c["id"]].tobytes()
        # ... and beside them their class labels, row for row, counted per class in the manifest.
        member_classes = classes[train_idx][labels == c["id"]]
        np.testing.assert_array_equal(read_labels(str(run_dir / c["shard"])), member_classes)
        assert c["class_counts"] == np.bincount(member_classes, minlength=10).tolist()
    assert read_shard(str(run_dir / holdout["shard"])).tobytes() == images[hold_idx].tobytes()
    np.testing.assert_array_equal(read_labels(str(run_dir / holdout["shard"])), classes[hold_idx])
    assert np.load(run_dir / holdout["labels"]).shape == (180,)

    # A reader over all shards sees the cluster ids as labels.
    reader = ShardReader([str(run_dir / c["shard"]) for c in clusters], batch_size=1617, seed=0)
    assert np.array_equal(np.bincount(reader.batch(0)[1]), [c["count"] for c in clusters])

    # The closing summary table.
    tail = out.strip().splitlines()[-6:]
    assert tail[0].split() == ["cluster", "size", "share", "top", "classes"]
    for line, c in zip(tail[1:5], clusters):
        assert line.split()[:2] == [str(c["id"]), str(c["count"])]
    assert tail[5].split() == ["total", "1617", "100%"]


def test_info(digits_run):
    run_dir, _ = digits_run
    rc, out, err = cli("info", run_dir)
    assert rc == 0, err
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert out.strip() == describe(Run.open(run_dir))
    assert "digits: 1797 images (8, 8, 1)" in out and "K=4 by balanced partition of pca features, k-means inertia" in out
    assert "holdout    180 images" in out and "experts    0/4 finished" in out
    for c in manifest["clusters"]:
        assert any(line.split()[:2] == [str(c["id"]), str(c["count"])] for line in out.splitlines())


def test_info_without_a_run(tmp_path):
    assert_refused(cli("info", tmp_path / "nothing"), "no manifest", "ddm prepare")


def test_rerun_is_idempotent(digits_run):
    run_dir, _ = digits_run
    before = snapshot(run_dir)
    rc, out, err = prepare(run_dir)
    assert rc == 0, err
    assert "already prepared" in out
    assert snapshot(run_dir) == before


def test_mnist10k_config(mnist10k_path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the config's relative source resolves against the repo it lives in
    rc, out, err = prepare(tmp_path / "m", "data.limit=2000", config=str(REPO / "configs" / "mnist10k.yaml"))
    assert rc == 0, err
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert manifest["dataset"]["source"] == str(mnist10k_path.resolve())
    assert manifest["dataset"]["num_images"] == 2000 and manifest["dataset"]["image_shape"] == [28, 28, 1]
    assert manifest["clustering"]["k"] == 8 and manifest["clustering"]["limit"] == 2000
    assert sum(c["count"] for c in manifest["clusters"]) + manifest["holdout"]["count"] == 2000
    assert all((tmp_path / "m" / c["shard"] / "images" / ".zarray").is_file() for c in manifest["clusters"])
    assert "total     1800" in out
    # The file holds no labels: the run stays unconditional.
    assert manifest["dataset"]["num_classes"] == 0 and manifest["config"]["expert"]["model"]["num_classes"] == 0
    assert all("class_counts" not in c for c in manifest["clusters"])


# --- refused inputs leave an existing run untouched -------------------------------------------------------


def _png_folder(root: Path, sizes: list[tuple[int, int]], extra: dict | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"im{i:03d}.png")
    for name, content in (extra or {}).items():
        (root / name).write_bytes(content)
    return root


def _bad_inputs(tmp: Path) -> dict:
    """name -> (--set overrides, overwrite, words the error must contain)."""
    np.savez(tmp / "empty.npz", data=np.zeros((0, 8, 8), np.uint8))
    nan_images = np.full((20, 8, 8), 0.5)
    nan_images[4, 3, 3] = np.nan
    np.save(tmp / "nan.npy", nan_images)
    inf_images = nan_images.copy()
    inf_images[4, 3, 3] = np.inf
    np.save(tmp / "inf.npy", inf_images)
    features = np.random.default_rng(0).normal(size=(1797, 4))
    features[100, 2] = np.nan
    np.save(tmp / "nan_features.npy", features)
    np.save(tmp / "short_features.npy", features[:1000])
    _png_folder(tmp / "with_text", [(8, 8)] * 3, {"readme.txt": b"hi"})
    _png_folder(tmp / "with_broken", [(8, 8)] * 3, {"im999.png": b"\x89PNG broken"})
    _png_folder(tmp / "mixed", [(8, 8)] * 3 + [(9, 8)])
    np.savez(tmp / "other.npz", data=np.random.default_rng(1).integers(0, 256, (50, 8, 8), dtype=np.uint8))
    images = np.random.default_rng(2).integers(0, 256, (50, 8, 8), dtype=np.uint8)
    bad_labels = {"short_labels": np.arange(49) % 3, "float_labels": np.full(50, 1.5),
                  "negative_labels": np.arange(50) - 1, "many_labels": np.arange(50) * 1000}
    for name, labels in bad_labels.items():
        np.savez(tmp / f"{name}.npz", data=images, labels=labels)
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"image": [a.tolist() for a in images], "digit": list(range(50))}), tmp / "t.parquet")
    return {
        "labels of the wrong length": ([f"data.source={tmp}/short_labels.npz"], False, ["49 labels for 50 images"]),
        "non-integer labels": ([f"data.source={tmp}/float_labels.npz"], False, ["labels are not integers"]),
        "negative labels": ([f"data.source={tmp}/negative_labels.npz"], False, ["negative label"]),
        "too many classes": ([f"data.source={tmp}/many_labels.npz"], False, ["more than 10,000 classes"]),
        "missing label column": ([f"data.source={tmp}/t.parquet", "data.label_column=label"], False,
                                 ["no label column 'label'", "digit"]),
        "num_classes disagrees": (["expert.model.num_classes=5"], False, ["num_classes=5", "10 classes"]),
        "num_classes without labels": ([f"data.source={tmp}/other.npz", "expert.model.num_classes=10"], False,
                                       ["num_classes=10", "no class labels"]),
        "labels dropped": (["data.labels=none"], False, ["prepared with different class labels", "--overwrite"]),
        "missing path": ([f"data.source={tmp}/does_not_exist.npz"], False, ["not found", "does_not_exist.npz"]),
        "non-image file": ([f"data.source={tmp}/with_text"], False, ["non-image file", "readme.txt"]),
        "unreadable image": ([f"data.source={tmp}/with_broken"], False, ["unreadable image", "im999.png"]),
        "mixed sizes": ([f"data.source={tmp}/mixed"], False, ["im003.png", "(9, 8, 3)", "data.image_size"]),
        "empty": ([f"data.source={tmp}/empty.npz"], False, ["no images"]),
        "k < 1": (["data.k=0"], False, ["data.k=0"]),
        "k > n": (["data.limit=3"], False, ["data.k=4", "3 images"]),
        "nan images": ([f"data.source={tmp}/nan.npy"], False, ["NaN or Inf", "1 image"]),
        "inf images": ([f"data.source={tmp}/inf.npy"], True, ["NaN or Inf"]),
        # With --overwrite the bad features are found before anything of the old run is removed.
        "nan features, overwrite": (["data.embedding=file", f"data.features_path={tmp}/nan_features.npy"], True,
                                    ["NaN or Inf"]),
        "feature rows": (["data.embedding=file", f"data.features_path={tmp}/short_features.npy"], True,
                         ["1000 rows", "1797 images"]),
        "other dataset": ([f"data.source={tmp}/other.npz"], False, ["different dataset", "--overwrite"]),
        "other clustering": (["data.k=3", "data.seed=5"], False, ["different clustering (k, seed)", "--overwrite"]),
        "unknown key": (["data.kk=3"], False, ["unknown config key data.kk"]),
        "wrong type": (["data.k=four"], False, ["data.k", "must be int"]),
        "bad choice": (["data.kmeans=spectral"], False, ["data.kmeans"]),
    }


def test_bad_inputs_are_refused_and_destroy_nothing(digits_run, tmp_path):
    run_dir, _ = digits_run
    before = snapshot(run_dir)
    assert "manifest.json" in before and any(name.startswith("islands/3/shard/") for name in before)
    failures = []
    for name, (sets, overwrite, needles) in _bad_inputs(tmp_path).items():
        result = prepare(run_dir, *sets, overwrite=overwrite)
        try:
            assert_refused(result, *needles)
            assert snapshot(run_dir) == before, "the existing run was changed"
        except AssertionError as err:
            failures.append(f"{name}: {err}")
    assert not failures, "\n".join(failures)


def test_bad_input_in_a_fresh_run_dir_writes_no_manifest(tmp_path):
    np.save(tmp_path / "nan.npy", np.full((20, 4, 4), np.nan))
    assert_refused(prepare(tmp_path / "run", f"data.source={tmp_path}/nan.npy"), "NaN or Inf values in 20 image")
    features = np.zeros((1797, 3))
    features[[100, 200], 1] = np.nan
    np.save(tmp_path / "f.npy", features)
    assert_refused(prepare(tmp_path / "run", "data.embedding=file", f"data.features_path={tmp_path}/f.npy"),
                   "NaN or Inf in 2 row(s), first row 100")
    np.savez(tmp_path / "labels.npz", data=np.zeros((20, 4, 4), np.uint8), y=np.arange(19))
    assert_refused(prepare(tmp_path / "run", f"data.source={tmp_path}/labels.npz"), "19 labels for 20 images")
    assert not (tmp_path / "run" / "manifest.json").exists()


def test_overwrite_replaces_a_different_run(digits_run, tmp_path):
    # Inverted digits: another dataset of the same shapes, so k-means reuses the compiled code (fast tests).
    digits = load_dataset(DataConfig(source="digits")).images
    np.save(tmp_path / "inverted.npy", 255 - digits[..., 0])
    run_dir = tmp_path / "run"
    rc, _, err = prepare(run_dir, f"data.source={tmp_path}/inverted.npy")
    assert rc == 0, err
    first = json.loads((run_dir / "manifest.json").read_text())
    assert first["dataset"]["source"] == str(tmp_path / "inverted.npy")
    assert first["dataset"]["fingerprint"] == fingerprint(255 - digits)
    (run_dir / "shards" / "stale").write_text("from an older preparation")  # inside ddm's folders: removed
    (run_dir / "notes.txt").write_text("mine")  # not ddm's: survives --overwrite

    before = snapshot(run_dir)
    assert_refused(prepare(run_dir), "different dataset", first["dataset"]["fingerprint"][:12], "--overwrite")
    assert snapshot(run_dir) == before

    rc, _, err = prepare(run_dir, overwrite=True)
    assert rc == 0, err
    second = json.loads((run_dir / "manifest.json").read_text())
    assert second["dataset"]["source"] == "digits" and second["dataset"]["fingerprint"] == fingerprint(digits)
    expected = json.loads((digits_run[0] / "manifest.json").read_text())
    assert second["clusters"] == expected["clusters"]  # the same as preparing digits into a fresh directory
    for c in second["clusters"]:
        assert read_shard(str(run_dir / c["shard"])).tobytes() == read_shard(str(digits_run[0] / c["shard"])).tobytes()
    assert not (run_dir / "shards" / "stale").exists()
    assert (run_dir / "notes.txt").read_text() == "mine"
    rc, out, _ = prepare(run_dir)
    assert rc == 0 and "already prepared" in out


def test_unwritable_run_dir(tmp_path):
    (tmp_path / "a_file").write_text("")
    assert_refused(prepare(tmp_path / "a_file" / "run", "data.limit=100"), "cannot write run directory")
    parent = unwritable_folder(tmp_path)  # chmod 0o500, or /sys as root (root writes into a 0o500 folder)
    before = sorted(parent.iterdir())
    assert_refused(prepare(parent / "run", "data.limit=100"), "cannot write run directory", str(parent))
    assert sorted(parent.iterdir()) == before  # nothing created (the 0o500 folder is still empty)


def test_subprocess_contract(tmp_path):
    """As a user sees it: `python -m ddm prepare` on a missing source."""
    proc = subprocess.run(
        [sys.executable, "-m", "ddm", "prepare", "--config", DIGITS_YAML, "--run-dir", str(tmp_path / "run"),
         "--set", f"data.source={tmp_path}/missing.npz"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"ddm: error: data source not found: {tmp_path}/missing.npz"


# --- data.partition=random ----------------------------------------------------------------------------------


def test_random_partition_is_balanced_seeded_and_counted(tmp_path):
    """`data.partition=random`: equal cluster sizes (within one image), the same shards for the same seed and other
    ones for another seed, the same holdout split as k-means (data.seed), and manifest counts that add up."""
    from ddm.data.prepare import random_partition

    labels = random_partition(1000, 7, 3, 0)
    assert labels.dtype == np.int32 and np.bincount(labels).tolist() == [143] * 6 + [142]
    assert np.array_equal(labels, random_partition(1000, 7, 3, 0))
    assert not np.array_equal(labels, random_partition(1000, 7, 4, 0))
    assert not np.array_equal(labels, random_partition(1000, 7, 3, 1))

    sets = ["data.partition=random", "data.partition_seed=5", "data.k=3"]
    for name, extra in (("a", []), ("b", []), ("c", ["data.partition_seed=6"])):
        rc, _, err = prepare(tmp_path / name, *sets, *extra)
        assert rc == 0, err
    runs = {name: Run.open(tmp_path / name) for name in "abc"}
    a = runs["a"]
    counts = [c["count"] for c in a.clusters]
    assert max(counts) - min(counts) <= 1 and sum(counts) == a.dataset["num_images"] - a.holdout["count"]
    assert a.manifest["clustering"]["method"] == "random" and a.manifest["clustering"]["partition_seed"] == 5
    assert "centroids" not in a.manifest["clustering"]
    assert sum(c["share"] for c in a.clusters) == pytest.approx(1.0)
    for c in a.clusters:
        assert len(read_shard(a.shard_path(c["id"]))) == c["count"]
        assert sum(c["class_counts"]) == c["count"]
    assert np.array_equal(np.bincount(np.load(tmp_path / "a" / "clusters" / "labels.npy"), minlength=3), counts)
    assert np.bincount(a.holdout_labels(), minlength=3).max() - np.bincount(a.holdout_labels()).min() <= 1
    assert runs["a"].shard_digests() == runs["b"].shard_digests() and runs["a"].run_id == runs["b"].run_id
    assert runs["a"].shard_digests() != runs["c"].shard_digests()
    # The held-out images are those of a k-means run with the same data.seed: only the partition differs.
    n = a.dataset["num_images"]
    _, hold = split_holdout(n, a.config.data.holdout_fraction, 3, a.config.data.seed)
    assert len(hold) == a.holdout["count"]
    assert_refused(prepare(tmp_path / "d", "data.partition=spectral"), "data.partition")
