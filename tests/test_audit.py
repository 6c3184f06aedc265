"""`ddm audit`: an island's training replayed against the chain of state digests its expert.json commits to.

Two islands of digits (K=2, 12 steps, a chain entry every step) trained once per module: an honest one keeping
every 4th state, and a lazy one (`benchmarks.bench_audit.lazy_island`) that skips step 5 and keeps every state.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from helpers import fresh_run

from benchmarks.bench_audit import lazy_island
from ddm.app import cli
from ddm.experts.train import train_island
from ddm.train.checkpoint import AuditPolicy, chain_head, chain_steps, kept_entries, replay_environment
from ddm.verify.audit import DEFAULT_SEGMENTS, audit_island, catch_probability, challenge, replay_plan

TRAIN = ["expert.train.steps=12", "expert.train.batch_size=16", "expert.train.warmup_steps=2",
         "expert.train.checkpoint_every=4", "expert.train.log_every=12"]
SKIPPED = 5  # the lazy island's skipped step: interval 5 (steps 5->6) is its only bad one


@pytest.fixture(scope="module")
def islands(tmp_path_factory) -> dict[str, Path]:
    run = fresh_run(tmp_path_factory, "audit")
    root = run.parent
    train_island(run / "islands" / "0", root / "honest", TRAIN, audit=AuditPolicy(keep=4))
    with lazy_island(skip={SKIPPED}):
        train_island(run / "islands" / "0", root / "lazy", TRAIN, audit=AuditPolicy(keep=1))
    return {"honest": root / "honest", "lazy": root / "lazy", "bundle": run / "islands" / "0",
            "other bundle": run / "islands" / "1"}


def _audit(capsys, out: Path, bundle: Path, *args: str) -> tuple[int, str, str]:
    rc = cli.main(["audit", str(out), "--bundle", str(bundle), *args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _cores() -> int:
    return replay_environment()["cpu_cores"]


def _copy(out: Path, tmp_path: Path) -> Path:
    target = tmp_path / out.name
    shutil.copytree(out, target)
    return target


def test_challenges_plans_and_odds_are_pure_functions():
    assert challenge(100, 29, 1, seed=3) == challenge(100, 29, 1, seed=3) != challenge(100, 29, 1, seed=4)
    starts = challenge(100, 29, 2, seed=3)
    assert len(set(starts)) == 29 and starts == sorted(starts) and 0 <= starts[0] and starts[-1] <= 98
    assert challenge(10, 29, 1, seed=0) == list(range(10))  # fewer intervals than segments: every one
    # Exact odds: hypergeometric over the starts; one bad interval of 12, 3 segments: 3 / 12.
    assert catch_probability(12, {5}, 3) == pytest.approx(0.25)
    assert catch_probability(300, set(range(30)), 29) == pytest.approx(1 - math.comb(270, 29) / math.comb(300, 29))
    # Without replacement a little better than the bound (1 - f)^m: 28 segments suffice for 95% at N = 300.
    assert catch_probability(300, set(range(30)), 29) >= 1 - 0.9**29 > 0.95
    assert next(m for m in range(1, 300) if catch_probability(300, set(range(30)), m) >= 0.95) == 28
    # The plan starts each segment from the latest state at hand: entry 0, a kept one, or the previous end.
    assert replay_plan([9, 10, 30], 1, {0, 16, 32}) == [(0, 9, 10), (10, 10, 11), (16, 30, 31)]
    assert kept_entries(41, 16) == [0, 16, 32, 40] and chain_steps(10, 4) == [0, 4, 8, 10]
    digests = ["a" * 64] * 4
    assert chain_head(10, 4, digests) != chain_head(10, 4, ["a" * 64] * 3 + ["b" * 64])
    assert cli.build_parser().parse_args(["audit", "x", "--bundle", "b"]).segments == DEFAULT_SEGMENTS


def test_an_honest_island_passes_and_supplies_the_states_a_challenge_needs(islands, capsys, tmp_path):
    out = _copy(islands["honest"], tmp_path)
    record = json.loads((out / "expert.json").read_text())
    assert record["audit"]["entries"] == 13 and record["audit"]["every"] == 1
    assert sorted(p.name for p in (out / "audit" / "states").iterdir()) == [
        "0.safetensors", "12.safetensors", "4.safetensors", "8.safetensors"]

    report = tmp_path / "report.json"
    rc, text, _ = _audit(capsys, out, islands["bundle"], "--segments", "3", "--seed", "11", "--report", str(report))
    assert rc == 0, text
    assert "overall: PASSED" in text
    first = json.loads(report.read_text())
    assert not first["caught"] and first["checked_steps"] == 3 and len(first["segments"]) == 3

    # The interactive protocol: the island answers the challenge (its starting states, regenerated from the kept
    # ones), then the auditor replays only the segments themselves.
    rc, text, _ = _audit(capsys, out, islands["bundle"], "--segments", "3", "--seed", "11", "--supply")
    assert rc == 0 and "SUPPLIED" in text
    rc, text, _ = _audit(capsys, out, islands["bundle"], "--segments", "3", "--seed", "11", "--report", str(report))
    second = json.loads(report.read_text())
    assert rc == 0 and second["regenerated_steps"] == 0 and second["checked_steps"] == 3
    assert second["cost"] == pytest.approx(3 / 12)


def test_a_lazy_island_fails_on_its_bad_interval_and_only_there(islands, capsys):
    report = audit_island(islands["lazy"], islands["bundle"], seed=0, starts=[SKIPPED - 1, SKIPPED, SKIPPED + 1])
    verdicts = {s.start: s.problem for s in report.segments}
    assert verdicts[SKIPPED - 1] is None and verdicts[SKIPPED + 1] is None  # replayed from its own states
    assert "interval 5 (steps 5->6)" in verdicts[SKIPPED] and not report.problems and report.caught

    seed = next(s for s in range(100) if SKIPPED in challenge(12, 3, 1, s))
    rc, text, _ = _audit(capsys, islands["lazy"], islands["bundle"], "--segments", "3", "--seed", str(seed))
    assert rc == 1 and "overall: CAUGHT" in text
    seed = next(s for s in range(100) if SKIPPED not in challenge(12, 3, 1, s))
    rc, text, _ = _audit(capsys, islands["lazy"], islands["bundle"], "--segments", "3", "--seed", str(seed))
    assert rc == 0  # a challenge that misses the bad interval misses the laziness: the odds are the point


def test_a_replay_outside_the_islands_environment_is_inconclusive_not_caught(islands, capsys, tmp_path):
    out = _copy(islands["lazy"], tmp_path)
    record = json.loads((out / "expert.json").read_text())
    record["audit"]["environment"]["cpu_cores"] = 999  # as if trained on another machine
    (out / "expert.json").write_text(json.dumps(record))
    report = audit_island(out, islands["bundle"], seed=0, starts=[SKIPPED])
    assert report.inconclusive and not report.caught and report.foreign == [
        f"cpu_cores: trained with 999, replayed with {_cores()}"]
    rc, text, err = _audit(capsys, out, islands["bundle"], "--segments", "12", "--seed", "0")
    assert rc == 2 and "overall: INCONCLUSIVE" in text and "inconclusive; audit where the island trained" in err


def test_the_replay_environment_names_the_cpu_model_on_the_cpu_backend():
    """XLA:CPU compiles for the CPU's instruction set: the same training gave other weights on two CPU models
    (docs/verification.md, section 11), so a chain names the model and a replay on another one is foreign."""
    from ddm.core.machine import cpu_model

    env = replay_environment()
    assert env["backend"] == "cpu" and env["cpu"] == cpu_model() and env["cpu"] not in ("", "unknown")


def test_a_tampered_chain_or_starting_state_is_caught(islands, capsys, tmp_path):
    out = _copy(islands["honest"], tmp_path)
    chain = json.loads((out / "audit" / "chain.json").read_text())
    chain["digests"][3] = "0" * 64
    (out / "audit" / "chain.json").write_text(json.dumps(chain))
    rc, text, _ = _audit(capsys, out, islands["bundle"], "--segments", "1", "--seed", "0")
    assert rc == 1 and "is not the one expert.json commits to" in text

    out = _copy(islands["honest"], tmp_path / "swapped")
    shutil.copy(out / "audit" / "states" / "8.safetensors", out / "audit" / "states" / "4.safetensors")
    report = audit_island(out, islands["bundle"], seed=0, starts=[4, 5])  # 5 is not kept: regenerated from 4
    wrong = "the state kept for entry 4 (step 4) is not the chain's"
    assert [s.problem.split(":")[0] for s in report.segments] == [wrong, wrong]

    rc, text, _ = _audit(capsys, islands["honest"], islands["bundle"], "--segments", "1", "--seed", "0",
                         "--chain", "ab" * 32)  # the head the challenge was issued against
    assert rc == 1 and "not the abababababababab the challenge was issued against" in text


def test_bad_input_is_a_one_line_error_and_exit_2(islands, capsys, tmp_path):
    cases = {"no expert.json": (tmp_path, islands["bundle"], "no expert.json"),
             "another island's bundle": (islands["honest"], islands["other bundle"], "not this island's bundle")}
    out = _copy(islands["honest"], tmp_path / "broken")
    (out / "audit" / "chain.json").write_text("{")
    cases["chain not JSON"] = (out, islands["bundle"], "is not valid JSON")
    unaudited = _copy(islands["honest"], tmp_path / "unaudited")
    record = json.loads((unaudited / "expert.json").read_text())
    del record["audit"]
    (unaudited / "expert.json").write_text(json.dumps(record))
    cases["no chain"] = (unaudited, islands["bundle"], "has no audit chain")
    for name, (out, bundle, needle) in cases.items():
        rc, _, err = _audit(capsys, out, bundle, "--segments", "1", "--seed", "0")
        assert rc == 2, name
        assert err.count("ddm: error:") == 1 and needle in err, (name, err)
    rc, _, err = _audit(capsys, islands["honest"], islands["bundle"], "--chain", "xyz")
    assert rc == 2 and "is not a chain head" in err


def test_the_chain_survives_a_resume_bit_for_bit(islands, tmp_path):
    out = _copy(islands["honest"], tmp_path)
    before = json.loads((out / "expert.json").read_text())["audit"]
    shutil.rmtree(out / "checkpoints" / "12")  # the last checkpoint is 8: steps 8..12 are trained again
    (out / "expert.json").unlink()
    result = train_island(islands["bundle"], out, TRAIN, audit=AuditPolicy(keep=4))
    assert result.resumed_from == 8 and result.audit == before
