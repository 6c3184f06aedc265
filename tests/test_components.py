"""The component registry (`ddm.data.components`) and the run's two names: no component enters the run id, and a
record's identity covers only what an ensemble sample uses (experts, router), so training the monolith,
distilling a student or exporting leaves every earlier record, export and late island valid."""

from __future__ import annotations

import copy
import json

import pytest

from ddm.app.cli import main
from ddm.data import components
from ddm.data import manifest as mf
from ddm.data.run import Run

TINY_MONOLITH = ["--set", "monolith.train.steps=2", "--set", "monolith.train.batch_size=16",
                 "--set", "monolith.train.warmup_steps=1", "--set", "monolith.train.checkpoint_every=2",
                 "--set", "monolith.train.log_every=2"]
# test_distill.py's budget: the student's training step is compiled once for both files.
TINY_DISTILL = ["--set", "distill.train.steps=4", "--set", "distill.train.batch_size=16",
                "--set", "distill.train.warmup_steps=1", "--set", "distill.train.checkpoint_every=2",
                "--set", "distill.train.log_every=2"]


def _entry(digit: str) -> dict:
    return {"status": "finished", "step": 7, "sha256": digit * 64, "path": "somewhere/final", "seconds": 1.5}


def test_registry_names_every_section_once():
    assert components.SECTIONS == ("experts", "router", "monolith", "student")
    assert [c.name for c in components.ENSEMBLE] == ["experts", "router"]
    assert components.SINGLE_NAMES == ("monolith", "student")
    assert mf.COMPONENT_SECTIONS == components.SECTIONS
    assert components.component("student").config == "distill"
    with pytest.raises(Exception, match="unknown component 'teacher'"):
        components.component("teacher")


@pytest.mark.parametrize("comp", components.COMPONENTS, ids=lambda c: c.name)
def test_recording_a_component_leaves_the_run_id(trained_run_copy, comp):
    """Recording any component (a new entry, or a finished one replaced by other weights) keeps the run id; the
    record identity moves only for the ensemble's components."""
    run = Run.open(trained_run_copy)
    run_id, identity = run.run_id, run.sha256
    key = "1" if comp.per_cluster else None
    after = run.record(comp.name, key, _entry("a"))  # through the manifest lock and schema check
    assert after.component(comp.name, key)["sha256"] == "a" * 64
    assert after.run_id == run_id
    assert (after.sha256 != identity) == comp.in_ensemble
    again = after.record(comp.name, key, {**_entry("b"), "seconds": 99.0, "path": "elsewhere/final"})
    assert again.run_id == run_id and (again.sha256 != after.sha256) == comp.in_ensemble


def test_identity_ignores_single_models_but_not_ensemble_weights(trained_run):
    manifest = mf.read_manifest(trained_run)
    base = mf.manifest_sha256(manifest)
    singles = copy.deepcopy(manifest) | {c.name: _entry("c") for c in components.SINGLES}
    assert mf.manifest_sha256(singles) == base and mf.plan_sha256(singles) == mf.plan_sha256(manifest)
    changed = copy.deepcopy(manifest)
    changed["router"]["sha256"] = "d" * 64
    assert mf.manifest_sha256(changed) != base and mf.plan_sha256(changed) == mf.plan_sha256(manifest)


def test_monolith_distill_and_export_keep_records_and_the_run_id(trained_run_copy, tmp_path, capsys):
    """A record made before `ddm export`, `ddm train-monolith` and `ddm distill` still verifies on the run and on
    the export, a record made after them verifies on the export made before them, the run id holds, and an
    expert assembled again afterwards is accepted (its island carries the same run id). The monolith trains
    with its own `monolith.train` section."""
    run_dir = trained_run_copy
    before = Run.open(run_dir)
    sample = ["sample", "--run-dir", str(run_dir), "--n", "2", "--steps", "2", "--strategy", "top1"]
    early, late = tmp_path / "early.json", tmp_path / "late.json"
    assert main([*sample, "--out", str(tmp_path / "a.png"), "--record", str(early)]) == 0
    exported = tmp_path / "export"
    assert main(["export", "--run-dir", str(run_dir), "--out", str(exported)]) == 0

    assert main(["train-monolith", "--run-dir", str(run_dir), "--no-progress", *TINY_MONOLITH]) == 0
    assert main(["distill", "--run-dir", str(run_dir), "--no-progress", *TINY_DISTILL]) == 0
    after = Run.open(run_dir)
    mono = after.component("monolith")
    assert mono["step"] == 2 and mono["train"]["batch_size"] == 16 and after.component("student")["step"] == 4
    assert mono["model"] == after.manifest["experts"]["0"]["model"]  # null monolith.model: the expert's
    assert after.config.expert.train.steps == 40  # the experts' settings are untouched
    assert after.run_id == before.run_id and after.sha256 == before.sha256

    assert main([*sample, "--out", str(tmp_path / "b.png"), "--record", str(late)]) == 0
    assert json.loads(late.read_text())["manifest_sha256"] == json.loads(early.read_text())["manifest_sha256"]
    capsys.readouterr()
    for record in (early, late):
        for where in (run_dir, exported):
            assert main(["verify", str(record), "--run-dir", str(where)]) == 0, capsys.readouterr()
    # A late island: expert 0's folder assembled again after distillation is the same expert (a no-op).
    assert main(["assemble", "--run-dir", str(run_dir), str(run_dir / "experts" / "0")]) == 0
