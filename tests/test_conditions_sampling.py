"""Conditioning on per-image embeddings, the sampling side: `Ensemble` with `condition_shape` (pooled (D,) and tokens
(L, D)), the NaN null condition, batching, refusals; requests and records that name their conditions by digest,
`ddm sample --conditions / --prompt` and `ddm verify --conditions` end to end on a tiny captioned-digits run."""

from __future__ import annotations

import base64
import json
import time

import jax
import numpy as np
import pytest
from flax import nnx
from helpers import perturb

from ddm.app import cli
from ddm.core.config import RouterConfig
from ddm.core.dit import DiT
from ddm.core.errors import DDMError
from ddm.core.functional import model_apply
from ddm.data import captions
from ddm.router.model import router_from_config
from ddm.sampling.ensemble import Ensemble
from ddm.sampling.request import Request, conditions_sha256, generate
from ddm.verify.records import read_record, validate_record

SHAPE = (8, 8, 1)
KINDS = {"pooled": (16,), "tokens": (3, 16)}
N = 6


def _ensemble(condition_shape, experts: int = 2) -> Ensemble:
    """Randomly initialised tiny DiT experts and an MLP router, all taking `condition_shape` embeddings, their
    zero-initialised layers randomised (`perturb`) so that the conditions reach the outputs."""
    apply, states = None, []
    for k in range(experts):
        model = DiT(image_shape=SHAPE, patch_size=2, depth=1, width=32, heads=2, condition_shape=condition_shape,
                    rngs=nnx.Rngs(k))
        perturb(model, seed=k)
        apply_k, state = model_apply(model)
        apply = apply or apply_k
        states.append(state)
    router = router_from_config(RouterConfig(arch="mlp", preset="micro"), SHAPE, experts,
                                condition_shape=condition_shape, rngs=nnx.Rngs(9))
    perturb(router, seed=9)
    router_apply, router_state = model_apply(router)
    return Ensemble(apply, states, router_apply, router_state, image_shape=SHAPE, condition_shape=condition_shape,
                    min_bucket=4, prior_counts=[3, 5])


def _conditions(shape, n: int = N, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)


def _bits(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, np.float32).view(np.uint32)


@pytest.fixture(scope="module", params=sorted(KINDS))
def kind(request):
    return request.param


@pytest.fixture(scope="module")
def ensembles():
    return {name: _ensemble(shape) for name, shape in KINDS.items()}


def test_conditions_change_samples_and_none_is_the_null_condition(ensembles, kind):
    ens = ensembles[kind]
    y = _conditions(KINDS[kind])
    conditioned = ens.sample(N, "single:0", steps=2, seed=3, y=y)
    null = ens.sample(N, "single:0", steps=2, seed=3)
    other = ens.sample(N, "single:0", steps=2, seed=3, y=_conditions(KINDS[kind], seed=2))
    assert np.abs(conditioned.x - null.x).max() > 1e-3 and np.abs(conditioned.x - other.x).max() > 1e-3
    # the unconditional half of guidance is y=None's null: at scale 0 guidance is the unconditional flow
    np.testing.assert_allclose(ens.sample(N, "single:0", steps=2, seed=3, y=y, cfg_scale=0.0).x, null.x, atol=1e-5)
    # one row for all, and float16 rows, are the rows as float32
    np.testing.assert_array_equal(_bits(ens.sample(N, "single:0", steps=2, seed=3, y=y[0]).x),
                                  _bits(ens.sample(N, "single:0", steps=2, seed=3, y=np.repeat(y[:1], N, 0)).x))
    half = y.astype(np.float16)
    np.testing.assert_array_equal(_bits(ens.sample(N, "single:0", steps=2, seed=3, y=half).x),
                                  _bits(ens.sample(N, "single:0", steps=2, seed=3, y=half.astype(np.float32)).x))
    # the ensemble's null condition (NaN rows) is the model's own y=None
    x = jax.random.normal(jax.random.key(0), (N, *SHAPE))
    t = np.full((N,), 0.5, np.float32)
    v, _ = ens.velocity(x, t, "single:0")
    np.testing.assert_allclose(v, jax.jit(ens.expert_apply)(ens.expert_params[0], x, t, None), atol=1e-5)


def test_batching_and_merging_change_no_bit_of_a_fixed_strategy(ensembles):
    ens, y = ensembles["pooled"], _conditions(KINDS["pooled"])
    one = ens.sample(N, "single:1", steps=2, seed=5, y=y, cfg_scale=2.0)
    batched = ens.sample(N, "single:1", steps=2, seed=5, y=y, cfg_scale=2.0, batch_size=4)
    merged = ens.sample_rows([(7, 3), (5, N)], "single:1", steps=2, y=[y[0], y], cfg_scale=2.0)[1]
    assert np.array_equal(_bits(batched.x), _bits(one.x)) and np.array_equal(_bits(merged.x), _bits(one.x))


def test_routed_strategies_take_conditions(ensembles, kind):
    """Routed rows carry their conditions through the router, every dispatch's gathers and the batching: the
    same routing and values within rounding (as for class labels, tests/test_determinism.py)."""
    ens, y = ensembles[kind], _conditions(KINDS[kind])
    one = ens.sample(N, "top1", steps=2, seed=4, y=y, cfg_scale=2.0)
    batched = ens.sample(N, "top1", steps=2, seed=4, y=y, cfg_scale=2.0, batch_size=3)
    np.testing.assert_array_equal(batched.expert_ids, one.expert_ids)
    np.testing.assert_allclose(batched.x, one.x, atol=1e-5)
    # merged requests pad with copies of the last row: [n, *shape] rows as [n] labels
    merged = ens.sample_rows([(4, N), (8, 1)], "top1", steps=2, y=[y, y[0]], cfg_scale=2.0, pad_to=N + 2)[0]
    np.testing.assert_array_equal(merged.expert_ids, one.expert_ids)
    np.testing.assert_allclose(merged.x, one.x, atol=1e-5)
    dispatch = {"pooled": "grouped", "tokens": "capacity"}[kind]  # the accelerators' gathers, one kind each
    np.testing.assert_allclose(ens.replace(dispatch=dispatch).sample(N, "top1", steps=2, seed=4, y=y,
                                                                     cfg_scale=2.0).x, one.x, atol=1e-5)
    # the router sees the condition: other conditions, other weights
    x = jax.random.normal(jax.random.key(1), (N, *SHAPE))
    _, w = ens.velocity(x, 0.9, "full", y=y)
    _, w_null = ens.velocity(x, 0.9, "full")
    assert np.abs(np.asarray(w) - np.asarray(w_null)).max() > 1e-4


def test_prior_and_bad_conditions_are_one_line_refusals(ensembles):
    ens, y = ensembles["pooled"], _conditions(KINDS["pooled"])
    cases = [
        ({"strategy": "prior", "y": y}, "condition embeddings have no counts: use a router strategy"),
        ({"y": y[:, :8]}, r"conditions y have shape \[6, 8\]; this run takes \[n=6, 16\]"),
        ({"y": y[:4]}, r"conditions y have shape \[4, 16\]; this run takes \[n=6, 16\]"),
        ({"y": np.where(np.arange(N)[:, None] == 2, np.nan, y)}, r"NaN or Inf \(first at row 2\)"),
        ({"y": np.where(np.arange(N)[:, None] == 4, np.inf, y)}, r"NaN or Inf \(first at row 4\)"),
        ({"y": np.ones((N, 16), np.int32)}, "condition embeddings are floats"),
        ({"cfg_scale": 3.0}, "classifier-free guidance needs conditions y"),
    ]
    for kwargs, message in cases:
        with pytest.raises(DDMError, match=message) as err:
            ens.sample(N, **{"strategy": "top1", **kwargs})
        assert "\n" not in str(err.value)
    with pytest.raises(DDMError, match="not both"):
        ens.replace(num_classes=10)
    with pytest.raises(DDMError, match="condition shape .* must be"):
        ens.replace(condition_shape=(0,))


def test_requests_name_their_conditions_by_digest(ensembles):
    ens, y = ensembles["pooled"], _conditions(KINDS["pooled"])
    digest = conditions_sha256(y)
    assert digest == conditions_sha256(y.astype(np.float64)) != conditions_sha256(y[:, ::-1].copy())
    request = Request(seed=3, n=N, strategy="single:0", steps=2, solver="euler", cfg_scale=2.0,
                      conditions_sha256=digest)
    assert Request.from_json(json.loads(json.dumps(request.to_json()))) == request
    assert "conditions_sha256" not in Request(n=2).to_json()  # requests without conditions read as they always did
    result = generate(ens, request, conditions=y)
    expected = ens.sample(N, "single:0", steps=2, seed=3, y=y, cfg_scale=2.0)
    assert np.array_equal(_bits(result.x), _bits(expected.x))
    for conditions, message in ((None, "give the file it was sampled with"),
                                (y[::-1].copy(), "do not match the request")):
        with pytest.raises(DDMError, match=message):
            generate(ens, request, conditions=conditions)
    with pytest.raises(DDMError, match="names no condition embeddings"):
        generate(ens, Request(n=N, strategy="single:0", steps=2), conditions=y)
    with pytest.raises(DDMError, match="not conditioned on embeddings"):
        generate(ens.replace(condition_shape=(), num_classes=0, router_apply=None), request, conditions=y)
    for bad in ({"conditions_sha256": "ABC"}, {"conditions_sha256": digest, "labels": [1] * N}):
        with pytest.raises(DDMError):
            Request.from_json({**request.to_json(), **bad})


# ---------------------------------------------------------------------------------------------------------
# End to end: a tiny captioned-digits run, `ddm sample` and `ddm verify`.
# ---------------------------------------------------------------------------------------------------------

def _ddm(*args) -> int:
    return cli.main([str(a) for a in args])


def _one_line_error(capsys, needle: str) -> None:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


def test_sample_prompts_and_verify_with_the_conditions_file(captions_run, tmp_path, capsys, monkeypatch):
    run, common = captions_run, ("--strategy", "single:0")
    prompts = ["a thick 7 leaning right", "a thin 1 upright"]
    assert _ddm("sample", "--run-dir", run, *common, "--prompt", prompts[0], "--prompt", prompts[1],
                "--record", tmp_path / "rec.json", "--out", tmp_path / "a.png") == 0
    with np.load(tmp_path / "a.npz") as a:
        np.testing.assert_array_equal(a["conditions"], captions.encode(prompts))
        request = json.loads(str(a["request"]))
        images = a["images"]
    assert request["n"] == 2 and request["cfg_scale"] == 3.0  # guided by sample.cfg_scale, as classes are
    assert request["conditions_sha256"] == conditions_sha256(captions.encode(prompts))
    record, _ = read_record(tmp_path / "rec.json")
    assert record["request"]["conditions_sha256"] == request["conditions_sha256"]
    # the npz's conditions reproduce the grid; one prompt is for all n
    assert _ddm("sample", "--run-dir", run, *common, "--conditions", tmp_path / "a.npz",
                "--out", tmp_path / "b.png") == 0
    with np.load(tmp_path / "b.npz") as b:
        np.testing.assert_array_equal(b["images"], images)
    assert _ddm("sample", "--run-dir", run, *common, "--prompt", prompts[0], "--n", 3, "--out", tmp_path / "c.png") == 0
    with np.load(tmp_path / "c.npz") as c:
        np.testing.assert_array_equal(c["conditions"], captions.encode(prompts[:1] * 3))
    capsys.readouterr()

    assert _ddm("verify", tmp_path / "rec.json", "--run-dir", run, "--conditions", tmp_path / "a.npz") == 0
    assert "overall: HONEST" in capsys.readouterr().out
    assert _ddm("verify", tmp_path / "rec.json", "--run-dir", run) == 2
    _one_line_error(capsys, "give the file it was sampled with, --conditions FILE")
    np.save(tmp_path / "other.npy", captions.encode(["a thin 7 leaning right", prompts[1]]))
    assert _ddm("verify", tmp_path / "rec.json", "--run-dir", run, "--conditions", tmp_path / "other.npy") == 2
    _one_line_error(capsys, "the conditions of --conditions do not match the record")
    # a claim that names other conditions than the images were drawn for: regenerated with those, not honest
    forged = dict(record, request={**record["request"], "conditions_sha256": conditions_sha256(
        np.load(tmp_path / "other.npy"))})
    validate_record(forged)
    (tmp_path / "forged.json").write_text(json.dumps(forged))
    assert _ddm("verify", tmp_path / "forged.json", "--run-dir", run, "--conditions", tmp_path / "other.npy") == 1
    assert "NOT HONEST" in capsys.readouterr().out


def test_sample_refusals_are_one_line(captions_run, tmp_path, capsys, monkeypatch):
    run, out = captions_run, ("--out", tmp_path / "x.png")
    np.save(tmp_path / "c4.npy", captions.encode(["a 1"] * 4))
    np.save(tmp_path / "wide.npy", np.zeros((2, 8), np.float32))
    (tmp_path / "badenc.py").write_text("import numpy as np\n\ndef encode(texts):\n"
                                        "    return np.zeros((len(texts), 3), np.float32)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cases = [
        (("--class", 3), "conditioned on condition embeddings of shape [64], not classes"),
        (("--prompt", "a 7", "--strategy", "prior"), "condition embeddings have no counts"),
        (("--conditions", tmp_path / "c4.npy", "--n", 3), "has 4 rows for --n 3 images"),
        (("--conditions", tmp_path / "wide.npy"), "this run takes [n=2, 64]"),
        (("--conditions", tmp_path / "c4.npy", "--prompt", "a 1"), "give --conditions or --prompt, not both"),
        (("--prompt", "a 7", "--set", "sample.condition_encoder=no_such_module:encode"), "cannot import 'no_such_module'"),
        (("--prompt", "a 7", "--set", "sample.condition_encoder=badenc:encode"), "returned float32 [4, 3]"),
        (("--prompt", "a", "--prompt", "b", "--n", 3), "2 prompts for 3 images"),
        (("--prompt", "a 7", "--n", 10**9), "exceeds sample.max_n"),  # before the encoder makes 10^9 copies
        (("--strategy", "single:0", "--cfg-scale", 2), "needs conditions: give --conditions or --prompt"),
    ]
    for args, needle in cases:
        assert _ddm("sample", "--run-dir", run, *args, *out) == 2, args
        _one_line_error(capsys, needle)
    assert not list(tmp_path.glob("x.*"))


# ---------------------------------------------------------------------------------------------------------
# The rest of the product on a run with embeddings: `ddm run`'s guided grids, the router from expert samples,
# the trainer's and the assembler's checks, `ddm info`, the model card, the audit's replay config.
# ---------------------------------------------------------------------------------------------------------


def test_run_guided_grids_show_captions_or_holdout_conditions(captions_run, tmp_path):
    from ddm.app import pipeline
    from ddm.data.run import Run
    from ddm.sampling.load import load_ensemble

    run = Run.open(captions_run)
    conditions, what = pipeline.guided_conditions(run)
    per = pipeline.GUIDED_PER_CLASS
    np.testing.assert_array_equal(conditions, np.repeat(captions.encode(list(pipeline.GUIDED_CAPTIONS)), per, 0))
    assert "a thin 0 leaning left" in what and len(set(pipeline.GUIDED_CAPTIONS)) == 10
    # other embeddings: the first hold-out conditions, one row each
    other = Run.open(captions_run, ["data.conditions=elsewhere.npy"])
    conditions, what = pipeline.guided_conditions(other)
    held = run.holdout_set()[2]
    np.testing.assert_array_equal(conditions, np.repeat(held[:pipeline.GUIDED_MAX_CLASSES], per, 0))
    assert f"the first {min(len(held), pipeline.GUIDED_MAX_CLASSES)} of the run's held-out" in what
    # the grid is sampled with them, guided, and its npz holds them (so ddm sample / verify --conditions reuse it)
    rows = conditions[:2 * per]
    request = pipeline.guided_request(run.config, "single:0", None, rows)
    assert request.cfg_scale == run.config.sample.cfg_scale and request.conditions_sha256 == conditions_sha256(rows)
    images, png = pipeline._sample(run, load_ensemble(run, with_router=False), request, tmp_path / "g.png",
                                   ncols=per, conditions=rows)
    with np.load(tmp_path / "g.npz") as saved:
        np.testing.assert_array_equal(saved["conditions"], rows)
    assert images.shape[0] == 2 * per and png.exists()


def test_router_from_experts_refuses_a_router_that_takes_the_condition(captions_run):
    from ddm.data.run import Run
    from ddm.data.shards import NO_LABEL
    from ddm.sampling.router_set import draw_router_set

    with pytest.raises(DDMError, match="router.source=experts cannot train a router that takes the condition") as e:
        draw_router_set(Run.open(captions_run))
    assert "\n" not in str(e.value)
    # without the condition: each expert's null-condition samples, no conditions in the set
    run = Run.open(captions_run, ["router.condition=false", "router.expert_samples=4", "router.expert_steps=2"])
    data = draw_router_set(run)
    assert len(data.images) == 4 and (data.classes == NO_LABEL).all()


def test_trainer_and_assembler_check_the_conditions(captions_run, tmp_path):
    import dataclasses
    import shutil

    from ddm.data.run import Run
    from ddm.experts.assemble import plan_bundle
    from ddm.experts.train import _reader

    run = Run.open(captions_run)
    job = run.config.expert
    for shape, held in (((3,), "the model takes conditions of shape [3] but the shards have conditions of shape [64]"),
                        ((), "the model takes no condition embeddings but the shards have conditions of shape [64]")):
        other = dataclasses.replace(job, model=dataclasses.replace(job.model, condition_shape=shape))
        with pytest.raises(DDMError, match=__import__("re").escape(held)):
            _reader(run.shard_paths(), run.cluster_ids, other, run.shard_digests())
    # an island.json that drops the plan's condition dtype is not the plan's
    copy = tmp_path / "run"
    shutil.copytree(captions_run, copy)
    island = copy / "islands" / "0" / "island.json"
    record = json.loads(island.read_text())
    del record["dataset"]["condition_dtype"]
    island.write_text(json.dumps(record))
    with pytest.raises(DDMError, match="dataset.condition_dtype is None, the plan's is 'float32': island.json was edited"):
        plan_bundle(Run.open(copy), 0)



def test_router_and_student_trainers_check_the_conditions(captions_run, tmp_path, capsys):
    """A manifest whose condition shape no longer matches its shards' is refused by the router's and the
    student's trainers in one line, before any step."""
    import shutil

    from ddm.experts.distill import train_student

    copy = tmp_path / "run"
    shutil.copytree(captions_run, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["dataset"]["condition_shape"] = [3]
    for section in ("expert", "distill", "monolith"):  # as prepared from data of that shape
        if manifest["config"][section].get("model"):
            manifest["config"][section]["model"]["condition_shape"] = [3]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    held = "the model takes conditions of shape [3] but the shards have conditions of shape [64]"
    assert cli.main(["train-router", "--run-dir", str(copy), "--no-progress"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"ddm: error: {held}"]
    # the student's check comes before its teacher (this run's experts are not all trained) is ever called
    with pytest.raises(DDMError, match=__import__("re").escape(held)):
        train_student(copy, teacher=None, teacher_kind="cluster", overrides=["distill.train.steps=1"])

def test_info_and_model_card_name_the_conditioning(captions_run):
    from ddm.app.info import describe
    from ddm.core.config import ModelConfig
    from ddm.data.run import Run
    from ddm.sampling.export import _conditioning

    run = Run.open(captions_run)
    text = describe(run)
    assert "conditions [64] float32 embeddings per image (data.conditions captions)" in text
    assert "unconditional" not in text and "the router takes them too" in text
    assert "router.condition false" in describe(Run.open(captions_run, ["router.condition=false"]))
    assert _conditioning(run.config.expert.model) == "condition embeddings [64] per image (CFG)"
    assert _conditioning(ModelConfig(num_classes=0, condition_shape=())) == "unconditional"
    assert _conditioning(ModelConfig(num_classes=10, condition_shape=())) == "10 classes (CFG)"


def test_audit_replays_with_the_bundles_condition_shape(captions_run):
    from ddm.experts.records import read_expert_json
    from ddm.verify.audit import _island_bundle

    out, bundle_dir = captions_run / "experts" / "0", captions_run / "islands" / "0"
    record = read_expert_json(out)
    bundle, notes = _island_bundle(bundle_dir, record, out)
    assert bundle.config.expert.model.condition_shape == (64,) and notes == []
    unsaid = {key: v for key, v in record.items() if key != "config_digest"}
    unsaid["model"] = {key: v for key, v in record["model"].items() if key != "condition_shape"}
    assert _island_bundle(bundle_dir, unsaid, out)[0].config.expert.model.condition_shape == (64,)
    claimed = dict(unsaid, model={**record["model"], "condition_shape": [3]})
    with pytest.raises(DDMError, match=r"condition_shape=\[3\], but the data has condition embeddings of shape \[64\]"):
        _island_bundle(bundle_dir, claimed, out)


def test_eval_router_reports_the_router_given_the_condition(captions_run, tmp_path):
    import shutil

    from ddm.app.router import train_router_command
    from ddm.router.evaluate import evaluate_router, format_router_report

    run = tmp_path / "run"
    shutil.copytree(captions_run, run)
    steps = ["router.train.steps=2", "router.train.batch_size=8", "router.train.warmup_steps=1",
             "router.train.checkpoint_every=2", "router.train.log_every=2"]
    train_router_command(run, steps)
    report = evaluate_router(run, steps, repeats=1)
    given = report["given_condition"]
    assert 0 <= given["accuracy"] <= 1 and given["cross_entropy"] >= 0
    assert "given the condition c: accuracy" in format_router_report(report)
    assert json.loads((run / "eval" / "router.json").read_text())["given_condition"] == given


# ---------------------------------------------------------------------------------------------------------
# `ddm serve` on a run with embeddings: prompts through the run's encoder, or the embeddings themselves.
# ---------------------------------------------------------------------------------------------------------


ZERO_ROW = base64.b64encode(bytes(4 * 64)).decode()  # one float32 [64] row of zeros on the wire


@pytest.fixture(scope="module")
def captions_client(captions_run):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from ddm.serve.app import create_app

    with TestClient(create_app(captions_run, max_wait_ms=0)) as client:
        yield client


def test_serve_generates_from_prompts_and_embeddings_and_verifies_with_them(captions_client):
    from ddm.serve.schemas import decode_array, encode_array

    client, prompts = captions_client, ["a thick 7 leaning right", "a thin 1 upright"]
    card = client.get("/v1/models").json()["data"][0]
    assert card["conditioning"] == {"kind": "embeddings", "shape": [64], "prompts": True}
    assert "prior" not in card["strategies"] and card["default_strategy"] == "single:0"  # no router, no counts

    r = client.post("/v1/images/generations", json={"prompt": prompts, "seed": 3, "steps": 2, "cfg_scale": 2.0,
                                                    "record": True, "arrays": True})
    assert r.status_code == 200, r.text
    reply, rows = r.json(), captions.encode(prompts)
    request = Request.from_json(reply["request"])
    assert request.n == 2 and request.strategy == "single:0" and request.conditions_sha256 == conditions_sha256(rows)
    np.testing.assert_array_equal(decode_array(reply["arrays"]["conditions"]), rows)
    expected = generate(client.app.state.ensemble, request, conditions=rows)  # alone: bit for bit `ddm sample`
    np.testing.assert_array_equal(decode_array(reply["arrays"]["x"]), expected.x)

    # the embeddings themselves give the same images; one prompt is for all n
    same = client.post("/v1/images/generations", json={"conditions": encode_array(rows), "seed": 3, "steps": 2,
                                                       "cfg_scale": 2.0}).json()
    assert [d["b64_json"] for d in same["data"]] == [d["b64_json"] for d in reply["data"]]
    one = client.post("/v1/images/generations", json={"prompt": prompts[0], "n": 3, "steps": 2}).json()
    assert Request.from_json(one["request"]).conditions_sha256 == conditions_sha256(captions.encode(prompts[:1] * 3))

    # the record verifies with its embeddings, and is refused without them or with others
    record = reply["record"]
    verdict = client.post("/v1/verify", json={"record": record, "conditions": reply["arrays"]["conditions"]})
    assert verdict.status_code == 200 and verdict.json()["honest"] is True, verdict.text
    for body, reason in ((record, "was made for condition embeddings"),
                         ({"record": record, "conditions": encode_array(captions.encode(prompts[::-1]))}, "sha256"),
                         ({"record": record, "conditions": {"dtype": "float32", "shape": [2, 64], "b64": "AAAA"}},
                          "malformed conditions")):
        refused = client.post("/v1/verify", json=body)
        assert refused.status_code == 422 and reason in refused.json()["detail"], refused.text

    # an asynchronous job takes a prompt too
    job = client.post("/v1/jobs", json={"prompt": prompts, "seed": 3, "steps": 2, "cfg_scale": 2.0})
    assert job.status_code == 202, job.text
    for _ in range(600):
        state = client.get(f"/v1/jobs/{job.json()['id']}").json()
        if state["status"] in ("done", "failed"):
            break
        time.sleep(0.05)
    assert state["status"] == "done", state
    assert [d["b64_json"] for d in state["result"]["data"]] == [d["b64_json"] for d in reply["data"]]



def test_serve_merges_requests_with_embeddings_each_with_its_own(captions_client):
    """Concurrent requests with prompts run as one merged call, each row with its own embeddings: for a fixed
    strategy (single:K, chunks of one shape) bit for bit what each gives alone, and each record verifies."""
    from helpers import concurrently

    from ddm.serve.schemas import decode_array

    client = captions_client
    bodies = [{"prompt": p, "n": 2, "seed": s, "steps": 2, "cfg_scale": 2.0, "record": True, "arrays": True}
              for p, s in (("a thick 7 leaning right", 1), ("a thin 1 upright", 2), ("a 4", 3))]
    replies = concurrently(client.app, client, bodies)
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
    for body, reply in zip(bodies, replies):
        reply = reply.json()
        rows = captions.encode([body["prompt"]] * 2)
        request = Request.from_json(reply["request"])
        assert request.conditions_sha256 == conditions_sha256(rows)
        alone = generate(client.app.state.ensemble, request, conditions=rows)
        np.testing.assert_array_equal(decode_array(reply["arrays"]["x"]), alone.x)
        assert "merged batch: 3 requests, 6 images" in json.dumps(reply["record"])
        verdict = client.post("/v1/verify", json={"record": reply["record"], "conditions": reply["arrays"]["conditions"]})
        assert verdict.status_code == 200 and verdict.json()["honest"] is True, verdict.text

@pytest.mark.parametrize("body, reason", [
    ({"prompt": "a 7", "conditions": {"dtype": "float32", "shape": [1, 64], "b64": ""}}, "not both"),
    ({"prompt": "a 7", "class": 3}, "not both"),
    ({"prompt": ["a", "b"], "n": 3}, "2 prompts for 3 images"),
    ({"prompt": []}, "empty"),
    ({"prompt": "a 7", "strategy": "prior"}, "condition embeddings have no counts"),
    ({"conditions": {"dtype": "float32", "shape": [64], "b64": ZERO_ROW}}, "this run takes [n, 64]"),
    ({"conditions": {"dtype": "float32", "shape": [2, 64], "b64": "AAAA"}}, "malformed conditions"),
    ({"conditions": {"dtype": "int32", "shape": [1, 64], "b64": ZERO_ROW}}, "condition embeddings are floats"),
    ({"conditions": {"dtype": "float32", "shape": [1, 64], "b64": ZERO_ROW}, "n": 2}, "1 rows for n=2"),
    ({"cfg_scale": 2.0}, "needs conditions"),
    ({"prompt": "a 7", "n": 10**9}, "exceeds sample.max_n"),  # refused before the encoder makes 10^9 copies
])
def test_serve_refuses_bad_conditions_with_a_one_line_reason(captions_client, body, reason):
    r = captions_client.post("/v1/images/generations", json={"steps": 2, **body})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and reason in detail, detail


def test_serve_page_has_a_prompt_field_on_a_run_with_an_encoder(captions_client):
    page = captions_client.get("/").text
    assert 'id="prompt"' in page and 'placeholder="a prompt for every image"' in page
    assert 'value="single:0"' in page and "conditioned on embeddings [64]" in page


def test_sample_with_server_sends_the_prompts_embeddings(captions_run, captions_client, tmp_path, monkeypatch):
    """`ddm sample --server URL --prompt ...` writes what the local `ddm sample` writes (the server here is the
    in-process app: httpx.Client is pointed at it)."""
    import httpx

    class InProcess:  # stands in for httpx.Client, and leaves the app running when the client is done
        def __init__(self, **_):
            pass

        def __enter__(self):
            return captions_client

        def __exit__(self, *_):
            return False

    common = ("--run-dir", captions_run, "--strategy", "single:0", "--steps", 2, "--prompt", "a thick 7 leaning right",
              "--prompt", "a thin 1 upright")
    assert _ddm("sample", *common, "--out", tmp_path / "local.png") == 0
    monkeypatch.setattr(httpx, "Client", InProcess)
    assert _ddm("sample", *common, "--server", "http://testserver", "--out", tmp_path / "served.png") == 0
    with np.load(tmp_path / "local.npz") as local, np.load(tmp_path / "served.npz") as served:
        assert sorted(local.files) == sorted(served.files)
        for name in local.files:
            np.testing.assert_array_equal(local[name], served[name], err_msg=name)


def test_evaluate_leaves_prior_out_of_its_defaults_on_embeddings_and_refuses_it_asked(captions_run, capsys):
    from ddm.eval.evaluate import DEFAULT_STRATEGIES, evaluation_strategies

    assert "prior" in DEFAULT_STRATEGIES and evaluation_strategies(None, ()) == list(DEFAULT_STRATEGIES)
    assert evaluation_strategies(None, (64,)) == [s for s in DEFAULT_STRATEGIES if s != "prior"]
    assert evaluation_strategies(["top1", "single:0"], (64,)) == ["top1", "single:0"]
    assert _ddm("evaluate", "--run-dir", captions_run, "--strategies", "top1,prior", "--n", 8) == 2
    _one_line_error(capsys, "condition embeddings have no counts: use a router strategy (top1, top2, full, "
                            "threshold:TAU, sample); leave it out of --strategies")


@pytest.fixture(scope="module")
def routed_captions_run(captions_run, tmp_path_factory):
    """A copy of the captions run with a router (2 steps), for the commands that route: consensus-eval, evaluate."""
    import shutil

    from router.train import train_router

    run = tmp_path_factory.mktemp("routed") / "run"
    shutil.copytree(captions_run, run)
    train_router(run, ["router.train.steps=2"])
    return run


def test_consensus_eval_draws_its_claims_for_the_prompts(routed_captions_run, tmp_path, capsys):
    """The claims name the prompts' embeddings by digest and the verifier process regenerates with them: honest
    claims are bit-exact, and images drawn at the null condition for a prompt are caught."""
    run = routed_captions_run
    out = tmp_path / "eval"
    assert _ddm("consensus-eval", "--run-dir", run, "--prompt", "a thick 7", "--prompt", "a thin 1", "--prompt",
                "a 3", "--verifiers", 1, "--requests", 1, "--images", 4, "--steps", 2, "--copiers", "none",
                "--out", out) == 0
    report = json.loads((out / "consensus_report.json").read_text())
    prompts = captions.encode(["a thick 7", "a thin 1", "a 3"])
    assert report["conditions"] == {"rows": 3, "shape": [64], "sha256": conditions_sha256(prompts)}
    claims = json.loads((out / "consensus_work" / "claims.json").read_text())["claims"]
    # the request takes the prompts cycled, rows 0, 1, 2, 0, and every claim of it too
    assert {c["record"]["request"]["conditions_sha256"] for c in claims} == {conditions_sha256(prompts[[0, 1, 2, 0]])}
    modes = report["analysis"]["modes"]["exact"]
    assert modes["honest"]["majority"] == 0.0 and modes["honest_single"]["majority"] == 0.0
    assert modes["ignored_conditions"]["majority"] == 1.0 and report["analysis"]["claims_per_kind"][
        "ignored_conditions"] == 1
    capsys.readouterr()
    assert _ddm("consensus-eval", "--run-dir", run, "--conditions", tmp_path / "none.npy", "--out", out) == 2
    _one_line_error(capsys, "none.npy")


def test_condition_match_finds_the_condition_of_the_nearest_real_image():
    from ddm.eval.conditional import chance_match, condition_match, cosine_rows

    rng = np.random.default_rng(0)
    real, conditions = rng.standard_normal((50, 8)), rng.standard_normal((50, 4, 3)).astype(np.float32)
    np.testing.assert_allclose(cosine_rows(conditions, conditions), 1.0)
    assert cosine_rows(np.zeros((1, 2)), np.ones((1, 2)))[0] == 0.0
    picked = rng.permutation(50)[:20]
    # samples that sit on real images and were drawn for those images' conditions match perfectly ...
    assert condition_match(real[picked] + 1e-6, conditions[picked], real, conditions) == pytest.approx(1.0)
    # ... and drawn for other conditions, they score those conditions against their images'
    other = np.roll(picked, 1)
    assert condition_match(real[picked], conditions[other], real, conditions) == pytest.approx(
        cosine_rows(conditions[other], conditions[picked]).mean())
    assert abs(chance_match(conditions)) < 0.3 and chance_match(conditions) == chance_match(conditions)


def test_evaluate_scores_condition_following_on_held_out_embeddings(routed_captions_run, tmp_path):
    from ddm.data.shards import read_conditions
    from ddm.eval.conditional import chance_match

    run = routed_captions_run
    out = run / "eval"
    assert _ddm("evaluate", "--run-dir", run, "--n", 8, "--steps", 2, "--strategies", "top1",
                "--feature-steps", 5, "--cache-dir", tmp_path / "cache", "--cfg-scales", "1,3", "--class-n", 6) == 0
    report = json.loads((out / "report.json").read_text())
    held_out = read_conditions(str(run / "shards" / "holdout"))
    cond = report["conditional"]
    assert cond["n"] == 6 and cond["cfg_scales"] == [1.0, 3.0]
    assert cond["chance_match"] == pytest.approx(chance_match(np.asarray(held_out, np.float32), 0))
    assert cond["real_match"] == report["results"]["real (train)"]["condition_match"]
    cells = report["results"]["top1"]["conditional"]
    assert set(cells) == {"1", "3"} and all(c["fd"] > 0 and -1 <= c["condition_match"] <= 1 for c in cells.values())
    assert "Condition following" in (out / "report.md").read_text() and "| top1 | " in (out / "report.md").read_text()
