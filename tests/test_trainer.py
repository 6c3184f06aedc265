"""The shared trainer: sharded step == single-device step, kill -9 + resume == uninterrupted run (bitwise),
resume onto another device count, NaN/Inf stops with the last good checkpoint intact.

In-process tests use a micro DiT built directly (fast compiles); the kill/resume tests run the real CLI
(`python -m ddm train-expert`, tiny preset) in subprocesses that share a persistent XLA compilation cache,
so each distinct program is compiled once per session.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import child_env, fresh_run, prepared_template

from ddm.app import cli
from ddm.core.config import TrainConfig
from ddm.core.dit import DiT
from ddm.core.errors import DDMError
from ddm.core.flow import flow_matching_loss
from ddm.data import manifest as mf
from ddm.data.shards import ShardReader
from ddm.train.trainer import NonFiniteError, Task, Trainer, init_state, make_optimizer, read_metrics, train_step

REPO = Path(__file__).resolve().parents[1]
# One training config for every subprocess run here (and in test_islands.py): identical programs hit the cache.
TRAIN = ["expert.train.steps=16", "expert.train.batch_size=16", "expert.train.checkpoint_every=4",
         "expert.train.log_every=2", "expert.train.warmup_steps=4"]


# ---------------------------------------------------------------------------------------------------------
# Helpers shared by the tests of this file.
# ---------------------------------------------------------------------------------------------------------


def train_cmd(run: Path, *sets: str) -> list[str]:
    args = [a for s in (*TRAIN, *sets) for a in ("--set", s)]
    return [sys.executable, "-m", "ddm", "train-expert", "--run-dir", str(run), "--cluster", "0",
            "--no-progress", *args]


def run_cli(cmd: list[str], env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def run_cli_many(jobs: list[tuple[list[str], dict]], timeout: float = 300) -> list[str]:
    """Runs independent CLI commands side by side; their stdouts, in order."""
    procs = [subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for cmd, env in jobs]
    outs = []
    try:
        for (cmd, _), proc in zip(jobs, procs):
            out, err = proc.communicate(timeout=timeout)
            assert proc.returncode == 0, f"{cmd} failed:\n{out[-3000:]}\n{err[-3000:]}"
            outs.append(out)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return outs


def committed_steps(ckpt_dir: Path) -> list[int]:
    """Steps orbax has finished writing (a step directory gets its final name only once complete)."""
    if not ckpt_dir.exists():
        return []
    return sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())


def load_final(path: Path) -> dict:
    """A `final` params checkpoint as numpy arrays, whatever mesh wrote it."""
    import orbax.checkpoint as ocp

    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with ocp.StandardCheckpointer() as ckpt:
        meta = ckpt.metadata(path).item_metadata
        abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta)
        return jax.tree.map(np.asarray, ckpt.restore(path, abstract))


def micro_dit(image_shape, rngs: nnx.Rngs) -> DiT:
    # Wide enough that the MLP/modulation kernels (>= 4096 elements) are sharded over fsdp.
    return DiT(image_shape=tuple(image_shape), patch_size=2, depth=1, width=32, heads=2, rngs=rngs)


def micro_loss(model, x, clusters, classes, rng):
    return flow_matching_loss(lambda x_t, t: model(x_t, t), x, rng, "uniform"), {}


# ---------------------------------------------------------------------------------------------------------
# 1. Sharded step == single-device step.
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shard_reader(tmp_path_factory) -> ShardReader:
    run = prepared_template(tmp_path_factory)
    manifest = mf.read_manifest(run)
    return ShardReader([mf.resolve(run, manifest["clusters"][0]["shard"])], batch_size=16, seed=0, cluster_ids=[0])


def _task(reader, out_dir: Path, loss=micro_loss) -> Task:
    return Task(name="micro", make_model=functools.partial(micro_dit, reader.image_shape), loss=loss,
                reader=reader, out_dir=out_dir, meta={})


def test_sharded_step_matches_single_device(shard_reader, tmp_path):
    assert jax.device_count() == 8
    cfg = {"steps": 10, "batch_size": 16, "lr": 1e-2, "warmup_steps": 0, "grad_clip": 1.0, "ema_decay": 0.9}
    task = _task(shard_reader, tmp_path)
    batches = [shard_reader.batch(s) for s in range(2)]
    trainers = {(d, f): Trainer(task, TrainConfig(**cfg, mesh_data=d, mesh_fsdp=f), progress=False)
                for d, f in [(2, 4), (1, 8)]}
    with jax.set_mesh(trainers[2, 4].mesh):
        initial = jax.device_get(trainers[2, 4]._init())  # one init; every run starts from these values

    # Reference: the plain jitted step on one device, no mesh. XLA compiles release the GIL: the test is
    # compile-bound, so the three programs are compiled side by side.
    tx = make_optimizer(TrainConfig(**cfg))
    step = jax.jit(functools.partial(train_step, trainers[2, 4].graphdef, task.loss, tx, cfg["ema_decay"]))
    state = jax.device_put(initial, jax.devices()[0])

    def compile_step(key):
        if key == "ref":
            return step.lower(state, *map(jnp.asarray, batches[0])).compile()
        trainer = trainers[key]
        with jax.set_mesh(trainer.mesh):
            sharded = jax.device_put(initial, trainer.shardings)
            return trainer._step.lower(sharded, *trainer._global_batch(0)).compile()

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        compiled = dict(zip(["ref", *trainers], pool.map(compile_step, ["ref", *trainers])))

    ref_losses = []
    for batch in batches:
        state, metrics = compiled["ref"](state, *map(jnp.asarray, batch))
        ref_losses.append(float(metrics["loss"]))
    ref = jax.device_get({k: state[k] for k in ("params", "ema", "opt")})
    assert np.isfinite(ref_losses).all() and ref_losses[0] != ref_losses[1]

    for (data, fsdp), trainer in trainers.items():
        assert dict(trainer.mesh.shape) == {"data": data, "fsdp": fsdp}
        with jax.set_mesh(trainer.mesh):
            sharded = jax.device_put(initial, trainer.shardings)
            leaves = jax.tree.leaves(sharded["params"])
            assert any("fsdp" in leaf.sharding.spec for leaf in leaves), f"nothing sharded over fsdp={fsdp}"
            for leaf in leaves:
                if "fsdp" in leaf.sharding.spec:  # really split: each device holds 1/fsdp of it
                    assert leaf.addressable_shards[0].data.size == leaf.size // fsdp
            losses = []
            for s in range(2):
                sharded, metrics = compiled[data, fsdp](sharded, *trainer._global_batch(s))
                losses.append(float(metrics["loss"]))
            assert any("fsdp" in leaf.sharding.spec for leaf in jax.tree.leaves(sharded["opt"]))
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, err_msg=f"mesh {data}x{fsdp}")
        got = jax.device_get({k: sharded[k] for k in ("params", "ema", "opt")})
        check = functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-6, err_msg=f"mesh {data}x{fsdp}")
        jax.tree.map(check, got["opt"], ref["opt"])
        # Adam's early updates are ~lr * g / |g|: for a gradient entry near zero, the last-bit differences of a
        # sharded reduction move the update by a visible fraction of lr. Parameters are therefore compared to
        # 0.1% of one step's size, which still catches any real sharding error (those are O(lr)).
        step_scale = functools.partial(check, atol=1e-3 * cfg["lr"])
        jax.tree.map(step_scale, {k: got[k] for k in ("params", "ema")}, {k: ref[k] for k in ("params", "ema")})
        assert int(sharded["step"]) == 2


# ---------------------------------------------------------------------------------------------------------
# 4. NaN/Inf: a clear error, the last good checkpoint intact, exit code 2 on the CLI.
# ---------------------------------------------------------------------------------------------------------


def test_step_rejects_overflowing_parameters():
    """Finite loss and gradients can still push parameters to Inf (a huge learning rate, a saturated tanh): the
    step keeps the old parameters and records the step as bad."""
    def make_model(rngs):
        return nnx.Linear(64, 1, rngs=rngs)

    def loss(model, x, clusters, classes, rng):  # saturates: finite loss, zero gradient once |w| is huge
        return jnp.mean(jnp.tanh(model(x.reshape(x.shape[0], -1)))), {}

    tx = make_optimizer(TrainConfig(lr=3e38, warmup_steps=0, schedule="constant", grad_clip=0.0))
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: make_model(nnx.Rngs(params=0))))
    step = jax.jit(functools.partial(train_step, graphdef, loss, tx, 0.9))
    state = jax.jit(functools.partial(init_state, make_model, tx, 0))()
    images, labels = np.full((4, 8, 8, 1), 255, np.uint8), np.zeros(4, np.int32)
    history = []
    for _ in range(3):
        history.append(jax.device_get(state["params"]))
        state, metrics = step(state, images, labels, labels)
        assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
        assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(state["params"])))
    bad = np.asarray(state["bad"])
    assert bad[0] == 1 and np.isfinite(bad[1]) and np.isfinite(bad[2]), bad  # step 1 would have overflowed
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state["params"]), history[1])


class PoisonedReader:
    """A shard reader whose cluster ids become -1 from step `bad_from` on, which makes `poisoned_loss` NaN."""

    def __init__(self, inner: ShardReader, bad_from: int):
        self.inner, self.bad_from = inner, bad_from
        self.num_images, self.seed, self.image_shape = inner.num_images, inner.seed, inner.image_shape
        self.process_index = inner.process_index

    def position(self, step):
        return self.inner.position(step)

    def batch(self, step):
        images, clusters, classes = self.inner.batch(step)
        return images, (np.full_like(clusters, -1) if step >= self.bad_from else clusters), classes


def poisoned_loss(t_sampling, class_dropout, num_classes, model, x, clusters, classes, rng, **_):
    loss, aux = micro_loss(model, x, clusters, classes, rng)
    return jnp.where(jnp.any(clusters < 0), jnp.nan, loss), aux


def test_nonfinite_loss_exits_2_and_keeps_last_good_checkpoint(tmp_path_factory, monkeypatch, capsys):
    """`ddm train-expert` (in-process, micro DiT) whose loss turns NaN at step 5: a NonFiniteError (a DDMError)
    naming step, loss and norms, exit code 2, checkpoint 4 intact and nothing recorded as finished."""
    import ddm.experts.train

    assert issubclass(NonFiniteError, DDMError)
    real_reader = ddm.experts.train._reader
    monkeypatch.setattr(ddm.experts.train, "make_dit", lambda model_cfg, image_shape, rngs: micro_dit(image_shape, rngs))
    monkeypatch.setattr(ddm.experts.train, "flow_loss", poisoned_loss)
    monkeypatch.setattr(ddm.experts.train, "_reader", lambda *a: PoisonedReader(real_reader(*a), bad_from=5))
    run = fresh_run(tmp_path_factory, "nonfinite")
    sets = [a for s in ("expert.train.steps=10", "expert.train.batch_size=16", "expert.train.warmup_steps=0",
                        "expert.train.log_every=3", "expert.train.checkpoint_every=2")
            for a in ("--set", s)]
    rc = cli.main(["train-expert", "--run-dir", str(run), "--cluster", "0", "--no-progress", *sets])
    err = capsys.readouterr().err
    assert rc == 2
    assert "ddm: error: expert 0: non-finite loss or gradient at step 5 (loss=nan, grad_norm=" in err
    assert "param_norm=" in err and "last good checkpoint kept" in err
    assert "0" not in mf.read_manifest(run).get("experts", {})
    out = run / "experts" / "0"
    assert not (out / "final").exists()
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [3]  # step 6 was never logged
    # Checkpoints 2 and 4 were written; 6 (which would hold the poisoned step 5) was refused. 4 restores.
    assert committed_steps(out / "checkpoints") == [2, 4]
    state = load_final(out / "checkpoints" / "4" / "state")
    assert json.loads((out / "checkpoints" / "4" / "meta" / "metadata").read_text())["step"] == 4
    assert int(state["step"]) == 4
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["params"]))


def test_truncate_metrics_drops_rows_after_resume_point_and_torn_lines(tmp_path):
    from ddm.train.trainer import _truncate_metrics

    path = tmp_path / "metrics.jsonl"
    rows = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (2, 4, 6)]
    path.write_text("\n".join(rows) + '\n{"step": 8, "lo')  # killed mid-append
    _truncate_metrics(path, 4)
    assert path.read_text() == rows[0] + "\n" + rows[1] + "\n"
    path.write_text(rows[0])  # a complete row whose newline never made it: the next append must not glue on
    _truncate_metrics(path, 4)
    assert path.read_text() == rows[0] + "\n"


# ---------------------------------------------------------------------------------------------------------
# 2 + 3. SIGKILL and resume: bitwise on the same devices, close on another device count.
# ---------------------------------------------------------------------------------------------------------


def _expert_entry(run: Path) -> dict:
    return mf.read_manifest(run)["experts"]["0"]


@pytest.mark.slow
def test_kill_and_resume_is_bitwise_and_elastic(tmp_path_factory):
    mesh = "expert.train.mesh_fsdp=4"  # 2 x 4 mesh on 8 devices: parameters are sharded
    env8, env1 = child_env(tmp_path_factory, 8), child_env(tmp_path_factory, 1)

    # The uninterrupted reference and the same run SIGKILLed as soon as a checkpoint is committed (it is then
    # mid-training) run side by side.
    ref, killed = fresh_run(tmp_path_factory, "ref"), fresh_run(tmp_path_factory, "killed")
    ckpt_dir = killed / "experts/0/checkpoints"
    with open(killed.parent / "killed.log", "w") as log:
        proc = subprocess.Popen(train_cmd(killed, mesh), env=env8, cwd=REPO, stdout=log, stderr=log)
        ref_proc = subprocess.Popen(train_cmd(ref, mesh), env=env8, cwd=REPO, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + 300
            while not committed_steps(ckpt_dir) and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            ref_out = ref_proc.communicate(timeout=300)[0]
        finally:
            for p in (proc, ref_proc):
                if p.poll() is None:
                    p.kill()
                    p.wait()
    assert ref_proc.returncode == 0, ref_out[-3000:]
    ref_entry, ref_rows = _expert_entry(ref), read_metrics(ref / "experts/0/metrics.jsonl")
    assert ref_entry["status"] == "finished" and ref_entry["step"] == 16
    log_text = (killed.parent / "killed.log").read_text()
    assert proc.returncode == -signal.SIGKILL, f"finished before it could be killed:\n{log_text[-2000:]}"
    saved = committed_steps(ckpt_dir)
    assert saved and max(saved) < 16
    assert "0" not in mf.read_manifest(killed).get("experts", {})

    # 3. A copy of the killed run resumes on ONE device (checkpoint written by a 2 x 4 mesh), side by side with
    # 2. the restart on the same 8 devices.
    elastic = killed.parent.parent / "elastic"
    shutil.copytree(killed.parent, elastic)
    elastic = elastic / "run"
    out, out_elastic = run_cli_many([(train_cmd(killed, mesh), env8),
                                     (train_cmd(elastic, "expert.train.mesh_fsdp=1"), env1)])

    # 2. The final EMA is bitwise the reference's, and the metrics have every step once.
    assert f"resumed from step {max(saved)}" in out
    entry = _expert_entry(killed)
    assert entry["sha256"] == ref_entry["sha256"]
    rows = read_metrics(killed / "experts/0/metrics.jsonl")
    steps = [r["step"] for r in rows]
    assert steps == list(range(2, 17, 2)), f"duplicate or missing metric rows: {steps}"
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref_rows]
    ref_final, final = load_final(ref / "experts/0/final"), load_final(killed / "experts/0/final")
    jax.tree.map(np.testing.assert_array_equal, final, ref_final)

    # 3. Training completed on 1 device, close to the uninterrupted 8-device run.
    assert f"resumed from step {max(saved)}" in out_elastic and "mesh {'data': 1, 'fsdp': 1}" in out_elastic
    assert _expert_entry(elastic)["step"] == 16
    rows = read_metrics(elastic / "experts/0/metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(2, 17, 2))
    # Not bitwise (reductions are split differently over 1 vs 8 devices), but float32-close.
    np.testing.assert_allclose([r["loss"] for r in rows], [r["loss"] for r in ref_rows], rtol=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5),
                 load_final(elastic / "experts/0/final"), ref_final)


# ---------------------------------------------------------------------------------------------------------
# EMA warmup.
# ---------------------------------------------------------------------------------------------------------


def _linear_loss(model, x, clusters, classes, rng):
    return jnp.mean(jnp.square(model(x.reshape(x.shape[0], -1)) - 1.0)), {}


def _ema_run(warmup: bool, steps: int = 4, decay: float = 0.999):
    """(initial params, params after each step, EMA after each step) of `steps` plain steps of a linear model."""
    cfg = TrainConfig(lr=0.1, warmup_steps=0, ema_decay=decay, ema_warmup=warmup)
    tx = make_optimizer(cfg)
    make = lambda rngs: nnx.Linear(12, 1, rngs=rngs)  # noqa: E731
    graphdef = nnx.graphdef(make(nnx.Rngs(0)))
    state = init_state(make, tx, 0)
    step = jax.jit(functools.partial(train_step, graphdef, _linear_loss, tx, decay, ema_warmup=warmup))
    images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (8, 2, 2, 3)), jnp.uint8)
    labels = jnp.zeros((8,), jnp.int32)
    initial = jax.device_get(state["params"])
    params, emas = [], []
    for _ in range(steps):
        state, _ = step(state, images, labels, labels)
        params.append(jax.device_get(state["params"]))
        emas.append(jax.device_get(state["ema"]))
    return initial, params, emas


def test_ema_warmup_follows_the_live_weights_early():
    """With warmup the EMA after 4 steps is near the live weights (decays 0.1, 2/11, 3/12, 4/13), far nearer
    than the initial weights are; the update matches the warmup formula step by step."""
    initial, params, emas = _ema_run(warmup=True)
    flat = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])  # noqa: E731
    ema = flat(initial)
    for t, p in enumerate(params):
        decay = min(0.999, (1 + t) / (10 + t))
        ema = decay * ema + (1 - decay) * flat(p)
        np.testing.assert_allclose(flat(emas[t]), ema, rtol=1e-5, atol=1e-7)
    gap, moved = np.abs(flat(emas[-1]) - flat(params[-1])).max(), np.abs(flat(params[-1]) - flat(initial)).max()
    assert moved > 0.1 and gap < 0.3 * moved


def test_ema_without_warmup_is_the_fixed_decay():
    """ema_warmup false: EMA_t = d EMA_{t-1} + (1 - d) params_t from the initial weights, as before warmup existed
    (after 4 steps at d = 0.999 it has barely left the initial weights)."""
    initial, params, emas = _ema_run(warmup=False)
    flat = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])  # noqa: E731
    ema = flat(initial)
    for t, p in enumerate(params):
        ema = 0.999 * ema + (1 - 0.999) * flat(p)
        np.testing.assert_allclose(flat(emas[t]), ema, rtol=1e-6, atol=1e-8)
    assert np.abs(flat(emas[-1]) - flat(initial)).max() < 0.01 * np.abs(flat(params[-1]) - flat(initial)).max()


def test_ema_warmup_is_on_by_default_and_never_exceeds_the_decay():
    from ddm.train.trainer import ema_decay_at

    assert TrainConfig().ema_warmup is True
    decays = [float(ema_decay_at(0.99, jnp.int32(t), True)) for t in (0, 1, 10, 1000, 10**6)]
    assert decays[0] == pytest.approx(0.1) and decays[1] == pytest.approx(2 / 11)
    assert decays == sorted(decays) and decays[-1] == pytest.approx(0.99)
    assert ema_decay_at(0.99, jnp.int32(5), False) == 0.99
