"""What a researcher watches while a component trains (issue 19): held-out loss at every log step, TensorBoard
event files, an optional W&B writer, and fixed-noise sample grids from the EMA weights."""

from __future__ import annotations

import io
import json
import math
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import fresh_run
from PIL import Image

from ddm.app import cli
from ddm.core.config import load_config
from ddm.core.dit import dit_from_config
from ddm.core.flow import drop_conditions, flow_matching_loss
from ddm.core.images import to_model_range
from ddm.data import manifest as mf
from ddm.data.run import Run
from ddm.data.shards import read_labels, read_shard
from ddm.train.monitor import HOLDOUT_KEY
from ddm.train.trainer import read_metrics
from ddm.train.writers import open_writers

TRAIN = ["expert.train.steps=8", "expert.train.batch_size=16", "expert.train.warmup_steps=2",
         "expert.train.log_every=4", "expert.train.checkpoint_every=8", "expert.train.tensorboard=true",
         "expert.train.sample_every=4", "expert.train.sample_images=4", "expert.train.sample_steps=2"]


def _sets(values):
    return [a for v in values for a in ("--set", v)]


@pytest.fixture(scope="module")
def monitored_expert(tmp_path_factory):
    """Expert 0 of a prepared digits K=2 run, trained 8 steps with TensorBoard and a grid every 4 steps."""
    run = fresh_run(tmp_path_factory, "monitored")
    assert cli.main(["train-expert", "--run-dir", str(run), "--cluster", "0", "--no-progress", *_sets(TRAIN)]) == 0
    return run


def _events(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


def test_tensorboard_events_hold_loss_holdout_lr_and_the_sample_grids(monitored_expert):
    out = monitored_expert / "experts" / "0"
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [4, 8]
    events = _events(out / "tb")
    tags = events.Tags()
    for tag, key in [("train/loss", "loss"), ("holdout/loss", "holdout_loss"), ("train/lr", "lr")]:
        assert tag in tags["scalars"], tags
        scalars = events.Scalars(tag)
        assert [s.step for s in scalars] == [4, 8]
        np.testing.assert_allclose([s.value for s in scalars], [r[key] for r in rows], rtol=1e-6)
    # The grids: one PNG per sample step, and the same pixels in the event file.
    pngs = sorted(p.name for p in (out / "samples").iterdir())
    assert pngs == ["step_000004.png", "step_000008.png"]
    images = events.Images("samples")
    assert [i.step for i in images] == [4, 8]
    for image, name in zip(images, pngs):
        from_tb = np.asarray(Image.open(io.BytesIO(image.encoded_image_string)).convert("L"))
        on_disk = np.asarray(Image.open(out / "samples" / name))
        assert from_tb.shape == on_disk.shape and from_tb.shape[0] >= 2 * 64  # 4 digits in a 2x2 grid, upscaled
        np.testing.assert_array_equal(from_tb, on_disk)
    # The grid changes as the EMA weights train (the noise is the same at every sample step).
    first, last = (np.asarray(Image.open(out / "samples" / n)) for n in pngs)
    assert not np.array_equal(first, last)


def test_holdout_loss_is_the_loss_on_the_clusters_held_out_images_at_fixed_noise(monitored_expert):
    """Recomputed independently from the step-8 checkpoint: the flow loss of the training parameters on the
    held-out images whose nearest centroid is cluster 0 (cycled to one batch), at the monitor's fixed key. The
    digits are labelled, so the expert is class-conditional: the held-out images' classes, dropped to the null
    label as in training (fold_in(key, 1), rate train.class_dropout), are its input."""
    import orbax.checkpoint as ocp
    from flax import nnx

    run = monitored_expert
    manifest = mf.read_manifest(run)
    config = load_config(None, TRAIN)
    images = read_shard(mf.resolve(run, manifest["holdout"]["shard"]))
    labels = np.load(mf.resolve(run, manifest["holdout"]["labels"]))
    mine = images[labels == 0]
    assert 0 < len(mine) < len(images)
    rows = mine[np.arange(16) % len(mine)]
    classes = read_labels(mf.resolve(run, manifest["holdout"]["shard"]))[labels == 0][np.arange(16) % len(mine)]

    model_cfg = Run.open(run).config.expert.model
    assert model_cfg.num_classes == 10
    abstract = nnx.eval_shape(lambda: dit_from_config(model_cfg, tuple(images.shape[1:]), nnx.Rngs(params=0)))
    graphdef = nnx.graphdef(abstract)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with ocp.StandardCheckpointer() as ckpt:
        path = run / "experts/0/checkpoints/8/state"
        meta = ckpt.metadata(path).item_metadata
        state = ckpt.restore(path, jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                                                meta))
    model = nnx.merge(graphdef, state["params"], state["rest"])
    rng = jax.random.fold_in(jax.random.key(config.expert.train.seed), HOLDOUT_KEY)
    y = drop_conditions(jax.random.fold_in(rng, 1), jnp.asarray(classes), config.expert.train.class_dropout, 10)
    loss = flow_matching_loss(lambda x, t: model(x, t, y), to_model_range(rows), rng,
                              config.expert.train.t_sampling)
    logged = read_metrics(run / "experts/0/metrics.jsonl")[-1]["holdout_loss"]
    np.testing.assert_allclose(float(loss), logged, rtol=1e-4)


def test_router_logs_holdout_loss_and_accuracy(trained_run):
    rows = read_metrics(trained_run / "router" / "metrics.jsonl")
    assert rows and all({"holdout_loss", "holdout_accuracy"} <= set(r) for r in rows)
    assert all(0.0 <= r["holdout_accuracy"] <= 1.0 and math.isfinite(r["holdout_loss"]) for r in rows)
    # Experts log theirs too (every run in the suite has held-out images).
    assert all("holdout_loss" in r for r in read_metrics(trained_run / "experts" / "1" / "metrics.jsonl"))


def test_tensorboard_without_tensorboardx_is_a_one_line_error(tmp_path_factory, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # as if it were not installed
    run = fresh_run(tmp_path_factory, "no-tbx")
    code = cli.main(["train-expert", "--run-dir", str(run), "--cluster", "0", "--no-progress", *_sets(TRAIN)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == ["ddm: error: train.tensorboard=true needs tensorboardX: pip install -e '.[tb]'"]
    assert not (run / "experts").exists()  # nothing written half-way


class FakeWandb(types.ModuleType):
    """Records what ddm's W&B writer sends (the real package needs an account or offline mode)."""

    def __init__(self):
        super().__init__("wandb")
        self.inits, self.logged, self.finished = [], [], 0

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return self

    def log(self, values, step):
        self.logged.append((step, values))

    def finish(self):
        self.finished += 1

    class Image:
        def __init__(self, data):
            self.data = data


def test_wandb_writer_logs_rows_and_grids_and_resumes_the_same_run(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    for start in (0, 4):
        writers = open_writers(tensorboard=False, wandb_project="ddm-test", out_dir=tmp_path, name="expert 0",
                               start_step=start, config={"expert": {"train": {"steps": 8}}})
        writers.row(start + 4, {"step": start + 4, "loss": 0.5, "holdout_loss": 0.7, "time": 1.0})
        writers.image(start + 4, "samples", np.zeros((10, 10, 1), np.uint8))
        writers.close()
    assert [i["id"] for i in fake.inits] == [fake.inits[0]["id"]] * 2  # the resumed job continues the run
    assert all(i["project"] == "ddm-test" and i["resume"] == "allow" and i["name"] == "expert 0" for i in fake.inits)
    assert fake.logged[0] == (4, {"train/loss": 0.5, "holdout/loss": 0.7})
    assert fake.logged[1][0] == 4 and fake.logged[1][1]["samples"].data.shape == (10, 10)
    assert fake.logged[2][0] == 8 and fake.finished == 2


def test_monitoring_config_is_validated():
    from ddm.core.errors import DDMError

    with pytest.raises(DDMError, match="sample_every=-1"):
        load_config(None, ["expert.train.sample_every=-1"])
    with pytest.raises(DDMError, match="wandb_project"):
        load_config(None, ["router.train.wandb_project= "])
    assert json.loads(json.dumps(load_config(None, ["expert.train.tensorboard=true"]).expert.train.tensorboard))
