"""Trust between strangers: `ddm assemble` believes nothing an island hands back.

Islands sign expert.json (`train-expert --key`), the plan lists the keys it accepts (`--island-key K=KEY.pub`,
outside the run id), and assemble checks the record's schema, signature, steps, train and model blocks against
the plan, and the bundle against the manifest, before it writes anything; a finished expert is replaced only
with --replace. Most cases edit a copy of an expert the session's `trained_run` already holds (every check runs
before the already-assembled no-op); one island really trains, signed, to replace expert 0.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from conftest import REPO, TINY_RUN_OVERRIDES
from helpers import prepared_template

from ddm.app import cli
from ddm.core.documents import digest
from ddm.core.errors import DDMError
from ddm.core.signatures import generate_keypair, key_id, load_private_key, load_public_key
from ddm.data import manifest as mf
from ddm.data.run import Run
from ddm.experts.records import check_expert_signature, sign_expert_record

SETS = [a for s in TINY_RUN_OVERRIDES for a in ("--set", s)]


def _error(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("ddm: error: "), lines
    return lines[0]


def _out(run: Path, k: int, dest: Path) -> Path:
    """What island k handed back: a copy of RUN/experts/k's final/ and expert.json."""
    shutil.copytree(run / "experts" / str(k) / "final", dest / "final")
    shutil.copy2(run / "experts" / str(k) / "expert.json", dest / "expert.json")
    return dest


def _edit(out: Path, change) -> dict:
    record = json.loads((out / "expert.json").read_text())
    changed = change(record)
    record = changed if isinstance(changed, dict) else record  # an edit in place, or a new document
    (out / "expert.json").write_text(json.dumps(record, indent=2))
    return record


def _keys(tmp_path: Path, *names: str) -> list[Path]:
    return [generate_keypair(tmp_path / name)[0] for name in names]


def _refused(capsys, run: Path, argv: list[str], needle: str) -> str:
    """`argv` exits 2 with one error line holding `needle`, and the manifest is byte for byte as it was."""
    before = (run / "manifest.json").read_bytes()
    assert cli.main(argv) == 2, needle
    error = _error(capsys)
    assert needle in error, error
    assert (run / "manifest.json").read_bytes() == before
    return error


# ---------------------------------------------------------------------------------------------------------
# What the expert trained must be what the plan says.
# ---------------------------------------------------------------------------------------------------------


def _relabel(**fields):
    def change(record):
        record.update(fields)
    return change


def _train(**fields):
    def change(record):
        record["train"].update(fields)
    return change


def _consistent(change):
    """An edit whose config_digest is recomputed too: what a careful forger hands back."""
    def both(record):
        change(record)
        record["config_digest"] = digest({"model": record["model"], "train": record["train"]})
    return both


def _flip_bit_in_train_block(out: Path) -> None:
    raw = bytearray((out / "expert.json").read_bytes())
    at = raw.index(b'"log_every": 20') + len(b'"log_every": 2')
    raw[at] ^= 0x01  # "20" -> "21": a choice the island may make, but not after the digest was taken
    (out / "expert.json").write_bytes(bytes(raw))


@pytest.mark.parametrize("name, change, needle", [
    ("5 of 40 steps", _consistent(lambda r: (r.update(step=5), r["train"].update(steps=5))), "trained 5 of 40 steps"),
    ("more steps", _consistent(lambda r: (r.update(step=80), r["train"].update(steps=80))),
     "trained 80 steps, the plan 40"),
    ("edited lr", _train(lr=0.5), "config_digest is not the digest of its model and train blocks"),
    ("edited lr, digest recomputed", _consistent(_train(lr=0.5)), "trained with expert.train.lr=0.5, the plan has"),
    ("train field removed", _consistent(lambda r: r["train"].pop("seed")), "expert.train.seed=absent, the plan has 0"),
    ("edited model", _consistent(lambda r: r["model"].update(patch_size=4)), "model_digest is not the digest"),
    ("step a word", _relabel(step="many"), "step must be an integer >= 0, got 'many'"),
    ("negative seconds", _relabel(seconds=-5), "seconds must be a finite number >= 0, got -5"),
    ("train not an object", _relabel(train=[1]), "train must be an object, got [1]"),
    ("no bundle digest", lambda r: r.pop("bundle_sha256"), "bundle_sha256 is missing"),
    ("a bit flipped", None, "config_digest is not the digest"),
])
def test_an_expert_that_did_not_train_the_plan_is_refused(trained_run_copy, tmp_path, capsys, name, change, needle):
    run = trained_run_copy
    out = _out(run, 1, tmp_path / "out")
    if change is None:
        _flip_bit_in_train_block(out)
    else:
        _edit(out, change)
    _refused(capsys, run, ["assemble", "--run-dir", str(run), str(out)], needle)
    assert cli.main(["info", str(run)]) == 0  # the run still reads


def test_island_choices_and_an_audit_field_are_accepted_and_the_model_must_match(trained_run_copy, tmp_path, capsys):
    run = trained_run_copy
    out = _out(run, 1, tmp_path / "out")
    # How an island lays out and logs its work is its choice; an audit summary is a field schemas must allow.
    _edit(out, _consistent(lambda r: (r["train"].update(log_every=7, grad_accum=2, mesh_fsdp=2),
                                      r.update(audit={"chain_sha256": "ab" * 32}))))
    assert cli.main(["assemble", "--run-dir", str(run), str(out)]) == 0  # checked, then already assembled
    # A model block and digest both forged to another architecture: an island may choose its own, but these
    # weights are not that architecture's (tests/test_heterogeneous.py has the classes the plan fixes).
    forged = _out(run, 2, tmp_path / "forged")

    def other_model(record):
        record["model"]["patch_size"] = 4
        record["model_digest"] = digest(record["model"])
    _edit(forged, _consistent(other_model))
    _refused(capsys, run, ["assemble", "--run-dir", str(run), str(forged)], "do not fit this model")


# ---------------------------------------------------------------------------------------------------------
# The bundle is bound to the plan; island.json is checked like any other document.
# ---------------------------------------------------------------------------------------------------------


def test_an_edited_island_json_is_refused_before_training_and_at_assemble(trained_run_copy, capsys):
    run = trained_run_copy
    island = run / "islands" / "0" / "island.json"
    record = json.loads(island.read_text())
    record["config"]["expert"]["train"]["lr"] = 0.01
    island.write_text(json.dumps(record))
    checkpoints = sorted(p.name for p in (run / "experts" / "0" / "checkpoints").iterdir())
    error = _refused(capsys, run, ["train-expert", "--run-dir", str(run), "--cluster", "0", "--no-progress", *SETS],
                     "config.expert.train.lr is 0.01, the plan's is 0.001")
    assert "island.json was edited" in error
    assert sorted(p.name for p in (run / "experts" / "0" / "checkpoints").iterdir()) == checkpoints  # not trained
    _refused(capsys, run, ["assemble", "--run-dir", str(run), str(run / "experts" / "0")],
             "island.json was edited")


@pytest.mark.parametrize("change, needle", [
    (lambda r: r["dataset"].update(codec={"kind": "latents", "mean": ["x"], "std": [1.0]}),
     "dataset.codec.mean[0] must be a finite number"),
    (lambda r: r["dataset"].update(codec={"kind": 5}), "dataset.codec.kind must be one of"),
    (lambda r: r["config"]["expert"]["train"].update(lr="fast"), "expert.train.lr='fast' must be float"),
    (lambda r: r["config"]["expert"].update(train=[1]), "expert.train must be a mapping"),
])
def test_a_wrong_typed_island_json_is_a_one_line_error(trained_run, tmp_path, capsys, change, needle):
    bundle = tmp_path / "bundle"
    shutil.copytree(trained_run / "islands" / "0", bundle)
    record = json.loads((bundle / "island.json").read_text())
    change(record)
    (bundle / "island.json").write_text(json.dumps(record))
    assert cli.main(["train-expert", "--island", str(bundle), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    assert needle in _error(capsys)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------
# Signatures and the plan's island keys.
# ---------------------------------------------------------------------------------------------------------


def test_island_keys_do_not_change_the_run_and_bad_keys_are_refused(trained_run_copy, tmp_path, capsys):
    run = trained_run_copy
    alice, bob = _keys(tmp_path, "alice", "bob")
    before = Run.open(run)
    assert cli.main(["assemble", "--run-dir", str(run), "--island-key", f"1={alice}.pub"]) == 0
    after = Run.open(run)
    assert after.manifest["island_keys"] == {"1": {"key_id": key_id(load_public_key(f"{alice}.pub")),
                                                   "public_key": after.manifest["island_keys"]["1"]["public_key"]}}
    assert (after.run_id, after.sha256) == (before.run_id, before.sha256)  # bundles and records stay valid
    for specs, needle in (([f"3={alice}.pub"], "the run has clusters 0..2"), (["1"], "must be K=PATH"),
                          ([f"1={alice}"], "is not a PEM public key"),
                          ([f"0={bob}.pub", f"0={alice}.pub"], "names island 0 twice")):
        argv = ["assemble", "--run-dir", str(run), *[a for spec in specs for a in ("--island-key", spec)]]
        _refused(capsys, run, argv, needle)
    # The plan's key is a claim the manifest reader checks too.
    mf.update_manifest(run, lambda m: None)  # a valid manifest writes
    with pytest.raises(DDMError, match="island_keys.1.key_id .* is not the id of its public_key"):
        mf.update_manifest(run, lambda m: m["island_keys"]["1"].update(key_id="ed25519:" + "0" * 16))
    # --key that is not island 0's listed key: refused before training.
    assert cli.main(["assemble", "--run-dir", str(run), "--island-key", f"0={alice}.pub"]) == 0
    _refused(capsys, run, ["train-expert", "--run-dir", str(run), "--cluster", "0", "--no-progress", "--key",
                           str(bob), *SETS], "but island 0's key in the plan is")


def test_prepare_lists_island_keys_without_changing_the_run_id(tmp_path_factory, tmp_path, capsys):
    (alice,) = _keys(tmp_path, "alice")
    run = tmp_path / "run"
    argv = ["prepare", "--config", str(REPO / "configs" / "digits.yaml"), "--run-dir", str(run), "--set", "data.k=2"]
    assert cli.main([*argv, "--island-key", f"2={alice}.pub"]) == 2  # K=2: islands 0 and 1
    assert "the run has clusters 0..1" in _error(capsys) and not run.exists()  # refused before preparing
    assert cli.main([*argv, "--island-key", f"1={alice}.pub"]) == 0
    prepared = Run.open(run)
    assert prepared.manifest["island_keys"]["1"]["key_id"] == key_id(load_public_key(f"{alice}.pub"))
    assert prepared.run_id == Run.open(prepared_template(tmp_path_factory)).run_id  # the same plan without keys


def test_unsigned_foreign_signed_altered_and_copied_experts_are_refused(trained_run_copy, tmp_path, capsys):
    run = trained_run_copy
    alice, bob = _keys(tmp_path, "alice", "bob")
    assert cli.main(["assemble", "--run-dir", str(run), "--island-key", f"1={alice}.pub"]) == 0
    alice_id = key_id(load_public_key(f"{alice}.pub"))
    # Expert 1 is handed back by island 1 (not registered yet): its OUT lies outside the run.
    out = _out(run, 1, tmp_path / "out")
    mf.update_manifest(run, lambda m: m["experts"].pop("1"))
    shutil.rmtree(run / "experts" / "1")
    assemble = ["assemble", "--run-dir", str(run), str(out)]

    _refused(capsys, run, assemble, f"unsigned, but a signature by {alice_id} is required")
    record = json.loads((out / "expert.json").read_text())
    _edit(out, lambda r: sign_expert_record(record, load_private_key(bob)))
    _refused(capsys, run, assemble, f"not by the required key {alice_id}")
    _edit(out, lambda r: {**sign_expert_record(record, load_private_key(alice)), "seconds": 1.0})
    _refused(capsys, run, assemble, "does not match the record (altered after signing, or forged)")
    # Another run's expert, signed by island 1's key for that run, its run id / shard / bundle digests copied.
    other = {**record, "run_id": "ab" * 32, "shard_sha256": "cd" * 32, "bundle_sha256": "ef" * 32}
    copied = sign_expert_record(other, load_private_key(alice))
    _edit(out, lambda r: {**copied, **{f: record[f] for f in ("run_id", "shard_sha256", "bundle_sha256")}})
    _refused(capsys, run, assemble, "does not match the record")
    assert not (run / "experts" / "1").exists()  # nothing copied

    # Signed by island 1's key, unchanged: assembled, the signer recorded.
    signed = _edit(out, lambda r: sign_expert_record(record, load_private_key(alice)))
    assert check_expert_signature(signed, load_public_key(f"{alice}.pub")).ok
    assert cli.main(assemble) == 0
    entry = Run.open(run).expert(1)
    assert entry["signer"] == alice_id and entry["sha256"] == record["ema_sha256"]
    # The coordinator's own folder (trained here) needs no signature, even for a keyed island.
    assert cli.main(["assemble", "--run-dir", str(run), "--island-key", f"0={alice}.pub"]) == 0
    assert cli.main(["assemble", "--run-dir", str(run), str(run / "experts" / "0")]) == 0


def test_a_signed_island_replaces_a_finished_expert_only_with_replace(trained_run_copy, tmp_path, capsys, caplog):
    """Island 0 trains again (another seed), signs expert.json with --key; assemble refuses the seed the plan does
    not have, then (with the island's --set) refuses to replace the finished expert, then replaces it with
    --replace: new weights in a folder of their own, the old ones deleted after the manifest names the new,
    and a warning naming the expert digest and run identity earlier records carry."""
    run = trained_run_copy
    (alice,) = _keys(tmp_path, "alice")
    assert cli.main(["assemble", "--run-dir", str(run), "--island-key", f"0={alice}.pub"]) == 0
    old = Run.open(run)
    old_sha, old_final = old.expert(0)["sha256"], run / "experts" / "0" / "final"
    old_bytes = {p: p.read_bytes() for p in old_final.rglob("*") if p.is_file()}
    seed = ["--set", "expert.train.seed=1"]
    out = tmp_path / "out"
    assert cli.main(["train-expert", "--island", str(run / "islands" / "0"), "--out", str(out), "--no-progress",
                     "--key", str(alice), *SETS, *seed]) == 0
    record = json.loads((out / "expert.json").read_text())
    assert check_expert_signature(record, load_public_key(f"{alice}.pub")).ok and record["ema_sha256"] != old_sha

    _refused(capsys, run, ["assemble", "--run-dir", str(run), str(out)],
             "was trained with expert.train.seed=1, the plan has 0")
    _refused(capsys, run, ["assemble", "--run-dir", str(run), str(out), *seed], "pass --replace")
    assert {p: p.read_bytes() for p in old_final.rglob("*") if p.is_file()} == old_bytes

    with caplog.at_level(logging.WARNING, logger="ddm"):
        assert cli.main(["assemble", "--run-dir", str(run), str(out), *seed, "--replace"]) == 0
    new = Run.open(run)
    entry = new.expert(0)
    assert entry["sha256"] == record["ema_sha256"] and entry["path"] == f"experts/0/final-{record['ema_sha256'][:16]}"
    assert entry["signer"] == key_id(load_public_key(f"{alice}.pub"))
    assert (run / entry["path"]).is_dir() and not old_final.exists()
    warning = next(r.getMessage() for r in caplog.records if "replaced sha256" in r.getMessage())
    assert f"expert 0 sha256 {old_sha[:16]} (run {old.sha256[:16]}) no longer verify" in warning
    assert new.sha256 != old.sha256 and new.run_id == old.run_id
    assert json.loads((run / "experts" / "0" / "expert.json").read_text()) == record


# ---------------------------------------------------------------------------------------------------------
# The manifest is checked before it is written.
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("entry, needle", [
    ({"step": "many"}, "experts.0.step must be an integer >= 0, got 'many'"),
    ({"seconds": -5}, "experts.0.seconds must be a finite number >= 0, got -5"),
])
def test_a_manifest_update_that_would_not_read_back_is_refused(trained_run_copy, entry, needle):
    run = trained_run_copy
    before = (run / "manifest.json").read_bytes()
    with pytest.raises(DDMError, match=f"refusing to write .*{needle[:20]}"):
        mf.update_manifest(run, lambda m: m["experts"]["0"].update(entry))
    assert (run / "manifest.json").read_bytes() == before
    Run.open(run)
