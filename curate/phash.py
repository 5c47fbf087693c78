"""64-bit DCT perceptual hash (pHash) and a colour signature, computed as cheaply as the image allows.

The hash is the standard one (``imagehash.phash``, after hackerfactor's "Looks Like It"): grayscale,
resize to 32x32 with a Lanczos filter, 2-D DCT-II, keep the 8x8 lowest frequencies (DC included), bit =
coefficient > median of those 64. Bits are packed row-major with the first coefficient in the most
significant bit, so the int is ``int(str(imagehash.phash(img)), 16)`` for the same 32x32 pixels. Our
pixels come from a cheaper reduction (below); ``bench/phash.py`` measures the agreement. Deliberate
differences: images with transparency are composited over white first (imagehash ignores alpha), and
line art (a drawing on a white page) has its strokes thickened at one fixed scale before the final
resize, so a rescaled, recompressed copy of a thin-line drawing hashes close to the original.

Beside the hash, from the same reduced pixels: a colour signature (4x4 grid of CIELAB means, 48
bytes). pHash sees luminance only; dedup uses the signature to confirm that a pHash pair is really the
same picture and not a recoloured variant.

Two entry points:
- ``signature_pil``: the image is already decoded (download, import decode anyway); the marginal
  cost is a box reduction, a grayscale conversion and two small resizes.
- ``signatures_bytes``: only the encoded bytes exist (dedup of a dataset without them). JPEGs are
  decoded by libjpeg at 1/2 to 1/8 scale in the DCT domain (``Image.draft``), so the decoder skips
  the inverse DCT of most coefficients and most of the resize; the DCT of all images of a batch is two
  matrix multiplies over a stacked array.

Hashes are Python ints in [0, 2**64) and are stored as ``uint64`` (``schema.PHASH``); signatures as
48-byte binaries (``schema.COLOR_SIG``).
"""

from __future__ import annotations

import functools
import logging
import math
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
    # The median of the 64 (np.median's value: the mean of the two middle ones), from one sort.
    mid = np.sort(low, axis=1)[:, HASH_SIZE * HASH_SIZE // 2 - 1 : HASH_SIZE * HASH_SIZE // 2 + 1]
    med = (mid[:, :1] + mid[:, 1:]) / 2
    bits = np.packbits(low > med, axis=1)  # (N, 8) uint8, big-endian bit order per byte
    return bits.view(">u8").reshape(-1).astype(np.uint64)


# Before the Lanczos resize, images are shrunk by a power-of-two factor (at most 8) that keeps the
# shorter side >= REDUCE_TO: a box reduction for decoded images, libjpeg's DCT-domain scaling for
# JPEG bytes (the same factors ``Image.draft`` picks), so both paths give (nearly) the same hash.
# 96 rather than 64: line art needs the detail to thicken its strokes at one scale (LINE_ART_SIDE), and
# photos hash closer to imagehash; it decodes 800 px JPEGs at 1/4 rather than 1/8 scale (bench/phash.py).
REDUCE_TO = 3 * IMG_SIZE
# Line art is thickened at this one scale (short side), enlarged to it where the reduction left less.
LINE_ART_SIDE = 4 * IMG_SIZE


def _reduce_factor(w: int, h: int) -> int:
    scale = min(w, h) // REDUCE_TO
    for s in (8, 4, 2):
        if scale >= s:
            return s
    return 1


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)


# Line art (thin strokes on a white page) loses its strokes when it is rescaled and recompressed:
# a 1 px line at 70% scale becomes a faint 0.7 px one and JPEG rings around it, so the 32x32 pixels
# the DCT sees change and a plain pHash moves 12-30 bits. Such images (``_is_line_art``) are brought
# to one scale (short side LINE_ART_SIDE) and their strokes thickened by a 3x3 minimum filter (~1/40 of
# the image) before the final resize, so every copy hashes the same thick strokes.
# bench/decisions.py measures the effect on planted clip-art and photo edits.
LINE_ART_WHITE = 0.5
LINE_ART_CORE = 0.3
_WHITE_LEVEL = 235

# The colour signature: the mean colour of each cell of a COLOR_GRID x COLOR_GRID grid, in CIELAB
# (L*, a*+128, b*+128, one byte each), from the same reduced pixels as the hash. pHash sees
# luminance structure only, so recoloured variants of one drawing (flags, icons, cards) collide;
# their cell colours differ by tens of Delta-E while a resize or recompression moves them by a few.
COLOR_GRID = 4
COLOR_BYTES = COLOR_GRID * COLOR_GRID * 3

# Crop hashes: a pHash is not crop-invariant (cutting 1-5% off an edge moves the 32x32 grid under the
# picture, and 59 of 120 clip-art crops and 30 of 130 photo crops landed more than 6 bits from their
# original in bench/decisions.py). Each image also gets the pHashes of CROP_COUNT crops keeping
# CROP_FRACTION of each side (the four corners and the centre), from the same reduced pixels; a copy
# cut by a few percent hashes close to one of them. dedup compares a row's crops with other rows'
# full-image hashes (``crop_radius``). Stored as CROP_COUNT little-endian uint64, CROP_BYTES bytes.
CROP_FRACTION = 0.97
CROP_COUNT = 5
CROP_BYTES = 8 * CROP_COUNT


def _reduced(img: Image.Image) -> Image.Image:
    """The image as a viewer sees it (transparency over white), RGB or L, box-reduced by the power
    of two that keeps its short side >= REDUCE_TO."""
    if _has_alpha(img):
        # Hash what a viewer sees: transparent pixels over white. imagehash drops alpha instead,
        # which hashes the (often black, arbitrary) colour under transparency: on the demo's
        # clip art that made 21 of 300 unrelated images share the all-zero hash. Composite before
        # reducing: reduce() averages the colour under transparent pixels into visible ones, which
        # made a PNG and its matted copy hash apart.
        rgba = img.convert("RGBA")
        img = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img.alpha_composite(rgba)
        img = img.convert("RGB")
    elif img.mode not in ("L", "RGB"):
        img = img.convert("RGB")  # reduce() does not take palette, CMYK or 16-bit modes
    k = _reduce_factor(*img.size)
    return img.reduce(k) if k > 1 else img


def _min3(a: np.ndarray) -> np.ndarray:
    """3x3 minimum filter with the edge pixels repeated outward: what Pillow's ``MinFilter(3)`` gives
    (it expands the image by its edge before ranking). Two separable passes of in-place minimums over
    shifted views: an edge pixel's missing neighbour is itself, so no padded copy is needed."""
    rows = a.copy()
    np.minimum(rows[:, 1:], a[:, :-1], out=rows[:, 1:])
    np.minimum(rows[:, :-1], a[:, 1:], out=rows[:, :-1])
    out = rows.copy()
    np.minimum(out[1:], rows[:-1], out=out[1:])
    np.minimum(out[:-1], rows[1:], out=out[:-1])
    return out


def _is_line_art(gray: np.ndarray) -> bool:
    """A drawing of thin strokes on a white page: mostly white, and most of its ink within a pixel
    of the page (a 3x3 erosion of the ink keeps less than LINE_ART_CORE of it). Filled clip art and
    photos are left alone: thickening helps only strokes that rescaling makes faint."""
    if gray.size == 0:
        return False
    ink = gray < _WHITE_LEVEL
    total = int(np.count_nonzero(ink))
    if (gray.size - total) / gray.size < LINE_ART_WHITE or total == 0:
        return False
    core = _min3(ink.view(np.uint8))  # ink whose whole 3x3 neighbourhood (edges repeated) is ink
    return int(np.count_nonzero(core)) < LINE_ART_CORE * total


def _hash_pixels(img: Image.Image) -> np.ndarray:
    """The 32x32 grey pixels the DCT sees, of one image."""
    return _lanczos(_prepared(np.asarray(_gray(img), dtype=np.uint8)), IMG_SIZE)


def _prepared(gray: np.ndarray) -> np.ndarray:
    """The grey pixels that get the final resize: line art thickened at its one scale, anything
    else as it is."""
    if _is_line_art(gray):
        # The strokes are thickened at one fixed scale (short side LINE_ART_SIDE, area-averaged), so a
        # drawing and its rescaled copy get the same stroke width relative to the picture.
        # Smaller images are enlarged to that scale, or a 64 px copy would get strokes twice as thick
        # (relative to the picture) as its 128 px original.
        h, w = gray.shape
        r = LINE_ART_SIDE / min(w, h)
        if r != 1:
            size = (max(1, round(w * r)), max(1, round(h * r)))
            filt = Image.Resampling.BOX if r < 1 else Image.Resampling.BILINEAR
            gray = np.asarray(Image.fromarray(np.ascontiguousarray(gray)).resize(size, filt))
        gray = _min3(gray)
    return gray


# The final resize to 32x32 is Pillow's Lanczos filter as two matrix products: each output pixel
# weighs its source pixels by lanczos3 coefficients normalised and rounded to 22-bit fixed point, the
# sums are integers, and each pass is rounded back to 8 bits. The same integer coefficients in
# float64 give the same integer sums exactly (every partial sum stays far below 2**53) in whatever
# order the product adds them. The passes run in one fixed order, horizontal then vertical (Pillow up
# to 12 always did; Pillow 13 runs the vertical pass first on some shapes taller than wide, which
# rounds differently), so the hashes no longer depend on the installed Pillow or Pillow-SIMD. A
# 124 px crop costs ~35 us this way against ~85 us through Pillow, which recomputes its coefficients
# on every call; the six per image were the largest share of the hash's CPU in download.
_FIXED = 1 << 22  # Pillow's PRECISION_BITS for 8-bit images: 32 - 8 - 2


@functools.lru_cache(maxsize=256)
def _lanczos_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) fixed-point Lanczos weights of one pass from n_in to n_out pixels, computed as
    Pillow computes them (its precompute_coeffs and 8-bit normalisation), stored as integers in
    float64: the same taps, the same arguments, a sequential sum for the normaliser, the same
    rounding. numpy's sin may differ from the C library's in the last bit, which could move one
    coefficient by one unit (a rounding exactly at .5: ~1e-9 a coefficient)."""
    scale = n_in / n_out
    filterscale = max(scale, 1.0)
    support = 3.0 * filterscale
    center = (np.arange(n_out) + 0.5) * scale
    lo = np.maximum((center - support + 0.5).astype(np.int64), 0)  # C's truncating casts
    hi = np.minimum((center + support + 0.5).astype(np.int64), n_in)
    taps = np.arange(n_in)
    arg = (taps[None, :] - center[:, None] + 0.5) * (1.0 / filterscale)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = arg * math.pi
        sinc = np.where(arg == 0.0, 1.0, np.sin(t) / t)
        t3 = (arg / 3) * math.pi
        sinc3 = np.where(arg == 0.0, 1.0, np.sin(t3) / t3)
    inside = (taps[None, :] >= lo[:, None]) & (taps[None, :] < hi[:, None]) & (arg >= -3.0) & (arg < 3.0)
    w = np.where(inside, sinc * sinc3, 0.0)
    total = np.cumsum(w, axis=1)[:, -1:]  # in tap order, as the C loop adds them
    k = np.divide(w, total, out=w.copy(), where=total != 0.0)
    m = np.trunc(np.where(k < 0, k * _FIXED - 0.5, k * _FIXED + 0.5))
    m.setflags(write=False)
    return m


@functools.lru_cache(maxsize=256)
def _lanczos_weights_t(n_in: int, n_out: int) -> np.ndarray:
    """The transpose of ``_lanczos_weights``, contiguous: the horizontal pass's right operand."""
    t = np.ascontiguousarray(_lanczos_weights(n_in, n_out).T)
    t.setflags(write=False)
    return t


def _to_8bit(sums: np.ndarray) -> np.ndarray:
    """Fixed-point sums (a fresh float64 array, rounded in place) back to 0..255 as Pillow rounds
    them: add half, shift, clip. Scaling by a power of two is exact in float64."""
    sums += _FIXED // 2
    sums *= 1.0 / _FIXED
    np.floor(sums, out=sums)
    np.maximum(sums, 0.0, out=sums)
    return np.minimum(sums, 255.0, out=sums)


def _lanczos(gray: np.ndarray, size: int) -> np.ndarray:
    """A Lanczos resize of a 2-D uint8 array to size x size: the horizontal pass, then the vertical
    one, each skipped where that side already has the size, each exactly what Pillow's one-axis
    ``resize`` gives for it."""
    return _lanczos_many([gray], size)[0]


def _lanczos_many(grays: Sequence[np.ndarray], size: int) -> list[np.ndarray]:
    """``_lanczos`` of each array, with one matrix product per pass for all arrays of one shape (an
    image's five crops share theirs): stacked rows for the horizontal pass, side-by-side columns for
    the vertical one. Every output value is the same sum as alone."""
    out: list[np.ndarray | None] = [None] * len(grays)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, g in enumerate(grays):
        groups.setdefault(g.shape, []).append(i)
    for (h, w), idx in groups.items():
        k = len(idx)
        x = np.concatenate([grays[i] for i in idx], axis=0).astype(np.float64)  # (k*h, w)
        if w != size:
            x = _to_8bit(x @ _lanczos_weights_t(w, size))
        x = x.reshape(k, h, size)
        if h != size:
            side = x.transpose(1, 0, 2).reshape(h, k * size)  # the k arrays side by side
            x = _to_8bit(_lanczos_weights(h, size) @ side).reshape(size, k, size).transpose(1, 0, 2)
        for j, i in enumerate(idx):
            out[i] = x[j].astype(np.uint8)
    return out


def _crop_boxes(w: int, h: int) -> list[tuple[int, int, int, int]]:
    """The CROP_COUNT crop boxes of a w x h image: top-left, top-right, bottom-left, bottom-right,
    centre, each keeping CROP_FRACTION of the width and of the height."""
    cw, ch = max(1, round(w * CROP_FRACTION)), max(1, round(h * CROP_FRACTION))
    x, y = (w - cw) // 2, (h - ch) // 2
    return [(0, 0, cw, ch), (w - cw, 0, w, ch), (0, h - ch, cw, h), (w - cw, h - ch, w, h), (x, y, x + cw, y + ch)]


def _gray(img: Image.Image) -> Image.Image:
    return img if img.mode == "L" else img.convert("L")


def _all_pixels(small: Image.Image) -> list[np.ndarray]:
    """The 32x32 hash pixels of the whole reduced image and of its CROP_COUNT crops. The grey image is
    made once and each crop is a view of it (a per-pixel conversion commutes with a crop); each crop
    gets its own line-art check and scale, exactly as if it were an image of its own."""
    gray = np.asarray(_gray(small), dtype=np.uint8)
    h, w = gray.shape
    windows = [gray, *(gray[y0:y1, x0:x1] for x0, y0, x1, y1 in _crop_boxes(w, h))]
    return _lanczos_many([_prepared(g) for g in windows], IMG_SIZE)


def crops_to_bytes(hashes: Sequence[int] | np.ndarray) -> bytes:
    """CROP_COUNT crop hashes as the stored CROP_BYTES value."""
    return np.asarray(hashes, dtype="<u8").tobytes()


def crops_from_bytes(values: Sequence[bytes | None]) -> tuple[np.ndarray, np.ndarray]:
    """Stored crop-hash values -> (N, CROP_COUNT) uint64 (zeros where missing) and their validity."""
    out = np.zeros((len(values), CROP_COUNT), dtype=np.uint64)
    ok = np.zeros(len(values), dtype=bool)
    for i, v in enumerate(values):
        if v is not None and len(v) == CROP_BYTES:
            out[i] = np.frombuffer(v, dtype="<u8")
            ok[i] = True
    return out, ok


def crop_distance(crops: np.ndarray, full: np.ndarray) -> np.ndarray:
    """Per row, the smallest Hamming distance between one row's crop hashes (N, CROP_COUNT) and the
    other row's full-image hash (N,)."""
    c = np.asarray(crops, dtype=np.uint64).reshape(-1, CROP_COUNT)
    return hamming_np(c, np.asarray(full, dtype=np.uint64).reshape(-1, 1)).min(axis=1)


def _srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """CIELAB (D65) of sRGB values in [0, 255], shape (..., 3) -> (..., 3) float64."""
    c = rgb / 255.0
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = lin @ m.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def _color_cells(img: Image.Image) -> np.ndarray:
    """Mean sRGB colour of each grid cell, (COLOR_GRID * COLOR_GRID, 3) uint8."""
    rgb = img.convert("RGB") if img.mode != "RGB" else img
    return np.asarray(rgb.resize((COLOR_GRID, COLOR_GRID), Image.Resampling.BOX), dtype=np.uint8).reshape(-1, 3)


def _color_signatures(cells: np.ndarray) -> list[bytes]:
    """Colour signatures of a stack of cell colours (N, cells, 3): one vectorised Lab conversion."""
    lab = _srgb_to_lab(np.asarray(cells, dtype=np.float64))
    lab[..., 0] *= 2.55  # L* 0..100 -> 0..255
    lab[..., 1:] += 128
    q = np.clip(np.round(lab), 0, 255).astype(np.uint8).reshape(len(cells), -1)
    return [row.tobytes() for row in q]


def color_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Mean CIE76 Delta-E over the grid cells of colour signatures (rows of COLOR_BYTES uint8),
    after removing the mean lightness difference: a brighter or darker copy (a global L* shift) is
    the same picture, a recoloured one (a*, b* per cell) is not."""
    x = np.asarray(a, dtype=np.float64).reshape(-1, COLOR_GRID * COLOR_GRID, 3)
    y = np.asarray(b, dtype=np.float64).reshape(-1, COLOR_GRID * COLOR_GRID, 3)
    d = x - y
    d[..., 0] /= 2.55
    d[..., 0] -= d[..., 0].mean(axis=1, keepdims=True)
    return np.sqrt((d**2).sum(-1)).mean(-1)


def signature_pil(img: Image.Image) -> tuple[int, bytes, bytes]:
    """(pHash, colour signature, crop hashes) of an already decoded image (any mode), from one reduction.

    This is the cheap path for stages that decode anyway (download, import): about a millisecond on
    an 800 px RGB image, and the same hashes (within ~1 bit) as ``signatures_bytes`` of its bytes.
    """
    small = _reduced(img)
    h = hashes_from_pixels(np.stack(_all_pixels(small)))
    return int(h[0]), _color_signatures(_color_cells(small)[None])[0], crops_to_bytes(h[1:])


def phash_pil(img: Image.Image) -> int:
    """pHash of an already decoded image (any mode), as an int in [0, 2**64)."""
    return int(hashes_from_pixels(_hash_pixels(_reduced(img))[None])[0])


def draft(img: Image.Image) -> None:
    """Before ``load()``: let a JPEG decode at 1/2, 1/4 or 1/8 scale in the DCT domain, exactly as
    ``signatures_bytes`` does. A stage that decodes only to validate and hash (import) calls this so
    its ``signature_pil`` of the result equals ``signatures_bytes`` of the same bytes."""
    if img.format == "JPEG":
        img.draft(img.mode, (REDUCE_TO, REDUCE_TO))  # its own mode: only the scale changes


def _decode_small(blob: bytes, max_pixels: int) -> Image.Image:
    from curate.images import open_image

    with warnings.catch_warnings():
        # Our own pixel cap decides; Pillow's bomb warning would only be noise.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = open_image(blob, 1 << 62)  # allowlisted format; the cap is on what gets decoded:
        draft(img)  # a JPEG decodes at 1/2..1/8 scale, so its drafted size is what counts
        w, h = img.size
        if w * h > max_pixels:
            raise ValueError(f"{w}x{h} exceeds {max_pixels} pixels")
        img.load()  # an animated GIF/WebP/APNG opens at its first frame: that is what gets hashed
    return _reduced(img)


def signatures_bytes(
    blobs: Sequence[bytes | None], max_pixels: int = DEFAULT_MAX_PIXELS
) -> list[tuple[int, bytes, bytes] | None]:
    """(pHash, colour signature, crop hashes) of encoded images; None where a blob is None or does
    not decode."""
    small: list[Image.Image] = []
    where: list[int] = []
    out: list[tuple[int, bytes] | None] = [None] * len(blobs)
    for i, blob in enumerate(blobs):
        if blob is None:
            continue
        try:
            small.append(_decode_small(blob, max_pixels))
        except Exception as e:  # a per-row failure is data (undecodable), not a crash
            log.debug("phash: image %d does not decode: %s", i, e)
            continue
        where.append(i)
    if small:
        k = 1 + CROP_COUNT
        hashes = hashes_from_pixels(np.stack([p for s in small for p in _all_pixels(s)]))
        colors = _color_signatures(np.stack([_color_cells(s) for s in small]))
        for j, (i, c) in enumerate(zip(where, colors, strict=True)):
            out[i] = (int(hashes[j * k]), c, crops_to_bytes(hashes[j * k + 1 : (j + 1) * k]))
    return out


def phash_bytes(blobs: Sequence[bytes | None], max_pixels: int = DEFAULT_MAX_PIXELS) -> list[int | None]:
    """pHashes of encoded images; None where a blob is None or does not decode."""
    return [None if s is None else s[0] for s in signatures_bytes(blobs, max_pixels)]


def hamming(a: int, b: int) -> int:
    """Number of differing bits between two 64-bit hashes."""
    return (int(a) ^ int(b)).bit_count()


def hamming_np(a: np.ndarray | int, b: np.ndarray | int) -> np.ndarray:
    """Element-wise Hamming distance of uint64 values (broadcasting)."""
    return np.bitwise_count(np.bitwise_xor(np.asarray(a, dtype=np.uint64), np.asarray(b, dtype=np.uint64)))


def to_hex(h: int) -> str:
    """16 hex digits, the same text as ``str(imagehash.phash(img))``."""
    return f"{int(h):016x}"
