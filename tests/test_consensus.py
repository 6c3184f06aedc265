"""`ddm consensus-eval`: verifier specs, voting, threshold rules, commit-reveal (pure), and one tiny end-to-end run
with two copying verifiers."""

import json

import jax
import numpy as np
import pytest

from ddm.app.cli import main
from ddm.core.errors import DDMError
from ddm.verify.analysis import nearest_neighbours, pick_threshold, pick_tolerance, vote_rates
from ddm.verify.commit import check_reveals, commit, commitment
from ddm.verify.worker import VerifierSpec, round_mantissa


def test_verifier_spec_parse_and_env():
    assert VerifierSpec.parse("plain") == VerifierSpec() == VerifierSpec.parse("")
    spec = VerifierSpec.parse("xla_flags=--xla_force_host_platform_device_count=2 --xla_cpu_enable_fast_math=true;"
                              " cpus=1; batch_size=half; param_mantissa=10")
    assert (spec.cpus, spec.batch_size, spec.param_mantissa) == (1, "half", 10)
    assert spec.resolved_batch(8) == 4 and VerifierSpec(batch_size=3).resolved_batch(8) == 3
    env = spec.env({"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_dump_to=/x", "A": "b"})
    assert env["XLA_FLAGS"].split() == ["--xla_dump_to=/x", "--xla_force_host_platform_device_count=2",
                                        "--xla_cpu_enable_fast_math=true"]
    assert env["A"] == "b" and VerifierSpec().env({"XLA_FLAGS": "f"}) == {"XLA_FLAGS": "f"}
    for bad in ("cpus=0", "gpus=1", "batch_size=x", "param_mantissa=30", "cpus", "copy_of=-1", "copy_mode=x"):
        with pytest.raises(DDMError):
            VerifierSpec.parse(bad)
    copier = VerifierSpec.parse("copy_of=0;copy_mode=commitment")
    assert (copier.copy_of, copier.copy_mode) == (0, "commitment") and "copier of verifier 0" in copier.describe()


def test_vote_rates_majority_and_byzantine():
    # 3 verifiers x 4 claims; distances; threshold 5
    dist = np.array([[0, 9, 9, 0],
                     [0, 9, 0, 0],
                     [9, 9, 0, 9]])
    tampered = vote_rates(dist > 5, honest=False)
    assert tampered["single"] == pytest.approx(6 / 12)
    assert tampered["majority"] == 0.25  # only claim 1 has two or more rejections
    assert tampered["byzantine"] == 0.25  # claim 1 keeps two honest rejections whichever verifier lies
    # honest claims: a liar at verifier 1 joins the lone rejection of claims 0, 2 and 3 (worst case)
    assert vote_rates(dist > 5, honest=True) == {"single": 0.5, "majority": 0.25, "byzantine": 1.0}
    assert vote_rates(dist > 9, honest=False) == {"single": 0.0, "majority": 0.0, "byzantine": 0.0}


def test_pick_threshold_rule():
    sep = pick_threshold([0, 0, 1, 2], [9, 12, 30])
    assert sep["separable"] and sep["largest_zero_false_accept"] == 8 and sep["recommended"] == 5
    assert pick_threshold([0], [1])["recommended"] == 0
    overlap = pick_threshold([0] * 8 + [6, 7], [5, 20, 21, 22, 23, 24, 25, 26, 27, 28])
    assert not overlap["separable"] and overlap["recommended"] == 7  # 0 false rejects, 1 of 10 false accepts
    assert pick_threshold([0, 3], [])["recommended"] == 3


def test_pick_tolerance_rule():
    # margin x the largest honest drift, when no intra-class image comes that close
    pick = pick_tolerance([0.0, 1e-3, 3e-3], [0.0, 5e-4], [0.4, 0.9], [0.1, 0.2], margin=2)
    assert (pick["max_abs"], pick["rms"], pick["separable"]) == (6e-3, 1e-3, True)
    # only bitwise-identical verifiers: the floor still lets fast-math-sized drift through
    assert (pick_tolerance([0.0], [0.0], [0.5], [0.1])["max_abs"], pick_tolerance([0.0], [0.0], [0.5], [0.1])["rms"]) \
        == (5e-4, 1e-4)
    # a collision within margin x honest: lowered to the geometric midpoint, still above every honest distance
    close = pick_tolerance([1e-3], [1e-4], [1.5e-3], [1.5e-4], margin=2)
    assert 1e-3 < close["max_abs"] < 1.5e-3 and 1e-4 < close["rms"] < 1.5e-4 and "midpoint" in close["rule"]
    assert not pick_tolerance([2e-3], [2e-4], [1e-3], [1e-4])["separable"]


def test_commit_reveal_catches_copiers():
    payloads = [{str(c): {"claim": c, "verifier": v, "verdicts": {"exact": c != 1}, "distances": {"phash": [c, v]}}
                 for c in range(3)} for v in range(2)]
    commits, nonces = zip(*(commit(p) for p in payloads))
    assert len({n for ns in nonces for n in ns.values()}) == 6  # a fresh nonce per payload
    assert commitment(payloads[0]["1"], nonces[0]["1"]) == commits[0]["1"]
    honest = check_reveals(list(commits), payloads, list(nonces))
    assert [c["ok"] for c in honest] == [True, True]
    # verifier 2 committed to a guess, then revealed verifier 0's payloads as its own
    guess = {str(c): {"claim": c, "verifier": 2, "verdicts": {"exact": True}, "distances": {"phash": [0, 0]}}
             for c in range(3)}
    guess_commits, guess_nonces = commit(guess)
    copied = {k: {**p, "verifier": 2} for k, p in payloads[0].items()}
    # verifier 3 republished verifier 0's commitments, then its reveal
    result = check_reveals([*commits, guess_commits, commits[0]], [*payloads, copied, payloads[0]],
                           [*nonces, guess_nonces, nonces[0]])
    assert [c["ok"] for c in result] == [True, True, False, False]  # verifier 0, the one copied, is not blamed
    assert result[2]["problems"] == {"mismatch": 2}  # its guess for claim 0 happened to be verifier 0's result
    assert result[3]["problems"] == {"names another verifier": 3, "duplicate commitment": 3}
    tampered = dict(payloads[1])
    tampered["0"] = {**tampered["0"], "verdicts": {"exact": False}}  # changed its mind after committing
    result = check_reveals(list(commits), [payloads[0], tampered], list(nonces))
    assert result[0]["ok"] and result[1]["problems"] == {"mismatch": 1}
    assert check_reveals(list(commits), [payloads[0], {}], [nonces[0], {}])[1]["problems"] == {"missing": 3}


def test_nearest_neighbours_ignore_same_noise():
    gallery = [{"noise": [0, 0], "cluster": None, "phash": "0" * 16},
               {"noise": [0, 0], "cluster": 1, "phash": "0" * 15 + "1"},  # same noise: not a collision
               {"noise": [5, 0], "cluster": 1, "phash": "0" * 15 + "7"},
               {"noise": [0, 1], "cluster": 2, "phash": "f" * 16}]
    nn = nearest_neighbours(gallery)
    assert nn["any"] == [3, 2, 2, 61]
    assert nn["same_cluster"] == [2, 2]  # cluster 2 has no other member


def test_round_mantissa():
    x = np.array([1.0, 1 + 2**-11, 1 + 3 * 2**-11, np.pi, -2.5e-3], np.float32)
    y = round_mantissa({"w": x, "i": np.arange(3)}, 10)
    assert (y["w"].view(np.uint32) & (2**13 - 1) == 0).all()
    assert y["w"][1] == 1.0 and y["w"][2] == np.float32(1 + 2**-9)  # ties to even
    assert np.abs(y["w"] / x - 1).max() <= 2**-11 and (y["i"] == np.arange(3)).all()


def test_worker_refuses_claims_of_another_run(trained_run, tmp_path, capsys):
    from ddm.sampling.request import Request
    from ddm.verify.records import make_record

    values = np.zeros((2, 8, 8, 1), np.float32)
    record = make_record("cd" * 32, Request(n=2, steps=2), values, {"jax": "test"})
    claims = {"claims": [{"id": 0, "kind": "honest", "record": record}]}
    (tmp_path / "claims.json").write_text(json.dumps(claims))
    from ddm.verify import worker

    code = worker.main(["--run-dir", str(trained_run), "--claims", str(tmp_path / "claims.json"),
                        "--work", str(tmp_path), "--index", "0"])
    assert code == 2 and "not the same run" in capsys.readouterr().err
    assert not list(tmp_path.glob("verifier_*"))  # nothing committed


def test_consensus_eval_cli_bad_input_exits_2(trained_run, capsys):
    assert main(["consensus-eval", "--run-dir", str(trained_run), "--verifiers", "0"]) == 2
    assert main(["consensus-eval", "--run-dir", str(trained_run), "--verifier", "cpus=x"]) == 2
    assert main(["consensus-eval", "--run-dir", str(trained_run), "--steps", "1"]) == 2
    assert main(["consensus-eval", "--run-dir", str(trained_run), "--strategy", "single:0"]) == 2
    assert main(["consensus-eval", "--run-dir", str(trained_run), "--copiers", "peek"]) == 2
    assert main(["consensus-eval", "--run-dir", str(trained_run), "--margin", "0.5"]) == 2
    assert main(["consensus-eval", "--run-dir", str(trained_run), "--prompt", "a 7"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 7 and "is not conditioned on embeddings" in err[-1]


def test_consensus_eval_end_to_end(trained_run, tmp_path, capsys):
    """Three verifier processes (plain; 1 device + half batch + 1 cpu; TF32-rounded params) and two copiers of
    verifier 0 on a tiny set: commit-reveal rejects both copiers, the others vote, thresholds are calibrated."""
    out = tmp_path / "eval"
    code = main(["consensus-eval", "--run-dir", str(trained_run), "--verifiers", "3", "--requests", "1",
                 "--images", "2", "--steps", "2", "--perturb-scale", "0.5", "--out", str(out),
                 "--verifier", "plain",
                 "--verifier", "xla_flags=--xla_force_host_platform_device_count=1;batch_size=half;cpus=1",
                 "--verifier", "param_mantissa=10"])
    assert code == 0
    assert "pHash threshold: " in capsys.readouterr().out
    report = json.loads((out / "consensus_report.json").read_text())
    assert (out / "consensus_hist.png").stat().st_size > 1000
    verifiers = report["verifiers"]
    assert len({v["pid"] for v in verifiers}) == 5
    a = report["analysis"]
    assert a["voters"] == [0, 1, 2] and [c["ok"] for c in a["commit_reveal"]] == [True, True, True, False, False]
    # the "reveal" copier guessed "honest, all distances 0": right only on the honest claims, caught on the rest
    tampered = sum(n for kind, n in a["claims_per_kind"].items() if not kind.startswith("honest"))
    assert a["commit_reveal"][3]["problems"] == {"mismatch": tampered}
    assert a["commit_reveal"][4]["problems"] == {"names another verifier": 12, "duplicate commitment": 12}
    assert verifiers[0]["devices"] == jax.device_count()  # the plain verifier inherits the environment
    assert verifiers[1]["devices"] == 1 and verifiers[1]["cpus"] == 1 and verifiers[2]["param_mantissa"] == 10
    assert a["kinds"] == ["honest", "seed", "strategy", "steps", "steps_minus1", "steps_plus1", "solver",
                          "perturbed_expert:0.5", "swapped_experts", "pixel_noise", "honest_single", "same_cluster"]
    assert a["bitwise_identical"]["honest"][:2] == [1.0, 1.0]  # other process, device count, batch, threads
    assert a["phash_per_image"]["honest"]["max"] <= a["threshold"]["honest_max"]
    t = a["threshold"]["recommended"]
    row = a["per_threshold"][t]
    assert row["honest"] == {"single": 0.0, "majority": 0.0, "byzantine": 0.0}
    assert row["seed"]["majority"] == 1.0 and row["same_cluster"]["majority"] == 1.0
    assert len(a["per_threshold"]) == 65 and set(row["intra_false_accept_per_image"]) >= {"majority", "byzantine"}
    # every mode, scored; honest claims pass in each, exact and auto catch every tampered kind
    for mode in ("exact", "tolerance", "phash", "auto"):
        assert a["modes"][mode]["honest"]["majority"] == 0.0 and a["modes"][mode]["honest_single"]["majority"] == 0.0
    for kind in ("seed", "strategy", "solver", "swapped_experts", "pixel_noise", "same_cluster"):
        assert a["modes"]["exact"][kind]["majority"] == 1.0 and a["modes"]["auto"][kind]["majority"] == 1.0
    tol = a["tolerance"]
    assert tol["max_abs"] >= 2 * tol["honest_max_abs"] and tol["max_abs"] >= 5e-4
    stored = json.loads((out / "verify_thresholds.json").read_text())
    assert stored["manifest_sha256"] == report["manifest_sha256"]
    assert (stored["phash"], stored["max_abs"], stored["rms"]) == (t, tol["max_abs"], tol["rms"])
