"""pHash and the colour signature against independent references.

Oracles: scipy's DCT-II and a median written with ``sorted()`` for the hash bits; scikit-image's
rgb2lab for CIELAB; Python's ``int.bit_count`` and ``format`` for the Hamming distance and hex text;
hand-computed Delta-E values for the colour distance.
"""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
from PIL import Image, ImageDraw
from scipy.fft import dct
from skimage.color import rgb2lab

from curate import phash


def reference_hash(px: np.ndarray) -> int:
    """imagehash's definition from its parts: 2-D DCT-II (unnormalised), the 8x8 lowest frequencies,
    bit = coefficient > median, first coefficient in the most significant bit."""
    coef = dct(dct(px.astype(np.float64), axis=0, type=2), axis=1, type=2)[:8, :8].round(6).ravel().tolist()
    s = sorted(coef)
    med = (s[31] + s[32]) / 2
    return int("".join("1" if c > med else "0" for c in coef), 2)


def test_hash_bits_equal_a_scipy_dct_reference():
    rng = np.random.default_rng(11)
    px = rng.integers(0, 256, (40, 32, 32)).astype(np.uint8)
    # smooth images too: most of their energy in the low frequencies, many coefficients near the median
    y, x = np.mgrid[0:32, 0:32]
    smooth = [(128 + 100 * np.sin(x / (3 + k)) * np.cos(y / (4 + k))).astype(np.uint8) for k in range(10)]
    px = np.concatenate([px, np.stack(smooth)])
    got = phash.hashes_from_pixels(px)
    assert [int(h) for h in got] == [reference_hash(p) for p in px]


def test_hash_of_a_known_pattern():
    # left half black, right half white: only the horizontal frequencies 0 and odd are non-zero
    px = np.zeros((1, 32, 32), np.uint8)
    px[0, :, 16:] = 255
    h = int(phash.hashes_from_pixels(px)[0])
    assert h == reference_hash(px[0])
    assert h >> 63 == 1  # the DC coefficient (the mean) is the largest: its bit is set
    assert h != 1 << 63


def test_hamming_and_hex_against_python():
    rng = np.random.default_rng(2)
    a = [int(x) for x in rng.integers(0, 2**63, 50, dtype=np.uint64)] + [0, 2**64 - 1, 2**63]
    b = [int(x) for x in rng.integers(0, 2**63, 50, dtype=np.uint64)] + [2**64 - 1, 0, 2**63 - 1]
    for x, y in zip(a, b, strict=True):
        assert phash.hamming(x, y) == bin(x ^ y).count("1")
        assert phash.to_hex(x) == format(x, "016x") and len(phash.to_hex(x)) == 16
    got = phash.hamming_np(np.array(a, np.uint64), np.array(b, np.uint64))
    assert got.tolist() == [bin(x ^ y).count("1") for x, y in zip(a, b, strict=True)]
    # plain Python ints on either side (a stored hash above 2**63 included)
    assert phash.hamming_np(np.array(a, np.uint64), 0).tolist() == [bin(x).count("1") for x in a]
    assert phash.hamming_np(0, np.array(b, np.uint64)).tolist() == [bin(y).count("1") for y in b]
    assert phash.hamming_np(2**64 - 1, 2**63).tolist() == 63
    assert phash.to_hex(1) == "0000000000000001"


@pytest.mark.parametrize("rgb", [(255, 255, 255), (0, 0, 0), (200, 30, 30), (30, 40, 220), (128, 128, 128),
                                 (10, 200, 30), (250, 240, 10), (3, 3, 3)])
def test_colour_signature_is_cielab_of_each_cell(rgb):
    # a flat image: every cell's mean is the colour itself; L* scaled to 0..255, a* and b* offset by 128
    sig = phash.signature_pil(Image.new("RGB", (64, 48), rgb))[1]
    lab = rgb2lab(np.array([[rgb]], np.uint8))[0, 0]
    want = np.clip(np.round([lab[0] * 2.55, lab[1] + 128, lab[2] + 128]), 0, 255)
    cells = np.frombuffer(sig, np.uint8).reshape(16, 3)
    assert len(sig) == phash.COLOR_BYTES == 48
    assert np.abs(cells.astype(int) - want.astype(int)).max() <= 1, (cells[0], want)


def test_colour_signature_cells_are_a_row_major_grid():
    img = Image.new("RGB", (80, 80), (255, 255, 255))
    ImageDraw.Draw(img).rectangle((60, 0, 79, 19), fill=(0, 0, 0))  # top-right cell only
    cells = np.frombuffer(phash.signature_pil(img)[1], np.uint8).reshape(4, 4, 3)
    assert cells[0, 3, 0] < 10  # black: L* ~ 0
    dark = [(r, c) for r in range(4) for c in range(4) if cells[r, c, 0] < 128]
    assert dark == [(0, 3)]


def test_colour_distance_by_hand():
    base = np.full((1, 48), 128, np.uint8)
    base[0, 0::3] = 100  # L* field of every cell
    other = base.copy()
    other[0, 1] = 128 + 16  # one cell's a* moves by 16: mean over 16 cells = 1.0
    assert phash.color_distance(base, other)[0] == pytest.approx(1.0)
    other = base.copy()
    other[0, 2::3] = 128 - 6  # every cell's b* moves by 6
    assert phash.color_distance(base, other)[0] == pytest.approx(6.0)
    brighter = base.copy()
    brighter[0, 0::3] = 100 + 51  # a global L* shift (51 / 2.55 = 20) is removed: same picture
    assert phash.color_distance(base, brighter)[0] == pytest.approx(0.0, abs=1e-9)
    one = base.copy()
    one[0, 0] = 100 + 51  # one cell 20 L* brighter: the mean shift 1.25 leaves 18.75 there, 1.25 elsewhere
    assert phash.color_distance(base, one)[0] == pytest.approx((18.75 + 15 * 1.25) / 16)
    # the lightness shift is removed per pair of rows, not over the whole batch
    two = phash.color_distance(np.vstack([base, base]), np.vstack([brighter, base]))
    assert two.tolist() == pytest.approx([0.0, 0.0], abs=1e-9)
    # rows are compared pairwise
    assert phash.color_distance(np.vstack([base, base]), np.vstack([base, other])).tolist() == pytest.approx(
        [0.0, 6.0]
    )


def test_cmyk_and_16_bit_images_hash_like_their_rgb():
    rng = np.random.default_rng(4)
    rgb = Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8).repeat(2, 0).repeat(2, 1))
    want = phash.phash_pil(rgb)
    assert phash.phash_pil(rgb.convert("CMYK")) == phash.phash_pil(rgb.convert("CMYK").convert("RGB"))
    assert phash.hamming(phash.phash_pil(rgb.convert("CMYK")), want) <= 2
    gray = rgb.convert("L")
    assert phash.phash_pil(gray.convert("I;16")) == phash.phash_pil(gray.convert("I;16").convert("RGB"))


def test_reduce_factor_keeps_the_short_side_at_least_reduce_to():
    r = phash.REDUCE_TO
    for side, factor in [(r - 1, 1), (r, 1), (2 * r - 1, 1), (2 * r, 2), (4 * r - 1, 2), (4 * r, 4),
                         (8 * r, 8), (100 * r, 8)]:
        assert phash._reduce_factor(side, 10 * side) == factor, side
        assert phash._reduce_factor(10 * side, side) == factor, side


def test_transparent_pixels_hash_as_white_whatever_colour_they_hide():
    # the same visible drawing over two different hidden colours (black, then noise): one hash,
    # and the hash of the drawing on a white page
    rng = np.random.default_rng(9)
    hidden_black = Image.new("RGBA", (160, 120), (0, 0, 0, 0))
    noise = rng.integers(0, 256, (120, 160, 4), dtype=np.uint8)
    noise[..., 3] = 0
    hidden_noise = Image.fromarray(noise, "RGBA")
    page = Image.new("RGB", (160, 120), (255, 255, 255))
    for im in (hidden_black, hidden_noise, page):
        ImageDraw.Draw(im).polygon([(20, 100), (80, 10), (140, 100)], fill=(20, 120, 40, 255)[: len(im.mode)])
    want = phash.signature_pil(page)
    assert phash.signature_pil(hidden_black) == want
    assert phash.signature_pil(hidden_noise) == want
    # palette images with a transparent index and LA images too
    la = hidden_black.convert("LA")
    assert phash.phash_pil(la) == phash.phash_pil(page.convert("L"))
    buf = io.BytesIO()
    hidden_noise.save(buf, "PNG")
    assert phash.signatures_bytes([buf.getvalue()])[0] == want


def _png_header_bomb(width: int, height: int) -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + chunk(
        b"IEND", b""
    )


def test_pixel_cap_refuses_before_any_image_memory():
    # Pillow counts the blocks it allocates for images; a refused bomb must not have any
    def blocks():
        s = Image.core.get_stats()
        return s["allocated_blocks"] + s["reused_blocks"] + s["reallocated_blocks"]

    bomb = _png_header_bomb(12_000, 12_000)  # 432 MB as RGB, under Pillow's own bomb limit
    before = blocks()
    assert phash.signatures_bytes([bomb], max_pixels=100_000_000) == [None]
    assert blocks() == before
    assert phash.signatures_bytes([bomb], max_pixels=144_000_000) == [None]  # decodes (truncated body)
    assert (blocks() - before) * Image.core.get_block_size() >= 12_000 * 12_000 * 3


def test_crop_boxes_by_hand():
    # 97% of 200 x 100 is 194 x 97: the four corners and the centre
    assert phash._crop_boxes(200, 100) == [(0, 0, 194, 97), (6, 0, 200, 97), (0, 3, 194, 100), (6, 3, 200, 100),
                                           (3, 1, 197, 98)]
    assert phash._crop_boxes(1, 1) == [(0, 0, 1, 1)] * 5
    # tall: 97 x 194 of 100 x 200, the centre box 1 px in from the left and 3 down
    assert phash._crop_boxes(100, 200)[4] == (1, 3, 98, 197)


def test_crop_hashes_are_the_hashes_of_the_crops_and_round_trip():
    rng = np.random.default_rng(8)
    img = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8).repeat(3, 0).repeat(3, 1))
    full, _, crops = phash.signature_pil(img)
    assert full == phash.phash_pil(img) and len(crops) == phash.CROP_BYTES
    want = [phash.phash_pil(img.crop(box)) for box in phash._crop_boxes(*img.size)]
    assert [int.from_bytes(crops[8 * i: 8 * i + 8], "little") for i in range(5)] == want
    got, ok = phash.crops_from_bytes([crops, None, b"short"])
    assert ok.dtype == np.bool_ and ok.tolist() == [True, False, False]  # a mask callers index with
    assert [int(x) for x in got[0]] == want and got[1:].tolist() == [[0] * 5, [0] * 5]
    assert phash.crops_to_bytes(want) == crops


def test_crop_distance_is_the_smallest_over_the_crops():
    crops = np.array([[0b1111, 0b0111, 0b1000, 0, 0b1], [2**64 - 1] * 5], np.uint64)
    full = np.array([0b1111, 0], np.uint64)
    # row 0: distances 0, 1, 3, 4, 3 -> 0; row 1: 64 everywhere
    assert phash.crop_distance(crops, full).tolist() == [0, 64]
    assert phash.crop_distance(crops[:1], np.array([0b0110], np.uint64)).tolist() == [1]


def test_a_drafted_jpeg_keeps_its_colour():
    # JPEG bytes are decoded at a fraction of their size in the DCT domain; that decode must still be
    # in colour, or the colour signature of every JPEG would be grey
    buf = io.BytesIO()
    Image.new("RGB", (800, 600), (200, 30, 30)).save(buf, "JPEG", quality=95)
    _, sig, _ = phash.signatures_bytes([buf.getvalue()])[0]
    lab = rgb2lab(np.array([[(200, 30, 30)]], np.uint8))[0, 0]
    cells = np.frombuffer(sig, np.uint8).reshape(16, 3).astype(int)
    assert np.abs(cells[:, 1] - (lab[1] + 128)).max() <= 3 and np.abs(cells[:, 2] - (lab[2] + 128)).max() <= 3


def test_srgb_to_lab_equals_scikit_image():
    # a grid over the cube plus the dark colours where sRGB's curve switches from linear to power
    v = [0, 1, 3, 5, 8, 10, 11, 12, 20, 64, 128, 200, 254, 255]
    rgb = np.array([(r, g, b) for r in v for g in v[::3] for b in v[::2]], np.uint8)
    ours = phash._srgb_to_lab(rgb.astype(np.float64))
    ref = rgb2lab(rgb[None])[0]
    assert np.abs(ours - ref).max() < 0.05


def test_grey_images_get_a_neutral_colour_signature():
    for mode, img in (("L", Image.new("L", (64, 64), 128)), ("LA", Image.new("LA", (64, 64), (128, 255))),
                      ("I;16", Image.new("L", (64, 64), 128).convert("I;16"))):
        _, sig, _ = phash.signature_pil(img)
        cells = np.frombuffer(sig, np.uint8).reshape(16, 3).astype(int)
        lab = rgb2lab(np.array([[(128, 128, 128)]], np.uint8))[0, 0]
        assert np.abs(cells[:, 0] - round(lab[0] * 2.55)).max() <= 1, mode
        assert set(cells[:, 1].tolist()) <= {127, 128, 129} and set(cells[:, 2].tolist()) <= {127, 128, 129}, mode


def test_a_batch_gives_each_image_its_own_three_signals():
    rng = np.random.default_rng(6)
    blobs = []
    for i in range(4):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (50 + 10 * i, 70, 3), dtype=np.uint8)).save(buf, "PNG")
        blobs.append(buf.getvalue())
    batch = phash.signatures_bytes([blobs[0], None, *blobs[1:], b"junk"])
    single = [phash.signatures_bytes([b])[0] for b in blobs]
    assert batch == [single[0], None, *single[1:], None]
    assert all(len(s[1]) == phash.COLOR_BYTES and len(s[2]) == phash.CROP_BYTES for s in single)


def test_min3_equals_pillows_min_filter_and_erodes_from_the_edge():
    """The numpy 3x3 minimum against Pillow's MinFilter(3) (which repeats the edge pixels outward), on
    random and on sparse images of several shapes, thin ones included."""
    from PIL import ImageFilter

    rng = np.random.default_rng(5)
    for shape in [(1, 1), (1, 7), (5, 1), (2, 3), (17, 31), (64, 40)]:
        for a in (rng.integers(0, 256, shape), np.where(rng.random(shape) < 0.9, 255, 0)):
            a = a.astype(np.uint8)
            want = np.asarray(Image.fromarray(a).filter(ImageFilter.MinFilter(3)))
            assert np.array_equal(phash._min3(a), want), shape
    block = np.zeros((6, 6), np.uint8)
    block[1:4, 1:4] = 1  # a 3x3 block keeps only its centre; one along the edge keeps its edge row
    assert phash._min3(block).nonzero() == (np.array([2]), np.array([2]))
    edge = np.zeros((6, 6), np.uint8)
    edge[0:2, 0:3] = 1
    assert sorted(zip(*phash._min3(edge).nonzero(), strict=True)) == [(0, 0), (0, 1)]


def test_line_art_means_a_white_page_with_strokes_thinner_than_three_pixels():
    """By hand: a page with 1 px lines is line art; the same page with 5 px bars is not (most of the
    ink survives a 3x3 erosion); a mostly dark image is not, whatever its strokes."""
    page = np.full((60, 60), 255, np.uint8)
    thin = page.copy()
    thin[::6, :] = 0
    thick = page.copy()
    for r in range(0, 60, 12):
        thick[r : r + 5, :] = 0
    assert phash._is_line_art(thin)
    assert not phash._is_line_art(thick)
    assert not phash._is_line_art(255 - page)
    assert not phash._is_line_art(page)  # no ink at all


def test_dct_rows_are_scipys_unnormalised_dct_basis():
    """The module's DCT rows against scipy: row k is the DCT-II of the unit vectors' k-th output."""
    basis = dct(np.eye(phash.IMG_SIZE), axis=0, type=2)[: phash.HASH_SIZE]
    assert np.allclose(phash._dct_rows(), basis, atol=1e-12)
    assert np.allclose(phash._C, basis, atol=1e-12) and np.allclose(phash._CT, basis.T, atol=1e-12)


def _pillow_lanczos32(gray: Image.Image) -> np.ndarray:
    """Pillow's Lanczos resize to 32x32 as two one-axis resizes, horizontal first: the pass order
    phash fixes (Pillow 13 picks its own order for some shapes taller than wide)."""
    w, h = gray.size
    return np.asarray(gray.resize((32, h), Image.Resampling.LANCZOS).resize((32, 32), Image.Resampling.LANCZOS))


@pytest.mark.parametrize("seed", range(3))
def test_lanczos_equals_pillows_two_one_axis_resizes(seed):
    """The matrix Lanczos against Pillow on random, binary and smooth pixels of many shapes: shrinking
    and enlarging, one side already 32 (that pass skipped), single rows and columns, tall and wide."""
    rng = np.random.default_rng(seed)
    shapes = [(1, 1), (1, 40), (40, 1), (32, 32), (32, 97), (97, 32), (31, 33), (124, 124), (128, 128),
              (191, 96), (96, 191), (250, 21), (21, 250), (1000, 333)]
    shapes += [tuple(int(v) for v in rng.integers(1, 300, 2)) for _ in range(12)]
    for h, w in shapes:
        for a in (rng.integers(0, 256, (h, w)), np.where(rng.random((h, w)) < 0.5, 0, 255),
                  np.add.outer(np.arange(h), np.arange(w)) * (seed + 3) % 256):
            a = a.astype(np.uint8)
            want = _pillow_lanczos32(Image.fromarray(a))
            assert np.array_equal(phash._lanczos(a, 32), want), (h, w)
            if h <= w:  # no taller than wide: every Pillow runs the horizontal pass first
                assert np.array_equal(phash._lanczos(a, 32), np.asarray(
                    Image.fromarray(a).resize((32, 32), Image.Resampling.LANCZOS))), (h, w)


def test_lanczos_of_a_view_equals_that_of_its_copy():
    """A crop is a strided view of the grey image; the resize must read it as the cropped pixels."""
    a = np.random.default_rng(9).integers(0, 256, (130, 140)).astype(np.uint8)
    view = a[3:127, 5:129]
    assert not view.flags.c_contiguous
    assert np.array_equal(phash._lanczos(view, 32), phash._lanczos(view.copy(), 32))
    assert np.array_equal(phash._lanczos(view, 32), _pillow_lanczos32(Image.fromarray(view.copy())))


def _line_art_reference(gray: Image.Image) -> np.ndarray:
    """Line-art hash pixels written from Pillow's parts: short side scaled to 128 (box filter when
    shrinking, bilinear when enlarging), a 3x3 minimum filter, then the 32x32 Lanczos resize."""
    from PIL import ImageFilter

    w, h = gray.size
    r = 128 / min(w, h)
    if r != 1:
        gray = gray.resize((max(1, round(w * r)), max(1, round(h * r))),
                           Image.Resampling.BOX if r < 1 else Image.Resampling.BILINEAR)
    return _pillow_lanczos32(gray.filter(ImageFilter.MinFilter(3)))


@pytest.mark.parametrize("size", [(300, 200), (128, 128), (64, 90), (100, 150), (1000, 130)])
def test_line_art_pixels_are_thickened_at_one_scale(size):
    """A thin-line drawing is scaled to short side 128 and thickened before the hash resize, at every
    input size (shrunk, exact, enlarged); a filled picture of the same size is not touched."""
    w, h = size
    img = Image.new("L", size, 255)
    d = ImageDraw.Draw(img)
    for i in range(0, max(w, h), 9):
        d.line([(i, 0), (0, i)], fill=0, width=1)
    assert phash._is_line_art(np.asarray(img))
    got = phash._hash_pixels(img)
    assert np.array_equal(got, _line_art_reference(img))
    plain = np.asarray(img.resize((32, 32), Image.Resampling.LANCZOS))
    assert not np.array_equal(got, plain)  # thickening changed the pixels the DCT sees
    assert got.mean() < plain.mean() - 10  # thicker (darker) strokes, not just different ones
    filled = Image.new("L", size, 40)
    ImageDraw.Draw(filled).ellipse([w // 4, h // 4, 3 * w // 4, 3 * h // 4], fill=200)
    assert np.array_equal(phash._hash_pixels(filled), _pillow_lanczos32(filled))


def test_each_crop_of_a_line_drawing_is_hashed_as_a_line_drawing():
    """The crop hashes of a thin-line drawing equal the reference pipeline run on each crop box."""
    img = Image.new("RGB", (260, 180), "white")
    d = ImageDraw.Draw(img)
    for i in range(0, 260, 11):
        d.line([(i, 0), (i // 2, 179)], fill=(30, 30, 200), width=1)
    _, _, crops = phash.signature_pil(img)
    gray = img.convert("L")
    want = [reference_hash(_line_art_reference(gray.crop(b)).astype(np.float64)) for b in phash._crop_boxes(*gray.size)]
    assert [int.from_bytes(crops[8 * i: 8 * i + 8], "little") for i in range(5)] == want


def _page(shape=(60, 60)) -> np.ndarray:
    return np.full(shape, 255, np.uint8)


def test_line_art_limits_white_fraction_level_and_core_share():
    """Each limit of the line-art rule at, below and above it, on hand-built pages."""
    half = _page((40, 40))
    half[:, ::2] = 0  # 1 px stripes: exactly half white, no ink survives erosion
    assert phash._is_line_art(half)  # white fraction 0.5 is enough (the rule is "< 0.5 is not")
    third = _page((60, 60))
    third[:, np.arange(60) % 3 != 0] = 0  # 2 px stripes: one third white, still no core
    assert not phash._is_line_art(third)  # too little page, however thin the ink
    level = np.full((60, 60), 235, np.uint8)  # 235 counts as page (white), 234 as ink
    level[::6, :] = 0
    assert phash._is_line_art(level)
    level[level == 235] = 234
    assert not phash._is_line_art(level)
    dot = _page()
    dot[30, 30] = 0  # one ink pixel: all of its ink is within a pixel of the page
    assert phash._is_line_art(dot)
    block = _page()
    block[10:14, 10:15] = 0  # 4x5 block: 20 ink pixels, 6 of them keep a full 3x3 of ink = 30%, not < 30%
    assert not phash._is_line_art(block)
    block[10:14, 14] = 255  # 4x4: 16 ink, 4 core = 25%
    assert phash._is_line_art(block)
    mixed = _page()
    mixed[::5, :] = 0
    mixed[20:23, 20:23] = 0  # thin strokes plus one 3x3 blob: a core of one pixel among hundreds of ink
    assert phash._is_line_art(mixed)


def test_undecodable_rows_are_logged_with_their_index_and_reason(caplog):
    import logging

    blob = io.BytesIO()
    Image.new("RGB", (800, 600), (1, 2, 3)).save(blob, "JPEG")
    with caplog.at_level(logging.DEBUG, logger="curate.phash"):
        out = phash.signatures_bytes([blob.getvalue(), b"not an image", blob.getvalue()], max_pixels=100)
    assert out == [None, None, None]
    msgs = [r.getMessage() for r in caplog.records if r.name == "curate.phash"]
    assert msgs[0] == "phash: image 0 does not decode: 200x150 exceeds 100 pixels"
    assert msgs[1].startswith("phash: image 1 does not decode: ") and len(msgs) == 3


@pytest.mark.parametrize("shape", [(2, 16, 16), (32, 32), (1, 32, 33)])
def test_hash_input_of_the_wrong_shape_is_refused_by_name(shape):
    with pytest.raises(ValueError, match=re.escape(f"expected (N, 32, 32) pixels, got {shape}")):
        phash.hashes_from_pixels(np.zeros(shape, np.uint8))


def _shape_on(bg: str, size=(120, 90)) -> Image.Image:
    img = Image.new("RGB", size, bg)
    ImageDraw.Draw(img).polygon([(10, 80), (60, 5), (110, 70)], fill=(200, 30, 30))
    return img


def test_palette_transparency_is_composited_over_white():
    """A palette image whose background index is transparent (its colour black) hashes as the same
    drawing on white; without transparency the palette's black is what a viewer sees."""
    white = phash.signature_pil(_shape_on("white"))
    pal = _shape_on("black").quantize(colors=4)
    black_index = int(np.asarray(pal)[0, 0])
    pal.info["transparency"] = black_index
    assert phash.signature_pil(pal)[0] == white[0]
    assert phash.color_distance(np.frombuffer(phash.signature_pil(pal)[1], np.uint8),
                                np.frombuffer(white[1], np.uint8))[0] < 3
    del pal.info["transparency"]
    assert phash.signature_pil(pal)[0] == phash.signature_pil(_shape_on("black"))[0] != white[0]
    pa = _shape_on("black").quantize(colors=4).convert("PA")
    alpha = np.where(np.asarray(pa.convert("RGB")).sum(-1) == 0, 0, 255).astype(np.uint8)
    pa.putalpha(Image.fromarray(alpha))
    assert pa.mode == "PA" and phash.signature_pil(pa)[0] == white[0]


def test_an_animated_image_hashes_as_its_first_frame():
    first, second = _shape_on("white"), Image.new("RGB", (120, 90), (20, 90, 20))
    ImageDraw.Draw(second).ellipse([5, 5, 60, 80], fill="white")
    buf = io.BytesIO()
    first.save(buf, "GIF", save_all=True, append_images=[second], duration=100, loop=0)
    got = phash.signatures_bytes([buf.getvalue()])[0]
    one = io.BytesIO()
    Image.open(buf).convert("RGB").save(one, "PNG")  # frame 0 as its own picture
    assert got[0] == phash.signatures_bytes([one.getvalue()])[0][0]
    assert Image.open(buf).n_frames == 2 and got[0] != phash.signature_pil(second)[0]


def test_colour_signature_has_no_offset_against_scikit_image():
    """Over 500 random colours the signature's L*, a*, b* bytes agree with scikit-image within 1 and
    without a systematic shift (a wrong offset of a* or b* moves every value by the same amount);
    black is L* 0 exactly."""
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (500, 3)).astype(np.uint8)
    got = np.stack([np.frombuffer(phash.signature_pil(Image.new("RGB", (8, 8), tuple(int(v) for v in c)))[1],
                                  np.uint8)[:3] for c in rgb]).astype(float)
    lab = rgb2lab(rgb[None])[0]
    want = np.stack([lab[:, 0] * 2.55, lab[:, 1] + 128, lab[:, 2] + 128], -1)
    assert np.abs(got - want).max() <= 1.01
    assert np.abs((got - want).mean(axis=0)).max() < 0.1
    assert np.frombuffer(phash.signature_pil(Image.new("RGB", (8, 8), (0, 0, 0)))[1], np.uint8)[0] == 0
