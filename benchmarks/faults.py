"""Counted fault figures (issue 17): SIGKILLs during training, corrupted files, bad input, fuzzed records.

    python -m benchmarks.faults [--work /tmp/ddm-faults] [--kills 20] [--parallel 4] [--seed 0] [--steps 60]
        [--parts kills,corrupt,badinput,fuzz,cost,trust] [--records 1000] [--no-compile-cache]

Everything runs on digits (K=2, a micro expert of --steps steps, batch 32, a checkpoint every 5 steps), in
`--work` (wiped first):

kills     one uninterrupted `ddm train-expert --cluster 0` gives the reference final EMA SHA-256 and its wall
          time; then --kills times (--parallel at a time): a fresh copy of the prepared run, `ddm train-expert`
          SIGKILLed at a random moment after its first checkpoint (uniform over the reference's time from its
          first checkpoint to its end; numpy seed --seed), resumed to the end; counts the final SHA-256 equal
          to the reference.
corrupt   on a trained run (2 experts + router): a flipped bit in an intermediate expert / router checkpoint,
          the final expert / router weights, a shard chunk; manifests that are invalid JSON, have wrong types,
          or swap two clusters' shards -> whether the command that reads it notices (exit 2 or a warning).
badinput  `tests/oracles/badinput.py`: every bad input of the catalogue against the trained run -> clean errors.
fuzz      `tests/oracles/fuzz.py` `run_fuzz` (issue 18's 1,000 seeded mutants of an honest record, auto mode) ->
          tracebacks, exit codes, exit 0 on altered claims, the slowest record.
cost      what the checkpoint digests cost: hashing a step of the micro expert, SHA-256 throughput.
trust     issue 30's smaller cases, each once as the real command: unsafe launcher fields, a huge guidance
          scale, `--islands-to` into a file, two run directories, a refused consensus-eval, SIGTERM to `ddm run`
          (then a resume), `ddm sample` without --out, top-k beyond K, the Kubernetes Job of a half-trained run;
          counts those refused in one line (exit 2) or behaving as fixed.

Every command runs as a real `ddm` process (`python -m ddm.app.cli`), except badinput and fuzz (in-process, as
the CLI calls them). Prints markdown tables; docs/reliability.md holds the results.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

import numpy as np  # noqa: E402
import yaml  # noqa: E402

from benchmarks.common import machine_table, markdown_table  # noqa: E402

TRAIN = ["--set", "data.k=2", "--set", "expert.train.batch_size=32", "--set", "expert.train.warmup_steps=5",
         "--set", "expert.train.checkpoint_every=5", "--set", "expert.train.log_every=10",
         "--set", "router.train.steps=30", "--set", "router.train.batch_size=32", "--set", "router.train.warmup_steps=5",
         "--set", "router.train.checkpoint_every=10", "--set", "router.train.log_every=10"]


# Every `ddm` process this script starts gets this environment; main() adds a persistent compilation cache shared
# by all of them (unless --no-compile-cache): the first training compiles, the others load, so a kill trial's
# time is mostly training rather than XLA compiling the same programs again.
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


def ddm(*argv: str, check: bool = False) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "ddm.app.cli", *argv], capture_output=True, text=True,
                            env=ENV)
    if check and result.returncode:
        raise SystemExit(f"ddm {' '.join(argv)} failed:\n{result.stderr[-2000:]}")
    return result


def flip_middle_bit(path: Path) -> Path:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    return path


def largest_file(folder: Path) -> Path:
    return max((p for p in folder.rglob("*") if p.is_file() and not p.name.endswith(".json")),
               key=lambda p: p.stat().st_size)


def expert_sha(run: Path, k: int = 0) -> str | None:
    entry = json.loads((run / "manifest.json").read_text()).get("experts", {}).get(str(k)) or {}
    return entry.get("sha256") if entry.get("status") == "finished" else None


def committed_steps(checkpoints: Path) -> list[int]:
    return sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()) if checkpoints.is_dir() else []


# ---------------------------------------------------------------------------------------------------------


def _train(run: Path, train: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ddm.app.cli", train[0], "--run-dir", str(run), *train[1:]],
                            stdout=subprocess.DEVNULL, stderr=open(log, "w"), env=ENV)


def kills(base: Path, work: Path, count: int, steps: int, seed: int, parallel: int) -> None:
    """SIGKILL each trial at a random moment of its training proper: `delay` after its first committed checkpoint,
    uniform over the reference's time from its first checkpoint to its end (startup and compilation are not
    training; a kill there tests nothing). Trials run `parallel` at a time."""
    train = ["train-expert", "--cluster", "0", "--no-progress", "--set", f"expert.train.steps={steps}", *TRAIN]
    reference = work / "kill-reference"
    shutil.copytree(base, reference)
    t0 = time.perf_counter()
    proc = _train(reference, train, work / "kill-reference.log")
    first = None
    while proc.poll() is None:
        if first is None and committed_steps(reference / "experts" / "0" / "checkpoints"):
            first = time.perf_counter() - t0
        time.sleep(0.05)
    total = time.perf_counter() - t0
    if proc.returncode or first is None:
        raise SystemExit(f"the reference training failed:\n{(work / 'kill-reference.log').read_text()[-2000:]}")
    ref_sha = expert_sha(reference)
    print(f"reference: {steps} steps in {total:.1f}s (first checkpoint, step 5, after {first:.1f}s), final EMA "
          f"{ref_sha[:16]}; kills at a uniform moment 0..{total - first:.1f}s after a trial's first checkpoint, "
          f"{parallel} trials at a time\n")

    rng = np.random.default_rng(seed)
    delays = rng.uniform(0.0, total - first, size=count)
    pending = list(range(count))
    running: dict[int, dict] = {}
    results: dict[int, list] = {}
    while pending or running:
        while pending and len(running) < parallel:
            i = pending.pop(0)
            trial = work / f"kill-{i}"
            shutil.copytree(base, trial)
            running[i] = {"dir": trial, "proc": _train(trial, train, work / f"kill-{i}.log"), "since": None,
                          "stage": "train"}
        for i, t in list(running.items()):
            ck = t["dir"] / "experts" / "0" / "checkpoints"
            if t["stage"] == "train":
                if t["since"] is None and committed_steps(ck):
                    t["since"] = time.perf_counter()
                done = t["proc"].poll() is not None
                if done or (t["since"] is not None and time.perf_counter() - t["since"] >= delays[i]):
                    if not done:
                        os.kill(t["proc"].pid, signal.SIGKILL)
                        t["proc"].wait()
                    t["outcome"] = "finished first" if done else "SIGKILL"
                    t["at_kill"] = committed_steps(ck)
                    t["mid_save"] = ck.is_dir() and any("tmp" in p.name for p in ck.iterdir())
                    t["stage"], t["proc"] = "resume", _train(t["dir"], train, work / f"kill-{i}-resume.log")
            elif t["proc"].poll() is not None:
                sha = expert_sha(t["dir"])
                results[i] = [i, f"{delays[i]:.1f}", t["outcome"], t["at_kill"][-1] if t["at_kill"] else "-",
                              "yes" if t["mid_save"] else "", t["proc"].returncode, (sha or "none")[:16],
                              "yes" if sha == ref_sha else "**no**"]
                print(f"kill {i}: {results[i]}", file=sys.stderr, flush=True)
                shutil.rmtree(t["dir"], ignore_errors=True)
                del running[i]
        time.sleep(0.02)
    rows = [results[i] for i in range(count)]
    equal = sum(r[-1] == "yes" for r in rows)
    landed = sum(r[2] == "SIGKILL" for r in rows)
    print(markdown_table(["#", "kill s after first checkpoint", "outcome", "latest step at kill", "save in flight",
                          "resume exit", "final EMA sha256", "= reference"], rows))
    print(f"\n**{equal}/{count} final EMA SHA-256 equal to the uninterrupted run** ({landed} of {count} SIGKILLs "
          f"landed before the job ended)\n")


# ---------------------------------------------------------------------------------------------------------


def _without_train(argv: list[str]) -> list[str]:
    """argv without the `--set` pairs of TRAIN (the tiny budgets every training command gets)."""
    pairs = {TRAIN[i + 1] for i in range(0, len(TRAIN), 2)}
    out, i = [], 0
    while i < len(argv):
        if argv[i] == "--set" and i + 1 < len(argv) and argv[i + 1] in pairs:
            i += 2
            continue
        out.append(argv[i])
        i += 1
    return out


def detected(result: subprocess.CompletedProcess, *, warning: str | None = None) -> tuple[str, str]:
    """(verdict, the line that shows it) of a command run on a corrupted input."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    if warning is not None:
        hit = [line for line in lines if warning in line]
        if hit:
            return f"detected (warning, exit {result.returncode})", hit[0]
    if result.returncode == 2 and lines and lines[-1].startswith("ddm: error: "):
        return "detected (exit 2)", lines[-1]
    tb = "Traceback" in result.stderr
    return f"**not detected** (exit {result.returncode}{', traceback' if tb else ''})", lines[-1] if lines else ""


def corrupt(base: Path, work: Path, steps: int) -> Path:
    """Returns the trained run (for badinput and fuzz)."""
    full = work / "trained"
    shutil.copytree(base, full)
    for k in (0, 1):
        ddm("train-expert", "--run-dir", str(full), "--cluster", str(k), "--no-progress", "--set",
            f"expert.train.steps={steps}", *TRAIN, check=True)
    ddm("train-router", "--run-dir", str(full), *TRAIN, check=True)
    manifest = json.loads((full / "manifest.json").read_text())
    sample = ("sample", "--n", "2", "--steps", "2")
    rows = []

    def case(name: str, setup, argv: tuple[str, ...], warning: str | None = None) -> None:
        run = work / "corrupt" / name.replace(" ", "_")
        shutil.copytree(full, run)
        what = setup(run)
        result = ddm(*argv[:1], "--run-dir", str(run), *argv[1:]) if argv[0] != "info" else ddm("info", str(run))
        verdict, line = detected(result, warning=warning)
        shown = " ".join(("ddm", *argv[:1], *_without_train(list(argv[1:]))))
        rows.append([name, what, shown, verdict, line.replace("|", "/")[:160]])
        print(f"corrupt: {rows[-1]}", file=sys.stderr, flush=True)
        shutil.rmtree(run, ignore_errors=True)

    def flip(rel: str):
        def setup(run: Path) -> str:
            path = run / rel
            target = largest_file(path) if path.is_dir() else path
            flip_middle_bit(target)
            return f"1 bit of {target.relative_to(run)}"
        return setup

    def rewrite(change=None, text=None):
        def setup(run: Path) -> str:
            m = json.loads((run / "manifest.json").read_text())
            if text is not None:
                (run / "manifest.json").write_text(text)
                return "manifest.json: " + text[:30]
            description = change(m)
            (run / "manifest.json").write_text(json.dumps(m))
            return description
        return setup

    def swap(m):
        m["clusters"][0]["shard"], m["clusters"][1]["shard"] = m["clusters"][1]["shard"], m["clusters"][0]["shard"]
        return "clusters 0 and 1 swap shards"

    def types_clusters(m):
        m["clusters"] = "x"
        return '"clusters": "x"'

    def types_shape(m):
        m["dataset"]["image_shape"] = "abc"
        return '"image_shape": "abc"'

    last = committed_steps(full / "experts" / "0" / "checkpoints")[-1]
    router_last = committed_steps(full / "router" / "checkpoints")[-1]
    more = f"expert.train.steps={steps + 10}"
    case("intermediate expert checkpoint", flip(f"experts/0/checkpoints/{last}"),
         ("train-expert", "--cluster", "0", "--no-progress", *TRAIN, "--set", more), warning="failed verification")
    case("final expert weights", flip(manifest["experts"]["0"]["path"]), sample)
    case("intermediate router checkpoint", flip(f"router/checkpoints/{router_last}"),
         ("train-router", *TRAIN, "--set", "router.train.steps=40"), warning="failed verification")
    case("final router weights", flip(manifest["router"]["path"]), sample)
    case("shard chunk", flip(f"{manifest['clusters'][0]['shard']}/images"),
         ("train-expert", "--cluster", "0", "--no-progress", *TRAIN, "--set", more))
    case("manifest: invalid JSON", rewrite(text='{"format": "ddm-run/v2", "clusters": ['), ("info",))
    case("manifest: wrong type (clusters)", rewrite(types_clusters), ("info",))
    case("manifest: wrong type (image_shape)", rewrite(types_shape), sample)
    case("manifest: swapped shards", rewrite(swap),
         ("train-expert", "--cluster", "0", "--no-progress", *TRAIN, "--set", more))
    print(markdown_table(["corrupted", "how", "command", "outcome", "what it said (last line)"], rows))
    print(f"\n**{sum(r[3].startswith('detected') for r in rows)}/{len(rows)} corruptions detected**\n")
    return full


def bad_input(run: Path, work: Path) -> None:
    from tests.oracles import badinput

    cases = badinput.bad_input_cases(run, work / "badinput")
    t0 = time.perf_counter()
    outcomes = badinput.run_cases(cases)
    seconds = time.perf_counter() - t0
    table = badinput.summary(outcomes)
    rows = [[command, r["cases"], r["clean"], r["exit3"], r["traceback"], r["leftovers"]] for command, r in table.items()]
    total = [sum(r[i] for r in rows) for i in range(1, 6)]
    rows.append(["**all**", *total])
    print(markdown_table(["command", "bad inputs", "clean (exit 2, one line, nothing left)", "exit 3", "traceback",
                          "files left behind"], rows))
    print(f"\n**{total[1]}/{total[0]} clean errors** ({seconds:.0f}s)")
    for o in outcomes:
        if not o.clean:
            print(f"- not clean: {o.case.command} | {o.case.name}: exit {o.code}, {o.last_line[:200]}")
    print()


def fuzz(run: Path, work: Path, records: int, seed: int) -> None:
    from ddm.data.run import Run
    from ddm.sampling.request import Request
    from ddm.verify.environment import environment
    from ddm.verify.records import make_record
    from ddm.verify.verdict import Verifier
    from tests.oracles.fuzz import run_fuzz

    opened = Run.open(run)
    verifier = Verifier(opened)
    request = Request(seed=0, n=4, strategy="top1", steps=8, solver="heun")
    record = make_record(opened.sha256, request, verifier.regenerate(request), environment())
    t0 = time.perf_counter()
    result = run_fuzz(verifier, record, records, seed, work / "fuzz")
    r = result["by_category"].values()
    total = {k: sum(x[k] for x in r) for k in ("records", "altered", "exit0", "exit1", "exit2", "traceback")}
    print(markdown_table(["records", "altered claims", "exit 0", "exit 1", "exit 2", "traceback",
                          "exit 0 on altered", "slowest record s", "median s"],
                         [[*total.values(), len(result["altered_exit0"]), result["max_seconds"],
                           result["median_seconds"]]]))
    print(f"\n({time.perf_counter() - t0:.0f}s; seed {seed}, auto mode)\n")


def cost(work: Path) -> None:
    from ddm.core.hashing import file_sha256
    from ddm.train.checkpoint import step_file_digests

    step_dirs = sorted((work / "trained" / "experts" / "0" / "checkpoints").glob("[0-9]*"))
    rows = []
    if step_dirs:
        step = step_dirs[-1]
        size = sum(p.stat().st_size for p in step.rglob("*") if p.is_file())
        t0 = time.perf_counter()
        for _ in range(10):
            step_file_digests(step)
        rows.append([f"one checkpoint step of the micro expert ({size / 1e6:.2f} MB)",
                     f"{(time.perf_counter() - t0) / 10 * 1e3:.1f} ms"])
    big = work / "sha-throughput.bin"
    big.write_bytes(np.random.default_rng(0).bytes(256 * 2**20))
    t0 = time.perf_counter()
    file_sha256(big)
    seconds = time.perf_counter() - t0
    rows.append(["SHA-256 of 256 MiB (file_sha256)", f"{seconds:.2f} s ({256 / seconds:.0f} MiB/s)"])
    big.unlink()
    print(markdown_table(["digest", "time"], rows))
    print()


def trust(base: Path, work: Path, steps: int) -> None:
    """Issue 30's smaller cases on a copy of the prepared run (trained here: SIGTERM mid-way, then resumed)."""
    root = work / "trust"
    run = root / "run"
    shutil.copytree(base, run)
    rows = []

    def row(case: str, command: str, before: str, now: str, fixed: bool) -> None:
        now = now.replace(str(run), "RUN").replace(str(root), "WORK").replace("|", "/")[:170]
        rows.append([case, f"`{command}`", before, now, "yes" if fixed else "**no**"])
        print(f"trust: {rows[-1]}", file=sys.stderr, flush=True)

    def refused(result: subprocess.CompletedProcess, *absent: Path) -> tuple[str, bool]:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        left = [str(p.relative_to(root)) for p in absent if p.exists()]
        ok = result.returncode == 2 and len(lines) == 1 and lines[0].startswith("ddm: error: ") and not left
        return f"exit {result.returncode}: {lines[-1] if lines else ''}" + (f"; left {left}" if left else ""), ok

    now, ok = refused(ddm("train-islands", "--run-dir", str(run), "--launcher", "slurm", "--partition",
                          "gpu\necho owned"), run / "slurm")
    row("newline in `--partition`", "ddm train-islands --launcher slurm --partition $'gpu\\necho owned'",
        "a shell line in islands.sbatch, exit 0", now, ok)
    now, ok = refused(ddm("train-islands", "--run-dir", str(run), "--launcher", "k8s", "--image", "ghcr.io/x/ddm:1",
                          "--experts", "s3://b/e\nspec: {}"), run / "k8s")
    row("newline in a k8s field", "ddm train-islands --launcher k8s --experts $'s3://b/e\\nspec: {}'",
        "a YAML line in islands.yaml's header, exit 0", now, ok)
    (root / "file").write_text("x")
    t0 = time.perf_counter()
    result = ddm("prepare", "--config", str(REPO / "configs" / "digits.yaml"), "--run-dir", str(root / "new"),
                 "--islands-to", str(root / "file" / "bundles"), *TRAIN)
    now, ok = refused(result, root / "new")
    row("`--islands-to` that cannot be written", "ddm prepare --islands-to FILE/bundles",
        "refused after the whole prepare", f"{now} ({time.perf_counter() - t0:.1f} s)", ok)
    (root / "other").mkdir()
    now, ok = refused(ddm("info", str(run), "--run-dir", str(root / "other")))
    row("two run directories", "ddm info RUN --run-dir OTHER", "one picked silently, exit 0", now, ok)
    now, ok = refused(ddm("consensus-eval", "--run-dir", str(run), *TRAIN), run / "eval")
    row("refused consensus-eval", "ddm consensus-eval (no expert trained)", "consensus_work/ left behind", now, ok)

    # SIGTERM to `ddm run` while its islands train; then `ddm train-islands` resumes them.
    budget = ["--set", f"expert.train.steps={steps}"]
    proc = subprocess.Popen([sys.executable, "-m", "ddm.app.cli", "run", "--config", str(REPO / "configs" /
                             "digits.yaml"), "--run-dir", str(run), "--parallel", "2", *TRAIN, *budget],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    metrics = [run / "experts" / str(k) / "metrics.jsonl" for k in (0, 1)]
    while proc.poll() is None and not any(p.exists() and p.read_text() for p in metrics):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    pids = [int(line.split("(pid ")[1].rstrip(")")) for line in out.splitlines() if "started (pid" in line]
    alive = [p for p in pids if _alive(p)]
    last = (err.strip().splitlines() or [""])[-1]
    row("SIGTERM to `ddm run`", "kill -TERM <ddm run> (islands training)", "exit 143, islands orphaned (training on)",
        f"exit {proc.returncode}, {len(alive)} of {len(pids)} islands alive: {last}",
        proc.returncode == 75 and pids and not alive)
    resumed = ddm("train-islands", "--run-dir", str(run), "--parallel", "2", *TRAIN, *budget)
    logs = " ".join((run / "experts" / str(k) / "train.log").read_text() for k in (0, 1))
    marks = sorted({line.split("resumed from ")[1] for line in logs.splitlines() if "resumed from step" in line})
    row("... then a rerun", "ddm train-islands (same budget)", "-",
        f"exit {resumed.returncode}, resumed from {', '.join(marks) or 'nothing'}", resumed.returncode == 0 and marks)
    ddm("train-router", "--run-dir", str(run), *TRAIN, check=True)

    now, ok = refused(ddm("sample", "--run-dir", str(run), "--class", "3", "--cfg-scale", "1e300", "--n", "2",
                          "--steps", "2", "--out", str(root / "cfg.png")), root / "cfg.png")
    row("`--cfg-scale 1e300`", "ddm sample --class 3 --cfg-scale 1e300", "a NaN image, exit 0", now, ok)
    grid = run / "samples" / "sample.png"  # `ddm run`'s grid of the `sample` strategy
    grid.parent.mkdir(exist_ok=True)
    grid.write_bytes(b"the grid of ddm run")
    results = [ddm("sample", "--run-dir", str(run), "--strategy", "sample", "--n", "2", "--steps", "2") for _ in (0, 1)]
    made = sorted(p.name for p in grid.parent.glob("sample-*.png"))
    kept = grid.read_bytes() == b"the grid of ddm run"
    row("`ddm sample` without `--out`, twice", "ddm sample --strategy sample (x2)", "overwrote samples/sample.png",
        f"exits {[r.returncode for r in results]}, wrote {made}, sample.png {'kept' if kept else 'overwritten'}",
        all(r.returncode == 0 for r in results) and len(made) == 2 and kept)
    result = ddm("sample", "--run-dir", str(run), "--strategy", "topk:9", "--n", "2", "--steps", "2", "--out",
                 str(root / "topk.png"))
    said = [line for line in result.stderr.splitlines() if "are available" in line]
    row("`--strategy topk:9` on K = 2", "ddm sample --strategy topk:9", "ran without a word",
        f"exit {result.returncode}: {said[0] if said else 'no warning'}", result.returncode == 0 and bool(said))
    half = root / "half"
    shutil.copytree(run, half, ignore=shutil.ignore_patterns("checkpoints", "final", "samples"))
    manifest = json.loads((half / "manifest.json").read_text())
    del manifest["experts"]["0"]
    (half / "manifest.json").write_text(json.dumps(manifest))
    result = ddm("train-islands", "--run-dir", str(half), "--launcher", "k8s", "--image", "ghcr.io/x/ddm:1", *budget)
    spec = yaml.safe_load((half / "k8s" / "islands.yaml").read_text())["spec"] if result.returncode == 0 else {}
    row("k8s Job of a run with island 1 assembled", "ddm train-islands --launcher k8s", "completions 2 (all islands)",
        f"exit {result.returncode}, completions {spec.get('completions')}", spec.get("completions") == 1)

    print(markdown_table(["case", "command", "before (the issue's report)", "now", "fixed"], rows))
    print(f"\n**{sum(r[-1] == 'yes' for r in rows)}/{len(rows)} cases refused in one line or fixed**\n")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "ddm-faults"))
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--records", type=int, default=1000)
    parser.add_argument("--parallel", type=int, default=4, help="kill trials at a time")
    parser.add_argument("--parts", default="kills,corrupt,badinput,fuzz,cost,trust")
    parser.add_argument("--no-compile-cache", action="store_true",
                        help="every ddm process compiles afresh (default: one JAX compilation cache in --work)")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    if not args.no_compile_cache:
        ENV.update(JAX_COMPILATION_CACHE_DIR=str(work / "jax-cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    print(machine_table(extra={"command": " ".join(["python", *sys.argv])}))
    print()
    base = work / "prepared"
    ddm("prepare", "--config", str(REPO / "configs" / "digits.yaml"), "--run-dir", str(base), *TRAIN, check=True)
    t0 = time.perf_counter()
    if "kills" in parts:
        print(f"## SIGKILL during training ({args.kills} kills)\n")
        kills(base, work, args.kills, args.steps, args.seed, args.parallel)
    trained = None
    if parts & {"corrupt", "badinput", "fuzz", "cost"}:
        print("## Corrupted files\n")
        trained = corrupt(base, work, args.steps)
    if "badinput" in parts:
        print("## Bad input\n")
        bad_input(trained, work)
    if "fuzz" in parts:
        print(f"## {args.records} fuzzed verification records\n")
        fuzz(trained, work, args.records, args.seed)
    if "cost" in parts:
        print("## Cost of the checkpoint digests\n")
        cost(work)
    if "trust" in parts:
        print("## Trust between strangers: the smaller cases\n")
        trust(base, work, args.steps)
    print(f"total {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
