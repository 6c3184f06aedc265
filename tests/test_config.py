"""Config: YAML loading, `--set` overrides, type and key checks, validation, partial sections."""

from pathlib import Path

import pytest

from ddm.core.config import Config, DataConfig, TrainConfig, config_from_data, load_config, parse_override, to_dict
from ddm.core.errors import DDMError

REPO = Path(__file__).resolve().parents[1]


def test_shipped_configs_load():
    digits = load_config(REPO / "configs" / "digits.yaml")
    assert digits.data.source == "digits" and digits.data.k == 4 and digits.data.embed_dim == 16
    assert digits.sample.strategies == ("top1", "top2", "full", "threshold:0.1", "sample", "top1+full:0.5")
    mnist = load_config(REPO / "configs" / "mnist10k.yaml")
    assert mnist.data.k == 8 and mnist.data.array_key == "data" and mnist.expert.model.patch_size == 4
    assert load_config(None) == Config()


def test_yaml_file_with_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  k: 3\n  tol: 1e-5\nexpert:\n  train:\n    steps: 10\n")
    cfg = load_config(path, ["data.k=5", "expert.train.lr=3e-4"])
    assert cfg.data.k == 5  # overrides win over the file
    assert cfg.data.tol == pytest.approx(1e-5) and isinstance(cfg.data.tol, float)  # `1e-5`, not YAML 1.1's str
    assert cfg.expert.train.steps == 10 and cfg.expert.train.lr == pytest.approx(3e-4)
    # Untouched fields keep their defaults.
    assert cfg.data.embedding == DataConfig().embedding and cfg.sample == Config().sample


@pytest.mark.parametrize(
    "text, section, key, expected",
    [
        ("expert.train.steps=200", "expert.train", "steps", 200),
        ("expert.train.lr=0.5", "expert.train", "lr", 0.5),
        ("expert.train.lr=2", "expert.train", "lr", 2.0),  # int accepted where a float is expected
        ("data.tol=1e-3", "data", "tol", 1e-3),
        ("data.source=/some/where.npz", "data", "source", "/some/where.npz"),
        ("data.source=hf:ylecun/mnist", "data", "source", "hf:ylecun/mnist"),
        ("data.image_size=None", "data", "image_size", None),
        ("data.image_size=null", "data", "image_size", None),
        ("data.image_size=32", "data", "image_size", 32),
        ("sample.strategies=[top1, full]", "sample", "strategies", ("top1", "full")),
    ],
)
def test_set_overrides_types(text, section, key, expected):
    cfg = load_config(None, [text])
    obj = cfg
    for part in section.split("."):
        obj = getattr(obj, part)
    value = getattr(obj, key)
    assert value == expected and type(value) is type(expected)


def test_override_bool_and_order():
    # No bool field in the schema today: check the parser itself, then that later overrides win.
    assert parse_override("a.b=true") == {"a": {"b": True}}
    assert parse_override("a.b=false") == {"a": {"b": False}}
    assert parse_override("a=[1, 2.5, x]") == {"a": [1, 2.5, "x"]}
    assert parse_override("a.b=") == {"a": {"b": ""}}
    assert load_config(None, ["data.k=3", "data.k=7"]).data.k == 7


@pytest.mark.parametrize("text", ["data.k", "=3", "data..k=3"])
def test_malformed_override(text):
    with pytest.raises(DDMError, match="override"):
        parse_override(text)


@pytest.mark.parametrize(
    "overrides, named",
    [
        (["data.kk=3"], "data.kk"),
        (["expert.train.stepz=3"], "expert.train.stepz"),
        (["nosuch=1"], "nosuch"),
        (["data.k=abc"], "data.k"),
        (["data.k=2.5"], "data.k"),
        (["data.k=true"], "data.k"),  # a bool is not an int
        (["expert.train.lr=fast"], "expert.train.lr"),
        (["data.source=[1, 2]"], "data.source"),
        (["sample.strategies=top1"], "sample.strategies"),
        (["data=3"], "data"),
    ],
)
def test_unknown_keys_and_wrong_types_name_the_key(overrides, named):
    with pytest.raises(DDMError) as err:
        load_config(None, overrides)
    message = str(err.value)
    assert named in message and "\n" not in message


def test_unknown_key_in_yaml_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("router:\n  train:\n    stepss: 5\n")
    with pytest.raises(DDMError, match=r"router\.train\.stepss"):
        load_config(path)


@pytest.mark.parametrize(
    "text, match",
    [
        ("- just\n- a list\n", "mapping"),
        ("data: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_yaml_files(tmp_path, text, match):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(DDMError, match=match):
        load_config(path)
    with pytest.raises(DDMError, match="not found"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    "overrides, named",
    [
        (["data.k=0"], "data.k"),
        (["data.k=-2"], "data.k"),
        (["data.embedding=clip"], "data.embedding"),
        (["data.kmeans=spectral"], "data.kmeans"),
        (["data.holdout_fraction=1.0"], "data.holdout_fraction"),
        (["data.balance_slack=0.5"], "data.balance_slack"),
        (["data.embedding=file"], "features_path"),
        (["data.image_size=0"], "data.image_size"),
        (["data.limit=0"], "data.limit"),
        (["expert.model.preset=huge"], "model.preset"),
        (["expert.model.dtype=float16"], "model.dtype"),
        (["expert.train.schedule=linear"], "train.schedule"),
        (["router.train.ema_decay=1.0"], "train.ema_decay"),
        (["router.arch=resnet"], "router.arch"),
        (["sample.solver=rk4"], "sample.solver"),
    ],
)
def test_post_init_validation(overrides, named):
    with pytest.raises(DDMError, match=named.replace(".", r"\.")):
        load_config(None, overrides)


def test_partial_sections_keep_their_own_defaults():
    cfg = config_from_data({"router": {"train": {"steps": 7}}, "expert": {"train": {"steps": 9}}})
    # The router's train section defaults differ from a plain TrainConfig (ema 0.99): a partial override must
    # keep the router's defaults, not fall back to TrainConfig's or the expert's.
    assert cfg.router.train.steps == 7 and cfg.router.train.ema_decay == 0.99
    assert cfg.expert.train.steps == 9 and cfg.expert.train.ema_decay == TrainConfig().ema_decay
    assert cfg.router.train.ema_decay != cfg.expert.train.ema_decay
    assert cfg.router.arch == "conv" and cfg.expert.model == Config().expert.model
    # Same through overrides on top of a file that sets other router.train keys.
    cfg = load_config(REPO / "configs" / "digits.yaml", ["router.train.lr=0.01"])
    assert cfg.router.train.lr == 0.01 and cfg.router.train.steps == 1000 and cfg.router.train.t_sampling == "uniform"


def test_to_dict_round_trip():
    cfg = load_config(REPO / "configs" / "digits.yaml", ["data.image_size=16"])
    plain = to_dict(cfg)
    assert isinstance(plain["sample"]["strategies"], list)
    assert config_from_data(plain) == cfg


def test_labels_and_guidance_settings():
    cfg = load_config(REPO / "configs" / "digits.yaml")
    assert cfg.data.labels == "auto" and cfg.data.label_column is None
    assert cfg.expert.model.num_classes is None  # resolved from the data by `ddm prepare`
    assert cfg.expert.train.class_dropout == 0.1 and cfg.router.train.class_dropout == 0.1
    # `--set data.labels=none` reads as null (the override parser's spelling of None): the same "none".
    assert load_config(None, ["data.labels=none"]).data.labels == "none"
    for bad, needle in [("data.labels=some", "data.labels"), ("expert.train.class_dropout=1.0", "class_dropout"),
                        ("sample.cfg_scale=-1", "cfg_scale"), ("expert.model.num_classes=-2", "num_classes"),
                        ("expert.model.num_classes=10001", "10,000"), ("expert.model.class_dropout=0.1", "unknown")]:
        with pytest.raises(DDMError, match=needle):
            load_config(None, [bad])


def test_with_num_classes():
    from ddm.core.config import with_num_classes

    cfg = load_config(None)
    assert with_num_classes(cfg, 10).expert.model.num_classes == 10
    assert with_num_classes(cfg, 0).expert.model.num_classes == 0
    assert with_num_classes(load_config(None, ["expert.model.num_classes=10"]), 10).expert.model.num_classes == 10
    with pytest.raises(DDMError, match="num_classes=3 disagrees with the data's 10 classes"):
        with_num_classes(load_config(None, ["expert.model.num_classes=3"]), 10)
    with pytest.raises(DDMError, match="num_classes=3, but the data has no class labels"):
        with_num_classes(load_config(None, ["expert.model.num_classes=3"]), 0)
    with pytest.raises(DDMError, match="num_classes=0 disagrees"):
        with_num_classes(load_config(None, ["expert.model.num_classes=0"]), 10)


def test_monolith_section_defaults_to_the_expert_and_takes_its_own_overrides():
    from ddm.core.config import monolith_job, with_num_classes

    cfg = load_config(REPO / "configs" / "digits.yaml", ["expert.train.lr=0.01"])
    assert cfg.monolith.model is None and cfg.monolith.train is None  # null: the expert's, as resolved
    assert monolith_job(cfg).train == cfg.expert.train and monolith_job(cfg).model == cfg.expert.model
    # A partial monolith section is completed from the expert's values (file + overrides), and only it changes.
    cfg = load_config(REPO / "configs" / "digits.yaml", ["monolith.train.steps=7", "expert.train.lr=0.01"])
    job = monolith_job(cfg)
    assert job.train.steps == 7 and job.train.lr == 0.01 and cfg.expert.train.steps == 2000
    assert job.train.batch_size == cfg.expert.train.batch_size and job.model == cfg.expert.model
    # As stored in a manifest and opened again with an override of its own.
    stored = config_from_data(to_dict(load_config(REPO / "configs" / "digits.yaml")), ["monolith.train.steps=3"])
    assert monolith_job(stored).train.steps == 3 and stored.expert.train.steps == 2000
    assert config_from_data(to_dict(cfg)) == cfg
    # Its model follows the data's classes; a disagreeing one is refused, bad values are one-line errors.
    resolved = with_num_classes(load_config(None, ["monolith.model.preset=micro"]), 10)
    assert monolith_job(resolved).model.num_classes == 10 and monolith_job(resolved).model.preset == "micro"
    with pytest.raises(DDMError, match="monolith.model.num_classes=3 disagrees"):
        with_num_classes(load_config(None, ["monolith.model.num_classes=3"]), 10)
    with pytest.raises(DDMError, match="train.steps"):
        load_config(None, ["monolith.train.steps=0"])
    with pytest.raises(DDMError, match="unknown config key monolith.train.stepz"):
        load_config(None, ["monolith.train.stepz=3"])
