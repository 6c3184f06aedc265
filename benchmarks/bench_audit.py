"""Audits of island training (`ddm audit`): what they cost and how often they catch a lazy island.

    python -m benchmarks.bench_audit [--work /tmp/ddm-audit] [--set expert.train.steps=N ...] [--cluster 0]
        [--segments 29] [--challenges 10000] [--cli-seeds 3] [--parts train,replay,cli]

On the digits config (K=4; its expert trains 2,000 steps), in --work (kept between runs: a part whose outputs
exist is not redone):

train   island --cluster, honest, with the default policy (a digest every S // 320 steps, every 16th state
        kept) and without any chain (the chain's overhead); three lazy islands that keep every state: (a) skips a
        contiguous 10% of its steps, (b) skips every 10th step, (c) trains two stretches of 5% of its steps on
        another cluster's shard. Skipping (`lazy_island`) advances the state's step counter and nothing else.
replay  every interval of every lazy island replayed once from its own committed starting state (an audit of
        all N intervals; the honest island as the control): which intervals are bad. From them the exact
        probability that m random one-interval segments catch the island (`catch_probability`), checked
        against `challenge` itself over --challenges seeds.
cli     real `ddm audit` processes: the honest island answers --cli-seeds challenges (`--supply`, then the
        auditor's `ddm audit`), one non-interactive audit (the auditor regenerates), lazy island (a) and (c)
        audited with --cli-seeds seeds; exit codes, steps and seconds. And the retention trade-off: the
        states kept and the steps regenerated per challenge for keep = 1..32 (pure: `replay_plan`).

Prints markdown tables; docs/verification.md ("Auditing island training") holds the results.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

from benchmarks.common import machine_table, markdown_table

# ---------------------------------------------------------------------------------------------------------
# Lazy islands (simulation only: patches the trainer `train_island` builds).
# ---------------------------------------------------------------------------------------------------------


class SwappedReader:
    """`reader`, except that the steps in `steps` get `other`'s batch (another shard: the island trained them
    on data that is not its own). Everything else is `reader`'s."""

    def __init__(self, reader, other, steps: set[int]):
        self._reader, self._other, self._steps = reader, other, steps

    def __getattr__(self, name):
        return getattr(self._reader, name)

    def batch(self, step: int):
        return self._other.batch(step) if step in self._steps else self._reader.batch(step)

    def close(self) -> None:
        self._reader.close()
        self._other.close()


@contextlib.contextmanager
def lazy_island(skip=frozenset(), swap_steps=frozenset(), other_shard: str | None = None):
    """Islands trained by `ddm.experts.train.train_island` inside this block are lazy: the steps in `skip`
    advance the state's step counter and nothing else (the optimiser, EMA and parameters stay), and the steps
    in `swap_steps` train on the batches of the shard at `other_shard` instead of the island's own. Their chain
    records the states they really had, as a lazy island's would."""
    import jax
    import jax.numpy as jnp

    from ddm.data.shards import ShardReader
    from ddm.experts import train as train_module
    from ddm.train.trainer import Trainer

    skip, swap_steps = frozenset(skip), frozenset(swap_steps)

    class LazyTrainer(Trainer):
        def __init__(self, task, cfg, **kwargs):
            if swap_steps:
                other = ShardReader([other_shard], batch_size=cfg.batch_size, seed=cfg.seed,
                                    cluster_ids=[int(task.reader.shard_clusters[0])])
                task = dataclasses.replace(task, reader=SwappedReader(task.reader, other, set(swap_steps)))
            super().__init__(task, cfg, **kwargs)
            honest, bump = self._step, jax.jit(lambda s: {**s, "step": s["step"] + 1}, donate_argnums=0)
            last = {}

            def step(state, images, clusters, classes):
                if int(jax.device_get(state["step"])) not in skip:
                    state, last["metrics"] = honest(state, images, clusters, classes)
                    return state, last["metrics"]
                if "metrics" not in last:  # something to log: the metrics of a step taken on a copy
                    last["metrics"] = honest(jax.tree.map(jnp.copy, state), images, clusters, classes)[1]
                return bump(state), last["metrics"]

            self._step = step

    original = train_module.Trainer
    train_module.Trainer = LazyTrainer
    try:
        yield
    finally:
        train_module.Trainer = original


# ---------------------------------------------------------------------------------------------------------
# Parts.
# ---------------------------------------------------------------------------------------------------------


def _timed(fn):
    w0, c0 = time.perf_counter(), time.process_time()
    value = fn()
    return value, time.perf_counter() - w0, time.process_time() - c0


def _train(out: Path, bundle: Path, sets: list[str], audit, lazy: dict | None = None) -> dict:
    """Trains (unless OUT has its expert.json already) and returns {wall, cpu} of that training."""
    from ddm.experts.train import train_island

    timing = out.with_suffix(".timing.json")
    if (out / "expert.json").is_file() and timing.is_file():
        return json.loads(timing.read_text())
    shutil.rmtree(out, ignore_errors=True)
    context = lazy_island(**lazy) if lazy else contextlib.nullcontext()
    with context:
        _, wall, cpu = _timed(lambda: train_island(bundle, out, sets, audit=audit))
    result = {"wall": wall, "cpu": cpu}
    timing.write_text(json.dumps(result))
    return result


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def islands(args, run: Path) -> dict:
    from ddm.data.islands import Bundle
    from ddm.train.checkpoint import AuditPolicy

    bundle = run / "islands" / str(args.cluster)
    steps = Bundle.open(bundle, args.set).config.expert.train.steps
    other = Bundle.open(run / "islands" / str((args.cluster + 1) % 4)).shard_path
    tenth = steps // 10
    lo = steps // 2 - tenth // 2
    every_state = AuditPolicy(keep=1)
    # The lazy islands first: the first training compiles (into the persistent cache), so the honest island and
    # the one without a chain, whose times are compared, both start warm.
    plan = {
        "(a) contiguous 10% skipped": (every_state, {"skip": range(lo, lo + tenth)}),
        "(b) every 10th step skipped": (every_state, {"skip": range(5, steps, 10)}),
        "(c) 2 x 5% on another shard": (every_state, {"swap_steps": [*range(steps // 5, steps // 5 + tenth // 2),
                                                                     *range(steps * 7 // 10,
                                                                            steps * 7 // 10 + tenth // 2)],
                                                      "other_shard": other}),
        "honest": (AuditPolicy(), None),
        "no chain": (None, None),
    }
    outs = {}
    for i, (name, (policy, lazy)) in enumerate(plan.items()):
        out = Path(args.work) / f"island{i}"
        timing = _train(out, bundle, args.set, policy, lazy)
        outs[name] = {"out": out, "bundle": bundle, **timing, "audit_bytes": _du(out / "audit"),
                      "lazy": {k: len(v) if k != "other_shard" else v for k, v in (lazy or {}).items()}}
        print(f"{name}: {timing['wall']:.1f} s wall, {timing['cpu']:.1f} s CPU, audit/ "
              f"{_du(out / 'audit') / 2**20:.1f} MiB", flush=True)
    return outs


def chain_cost(args, outs: dict) -> str:
    """What the chain costs a training, measured directly: digests of the island's state and writes of the kept
    ones (timed in a loop), scaled by how many the chain has, against the training's CPU time."""
    import jax

    from ddm.core.hashing import pytree_sha256
    from ddm.data.islands import Bundle
    from ddm.experts.records import read_expert_json
    from ddm.experts.train import island_trainer
    from ddm.train.checkpoint import kept_entries, save_state
    from ddm.verify.audit import read_chain

    island = outs["honest"]
    chain = read_chain(island["out"], read_expert_json(island["out"]))
    trainer = island_trainer(Bundle.open(island["bundle"], args.set), Path(args.work))
    state = trainer.initial_state()
    rounds = 20
    _, digest_wall, digest_cpu = _timed(lambda: [pytree_sha256(jax.device_get(state)) for _ in range(rounds)])
    target = Path(args.work) / "state.safetensors"
    _, _, save_cpu = _timed(lambda: [save_state(target, jax.device_get(state)) for _ in range(rounds)])
    target.unlink()
    trainer.task.reader.close()
    entries, kept = len(chain.digests), len(kept_entries(len(chain.digests), chain.keep))
    cpu = (digest_cpu * entries + save_cpu * kept) / rounds
    return (f"one digest {1000 * digest_cpu / rounds:.1f} ms CPU ({1000 * digest_wall / rounds:.1f} ms wall), one kept "
            f"state written {1000 * save_cpu / rounds:.1f} ms CPU; x {entries} digests + {kept} states = {cpu:.2f} s "
            f"CPU = {100 * cpu / outs['no chain']['cpu']:.1f}% of the training without a chain "
            f"({outs['no chain']['cpu']:.1f} s CPU)")


def replay(args, outs: dict) -> list[list]:
    """Every interval of the lazy islands (and the honest control) replayed once: the bad intervals, the exact
    odds and the odds over random challenges."""
    from ddm.experts.records import read_expert_json
    from ddm.verify.audit import audit_island, catch_probability, challenge, read_chain

    rows = []
    for name, island in outs.items():
        if name == "no chain":
            continue
        out = island["out"]
        chain = read_chain(out, read_expert_json(out))
        cache = out.with_suffix(".bad.json")
        if cache.is_file():
            found = json.loads(cache.read_text())
        else:
            every_interval = functools.partial(audit_island, out, island["bundle"], seed=0,
                                               starts=list(range(chain.intervals)))
            report, wall, cpu = _timed(every_interval)
            found = {"bad": [s.start for s in report.segments if s.problem], "wall": wall, "cpu": cpu,
                     "problems": report.problems, "checked": report.checked_steps + report.regenerated_steps}
            cache.write_text(json.dumps(found))
        bad, n = set(found["bad"]), chain.intervals
        exact = catch_probability(n, bad, args.segments)
        drawn = [challenge(n, args.segments, 1, seed) for seed in range(args.challenges)]
        caught = np.mean([any(s in bad for s in starts) for starts in drawn])
        need = next((m for m in range(1, n + 1) if catch_probability(n, bad, m) >= 0.95), None)
        rows.append([name, f"{len(bad)} / {n}", f"{found['checked']:,} steps, {found['wall']:.0f} s",
                     f"{exact:.4f}", f"{caught:.4f}", f"{1 - (1 - len(bad) / n) ** args.segments:.4f}",
                     need, f"{100 * args.segments / n:.1f}%", "; ".join(found["problems"]) or "-"])
        print(rows[-1], flush=True)
    return rows


def _ddm(*argv: str) -> tuple[int, str, float, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    w0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "ddm", *argv], check=False, capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - w0, cpu


def _report(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _forget_supplied(out: Path) -> None:
    """Removes the states earlier `--supply` runs added to OUT (the island keeps only its kept entries)."""
    from ddm.experts.records import read_expert_json
    from ddm.train.checkpoint import kept_entries, state_path
    from ddm.verify.audit import read_chain

    chain = read_chain(out, read_expert_json(out))
    kept = {state_path(out, chain.at[i]) for i in kept_entries(len(chain.digests), chain.keep)}
    for path in (out / "audit" / "states").iterdir():
        if path not in kept:
            path.unlink()


def cli(args, outs: dict) -> list[list]:
    rows = []
    work = Path(args.work)
    _forget_supplied(outs["honest"]["out"])
    seeds = [1000 + i for i in range(args.cli_seeds)]
    # First what the island kept alone, then the challenges it answers (their states stay in OUT: later audits
    # find more states at hand).
    runs = [("honest", "auditor alone (regenerates)", 7, []),
            ("honest", "auditor, 1 segment (the fixed part)", 0, ["--segments", "1"])]
    for seed in seeds:
        runs += [("honest", "island (--supply)", seed, ["--supply"]), ("honest", "auditor, states supplied", seed, [])]
    runs += [("(a) contiguous 10% skipped", "auditor", seed, []) for seed in seeds]
    runs += [("(c) 2 x 5% on another shard", "auditor", seed, []) for seed in seeds]
    for name, who, seed, extra in runs:
        island = outs[name]
        report_path = work / f"report-{island['out'].name}-{seed}-{'supply' if '--supply' in extra else 'audit'}.json"
        report_path.unlink(missing_ok=True)
        segments = [] if "--segments" in extra else ["--segments", str(args.segments)]
        rc, text, wall, cpu = _ddm("audit", str(island["out"]), "--bundle", str(island["bundle"]), "--seed", str(seed),
                                   *segments, "--report", str(report_path), *extra)
        report = _report(report_path)
        if not report:
            print(text[-2000:], flush=True)
        replaying = report.get("replay_seconds", 0)
        rows.append([name, who, seed, rc, report.get("checked_steps"), report.get("regenerated_steps"),
                     f"{100 * report.get('cost', 0):.1f}%", f"{replaying:.1f} s",
                     f"{100 * replaying / island['wall']:.1f}%",
                     f"{wall:.1f} s ({cpu:.1f} s CPU)", f"{100 * wall / island['wall']:.1f}%",
                     f"{100 * cpu / island['cpu']:.1f}%"])
        print(rows[-1], flush=True)
    return rows


def retention(args, outs: dict) -> list[list]:
    """States kept and steps regenerated per challenge (island's `--supply`, or an auditor alone) by `keep`."""
    from ddm.experts.records import read_expert_json
    from ddm.train.checkpoint import kept_entries
    from ddm.verify.audit import challenge, read_chain, replay_plan

    out = outs["honest"]["out"]
    chain = read_chain(out, read_expert_json(out))
    state_bytes = (out / "audit" / "states" / "0.safetensors").stat().st_size
    n, rows = chain.intervals, []
    for keep in (1, 2, 4, 8, 16, 32):
        kept = set(kept_entries(len(chain.digests), keep))
        regenerated = []
        for seed in range(min(args.challenges, 2000)):
            starts = challenge(n, args.segments, 1, seed)
            regenerated.append(sum(start - origin for origin, start, _ in replay_plan(starts, 1, kept)))
        mean = float(np.mean(regenerated)) * chain.every
        rows.append([keep, len(kept), f"{len(kept) * state_bytes / 2**20:.0f} MiB", f"{mean:,.0f}",
                     f"{100 * mean / chain.steps:.1f}%",
                     f"{100 * (mean + args.segments * chain.every) / chain.steps:.1f}%"])
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/ddm-audit")
    parser.add_argument("--set", action="append", default=[], help="config override of the islands (repeatable)")
    parser.add_argument("--cluster", type=int, default=0)
    parser.add_argument("--segments", type=int, default=29)
    parser.add_argument("--challenges", type=int, default=10_000)
    parser.add_argument("--cli-seeds", type=int, default=3)
    parser.add_argument("--parts", default="train,replay,cli")
    args = parser.parse_args(argv)
    parts = set(args.parts.split(","))

    from ddm.app import cli as ddm_cli
    from ddm.core.cache import enable_compilation_cache

    enable_compilation_cache()
    work = Path(args.work)
    run = work / "run"
    if not (run / "manifest.json").is_file():
        assert ddm_cli.main(["prepare", "--config", str(REPO / "configs" / "digits.yaml"), "--run-dir", str(run)]) == 0
    print(machine_table(extra={"command": " ".join(["python -m benchmarks.bench_audit", *(argv or sys.argv[1:])])}))
    outs = islands(args, run)
    honest, plain = outs["honest"], outs["no chain"]
    print("\n" + markdown_table(
        ["island", "wall s", "CPU s", "audit/ on disk", "lazy"],
        [[name, f"{o['wall']:.1f}", f"{o['cpu']:.1f}", f"{o['audit_bytes'] / 2**20:.1f} MiB", o["lazy"] or "-"]
         for name, o in outs.items()]))
    print(f"\nchain overhead, honest vs no chain (one training each): {100 * (honest['cpu'] / plain['cpu'] - 1):+.1f}% "
          f"CPU, {100 * (honest['wall'] / plain['wall'] - 1):+.1f}% wall")
    print(f"chain overhead, measured directly: {chain_cost(args, outs)}")
    if "replay" in parts:
        print("\n" + markdown_table(
            ["island", "bad intervals", "full replay", f"P(catch), m={args.segments} (exact)",
             f"caught by {args.challenges:,} challenges", "(1 - b/N)^m", "m for 95%", "cost of m",
             "whole-claim problems"],
            replay(args, outs)))
    if "cli" in parts:
        print("\n" + markdown_table(
            ["island", "who", "seed", "exit", "steps checked", "steps regenerated", "of training", "replaying",
             "vs training (wall)", "whole process", "wall vs training", "CPU vs training"], cli(args, outs)))
        print("\n" + markdown_table(
            ["keep", "states kept", "on disk", "steps regenerated per challenge (mean)", "of training",
             "auditor alone: total cost"], retention(args, outs)))


if __name__ == "__main__":
    main()
