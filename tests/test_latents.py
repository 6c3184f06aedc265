"""Latent-space data: float16 latents with labels go through prepare (exact float shards, per-channel
normalisation in the manifest) -> islands -> router -> sampling (de-normalised latents); bad latents are
one-line errors; streaming prepare (memory-mapped .npy, blocks) equals in-memory prepare."""

from __future__ import annotations

import base64
import json
import re
import sys

import numpy as np
import pytest
from PIL import Image

from ddm.app import cli
from ddm.core.codec import LATENT_PREVIEW_TITLE, Codec
from ddm.core.config import load_config
from ddm.core.errors import DDMError
from ddm.data import manifest as mf
from ddm.data.prepare import prepare
from ddm.data.run import Run
from ddm.data.shards import ShardReader, read_labels, read_shard
from ddm.eval.evaluate import evaluate_run
from ddm.eval.features import UserFeatures
from ddm.eval.latentspace import latent_spaces
from ddm.experts.train import train_expert
from ddm.router.train import train_router
from ddm.verify.claims import gallery
from oracles.fuzz import _with_values
from ddm.verify.records import encode_values, latents_sha256, output_digests

from conftest import REPO

sys.path.insert(0, str(REPO))
from benchmarks.make_latents import digit_latents  # noqa: E402

N = 300
TINY = ["data.k=2", "expert.train.steps=4", "expert.train.batch_size=16", "expert.train.warmup_steps=1",
        "expert.train.log_every=2", "expert.train.checkpoint_every=4", "router.train.steps=4",
        "router.train.batch_size=16", "router.train.warmup_steps=1", "router.train.log_every=2",
        "router.train.checkpoint_every=4", "expert.train.holdout_loss=false", "router.train.holdout_loss=false"]


def _rows(array: np.ndarray) -> np.ndarray:
    """Rows of [n, ...] sorted by their bytes: a multiset of rows that ignores order."""
    flat = np.ascontiguousarray(array).reshape(len(array), -1).view(np.uint8)
    return flat[np.lexsort(flat.T[::-1])]


def _all_rows(run_dir) -> tuple[np.ndarray, np.ndarray]:
    run = Run.open(run_dir)
    paths = run.shard_paths() + [run.holdout_path()]
    return (np.concatenate([read_shard(p) for p in paths]), np.concatenate([read_labels(p) for p in paths]))


def test_latents_end_to_end(tmp_path, capsys):
    latents, labels = digit_latents(N)
    source = tmp_path / "latents.npz"
    np.savez(source, latents=latents, labels=labels)
    run_dir = tmp_path / "run"
    sets = [f"data.source={source}", *TINY]
    args = ["--config", str(REPO / "configs" / "digits-latents.yaml"), "--run-dir", str(run_dir)]
    assert cli.main(["prepare", *args, *[a for s in sets for a in ("--set", s)]]) == 0

    # Shards hold exactly the input values, float16, every row once, labels alongside.
    stored, stored_labels = _all_rows(run_dir)
    assert stored.dtype == np.float16 and stored.shape == latents.shape
    np.testing.assert_array_equal(_rows(stored), _rows(latents))
    np.testing.assert_array_equal(np.sort(stored_labels), np.sort(labels))
    run = Run.open(run_dir)
    codec = run.codec
    assert codec.latents and run.dataset["dtype"] == "float16"
    as64 = latents.astype(np.float64).reshape(-1, 4)
    np.testing.assert_allclose(codec.mean, as64.mean(0), rtol=1e-9)
    np.testing.assert_allclose(codec.std, as64.std(0), rtol=1e-9)
    batch = ShardReader(run.shard_paths(), batch_size=16, seed=0).batch(0)
    assert batch.images.dtype == np.float16
    encoded = codec.encode(batch.images)  # what the trainer feeds the model: standardised, float32
    assert encoded.dtype == np.float32 and abs(float(encoded.mean())) < 1.5

    # Islands (in this process: no interpreter start per island), router, sampling.
    for k in range(2):
        train_expert(run_dir, k, TINY)
    train_router(run_dir, TINY)
    out = tmp_path / "grid.png"
    assert cli.main(["sample", "--run-dir", str(run_dir), "--n", "4", "--steps", "3", "--out", str(out),
                     "--class", "3", "--record", str(tmp_path / "rec.json")]) == 0
    with np.load(out.with_suffix(".npz")) as saved:
        sampled, images = saved["latents"], saved["images"]
    record = json.loads((tmp_path / "rec.json").read_text())
    values = np.frombuffer(base64.b64decode(record["values"]), "<f4").reshape(record["shape"])
    assert sampled.dtype == np.float32 and sampled.shape == (4, 8, 8, 4)
    np.testing.assert_allclose(sampled, values * np.float32(codec.std) + np.float32(codec.mean), rtol=1e-6)
    np.testing.assert_array_equal(images, codec.preview(values))
    assert images.shape == (4, 8, 8, 3) and images.dtype == np.uint8
    assert Image.open(out).text["Title"] == LATENT_PREVIEW_TITLE

    # The record pins the latent bytes (SHA-256) and the preview (perceptual hashes); ddm verify regenerates.
    assert record["codec"] == codec.to_dict() and record["sha256"] == latents_sha256(sampled)
    assert [d["sha256"] for d in record["images"]] == [latents_sha256(z[None]) for z in sampled]
    assert cli.main(["verify", str(tmp_path / "rec.json"), "--run-dir", str(run_dir), "--mode", "exact"]) == 0
    tampered = dict(record, values=encode_values(values + np.float32(1e-3)))
    tampered["sha256"], tampered["images"] = output_digests(values + np.float32(1e-3), codec)
    (tmp_path / "tampered.json").write_text(json.dumps(tampered))
    assert cli.main(["verify", str(tmp_path / "tampered.json"), "--run-dir", str(run_dir), "--mode", "exact"]) == 1

    # The other commands on a latent run (no more training): info, evaluate, consensus-eval's record builders.
    capsys.readouterr()
    assert cli.main(["info", "--run-dir", str(run_dir)]) == 0
    info = capsys.readouterr().out
    assert f"{len(stored)} float16 latents (8, 8, 4)" in info and "(x - mean) / std per channel" in info
    report = evaluate_run(run_dir, n=6, steps=2, strategies=("top1",), monolith=False, student=False, cfg_scales=())
    assert report["featurenet"]["name"] == "latent-pca32" and "not images" in report["featurenet"]["description"]
    top1 = report["results"]["top1"]
    assert np.isfinite([top1["fd"], top1["fd_pca"], top1["precision"]]).all() and top1["fd"] == top1["fd_pca"]
    with np.load(run_dir / report["samples"]) as saved:
        assert saved["top1"].dtype == np.float32 and saved["top1"].shape == (6, 8, 8, 4)  # de-normalised latents
    # With sample.decoder: FD on decoded images (pixel PCA, or the user's features on them); --features alone fails.
    train_rows = np.concatenate([read_shard(p) for p in run.shard_paths()])
    def decode(z):  # a stand-in VAE decoder: channel 0 as an 8x8 grey image
        return np.clip(z[..., :1] * 40 + 128, 0, 255).astype(np.uint8)
    main_space, second, _ = latent_spaces(codec, train_rows, decode, None)
    assert main_space.name == second.name == "decoded-pixel-pca32"
    assert main_space.features(stored[:5]).shape == (5, 32)
    user = UserFeatures("mean:fn", lambda images: images.reshape(len(images), -1).mean(1, keepdims=True))
    assert latent_spaces(codec, train_rows, decode, user)[0].features(stored[:5]).shape == (5, 1)
    with pytest.raises(DDMError, match="sample.decoder"):
        latent_spaces(codec, train_rows, None, user)
    # consensus-eval's forged records and collision gallery use the latent digests and preview.
    forged = _with_values(record, values + np.float32(0.5))
    assert (forged["sha256"], forged["images"]) == output_digests(values + np.float32(0.5), codec)
    shown = gallery([{"kind": "honest", "meta": {}, "record": record}])
    assert [g["phash"] for g in shown] == [d["phash"] for d in record["images"]]


@pytest.mark.parametrize("bad,message", [
    (np.full((4, 8, 8, 4), np.nan, np.float16), "NaN or Inf"),
    (np.zeros((4, 8, 8, 4), np.int32), "float16 or float32"),
    (np.zeros((4, 8, 8), np.float32), r"\[N, h, w, c\]"),
    (np.array([np.zeros((8, 8, 4)), np.zeros((4, 4, 4))], dtype=object), "ragged"),
])
def test_bad_latents_are_one_line_errors(tmp_path, capsys, bad, message):
    source = tmp_path / "bad.npy"
    np.save(source, bad, allow_pickle=True)
    run_dir = tmp_path / "run"
    code = cli.main(["prepare", "--config", str(REPO / "configs" / "digits-latents.yaml"), "--run-dir",
                     str(run_dir), "--set", f"data.source={source}", "--set", "data.k=2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("ddm: error:")
    assert re.search(message, err[0]), err[0]
    assert not (run_dir / "manifest.json").exists()


def test_streaming_prepare_equals_in_memory(tmp_path):
    """A memory-mapped .npy written in 64-row blocks gives the same run as the in-memory .npz in one block:
    same fingerprint, codec, clusters and shard bytes. With fit_samples < N every row still lands exactly once."""
    latents, _ = digit_latents(N)
    np.save(tmp_path / "l.npy", latents)
    np.savez(tmp_path / "l.npz", latents=latents)
    base = ["data.kind=latents", "data.k=3", "data.labels=none", "data.embed_dim=8", "data.chunk_images=32"]
    runs = {}
    for name, source, block in (("mem", "l.npz", 1 << 20), ("stream", "l.npy", 64)):
        cfg = load_config(REPO / "configs" / "digits-latents.yaml", [*base, f"data.source={tmp_path / source}"])
        runs[name] = prepare(cfg, tmp_path / name, block_rows=block)
    mem, stream = runs["mem"], runs["stream"]
    for key in ("fingerprint", "codec", "num_images", "image_shape"):
        assert mem["dataset"][key] == stream["dataset"][key]
    assert [c["count"] for c in mem["clusters"]] == [c["count"] for c in stream["clusters"]]
    for c in mem["clusters"] + [mem["holdout"]]:
        rel = c["shard"]
        np.testing.assert_array_equal(read_shard(mf.resolve(tmp_path / "stream", rel)),
                                      read_shard(mf.resolve(tmp_path / "mem", rel)))
    # A fit sample smaller than N: the embedding and k-means see 100 rows; all rows are still assigned.
    cfg = load_config(REPO / "configs" / "digits-latents.yaml",
                      [*base, f"data.source={tmp_path / 'l.npy'}", "data.fit_samples=100"])
    manifest = prepare(cfg, tmp_path / "sampled", block_rows=64)
    assert manifest["clustering"]["fit_samples"] == 100
    stored = np.concatenate([read_shard(mf.resolve(tmp_path / "sampled", c["shard"]))
                             for c in manifest["clusters"] + [manifest["holdout"]]])
    np.testing.assert_array_equal(_rows(stored), _rows(latents))
    assert Codec.from_dict(manifest["dataset"]["codec"]) == Codec.from_dict(mem["dataset"]["codec"])
