"""Face detection and blurring for export (DataComp blurred the faces of its pool before release).

The detector is OpenCV's Viola-Jones cascade that ships inside the opencv-python-headless wheel
(``cv2.data.haarcascades``: works offline, no model download; the 5.x wheels dropped the cascades,
hence the ``<5`` pin). Detection runs on a grayscale copy whose longer side is at most
``max_side`` pixels (faces that matter for privacy are not a handful of pixels wide, and the
cascade's cost grows with the pixel count), histogram-equalised; boxes are scaled back to the
image's own pixels, grown by ``margin`` and blurred in place with a Gaussian whose size follows the
face, so no identity survives. Only images with a face are re-encoded (same format, JPEG/WebP at
``quality``); the bytes of every other image are left exactly as they were.

Pixels are upright before detection: an EXIF orientation is applied (and so dropped from the
re-encoded file), so boxes are in the coordinates every viewer shows.
"""

from __future__ import annotations

import dataclasses
import io
import logging
from typing import Literal

import numpy as np
from pydantic import Field

from curate.stage import Frozen

log = logging.getLogger(__name__)

CASCADES = {
    "frontal_default": "haarcascade_frontalface_default.xml",
    "frontal_alt2": "haarcascade_frontalface_alt2.xml",
}
PROFILE = "haarcascade_profileface.xml"
_PIL_FORMAT = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}


class FaceConfig(Frozen):
    cascade: Literal["frontal_default", "frontal_alt2"] = "frontal_default"
    profile: bool = False  # also run the profile-face cascade (slower: a second pass, mirrored)
    max_side: int = Field(640, ge=64)  # detect on a copy no larger than this (0 < scale <= 1)
    scale_factor: float = Field(1.1, gt=1.0, le=2.0)
    min_neighbors: int = Field(5, ge=1)
    min_size: int = Field(20, ge=8)  # smallest face, in pixels of the detection copy
    margin: float = Field(0.15, ge=0.0, le=1.0)  # grow each box by this fraction per side
    quality: int = Field(95, ge=1, le=100)  # JPEG / WebP quality of re-encoded images
    max_pixels: int = Field(200_000_000, ge=1)  # refuse to decode more (a pixel bomb)


@dataclasses.dataclass
class Blurred:
    data: bytes  # the new bytes (the input bytes, unchanged, when no face was found)
    boxes: list[tuple[int, int, int, int]]  # x, y, w, h in the image's (upright) pixels

    @property
    def altered(self) -> bool:
        return bool(self.boxes)


class FaceBlurrer:
    """One per worker: the cascades are loaded once."""

    def __init__(self, cfg: FaceConfig):
        import cv2

        self.cfg = cfg
        self.cv2 = cv2
        self.frontal = self._load(CASCADES[cfg.cascade])
        self.profile = self._load(PROFILE) if cfg.profile else None

    def _load(self, name: str):
        path = self.cv2.data.haarcascades + name
        c = self.cv2.CascadeClassifier(path)
        if c.empty():
            raise RuntimeError(f"OpenCV cascade {path} did not load; is opencv-python-headless<5 installed?")
        return c

    def detect_gray(self, gray: np.ndarray) -> list[tuple[int, int, int, int]]:
        """Boxes (x, y, w, h) in ``gray``'s pixels, detected on a copy of at most max_side."""
        cv2, cfg = self.cv2, self.cfg
        h, w = gray.shape
        scale = min(1.0, cfg.max_side / max(h, w))
        small = gray if scale == 1.0 else cv2.resize(gray, (max(1, round(w * scale)), max(1, round(h * scale))),
                                                        interpolation=cv2.INTER_AREA)
        small = cv2.equalizeHist(small)
        found = []
        kw = dict(scaleFactor=cfg.scale_factor, minNeighbors=cfg.min_neighbors, minSize=(cfg.min_size, cfg.min_size))
        found += [tuple(b) for b in self.frontal.detectMultiScale(small, **kw)]
        if self.profile is not None:
            found += [tuple(b) for b in self.profile.detectMultiScale(small, **kw)]
            flipped = self.profile.detectMultiScale(cv2.flip(small, 1), **kw)
            sw = small.shape[1]
            found += [(sw - x - bw, y, bw, bh) for x, y, bw, bh in flipped]
        boxes = [(int(x / scale), int(y / scale), int(np.ceil(bw / scale)), int(np.ceil(bh / scale)))
                 for x, y, bw, bh in found]
        return sorted(set(boxes))

    def blur(self, data: bytes, fmt: str) -> Blurred:
        """Detect faces in encoded ``data`` (format jpg/png/webp) and blur them; raises on undecodable bytes."""
        from PIL import Image, ImageOps

        from curate.images import open_image

        cv2, cfg = self.cv2, self.cfg
        img = open_image(data, cfg.max_pixels)
        if getattr(img, "n_frames", 1) > 1:
            img.seek(0)
        img.load()
        img = ImageOps.exif_transpose(img)
        if img.mode not in ("RGB", "RGBA", "L"):
            img = img.convert("RGBA" if "A" in img.getbands() or "transparency" in img.info else "RGB")
        arr = np.array(img)
        gray = arr if arr.ndim == 2 else cv2.cvtColor(np.ascontiguousarray(arr[..., :3]), cv2.COLOR_RGB2GRAY)
        boxes = self.detect_gray(gray)
        if not boxes:
            return Blurred(data, [])
        H, W = gray.shape
        for x, y, bw, bh in boxes:
            mx, my = int(bw * cfg.margin), int(bh * cfg.margin)
            x0, y0, x1, y1 = max(0, x - mx), max(0, y - my), min(W, x + bw + mx), min(H, y + bh + my)
            if x1 <= x0 or y1 <= y0:
                continue
            k = max(3, (max(x1 - x0, y1 - y0) // 3) | 1)
            roi = np.ascontiguousarray(arr[y0:y1, x0:x1])
            if roi.ndim == 3 and roi.shape[2] == 4:
                roi[..., :3] = cv2.GaussianBlur(np.ascontiguousarray(roi[..., :3]), (k, k), 0)
            else:
                roi = cv2.GaussianBlur(roi, (k, k), 0)
            arr[y0:y1, x0:x1] = roi
        out = Image.fromarray(arr, mode=img.mode)
        pil_fmt = _PIL_FORMAT.get(fmt, "PNG")
        if pil_fmt == "JPEG" and out.mode == "RGBA":
            out = out.convert("RGB")
        buf = io.BytesIO()
        kwargs = {"quality": cfg.quality} if pil_fmt in ("JPEG", "WEBP") else {}
        out.save(buf, pil_fmt, **kwargs)
        return Blurred(buf.getvalue(), [(int(a), int(b), int(c), int(d)) for a, b, c, d in boxes])
