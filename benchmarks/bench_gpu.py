"""Training throughput of the paper's experts on one accelerator: DiT-B/2 and DiT-XL/2 on 32x32x4 latents,
bfloat16 compute (float32 parameters, AdamW state and loss), with and without per-block remat, conditioned on
class labels (ImageNet's 1000) or on 77x768 token embeddings (CLIP text tokens: cross-attention in every block).

    python -m benchmarks.bench_gpu                        # on a GPU: the table below, ~6-12 minutes
    python -m benchmarks.bench_gpu --cpu-tiny             # anywhere: tiny shapes, checks the script runs
    python -m benchmarks.bench_gpu --batch 128 --steps 30 --peak-tflops 989
    python -m benchmarks.bench_gpu --conditions 77x768    # the token-conditioned cases only

Each (model, remat, condition) case runs in a fresh subprocess (clean peak-memory counter; an out-of-memory
case is reported, not fatal): the full training step of `ddm.train.trainer.train_step` (flow-matching loss with
condition dropout, clipping, AdamW, EMA), jitted with donated state, `--warmup` steps to compile, then `--steps`
timed steps. Token conditions are fed as a reader gives them, float16 [B, 77, 768]. Columns: images/s; MFU =
model FLOPs / (time x peak), model FLOPs = 3 x the forward FLOPs of `ddm.core.dit.dit_flops_per_image`
(cross-attention included; remat's recomputation is not counted, as is usual); peak device memory
(`memory_stats()["peak_bytes_in_use"]`, or XLA's compiled temp + argument size where the backend keeps no
statistics, e.g. CPU). Peak bf16 dense FLOP/s is looked up from the device kind (H100/H200 SXM 989 TFLOP/s,
A100 312) or given with --peak-tflops. Prints a markdown table and the machine.
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Dense bf16 peak FLOP/s by device kind (substring match, first wins).
PEAK_BF16 = (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12), ("A10", 125e12),
             ("TPU v5p", 459e12), ("TPU v5", 197e12), ("TPU v4", 275e12))
LATENT = (32, 32, 4)
TINY = (8, 8, 4)
CLASSES = "classes"  # the condition of the class-label cases; any other is a token shape "LxD"


def condition_shape(condition: str) -> tuple[int, ...]:
    """"classes" -> () (1000 class labels); "LxD" -> (L, D) token embeddings; ValueError otherwise."""
    if condition == CLASSES:
        return ()
    parts = condition.split("x")
    if len(parts) != 2 or not all(part.isdigit() and int(part) > 0 for part in parts):
        raise ValueError(f"condition {condition!r} is neither {CLASSES} nor a token shape LxD such as 77x768")
    return int(parts[0]), int(parts[1])


def peak_flops(kind: str, override: float | None) -> float | None:
    if override:
        return override * 1e12
    return next((peak for name, peak in PEAK_BF16 if name.lower() in kind.lower()), None)


def run_case(preset: str, remat: str, batch: int, steps: int, warmup: int, tiny: bool,
             condition: str = CLASSES) -> dict:
    """One (model, remat, condition) case in this process; returns its measurements."""
    import jax
    import numpy as np
    from flax import nnx

    from ddm.core.codec import Codec
    from ddm.core.config import ModelConfig, TrainConfig
    from ddm.core.dit import dit_flops_per_image, dit_from_config
    from ddm.experts.train import flow_loss
    from ddm.train.trainer import init_state, make_optimizer, train_step

    shape = TINY if tiny else LATENT
    tokens = condition_shape(condition)
    num_classes = 0 if tokens else 1000
    model_cfg = ModelConfig(preset="micro" if tiny else preset, patch_size=2, num_classes=num_classes,
                            condition_shape=tokens, dtype="bfloat16", remat=remat)
    make_model = functools.partial(dit_from_config, model_cfg, shape)
    tx = make_optimizer(TrainConfig(lr=1e-4, warmup_steps=0, schedule="constant"))
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: make_model(nnx.Rngs(params=0))))
    loss = functools.partial(flow_loss, "logit_normal", 0.1, num_classes, condition_shape=tokens)
    codec = Codec("latents", (0.0,) * shape[-1], (1.0,) * shape[-1])
    step = jax.jit(functools.partial(train_step, graphdef, loss, tx, 0.9999, codec=codec), donate_argnums=0)
    state = jax.jit(functools.partial(init_state, make_model, tx, 0))()
    rng = np.random.default_rng(0)
    # Latents as the reader gives them (float16), and classes or token embeddings (float16, as stored).
    x = jax.device_put(rng.standard_normal((batch, *shape)).astype(np.float16))
    clusters = jax.device_put(np.zeros(batch, np.int32))
    classes = jax.device_put(rng.standard_normal((batch, *tokens)).astype(np.float16) if tokens
                             else rng.integers(0, 1000, batch).astype(np.int32))
    lowered = step.lower(state, x, clusters, classes)
    compiled = lowered.compile()
    analysis = compiled.memory_analysis()
    for _ in range(warmup):
        state, metrics = step(state, x, clusters, classes)
    jax.block_until_ready(metrics["loss"])
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, x, clusters, classes)
    jax.block_until_ready(metrics["loss"])
    seconds = time.perf_counter() - t0
    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    source = "peak_bytes_in_use"
    if peak is None and analysis is not None:
        peak = analysis.temp_size_in_bytes + analysis.argument_size_in_bytes
        source = "compiled temp + args"
    return {"model": f"DiT-{preset}/2" + (" (tiny: micro, 8x8x4)" if tiny else ""), "remat": remat,
            "condition": condition,
            "batch": batch, "images_per_s": batch * steps / seconds, "step_ms": 1e3 * seconds / steps,
            "train_flops_per_image": 3 * dit_flops_per_image(model_cfg, shape), "peak_bytes": peak,
            "memory_source": source, "device": device.device_kind, "platform": device.platform,
            "loss": float(metrics["loss"])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="B,XL", help="DiT presets, comma-separated")
    parser.add_argument("--remat", default="none,block")
    parser.add_argument("--conditions", default=f"{CLASSES},77x768",
                        help=f"comma-separated: {CLASSES} (1000 labels) and/or token shapes LxD")
    parser.add_argument("--batch", type=int, default=None, help="per-device batch (default 256 for B, 128 XL)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--cpu-tiny", action="store_true", help="tiny shapes (micro DiT on 8x8x4), any backend")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per case")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case, print its JSON
    args = parser.parse_args(argv)

    if args.case:
        preset, remat, batch, condition = args.case.split(":")
        print(json.dumps(run_case(preset, remat, int(batch), args.steps, args.warmup, args.cpu_tiny, condition)))
        return 0
    try:
        for condition in args.conditions.split(","):
            condition_shape(condition)
    except ValueError as err:
        parser.error(f"--conditions: {err}")

    from benchmarks.common import machine_table, markdown_table

    rows, results = [], []
    cases = [(preset, remat, condition) for condition in args.conditions.split(",")
             for preset in args.models.split(",") for remat in args.remat.split(",")]
    for preset, remat, condition in cases:
        batch = args.batch or (8 if args.cpu_tiny else 256 if preset in ("S", "B") else 128)
        cmd = [sys.executable, "-m", "benchmarks.bench_gpu", "--case", f"{preset}:{remat}:{batch}:{condition}",
               "--steps", str(args.steps), "--warmup", str(args.warmup)] + (["--cpu-tiny"] if args.cpu_tiny else [])
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, cwd=REPO)
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            failure = None if lines else (done.stderr.strip().splitlines() or ["no output"])[-1][:120]
        except subprocess.TimeoutExpired:
            lines, failure = [], f"timed out after {args.timeout}s"
        if failure:
            rows.append([f"DiT-{preset}/2", condition, remat, batch, "failed", "", "", failure])
            continue
        r = json.loads(lines[-1])
        results.append(r)
        peak = peak_flops(r["device"], args.peak_tflops)
        mfu = "n/a" if peak is None else f"{r['images_per_s'] * r['train_flops_per_image'] / peak:.1%}"
        rows.append([r["model"], condition, remat, batch, f"{r['images_per_s']:,.1f}", f"{r['step_ms']:,.1f}",
                     mfu, f"{r['peak_bytes'] / 2**30:,.2f} GiB ({r['memory_source']})"])
    print(markdown_table(["model", "condition", "remat", "batch", "images/s", "ms/step", "MFU", "peak memory"], rows))
    print()
    device = results[0]["device"] if results else "?"
    print(machine_table(extra={"device": device, "command": " ".join(["python -m benchmarks.bench_gpu",
                                                                        *(argv or sys.argv[1:])])}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
