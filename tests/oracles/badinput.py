"""A catalogue of bad input for every `ddm` subcommand, and a harness that counts how cleanly each is refused.

What an adversarial (or just unlucky) user types: missing, truncated and mistyped files, manifests that are
valid JSON with wrong types, seeds beyond 32 bits, labels that are not numbers, outputs into folders or below
regular files, records asking for 10^9 steps. `bad_input_cases(run_dir, work)` builds them (the broken files
go into `work`; `run_dir` is a trained run the cases must not change). `run_case` runs one in-process exactly
as the `ddm` command does (`ddm.app.cli.main`) and calls it *clean* when it exits 2 with a one-line
`ddm: error: ...` as its last line, no traceback, and none of the outputs it named left behind.

`benchmarks/faults.py` prints the counts per subcommand (docs/reliability.md); `tests/test_integrity.py` runs
the whole catalogue.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ddm.app import cli
from ddm.core.files import write_refusal

HUGE_SEED = str(2**64)  # the 18446744073709551616


@dataclasses.dataclass(frozen=True)
class Case:
    """command: the subcommand (for the table). name: what is wrong. argv: the command line after `ddm`.
    outputs: paths that must not exist after the command failed."""

    command: str
    name: str
    argv: tuple[str, ...]
    outputs: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Outcome:
    case: Case
    code: int | None  # exit code (None: an exception escaped the command)
    last_line: str  # the last line on stderr
    traceback: bool
    leftovers: tuple[str, ...]

    @property
    def clean(self) -> bool:
        return (self.code == 2 and not self.traceback and not self.leftovers
                and self.last_line.startswith("ddm: error: "))


def run_case(case: Case) -> Outcome:
    """Runs `ddm <case.argv>` in-process with stdout/stderr captured; what came of it."""
    out, err = io.StringIO(), io.StringIO()
    code: int | None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(list(case.argv))
        except SystemExit as exit_:  # argparse's own exit (parse errors, --help)
            code = exit_.code if isinstance(exit_.code, int) else 2
        except BaseException as escaped:  # noqa: BLE001 - what the harness exists to count
            code = None
            err.write(f"Traceback (escaped): {type(escaped).__name__}: {escaped}\n")
    lines = [line for line in err.getvalue().splitlines() if line.strip()]
    leftovers = tuple(p for p in case.outputs if Path(p).exists())
    return Outcome(case, code, lines[-1] if lines else "", "Traceback" in err.getvalue(), leftovers)


def run_cases(cases: list[Case], progress: Callable[[Outcome], None] | None = None) -> list[Outcome]:
    outcomes = []
    for case in cases:
        outcomes.append(run_case(case))
        if progress is not None:
            progress(outcomes[-1])
    return outcomes


def summary(outcomes: list[Outcome]) -> dict[str, dict[str, int]]:
    """{command: {"cases", "clean", "exit3", "traceback", "leftovers"}} in catalogue order."""
    table: dict[str, dict[str, int]] = {}
    for o in outcomes:
        row = table.setdefault(o.case.command, {"cases": 0, "clean": 0, "exit3": 0, "traceback": 0, "leftovers": 0})
        row["cases"] += 1
        row["clean"] += o.clean
        row["exit3"] += o.code == 3
        row["traceback"] += o.traceback or o.code is None
        row["leftovers"] += bool(o.leftovers)
    return table


# ---------------------------------------------------------------------------------------------------------
# The catalogue.
# ---------------------------------------------------------------------------------------------------------


def _broken_run(run_dir: Path, work: Path, name: str, change: Callable[[dict], object] | None = None,
                text: str | bytes | None = None) -> str:
    """A copy of the run's manifest (nothing else) in work/runs/name, changed by `change` or replaced by `text`."""
    target = work / "runs" / name
    target.mkdir(parents=True, exist_ok=True)
    if text is None:
        manifest = json.loads((run_dir / "manifest.json").read_text())
        replaced = change(manifest) if change is not None else None
        text = json.dumps(manifest if replaced is None else replaced)
    (target / "manifest.json").write_bytes(text.encode() if isinstance(text, str) else text)
    return str(target)


def _set(path: tuple, value) -> Callable[[dict], None]:
    def change(manifest: dict) -> None:
        node = manifest
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return change


def _record(**request) -> dict:
    """A structurally complete record (dummy digests and values) with `request` fields replaced."""
    req = {"seed": 0, "n": 1, "strategy": "top1", "steps": 2, "solver": "euler", "labels": None, "cfg_scale": None,
           **request}
    return {"format": "ddm-record/v2", "manifest_sha256": "0" * 64, "request": req, "shape": [req["n"], 8, 8, 1]
            if isinstance(req["n"], int) and 0 < req["n"] < 10**6 else [1, 8, 8, 1], "sha256": "0" * 64,
            "images": [{"sha256": "0" * 64, "phash": "0" * 16, "dhash": "0" * 16}], "values": "AAAA",
            "environment": {}}


def _files(work: Path) -> dict[str, str]:
    """Broken input files shared by the cases."""
    files = work / "files"
    files.mkdir(parents=True, exist_ok=True)
    good = files / "good.npz"
    np.savez(good, images=np.zeros((4, 8, 8, 1), np.uint8))
    truncated = files / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    corrupt_zip = files / "corrupt.npz"
    data = bytearray(good.read_bytes())
    data[len(data) // 3: len(data) // 3 + 32] = b"\xff" * 32
    corrupt_zip.write_bytes(bytes(data))
    with zipfile.ZipFile(files / "empty.npz", "w"):
        pass
    np.save(files / "objects.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    np.save(files / "strings.npy", np.array(["a", "b"]))
    np.save(files / "rank2.npy", np.zeros((4, 8), np.uint8))
    np.save(files / "nan.npy", np.full((4, 8, 8), np.nan, np.float32))
    (files / "garbage.npy").write_bytes(b"\x93NUMPY garbage")
    (files / "text.png").write_text("not an image")
    (files / "plain.txt").write_text("a regular file")
    (files / "bad.yaml").write_text("data: [unclosed\n")
    (files / "list.yaml").write_text("- 1\n- 2\n")
    (files / "unknown.yaml").write_text("data:\n  nonsense: 1\n")
    (files / "types.yaml").write_text("data:\n  k: many\n")
    (files / "garbage.key").write_bytes(b"\x00\x01 not a key")
    (files / "empty_dir").mkdir(exist_ok=True)
    (files / "nonempty").mkdir(exist_ok=True)
    (files / "nonempty" / "x").write_text("x")
    records = {
        "steps_1e9": _record(steps=10**9),
        "n_1e9": _record(n=10**9),
        "seed_2_63": _record(seed=2**63),
        "seed_negative": _record(seed=-1),
        "labels_int64": _record(labels=[2**40]),
        "labels_text": _record(labels=["a"]),
        "strategy_bogus": _record(strategy="best3"),
        "cfg_nan": {**_record(), "request": {**_record()["request"], "cfg_scale": "NaN"}},
    }
    for name, record in records.items():
        (files / f"record_{name}.json").write_text(json.dumps(record))
    (files / "record_truncated.json").write_text(json.dumps(_record())[:100])
    (files / "record_list.json").write_text("[1, 2, 3]")
    (files / "record_deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (files / "record_bigint.json").write_text('{"format": ' + "9" * 5000 + "}")
    (files / "record_binary.json").write_bytes(bytes(range(256)) * 4)
    return {p.name: str(p) for p in files.iterdir()}


def refusing_folder(work: str | Path) -> Path | None:
    """A folder this user cannot create files in: an empty chmod-0500 folder in `work`, or, for root (who writes
    into that anyway), /sys, where nobody creates files; None where neither refuses."""
    locked = Path(work) / "locked"
    locked.mkdir(mode=0o500, parents=True, exist_ok=True)
    return next((p for p in (locked, Path("/sys")) if p.is_dir() and write_refusal(p) is not None), None)


def bad_input_cases(run_dir: str | Path, work: str | Path) -> list[Case]:
    """At least 100 bad inputs across every subcommand. `run_dir`: a trained run (not changed: cases fail
    before anything is written, which the harness checks for the outputs each names)."""
    run, work = Path(run_dir), Path(work)
    f = _files(work)
    r = str(run)
    out = work / "out"
    cases: list[Case] = []

    def add(command: str, name: str, *argv: str, outputs: tuple = ()) -> None:
        cases.append(Case(command, name, tuple(argv), tuple(str(p) for p in outputs)))

    below_file = str(Path(f["plain.txt"]) / "x")
    # Manifests that are not what they claim (each a copy of the run's manifest, nothing else).
    broken = {
        "invalid JSON": _broken_run(run, work, "json", text="{not json"),
        "binary": _broken_run(run, work, "binary", text=bytes(range(256))),
        "top-level list": _broken_run(run, work, "list", text="[1, 2]"),
        "clusters 'x'": _broken_run(run, work, "clusters", _set(("clusters",), "x")),
        "image_shape 'abc'": _broken_run(run, work, "shape", _set(("dataset", "image_shape"), "abc")),
        "image_shape [8, 'a', 1]": _broken_run(run, work, "shape2", _set(("dataset", "image_shape"), [8, "a", 1])),
        "no dataset": _broken_run(run, work, "nodataset", lambda m: m.pop("dataset")),
        "other format": _broken_run(run, work, "format", _set(("format",), "ddm-run/v0")),
        "num_images 1e9 (float)": _broken_run(run, work, "float", _set(("dataset", "num_images"), 1e9)),
        "share NaN": _broken_run(run, work, "nan", text=(run / "manifest.json").read_text().replace(
            '"share": ', '"share": NaN, "x": ', 1)),
        "count 'many'": _broken_run(run, work, "count", _set(("clusters", 0, "count"), "many")),
        "5000-digit number": _broken_run(run, work, "bigint", _set(("dataset", "num_images"), 10**4000)),
        "nested 100k deep": _broken_run(run, work, "deep", text="[" * 100_000 + "]" * 100_000),
        "two clusters, one shard": _broken_run(run, work, "dupshard",
                                               _set(("clusters", 1, "shard"), "islands/0/shard")),
        "counts do not add up": _broken_run(run, work, "counts", _set(("clusters", 0, "count"), 1)),
        "k disagrees": _broken_run(run, work, "k", _set(("clustering", "k"), 9)),
        "shard '../..'": _broken_run(run, work, "escape", _set(("clusters", 0, "shard"), "../../etc")),
        "config not a mapping": _broken_run(run, work, "config", _set(("config",), "x")),
        "config with a wrong type": _broken_run(run, work, "configtype", _set(("config", "data"), {"k": "x"})),
        "expert sha256 'abc'": _broken_run(run, work, "sha", _set(("experts", "0", "sha256"), "abc")),
        "expert status 3": _broken_run(run, work, "status", _set(("experts", "0", "status"), 3)),
        "router not an object": _broken_run(run, work, "router", _set(("router",), [1])),
    }
    for name, path in broken.items():
        add("info", f"manifest: {name}", "info", path)
    add("info", "no run directory given", "info")
    add("info", "missing run directory", "info", str(work / "nowhere"))
    add("info", "run directory is a file", "info", f["plain.txt"])

    # prepare / run: configs, overrides and data sources.
    fresh = work / "fresh"
    for command in ("prepare", "run"):
        add(command, "missing config", command, "--config", str(work / "none.yaml"), "--run-dir", str(fresh),
            outputs=(fresh,))
        add(command, "config is not YAML", command, "--config", f["bad.yaml"], "--run-dir", str(fresh),
            outputs=(fresh,))
        add(command, "data.seed=-1", command, "--run-dir", str(fresh), "--set", "data.seed=-1", outputs=(fresh,))
        add(command, "truncated .npz source", command, "--run-dir", str(fresh), "--set",
            f"data.source={f['truncated.npz']}", outputs=(fresh,))
    add("prepare", "config is a list", "prepare", "--config", f["list.yaml"], "--run-dir", str(fresh), outputs=(fresh,))
    add("prepare", "config has an unknown key", "prepare", "--config", f["unknown.yaml"], "--run-dir", str(fresh),
        outputs=(fresh,))
    add("prepare", "config value of the wrong type", "prepare", "--config", f["types.yaml"], "--run-dir", str(fresh),
        outputs=(fresh,))
    for name, override in [("data.k=0", "data.k=0"), ("data.k=abc", "data.k=abc"), ("override without =", "data.k"),
                           ("unknown section", "nosuch.key=1"), ("data.holdout_fraction=1.5", "data.holdout_fraction=1.5"),
                           ("expert.train.lr=.nan", "expert.train.lr=.nan"), ("expert.train.lr=.inf", "expert.train.lr=.inf"),
                           ("data.seed=2^32", f"data.seed={2**32}"), ("expert.train.seed=-3", "expert.train.seed=-3"),
                           ("data.limit=-5", "data.limit=-5"), ("data.image_size=0", "data.image_size=0"),
                           ("data.k larger than the data", "data.k=100000"), ("data.embedding=magic", "data.embedding=magic"),
                           ("sample.n above sample.max_n", "sample.n=20000")]:
        add("prepare", name, "prepare", "--run-dir", str(fresh), "--set", override, outputs=(fresh,))
    for name, source in [("missing .npz", str(work / "none.npz")), ("corrupt .npz", f["corrupt.npz"]),
                         ("empty .npz", f["empty.npz"]), ("object .npy", f["objects.npy"]),
                         ("strings .npy", f["strings.npy"]), ("rank-2 .npy", f["rank2.npy"]),
                         ("NaN .npy", f["nan.npy"]), ("garbage .npy", f["garbage.npy"]),
                         ("empty folder", f["empty_dir"]), ("a text file", f["plain.txt"])]:
        add("prepare", f"data.source: {name}", "prepare", "--run-dir", str(fresh), "--set", f"data.source={source}",
            outputs=(fresh,))
    add("prepare", "run directory below a file", "prepare", "--run-dir", below_file)
    add("run", "--parallel 0", "run", "--run-dir", str(fresh), "--parallel", "0", outputs=(fresh,))

    # Training jobs (each fails before it writes anything).
    for name, argv in [("cluster beyond K", ("--cluster", "7")), ("cluster -1", ("--cluster", "-1")),
                       ("cluster 'x'", ("--cluster", "x")), ("steps=0", ("--cluster", "0", "--set", "expert.train.steps=0")),
                       ("batch_size=0", ("--cluster", "0", "--set", "expert.train.batch_size=0")),
                       ("unknown preset", ("--cluster", "0", "--set", "expert.model.preset=huge")),
                       ("seed beyond 32 bits", ("--cluster", "0", "--set", f"expert.train.seed={2**32}"))]:
        add("train-expert", name, "train-expert", "--run-dir", r, "--no-progress", *argv)
    add("train-expert", "manifest clusters 'x'", "train-expert", "--run-dir", broken["clusters 'x'"], "--cluster", "0")
    add("train-expert", "missing run", "train-expert", "--run-dir", str(work / "nowhere"), "--cluster", "0")
    add("train-router", "router.arch=x", "train-router", "--run-dir", r, "--set", "router.arch=x")
    add("train-router", "router.train.steps=-1", "train-router", "--run-dir", r, "--set", "router.train.steps=-1")
    add("train-router", "manifest image_shape 'abc'", "train-router", "--run-dir", broken["image_shape 'abc'"])
    add("train-monolith", "batch_size=-3", "train-monolith", "--run-dir", r, "--set", "expert.train.batch_size=-3")
    add("train-monolith", "missing run", "train-monolith", "--run-dir", str(work / "nowhere"))
    add("train-islands", "--parallel 0", "train-islands", "--run-dir", r, "--parallel", "0")
    add("train-islands", "--nodes 0", "train-islands", "--run-dir", r, "--launcher", "slurm", "--nodes", "0")
    add("train-islands", "--launcher x", "train-islands", "--run-dir", r, "--launcher", "x")
    add("train-islands", "manifest not JSON", "train-islands", "--run-dir", broken["invalid JSON"])

    # Evaluation.
    add("eval-router", "--seed -1", "eval-router", "--run-dir", r, "--seed", "-1")
    add("eval-router", "--seed 2^64", "eval-router", "--run-dir", r, "--seed", HUGE_SEED)
    add("eval-router", "manifest count 'many'", "eval-router", "--run-dir", broken["count 'many'"])
    for name, argv in [("--n 0", ("--n", "0")), ("--n 3 (<= k of k-NN)", ("--n", "3")),
                       ("--n above sample.max_n", ("--n", "1000000")), ("--steps 0", ("--steps", "0")),
                       ("--steps above sample.max_steps", ("--steps", "1000000")),
                       ("--strategies bogus", ("--strategies", "full,bogus")), ("--seed -1", ("--seed", "-1")),
                       ("--features without a colon", ("--features", "nomodule")),
                       ("--features of a missing module", ("--features", "no_such_module_xyz:fn")),
                       ("--feature-steps 0", ("--feature-steps", "0")), ("--solver rk4", ("--solver", "rk4")),
                       ("--cfg-scales nan", ("--cfg-scales", "1,nan")), ("--class-n 0", ("--class-n", "0"))]:
        add("evaluate", name, "evaluate", "--run-dir", r, *argv)

    # Sampling: the request, the outputs, the key.
    png = out / "s.png"
    outputs = (png, png.with_suffix(".npz"))
    for name, argv in [("--seed 2^64", ("--seed", HUGE_SEED)), ("--seed -1", ("--seed", "-1")),
                       ("--labels a,b", ("--labels", "a,b")), ("--labels beyond the run's classes", ("--labels", "0,10")),
                       ("--labels -1", ("--labels", "-1")), ("--labels 2^40", ("--labels", str(2**40))),
                       ("--class 10 (beyond the classes)", ("--class", "10")), ("--class x", ("--class", "x")),
                       ("--class and --labels", ("--class", "1", "--labels", "1")),
                       ("--labels count differs from --n", ("--n", "3", "--labels", "1,2")),
                       ("--cfg-scale without labels", ("--cfg-scale", "2")), ("--cfg-scale -1", ("--cfg-scale", "-1")), ("--n 0", ("--n", "0")),
                       ("--n above sample.max_n", ("--n", "10000000")), ("--steps 10^9", ("--steps", str(10**9))),
                       ("--strategy best3", ("--strategy", "best3")), ("--strategy topk:0", ("--strategy", "topk:0")),
                       ("--strategy threshold:2", ("--strategy", "threshold:2")), ("--cfg-scale nan", ("--cfg-scale", "nan")),
                       ("--cfg-scale inf", ("--cfg-scale", "inf")), ("--solver x", ("--solver", "x")),
                       ("--set sample.max_n=0", ("--set", "sample.max_n=0"))]:
        add("sample", name, "sample", "--run-dir", r, "--out", str(png), *argv, outputs=outputs)
    add("sample", "--out into a folder", "sample", "--run-dir", r, "--n", "2", "--steps", "2", "--out",
        f["empty_dir"], outputs=(Path(f["empty_dir"]).with_suffix(".npz"),))
    add("sample", "--out below a file", "sample", "--run-dir", r, "--n", "2", "--steps", "2", "--out",
        below_file + ".png")
    locked = refusing_folder(work)
    if locked is not None:  # refused before any sampling, by trying (os.access says yes to root)
        add("sample", "--out in a folder refusing writes", "sample", "--run-dir", r, "--n", "2", "--steps", "2",
            "--out", str(locked / "s.png"), outputs=(locked / "s.png", locked / "s.npz"))
        add("sample", "--png-dir in a folder refusing writes", "sample", "--run-dir", r, "--n", "2", "--steps", "2",
            "--out", str(png), "--png-dir", str(locked / "pngs"), outputs=(*outputs, locked / "pngs"))
        add("sample", "--record in a folder refusing writes", "sample", "--run-dir", r, "--n", "2", "--steps", "2",
            "--out", str(png), "--record", str(locked / "r.json"), outputs=(*outputs, locked / "r.json"))
    add("sample", "--out not a .png", "sample", "--run-dir", r, "--n", "2", "--steps", "2", "--out",
        str(out / "s.jpg"), outputs=(out / "s.jpg", out / "s.npz"))
    add("sample", "--record into a folder", "sample", "--run-dir", r, "--n", "2", "--steps", "2", "--out", str(png),
        "--record", f["empty_dir"], outputs=outputs)
    add("sample", "--record below a file", "sample", "--run-dir", r, "--n", "2", "--steps", "2", "--out", str(png),
        "--record", below_file, outputs=outputs)
    add("sample", "--png-dir is a file", "sample", "--run-dir", r, "--n", "2", "--steps", "2", "--out", str(png),
        "--png-dir", f["plain.txt"], outputs=outputs)
    add("sample", "--key without --record", "sample", "--run-dir", r, "--out", str(png), "--key", f["garbage.key"],
        outputs=outputs)
    add("sample", "--key missing", "sample", "--run-dir", r, "--out", str(png), "--record", str(out / "r.json"),
        "--key", str(work / "none.key"), outputs=(*outputs, out / "r.json"))
    add("sample", "--key not a key", "sample", "--run-dir", r, "--out", str(png), "--record", str(out / "r.json"),
        "--key", f["garbage.key"], outputs=(*outputs, out / "r.json"))
    add("sample", "manifest image_shape [8, 'a', 1]", "sample", "--run-dir", broken["image_shape [8, 'a', 1]"],
        "--out", str(png), outputs=outputs)

    # Hashing and verification.
    for name, path in [("missing file", str(work / "none.png")), ("text as PNG", f["text.png"]),
                       ("truncated .npz", f["truncated.npz"]), (".npz without images", f["empty.npz"]),
                       ("a folder", f["empty_dir"])]:
        add("hash", name, "hash", path)
    records = {name.removeprefix("record_").removesuffix(".json"): path for name, path in f.items()
               if name.startswith("record_")}
    for name, path in sorted(records.items()):
        add("verify", f"record: {name}", "verify", path, "--run-dir", r)
    add("verify", "record missing", "verify", str(work / "none.json"), "--run-dir", r)
    add("verify", "record is a folder", "verify", f["empty_dir"], "--run-dir", r)
    add("verify", "--public-key missing", "verify", records["steps_1e9"], "--run-dir", r, "--public-key",
        str(work / "none.pub"))
    add("verify", "--public-key not a key", "verify", records["steps_1e9"], "--run-dir", r, "--public-key",
        f["garbage.key"])
    for name, argv in [("--threshold 65", ("--threshold", "65")), ("--max-abs -1", ("--max-abs", "-1")),
                       ("--max-n 0", ("--max-n", "0")), ("--mode x", ("--mode", "x")), ("--rms nan", ("--rms", "nan"))]:
        add("verify", name, "verify", records["steps_1e9"], "--run-dir", r, *argv)
    add("verify", "manifest share NaN", "verify", records["steps_1e9"], "--run-dir", broken["share NaN"])
    island, bundle, report = str(run / "experts" / "0"), str(run / "islands" / "0"), str(out / "audit.json")
    for name, argv in [("OUT missing", (str(work / "nowhere"), "--bundle", bundle)),
                       ("OUT holds no expert.json", (f["empty_dir"], "--bundle", bundle)),
                       ("bundle missing", (island, "--bundle", str(work / "nowhere"))),
                       ("another island's bundle", (island, "--bundle", str(run / "islands" / "1"))),
                       ("--segments 0", (island, "--bundle", bundle, "--segments", "0")),
                       ("--seed huge", (island, "--bundle", bundle, "--seed", HUGE_SEED)),
                       ("--chain not a head", (island, "--bundle", bundle, "--chain", "xyz")),
                       ("--report below a file", (island, "--bundle", bundle, "--report", below_file)),
                       ("--report not .json", (island, "--bundle", bundle, "--report", str(out / "audit.txt")))]:
        named = "--report" in argv  # else a report that must not be written
        add("audit", name, "audit", *argv, *(() if named else ("--report", report)),
            outputs=(argv[-1] if named else report,))

    # `ddm serve`: refused before it listens (a case that reached uvicorn would hang the harness, not pass).
    add("serve", "missing run", "serve", "--run-dir", str(work / "nowhere"))
    add("serve", "--key missing", "serve", "--run-dir", r, "--key", str(work / "none.key"))
    add("serve", "--key not a key", "serve", "--run-dir", r, "--key", f["garbage.key"])
    for name, argv in [("--port 70000", ("--port", "70000")), ("--max-batch 0", ("--max-batch", "0")),
                       ("--max-queue 0", ("--max-queue", "0")), ("--max-wait-ms -1", ("--max-wait-ms", "-1"))]:
        add("serve", name, "serve", "--run-dir", r, *argv)
    add("serve", "manifest expert sha256 'abc'", "serve", "--run-dir", broken["expert sha256 'abc'"])

    # Keys, exports, configs, consensus.
    add("keygen", "--out into a folder", "keygen", "--out", f["empty_dir"])
    add("keygen", "--out below a file", "keygen", "--out", below_file, outputs=(below_file + ".pub",))
    if locked is not None:
        add("keygen", "--out in a folder refusing writes", "keygen", "--out", str(locked / "k"),
            outputs=(locked / "k", locked / "k.pub"))
        add("export", "--out in a folder refusing writes", "export", "--run-dir", r, "--out", str(locked / "export"),
            outputs=(locked / "export",))
        add("prepare", "run directory in a folder refusing writes", "prepare", "--run-dir", str(locked / "run"),
            outputs=(locked / "run",))
    add("export", "--out not empty", "export", "--run-dir", r, "--out", f["nonempty"])
    add("export", "--out below a file", "export", "--run-dir", r, "--out", below_file)
    add("export", "manifest expert sha256 'abc'", "export", "--run-dir", broken["expert sha256 'abc'"], "--out",
        str(out / "export"), outputs=(out / "export",))
    add("export", "missing run", "export", "--run-dir", str(work / "nowhere"), "--out", str(out / "export2"),
        outputs=(out / "export2",))
    add("distill", "missing run", "distill", "--run-dir", str(work / "nowhere"))
    add("distill", "--teacher bogus", "distill", "--run-dir", r, "--teacher", "bogus", outputs=(run / "student",))
    add("distill", "manifest expert sha256 'abc'", "distill", "--run-dir", broken["expert sha256 'abc'"],
        outputs=(Path(broken["expert sha256 'abc'"]) / "student",))
    add("distill", "distill.train.steps=0", "distill", "--run-dir", r, "--set", "distill.train.steps=0",
        outputs=(run / "student",))
    add("assemble", "missing run", "assemble", "--run-dir", str(work / "nowhere"), f["empty_dir"])
    add("assemble", "OUT missing", "assemble", "--run-dir", r, str(work / "nowhere"))
    add("assemble", "OUT is a file", "assemble", "--run-dir", r, f["plain.txt"])
    add("assemble", "OUT holds no expert.json", "assemble", "--run-dir", r, f["empty_dir"])
    add("assemble", "no OUT", "assemble", "--run-dir", r)
    joined = (run / "islands" / "3",)  # where a joined island would land (the trained run has clusters 0-2)
    add("add-island", "missing run", "add-island", "--run-dir", str(work / "nowhere"), "--set",
        f"data.source={f['rank2.npy']}")
    add("add-island", "source missing", "add-island", "--run-dir", r, "--set", f"data.source={work / 'none.npz'}",
        outputs=joined)
    add("add-island", "source of rank 2", "add-island", "--run-dir", r, "--set", f"data.source={f['rank2.npy']}",
        outputs=joined)
    add("add-island", "source of NaNs", "add-island", "--run-dir", r, "--set", f"data.source={f['nan.npy']}",
        outputs=joined)
    add("add-island", "a non-data --set", "add-island", "--run-dir", r, "--set", "expert.train.steps=3",
        outputs=joined)
    add("add-island", "key not a key", "add-island", "--run-dir", r, "--island-key", f["garbage.key"],
        outputs=joined)
    add("remove-island", "missing run", "remove-island", "--run-dir", str(work / "nowhere"), "--cluster", "0")
    add("remove-island", "--cluster 99", "remove-island", "--run-dir", r, "--cluster", "99")
    add("remove-island", "--cluster -1", "remove-island", "--run-dir", r, "--cluster", "-1")
    add("remove-island", "--cluster x", "remove-island", "--run-dir", r, "--cluster", "x")
    add("config", "--config and --run-dir", "config", "show", "--config", f["bad.yaml"], "--run-dir", r)
    add("config", "missing config", "config", "show", "--config", str(work / "none.yaml"))
    add("config", "bad override", "config", "show", "--run-dir", r, "--set", "sample.n=-4")
    add("config", "no action", "config")
    consensus = out / "consensus"
    for name, argv in [("--verifiers 0", ("--verifiers", "0")), ("--perturb-scale a,b", ("--perturb-scale", "a,b")),
                       ("--copiers bogus", ("--copiers", "bogus")), ("--verifier garbage", ("--verifier", "cpus=x")),
                       ("--seed -1", ("--seed", "-1")), ("--images 0", ("--images", "0")),
                       ("--margin nan", ("--margin", "nan")), ("--out below a file", ("--out", below_file))]:
        add("consensus-eval", name, "consensus-eval", "--run-dir", r, "--out", str(consensus), *argv,
            outputs=(consensus,))
    add("ddm", "no command")
    add("ddm", "unknown command", "bogus")
    add("ddm", "unknown option", "sample", "--run-dir", r, "--bogus")
    return cases


def clean_work(work: str | Path) -> None:
    shutil.rmtree(work, ignore_errors=True)
