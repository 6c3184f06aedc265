"""Metrics of `ddm evaluate` (FD, precision/recall), the feature-net cache, and the command end to end."""

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg

from ddm.eval.featurenet import FeatureNetConfig, get_featurenet
from ddm.eval.metrics import (
    frechet_distance,
    frechet_distance_from_stats,
    gaussian_stats,
    precision_recall,
)

REPO = Path(__file__).resolve().parents[1]


def _gaussian(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ mix + rng.normal(size=d)


def test_fd_of_a_set_with_itself_is_zero_and_grows_with_a_shift():
    a = _gaussian(400, 8, 0)
    assert abs(frechet_distance(a, a)) < 1e-8
    shifts = [0.1, 0.5, 1.0, 2.0]
    fds = [frechet_distance(a, a + s) for s in shifts]
    assert all(x < y for x, y in itertools.pairwise(fds))
    # A pure mean shift of s in every one of D dims adds exactly D s^2 (covariances are identical).
    np.testing.assert_allclose(fds, [8 * s**2 for s in shifts], rtol=1e-6)


def _scipy_fd(mu1, s1, mu2, s2) -> float:
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fd_matches_scipy_reference_on_random_gaussians(seed):
    a, b = _gaussian(300, 12, seed), 1.5 * _gaussian(200, 12, seed + 10)
    stats_a, stats_b = gaussian_stats(a), gaussian_stats(b)
    ours = frechet_distance_from_stats(*stats_a, *stats_b)
    np.testing.assert_allclose(ours, _scipy_fd(*stats_a, *stats_b), rtol=1e-6)
    np.testing.assert_allclose(frechet_distance(a, b), ours)


def test_precision_recall_identical_sets_are_one_and_disjoint_sets_zero():
    a = _gaussian(200, 6, 3)
    assert precision_recall(a, a) == (1.0, 1.0)
    far = precision_recall(a, a + 100.0)
    assert far == (0.0, 0.0)
    # A generator that covers only half of the data: precise, but recall drops.
    half = a[a[:, 0] < np.median(a[:, 0])]
    precision, recall = precision_recall(a, half)
    assert precision > 0.95 and recall < 0.8


# What `ddm evaluate --feature-steps 10` builds: the CLI test below then finds it in the shared cache.
CLI_NET = FeatureNetConfig(steps=10)


def _copy_run(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("eval"))
    return dst


@pytest.fixture(scope="module")
def featurenet_cache(trained_run, tmp_path_factory):
    """(cache dir, the FeatureNet trained into it) for the dataset of `trained_run`, trained once per module."""
    base = tmp_path_factory.mktemp("featurenet")
    net = get_featurenet(_copy_run(trained_run, base / "run"), cfg=CLI_NET, cache_dir=base / "cache")
    return base / "cache", net


def test_featurenet_cache_is_reused_and_changes_with_the_dataset(trained_run, featurenet_cache, tmp_path):
    from ddm.core.errors import DDMError
    from ddm.data import manifest as mf
    from ddm.data.shards import read_shard, write_shard

    cache, first = featurenet_cache
    assert first.trained and len(first.sha256) == 64

    # Another run on the same images reuses the cached net (not retrained, same SHA-256, same features) and
    # keeps a pinned copy in its own eval/featurenet/.
    run_b = _copy_run(trained_run, tmp_path / "b")
    again = get_featurenet(run_b, cfg=CLI_NET, cache_dir=cache)
    assert not again.trained and again.sha256 == first.sha256 and again.key == first.key
    info = json.loads((run_b / "eval" / "featurenet" / "info.json").read_text())
    assert info["sha256"] == first.sha256 and info["key"] == first.key
    images = read_shard(str(run_b / "shards" / "holdout"))[:5]
    np.testing.assert_array_equal(again.features(images), first.features(images))
    assert len(list((cache / "featurenet").glob("*/info.json"))) == 1

    # Weights that do not hash to the pinned SHA-256 refuse to load.
    info["sha256"] = "0" * 64
    (run_b / "eval" / "featurenet" / "info.json").write_text(json.dumps(info))
    with pytest.raises(DDMError, match="SHA-256"):
        get_featurenet(run_b, cfg=CLI_NET, cache_dir=cache)

    # A different dataset (cluster 0 loses half its images) gets a different key and a newly trained net.
    run_c = _copy_run(trained_run, tmp_path / "c")
    shard = str(run_c / "islands" / "0" / "shard")
    write_shard(shard, read_shard(shard)[::2])
    mf.update_manifest(run_c, lambda m: m["dataset"].update(fingerprint="f" * 64))
    other = get_featurenet(run_c, cfg=CLI_NET, cache_dir=cache)
    assert other.trained and other.key != first.key and other.sha256 != first.sha256
    assert len(list((cache / "featurenet").glob("*/info.json"))) == 2


def test_ddm_evaluate_writes_report_markdown_and_figure(trained_run_copy, featurenet_cache, capsys):
    from ddm.app.cli import main
    from ddm.data import manifest as mf

    run = trained_run_copy
    cache, net = featurenet_cache
    # Stand-in monolith: expert 0's finished weights registered as the monolith (same model config), so the
    # monolith path (load_component + make_dit, sampled as single:0) is exercised without training one.
    mf.record_component(run, "monolith", None, dict(mf.read_manifest(run)["experts"]["0"]))
    # Likewise a stand-in student (expert 1's weights in the manifest's `student` entry): its own row.
    mf.record_component(run, "student", None, dict(mf.read_manifest(run)["experts"]["1"]))
    # Three of the ensemble strategies (every one samples and is scored the same way; each costs two compiled
    # solves): a routed one, one whose name holds a ':' (samples.npz keys), and prior, which runs no router.
    code = main(["evaluate", "--run-dir", str(run), "--n", "12", "--steps", "2", "--cache-dir", str(cache),
                 "--feature-steps", "10", "--cfg-scales", "3", "--class-n", "20",
                 "--strategies", "top1,threshold:0.1,prior"])
    assert code == 0
    report = json.loads((run / "eval" / "report.json").read_text())
    expected = {"real (train)", "top1", "threshold:0.1", "prior", "monolith", "student"}
    assert set(report["results"]) == expected
    for name in expected - {"real (train)"}:
        row = report["results"][name]
        assert {"fd", "precision", "recall", "coverage", "seconds", "expert_evals_per_sample"} <= set(row)
        assert row["fd"] >= 0 and 0 <= row["precision"] <= 1 and 0 <= row["recall"] <= 1
        assert len(row["coverage"]["share"]) == 3 and abs(sum(row["coverage"]["share"]) - 1) < 1e-9
    usage = np.asarray(report["results"]["top1"]["router_usage"])
    assert usage.shape == (2, 3) and np.allclose(usage.sum(1), 1, atol=1e-5)
    assert "router_usage" not in report["results"]["monolith"]
    assert report["results"]["student"]["kind"] == "student" and "router_usage" not in report["results"]["student"]
    assert report["results"]["student"]["fd"] != report["results"]["monolith"]["fd"]  # a different model
    # FD-PCA: the same samples in raw-pixel PCA features of the training images, recomputable from the files.
    from ddm.data.shards import read_shard
    from ddm.eval.pixelpca import fit_pixel_pca

    from ddm.data.run import Run

    pca = fit_pixel_pca(np.concatenate([read_shard(p) for p in Run.open(run).shard_paths()]))
    assert report["pixel_pca"]["name"] == "pixel-pca32" and pca.basis.shape == (64, 32)
    real_pca = pca.features(read_shard(str(run / "shards" / "holdout")))
    with np.load(run / "eval" / "samples.npz") as samples:
        for name in ("student", "top1", "monolith"):
            np.testing.assert_allclose(report["results"][name]["fd_pca"],
                                       frechet_distance(real_pca, pca.features(samples[name])), rtol=1e-6)
    assert report["featurenet"]["sha256"] == net.sha256 and not report["featurenet"]["trained_now"]
    from ddm.core.machine import cpu_model

    assert report["featurenet"]["trained_in"]["cpu"] == cpu_model()  # nets trained elsewhere have other weights
    assert f"trained on {cpu_model()}" in report["featurenet"]["description"]
    assert report["featurenet"]["metric_name"] == "FD in kmc32-cnn features"
    assert report["request"] == {"n": 12, "steps": 2, "solver": "heun", "seed": 0}
    md = (run / "eval" / "report.md").read_text()
    assert "FD in kmc32-cnn features" in md and "| monolith |" in md and "| student |" in md and "not FID" in md
    assert "FD-PCA" in md
    assert (run / "eval" / "strategies.png").stat().st_size > 0
    with np.load(run / "eval" / "samples.npz") as samples:
        assert samples["threshold_0.1"].shape == (12, 8, 8, 1)
    assert "report ->" in capsys.readouterr().out
    # The run is class-conditional: guided samples per model and scale, read by the class classifier.
    classifier = report["classifier"]
    assert classifier["name"] == "cls10-cnn" and classifier["cfg_scales"] == [3.0] and classifier["class_n"] == 20
    assert (run / "eval" / "classifier" / "info.json").is_file()
    assert 0 <= report["results"]["real (train)"]["class_accuracy"] <= 1
    for name in expected - {"real (train)"}:
        accuracy = report["results"][name]["class_accuracy"]
        assert set(accuracy) == {"3"}
        for cell in accuracy.values():
            assert 0 <= cell["accuracy"] <= 1 and len(cell["per_class"]) == 10
            assert cell["accuracy"] == pytest.approx(np.mean(cell["per_class"]))  # 2 of each class
    assert "Class accuracy of guided samples" in md and "| cfg 3 |" in md


def test_ddm_evaluate_with_a_user_feature_extractor(trained_run_copy, tmp_path, monkeypatch, capsys):
    """`--features module:function`: every metric in the user's feature space (here: 16 mean-pooled pixel
    blocks), recomputable from the written samples; a bad spec or a bad output shape is a one-line error."""
    from ddm.app.cli import main
    from ddm.data.shards import read_shard

    (tmp_path / "myfeats.py").write_text(
        "import numpy as np\n"
        "def blocks(images):\n"
        "    x = images.astype(np.float64).reshape(len(images), 4, 2, 4, 2).mean((2, 4))\n"
        "    return x.reshape(len(images), -1)\n"
        "def wrong(images):\n"
        "    return np.zeros((3, 2))\n")
    monkeypatch.chdir(tmp_path)  # the module is found in the working directory, as users keep theirs
    run = trained_run_copy
    args = ["evaluate", "--run-dir", str(run), "--n", "12", "--steps", "2", "--strategies", "top1", "--no-monolith",
            "--cfg-scales", "none"]
    assert main([*args, "--features", "myfeats:blocks"]) == 0
    report = json.loads((run / "eval" / "report.json").read_text())
    assert report["featurenet"]["name"] == "myfeats:blocks" and report["featurenet"]["dim"] == 16
    assert report["featurenet"]["metric_name"] == "FD in myfeats:blocks features"
    import myfeats

    real = myfeats.blocks(read_shard(str(run / "shards" / "holdout")))
    with np.load(run / "eval" / "samples.npz") as samples:
        fake = myfeats.blocks(samples["top1"])
    np.testing.assert_allclose(report["results"]["top1"]["fd"], frechet_distance(real, fake), rtol=1e-9)
    assert "the user's feature extractor `myfeats:blocks`" in (run / "eval" / "report.md").read_text()
    capsys.readouterr()
    for spec, message in [("myfeats", "module:function"), ("nosuchmodule:f", "cannot import 'nosuchmodule'"),
                          ("myfeats:missing", "has no 'missing'"), ("myfeats:wrong", "must return [")]:
        assert main([*args, "--features", spec]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (spec, err)
