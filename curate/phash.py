"""64-bit DCT perceptual hash (pHash), computed as cheaply as the image allows.

The definition is the standard one (``imagehash.phash``, after hackerfactor's "Looks Like It"):
grayscale, resize to 32x32 with a Lanczos filter, 2-D DCT-II, keep the 8x8 lowest frequencies
(DC included), bit = coefficient > median of those 64. Bits are packed row-major with the first
coefficient in the most significant bit, so the int is ``int(str(imagehash.phash(img)), 16)`` for the
same 32x32 pixels. Our pixels come from a cheaper reduction (below), which moves ~1 of 64 bits on
average on photos; ``bench/phash.py`` measures the agreement. One deliberate difference: images
with transparency are composited over white first (imagehash ignores alpha).

Two entry points:
- ``phash_pil``: the image is already decoded (download, import decode anyway); the marginal
  cost is a box reduction, a grayscale conversion and a small resize.
- ``phash_bytes``: only the encoded bytes exist (dedup of a dataset without a hash). JPEGs are
  decoded by libjpeg at 1/2 to 1/8 scale in the DCT domain (``Image.draft``), straight to grayscale, so
  the decoder skips the inverse DCT of most coefficients, the colour conversion and most of the
  resize; the DCT of all images of a batch is two matrix multiplies over a stacked array.

Hashes are Python ints in [0, 2**64) and are stored as ``uint64`` (``schema.PHASH``).
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Sequence

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

HASH_SIZE = 8
IMG_SIZE = 32  # HASH_SIZE * imagehash's highfreq_factor (4)

# Images declaring more pixels than this are not decoded (a pixel bomb would take the worker's
# memory); their hash is None. JPEGs are decoded at 1/8 scale, so the cap applies to that size.
DEFAULT_MAX_PIXELS = 200_000_000


def _dct_rows() -> np.ndarray:
    # Unnormalised DCT-II as in scipy.fftpack.dct(type=2, norm=None): y[k] = 2 sum x[n] cos(pi k (2n+1) / 2N).
    # Only the first HASH_SIZE rows are needed: the low frequencies are all the hash looks at.
    n = np.arange(IMG_SIZE)
    k = np.arange(HASH_SIZE)[:, None]
    return 2.0 * np.cos(np.pi * k * (2 * n + 1) / (2 * IMG_SIZE))


_C = _dct_rows()  # (8, 32) float64
_CT = np.ascontiguousarray(_C.T)


def hashes_from_pixels(pixels: np.ndarray) -> np.ndarray:
    """pHashes of a stack of 32x32 grayscale images, shape (N, 32, 32) -> uint64 array (N,)."""
    x = np.asarray(pixels, dtype=np.float64)
    if x.ndim != 3 or x.shape[1:] != (IMG_SIZE, IMG_SIZE):
        raise ValueError(f"expected (N, {IMG_SIZE}, {IMG_SIZE}) pixels, got {x.shape}")
    # Low-frequency block of the separable 2-D DCT: C @ X @ C^T, batched over N.
    low = (_C @ x @ _CT).reshape(len(x), HASH_SIZE * HASH_SIZE)
    # Rounding removes float noise (~1e-12) so that a flat image hashes deterministically (only
    # the DC bit set) instead of to noise; real coefficients are whole-pixel sums, far above it.
    low = np.round(low, 6)
    med = np.median(low, axis=1, keepdims=True)
    bits = np.packbits(low > med, axis=1)  # (N, 8) uint8, big-endian bit order per byte
    return bits.view(">u8").reshape(-1).astype(np.uint64)


# Before the Lanczos resize, images are shrunk by a power-of-two factor (at most 8) that keeps the
# shorter side >= REDUCE_TO: a box reduction for decoded images, libjpeg's DCT-domain scaling for
# JPEG bytes (the same factors ``Image.draft`` picks), so both paths give (nearly) the same hash.
# Measured on 2,000 photos of ~800 px (bench/phash.py): 1.05 bits from imagehash on average, and
# 98.5% of the edits imagehash finds within radius 6 found, at a fifth of its cost. A target of 128
# halves the disagreement (0.53 bits) but decodes at 1/2 or 1/4 scale: ~35% slower.
REDUCE_TO = 2 * IMG_SIZE


def _reduce_factor(w: int, h: int) -> int:
    scale = min(w, h) // REDUCE_TO
    for s in (8, 4, 2):
        if scale >= s:
            return s
    return 1


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)


def _small_gray(img: Image.Image) -> np.ndarray:
    alpha = _has_alpha(img)
    if alpha:
        # Hash what a viewer sees: transparent pixels over white. imagehash drops alpha instead,
        # which hashes the (often black, arbitrary) colour under transparency: on the demo's
        # clip art that made 21 of 300 unrelated images share the all-zero hash.
        img = img.convert("RGBA")
    elif img.mode not in ("L", "RGB"):
        img = img.convert("L")  # reduce() does not take palette or 16-bit modes
    k = _reduce_factor(*img.size)
    if k > 1:
        img = img.reduce(k)
    if alpha:
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        white.alpha_composite(img)
        img = white
    if img.mode != "L":
        img = img.convert("L")
    if img.size != (IMG_SIZE, IMG_SIZE):
        img = img.resize((IMG_SIZE, IMG_SIZE), Image.Resampling.LANCZOS)
    return np.asarray(img, dtype=np.uint8)


def phash_pil(img: Image.Image) -> int:
    """pHash of an already decoded image (any mode), as an int in [0, 2**64).

    This is the cheap path for stages that decode anyway (download, import): ~0.7 ms on an 800 px
    RGB image (~0.3 ms on a 256 px one), and the same hash (within ~1 bit) as ``phash_bytes`` of its
    encoded bytes.
    """
    return int(hashes_from_pixels(_small_gray(img)[None])[0])


def draft(img: Image.Image) -> None:
    """Before ``load()``: let a JPEG decode at 1/2, 1/4 or 1/8 scale in the DCT domain, straight to
    grayscale, exactly as ``phash_bytes`` does. A stage that decodes only to validate and hash (import)
    calls this so its ``phash_pil`` of the result equals ``phash_bytes`` of the same bytes."""
    if img.format == "JPEG":
        img.draft("L", (REDUCE_TO, REDUCE_TO))


def _decode_small(blob: bytes, max_pixels: int) -> np.ndarray:
    with warnings.catch_warnings():
        # Our own pixel cap below decides; Pillow's bomb warning would only be noise.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = Image.open(io.BytesIO(blob))
        draft(img)
        w, h = img.size
        if w * h > max_pixels:
            raise ValueError(f"{w}x{h} exceeds {max_pixels} pixels")
        if getattr(img, "n_frames", 1) > 1:
            img.seek(0)  # animated GIF/WebP/APNG: hash the first frame, like imagehash does
        img.load()
    return _small_gray(img)


def phash_bytes(blobs: Sequence[bytes | None], max_pixels: int = DEFAULT_MAX_PIXELS) -> list[int | None]:
    """pHashes of encoded images; None where a blob is None or does not decode."""
    rows: list[np.ndarray] = []
    where: list[int] = []
    out: list[int | None] = [None] * len(blobs)
    for i, blob in enumerate(blobs):
        if blob is None:
            continue
        try:
            rows.append(_decode_small(blob, max_pixels))
        except Exception as e:  # a per-row failure is data (undecodable), not a crash
            log.debug("phash: image %d does not decode: %s", i, e)
            continue
        where.append(i)
    if rows:
        for i, h in zip(where, hashes_from_pixels(np.stack(rows)).tolist(), strict=True):
            out[i] = h
    return out


def hamming(a: int, b: int) -> int:
    """Number of differing bits between two 64-bit hashes."""
    return (int(a) ^ int(b)).bit_count()


def hamming_np(a: np.ndarray | int, b: np.ndarray | int) -> np.ndarray:
    """Element-wise Hamming distance of uint64 values (broadcasting)."""
    return np.bitwise_count(np.bitwise_xor(np.asarray(a, dtype=np.uint64), np.asarray(b, dtype=np.uint64)))


def to_hex(h: int) -> str:
    """16 hex digits, the same text as ``str(imagehash.phash(img))``."""
    return f"{int(h):016x}"
