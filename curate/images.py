"""Image checks and resizing for the download stage: header probe, pixel-bomb guard, decode, EXIF
orientation, img2dataset-compatible resize modes, encode.

:func:`open_image` is the one way curate opens image bytes, in every stage and in the report: only
the formats of a fixed allowlist are parsed (a "jpg" that is really EPS, ICO or any other format Pillow
or an external tool could render is refused before any decoder runs), and the declared pixel count is
checked from the header before a pixel is decoded.

The order matters for safety and speed: the header is read first (Pillow's ``open`` parses only the
header), the declared pixel count (times the frame count for animated or multi-frame files) is checked
before any pixel is decoded, JPEGs that will be shrunk are decoded at 1/2, 1/4 or 1/8 scale in the DCT
domain (``Image.draft``), and the original bytes are kept when nothing about the pixels changes.

Geometry follows img2dataset's resizer: ``keep_ratio`` and ``center_crop`` size the smaller side,
``border``, ``keep_ratio_largest`` and ``fixed`` the larger one; ``border`` pads to a white square;
``resize_only_if_bigger`` never upscales; transparent images are matted on white.

Pillow-SIMD, when installed in place of Pillow, is used as is (same API, faster resize); nothing here
depends on which one is present.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import re
import warnings
from typing import Literal

from PIL import Image, ImageOps
from pydantic import Field, model_validator

from curate.stage import Frozen

log = logging.getLogger(__name__)

# We enforce our own, stricter pixel limit from the header (below); Pillow's warning for images above
# its default limit would only be noise, and its hard error (at 2x its limit) is caught as a bomb.
warnings.simplefilter("ignore", Image.DecompressionBombWarning)

Interpolation = Literal["nearest", "linear", "bilinear", "cubic", "bicubic", "area", "lanczos", "lanczos4"]
# img2dataset's OpenCV names -> Pillow filters ("area" averages source pixels: Pillow's BOX).
_FILTERS = {
    "nearest": Image.Resampling.NEAREST, "linear": Image.Resampling.BILINEAR,
    "bilinear": Image.Resampling.BILINEAR, "cubic": Image.Resampling.BICUBIC,
    "bicubic": Image.Resampling.BICUBIC, "area": Image.Resampling.BOX,
    "lanczos": Image.Resampling.LANCZOS, "lanczos4": Image.Resampling.LANCZOS,
}
ResizeMode = Literal["no", "border", "keep_ratio", "keep_ratio_largest", "center_crop", "fixed"]
OutputFormat = Literal["jpg", "png", "webp"]

# Pillow format name -> tar member extension, for the formats we store without re-encoding.
KEEPABLE = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
# The formats any stage parses at all, as Pillow names them: the web's image formats. Everything else
# (EPS and PostScript, which Pillow hands to Ghostscript; ICO/CUR, whose header declares a small size
# for an embedded PNG of any size; PSD, XBM, ...) is refused before its plugin sees a byte. A stage
# config may narrow this list, never widen it.
SAFE_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
# A JPEG carrying several pictures (MPO) is opened by the JPEG plugin and named MPO.
_ALSO = {"JPEG": ("MPO",)}
DEFAULT_MAX_PIXELS = 100_000_000
ImageFormat = Literal["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"]
_SAVE = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
_ORIENTATION = 0x0112


def pillow_simd() -> bool:
    """True when the installed PIL is Pillow-SIMD (its versions carry a ``.postN`` suffix)."""
    import PIL

    return ".post" in PIL.__version__


class ImageConfig(Frozen):
    """How downloaded images are checked and stored (img2dataset names where img2dataset has one)."""

    image_size: int = Field(256, ge=1)
    resize_mode: ResizeMode = "border"
    resize_only_if_bigger: bool = False
    # img2dataset's defaults: area averaging to shrink (fast, alias-free), Lanczos to enlarge.
    downscale_interpolation: Interpolation = "area"
    upscale_interpolation: Interpolation = "lanczos"
    output_format: OutputFormat = "jpg"
    # jpg/webp: quality 0-100 (default 95); png: zlib compression level 0-9 (default 3), as img2dataset.
    encode_quality: int | None = Field(None, ge=0, le=100)
    # Re-encode even when the pixels are unchanged and the source is jpg/png/webp.
    reencode: bool = False
    min_image_size: int = Field(0, ge=0)
    # None: no limit (img2dataset's inf; None keeps the resolved config plain JSON).
    max_image_area: float | None = Field(None, gt=0)
    max_aspect_ratio: float | None = Field(None, gt=0)
    # Decompression-bomb guard, checked from the header before decoding: pixels of one frame, and
    # pixels summed over all frames of an animated / multi-frame file.
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1)
    max_total_pixels: int = Field(400_000_000, ge=1)
    # Formats accepted at all (a subset of SAFE_FORMATS); anything else is failed_to_decode unread.
    formats: tuple[ImageFormat, ...] = Field(SAFE_FORMATS, min_length=1)

    @model_validator(mode="after")
    def _png_level(self) -> ImageConfig:
        if self.output_format == "png" and self.encode_quality is not None and self.encode_quality > 9:
            raise ValueError(f"encode_quality for png is a compression level 0-9, got {self.encode_quality}")
        return self

    @property
    def quality(self) -> int:
        if self.encode_quality is not None:
            return self.encode_quality
        return 3 if self.output_format == "png" else 95


@dataclasses.dataclass
class Processed:
    """Outcome for one image: ``data`` is None when it failed; ``status`` says why (img2dataset values)."""

    status: str
    error: str | None = None
    data: bytes | None = None
    ext: str | None = None
    width: int | None = None
    height: int | None = None
    original_width: int | None = None
    original_height: int | None = None
    image: Image.Image | None = None  # the stored pixels, for cheap signals (pHash); dropped by caller
    decode_seconds: float = 0.0
    resize_seconds: float = 0.0


_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")


def error_text(e: BaseException) -> str:
    """``Type: message`` of a decoder's exception, without object reprs (Pillow names the stream it
    read, ``<_io.BytesIO object at 0x7f...>``): reasons are data, the same on every run."""
    return f"{type(e).__name__}: {_OBJECT_REPR.sub('the image', str(e))}"


class ImageRejected(ValueError):
    """The bytes are an image we refuse to store; ``status`` is the img2dataset-style status."""

    def __init__(self, status: str, message: str, why: str = "undecodable"):
        super().__init__(_OBJECT_REPR.sub("the image", message))
        self.status = status
        self.why = why  # "too_many_pixels" or "undecodable": the reason for callers without statuses


def target_size(w: int, h: int, cfg: ImageConfig) -> tuple[int, int] | None:
    """Size the image is scaled to before any crop or pad, or None when it is not scaled."""
    size = cfg.image_size
    mode = cfg.resize_mode
    if mode == "no":
        return None
    if mode in ("keep_ratio", "center_crop"):
        side = min(w, h)
        if cfg.resize_only_if_bigger and side <= size:
            return None
        scale = size / side
    else:  # border, keep_ratio_largest, fixed: the larger side
        side = max(w, h)
        if cfg.resize_only_if_bigger and side <= size:
            return None
        if mode == "fixed":
            return (size, size)
        scale = size / side
    # Round as albumentations' smallest/longest_max_size does, never to zero.
    return (max(1, round(w * scale)), max(1, round(h * scale)))


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS,
               formats: tuple[str, ...] = SAFE_FORMATS) -> Image.Image:
    """Open an image's header (nothing decoded yet): only a format in ``formats`` (within
    SAFE_FORMATS) is parsed, and more than ``max_pixels`` declared is refused; raises ImageRejected.

    Every path that decodes image bytes (download, import, pHash, CLIP, recaption, faces, the report)
    opens them here, so the allowlist and the pixel cap hold before any decoder or external tool runs.
    Pillow's own bomb warning is silenced: the limit here is the one that counts."""
    allowed = [f for f in formats if f in SAFE_FORMATS]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data), formats=allowed)
        except Image.DecompressionBombError as e:
            raise ImageRejected("failed_to_decode", f"decompression bomb: {e}", "too_many_pixels") from None
        except Image.UnidentifiedImageError:
            raise ImageRejected("failed_to_decode", "not an image in an accepted format "
                                f"({', '.join(allowed)})") from None
        except Exception as e:  # noqa: BLE001 - any parser error means "not an image we can read"
            raise ImageRejected("failed_to_decode", f"not a decodable image: {error_text(e)}") from None
    if img.format not in allowed and not any(img.format in _ALSO.get(f, ()) for f in allowed):
        raise ImageRejected("failed_to_decode", f"image format {img.format} is not accepted")
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageRejected("failed_to_decode", f"invalid size {w}x{h}")
    if w * h > max_pixels:
        raise ImageRejected("failed_to_decode", f"decompression bomb: {w}x{h} = {w * h} pixels > {max_pixels}",
                            "too_many_pixels")
    return img


def sniff(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> str | None:
    """The tar member extension (jpg, png, webp, gif, bmp, tiff) of ``data`` judged from its bytes
    alone, or None when they are not an accepted image. Never decodes pixels."""
    try:
        img = open_image(data, max_pixels)
    except ImageRejected:
        return None
    return _EXT.get(img.format)


_EXT = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff"}


def probe(data: bytes, cfg: ImageConfig) -> Image.Image:
    """Open (header only) and enforce the pixel and frame limits; raises ImageRejected."""
    img = open_image(data, cfg.max_pixels, cfg.formats)
    w, h = img.size
    try:
        # Frame counts come from the container headers (GIF/TIFF/APNG/WebP), not from decoding.
        frames = int(getattr(img, "n_frames", 1) or 1)
    except Exception as e:  # noqa: BLE001
        raise ImageRejected("failed_to_decode", f"unreadable frames: {error_text(e)}") from None
    if frames > 1:
        img.seek(0)
    if w * h * frames > cfg.max_total_pixels:
        raise ImageRejected(
            "failed_to_decode",
            f"decompression bomb: {frames} frames of {w}x{h} > {cfg.max_total_pixels} pixels in total")
    return img


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(_ORIENTATION, 1) or 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block is not a reason to lose the image
        return 1


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img if img.mode == "RGBA" else img.convert("RGBA")
        # Matte on white, as img2dataset does, so transparent areas do not turn black in JPEG. An
        # RGBA mask is its alpha band: no copy of the image or of the band is made.
        bg = Image.new("RGB", rgba.size, (255, 255, 255))
        bg.paste(rgba, mask=rgba)
        return bg
    if img.mode == "I;16" or img.mode.startswith("I;16"):
        img = img.point(lambda v: v / 256).convert("L")  # 16-bit grey: keep the high byte
    return img.convert("RGB")


def process_image(data: bytes, cfg: ImageConfig, keep_image: bool = False) -> Processed:
    """Validate, orient, resize and encode one downloaded image. Never raises for bad input."""
    import time

    t0 = time.perf_counter()
    try:
        img = probe(data, cfg)
        fmt = img.format
        orientation = _orientation(img)
        swap = orientation in (5, 6, 7, 8)
        ow, oh = img.size
        if swap:
            ow, oh = oh, ow
        if min(ow, oh) < cfg.min_image_size:
            raise ImageRejected("failed_to_resize", "image too small")
        if cfg.max_image_area is not None and ow * oh > cfg.max_image_area:
            raise ImageRejected("failed_to_resize", "image area too large")
        if cfg.max_aspect_ratio is not None and max(ow, oh) / min(ow, oh) > cfg.max_aspect_ratio:
            raise ImageRejected("failed_to_resize", "aspect ratio too large")
        target = target_size(ow, oh, cfg)
        if fmt == "JPEG" and target is not None and target[0] < ow and target[1] < oh:
            # DCT-domain downscale: decode at the smallest 1/2^k scale still >= the target.
            tw, th = (target[1], target[0]) if swap else target
            img.draft("RGB", (tw, th))
        try:
            img.load()
        except Exception as e:  # noqa: BLE001 - truncated / corrupt data
            raise ImageRejected("failed_to_decode", f"decode error: {error_text(e)}") from None
        if orientation != 1:
            img = ImageOps.exif_transpose(img)
        t1 = time.perf_counter()
        decode_s = t1 - t0

        if target is None:
            unchanged = True
        else:
            square = cfg.resize_mode in ("center_crop", "border", "fixed")
            final = (cfg.image_size, cfg.image_size) if square else target
            unchanged = target == (ow, oh) and final == (ow, oh)
        keep = (unchanged and not cfg.reencode and fmt in KEEPABLE and orientation == 1
                and img.mode in ("RGB", "L"))
        if keep:
            out_img = img
            out_bytes = data
            ext = KEEPABLE[fmt]
        else:
            out_img = _to_rgb(img)
            if target is not None:
                if out_img.size != target:
                    shrink = target[0] * target[1] < out_img.size[0] * out_img.size[1]
                    name = cfg.downscale_interpolation if shrink else cfg.upscale_interpolation
                    out_img = out_img.resize(target, _FILTERS[name])
                size = cfg.image_size
                if cfg.resize_mode == "center_crop":
                    w, h = out_img.size
                    left, top = (w - size) // 2, (h - size) // 2
                    out_img = out_img.crop((left, top, left + size, top + size))
                elif cfg.resize_mode == "border" and out_img.size != (size, size):
                    w, h = out_img.size
                    canvas = Image.new("RGB", (size, size), (255, 255, 255))
                    canvas.paste(out_img, ((size - w) // 2, (size - h) // 2))
                    out_img = canvas
            ext = cfg.output_format
            out_bytes = encode(out_img, ext, cfg.quality)
        t2 = time.perf_counter()
        w, h = out_img.size
        return Processed(
            status="success", data=out_bytes, ext=ext, width=w, height=h, original_width=ow,
            original_height=oh, image=out_img if keep_image else None, decode_seconds=decode_s,
            resize_seconds=t2 - t1,
        )
    except ImageRejected as e:
        return Processed(status=e.status, error=str(e), decode_seconds=time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001 - a per-row failure is data, never a crashed shard
        return Processed(status="failed_to_resize", error=error_text(e),
                         decode_seconds=time.perf_counter() - t0)


def encode(img: Image.Image, ext: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if ext == "jpg":
        img.save(buf, "JPEG", quality=quality)
    elif ext == "png":
        img.save(buf, "PNG", compress_level=quality)
    else:
        img.save(buf, "WEBP", quality=quality)
    return buf.getvalue()
