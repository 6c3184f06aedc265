"""Perceptual hashes (pHash, dHash; 64 bits each) of images, and the `ddm hash FILE...` command's reader.

Perceptual hashes are what verifiers compare across hardware, within a Hamming threshold (GUIDE section 4).
`phash` and `dhash` agree bit for bit with `imagehash.phash` / `imagehash.dhash` (hash_size=8,
highfreq_factor=4) applied to `PIL.Image.fromarray(image)`; a [H, W, 1] image is hashed as the [H, W]
grayscale image it holds (PIL cannot wrap a one-channel 3-D array). The 64 bits are the 8x8 boolean grid in
row-major order, first bit most significant, so `hash_hex` equals `str()` of the imagehash object.

Runtime dependencies are numpy, PIL and scipy only; imagehash is used by the tests as the reference and never
imported here.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import scipy.fft
from PIL import Image, UnidentifiedImageError

from ddm.core.errors import DDMError
from ddm.core.hashing import images_sha256

HASH_SIZE = 8  # the perceptual hashes are HASH_SIZE x HASH_SIZE = 64 bits
HASH_BITS = HASH_SIZE * HASH_SIZE
HIGHFREQ_FACTOR = 4  # pHash resizes to HASH_SIZE * HIGHFREQ_FACTOR = 32 pixels square
HASH_HEX_DIGITS = HASH_BITS // 4
_HEX_RE = re.compile(rf"[0-9a-fA-F]{{{HASH_HEX_DIGITS}}}")
_KEPT_MODES = ("L", "RGB", "RGBA")  # decoded image files in these modes are hashed as they are


# ----------------------------------------------------------------------------------------------------------
# Perceptual hashes
# ----------------------------------------------------------------------------------------------------------


def _to_pil(image: np.ndarray) -> Image.Image:
    """One uint8 image, [H, W] or [H, W, C] with C in (1, 3, 4), as the PIL image imagehash would get."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise DDMError(f"perceptual hashes need a uint8 image, got dtype {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
        raise DDMError(f"perceptual hashes need one image [H, W] or [H, W, C] with C in 1, 3, 4; got {image.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise DDMError(f"cannot hash an empty image of shape {image.shape}")
    return Image.fromarray(np.ascontiguousarray(arr))


def _bits_to_int(bits: np.ndarray) -> int:
    """A boolean grid, row-major with the first bit most significant, as a non-negative int."""
    value = 0
    for bit in bits.reshape(-1):
        value = (value << 1) | int(bit)
    return value


def phash(image: np.ndarray) -> int:
    """64-bit perceptual hash of one uint8 image [H, W] or [H, W, C], C in (1, 3, 4).

    Grayscale (PIL "L"), LANCZOS resize to 32x32, DCT-II along axis 0 then axis 1, keep the top-left 8x8
    coefficients, bit = coefficient > their median. Equals ``imagehash.phash(Image.fromarray(image))``.
    """
    size = HASH_SIZE * HIGHFREQ_FACTOR
    pixels = np.asarray(_to_pil(image).convert("L").resize((size, size), Image.Resampling.LANCZOS))
    dct = scipy.fft.dct(scipy.fft.dct(pixels, axis=0), axis=1)
    low = dct[:HASH_SIZE, :HASH_SIZE]
    return _bits_to_int(low > np.median(low))


def dhash(image: np.ndarray) -> int:
    """64-bit difference hash of one uint8 image [H, W] or [H, W, C], C in (1, 3, 4).

    Grayscale (PIL "L"), LANCZOS resize to 9 wide x 8 high, bit = pixel[r, c] < pixel[r, c + 1].
    Equals ``imagehash.dhash(Image.fromarray(image))``.
    """
    pixels = np.asarray(_to_pil(image).convert("L").resize((HASH_SIZE + 1, HASH_SIZE), Image.Resampling.LANCZOS))
    return _bits_to_int(pixels[:, 1:] > pixels[:, :-1])


def hash_hex(h: int) -> str:
    """A 64-bit hash as 16 lowercase hex digits, the same string as ``str()`` of the imagehash object."""
    if not isinstance(h, (int, np.integer)) or isinstance(h, bool) or not 0 <= int(h) < 1 << HASH_BITS:
        raise DDMError(f"not a 64-bit hash: {h!r}")
    return f"{int(h):0{HASH_HEX_DIGITS}x}"


def hex_to_hash(s: str) -> int:
    """Parse 16 hex digits (as written by `hash_hex`) back to the 64-bit hash; DDMError otherwise."""
    if not isinstance(s, str) or not _HEX_RE.fullmatch(s):
        raise DDMError(f"not a 64-bit hash ({HASH_HEX_DIGITS} hex digits): {s!r}")
    return int(s, 16)


def hamming(a: int, b: int) -> int:
    """Number of differing bits between two hashes (non-negative ints)."""
    if a < 0 or b < 0:
        raise DDMError(f"hashes must be non-negative, got {a} and {b}")
    return (int(a) ^ int(b)).bit_count()


def perceptual_hashes(images: np.ndarray) -> list[dict[str, str]]:
    """pHash and dHash of every image of a uint8 batch [n, H, W, C]: ``[{"phash": hex, "dhash": hex}, ...]``."""
    arr = np.asarray(images)
    if arr.dtype != np.uint8 or arr.ndim != 4:
        raise DDMError(f"perceptual_hashes needs uint8 images [n, H, W, C], got {arr.dtype} {arr.shape}")
    return [{"phash": hash_hex(phash(img)), "dhash": hash_hex(dhash(img))} for img in arr]


# ----------------------------------------------------------------------------------------------------------
# Files (the `ddm hash FILE...` command)
# ----------------------------------------------------------------------------------------------------------


def _read_image_file(path: Path) -> np.ndarray:
    """Decode an image file (PNG, JPEG, ...) to uint8 [H, W, C]: L -> C=1, RGB -> 3, RGBA -> 4; palette and
    other 8-bit modes become RGBA if they carry transparency, else RGB. 16-bit / float images are refused."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in _KEPT_MODES:
                if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
                    raise DDMError(f"{path}: {im.mode} images (more than 8 bits) are not supported")
                has_alpha = "A" in im.getbands() or "transparency" in im.info
                im = im.convert("RGBA" if has_alpha else "RGB")
            arr = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DDMError(f"{path}: not a readable image ({e})") from None
    return arr[:, :, None] if arr.ndim == 2 else arr


def _read_npz_images(path: Path) -> np.ndarray:
    """The uint8 image batch of an .npz, [n, H, W, C] (a [n, H, W] array counts as C=1): its `images` array,
    else its only array."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            if "images" in npz.files:
                key = "images"
            elif len(npz.files) == 1:
                key = npz.files[0]
            else:
                raise DDMError(f"{path}: no 'images' array and not exactly one array (has {', '.join(npz.files)})")
            arr = npz[key]
    except DDMError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DDMError(f"{path}: not a readable .npz ({e})") from None
    if arr.dtype != np.uint8 or arr.ndim not in (3, 4):
        raise DDMError(f"{path}: array {key!r} is {arr.dtype} {arr.shape}, expected uint8 images [n, H, W, C]")
    return arr[..., None] if arr.ndim == 3 else arr


def _row(file: str, index: int | None, image: np.ndarray) -> dict[str, Any]:
    return {
        "file": file,
        "index": index,
        "sha256": images_sha256(image[None]),
        "phash": hash_hex(phash(image)),
        "dhash": hash_hex(dhash(image)),
    }


def hash_files(paths: list[str]) -> list[dict[str, Any]]:
    """Exact and perceptual hashes of image files and .npz image batches.

    An image file gives one row ``{"file", "index": None, "sha256", "phash", "dhash"}`` where sha256 is
    `images_sha256` of the decoded image as uint8 [1, H, W, C]. An .npz gives one row per image of its image
    batch (see `_read_npz_images`) with its index; an image stored in an .npz and the same image saved as a
    PNG give equal rows apart from file and index. DDMError for a missing file, an unreadable image, or an
    .npz without images.
    """
    rows: list[dict[str, Any]] = []
    for name in paths:
        path = Path(name)
        if not path.is_file():
            raise DDMError(f"{name}: no such file")
        if path.suffix.lower() == ".npz":
            for i, image in enumerate(_read_npz_images(path)):
                rows.append(_row(name, i, image))
        else:
            rows.append(_row(name, None, _read_image_file(path)))
    return rows


def format_hash_table(rows: list[dict[str, Any]]) -> str:
    """`hash_files` rows as an aligned text table (header line, one line per row; index "-" when None)."""
    columns = ("file", "index", "sha256", "phash", "dhash")
    cells = [list(columns)] + [
        [str(r["file"]), "-" if r["index"] is None else str(r["index"]), r["sha256"], r["phash"], r["dhash"]]
        for r in rows
    ]
    widths = [max(len(line[c]) for line in cells) for c in range(len(columns))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in cells)
