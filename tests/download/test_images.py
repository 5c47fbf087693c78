"""Image checks and img2dataset-compatible resizing, on real encoded images."""

from __future__ import annotations

import io

import pytest
from dlserver import animated_gif, exif_rotated_jpeg, make_image, png_bomb
from PIL import Image

from curate.images import ImageConfig, process_image, target_size


def decode(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


@pytest.mark.parametrize(("mode", "src", "want"), [
    ("keep_ratio", (640, 480), (341, 256)),
    ("keep_ratio_largest", (640, 480), (256, 192)),
    ("center_crop", (640, 480), (256, 256)),
    ("border", (640, 480), (256, 256)),
    ("fixed", (640, 480), (256, 256)),
    ("keep_ratio", (100, 50), (512, 256)),  # upscales unless resize_only_if_bigger
])
def test_resize_modes_geometry(mode, src, want):
    p = process_image(make_image("jpg", src), ImageConfig(resize_mode=mode, image_size=256))
    assert p.status == "success", p.error
    assert (p.width, p.height) == want
    assert decode(p.data).size == want
    assert (p.original_width, p.original_height) == src
    assert p.ext == "jpg" and p.data[:2] == b"\xff\xd8"


def test_border_pads_white_and_keeps_content_centred():
    p = process_image(make_image("png", (200, 100), (0, 0, 255)), ImageConfig(resize_mode="border", image_size=100))
    img = decode(p.data).convert("RGB")
    assert img.size == (100, 100)
    top = img.getpixel((50, 5))
    assert all(c > 240 for c in top)  # white band above the 100x50 picture
    mid = img.getpixel((51, 50))
    assert mid[2] > 200 and mid[0] < 60  # blue picture in the middle


def test_resize_only_if_bigger_keeps_original_bytes():
    src = make_image("png", (100, 80))
    p = process_image(src, ImageConfig(resize_mode="keep_ratio", image_size=256, resize_only_if_bigger=True))
    assert p.status == "success" and p.data == src and p.ext == "png"
    assert (p.width, p.height) == (100, 80)


def test_no_resize_keeps_original_bytes_of_each_format():
    for fmt in ("jpg", "png", "webp"):
        src = make_image(fmt, (90, 70))
        p = process_image(src, ImageConfig(resize_mode="no"))
        assert p.data == src and p.ext == fmt, fmt
    # formats tar readers do not all accept are re-encoded to the output format
    p = process_image(make_image("gif", (50, 40)), ImageConfig(resize_mode="no", output_format="png"))
    assert p.ext == "png" and decode(p.data).format == "PNG" and (p.width, p.height) == (50, 40)
    p = process_image(make_image("png", (90, 70)), ImageConfig(resize_mode="no", reencode=True, output_format="webp"))
    assert p.ext == "webp" and decode(p.data).format == "WEBP"


def test_exif_orientation_applied():
    p = process_image(exif_rotated_jpeg(), ImageConfig(resize_mode="no"))
    assert p.status == "success"
    assert (p.width, p.height) == (20, 40) and (p.original_width, p.original_height) == (20, 40)
    img = decode(p.data)
    assert img.size == (20, 40)
    assert img.getexif().get(0x0112, 1) == 1  # stored upright, no orientation left to apply


def test_jpeg_draft_shrink_gives_exact_target():
    src = make_image("jpg", (2000, 1500))
    p = process_image(src, ImageConfig(resize_mode="keep_ratio_largest", image_size=200))
    assert (p.width, p.height) == (200, 150)
    assert (p.original_width, p.original_height) == (2000, 1500)


def test_alpha_matted_on_white():
    p = process_image(make_image("png", (64, 64), (255, 0, 0, 0), "RGBA"), ImageConfig(resize_mode="no"))
    img = decode(p.data).convert("RGB")
    assert p.ext == "jpg"
    assert all(c > 240 for c in img.getpixel((3, 3)))  # fully transparent red -> white


def test_bad_bytes_fail_to_decode():
    html = b"<html>" + b"x" * 500
    truncated = make_image("jpg", (640, 480))[:2000]
    for data in (html, truncated, b""):
        p = process_image(data, ImageConfig())
        assert p.status == "failed_to_decode" and p.data is None, p.error


def pillow_bytes_allocated(fn):
    """Run fn; return (its result, bytes of image memory Pillow allocated meanwhile). Pillow keeps its
    own count of the blocks it hands to images (tracemalloc does not see them)."""
    def blocks():
        s = Image.core.get_stats()
        return s["allocated_blocks"] + s["reused_blocks"] + s["reallocated_blocks"]

    before = blocks()
    out = fn()
    return out, (blocks() - before) * Image.core.get_block_size()


def test_pixel_bomb_refused_from_header():
    p, used = pillow_bytes_allocated(lambda: process_image(png_bomb(50_000, 50_000),
                                                           ImageConfig(max_pixels=100_000_000)))
    assert p.status == "failed_to_decode" and "bomb" in p.error
    assert used == 0
    # below Pillow's own limit: only our cap stands between the header and a 432 MB RGB buffer
    p, used = pillow_bytes_allocated(lambda: process_image(png_bomb(12_000, 12_000),
                                                           ImageConfig(max_pixels=100_000_000)))
    assert p.status == "failed_to_decode" and "144000000 pixels" in p.error
    assert used == 0, f"{used / 2**20:.0f} MiB of image memory allocated while refusing a bomb"
    # the measure sees a decode: the same file under a cap that lets it through allocates the buffer
    p, used = pillow_bytes_allocated(lambda: process_image(png_bomb(12_000, 12_000),
                                                           ImageConfig(max_pixels=200_000_000)))
    assert p.status == "failed_to_decode" and used >= 12_000 * 12_000 * 3


def test_multi_frame_bomb_refused_from_header():
    data = animated_gif(12)  # 12 frames of 500x500
    cfg = ImageConfig(resize_mode="no", max_pixels=1_000_000, max_total_pixels=2_000_000)
    p = process_image(data, cfg)
    assert p.status == "failed_to_decode" and "12 frames" in p.error
    ok = process_image(animated_gif(2), cfg)
    assert ok.status == "success" and (ok.width, ok.height) == (500, 500)


def test_size_and_aspect_filters():
    assert process_image(make_image("png", (30, 30)), ImageConfig(min_image_size=50)).error == "image too small"
    assert process_image(make_image("png", (300, 30)), ImageConfig(max_aspect_ratio=3)).error == "aspect ratio too large"
    p = process_image(make_image("png", (300, 300)), ImageConfig(max_image_area=10_000))
    assert p.status == "failed_to_resize" and p.error == "image area too large"


def test_png_and_webp_output():
    for fmt, magic in (("png", b"\x89PNG"), ("webp", b"RIFF")):
        p = process_image(make_image("jpg", (400, 300)), ImageConfig(output_format=fmt, encode_quality=80 if fmt == "webp" else 6))
        assert p.ext == fmt and p.data[:4] == magic


def test_target_size_matches_img2dataset_rules():
    assert target_size(640, 480, ImageConfig(resize_mode="no")) is None
    assert target_size(100, 80, ImageConfig(resize_mode="border", image_size=256, resize_only_if_bigger=True)) is None
    assert target_size(300, 80, ImageConfig(resize_mode="border", image_size=256, resize_only_if_bigger=True)) == (256, 68)


def test_png_quality_is_a_compression_level():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="compression level 0-9"):
        ImageConfig(output_format="png", encode_quality=95)
    assert ImageConfig(output_format="png").quality == 3 and ImageConfig().quality == 95
