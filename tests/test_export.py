"""`ddm export`: a run's finished models as safetensors + manifest + pins + model card, loadable like the run
(issue 19), and `ddm sample --png-dir`."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image
from safetensors.numpy import load_file

from ddm.app.cli import main
from ddm.core.errors import DDMError
from ddm.data.run import Run
from ddm.data.sums import write_sums
from ddm.sampling.load import load_ensemble


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "digits-k3"
    assert main(["export", "--run-dir", str(trained_run), "--out", str(out)]) == 0
    return out


def _orbax_leaves(path):
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with ocp.StandardCheckpointer() as ckpt:
        meta = ckpt.metadata(path).item_metadata
        tree = ckpt.restore(path, jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta))
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_export_folder_holds_safetensors_manifest_pins_and_card(trained_run, exported):
    files = sorted(p.relative_to(exported).as_posix() for p in exported.rglob("*") if p.is_file())
    assert files == ["README.md", "SHA256SUMS", "config.yaml", "experts/0/final.safetensors",
                     "experts/1/final.safetensors", "experts/2/final.safetensors", "export.json", "manifest.json",
                     "router/final.safetensors"]
    # The manifest is the run's, byte for byte: the same run identity for verification records.
    assert (exported / "manifest.json").read_bytes() == (trained_run / "manifest.json").read_bytes()
    assert Run.open(exported).sha256 == Run.open(trained_run).sha256
    manifest = json.loads((exported / "manifest.json").read_text())
    # Each file reads with the safetensors package alone and holds exactly the orbax checkpoint's arrays.
    for component in ("experts/0", "experts/2", "router"):
        tensors = load_file(str(exported / component / "final.safetensors"))
        assert all(name.startswith(("ema.", "rest.")) for name in tensors)
        ours = sorted((t.shape, t.dtype.str, t.tobytes()) for t in tensors.values())
        theirs = sorted((a.shape, a.dtype.str, a.tobytes()) for a in _orbax_leaves(trained_run / component / "final"))
        assert ours == theirs
    sums = dict(line.split("  ")[::-1] for line in (exported / "SHA256SUMS").read_text().splitlines())
    assert set(sums) == set(files) - {"SHA256SUMS"}
    info = json.loads((exported / "export.json").read_text())
    assert info["components"]["expert 1"]["sha256"] == manifest["experts"]["1"]["sha256"]
    card = (exported / "README.md").read_text()
    assert "K=3" in card and manifest["experts"]["2"]["sha256"] in card
    for cluster in manifest["clusters"]:
        assert f"| {cluster['id']} | {cluster['count']} |" in card
    assert "40 steps x batch 32" in card  # the training budget of TINY_RUN_OVERRIDES


def test_export_samples_bitwise_like_the_run_directory(trained_run, exported, tmp_path):
    from_run = load_ensemble(trained_run)
    a = from_run.sample(6, "full", steps=3, seed=1)  # full: every expert and the router contribute
    b = load_ensemble(exported).sample(6, "full", steps=3, seed=1)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.x, b.x)
    # The CLI reads the export as a run directory; --png-dir writes one PNG per image, the npz's images exactly.
    out, pngs = tmp_path / "grid.png", tmp_path / "pngs"
    assert main(["sample", "--run-dir", str(exported), "--n", "5", "--strategy", "top1", "--steps", "3",
                 "--seed", "2", "--out", str(out), "--png-dir", str(pngs)]) == 0
    images = np.load(out.with_suffix(".npz"))["images"]
    names = sorted(p.name for p in pngs.iterdir())
    assert names == [f"{i:06d}.png" for i in range(5)]
    decoded = np.stack([np.asarray(Image.open(pngs / n))[..., None] for n in names])
    np.testing.assert_array_equal(decoded, images)
    np.testing.assert_array_equal(images, from_run.sample(5, "top1", steps=3, seed=2, solver="heun").images)


@pytest.mark.parametrize("where", ["tensor data", "safetensors header", "manifest", "SHA256SUMS"])
def test_a_flipped_byte_in_an_export_is_refused(exported, tmp_path, capsys, where):
    copy = shutil.copytree(exported, tmp_path / "export")
    weights = copy / "experts" / "1" / "final.safetensors"
    header = int.from_bytes(weights.read_bytes()[:8], "little")
    target, offset = {"tensor data": (weights, 8 + header + 100), "safetensors header": (weights, 8 + header // 2),
                      "manifest": (copy / "manifest.json", 200), "SHA256SUMS": (copy / "SHA256SUMS", 10)}[where]
    _flip(target, offset)
    with pytest.raises(DDMError, match="SHA-256 in SHA256SUMS|SHA256SUMS"):
        load_ensemble(copy)
    code = main(["sample", "--run-dir", str(copy), "--n", "2", "--steps", "2", "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("ddm: error:")


def test_changed_weights_are_refused_by_the_pin_even_with_rewritten_sums(exported, tmp_path):
    """Someone who edits a weight and regenerates SHA256SUMS still hits the manifest's pin, as in a run."""
    copy = shutil.copytree(exported, tmp_path / "export")
    weights = copy / "experts" / "1" / "final.safetensors"
    _flip(weights, 8 + int.from_bytes(weights.read_bytes()[:8], "little") + 100)
    write_sums(copy)
    with pytest.raises(DDMError, match="expert 1 checkpoint .* does not match the manifest SHA-256"):
        load_ensemble(copy)


def test_export_refuses_a_non_empty_folder_and_an_export(trained_run, exported, tmp_path, capsys):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    assert main(["export", "--run-dir", str(trained_run), "--out", str(busy)]) == 2
    assert main(["export", "--run-dir", str(exported), "--out", str(tmp_path / "again")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert "not empty" in err[0] and "already an export" in err[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]  # nothing written half-way
    assert (busy / "keep.txt").read_text() == "mine"


def test_model_card_snippet_runs_on_the_export(exported, monkeypatch):
    from test_docs import python_blocks

    (block,) = python_blocks((exported / "README.md").read_text())
    namespace: dict = {}
    exec(compile(block.replace("THIS_FOLDER", str(exported)), "model card", "exec"), namespace)  # noqa: S102
    assert namespace["result"].images.shape == (16, 8, 8, 1)
