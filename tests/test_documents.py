"""JSON documents (`ddm.core.documents`): canonical bytes and digests, atomic writes, strict checked reads, and
the documents built on them (island.json, expert.json) refusing damage with one line naming the file."""

from __future__ import annotations

import hashlib
import io
import json
import math

import pytest

from ddm.core import documents, files
from ddm.core.config import Config, to_dict
from ddm.core.errors import DDMError
from ddm.core.schema import Hex, Int, Obj
from ddm.data.islands import ISLAND_JSON, Bundle, island_record, write_island_json
from ddm.experts.records import EXPERT_FORMAT, EXPERT_JSON, read_expert_json

SCHEMA = Obj({"format": Hex(4), "n": Int(min=1)})


def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text and "Traceback" not in text
    return text


# --- canonical bytes -------------------------------------------------------------------------------------------


def test_canonical_bytes_are_sorted_compact_ascii_and_independent_of_key_order():
    a = {"b": [1, 2.5, None, True], "a": {"y": "é", "x": 1}}
    b = {"a": {"x": 1, "y": "é"}, "b": [1, 2.5, None, True]}
    expected = b'{"a":{"x":1,"y":"\\u00e9"},"b":[1,2.5,null,true]}'
    assert documents.canonical_bytes(a) == documents.canonical_bytes(b) == expected
    assert documents.digest(a) == documents.digest(b) == hashlib.sha256(expected).hexdigest()
    # what the manifest, bundle and expert digests were computed with before this module: unchanged
    before = json.dumps(a, sort_keys=True, separators=(",", ":")).encode()
    assert documents.digest(a) == hashlib.sha256(before).hexdigest()


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, {"x": [1.0, math.nan]}, {1j: 2}, object()])
def test_nan_inf_and_non_json_values_are_refused(bad, tmp_path):
    with pytest.raises(DDMError, match="^not canonical JSON: ") as err:
        documents.digest(bad)
    _one_line(err)
    with pytest.raises(DDMError, match="^cannot write as JSON: "):
        documents.write(tmp_path / "doc.json", bad)
    assert list(tmp_path.iterdir()) == []


# --- atomic write ----------------------------------------------------------------------------------------------


def test_write_is_indented_ascii_and_leaves_no_temporary_file(tmp_path):
    path = documents.write(tmp_path / "sub" / "doc.json", {"b": 1, "a": "é"})
    assert path.read_text() == '{\n  "b": 1,\n  "a": "\\u00e9"\n}\n'  # keys in the order given
    assert documents.write(path, [1], indent=1).read_text() == "[\n 1\n]\n"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["doc.json", "sub"]


def test_a_failure_mid_write_leaves_the_old_document_and_no_temporary_file(tmp_path, monkeypatch):
    path = documents.write(tmp_path / "doc.json", {"n": 1})
    before = path.read_bytes()

    class Torn(io.BytesIO):  # writes half the bytes to the real file, then the disk "fails"
        def __init__(self, name):
            super().__init__()
            self.real = open(name, "wb")  # noqa: SIM115 - closed in __exit__

        def write(self, data):
            self.real.write(data[: len(data) // 2])
            self.real.flush()
            raise OSError(28, "No space left on device")

        def __exit__(self, *exc):
            self.real.close()

    monkeypatch.setattr(files, "open", lambda name, mode: Torn(name), raising=False)
    with pytest.raises(OSError, match="No space left"):
        documents.write(path, {"n": 2, "padding": "x" * 1000})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["doc.json"]

    monkeypatch.setattr(files.os, "replace", lambda *a: (_ for _ in ()).throw(OSError(5, "I/O error")))
    with pytest.raises(OSError):
        documents.write(path, {"n": 3})
    monkeypatch.undo()
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["doc.json"]


# --- checked reads ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, message", [
    ('{"format": "abcd", "n": ', "is not valid JSON: Expecting value"),
    ('{"format": "abcd", "n": 1, "n": 2}', "is not valid JSON: duplicate key 'n'"),
    ('{"format": "abcd", "n": NaN}', "is not valid JSON: NaN is not a JSON number"),
    ('{"format": "abcd", "n": Infinity}', "is not valid JSON: Infinity is not a JSON number"),
    ("[" * 100_000 + "]" * 100_000, "is not valid JSON"),
    ('{"n": ' + "9" * 5000 + "}", "is not valid JSON"),
    ('{"format": "abcd", "n": 0}', ": n must be an integer >= 1, got 0"),
    ('{"format": "abcd"}', ": n is missing"),
    ('{"format": "ABCD", "n": 1}', ": format must be 4 lowercase hex digits, got 'ABCD'"),
    ("[1, 2]", ": the document must be an object, got [1, 2]"),
])
def test_read_refuses_bad_json_and_schema_violations_with_one_line_naming_the_file(tmp_path, text, message):
    path = tmp_path / "doc.json"
    path.write_text(text)
    with pytest.raises(DDMError) as err:
        documents.read(path, SCHEMA, "test document")
    line = _one_line(err)
    assert line.startswith(f"test document {path}") and message in line, line


def test_read_missing_file_bytes_format_and_a_good_document(tmp_path):
    with pytest.raises(DDMError, match=r"^no test document at .*nope\.json: make one first$"):
        documents.read(tmp_path / "nope.json", SCHEMA, "test document", missing="make one first")
    (tmp_path / "bin.json").write_bytes(bytes(range(256)))
    with pytest.raises(DDMError, match="is not valid JSON"):
        documents.read(tmp_path / "bin.json", SCHEMA, "test document")
    with pytest.raises(DDMError, match=r"cannot be read: Is a directory$"):
        documents.read(tmp_path, SCHEMA, "test document")
    path = documents.write(tmp_path / "doc.json", {"format": "abcd", "n": 3, "later": [1]})
    assert documents.read(path, SCHEMA, "test document") == {"format": "abcd", "n": 3, "later": [1]}
    assert documents.read(path, SCHEMA, "test document", fmt="abcd")["n"] == 3
    with pytest.raises(DDMError, match=r"doc\.json is not a ddm-x/v1 document$"):
        documents.read(path, SCHEMA, "test document", fmt="ddm-x/v1")


# --- island.json and expert.json -------------------------------------------------------------------------------


def _expert() -> dict:
    return {"format": EXPERT_FORMAT, "run_id": "a" * 64, "cluster": 1, "bundle_sha256": "b" * 64,
            "shard_sha256": "c" * 64, "model_digest": "d" * 64, "config_digest": "e" * 64, "ema_sha256": "f" * 64,
            "step": 40, "final": "final", "model": {}, "train": {}, "hardware": {"host": "x"}, "seconds": 8.4,
            "finished": "2026-01-01T00:00:00+0000"}


@pytest.mark.parametrize("change, message", [
    (lambda r: r.update(ema_sha256="ab"), "ema_sha256 must be 64 lowercase hex digits, got 'ab'"),
    (lambda r: r.__delitem__("run_id"), "run_id is missing"),
    (lambda r: r.update(cluster=-1), "cluster must be an integer in 0..65535, got -1"),
    (lambda r: r.update(step="40"), "step must be an integer >= 0, got '40'"),
    (lambda r: r.update(final="../../elsewhere"), "final must be a folder name"),
    (lambda r: r.update(format="ddm-expert/v0"), "is not a ddm-expert/v1 document"),
    (lambda r: "[1, 2", "is not valid JSON"),
    (lambda r: json.dumps(r)[:-1] + ', "step": 41}', "duplicate key 'step'"),
])
def test_a_tampered_or_malformed_expert_json_is_refused_with_one_line(tmp_path, change, message):
    (tmp_path / EXPERT_JSON).write_text(json.dumps(_expert()))
    assert read_expert_json(tmp_path) == _expert()
    record = _expert()
    text = change(record)
    (tmp_path / EXPERT_JSON).write_text(text if isinstance(text, str) else json.dumps(record))
    with pytest.raises(DDMError) as err:
        read_expert_json(tmp_path)
    line = _one_line(err)
    assert line.startswith(f"expert record {tmp_path / EXPERT_JSON}") and message in line, line


def _island() -> dict:
    dataset = {"fingerprint": "1" * 64, "image_shape": [8, 8, 1], "num_classes": 0, "class_names": None}
    return island_record("2" * 64, 3, dataset, {"path": "shard", "sha256": "3" * 64, "count": 10},
                         None, to_dict(Config()))


@pytest.mark.parametrize("change, message", [
    (lambda r: r["shard"].update(sha256="x" * 64), "shard.sha256 must be 64 lowercase hex digits"),
    (lambda r: r["shard"].update(path="/etc"), "shard.path must be a relative path inside the run"),
    (lambda r: r["dataset"].update(image_shape=[8, 8]), "dataset.image_shape must be a list of 3 integers"),
    (lambda r: r.update(holdout={"path": "holdout", "count": 2}), "holdout.sha256 is missing"),
    (lambda r: r.__delitem__("config"), "config is missing"),
    (lambda r: r.update(run_id=None), "run_id must be 64 lowercase hex digits, got None"),
    (lambda r: r.update(format="ddm-expert/v1"), "is not a ddm-island/v1 document"),
    (lambda r: '{"format": "ddm-island/v1", "cluster": NaN}', "NaN is not a JSON number"),
])
def test_a_tampered_or_malformed_island_json_is_refused_with_one_line(tmp_path, change, message):
    write_island_json(tmp_path, _island())
    bundle = Bundle.open(tmp_path)
    assert bundle.cluster == 3 and bundle.sha256 == documents.digest(_island())
    record = _island()
    text = change(record)
    (tmp_path / ISLAND_JSON).write_text(text if isinstance(text, str) else json.dumps(record))
    with pytest.raises(DDMError) as err:
        Bundle.open(tmp_path)
    line = _one_line(err)
    assert line.startswith(f"island bundle {tmp_path / ISLAND_JSON}") and message in line, line
