"""Expert training step: ours (JAX/Flax NNX, `ddm.train.trainer.train_step`) against a straightforward PyTorch DiT.

    pip install torch==2.13.0        # benchmark only: torch is not a dependency of ddm
    python -m benchmarks.bench_torch_dit [--quick] [--repeats N]

Both sides train the same DiT (patch embed, fixed 2-D sin-cos position embedding, timestep MLP, adaLN-Zero
blocks with the same widths / heads / MLP ratio, adaLN final layer; float32) with the same step:
uint8 images -> [-1, 1], t ~ logit-normal, x_t = (1 - t) x0 + t eps, MSE(v, eps - x0), backward,
global-norm gradient clipping at 1.0, AdamW (b1 0.9, b2 0.99, warmup + cosine schedule, no weight decay) and
an EMA of the parameters: the expert defaults of `ddm.config.TrainConfig`. Ours is the product's jitted
`train_step` with the state donated (it also checks loss, gradients and parameters for NaN/Inf every step, which
the PyTorch loop does not); theirs is eager PyTorch (`F.scaled_dot_product_attention`, default AdamW), with
`torch.set_num_threads(os.cpu_count())`.

Before timing, the PyTorch model is checked to be the same function: equal parameter counts, and, with our
(randomised) parameters copied in, the same velocities to float32 round-off. Both are warmed up; then they
alternate, round after round, each round `n` steps of one side, and images/s is batch * n / median round time.
Ratio = ours / theirs (> 1: ours is faster). Goal (the issue): >= 1.0.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
from pathlib import Path

import numpy as np

# libgomp's default (OMP_WAIT_POLICY unset) spin-waits at every parallel region; on a shared, loaded CPU a
# spinning thread waits for a descheduled peer and PyTorch ran 14x slower here (micro: 857 ms instead of
# 62 ms per step). Passive waiting is the fair setting for PyTorch on such a machine; set the variable to
# override. It must be set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

try:
    import torch
    import torch.nn.functional as F
    from torch import nn
except ImportError:
    sys.exit("bench_torch_dit.py needs PyTorch, which is not a dependency of ddm: pip install torch==2.13.0")

REPO = Path(__file__).resolve().parents[1]

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks.common import (
    fmt,
    interleaved,
    load_average,
    machine_table,
    markdown_table,
)
from ddm.core.config import ModelConfig, TrainConfig
from ddm.core.dit import (
    DIT_PRESETS,
    FREQ_DIM,
    MLP_RATIO,
    TIME_SCALE,
    count_params,
    dit_from_config,
)
from ddm.experts.train import flow_loss, make_dit
from ddm.train.trainer import init_state, make_optimizer, train_step

# ---------------------------------------------------------------------------------------------------------
# A straightforward PyTorch DiT (Peebles & Xie), channels-last input like ours.
# ---------------------------------------------------------------------------------------------------------


def sincos_2d(grid_h: int, grid_w: int, dim: int) -> torch.Tensor:
    """[grid_h * grid_w, dim]: the first dim/2 channels encode the row, the last dim/2 the column."""

    def one_d(d: int, pos: torch.Tensor) -> torch.Tensor:
        omega = 1.0 / 10_000.0 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2.0))
        args = pos.reshape(-1, 1) * omega[None, :]
        return torch.cat([torch.sin(args), torch.cos(args)], dim=1)

    rows, cols = torch.meshgrid(torch.arange(grid_h, dtype=torch.float64),
                                torch.arange(grid_w, dtype=torch.float64), indexing="ij")
    return torch.cat([one_d(dim // 2, rows), one_d(dim // 2, cols)], dim=1).float()


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.time_in = nn.Linear(FREQ_DIM, width)
        self.time_out = nn.Linear(width, width)

    def forward(self, t):
        half = FREQ_DIM // 2
        freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, dtype=torch.float32) / half)
        args = (TIME_SCALE * t)[:, None] * freqs[None, :]
        return self.time_out(F.silu(self.time_in(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))))


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # [b, heads, n, head_dim]
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6, elementwise_affine=False)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=1e-6, elementwise_affine=False)
        self.mlp_in = nn.Linear(width, MLP_RATIO * width)
        self.mlp_out = nn.Linear(MLP_RATIO * width, width)
        self.modulation = nn.Linear(width, 6 * width)

    def forward(self, x, c):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(F.silu(c)).chunk(6, dim=-1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1))
        h = self.mlp_out(F.gelu(self.mlp_in(modulate(self.norm2(x), shift2, scale2)), approximate="tanh"))
        return x + gate2.unsqueeze(1) * h


class FinalLayer(nn.Module):
    def __init__(self, width: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=1e-6, elementwise_affine=False)
        self.modulation = nn.Linear(width, 2 * width)
        self.linear = nn.Linear(width, out_dim)

    def forward(self, x, c):
        shift, scale = self.modulation(F.silu(c)).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, channels: int, width: int):
        super().__init__()
        self.proj = nn.Linear(patch * patch * channels, width)


class TorchDiT(nn.Module):
    """x [B, H, W, C], t [B] -> v [B, H, W, C]; same parameters (names and shapes, transposed) as ddm.dit.DiT."""

    def __init__(self, image_shape, patch: int, depth: int, width: int, heads: int):
        super().__init__()
        self.image_shape, self.p = tuple(image_shape), patch
        h, w, c = image_shape
        self.grid = (h // patch, w // patch)
        self.cond = TimestepEmbedder(width)
        self.patch_embed = PatchEmbed(patch, c, width)
        self.register_buffer("pos", sincos_2d(*self.grid, width), persistent=False)
        self.blocks = nn.ModuleList([Block(width, heads) for _ in range(depth)])
        self.final = FinalLayer(width, patch * patch * c)

    def forward(self, x, t):
        b, (h, w, c), p = x.shape[0], self.image_shape, self.p
        gh, gw = self.grid
        tokens = x.reshape(b, gh, p, gw, p, c).permute(0, 1, 3, 2, 4, 5).reshape(b, gh * gw, p * p * c)
        x = self.patch_embed.proj(tokens) + self.pos
        c_vec = self.cond(t)
        for block in self.blocks:
            x = block(x, c_vec)
        out = self.final(x, c_vec)
        return out.reshape(b, gh, gw, p, p, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)


def torch_train_step(model, ema, opt, sched, images_u8, cfg: TrainConfig):
    """One step: flow-matching loss (logit-normal t) + backward + clip + AdamW + schedule + EMA."""
    x0 = images_u8.float() / 127.5 - 1.0
    b = x0.shape[0]
    t = torch.sigmoid(torch.randn(b))
    eps = torch.randn_like(x0)
    tt = t.view(b, 1, 1, 1)
    x_t = (1 - tt) * x0 + tt * eps
    loss = F.mse_loss(model(x_t, t), eps - x0)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    sched.step()
    with torch.no_grad():
        for e, p in zip(ema, model.parameters()):
            e.lerp_(p, 1.0 - cfg.ema_decay)
    return loss


def torch_lr_lambda(cfg: TrainConfig):
    """The same warmup + cosine schedule as `ddm.train.trainer.learning_rate`, as a multiplier of cfg.lr."""
    warmup, total = min(cfg.warmup_steps, cfg.steps), max(cfg.steps, cfg.warmup_steps + 1)

    def f(step):
        if step < warmup:
            return step / warmup
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


# ---------------------------------------------------------------------------------------------------------
# Equivalence check: same parameter count, same function.
# ---------------------------------------------------------------------------------------------------------


def _is_kernel(path) -> bool:
    """Whether a pytree path of an nnx.State leaf ends in a Linear/Conv kernel (the last key is `.value`)."""
    return any(getattr(k, "key", None) == "kernel" for k in path)


def _randomised(state: nnx.State) -> nnx.State:
    """Every all-zero kernel (adaLN-Zero, final layer) gets N(0, 0.02) entries, so the check is not 0 == 0."""
    leaves, treedef = jax.tree.flatten_with_path(state)
    out = [0.02 * jax.random.normal(jax.random.key(i), leaf.shape, leaf.dtype)
           if _is_kernel(path) and not bool(jnp.any(leaf != 0)) else leaf
           for i, (path, leaf) in enumerate(leaves)]
    return jax.tree.unflatten(treedef, out)


def copy_params(state: nnx.State, model: TorchDiT) -> None:
    """Our params (kernel [in, out]) into the torch model (weight [out, in]); every torch param is filled."""
    flat = {}
    for path, leaf in jax.tree.flatten_with_path(state.to_pure_dict())[0]:
        name = ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        name = name.replace(".kernel", ".weight")
        value = torch.from_numpy(np.asarray(leaf).copy())
        flat[name] = value.T if name.endswith(".weight") else value
    missing = set(dict(model.named_parameters())) ^ set(flat)
    if missing:
        raise SystemExit(f"parameter names differ between the JAX and PyTorch DiT: {sorted(missing)}")
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(flat[name])


def check_same_model(cfg: ModelConfig, shape) -> tuple[int, float]:
    """(parameter count, max |v_ours - v_torch|) with our randomised params copied into the torch model."""
    ours = dit_from_config(cfg, shape, nnx.Rngs(0))
    depth, width, heads = DIT_PRESETS[cfg.preset]
    theirs = TorchDiT(shape, cfg.patch_size, depth, width, heads)
    n_ours, n_theirs = count_params(ours), sum(p.numel() for p in theirs.parameters())
    if n_ours != n_theirs:
        raise SystemExit(f"{cfg.preset}: parameter counts differ: ours {n_ours:,}, PyTorch {n_theirs:,}")
    graphdef, state = nnx.split(ours)
    state = _randomised(state)
    copy_params(state, theirs)
    x = np.random.default_rng(0).standard_normal((4, *shape)).astype(np.float32)
    t = np.linspace(0.05, 0.95, 4).astype(np.float32)
    v_ours = np.asarray(nnx.merge(graphdef, state)(jnp.asarray(x), jnp.asarray(t)))
    with torch.no_grad():
        v_theirs = theirs(torch.from_numpy(x), torch.from_numpy(t)).numpy()
    err = float(np.abs(v_ours - v_theirs).max())
    if not err < 1e-4 * max(1.0, float(np.abs(v_ours).max())):
        raise SystemExit(f"{cfg.preset}: the PyTorch DiT computes something else: max |dv| = {err:.3g}")
    return n_ours, err


# ---------------------------------------------------------------------------------------------------------
# Timing.
# ---------------------------------------------------------------------------------------------------------


def our_steps(model_cfg: ModelConfig, train_cfg: TrainConfig, shape, images, labels, n: int):
    """A callable running `n` of our training steps (`ddm.train.trainer.train_step`, jitted, state donated)."""
    make_model = functools.partial(make_dit, model_cfg, shape)
    tx = make_optimizer(train_cfg)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: make_model(nnx.Rngs(params=0))))
    step_fn = jax.jit(functools.partial(train_step, graphdef, functools.partial(flow_loss, "logit_normal", 0.0, 0), tx,
                                        train_cfg.ema_decay), donate_argnums=0)
    state = {"s": jax.jit(functools.partial(init_state, make_model, tx, 0))()}
    images_j, labels_j = jnp.asarray(images), jnp.asarray(labels)
    state["s"], metrics = step_fn(state["s"], images_j, labels_j, labels_j)  # compile outside the timed rounds
    jax.block_until_ready(metrics)

    def run():
        s = state["s"]
        for _ in range(n):
            s, metrics = step_fn(s, images_j, labels_j, labels_j)
        state["s"] = s
        return metrics["loss"]

    return run


def bench_case(preset: str, shape, patch: int, batch: int, steps_per_round: int, repeats: int) -> list[str]:
    model_cfg = ModelConfig(preset=preset, patch_size=patch)
    train_cfg = TrainConfig(steps=10_000, batch_size=batch, ema_decay=0.995)
    n_params, err = check_same_model(model_cfg, shape)
    images = np.random.default_rng(1).integers(0, 256, (batch, *shape), dtype=np.uint8)
    labels = np.zeros((batch,), np.int32)

    # Ours: the product's step function, jitted with the state donated, as the Trainer runs it.
    ours = our_steps(model_cfg, train_cfg, shape, images, labels, steps_per_round)

    # Theirs.
    torch.manual_seed(0)
    depth, width, heads = DIT_PRESETS[preset]
    model = TorchDiT(shape, patch, depth, width, heads)
    ema = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=train_cfg.lr, betas=(0.9, 0.99), eps=1e-8,
                            weight_decay=train_cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, torch_lr_lambda(train_cfg))
    images_t = torch.from_numpy(images)

    def theirs():
        for _ in range(steps_per_round):
            loss = torch_train_step(model, ema, opt, sched, images_t, train_cfg)
        return loss

    def block(out):
        return jax.block_until_ready(out) if isinstance(out, jax.Array) else out.item()

    timings = interleaved({"ours": ours, "theirs": theirs}, repeats=repeats, warmup=2, block=block)
    per_round = batch * steps_per_round
    ips = {name: per_round / t.median for name, t in timings.items()}
    cpu = {name: t.cpu_median for name, t in timings.items()}
    h, w, c = shape
    return [f"{preset} {h}x{w}x{c}/p{patch}", f"{n_params:,}", f"{err:.1e}", batch, fmt(ips["ours"]),
            fmt(ips["theirs"]), f"{ips['ours'] / ips['theirs']:.2f}", f"{cpu['theirs'] / cpu['ours']:.2f}",
            f"{timings['ours'].spread:.0%} / {timings['theirs'].spread:.0%}"]


HEADERS = ["DiT (preset, image/patch)", "params (both)", "max abs v diff", "batch", "ours img/s", "PyTorch img/s",
           "ours / PyTorch (wall)", "ours / PyTorch (CPU time)", "spread ours / PyTorch"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per side (median taken)")
    parser.add_argument("--batch", type=int, default=64, help="images per training step (both sides)")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
    repeats = args.repeats or (3 if args.quick else 7)
    command = "python -m benchmarks.bench_torch_dit" + (" --quick" if args.quick else "")
    print(machine_table(("jax", "jaxlib", "flax", "optax", "torch"),
                        extra={"command": f"`{command}`", "torch threads": torch.get_num_threads(),
                               "OMP_WAIT_POLICY": os.environ["OMP_WAIT_POLICY"],
                               "XLA_FLAGS": os.environ.get("XLA_FLAGS", "(unset)")}))
    print()
    # (preset, image shape, patch, steps per timed round): a round is ~0.5-5 s on a loaded 2-core CPU.
    cases = [("micro", (8, 8, 1), 2, 10), ("tiny", (8, 8, 1), 2, 4), ("small", (28, 28, 1), 4, 1)]
    rows = []
    for preset, shape, patch, steps in cases:
        rows.append(bench_case(preset, shape, patch, args.batch, steps, repeats))
        print(f"done: {preset} (load average {load_average()})", file=sys.stderr, flush=True)
    print(markdown_table(HEADERS, rows))
    print(f"\nload average after: {load_average()}")


if __name__ == "__main__":
    main()
