"""Churn at 64 islands: islands that fail, arrive late and leave, and the ensemble assembled along the way.

    python -m benchmarks.churn [--quick] [--k 64] [--k-ref 8] [--steps 500] [--batch 8] [--n 500]
        [--sample-steps 20] [--parallel 2] [--seed 0] [--out runs/churn] [--plot docs/img/churn.png]

mnist10k (configs/mnist10k.yaml with the CPU settings of `benchmarks.experiment`: micro DiT, the smallest
preset, 4x4 patches, lr 2e-3) is prepared with data.k = K (64: about 140 training images per cluster) and
every island runs as its own OS process, as `ddm` commands (this script only schedules, kills and measures):

1. wave 1, the early islands (1 - late share of them, in a seeded order): `ddm train-expert --island
   RUN/islands/k --out RUN/experts/k`, `--parallel` at a time, in `--moments` chunks; after each chunk the
   coordinator runs `ddm assemble` on the experts that finished and the ensemble is evaluated.
2. failures: a seeded `--fail` share of all islands is SIGKILLed right after its mid-training checkpoint
   (the islands checkpoint at S/2), some in wave 1 and some in wave 2.
3. wave 2, the late arrivals (islands that only start after the first assemble) and the retries of wave 1's
   killed islands: `ddm train-islands --parallel P`, the local launcher, which resumes the killed ones from
   their checkpoint and assembles each island as it finishes; the islands killed in this wave make it exit 4.
4. wave 3: `ddm train-islands` again, as an operator would after exit 4: it retries only the failed islands.
5. two removals: `ddm remove-island --cluster k` for two seeded clusters.

At every moment the ensemble of whatever is assembled is evaluated with `prior` routing (no router: each
sample's expert drawn from the present clusters' data counts): n samples, the same seed and Heun steps every
time, FD / precision / recall in the feature net of the run (`ddm.eval.featurenet`, fetched once, before any
removal, and used for every row: a removal changes the run's training set and so the key of the net
`ddm evaluate` would train) against the run's held-out images.

The reference: K_ref experts at the same total training FLOPs, matched by splitting the batch (the paper's
matching and `benchmarks.experiment`'s default): every expert at either K takes S steps, a K_ref expert at batch
b * K / K_ref, so each passes over its cluster the same number of epochs. Trained by `ddm train-islands` with
no failures, evaluated the same way, drawn as a line. Outputs: OUT/results.{json,md} and the plot (FD against
the fraction of islands present). The script also prints the upload/storage/network arithmetic for 1,000
DiT-XL/2 islands (docs/scale-out.md). Run directories are reused only by a rerun with the same settings: pass a
fresh --out (or delete it) to measure again.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import machine_table, markdown_table
from benchmarks.experiment import CONFIGS, DATASET_OVERRIDES, job_overrides

REPO = Path(__file__).resolve().parents[1]
DDM = [sys.executable, "-m", "ddm"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------------------
# Plans and commands.
# ---------------------------------------------------------------------------------------------------------


def run_overrides(k: int, steps: int, batch: int, ema: float, seed: int) -> list[str]:
    """mnist10k at K = k with experts of S = `steps` steps at `batch`, a checkpoint at S/2 (what a killed island
    resumes from) and at S."""
    half = max(steps // 2, 1)
    return [*DATASET_OVERRIDES["mnist10k"], "data.seed=0", f"data.k={k}",
            *job_overrides("expert", steps, batch, ema, seed), f"expert.train.checkpoint_every={half}",
            f"sample.seed={seed}"]


def ddm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """One `ddm` command in its own process; its output is echoed. check: a non-zero exit stops the benchmark."""
    t0 = time.perf_counter()
    proc = subprocess.run([*DDM, *args], capture_output=True, text=True, cwd=REPO, check=False)
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
    log(f"ddm {' '.join(args[:3])} ... -> exit {proc.returncode} in {time.perf_counter() - t0:.1f}s"
        + "".join(f"\n    {line}" for line in tail))
    if check and proc.returncode != 0:
        raise SystemExit(f"ddm {' '.join(args)} failed with exit {proc.returncode}")
    return proc


def prepare(run_dir: Path, overrides: list[str]) -> None:
    if (run_dir / "manifest.json").exists():
        log(f"{run_dir}: prepared already (reused)")
        return
    ddm("prepare", "--config", str(CONFIGS["mnist10k"]), "--run-dir", str(run_dir),
        *[a for o in overrides for a in ("--set", o)])


def half_checkpoint_done(run_dir: Path, k: int, steps: int) -> bool:
    """Island k's mid-training checkpoint is complete (its digest file is written after every other file)."""
    return (run_dir / "experts" / str(k) / "checkpoints" / str(max(steps // 2, 1)) / "ddm_digest.json").exists()


def children(pid: int) -> list[int]:
    """The process ids of pid's children (Linux /proc; empty where it cannot be read)."""
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (OSError, ValueError):
        return []


def island_of(pid: int) -> int | None:
    """The cluster of a `ddm train-expert --island RUN/islands/k` process, from its command line."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    for flag, value in itertools.pairwise(argv):
        if flag == b"--island":
            return int(Path(value.decode()).name)
    return None


# ---------------------------------------------------------------------------------------------------------
# Waves.
# ---------------------------------------------------------------------------------------------------------


def wave_islands(run_dir: Path, clusters: list[int], kill: set[int], steps: int, parallel: int,
                 events: list[dict]) -> list[int]:
    """Islands as independent `ddm train-expert --island` processes, `parallel` at a time; those in `kill` get
    SIGKILL once their mid-training checkpoint is complete. Returns the clusters that finished."""
    queue, running, done = list(clusters), {}, []
    while queue or running:
        while queue and len(running) < parallel:
            k = queue.pop(0)
            out = run_dir / "experts" / str(k)
            out.mkdir(parents=True, exist_ok=True)
            handle = open(out / "train.log", "a")  # noqa: SIM115 - open while the island runs, closed when it ends
            proc = subprocess.Popen([*DDM, "train-expert", "--island", str(run_dir / "islands" / str(k)), "--out",
                                     str(out), "--no-progress"], stdout=handle, stderr=subprocess.STDOUT, cwd=REPO)
            running[k] = (proc, handle, time.perf_counter())
        time.sleep(0.1)
        for k, (proc, handle, t0) in list(running.items()):
            if k in kill and proc.poll() is None and half_checkpoint_done(run_dir, k, steps):
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                events.append({"event": "killed", "cluster": k, "wave": 1, "after_s": round(time.perf_counter() - t0, 1)})
                log(f"  island {k}: SIGKILL after its step-{steps // 2} checkpoint")
            if proc.poll() is None:
                continue
            handle.close()
            del running[k]
            if proc.returncode == 0:
                done.append(k)
            elif proc.returncode != -signal.SIGKILL:
                events.append({"event": "failed", "cluster": k, "wave": 1, "returncode": proc.returncode})
                log(f"  island {k}: exit {proc.returncode} (see {run_dir}/experts/{k}/train.log)")
    return done


def wave_launcher(run_dir: Path, kill: set[int], steps: int, parallel: int, wave: int,
                  events: list[dict]) -> int:
    """`ddm train-islands --parallel P` (the local launcher: one process per unfinished island, each assembled
    as it finishes); the launcher's islands in `kill` get SIGKILL once their mid-training checkpoint is complete
    (only islands that have not been killed before: a retried one resumes from that checkpoint). Returns the
    launcher's exit code."""
    log_path = run_dir / f"train-islands-wave{wave}.log"
    with open(log_path, "w") as handle:
        launcher = subprocess.Popen([*DDM, "train-islands", "--run-dir", str(run_dir), "--parallel", str(parallel)],
                                    stdout=handle, stderr=subprocess.STDOUT, cwd=REPO)
        killed: set[int] = set()
        while launcher.poll() is None:
            time.sleep(0.1)
            for pid in children(launcher.pid):
                k = island_of(pid)
                if k in kill and k not in killed and half_checkpoint_done(run_dir, k, steps):
                    try:
                        os.kill(pid, signal.SIGKILL)  # the launcher's child: this script started the launcher
                    except ProcessLookupError:  # it ended meanwhile
                        continue
                    killed.add(k)
                    events.append({"event": "killed", "cluster": k, "wave": wave})
                    log(f"  island {k} (pid {pid}, under train-islands): SIGKILL after its step-{steps // 2} checkpoint")
    tail = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()][-2:]
    log(f"ddm train-islands (wave {wave}) -> exit {launcher.returncode}" + "".join(f"\n    {t}" for t in tail))
    if launcher.returncode not in (0, 4):
        raise SystemExit(f"ddm train-islands failed with exit {launcher.returncode}; see {log_path}")
    return launcher.returncode


# ---------------------------------------------------------------------------------------------------------
# Evaluation.
# ---------------------------------------------------------------------------------------------------------


class Evaluator:
    """FD / precision / recall of `prior` samples against the held-out images, in one fixed feature net."""

    def __init__(self, run_dir: Path, n: int, sample_steps: int, seed: int):
        from ddm.data.run import Run
        from ddm.data.shards import read_shard
        from ddm.eval.featurenet import get_featurenet, run_training_images
        from ddm.eval.metrics import quality

        run = Run.open(run_dir)
        self.net = get_featurenet(run)
        self.holdout = read_shard(run.holdout_path())
        self.real = self.net.features(self.holdout)
        self.n, self.sample_steps, self.seed = n, sample_steps, seed
        train = run_training_images(run)
        pick = np.random.default_rng(seed).permutation(len(train))[:n]
        self.floor = quality(self.real, self.net.features(train[pick]))  # n real training images: the metric's floor

    def __call__(self, run_dir: Path, planned: int) -> dict:
        from ddm.data.run import Run
        from ddm.eval.metrics import quality
        from ddm.sampling.load import load_ensemble

        run = Run.open(run_dir)
        present = run.finished_experts()
        counts = np.array([c["count"] for c in run.clusters], np.float64)
        t0 = time.perf_counter()
        ensemble = load_ensemble(run, with_router=False)
        t_load = time.perf_counter() - t0
        result = ensemble.sample(self.n, "prior", steps=self.sample_steps, solver="heun", seed=self.seed)
        t_sample = time.perf_counter() - t0 - t_load
        row = quality(self.real, self.net.features(result.images))
        manifest = run.root / "manifest.json"
        return {"present": len(present), "planned": planned, "fraction": len(present) / planned,
                "manifest_kb": round(manifest.stat().st_size / 1000, 1),
                "history": len(run.manifest.get("membership", {}).get("history", [])),
                "data_share": float(counts[present].sum() / counts[:planned].sum()),
                "experts_drawn": len(np.unique(np.asarray(result.experts))),
                "membership": run.membership_id[:16], "load_s": round(t_load, 1), "sample_s": round(t_sample, 1),
                **{key: float(value) for key, value in row.items()}}


# ---------------------------------------------------------------------------------------------------------
# The 1,000-island arithmetic.
# ---------------------------------------------------------------------------------------------------------


def xl_arithmetic(islands: int = 1000, steps: int = 800_000, sync_every: int = 500) -> dict:
    """Bytes that 1,000 DiT-XL/2 islands move, against a data-parallel and a DiLoCo-style run of the same
    training (every island S steps; the synchronous runs take the same S steps over all islands' batches).

    DDM: one upload of each expert's weights in bf16. Data parallel: a ring all-reduce of the bf16 gradients
    every step, 2 (N-1)/N x P x 2 bytes sent per worker. DiLoCo: the same all-reduce of the bf16 outer gradient
    every `sync_every` steps. The data each site trains on is not counted (it is the same for all three).
    """
    from ddm.core.config import ModelConfig
    from ddm.core.dit import count_dit_params

    params = count_dit_params(ModelConfig(preset="XL", patch_size=2, num_classes=1000), (32, 32, 4))
    weights = params * 2  # bf16
    ring = 2 * (islands - 1) / islands * weights  # bytes each worker sends per all-reduce
    return {"params": params, "islands": islands, "steps": steps, "sync_every": sync_every,
            "upload_per_island": weights, "storage": islands * weights,
            "dp_per_worker": steps * ring, "dp_total": islands * steps * ring,
            "diloco_per_worker": steps // sync_every * ring, "diloco_total": islands * (steps // sync_every) * ring}


def human_bytes(x: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB", "EB"):
        if x < 1000:
            return f"{x:.3g} {unit}"
        x /= 1000
    return f"{x:.3g} ZB"


# ---------------------------------------------------------------------------------------------------------
# Output.
# ---------------------------------------------------------------------------------------------------------


def table(rows: list[dict], reference: dict, floor: dict, k_ref: int) -> str:
    body = [[r["moment"], f"{r['present']}/{r['planned']}", f"{r['fraction']:.2f}", f"{r['data_share']:.2f}",
             f"{r['fd']:.1f}", f"{r['precision']:.3f}", f"{r['recall']:.3f}", r["experts_drawn"], r["membership"],
             f"{r['load_s']:.0f} + {r['sample_s']:.0f}", f"{r['manifest_kb']:.0f} / {r['history']}",
             f"{r['elapsed_s'] / 60:.1f}"] for r in rows]
    body.append([f"K={k_ref} reference (same FLOPs)", f"{reference['present']}/{reference['planned']}",
                 f"{reference['fraction']:.2f}", f"{reference['data_share']:.2f}", f"{reference['fd']:.1f}",
                 f"{reference['precision']:.3f}", f"{reference['recall']:.3f}", reference["experts_drawn"],
                 reference["membership"], f"{reference['load_s']:.0f} + {reference['sample_s']:.0f}",
                 f"{reference['manifest_kb']:.0f} / {reference['history']}", f"{reference['elapsed_s'] / 60:.1f}"])
    body.append(["real (train), the floor", "-", "-", "-", f"{floor['fd']:.1f}", f"{floor['precision']:.3f}",
                 f"{floor['recall']:.3f}", "-", "-", "-", "-", "-"])
    return markdown_table(["moment", "islands present", "fraction", "data share", "FD ↓", "precision ↑", "recall ↑",
                           "experts drawn", "membership", "eval s (load + sample)", "manifest KB / history entries",
                           "minutes in"], body)


def plot(rows: list[dict], reference: dict, floor: dict, k: int, k_ref: int, path: Path, title: str) -> None:
    from ddm.train.plots import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot([r["fraction"] for r in rows], [r["fd"] for r in rows], "o-", color="tab:blue",
            label=f"K={k}, prior routing, in order of the moments")
    for r in rows:
        ax.annotate(r["moment"], (r["fraction"], r["fd"]), fontsize=6, xytext=(4, 4), textcoords="offset points")
    ax.axhline(reference["fd"], color="black", lw=1.8, label=f"K={k_ref}, all present, same training FLOPs")
    ax.axhline(floor["fd"], color="gray", ls=":", label="real training images (the metric's floor)")
    ax.set_xlabel(f"fraction of the {k} planned islands present")
    ax.set_ylabel(f"FD in {reference['metric']} features (lower is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=8)
    save_figure(fig, path, dpi=110, bbox_inches="tight")


# ---------------------------------------------------------------------------------------------------------
# Main.
# ---------------------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="a few minutes: K=16 vs K_ref=2, 100 steps, 200 samples (checks the machinery only)")
    parser.add_argument("--k", type=int, default=None, help="planned islands (default 64; --quick 16)")
    parser.add_argument("--k-ref", type=int, default=None, help="the reference's experts (default 8; --quick 2)")
    parser.add_argument("--steps", type=int, default=None, help="S, steps of every expert (default 500; --quick 100)")
    parser.add_argument("--batch", type=int, default=8, help="batch of a K-run expert (the reference's: x K / K_ref)")
    parser.add_argument("--ema", type=float, default=0.99)
    parser.add_argument("--fail", type=float, default=0.1, help="share of islands killed mid-training (retried)")
    parser.add_argument("--late", type=float, default=0.25, help="share of islands that start after the first assemble")
    parser.add_argument("--removals", type=int, default=2)
    parser.add_argument("--moments", type=int, default=3, help="assembles during the early islands' wave")
    parser.add_argument("--n", type=int, default=None, help="samples per evaluation (default 500; --quick 200)")
    parser.add_argument("--sample-steps", type=int, default=20, help="Heun steps")
    parser.add_argument("--parallel", type=int, default=2, help="islands training at once")
    parser.add_argument("--seed", type=int, default=0, help="failures, late arrivals, removals, training, sampling")
    parser.add_argument("--out", default=str(REPO / "runs" / "churn"))
    parser.add_argument("--plot", default=None, help="write the figure here (default OUT/churn.png)")
    args = parser.parse_args()
    k = args.k or (16 if args.quick else 64)
    k_ref = args.k_ref or (2 if args.quick else 8)
    steps = args.steps or (100 if args.quick else 500)
    n = args.n or (200 if args.quick else 500)
    if (args.batch * k) % k_ref:
        raise SystemExit(f"--batch x K must be divisible by K_ref: {args.batch} x {k} % {k_ref} != 0")
    ref_batch = args.batch * k // k_ref
    out = Path(args.out).absolute()
    run_k, run_ref = out / f"k{k}-s{steps}-b{args.batch}", out / f"k{k_ref}-s{steps}-b{ref_batch}"
    command = "python -m benchmarks.churn " + " ".join(sys.argv[1:])
    t_start = time.perf_counter()

    from ddm.core.cache import enable_compilation_cache
    from ddm.core.config import load_config
    from ddm.core.dit import dit_flops_per_image

    enable_compilation_cache()
    # The schedule: every choice from one seeded generator.
    rng = np.random.default_rng(args.seed)
    order = [int(c) for c in rng.permutation(k)]
    n_late = round(args.late * k)
    early, late = order[:k - n_late], order[k - n_late:]
    killed = [int(c) for c in rng.choice(k, size=round(args.fail * k), replace=False)]
    removed = [int(c) for c in rng.choice(k, size=args.removals, replace=False)]
    chunks = [[int(c) for c in chunk] for chunk in np.array_split(early, args.moments)]
    log(f"K={k}: {len(early)} early islands in {args.moments} chunks, late {sorted(late)}, killed {sorted(killed)}, "
        f"removed at the end {removed}")

    overrides = run_overrides(k, steps, args.batch, args.ema, args.seed)
    t0 = time.perf_counter()
    prepare(run_k, overrides)
    phases = [{"phase": f"prepare K={k}", "seconds": round(time.perf_counter() - t0, 1)}]
    cfg = load_config(CONFIGS["mnist10k"], overrides)
    image_shape = tuple(json.loads((run_k / "manifest.json").read_text())["dataset"]["image_shape"])
    f_dit = dit_flops_per_image(cfg.expert.model, image_shape)
    evaluator = Evaluator(run_k, n, args.sample_steps, args.seed)
    metric = evaluator.net.name
    rows, events = [], []

    def moment(name: str, run_dir: Path = run_k, planned: int = k) -> dict:
        row = {"moment": name, **evaluator(run_dir, planned), "elapsed_s": time.perf_counter() - t_start}
        log(f"{name}: {row['present']}/{planned} present, FD {row['fd']:.1f}, P {row['precision']:.3f}, "
            f"R {row['recall']:.3f} (load {row['load_s']:.0f}s, sample {row['sample_s']:.0f}s)")
        return row

    # Wave 1: the early islands, chunk by chunk, assembled by the coordinator after each chunk.
    for i, chunk in enumerate(chunks):
        t0 = time.perf_counter()
        done = wave_islands(run_k, chunk, set(killed), steps, args.parallel, events)
        log(f"wave 1, chunk {i + 1}/{len(chunks)}: {len(done)} of {len(chunk)} islands finished in "
            f"{time.perf_counter() - t0:.0f}s")
        phases.append({"phase": f"wave 1 chunk {i + 1}: {len(chunk)} islands", "seconds": round(time.perf_counter() - t0, 1)})
        if done:
            t0 = time.perf_counter()
            ddm("assemble", "--run-dir", str(run_k), *[str(run_k / "experts" / str(c)) for c in done])
            phases.append({"phase": f"assemble {len(done)}", "seconds": round(time.perf_counter() - t0, 1)})
        rows.append(moment(f"early {i + 1}/{len(chunks)}"))
    # Wave 2: late arrivals and retries through the local launcher, with its own failures; wave 3 retries those.
    t0 = time.perf_counter()
    code = wave_launcher(run_k, set(killed) & set(late), steps, args.parallel, 2, events)
    phases.append({"phase": "wave 2: train-islands", "seconds": round(time.perf_counter() - t0, 1)})
    rows.append(moment("late + retries"))
    wave = 3
    while code == 4 and wave < 6:
        t0 = time.perf_counter()
        code = wave_launcher(run_k, set(), steps, args.parallel, wave, events)
        phases.append({"phase": f"wave {wave}: train-islands", "seconds": round(time.perf_counter() - t0, 1)})
        rows.append(moment(f"retry (wave {wave})"))
        wave += 1
    for c in removed:
        t0 = time.perf_counter()
        ddm("remove-island", "--run-dir", str(run_k), "--cluster", str(c))
        phases.append({"phase": f"remove-island {c}", "seconds": round(time.perf_counter() - t0, 1)})
    rows.append(moment(f"{len(removed)} removed"))

    # The reference: K_ref experts at the same FLOPs, no churn.
    ref_overrides = run_overrides(k_ref, steps, ref_batch, args.ema, args.seed)
    t0 = time.perf_counter()
    prepare(run_ref, ref_overrides)
    phases.append({"phase": f"prepare K={k_ref}", "seconds": round(time.perf_counter() - t0, 1)})
    holdouts = [json.loads((r / "manifest.json").read_text())["holdout"].get("sha256") for r in (run_k, run_ref)]
    if holdouts[0] != holdouts[1]:  # the split depends on data.seed and the fraction only: it must be the same
        raise SystemExit(f"the K={k} and K={k_ref} runs hold out different images ({holdouts}): not comparable")
    t0 = time.perf_counter()
    wave_launcher(run_ref, set(), steps, args.parallel, 1, events)
    log(f"K={k_ref} reference trained in {time.perf_counter() - t0:.0f}s")
    phases.append({"phase": f"K={k_ref}: train-islands", "seconds": round(time.perf_counter() - t0, 1)})
    reference = {"moment": f"K={k_ref}", **evaluator(run_ref, k_ref), "elapsed_s": time.perf_counter() - t_start,
                 "metric": metric}

    flops = {"k": k * steps * args.batch * 3 * f_dit, "k_ref": k_ref * steps * ref_batch * 3 * f_dit}
    xl = xl_arithmetic()
    wall = time.perf_counter() - t_start
    header = (f"mnist10k, K={k} islands (micro DiT, 4x4 patches, {steps} steps x batch {args.batch} each, lr "
              f"{cfg.expert.train.lr:g}, EMA {args.ema}) vs K={k_ref} ({steps} steps x batch {ref_batch}); training "
              f"FLOPs {flops['k']:.3g} vs {flops['k_ref']:.3g} (planned; a retried island also repeats its start-up). "
              f"Killed mid-training: {sorted(killed)}; late: {sorted(late)}; removed: {removed}. prior routing, "
              f"{n} samples x {args.sample_steps} Heun steps, seed {args.seed}, against {len(evaluator.holdout)} "
              f"held-out images; FD in {metric} features (sha256 {evaluator.net.sha256[:16]}). Wall time {wall / 60:.1f} "
              f"min, {args.parallel} islands at a time.")
    text = table(rows, reference, evaluator.floor, k_ref) + "\n\nPhases (wall seconds): " + "; ".join(
        f"{p['phase']} {p['seconds']:.0f}" for p in phases)
    xl_text = (f"DiT-XL/2: {xl['params']:,} parameters; one bf16 upload {human_bytes(xl['upload_per_island'])}; "
               f"{xl['islands']:,} islands store {human_bytes(xl['storage'])}; data parallel ({xl['steps']:,} steps, "
               f"ring all-reduce of bf16 gradients): {human_bytes(xl['dp_per_worker'])} sent per worker, "
               f"{human_bytes(xl['dp_total'])} in all; DiLoCo (sync every {xl['sync_every']} steps): "
               f"{human_bytes(xl['diloco_per_worker'])} per worker, {human_bytes(xl['diloco_total'])} in all")
    machine = machine_table(extra={"command": f"`{command}`", "wall time": f"{wall / 60:.1f} min"})
    print(header + "\n\n" + text + "\n\n" + xl_text + "\n\n" + machine, flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(header + "\n\n" + text + "\n\n" + xl_text + "\n\n" + machine + "\n")
    (out / "results.json").write_text(json.dumps({
        "command": command, "header": header, "rows": rows, "reference": reference, "floor": evaluator.floor,
        "events": events, "phases": phases, "schedule": {"early": early, "late": late, "killed": killed, "removed": removed},
        "flops": flops, "xl": xl, "featurenet_sha256": evaluator.net.sha256, "wall_s": wall}, indent=2) + "\n")
    path = Path(args.plot) if args.plot else out / "churn.png"
    plot(rows, reference, evaluator.floor, k, k_ref, path,
         f"mnist10k: K={k} islands under churn (prior routing) vs K={k_ref} at equal FLOPs; {steps} steps, "
         f"seed {args.seed}")
    print(f"figure -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
