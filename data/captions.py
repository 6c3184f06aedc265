"""The captioned digits (`data.source: digits`, `data.conditions: captions`): scikit-learn's 8x8 digits, each
with a caption from its class and two measured attributes, embedded by a deterministic hashed bag of words.

A caption reads "a thick 7 leaning right": the digit, its *thickness* (thin / regular / thick: the tertile of
its mean ink among the images of its class) and its *slant* (leaning left / upright / leaning right: the tertile
of its second-moment skew among the images of its class). Both attributes are relative to the class (a 6 leans
left and a 7 right as drawn), so every class has each value in about a third of its images. The tertile edges
are those of the whole digits dataset (`reference_edges`), so a caption does not depend on `data.limit`.

`encode` turns any captions into float32 embeddings, deterministically and without downloads: each word is
hashed (SHA-256) to a coordinate and a sign. Pooled, a caption is the L2-normalised sum of its words' signed
unit vectors [dim]; as tokens, one such row per word, zero-padded to `tokens` rows. The salt `WORD_SALT` puts
the 18 words of the digits' captions on distinct coordinates of the default 64. It also serves as
`sample.condition_encoder: ddm.data.captions:encode`.
"""

from __future__ import annotations

import functools
import hashlib

import numpy as np

from ddm.core.errors import DDMError

CAPTIONS = "captions"  # `data.conditions` value that selects these
DIM, TOKENS = 64, 0  # the embedding `data.conditions: captions` stores: pooled, [N, 64] float32
WORD_SALT = "ddm-word-6:"  # the first salt under which the captions' words hash to distinct coordinates of 64
THICKNESS = ("thin", "regular", "thick")
SLANT = ("leaning left", "upright", "leaning right")
NUM_DIGITS = 10


def digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as `ddm.data.sources` loads them: (uint8 [1797, 8, 8, 1], int64 [1797] classes)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return np.rint(data.images * (255.0 / 16.0)).astype(np.uint8)[..., None], data.target


def measure(images: np.ndarray) -> dict[str, np.ndarray]:
    """The raw attributes of images uint8 [N, H, W, C] (or [N, H, W]); channels are averaged.

    Returns {"ink": float64 [N], the mean intensity in [0, 1]; "skew": float64 [N], the shear -mu11 / mu02 of the
    intensity's second moments (x right, y down): > 0 when the top of the digit lies right of its bottom}.
    A blank image has ink 0 and skew 0.
    """
    w = np.asarray(images, np.float64) / 255.0
    if w.ndim == 4:
        w = w.mean(axis=-1)
    if w.ndim != 3:
        raise DDMError(f"caption attributes need images [N, H, W(, C)], got shape {np.shape(images)}")
    y, x = np.mgrid[0:w.shape[1], 0:w.shape[2]].astype(np.float64)
    mass = w.sum(axis=(1, 2))
    safe = np.maximum(mass, 1e-12)
    cx, cy = (w * x).sum(axis=(1, 2)) / safe, (w * y).sum(axis=(1, 2)) / safe
    dx, dy = x - cx[:, None, None], y - cy[:, None, None]
    mu11, mu02 = (w * dx * dy).sum(axis=(1, 2)) / safe, (w * dy * dy).sum(axis=(1, 2)) / safe
    skew = np.where(mu02 > 1e-12, -mu11 / np.maximum(mu02, 1e-12), 0.0)
    return {"ink": w.mean(axis=(1, 2)), "skew": np.where(mass > 0, skew, 0.0)}


def tertile_edges(values: np.ndarray, classes: np.ndarray, num_classes: int = NUM_DIGITS) -> np.ndarray:
    """float64 [num_classes, 2]: the 1/3 and 2/3 quantiles of `values` [N] within each class (NaN for a class
    without images)."""
    edges = np.full((num_classes, 2), np.nan)
    for c in range(num_classes):
        of_class = values[classes == c]
        if len(of_class):
            edges[c] = np.quantile(of_class, [1 / 3, 2 / 3])
    return edges


@functools.lru_cache(maxsize=1)
def reference_edges() -> dict[str, np.ndarray]:
    """The tertile edges of the whole digits dataset: {"ink": [10, 2], "skew": [10, 2]} float64."""
    images, classes = digits()
    raw = measure(images)
    return {name: tertile_edges(raw[name], classes) for name in ("ink", "skew")}


def caption_attributes(images: np.ndarray, classes: np.ndarray,
                       edges: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """What the captions say about images uint8 [N, H, W(, C)] of `classes` int [N] (for samples: the class their
    caption names), measured against `edges` (default `reference_edges()`).

    Returns {"ink": float64 [N], "skew": float64 [N] (see `measure`), "thickness": int32 [N] (index into
    THICKNESS), "slant": int32 [N] (index into SLANT)}. A sample follows its caption's attribute when its index
    equals the caption's (`parse_caption`).
    """
    edges = reference_edges() if edges is None else edges
    classes = np.asarray(classes, np.int64)
    raw = measure(images)
    if classes.shape != raw["ink"].shape or (len(classes) and (classes.min() < 0 or classes.max() >= len(edges["ink"]))):
        raise DDMError(f"caption attributes need one class in 0..{len(edges['ink']) - 1} per image, got "
                       f"{classes.shape} for {len(raw['ink'])} images")
    out = dict(raw)
    for name, measured in (("thickness", "ink"), ("slant", "skew")):
        lo, hi = edges[measured][classes, 0], edges[measured][classes, 1]
        out[name] = ((raw[measured] > lo).astype(np.int32) + (raw[measured] > hi)).astype(np.int32)
    return out


def caption(digit: int, thickness: int, slant: int) -> str:
    """"a thick 7 leaning right" from the class and the attribute indices."""
    return f"a {THICKNESS[thickness]} {digit} {SLANT[slant]}"


def parse_caption(text: str) -> tuple[int, int, int]:
    """(digit, thickness index, slant index) of a caption `caption` made; DDMError for any other text."""
    words = text.split()
    if len(words) < 4 or words[0] != "a" or words[1] not in THICKNESS or not words[2].isdigit():
        raise DDMError(f"{text!r} is not a digits caption (e.g. 'a thick 7 leaning right')")
    slant = " ".join(words[3:])
    if slant not in SLANT or int(words[2]) >= NUM_DIGITS:
        raise DDMError(f"{text!r} is not a digits caption (e.g. 'a thick 7 leaning right')")
    return int(words[2]), THICKNESS.index(words[1]), SLANT.index(slant)


def digit_captions(images: np.ndarray, classes: np.ndarray) -> list[str]:
    """One caption per image (uint8 [N, H, W(, C)] of `classes` [N]), against the reference edges."""
    attrs = caption_attributes(images, classes)
    return [caption(int(c), int(t), int(s)) for c, t, s in zip(classes, attrs["thickness"], attrs["slant"])]


def _word_slot(word: str, dim: int) -> tuple[int, float]:
    digest = hashlib.sha256((WORD_SALT + word).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") % dim, 1.0 if digest[8] & 1 else -1.0


def encode(captions: list[str], dim: int = DIM, tokens: int = TOKENS) -> np.ndarray:
    """Deterministic embeddings of `captions` (lower-cased, split on whitespace): float32 [N, dim] with
    `tokens` 0 (the L2-normalised signed sum of the words' hashed unit vectors; all zeros for an empty caption),
    else float32 [N, tokens, dim] (row i: word i's signed unit vector; rows past the last word are zero).
    DDMError for a caption of more than `tokens` words."""
    if dim < 1 or tokens < 0:
        raise DDMError(f"caption embeddings need dim >= 1 and tokens >= 0, got {dim}, {tokens}")
    if isinstance(captions, str):
        captions = [captions]
    out = np.zeros((len(captions), tokens, dim) if tokens else (len(captions), dim), np.float32)
    for i, text in enumerate(captions):
        words = str(text).lower().split()
        if tokens and len(words) > tokens:
            raise DDMError(f"caption {i} has {len(words)} words, more than the {tokens} token rows")
        for j, word in enumerate(words):
            slot, sign = _word_slot(word, dim)
            if tokens:
                out[i, j, slot] = sign
            else:
                out[i, slot] += sign
    if not tokens:
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        out = np.where(norms > 0, out / np.maximum(norms, 1e-12), 0.0).astype(np.float32)
    return out


def digit_conditions(images: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """The stored conditions of `data.conditions: captions`: encode(digit_captions(images, classes)), float32
    [N, DIM]."""
    return encode(digit_captions(images, classes), DIM, TOKENS)
