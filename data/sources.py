"""Dataset sources: everything becomes canonical uint8 images [N, H, W, C], plus class labels when the source
has them.

uint8 is the storage format (shards, fingerprints, hashes); models see float32 in [-1, 1] through
`ddm.core.images.to_model_range`. Supported sources, and where their class labels come from
(`data.labels: auto` uses them when present, `none` ignores them):
- `digits`: scikit-learn's 8x8 digits (1,797 images, shipped with scikit-learn, no download); labels: the
  digit (10 classes);
- a `.npz` / `.npy` file holding [N, H, W] or [N, H, W, C] (uint8, or floats in [0, 1] / [-1, 1] / [0, 255]);
  labels: a `labels` (else `y`) array of the .npz, or the array `data.label_column` names;
- an image folder or a `.parquet` file, decoded through Hugging Face `datasets`; labels: the class subfolders
  of a folder (`datasets`' image-folder label feature), the `data.label_column` column (default `label`) of a
  parquet file;
- `hf:<name>`: any `datasets` hub dataset (needs network on the user's machine); labels as for parquet.

Labels are integers (class i is label i, names "0", "1", ... unless the source names them) or strings (the
sorted distinct strings become the class names). Anything else, a count that differs from the images', a
negative label or more than `MAX_CLASSES` classes is a one-line DDMError.

Condition embeddings (`data.conditions`, docs/conditioning.md) replace class labels: float16 / float32 [N, D]
(pooled) or [N, L, D] (tokens), one row per image of the source (N before `limit` and `exclude_classes`, whose
rows they then follow), from a .npy, a .npz array (`data.conditions_key`, default "conditions"), a parquet
column of lists (the same key), or "captions" (the digits' generated captions, `ddm.data.captions`). A run with
them reads no class labels. Another dtype or rank, another N, or a NaN / Inf value (a NaN row is the null
condition) is a one-line DDMError.
"""

from __future__ import annotations

import io
import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ddm.core.config import MAX_CLASSES, DataConfig
from ddm.core.errors import DDMError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
# Files an image folder may hold besides images (Hugging Face imagefolder metadata, docs).
FOLDER_SIDE_FILES = {"metadata.csv", "metadata.jsonl", "metadata.parquet", "readme.md", "license", ".ds_store"}


# npz arrays taken as class labels when data.label_column is not set, in this order.
NPZ_LABEL_KEYS = ("labels", "y")
DEFAULT_LABEL_COLUMN = "label"


# npz arrays taken as latents (data.kind=latents) when data.array_key is not set, in this order.
NPZ_LATENT_KEYS = ("latents", "data")
LATENT_DTYPES = ("float16", "float32")
CHECK_CHUNK_BYTES = 64 << 20  # latents are checked for NaN / Inf a block of rows at a time
CONDITION_DTYPES = ("float16", "float32")
DEFAULT_CONDITIONS_KEY = "conditions"  # the .npz array / parquet column of condition embeddings


class NpyRows:
    """A .npy array read a block of rows at a time with plain file reads (no memory map: a map keeps every page
    it touched in the process's resident memory). Supports `len`, `shape`, `dtype`, `ndim` and indexing along
    the first axis (slices with step 1, integer index arrays), returning numpy arrays."""

    def __init__(self, path: Path, rows: int | None = None):
        mapped = np.load(path, mmap_mode="r", allow_pickle=False)
        self.path, self.dtype, self.offset = path, mapped.dtype, mapped.offset
        if not mapped.flags.c_contiguous:
            raise DDMError(f"{path} is stored in Fortran order; save it C-ordered")
        self.shape = (len(mapped) if rows is None else min(rows, len(mapped)), *mapped.shape[1:])
        self.ndim = mapped.ndim
        self.row_items = int(np.prod(self.shape[1:]))
        del mapped

    def __len__(self) -> int:
        return self.shape[0]

    def _read(self, f, start: int, count: int) -> np.ndarray:
        f.seek(self.offset + start * self.row_items * self.dtype.itemsize)
        out = np.fromfile(f, self.dtype, count=count * self.row_items)
        return out.reshape(count, *self.shape[1:])

    def __getitem__(self, index) -> np.ndarray:
        with open(self.path, "rb") as f:
            if isinstance(index, slice):
                start, stop, step = index.indices(len(self))
                if step != 1:
                    raise IndexError("NpyRows slices must have step 1")
                return self._read(f, start, max(0, stop - start))
            index = np.asarray(index, np.int64)
            if index.size and (index.min() < 0 or index.max() >= len(self)):
                raise IndexError(f"row index out of range [0, {len(self)})")
            out = np.empty((len(index), *self.shape[1:]), self.dtype)
            # one read per run of consecutive rows
            breaks = np.flatnonzero(np.diff(index) != 1) + 1
            for run in np.split(np.arange(len(index)), breaks) if len(index) else []:
                out[run[0]:run[-1] + 1] = self._read(f, int(index[run[0]]), len(run))
            return out


@dataclass(frozen=True)
class Dataset:
    """Canonical images, their class labels if the source has them, and where they came from."""

    images: np.ndarray  # [N, H, W, C] uint8, or float16 / float32 latents (may be memory-mapped: read in chunks)
    source: str
    labels: np.ndarray | None = None  # [N] int32 in [0, num_classes), same order as images; None: unlabelled
    class_names: list[str] | None = None  # [num_classes]: class i is class_names[i]; None: unlabelled
    # [N, D] or [N, L, D] float16 / float32 condition embeddings, same order as images (may be read a block of
    # rows at a time: `NpyRows`); None: none. A dataset with them has no labels.
    conditions: np.ndarray | NpyRows | None = None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.images.shape[1:])

    @property
    def condition_shape(self) -> tuple[int, ...]:
        """One image's condition embedding: (D,), (L, D), or () without conditions."""
        return () if self.conditions is None else tuple(int(s) for s in self.conditions.shape[1:])

    @property
    def num_classes(self) -> int:
        """Number of classes (0 for unlabelled data)."""
        return 0 if self.class_names is None else len(self.class_names)


# What a loader returns: images [N, H, W, C] uint8, labels [N] (any dtype, checked by `class_labels`) or None,
# class names the source declares (e.g. a `datasets.ClassLabel`) or None.
Loaded = tuple[np.ndarray, np.ndarray | None, list[str] | None]
# A loader that decodes only the first `data.limit` rows adds how many rows the source has.
Decoded = tuple[np.ndarray, np.ndarray | None, list[str] | None, int]


def load_dataset(cfg: DataConfig, base_dir: Path | None = None) -> Dataset:
    """Loads `cfg.source` (with its class labels, unless `cfg.labels == "none"`), applies `limit` and
    `image_size`, and checks the result.

    Relative paths are resolved against `base_dir` (the config file's repo) and then the working directory.
    """
    if cfg.kind == "latents":
        return _load_latents(cfg, base_dir)
    source = cfg.source
    source_rows = None  # rows of a source whose loader decoded only the first data.limit
    if source == "digits":
        images, labels, names = _load_digits(cfg)
    elif source.startswith("hf:"):
        images, labels, names, source_rows = _load_hf(source[3:], cfg, sized=cfg.image_size)
    else:
        path = _resolve(source, base_dir)
        if path.is_dir():
            images, labels, names = _load_image_folder(path, cfg)
        elif path.suffix in (".npz", ".npy"):
            images, labels, names = _load_array_file(path, cfg)
        elif path.suffix == ".parquet":
            images, labels, names, source_rows = _load_parquet(path, cfg)
        else:
            raise DDMError(f"data source {path} is not a folder, .npz, .npy or .parquet file")
        source = str(path)
    conditions = None
    if cfg.conditions is not None:
        conditions = load_conditions(cfg, len(images) if source_rows is None else source_rows, base_dir,
                                     digits=(images, labels) if source == "digits" else None)
    class_names = None
    labelled = labels is not None and cfg.labels != "none"
    if labelled and (conditions is None or cfg.exclude_classes):  # with conditions, only to choose the rows
        labels, class_names = class_labels(labels, names, len(images), f"{source} labels")
    else:
        labels = None
    rows = np.arange(len(images))  # the source rows kept, in order (the loader's first len(images))
    if cfg.exclude_classes:
        keep = kept_rows(labels, class_names, cfg.exclude_classes, source)
        images, labels, rows = images[keep], labels[keep], rows[keep]
    if cfg.limit is not None:
        images, rows = images[: cfg.limit], rows[: cfg.limit]
        labels = None if labels is None else labels[: cfg.limit]
    if cfg.image_size is not None and images.shape[1:3] != (cfg.image_size, cfg.image_size):
        images = np.stack([_resize_square(img, cfg.image_size) for img in images]) if len(images) else images
    if len(images) == 0:
        raise DDMError(f"data source {source} holds no images")
    if conditions is not None:
        conditions = _rows_of(conditions, rows)
        labels, class_names = _without_labels(labelled, source)
    return Dataset(images=np.ascontiguousarray(images), source=source, labels=labels, class_names=class_names,
                   conditions=conditions)


def _rows_of(conditions: np.ndarray | NpyRows, rows: np.ndarray) -> np.ndarray | NpyRows:
    """conditions[rows] for sorted source rows; a leading run of every row keeps a `NpyRows` unread."""
    if len(rows) == len(conditions) or (len(rows) and rows[-1] == len(rows) - 1):
        if isinstance(conditions, NpyRows):
            return NpyRows(conditions.path, len(rows))
        return conditions[: len(rows)]
    return np.ascontiguousarray(conditions[rows])


def _without_labels(labelled: bool, source: str) -> tuple[None, None]:
    """A run conditioned on embeddings reads no class labels (they may have chosen the rows: exclude_classes)."""
    logger.info("data.conditions: the models are conditioned on condition embeddings"
                + (f"; the class labels of {source} are not used" if labelled else ""))
    return None, None


def load_conditions(cfg: DataConfig, n: int, base_dir: Path | None = None,
                    digits: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray | NpyRows:
    """The condition embeddings `cfg.conditions` names for a source of `n` rows, checked (`check_conditions`):
    float16 / float32 [n, D] or [n, L, D]. A .npy is read a block of rows at a time (`NpyRows`), anything else
    whole. digits: the digits' (images, classes) when the source is `digits` (for "captions")."""
    from ddm.data import captions

    if cfg.conditions == captions.CAPTIONS:
        if digits is None or cfg.kind != "images":
            raise DDMError(f"data.conditions={captions.CAPTIONS!r} captions the built-in digits only "
                           f"(data.source: digits), not {cfg.source}")
        return check_conditions(captions.digit_conditions(*digits), n, "the digits' captions")
    path = Path(cfg.conditions).expanduser()
    if not path.is_absolute() and not path.exists() and base_dir is not None and (base_dir / path).exists():
        path = base_dir / path
    if not path.is_file():
        raise DDMError(f"data.conditions file not found: {cfg.conditions}")
    key = cfg.conditions_key or DEFAULT_CONDITIONS_KEY
    what = f"condition embeddings {path}"
    if path.suffix == ".npy":
        try:
            conditions = NpyRows(path)
        except _UNREADABLE as err:
            raise DDMError(f"cannot read {what}: {str(err).splitlines()[0]}") from None
    elif path.suffix == ".npz":
        what = f"condition embeddings {path}[{key}]"
        try:
            with np.load(path, allow_pickle=False) as loaded:
                if key not in loaded.files:
                    raise DDMError(f"{path} has no array {key!r} (arrays: {loaded.files}); set data.conditions_key")
                conditions = loaded[key]
        except _UNREADABLE as err:
            raise DDMError(f"cannot read {what}: {str(err).splitlines()[0]}") from None
    elif path.suffix == ".parquet":
        what = f"condition embeddings {path} column {key!r}"
        conditions = _parquet_conditions(path, key)
    else:
        raise DDMError(f"data.conditions={cfg.conditions!r} is not 'captions' or a .npy, .npz or .parquet file")
    return check_conditions(conditions, n, what)


def _parquet_conditions(path: Path, column: str) -> np.ndarray:
    """A parquet column of equal-length lists (of lists) of floats -> [N, D] or [N, L, D] in the stored float
    type (float16 for halffloat, float32 for float, float64 for double: refused by `check_conditions`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
        if column not in schema.names:
            raise DDMError(f"{path} has no column {column!r} (columns: {schema.names}); set data.conditions_key")
        values = pq.read_table(path, columns=[column]).column(column).combine_chunks()
    except (OSError, pa.ArrowException) as err:
        raise DDMError(f"cannot read parquet file {path}: {str(err).splitlines()[0]}") from None
    shape = [len(values)]
    while pa.types.is_list(values.type) or pa.types.is_large_list(values.type) or \
            pa.types.is_fixed_size_list(values.type):
        if values.null_count:
            raise DDMError(f"{path} column {column!r} has an empty cell")
        lengths = np.asarray(values.value_lengths()) if len(values) else np.zeros(0, np.int64)
        if len(lengths) and (lengths != lengths[0]).any():
            bad = int(np.argmax(lengths != lengths[0]))
            raise DDMError(f"{path} column {column!r} holds lists of different lengths ({lengths[0]} and "
                           f"{lengths[bad]}): condition embeddings have one shape")
        shape.append(int(lengths[0]) if len(lengths) else 0)
        values = values.flatten()
    if values.null_count:
        raise DDMError(f"{path} column {column!r} has an empty value")
    if not (pa.types.is_floating(values.type) or pa.types.is_integer(values.type)):
        raise DDMError(f"{path} column {column!r} holds {values.type}; condition embeddings are lists of floats")
    return values.to_numpy(zero_copy_only=False).reshape(shape)


def check_conditions(conditions: np.ndarray | NpyRows, n: int, what: str) -> np.ndarray | NpyRows:
    """Condition embeddings must be float16 / float32 [n, D] or [n, L, D] with D, L >= 1 and only finite values
    (a row of NaN is the null condition, so NaN in the data would be read as "no condition"); checked a block of
    rows at a time. Returns them unchanged; DDMError (one line) otherwise."""
    if conditions.ndim not in (2, 3) or 0 in conditions.shape[1:]:
        raise DDMError(f"{what} have shape {list(conditions.shape)}; expected [N, D] (pooled) or [N, L, D] (tokens)")
    if conditions.dtype.name not in CONDITION_DTYPES:
        raise DDMError(f"{what} hold {conditions.dtype.name} values; condition embeddings must be float16 or float32")
    if len(conditions) != n:
        raise DDMError(f"{what} have {len(conditions)} rows but the data source has {n} images (one row per image, "
                       "before data.limit / data.exclude_classes)")
    rows = max(1, CHECK_CHUNK_BYTES // max(1, int(np.prod(conditions.shape[1:])) * conditions.dtype.itemsize))
    for start in range(0, len(conditions), rows):
        block = np.asarray(conditions[start:start + rows])
        bad = ~np.isfinite(block).reshape(len(block), -1).all(axis=1)
        if bad.any():
            raise DDMError(f"{what} contain NaN or Inf (first at row {start + int(np.argmax(bad))}): NaN is reserved "
                           "for the null condition")
    return conditions


def kept_rows(labels: np.ndarray | None, class_names: list[str] | None, exclude: tuple[int, ...],
              source: str) -> np.ndarray:
    """int64 [M] sorted indices of the rows whose class is not in `exclude` (`data.exclude_classes`); DDMError for
    unlabelled data or a class index the source does not have. The classes themselves stay in `class_names`."""
    if labels is None:
        raise DDMError(f"data.exclude_classes={list(exclude)} needs class labels, and {source} is read without any")
    missing = [c for c in exclude if c >= len(class_names)]
    if missing:
        raise DDMError(f"data.exclude_classes names class {missing[0]}, but {source} has classes "
                       f"0..{len(class_names) - 1}")
    return np.flatnonzero(~np.isin(labels, np.asarray(exclude, np.int64)))


def class_labels(values, names: list[str] | None, n: int, what: str) -> tuple[np.ndarray, list[str]]:
    """Source labels -> (int32 [n] in [0, num_classes), class names [num_classes]).

    values: [n] integers (class i = label i; `names`, if given, name them) or strings (sorted distinct strings
    become the classes). Integral floats count as integers. DDMError for anything else.
    """
    values = np.asarray(values)
    if values.ndim != 1 or len(values) != n:
        raise DDMError(f"{what}: {len(values) if values.ndim == 1 else values.shape} labels for {n} images")
    if n == 0:
        return values.astype(np.int32), list(names or [])
    if values.dtype.kind in "US" or (values.dtype == object and all(isinstance(v, str) for v in values)):
        distinct = sorted({str(v) for v in values})
        if len(distinct) > MAX_CLASSES:
            raise DDMError(f"{what}: {len(distinct):,} distinct labels, more than {MAX_CLASSES:,} classes")
        index = {name: i for i, name in enumerate(distinct)}
        return np.array([index[str(v)] for v in values], np.int32), distinct
    if values.dtype.kind not in "iuf":
        raise DDMError(f"{what} are {values.dtype} ({values[0]!r}, ...); expected integers or strings")
    if values.dtype.kind == "f":
        bad = ~np.isfinite(values) | (values != np.rint(values))
        if bad.any():
            raise DDMError(f"{what} are not integers (row {int(np.argmax(bad))}: {float(values[bad][0]):g})")
    if values.min() < 0:
        raise DDMError(f"{what} include a negative label ({values.min():g} at row {int(np.argmin(values))})")
    if values.max() >= MAX_CLASSES:
        raise DDMError(f"{what} go up to {values.max():g}: more than {MAX_CLASSES:,} classes")
    labels = values.astype(np.int32)
    num_classes = int(labels.max()) + 1
    if names is not None:
        if num_classes > len(names):
            raise DDMError(f"{what} go up to {num_classes - 1} but the source names {len(names)} classes")
        return labels, [str(name) for name in names]
    return labels, [str(i) for i in range(num_classes)]


def _no_label_column(cfg: DataConfig, source: str) -> None:
    """data.label_column names labels that only .npz, parquet and hf: sources can hold."""
    if cfg.label_column is not None:
        raise DDMError(f"data.label_column={cfg.label_column!r} does not apply to {source}: only .npz, parquet "
                       "and hf: sources have label columns")


def _resolve(source: str, base_dir: Path | None) -> Path:
    path = Path(source).expanduser()
    candidates = [path] if path.is_absolute() else [Path.cwd() / path] + ([base_dir / path] if base_dir else [])
    for candidate in candidates:
        if candidate.exists():
            return candidate.resolve()
    raise DDMError(f"data source not found: {source}")


def _load_digits(cfg: DataConfig) -> Loaded:
    from sklearn.datasets import load_digits

    _no_label_column(cfg, "digits")
    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]  # from [1797, 8, 8] in 0..16
    return images, digits.target, [str(name) for name in digits.target_names]


def _as_uint8(array: np.ndarray, what: str) -> np.ndarray:
    """Numeric image array -> uint8 [N, H, W, C], mapping float ranges [0,1], [-1,1], [0,255]."""
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4 or array.shape[-1] not in (1, 3, 4):
        raise DDMError(f"{what} has shape {array.shape}; expected [N, H, W] or [N, H, W, C] with C in 1, 3, 4")
    if array.dtype == np.uint8:
        return array
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise DDMError(f"{what} has dtype {array.dtype}; expected numbers")
    array = array.astype(np.float64)
    bad = ~np.isfinite(array)
    if bad.any():
        rows = int(bad.reshape(len(array), -1).any(axis=1).sum())
        raise DDMError(f"{what} contains NaN or Inf values in {rows} image(s)")
    lo, hi = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
    if lo >= 0.0 and hi <= 1.0:
        array = array * 255.0
    elif lo >= -1.0 and hi <= 1.0:
        array = (array + 1.0) * 127.5
    elif lo < 0.0 or hi > 255.0:
        raise DDMError(f"{what} has values in [{lo:g}, {hi:g}]; expected [0, 1], [-1, 1] or [0, 255]")
    return np.rint(array).astype(np.uint8)


# What a damaged .npy / .npz raises from numpy or zipfile: a truncated zip, a bad CRC, a short read.
_UNREADABLE = (OSError, ValueError, EOFError, zipfile.BadZipFile)


def _load_array_file(path: Path, cfg: DataConfig) -> Loaded:
    try:
        return _read_array_file(path, cfg)
    except _UNREADABLE as err:
        raise DDMError(f"cannot read array file {path}: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
                       ) from None


def _read_array_file(path: Path, cfg: DataConfig) -> Loaded:
    loaded = np.load(path, allow_pickle=False)
    if isinstance(loaded, np.ndarray):
        _no_label_column(cfg, f"{path} (a .npy holds one array: use a .npz with a labels array)")
        return _as_uint8(loaded, str(path)), None, None
    with loaded:
        keys = list(loaded.keys())
        if cfg.label_column is not None and cfg.label_column not in keys:
            raise DDMError(f"{path} has no array {cfg.label_column!r} for data.label_column (arrays: {keys})")
        label_key = cfg.label_column or next((k for k in NPZ_LABEL_KEYS if k in keys), None)
        key = cfg.array_key
        if key is None:
            candidates = [k for k in keys if k != label_key and k not in NPZ_LABEL_KEYS]
            key = next((k for k in ("data", "images", "x") if k in candidates),
                       candidates[0] if len(candidates) == 1 else None)
        if key not in keys:
            raise DDMError(f"{path} has arrays {keys}; set data.array_key to choose one")
        images = _as_uint8(loaded[key], f"{path}[{key}]")  # reads (and CRC-checks) the array now
        labels = loaded[label_key] if label_key is not None and cfg.labels != "none" else None
        return images, labels, None


def _pil_to_array(image, name: str) -> np.ndarray:
    """A PIL image -> uint8 [H, W, C]; grayscale stays C=1, palettes/alpha become RGB(A)."""
    if image.mode in ("L", "1", "I", "I;16", "F"):
        array = np.asarray(image.convert("L"))[..., None]
    elif image.mode == "RGBA":
        array = np.asarray(image)
    else:
        array = np.asarray(image.convert("RGB"))
    if array.ndim != 3:
        raise DDMError(f"image {name} could not be decoded to [H, W, C]")
    return array


def _stack(arrays: list[np.ndarray], names: list[str], size: int | None, source: str) -> np.ndarray:
    if size is not None:
        arrays = [_resize_square(a, size) for a in arrays]
    if not arrays:
        return np.zeros((0, 1, 1, 1), np.uint8)
    first = arrays[0].shape
    for array, name in zip(arrays, names):
        if array.shape != first:
            raise DDMError(
                f"{source}: image {name} has shape {array.shape} but {names[0]} has {first}; set data.image_size"
            )
    return np.stack(arrays)


def _resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """Resize the shorter side to `size` (bicubic) and center-crop. image: [H, W, C] uint8."""
    from PIL import Image

    h, w, c = image.shape
    pil = Image.fromarray(image[..., 0] if c == 1 else image)
    scale = size / min(h, w)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    pil = pil.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    out = np.asarray(pil.crop((left, top, left + size, top + size)))
    return out[..., None] if out.ndim == 2 else out


def _check_folder(path: Path) -> list[Path]:
    """Every file in an image folder must be a readable image; names the first that is not."""
    from PIL import Image, UnidentifiedImageError

    files = sorted(p for p in path.rglob("*") if p.is_file())
    images = []
    for file in files:
        if file.name.lower() in FOLDER_SIDE_FILES:
            continue
        if file.suffix.lower() not in IMAGE_SUFFIXES:
            raise DDMError(f"image folder {path} holds a non-image file: {file}")
        try:
            with Image.open(file) as img:
                img.verify()
        except (UnidentifiedImageError, OSError, SyntaxError) as err:
            raise DDMError(f"unreadable image file {file}: {err}") from None
        images.append(file)
    if not images:
        raise DDMError(f"image folder {path} holds no images")
    return images


def _load_image_folder(path: Path, cfg: DataConfig) -> Loaded:
    _no_label_column(cfg, f"image folder {path} (its class subfolders are the labels)")
    files = _check_folder(path)
    import datasets

    ds = datasets.load_dataset("imagefolder", data_dir=str(path), split="train")
    # imagefolder orders files itself; decode and report by its own order.
    names = [str(f) for f in files] if len(files) == len(ds) else [f"#{i}" for i in range(len(ds))]
    arrays = [_pil_to_array(row["image"], name) for row, name in zip(ds, names)]
    images = _stack(arrays, names, cfg.image_size, str(path))
    # Class subfolders become a ClassLabel feature named "label"; a flat folder has none.
    feature = ds.features.get(DEFAULT_LABEL_COLUMN)
    if cfg.labels == "none" or not isinstance(feature, datasets.ClassLabel):
        return images, None, None
    return images, np.asarray(ds.select_columns([DEFAULT_LABEL_COLUMN])[:][DEFAULT_LABEL_COLUMN]), feature.names


def _decode_cell(cell, name: str) -> np.ndarray:
    from PIL import Image

    if isinstance(cell, dict) and cell.get("bytes") is not None:
        try:
            return _pil_to_array(Image.open(io.BytesIO(cell["bytes"])), name)
        except OSError as err:
            raise DDMError(f"unreadable image {name}: {err}") from None
    if hasattr(cell, "convert"):  # already a PIL image
        return _pil_to_array(cell, name)
    array = np.asarray(cell)
    if array.ndim == 2:
        array = array[..., None]
    return _as_uint8(array[None], name)[0]


def _row_labels(rows, cfg: DataConfig, source: str, n: int) -> tuple[np.ndarray | None, list[str] | None]:
    """The first n rows' labels from `data.label_column` (default "label", used only when present)."""
    import datasets

    if cfg.labels == "none":
        return None, None
    column = cfg.label_column or DEFAULT_LABEL_COLUMN
    if column not in rows.column_names:
        if cfg.label_column is not None:
            raise DDMError(f"{source} has no label column {column!r} (columns: {rows.column_names}); "
                           "set data.label_column, or data.labels=none")
        return None, None
    feature = rows.features[column]
    names = feature.names if isinstance(feature, datasets.ClassLabel) else None
    values = rows.select_columns([column])[:n][column]
    if any(v is None for v in values):
        raise DDMError(f"{source} label column {column!r} has an empty cell (row {values.index(None)})")
    return np.asarray(values), names


def _decode_rows(rows, cfg: DataConfig, source: str, sized: int | None) -> Loaded:
    column = cfg.image_column
    if column not in rows.column_names:
        raise DDMError(f"{source} has no column {column!r} (columns: {rows.column_names}); set data.image_column")
    n = len(rows) if cfg.limit is None else min(len(rows), cfg.limit)
    labels, label_names = _row_labels(rows, cfg, source, n)
    return _decode_images(rows, n, column, source, sized), labels, label_names


def _decode_images(rows, n: int, column: str, source: str, sized: int | None) -> np.ndarray:
    names = [f"{source} row {i}" for i in range(n)]
    cells = [rows[i][column] for i in range(n)]
    if cells and not any(isinstance(c, dict) or hasattr(c, "convert") for c in cells):
        # Plain numeric arrays: infer the value range ([0, 1], [-1, 1], [0, 255]) over the whole column, not per
        # image, or a [-1, 1] image whose values happen to lie in [0, 1] would be mapped differently.
        raw = [np.asarray(c) for c in cells]
        raw = [a[..., None] if a.ndim == 2 else a for a in raw]
        if len({a.shape for a in raw}) == 1:
            images = _as_uint8(np.stack(raw), f"{source} column {column!r}")
            return _stack(list(images), names, sized, source)
    arrays = [_decode_cell(cell, name) for cell, name in zip(cells, names)]
    return _stack(arrays, names, sized, source)


def _load_parquet(path: Path, cfg: DataConfig) -> Decoded:
    import datasets

    try:
        rows = datasets.load_dataset("parquet", data_files=str(path), split="train")
    except Exception as err:  # noqa: BLE001 - datasets raises many types for a bad file
        raise DDMError(f"cannot read parquet file {path}: {str(err).splitlines()[0]}") from None
    if cfg.image_column in rows.column_names:
        rows = rows.cast_column(cfg.image_column, datasets.Image(decode=False)) if _is_image_column(rows, cfg) else rows
    return (*_decode_rows(rows, cfg, str(path), cfg.image_size), len(rows))


def _is_image_column(rows, cfg: DataConfig) -> bool:
    import datasets

    feature = rows.features[cfg.image_column]
    return isinstance(feature, datasets.Image) or (isinstance(feature, dict) and "bytes" in feature)


def _load_hf(name: str, cfg: DataConfig, sized: int | None) -> Decoded:
    import datasets

    try:
        rows = datasets.load_dataset(name, split=cfg.split)
    except Exception as err:  # noqa: BLE001 - network, auth and missing-dataset errors all land here
        raise DDMError(f"cannot load Hugging Face dataset {name!r}: {str(err).splitlines()[0]}") from None
    return (*_decode_rows(rows, cfg, f"hf:{name}", sized), len(rows))


def _load_latents(cfg: DataConfig, base_dir: Path | None) -> Dataset:
    """Latents [N, h, w, c] float16 / float32 from a .npy (memory-mapped: nothing is read until used) or a .npz
    (key `latents`, else `data`, or `data.array_key`; labels as for images). Values are kept exactly."""
    path = _resolve(cfg.source, base_dir)
    if path.suffix not in (".npy", ".npz"):
        raise DDMError(f"latents come from a .npy or .npz file, not {path}")
    if cfg.image_size is not None:
        raise DDMError("config data.image_size resizes images; latents are used at their stored size")
    labels = names = None
    try:
        if path.suffix == ".npy":
            _no_label_column(cfg, f"{path} (a .npy holds one array: use a .npz with a labels array)")
            latents = NpyRows(path)
        else:
            with np.load(path, allow_pickle=False) as loaded:
                keys = list(loaded.keys())
                if cfg.label_column is not None and cfg.label_column not in keys:
                    raise DDMError(f"{path} has no array {cfg.label_column!r} for data.label_column (arrays: {keys})")
                key = cfg.array_key or next((k for k in NPZ_LATENT_KEYS if k in keys), None)
                if key not in keys:
                    raise DDMError(f"{path} has arrays {keys} but no 'latents' or 'data'; set data.array_key")
                latents = loaded[key]
                label_key = cfg.label_column or next((k for k in NPZ_LABEL_KEYS if k in keys), None)
                if label_key is not None and cfg.labels != "none":
                    labels = loaded[label_key]
    except ValueError as err:  # object arrays (ragged latents) need pickle, which is refused
        raise DDMError(f"cannot read latents from {path}: {str(err).splitlines()[0]} (ragged or object array?)") from None
    except OSError as err:
        raise DDMError(f"cannot read latents from {path}: {err}") from None
    latents = check_latents(latents, str(path))
    conditions = None if cfg.conditions is None else load_conditions(cfg, len(latents), base_dir)
    labelled = labels is not None
    if conditions is not None and not cfg.exclude_classes:
        labels = None  # with conditions, class labels only choose the rows
    class_names = None
    if labels is not None:
        labels, class_names = class_labels(labels, names, len(latents), f"{path} labels")
    rows = np.arange(len(latents))
    if cfg.exclude_classes:  # the kept rows are read into memory
        rows = kept_rows(labels, class_names, cfg.exclude_classes, str(path))[: cfg.limit]
        latents, labels = check_latents(latents[rows], str(path)), labels[rows]
    elif cfg.limit is not None:
        latents = NpyRows(path, cfg.limit) if isinstance(latents, NpyRows) else latents[: cfg.limit]
        labels = None if labels is None else labels[: cfg.limit]
        rows = rows[: cfg.limit]
    if conditions is not None:
        conditions = _rows_of(conditions, rows)
        labels, class_names = _without_labels(labelled, str(path))
    return Dataset(images=latents, source=str(path), labels=labels, class_names=class_names, conditions=conditions)


def check_latents(latents: np.ndarray | NpyRows, what: str) -> np.ndarray | NpyRows:
    """Latents must be float16 / float32 [N, h, w, c] with N >= 1 and only finite values; checked a block of
    rows at a time, so a memory-mapped array is read once and never held whole. Returns it unchanged."""
    if latents.dtype.name not in LATENT_DTYPES:
        raise DDMError(f"{what} holds {latents.dtype} values; latents must be float16 or float32")
    if latents.ndim != 4:
        raise DDMError(f"{what} has shape {latents.shape}; latents must be [N, h, w, c]")
    if len(latents) == 0:
        raise DDMError(f"{what} holds no latents")
    rows = max(1, CHECK_CHUNK_BYTES // max(1, latents[:1].nbytes))
    for start in range(0, len(latents), rows):
        bad = ~np.isfinite(latents[start:start + rows]).reshape(-1, int(np.prod(latents.shape[1:]))).all(axis=1)
        if bad.any():
            raise DDMError(f"{what} contains NaN or Inf values (first at row {start + int(np.argmax(bad))})")
    return latents
