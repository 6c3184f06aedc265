"""The feature network behind `ddm evaluate`: a small conv classifier the project trains itself on real data.

Why not Inception/FID: our datasets are unlabelled in general, tiny (8x8 digits) and offline, and no pretrained
Flax encoder ships (README.md, "Configs"). So each dataset gets its own feature network, and every report says
"FD in kmc<K>-cnn features", never "FID": the numbers compare runs *on the same dataset*, not across datasets
or with published FIDs.

What it is (choice documented here, honestly): a 3-stage conv net trained with cross-entropy to predict
*pseudo-classes*: k-means (`pseudo_k` clusters, Lloyd) on a PCA of the training pixels. This is a
deep-clustering classifier: it learns features that separate the modes of the data (for digits the k-means
pseudo-classes track digit identity and writing style), the role Inception's pool features play for FID.
The pseudo-labels are the net's own, with a fixed `pseudo_k` independent of the run's K, so runs with
different K, or with random partitions, are measured by the same network. Features: the `feature_dim`-d
pre-activation of the penultimate layer (like Inception's pool3).

    images uint8 [N, H, W, C] -> [-1, 1] -> conv3x3(w) GN SiLU -> conv3x3/2(2w) GN SiLU -> conv3x3/2(4w) GN SiLU
        -> flatten -> Linear(feature_dim) = features -> SiLU -> Linear(pseudo_k) = logits

The same machinery trains the *class classifier* of a labelled dataset (`targets="classes"`, named
"cls<C>-cnn"): the same net and training, with the true class labels as targets. `ddm evaluate` reads guided
samples with it (class accuracy of classifier-free guidance); `get_classifier(run)` loads or trains it.

Caching and pinning. The net is trained once per (dataset fingerprint, exact training image set and targets,
net config) with the shared `Trainer` (each target class becomes a shard, so the shard reader supplies the
targets as cluster ids) in `CACHE/featurenet/<key>/`, where key = fingerprint[:16]-trainset[:8]-config[:8].
Its EMA parameters are pinned by SHA-256 in `info.json` and checked on every load; a copy goes to
`RUN/eval/featurenet/` (`RUN/eval/classifier/`) so the run directory stays self-contained. The training set is
the union of the run's training shards, put in a canonical order (sorted by per-image SHA-256), so any
partition of the same images (k-means or random, any K) gets the same network. Held-out images are never seen.
The key does not name the machine: the same training on another CPU model (XLA:CPU compiles per instruction
set) or accelerator ends at other weights, so `info.json` records where it was trained (`trained_in`, the
`replay_environment`), and evaluations to be compared across machines share one net (copy RUN/eval/featurenet).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import json
import logging
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ddm.core import documents
from ddm.core.cache import default_cache_dir
from ddm.core.config import TrainConfig
from ddm.core.errors import DDMError
from ddm.core.hashing import images_sha256, labels_fingerprint
from ddm.core.images import to_model_range
from ddm.data.embed import pca
from ddm.data.kmeans import kmeans
from ddm.data.run import Run
from ddm.data.shards import ShardReader, read_labels, read_shard, write_shard
from ddm.train.checkpoint import load_pinned, replay_environment
from ddm.train.trainer import Task, Trainer

logger = logging.getLogger(__name__)

NET_VERSION = "kmc-cnn-v1"
INFO = "info.json"
TARGETS = ("kmeans", "classes")  # what the net learns to predict: k-means pseudo-classes, or the true classes


def apply_padded(fn: Callable[[jax.Array], jax.Array], images: np.ndarray, batch: int = 256,
                 encode: Callable[[np.ndarray], np.ndarray] = to_model_range) -> np.ndarray:
    """fn over uint8 images [N, H, W, C] (given to fn as float32 in [-1, 1]; or any stored rows, given to fn as
    `encode` makes them) in batches padded to `batch` rows, so any N costs one compilation. Returns fn's outputs
    concatenated over N."""
    out = []
    for i in range(0, len(images), batch):
        chunk = images[i:i + batch]
        rows = len(chunk)
        if rows < batch:
            chunk = np.concatenate([chunk, np.zeros((batch - rows,) + chunk.shape[1:], chunk.dtype)])
        out.append(np.asarray(fn(jnp.asarray(encode(chunk))))[:rows])
    return np.concatenate(out)


@dataclasses.dataclass(frozen=True)
class FeatureNetConfig:
    """Everything that determines the feature network (all of it enters the cache key)."""

    pseudo_k: int = 32  # k-means pseudo-classes the net learns to predict
    pca_dim: int = 32  # PCA of the pixels the pseudo-classes are clustered in
    width: int = 32  # conv widths (w, 2w, 4w)
    feature_dim: int = 64  # dimension of the features FD / precision / recall are computed in
    steps: int = 600
    batch_size: int = 128
    lr: float = 2e-3
    seed: int = 0
    targets: str = "kmeans"  # "kmeans": pseudo-classes (the feature net); "classes": the data's class labels

    def __post_init__(self) -> None:
        for name in ("pseudo_k", "pca_dim", "width", "feature_dim", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise DDMError(f"feature net {name}={getattr(self, name)} must be >= 1")
        if self.lr <= 0:
            raise DDMError(f"feature net lr={self.lr} must be > 0")
        if self.targets not in TARGETS:
            raise DDMError(f"feature net targets={self.targets!r} is not one of {', '.join(TARGETS)}")

    @property
    def name(self) -> str:
        return f"kmc{self.pseudo_k}-cnn"

    def key_fields(self) -> dict:
        """The fields that enter the cache key (targets only when not the default, so the feature net's keys
        are those it had before classifiers existed)."""
        fields = dataclasses.asdict(self)
        if self.targets == "kmeans":
            del fields["targets"]
        return fields

    def train_config(self) -> TrainConfig:
        return TrainConfig(steps=self.steps, batch_size=self.batch_size, lr=self.lr,
                           warmup_steps=min(100, self.steps // 10), schedule="cosine", weight_decay=1e-4,
                           ema_decay=0.99, seed=self.seed, checkpoint_every=self.steps,
                           keep_checkpoints=1, log_every=max(self.steps // 5, 1))


# ---------------------------------------------------------------------------------------------------------
# The model.
# ---------------------------------------------------------------------------------------------------------


class ConvEncoder(nnx.Module):
    """x [B, H, W, C] float32 in [-1, 1] -> features [B, D] (`features`) and logits [B, outputs] (`__call__`)."""

    def __init__(self, image_shape: tuple[int, int, int], cfg: FeatureNetConfig, outputs: int, *, rngs: nnx.Rngs):
        h, w, c = image_shape
        widths = (cfg.width, 2 * cfg.width, 4 * cfg.width)
        self.convs = nnx.List()
        self.norms = nnx.List()
        in_ch = c
        for i, out_ch in enumerate(widths):
            stride = 1 if i == 0 else 2
            self.convs.append(nnx.Conv(in_ch, out_ch, (3, 3), strides=(stride, stride), padding="SAME", rngs=rngs))
            self.norms.append(nnx.GroupNorm(out_ch, num_groups=min(8, out_ch), rngs=rngs))
            if i > 0:
                h, w = -(-h // 2), -(-w // 2)
            in_ch = out_ch
        self.proj = nnx.Linear(h * w * in_ch, cfg.feature_dim, rngs=rngs)
        self.head = nnx.Linear(cfg.feature_dim, outputs, rngs=rngs)

    def features(self, x: jax.Array) -> jax.Array:
        for conv, norm in zip(self.convs, self.norms):
            x = jax.nn.silu(norm(conv(x)))
        return self.proj(x.reshape(x.shape[0], -1))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(jax.nn.silu(self.features(x)))


def classifier_loss(model: nnx.Module, x: jax.Array, targets: jax.Array, classes: jax.Array, rng: jax.Array):
    """Cross-entropy on the targets, which are the reader's cluster ids (one shard per target class).
    x: [B, H, W, C] in [-1, 1]; light noise augmentation (sigma 0.05). `classes` is unused."""
    import optax

    x = x + 0.05 * jax.random.normal(rng, x.shape, x.dtype)
    logits = model(x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
    return loss, {"accuracy": (jnp.argmax(logits, -1) == targets).mean()}


def make_encoder(image_shape: tuple[int, int, int], cfg: FeatureNetConfig, outputs: int,
                 rngs: nnx.Rngs) -> ConvEncoder:
    return ConvEncoder(tuple(image_shape), cfg, outputs, rngs=rngs)


# ---------------------------------------------------------------------------------------------------------
# A loaded feature network.
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class FeatureNet:
    """A loaded, SHA-256-checked feature network. `features(images)` is what the metrics use."""

    name: str
    sha256: str
    key: str
    info: dict
    trained: bool  # True when this call trained it (False: loaded from a cache)
    model: ConvEncoder

    def __post_init__(self) -> None:
        graphdef, state = nnx.split(self.model)
        self._state = state
        self._fn = jax.jit(lambda s, x: nnx.merge(graphdef, s).features(x))
        self._predict = jax.jit(lambda s, x: jnp.argmax(nnx.merge(graphdef, s)(x), -1))

    @property
    def dim(self) -> int:
        return int(self.info["config"]["feature_dim"])

    def features(self, images: np.ndarray, batch: int = 256) -> np.ndarray:
        """images: uint8 [N, H, W, C] -> features float64 [N, D]. Every batch is padded to `batch` rows, so
        any N costs one compilation."""
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4:
            raise DDMError(f"feature net needs uint8 images [N, H, W, C], got {images.dtype} {images.shape}")
        return apply_padded(lambda x: self._fn(self._state, x), images, batch).astype(np.float64)

    def predict(self, images: np.ndarray, batch: int = 256) -> np.ndarray:
        """images: uint8 [N, H, W, C] -> the predicted target (class, or pseudo-class) int32 [N]."""
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4:
            raise DDMError(f"classifier needs uint8 images [N, H, W, C], got {images.dtype} {images.shape}")
        return apply_padded(lambda x: self._predict(self._state, x), images, batch).astype(np.int32)


# ---------------------------------------------------------------------------------------------------------
# Cache keys, training, loading.
# ---------------------------------------------------------------------------------------------------------


def canonical_order(images: np.ndarray) -> np.ndarray:
    """Indices that sort images [N, H, W, C] uint8 by their SHA-256: the same set in any order gives one order."""
    digests = [hashlib.sha256(np.ascontiguousarray(im).tobytes()).digest() for im in images]
    return np.array(sorted(range(len(images)), key=digests.__getitem__), np.int64)


def cache_key(fingerprint: str, train_sha: str, cfg: FeatureNetConfig) -> str:
    # not `documents.digest` (its compact separators): the key names cached feature nets, which must keep theirs
    config_sha = hashlib.sha256(json.dumps({"version": NET_VERSION, **cfg.key_fields()},
                                           sort_keys=True).encode()).hexdigest()
    return f"{fingerprint[:16]}-{train_sha[:8]}-{config_sha[:8]}"


def run_training_set(run: Run) -> tuple[np.ndarray, np.ndarray | None]:
    """The union of a run's training shards in canonical order: (images uint8 [N, H, W, C], their class labels
    int32 [N], or None for unlabelled data)."""
    paths = run.shard_paths()
    images = np.concatenate([read_shard(path) for path in paths])
    labels = [read_labels(path) for path in paths]
    classes = np.concatenate(labels) if all(label is not None for label in labels) else None
    order = canonical_order(images)
    return images[order], None if classes is None else classes[order]


def run_training_images(run: Run) -> np.ndarray:
    """The union of a run's training shards in canonical order: uint8 [N, H, W, C]."""
    return run_training_set(run)[0]


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _load(directory: Path, image_shape: tuple[int, int, int], cfg: FeatureNetConfig, key: str,
          trained: bool) -> FeatureNet | None:
    """The net stored in `directory` if its info.json names `key`; None if absent. SHA-256 mismatch: DDMError."""
    info_path = directory / INFO
    if not info_path.is_file():
        return None
    info = json.loads(info_path.read_text())
    if info.get("key") != key:
        return None
    outputs = info.get("outputs", cfg.pseudo_k)
    model = load_pinned(directory / "final", info["sha256"],
                        functools.partial(make_encoder, image_shape, cfg, outputs), f"feature net {key}")
    return FeatureNet(name=info["name"], sha256=info["sha256"], key=key, info=info, trained=trained, model=model)


def _pseudo_classes(images: np.ndarray, cfg: FeatureNetConfig, key: str) -> np.ndarray:
    """k-means (`pseudo_k`) on PCA-`pca_dim` of the pixels: int32 [N] pseudo-class of each image."""
    if cfg.pseudo_k > len(images):
        raise DDMError(f"feature net: pseudo_k={cfg.pseudo_k} is larger than the {len(images)} training images")
    logger.info(f"feature net {key}: k-means into {cfg.pseudo_k} pseudo-classes on PCA-{cfg.pca_dim} of {len(images)} images")
    pixels = to_model_range(images.reshape(len(images), -1))
    result = kmeans(pca(pixels, cfg.pca_dim, cfg.seed), cfg.pseudo_k, seed=cfg.seed, max_iter=100, tol=1e-4)
    return np.asarray(result.labels, np.int32)


def _train(directory: Path, images: np.ndarray, targets: np.ndarray, outputs: int, name: str,
           cfg: FeatureNetConfig, key: str, meta: dict) -> None:
    """Trains the net to predict targets int32 [N] in [0, outputs) from images: one shard per target class,
    the shared Trainer; writes info.json last."""
    paths, ids = [], []
    for j in range(outputs):
        if not (targets == j).any():  # a class absent from the training images: no shard, never a target
            continue
        path = str(directory / "shards" / f"class_{j}")
        write_shard(path, images[targets == j])
        paths.append(path)
        ids.append(j)
    train = cfg.train_config()
    reader = ShardReader(paths, batch_size=train.batch_size, seed=train.seed, cluster_ids=ids)
    task = Task(name=name, make_model=functools.partial(make_encoder, tuple(images.shape[1:]), cfg, outputs),
                loss=classifier_loss, reader=reader, out_dir=directory,
                meta={"featurenet": dataclasses.asdict(cfg), "key": key})
    result = Trainer(task, train).run()
    rows = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines() if line.strip()]
    info = {"name": name, "version": NET_VERSION, "key": key, "sha256": result.ema_sha256,
            "config": dataclasses.asdict(cfg), "image_shape": list(images.shape[1:]), "outputs": outputs,
            "num_train_images": len(images), "pseudo_class_sizes": np.bincount(targets, minlength=outputs).tolist(),
            "final_train_accuracy": rows[-1].get("accuracy") if rows else None,
            # the weights follow the machine (XLA:CPU compiles per instruction set): say which one trained them
            "trained_in": replay_environment(), **meta}
    documents.write(directory / INFO, info)


def _copy_into_run(src: Path, dst: Path) -> None:
    """Copies the pinned final weights + info.json (not checkpoints or shards) into `dst`."""
    tmp = dst.with_name(dst.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    shutil.copytree(src / "final", tmp / "final")
    shutil.copy2(src / INFO, tmp / INFO)
    if dst.exists():
        shutil.rmtree(dst)
    tmp.rename(dst)


def get_featurenet(run: Run | str | Path, *, cfg: FeatureNetConfig | None = None,
                   cache_dir: str | Path | None = None) -> FeatureNet:
    """The feature network of a run's dataset: from RUN/eval/featurenet, else the cache, else trained now.

    Whichever source it comes from, its parameters are checked against the SHA-256 in info.json, and the
    run directory ends up holding a copy (RUN/eval/featurenet/{info.json,final}).
    """
    cfg = dataclasses.replace(cfg or FeatureNetConfig(), targets="kmeans")
    return _get(run if isinstance(run, Run) else Run.open(run), cfg, cache_dir, "featurenet")


def get_classifier(run: Run | str | Path, *, cfg: FeatureNetConfig | None = None,
                   cache_dir: str | Path | None = None) -> FeatureNet:
    """The class classifier of a labelled run's dataset (`predict(images)` -> class), the feature net's
    architecture and training on the true labels; from RUN/eval/classifier, else the cache, else trained now,
    pinned like the feature net. DDMError for unlabelled data."""
    run = run if isinstance(run, Run) else Run.open(run)
    if not run.num_classes:
        raise DDMError(f"run {run.root} has no class labels to train a classifier on")
    return _get(run, dataclasses.replace(cfg or FeatureNetConfig(), targets="classes"), cache_dir, "classifier")


def _get(run: Run, cfg: FeatureNetConfig, cache_dir: str | Path | None, folder: str) -> FeatureNet:
    image_shape = run.image_shape
    images, classes = run_training_set(run)
    train_sha = images_sha256(images)
    if cfg.targets == "classes":
        if classes is None:
            raise DDMError(f"the training shards of {run.root} have no class labels")
        outputs, name = run.num_classes, f"cls{run.num_classes}-cnn"
        # The targets are part of the training set: other labels on the same images are another net.
        train_sha = hashlib.sha256((train_sha + labels_fingerprint(classes, run.class_names)).encode()).hexdigest()
    else:
        outputs, name = cfg.pseudo_k, cfg.name
    key = cache_key(run.dataset["fingerprint"], train_sha, cfg)
    in_run = run.eval_dir / folder
    net = _load(in_run, image_shape, cfg, key, trained=False)
    if net is not None:
        logger.info(f"{folder} {net.name} {key}: from {in_run} (sha256 {net.sha256[:16]})")
        return net
    cached = Path(cache_dir or default_cache_dir()) / "featurenet" / key
    with _lock(cached.parent / f"{key}.lock"):
        net = _load(cached, image_shape, cfg, key, trained=False)
        if net is None:
            meta = {"dataset_fingerprint": run.dataset["fingerprint"], "train_set_sha256": train_sha,
                    "source": run.dataset.get("source")}
            targets = classes if cfg.targets == "classes" else _pseudo_classes(images, cfg, key)
            _train(cached, images, targets, outputs, name, cfg, key, meta)
            net = _load(cached, image_shape, cfg, key, trained=True)
            logger.info(f"{folder} {net.name} {key}: trained, sha256 {net.sha256[:16]}, "
                f"train accuracy {net.info.get('final_train_accuracy') or 0:.2f}")
        else:
            logger.info(f"{folder} {net.name} {key}: from cache {cached} (sha256 {net.sha256[:16]})")
        _copy_into_run(cached, in_run)
    return net
