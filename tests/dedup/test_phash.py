"""pHash: agreement with imagehash's definition, robustness to edits, bad bytes."""

from __future__ import annotations

import io

import imagehash
import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageEnhance

from curate import phash


def _photo(seed: int, size=(320, 240)) -> Image.Image:
    """A textured image with structure at several scales (smooth blobs plus edges)."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    img = np.zeros((h, w, 3))
    for _ in range(12):
        cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.4)
        col = rng.uniform(0, 255, 3)
        mask = ((x - cx) ** 2 + (y - cy) ** 2) < r * r
        img[mask] = 0.5 * img[mask] + 0.5 * col
    img += rng.normal(0, 4, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _jpeg(img: Image.Image, quality=90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def test_matches_imagehash_on_small_images():
    # Below 2 x REDUCE_TO px no reduction happens, so our pixels are imagehash's pixels: same bits.
    for seed in range(20):
        img = _photo(seed, (120, 100))
        assert phash.to_hex(phash.phash_pil(img)) == str(imagehash.phash(img))


def test_bytes_path_close_to_imagehash_and_pil_path():
    for seed in range(10):
        img = _photo(seed, (800, 600))
        blob = _jpeg(img)
        ours = phash.phash_bytes([blob])[0]
        ref = int(str(imagehash.phash(Image.open(io.BytesIO(blob)))), 16)
        decoded = phash.phash_pil(Image.open(io.BytesIO(blob)))
        assert phash.hamming(ours, ref) <= 4
        assert phash.hamming(ours, decoded) <= 4


def test_near_duplicates_close_distinct_far():
    base = _photo(1, (640, 480))
    h0 = phash.phash_pil(base)
    edits = {
        "resized": base.resize((320, 240), Image.Resampling.BICUBIC),
        "jpeg_q30": Image.open(io.BytesIO(_jpeg(base, 30))),
        "brightness": ImageEnhance.Brightness(base).enhance(1.15),
        "crop": base.crop((8, 6, 632, 474)),
    }
    over = base.copy()
    ImageDraw.Draw(over).text((20, 20), "SAMPLE TEXT", fill=(255, 255, 255))
    edits["text"] = over
    for name, img in edits.items():
        assert phash.hamming(h0, phash.phash_pil(img)) <= 8, name
    others = [phash.phash_pil(_photo(s, (640, 480))) for s in range(2, 12)]
    assert min(phash.hamming(h0, h) for h in others) > 12


def test_batch_equals_single_and_bad_input_is_none():
    blobs = [_jpeg(_photo(s)) for s in range(5)]
    png = io.BytesIO()
    _photo(9).convert("P").save(png, "PNG")
    blobs += [b"not an image", None, blobs[0][: len(blobs[0]) // 3], png.getvalue()]
    got = phash.phash_bytes(blobs)
    assert got[:5] == [phash.phash_bytes([b])[0] for b in blobs[:5]]
    assert got[5] is None and got[6] is None
    assert got[8] is not None  # palette PNG
    assert all(h is None or 0 <= h < 2**64 for h in got)


def test_pixel_cap():
    blob = _jpeg(_photo(3, (800, 600)))
    # JPEG is decoded at 1/4 scale here (200x150 = 30,000 px): the cap applies to that.
    assert phash.phash_bytes([blob], max_pixels=29_999) == [None]
    assert phash.phash_bytes([blob], max_pixels=30_000)[0] is not None


def test_flat_image_is_deterministic():
    a = phash.phash_pil(Image.new("L", (300, 300), 128))
    b = phash.phash_pil(Image.new("RGB", (64, 64), (10, 200, 30)))
    assert a == b == 1 << 63  # only the DC coefficient is above the (zero) median


def test_hashes_from_pixels_shape_and_hamming_np():
    px = np.random.default_rng(0).integers(0, 255, (7, 32, 32), dtype=np.uint8)
    hs = phash.hashes_from_pixels(px)
    assert hs.dtype == np.uint64 and hs.shape == (7,)
    assert [int(x) for x in phash.hamming_np(hs, hs[0])] == [phash.hamming(int(h), int(hs[0])) for h in hs]
    with pytest.raises(ValueError):
        phash.hashes_from_pixels(np.zeros((2, 16, 16)))


def test_transparent_background_hashes_visible_content():
    # Two different shapes on transparent black: ignoring alpha would hash both as all-black.
    a = Image.new("RGBA", (120, 120), (0, 0, 0, 0))
    ImageDraw.Draw(a).ellipse((10, 10, 60, 60), fill=(200, 30, 30, 255))
    b = Image.new("RGBA", (120, 120), (0, 0, 0, 0))
    ImageDraw.Draw(b).rectangle((50, 60, 110, 110), fill=(30, 30, 200, 255))
    ha, hb = phash.phash_pil(a), phash.phash_pil(b)
    assert phash.hamming(ha, hb) > 12
    buf = io.BytesIO()
    a.save(buf, "PNG")
    assert phash.phash_bytes([buf.getvalue()])[0] == ha


def test_draft_then_pil_equals_bytes_path():
    blob = _jpeg(_photo(4, (800, 600)))
    img = Image.open(io.BytesIO(blob))
    phash.draft(img)
    img.load()
    assert img.size == (200, 150)  # 1/4 scale: the short side stays >= REDUCE_TO
    assert phash.phash_pil(img) == phash.phash_bytes([blob])[0]


def test_alpha_is_composited_over_white_not_dropped():
    # The colour under fully transparent pixels is arbitrary (here noise): what a viewer sees is the
    # drawing on white, and that is what both signals must describe.
    rng = np.random.default_rng(5)
    noise = rng.integers(0, 256, (200, 200, 4), dtype=np.uint8)
    noise[..., 3] = 0
    hidden = Image.fromarray(noise, "RGBA")
    ImageDraw.Draw(hidden).ellipse((30, 40, 170, 150), fill=(200, 30, 30, 255))
    seen = Image.new("RGB", (200, 200), (255, 255, 255))
    ImageDraw.Draw(seen).ellipse((30, 40, 170, 150), fill=(200, 30, 30))
    assert phash.signature_pil(hidden) == phash.signature_pil(seen)
    buf = io.BytesIO()
    hidden.save(buf, "PNG")
    assert phash.signatures_bytes([buf.getvalue()])[0] == phash.signature_pil(seen)


def test_crop_hashes_are_the_hashes_of_the_crops():
    """The five crop hashes are the pHashes of the corners and the centre keeping 97% of each side
    (boxes computed here by hand), in that order, and both paths (decoded image, bytes) agree."""
    rng = np.random.default_rng(3)
    img = Image.fromarray(rng.integers(0, 255, (150, 300, 3), dtype=np.uint8)).resize((600, 300))
    w, h = img.size  # 600 x 300: reduced by 2 to 300 x 150 before hashing
    small = img.reduce(2)
    sw, sh = small.size
    cw, ch = round(sw * 0.97), round(sh * 0.97)
    boxes = [(0, 0, cw, ch), (sw - cw, 0, sw, ch), (0, sh - ch, cw, sh), (sw - cw, sh - ch, sw, sh),
             ((sw - cw) // 2, (sh - ch) // 2, (sw - cw) // 2 + cw, (sh - ch) // 2 + ch)]
    want = [phash.phash_pil(small.crop(b)) for b in boxes]
    full, _, crops = phash.signature_pil(img)
    assert list(np.frombuffer(crops, "<u8")) == want
    assert full == phash.phash_pil(img) and full not in want
    buf = io.BytesIO()
    img.save(buf, "PNG")
    assert phash.signatures_bytes([buf.getvalue()])[0] == (full, phash.signature_pil(img)[1], crops)


def test_crop_distance_is_the_closest_crop():
    crops = np.array([[0b1111, 0b1, 0b11, 0, 0b111]], dtype=np.uint64)
    assert phash.crop_distance(crops, np.array([0b1000000], np.uint64)).tolist() == [1]
    assert phash.crop_distance(crops, np.array([0b1111], np.uint64)).tolist() == [0]
    h, ok = phash.crops_from_bytes([phash.crops_to_bytes([1, 2, 3, 4, 2**64 - 1]), None, b"short"])
    assert h[0].tolist() == [1, 2, 3, 4, 2**64 - 1] and ok.tolist() == [True, False, False]
