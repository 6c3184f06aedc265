"""Typed, frozen configuration loaded from `configs/*.yaml` with `--set section.key=value` overrides.

One `Config` describes a whole run: data preparation, the experts, the router, sampling, distillation and
the monolith. It is stored
resolved inside the run's manifest, so every later command (train, sample, verify) sees exactly the settings
the run was prepared with, plus any overrides given on its own command line.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from ddm.core.errors import DDMError

EMBEDDINGS = ("pixels", "pca", "file", "conditions")  # "conditions": k-means on data.conditions
# ddm.core.flow implements these (and imports them from here): the config is read without loading jax
T_SAMPLINGS = ("uniform", "logit_normal")
SOLVERS = ("euler", "heun")
DATA_KINDS = ("images", "latents")
KMEANS_MODES = ("lloyd", "balanced", "two_stage")
PARTITIONS = ("kmeans", "random")
MODEL_PRESETS = ("micro", "tiny", "small", "S", "B", "L", "XL")
DTYPES = ("float32", "bfloat16")
REMAT_MODES = ("none", "block")
SCHEDULES = ("cosine", "constant")
ROUTER_ARCHS = ("conv", "mlp", "dit")
ROUTER_SOURCES = ("data", "experts")  # what the router trains on (`RouterConfig`)
LABEL_MODES = ("auto", "none")
MAX_CLASSES = 10_000  # more distinct labels than this is almost surely an id column, not classes
SEED_MAX = 2**32 - 1  # seeds become 32-bit threefry keys and numpy seeds: 0..2^32-1


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-4` as a float (YAML 1.1 needs `1.0e-4`; users write `1e-4`)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise DDMError(f"config {name}={value!r} is not one of {', '.join(choices)}")


def _check_positive(name: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise DDMError(f"config {name}={value} must be {'>= 0' if allow_zero else '> 0'}")


def _check_seed(name: str, value: int) -> None:
    if not 0 <= value <= SEED_MAX:
        raise DDMError(f"config {name}={value} must be a seed in 0..{SEED_MAX}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where images come from, how they are embedded and clustered into K shards."""

    source: str = "digits"  # "digits", a .npz/.npy file, an image folder, a .parquet file, or "hf:<name>"
    # "images" (uint8 pixels) or "latents": float16/float32 arrays [N, h, w, c] from a .npy / .npz (key
    # "latents", else "data"), stored exactly and standardised per channel for the model (docs/latents.md).
    kind: str = "images"
    latent_scale: float | None = None  # latents: one factor (model value = x * scale, e.g. SD's 0.18215)
    # Embedding (PCA) and k-means are fitted on at most this many images; everything else is assigned and
    # written in chunks, so `ddm prepare`'s memory does not grow with N.
    fit_samples: int = 100_000
    array_key: str | None = None  # array inside a .npz (default: the only one, or "data"/"images")
    image_column: str = "image"  # column holding images for parquet / Hugging Face sources
    # "auto": use the source's class labels when it has them; "none" (or null: `--set data.labels=none` parses
    # as null) ignores them.
    labels: str | None = "auto"
    # Column (parquet, hf:) or .npz array holding the class labels. None: "label" (.npz: "labels", else "y")
    # when the source has it; a name given here must exist.
    label_column: str | None = None
    split: str = "train"  # Hugging Face split
    image_size: int | None = None  # resize (shorter side) + center-crop to a square of this size
    limit: int | None = None  # use only the first `limit` images
    embedding: str = "pca"
    embed_dim: int = 32  # PCA dimensions
    features_path: str | None = None  # precomputed features for embedding="file" (.npy or .parquet)
    features_column: str | None = None  # parquet column with the feature vectors
    k: int = 4
    # How the training images are split into the K clusters: "kmeans" (on the embedding, `kmeans` mode below) or
    # "random" (uniformly at random, cluster sizes equal to within one image, seeded by `partition_seed`; the
    # paper's baseline partition: no embedding is computed and held-out images get random clusters too).
    partition: str = "kmeans"
    partition_seed: int | None = None  # random partition's seed (null: data.seed)
    kmeans: str = "lloyd"
    max_iter: int = 100
    tol: float = 1e-4  # Lloyd stops when the relative inertia change is below this
    fine_k: int = 256  # fine centroids of the two-stage mode
    balance_slack: float = 1.1  # balanced mode: no cluster larger than ceil(slack * N / K)
    holdout_fraction: float = 0.1  # kept out of every shard for router / quality evaluation
    # Class indices whose images are dropped on loading (training and held-out alike); the classes stay in the
    # run's class list with zero images, so an island that holds them can join later (docs/membership.md).
    exclude_classes: tuple[int, ...] = ()
    # Per-image condition embeddings (text or any vector) the models are conditioned on instead of class labels
    # (a conditioned run reads no class labels): a .npy / .npz file of float16 / float32 [N, D] (pooled) or
    # [N, L, D] (tokens) rows aligned with the images, a .parquet file's column, or "captions" (the built-in
    # digits' generated captions, embedded by ddm.data.captions). None: no embeddings.
    conditions: str | None = None
    conditions_key: str | None = None  # the .npz array or parquet column holding them (default: "conditions")
    seed: int = 0
    chunk_images: int = 256  # zarr chunk length along N

    def __post_init__(self) -> None:
        _check_choice("data.kind", self.kind, DATA_KINDS)
        _check_positive("data.fit_samples", self.fit_samples)
        if self.latent_scale is not None and (not math.isfinite(self.latent_scale) or self.latent_scale <= 0):
            raise DDMError(f"config data.latent_scale={self.latent_scale} must be a finite number > 0")
        if self.latent_scale is not None and self.kind != "latents":
            raise DDMError("config data.latent_scale applies to data.kind=latents only")
        _check_choice("data.embedding", self.embedding, EMBEDDINGS)
        _check_choice("data.kmeans", self.kmeans, KMEANS_MODES)
        _check_choice("data.partition", self.partition, PARTITIONS)
        if self.partition_seed is not None:
            _check_seed("data.partition_seed", self.partition_seed)
        if self.labels is None:
            object.__setattr__(self, "labels", "none")
        _check_choice("data.labels", self.labels, LABEL_MODES)
        if self.labels == "none" and self.label_column is not None:
            raise DDMError(f"config data.label_column={self.label_column!r} names labels that data.labels='none' "
                           "ignores")
        if self.k < 1:
            raise DDMError(f"config data.k={self.k} must be >= 1")
        _check_positive("data.embed_dim", self.embed_dim)
        _check_positive("data.max_iter", self.max_iter)
        _check_positive("data.chunk_images", self.chunk_images)
        _check_positive("data.fine_k", self.fine_k)
        _check_positive("data.tol", self.tol, allow_zero=True)
        _check_seed("data.seed", self.seed)
        if self.balance_slack < 1.0:
            raise DDMError(f"config data.balance_slack={self.balance_slack} must be >= 1.0")
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise DDMError(f"config data.holdout_fraction={self.holdout_fraction} must be in [0, 1)")
        if self.image_size is not None:
            _check_positive("data.image_size", self.image_size)
        if self.limit is not None:
            _check_positive("data.limit", self.limit)
        if any(c < 0 for c in self.exclude_classes) or len(set(self.exclude_classes)) != len(self.exclude_classes):
            raise DDMError(f"config data.exclude_classes={list(self.exclude_classes)} must be distinct class indices >= 0")
        if self.embedding == "file" and not self.features_path:
            raise DDMError("config data.embedding='file' needs data.features_path")
        if self.embedding == "conditions" and not self.conditions:
            raise DDMError("config data.embedding='conditions' needs data.conditions")
        if self.conditions is not None and self.label_column is not None:
            raise DDMError(f"config data.conditions and data.label_column={self.label_column!r} both name what the "
                           "models are conditioned on: a run uses class labels or condition embeddings, not both")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A DiT: a preset fixes width/depth/heads; the patch size and conditioning are free."""

    preset: str = "tiny"
    patch_size: int = 2
    # Class labels the model is conditioned on. None: whatever the data has (`ddm prepare` stores the resolved
    # value in the run's config: 0 for unlabelled data). A value that disagrees with the data is an error.
    num_classes: int | None = None
    # Shape of one image's condition embedding: (D,) pooled (added to the timestep embedding, adaLN) or (L, D)
    # tokens (cross-attention in every block); () none. None: whatever the data has (`ddm prepare` stores the
    # resolved value in the run's config). A row of all NaN is the null condition (classifier-free guidance).
    condition_shape: tuple[int, ...] | None = None
    dtype: str = "float32"  # compute dtype; parameters, optimizer state and the loss stay float32
    # "block": recompute each DiT block's activations in the backward pass (nnx.remat) instead of storing them:
    # same results, less activation memory, ~1/3 more compute.
    remat: str = "none"

    def __post_init__(self) -> None:
        _check_choice("model.preset", self.preset, MODEL_PRESETS)
        _check_choice("model.remat", self.remat, REMAT_MODES)
        _check_choice("model.dtype", self.dtype, DTYPES)
        _check_positive("model.patch_size", self.patch_size)
        if self.num_classes is not None:
            _check_positive("model.num_classes", self.num_classes, allow_zero=True)
            if self.num_classes > MAX_CLASSES:
                raise DDMError(f"config model.num_classes={self.num_classes} is more than {MAX_CLASSES:,} classes")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training job (an expert, the router or the monolith) on the shared trainer."""

    steps: int = 1000
    batch_size: int = 128  # global batch, split over every device of the island
    lr: float = 1e-3
    warmup_steps: int = 100
    schedule: str = "cosine"
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    # EMA warmup (diffusers' EMAModel): the decay of update t is min(ema_decay, (1 + t) / (10 + t)), so the EMA
    # follows the live weights early instead of averaging in the random initialisation; false: ema_decay throughout.
    ema_warmup: bool = True
    t_sampling: str = "logit_normal"
    class_dropout: float = 0.1  # share of labels replaced by the null label (classifier-free guidance)
    seed: int = 0
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 100
    mesh_data: int = -1  # -1: every device not used by fsdp
    mesh_fsdp: int = 1
    # What a researcher watches while it trains (docs/training.md): held-out loss at every log step, metrics
    # writers beside metrics.jsonl, and a fixed-noise sample grid from the EMA weights every `sample_every` steps.
    holdout_loss: bool = True  # loss (and the router's accuracy) on the component's held-out images
    tensorboard: bool = False  # TensorBoard event files in the component's tb/ (pip install -e '.[tb]')
    wandb_project: str | None = None  # also log to this Weights & Biases project (needs `wandb`)
    sample_every: int = 0  # 0: never; only jobs that generate (experts, monolith) draw grids
    sample_images: int = 16  # images in the grid
    sample_steps: int = 16  # Euler steps of the grid's ODE solve
    # Gradient accumulation: each optimizer step averages the gradients of `grad_accum` micro-batches of
    # batch_size / grad_accum rows (the same update as one batch of batch_size, in a fraction of the memory).
    grad_accum: int = 1
    # The shard reader (`ddm.data.shards.ShardReader`): shards above 2 GiB are streamed in a chunk-aware order
    # whose rows are mixed within windows of about `shuffle_buffer` rows (part of what makes the batches, so
    # part of the run); `prefetch` batches are read ahead on a background thread (0: none; no effect on results).
    shuffle_buffer: int = 8192
    prefetch: int = 2

    def __post_init__(self) -> None:
        _check_choice("train.schedule", self.schedule, SCHEDULES)
        _check_choice("train.t_sampling", self.t_sampling, T_SAMPLINGS)
        for name in ("steps", "batch_size", "lr", "checkpoint_every", "keep_checkpoints", "log_every",
                     "sample_images", "sample_steps", "grad_accum", "shuffle_buffer"):
            _check_positive(f"train.{name}", getattr(self, name))
        _check_positive("train.sample_every", self.sample_every, allow_zero=True)
        _check_positive("train.prefetch", self.prefetch, allow_zero=True)
        _check_seed("train.seed", self.seed)
        if self.wandb_project is not None and not self.wandb_project.strip():
            raise DDMError("config train.wandb_project must be a project name or null")
        _check_positive("train.warmup_steps", self.warmup_steps, allow_zero=True)
        _check_positive("train.weight_decay", self.weight_decay, allow_zero=True)
        _check_positive("train.grad_clip", self.grad_clip, allow_zero=True)
        if not 0.0 <= self.ema_decay < 1.0:
            raise DDMError(f"config train.ema_decay={self.ema_decay} must be in [0, 1)")
        if not 0.0 <= self.class_dropout < 1.0:
            raise DDMError(f"config train.class_dropout={self.class_dropout} must be in [0, 1)")
        if self.batch_size % self.grad_accum:
            raise DDMError(f"config train.batch_size={self.batch_size} is not divisible by "
                           f"train.grad_accum={self.grad_accum}")
        if self.mesh_data == 0 or self.mesh_data < -1 or self.mesh_fsdp < 1:
            raise DDMError(f"config mesh ({self.mesh_data}, {self.mesh_fsdp}) must be positive (data may be -1)")


@dataclasses.dataclass(frozen=True)
class ExpertConfig:
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()


@dataclasses.dataclass(frozen=True)
class MonolithConfig:
    """`ddm train-monolith`: the single-model baseline, one DiT on every shard.

    A null section is the expert's (`expert.model` / `expert.train` as this command resolves them, so
    `--set expert.train.lr=...` reaches it too). A section that is given, even in part (`--set
    monolith.train.steps=N`), is completed from the expert's values and is from then on the monolith's own.
    Use `monolith_job(cfg)` for the settings the monolith trains with.
    """

    model: ModelConfig | None = None
    train: TrainConfig | None = None


@dataclasses.dataclass(frozen=True)
class RouterConfig:
    """The router network and what it trains on.

    source "data": the islands' shards (the union, so each cluster appears in proportion to its size).
    "experts": images the finished experts draw (`ddm.sampling.router_set`), so whoever trains the router needs
    the experts and the manifest's counts but no raw data: expert_samples x K images in all, split over
    (cluster, class) in proportion to the manifest's counts, each drawn by its cluster's expert alone with
    expert_steps steps of expert_solver.
    """

    arch: str = "conv"  # "conv" (small conv net), "mlp" (dense layers on pixels) or "dit" (DiT blocks + CLS)
    preset: str = "tiny"  # width preset for either arch
    patch_size: int = 2  # dit arch only
    train: TrainConfig = TrainConfig(steps=1000, ema_decay=0.99)
    source: str = "data"
    # On a run conditioned on embeddings (data.conditions): true, the router also takes each image's embedding,
    # p(k | x_t, t, c) (pooled, or tokens averaged, into its conditioning vector); false, it models p(k | x_t, t)
    # only, as Paris's router does. A class-conditional router always takes the class.
    condition: bool = True
    expert_samples: int = 512  # source experts: images per cluster on average
    expert_steps: int = 20
    expert_solver: str = "heun"

    def __post_init__(self) -> None:
        _check_choice("router.arch", self.arch, ROUTER_ARCHS)
        _check_choice("router.preset", self.preset, MODEL_PRESETS)
        _check_choice("router.source", self.source, ROUTER_SOURCES)
        _check_choice("router.expert_solver", self.expert_solver, SOLVERS)
        _check_positive("router.expert_samples", self.expert_samples)
        _check_positive("router.expert_steps", self.expert_steps)


TEACHERS = ("cluster", "full")


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """`ddm distill`: one student DiT regressing the trained ensemble's velocity (the paper's section 4.4).

    teacher "cluster": each noisy training sample's target is the velocity of the expert of its own cluster (the
    paper's way: one expert forward per sample); "full": the router-weighted sum of every expert (K expert
    forwards plus the router per sample). The student's class conditioning follows the data, as the experts'.
    """

    model: ModelConfig = ModelConfig(preset="micro")
    train: TrainConfig = TrainConfig(steps=1000, batch_size=64, warmup_steps=100, ema_decay=0.995)
    teacher: str = "cluster"

    def __post_init__(self) -> None:
        _check_choice("distill.teacher", self.teacher, TEACHERS)


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    n: int = 64
    steps: int = 50
    solver: str = "euler"
    seed: int = 0
    strategies: tuple[str, ...] = ("top1", "top2", "full")
    cfg_scale: float = 3.0  # classifier-free guidance scale of class-conditional requests (1: no guidance)
    # The most images and solver steps one `ddm sample` / `ddm evaluate` request may ask for (memory and time
    # grow with both); raise them with --set sample.max_n=... when a bigger request is meant.
    max_n: int = 10_000
    max_steps: int = 1000
    # Latent runs: "module:function" mapping de-normalised latents float32 [n, h, w, c] to uint8 images (your
    # VAE's decoder) for grids and PNGs; unset: a fixed visualisation of latent channels 0-2.
    decoder: str | None = None
    # Runs conditioned on embeddings: "module:function" turning a list of n strings into float16 / float32
    # embeddings [n, *condition_shape] (your text encoder, installed by you), for `ddm sample --prompt`;
    # imported only when a prompt is given. Unset: prompts are refused (give --conditions FILE instead).
    condition_encoder: str | None = None

    def __post_init__(self) -> None:
        _check_choice("sample.solver", self.solver, SOLVERS)
        for name in ("n", "steps", "max_n", "max_steps"):
            _check_positive(f"sample.{name}", getattr(self, name))
        _check_seed("sample.seed", self.seed)
        if self.n > self.max_n or self.steps > self.max_steps:
            raise DDMError(f"config sample.n={self.n} / sample.steps={self.steps} exceed sample.max_n={self.max_n} "
                           f"/ sample.max_steps={self.max_steps}")
        if not math.isfinite(self.cfg_scale) or self.cfg_scale < 0:
            raise DDMError(f"config sample.cfg_scale={self.cfg_scale} must be a finite number >= 0")


@dataclasses.dataclass(frozen=True)
class Config:
    run_dir: str = "runs/digits"
    data: DataConfig = DataConfig()
    expert: ExpertConfig = ExpertConfig()
    router: RouterConfig = RouterConfig()
    sample: SampleConfig = SampleConfig()
    distill: DistillConfig = DistillConfig()
    monolith: MonolithConfig = MonolithConfig()


def monolith_job(cfg: Config) -> ExpertConfig:
    """The model and training settings the monolith trains with: its own section, else the expert's."""
    return ExpertConfig(model=cfg.monolith.model or cfg.expert.model, train=cfg.monolith.train or cfg.expert.train)


def with_num_classes(cfg: Config, num_classes: int) -> Config:
    """`cfg` with `expert.model.num_classes` set to the data's `num_classes` (0: unlabelled data).

    An explicit value that disagrees is a DDMError: a model must never be silently unconditional (or condition
    on labels that do not exist).
    """
    explicit = cfg.expert.model.num_classes
    if explicit is not None and explicit != num_classes:
        if num_classes == 0:
            raise DDMError(f"config expert.model.num_classes={explicit}, but the data has no class labels "
                           "(set data.labels=auto on a labelled source, or leave num_classes unset)")
        raise DDMError(f"config expert.model.num_classes={explicit} disagrees with the data's {num_classes} "
                       "classes (leave it unset, or set data.labels=none for an unconditional model)")
    student = cfg.distill.model.num_classes
    if student is not None and student != num_classes:
        raise DDMError(f"config distill.model.num_classes={student} disagrees with the data's {num_classes} classes "
                       "(leave it unset: the student is conditioned like the experts)")
    mono = cfg.monolith.model
    if mono is not None and mono.num_classes is not None and mono.num_classes != num_classes:
        raise DDMError(f"config monolith.model.num_classes={mono.num_classes} disagrees with the data's {num_classes} "
                       "classes (leave it unset: the monolith is conditioned like the experts)")
    model = dataclasses.replace(cfg.expert.model, num_classes=num_classes)
    student_model = dataclasses.replace(cfg.distill.model, num_classes=num_classes)
    mono_model = None if mono is None else dataclasses.replace(mono, num_classes=num_classes)
    return dataclasses.replace(cfg, expert=dataclasses.replace(cfg.expert, model=model),
                               distill=dataclasses.replace(cfg.distill, model=student_model),
                               monolith=dataclasses.replace(cfg.monolith, model=mono_model))


def with_condition_shape(cfg: Config, shape: tuple[int, ...]) -> Config:
    """`cfg` with `condition_shape` of the experts', the student's and the monolith's models set to the data's
    `shape` (() for data without condition embeddings; (D,) pooled, (L, D) tokens).

    An explicit value that disagrees is a DDMError, as is an explicit `num_classes > 0` on data with condition
    embeddings: a run is conditioned on class labels or on embeddings, never both.
    """
    shape = tuple(int(d) for d in shape)
    models = {"expert.model": cfg.expert.model, "distill.model": cfg.distill.model,
              "monolith.model": cfg.monolith.model}
    for name, model in models.items():
        if model is None:
            continue
        explicit = model.condition_shape
        if explicit is not None and tuple(explicit) != shape:
            held = f"condition embeddings of shape {list(shape)}" if shape else "no condition embeddings"
            raise DDMError(f"config {name}.condition_shape={list(explicit)}, but the data has {held} "
                           "(leave it unset: it is read from data.conditions)")
        if shape and model.num_classes:
            raise DDMError(f"config {name}.num_classes={model.num_classes} and data.conditions both condition the "
                           "model: a run uses class labels or condition embeddings, not both")
    resolved = {name: None if model is None else dataclasses.replace(model, condition_shape=shape)
                for name, model in models.items()}
    return dataclasses.replace(cfg, expert=dataclasses.replace(cfg.expert, model=resolved["expert.model"]),
                               distill=dataclasses.replace(cfg.distill, model=resolved["distill.model"]),
                               monolith=dataclasses.replace(cfg.monolith, model=resolved["monolith.model"]))


# ---------------------------------------------------------------------------------------------------------
# Building dataclasses from plain dicts, with clear errors.
# ---------------------------------------------------------------------------------------------------------


def _coerce(path: str, value: Any, hint: Any) -> Any:
    """Checks `value` against the type hint `hint`; ints are accepted where floats are expected."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise DDMError(f"config {path} must be a mapping, got {type(value).__name__}")
        return from_dict(hint, value, prefix=path + ".")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(path, value, inner[0])
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise DDMError(f"config {path} must be a list, got {type(value).__name__}")
        (item,) = typing.get_args(hint)[:1]
        return tuple(_coerce(f"{path}[{i}]", v, item) for i, v in enumerate(value))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if hint is float and isinstance(value, float) and not math.isfinite(value):
        raise DDMError(f"config {path}={value!r} must be a finite number")
    if hint in (int, float, str, bool):
        if isinstance(value, bool) != (hint is bool) or not isinstance(value, hint):
            raise DDMError(f"config {path}={value!r} must be {hint.__name__}, got {type(value).__name__}")
        return value
    raise TypeError(f"unsupported config type {hint} at {path}")


def from_dict(cls: type, values: dict, prefix: str = "") -> Any:
    """Builds dataclass `cls` from a (possibly partial) nested dict; unknown keys are errors."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise DDMError(f"unknown config key {prefix}{unknown[0]} (known: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            # Partial sections keep the defaults of the section's class, not of the parent's default instance.
            base = to_dict(getattr(cls(), name)) if _has_default(cls, name) else {}
            value = _merge(base, value)
        kwargs[name] = _coerce(prefix + name, value, hint)
    return cls(**kwargs)


def _has_default(cls: type, name: str) -> bool:
    field = {f.name: f for f in dataclasses.fields(cls)}[name]
    return field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def to_dict(config: Any) -> dict:
    """The config as plain JSON/YAML-able data (tuples become lists)."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(config))


def to_yaml(config: Any) -> str:
    """The config as YAML, sections and keys in declaration order (what `ddm config show` prints)."""
    return yaml.safe_dump(to_dict(config), sort_keys=False, default_flow_style=False)


def parse_override(text: str) -> dict:
    """`"expert.train.steps=200"` -> `{"expert": {"train": {"steps": 200}}}` (the value is parsed as YAML)."""
    if "=" not in text:
        raise DDMError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise DDMError(f"override {text!r} has an empty key")
    try:
        value = yaml.load(raw, Loader=_Loader) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    if value is None and raw.strip().lower() not in ("null", "~", "none"):
        value = raw
    if isinstance(value, str) and raw.strip().lower() == "none":
        value = None
    nested: dict = {}
    cursor = nested
    parts = key.split(".")
    for part in parts[:-1]:
        cursor = cursor.setdefault(part, {})
    cursor[parts[-1]] = value
    return nested


def config_from_data(values: dict, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """A `Config` from a nested dict plus `key=value` overrides applied in order."""
    merged = dict(values)
    for text in overrides:
        merged = _merge(merged, parse_override(text))
    return from_dict(Config, _inherit_monolith(merged))


def _inherit_monolith(values: dict) -> dict:
    """`values` with a given monolith.model / monolith.train completed from the expert's (`MonolithConfig`)."""
    mono, expert = values.get("monolith"), values.get("expert")
    if not isinstance(mono, dict):
        return values
    expert = expert if isinstance(expert, dict) else {}
    mono = {part: (_merge(expert[part] if isinstance(expert.get(part), dict) else {}, value)
                   if part in ("model", "train") and isinstance(value, dict) else value)
            for part, value in mono.items()}
    return {**values, "monolith": mono}


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Loads `configs/*.yaml` (or the defaults when `path` is None) and applies `--set` overrides."""
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise DDMError(f"config file not found: {path}")
        try:
            values = yaml.load(path.read_text(), Loader=_Loader) or {}
        except yaml.YAMLError as err:
            raise DDMError(f"config file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
        if not isinstance(values, dict):
            raise DDMError(f"config file {path} must hold a mapping at the top level")
    return config_from_data(values, overrides)
