"""open_clip models for scoring: loading, image decode + preprocessing (Pillow or DALI), batched encoding.

Loading (``load_clip``) takes what a user has:
  - a built-in open_clip name and a ``pretrained`` tag (``ViT-B-32`` + ``laion2b_s34b_b79k``; weights are
    downloaded by open_clip on the user's machine) or a checkpoint file (``pretrained: /path/epoch_32.pt``);
  - an ``hf-hub:org/repo`` id;
  - a local model directory (``open_clip_config.json`` + weights; ``local-dir:DIR`` or just ``DIR``), which is
    how the tests' tiny random models (``curate.testing.tiny_models``) are loaded.
The tokenizer and the preprocessing (size, mean/std, interpolation, resize mode) are the model's own.

Preprocessing matches open_clip's eval transform (``Resize(shortest side, interpolation)`` ->
``CenterCrop`` -> ``convert("RGB")`` -> ``ToTensor`` -> ``Normalize``), done faster:
  - ``PilDecoder`` (CPU): Pillow decodes; torchvision's size and crop arithmetic. Two shortcuts, the only
    sources of difference: RGB/L images are resized by torch's uint8 antialiased kernel (the one
    torchvision's tensor ``Resize`` uses; the same filter as Pillow's with different fixed-point
    rounding: pixels differ by at most 2 of 255, about 5x faster than Pillow's resize, which was most
    of the CPU time; palette and alpha images take open_clip's exact Pillow path), and JPEGs use
    ``Image.draft`` to decode at 1/2, 1/4 or 1/8 scale in the DCT domain, never below ``draft`` x the
    input size (2x by default).
    Images decode on a thread pool (Pillow releases the GIL) while the model runs on the previous
    batch; normalisation happens in torch on the model's device on uint8 tensors.
  - ``DaliDecoder``: NVIDIA DALI ``decoders.image`` (``device="mixed"`` on GPU: nvJPEG / nvImageCodec,
    jpg/png/webp; ``"cpu"`` otherwise), ``resize(resize_shorter, cubic, antialias)`` and
    ``crop_mirror_normalize`` on the same device. Each image's header is read first: formats DALI has
    no decoder for (GIF) take the Pillow path, pixel bombs are rejected, and large images are decoded a
    bounded number of pixels at a time. DALI fails a whole batch on one corrupt image, so a failed batch
    is bisected to find the bad ones; a device failure (out of memory, CUDA error) raises instead.
EXIF orientation is applied on every path (DALI does it by default; the Pillow path does it too).
The score differences against open_clip's own preprocess are measured in tests/clip/.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

LOCAL_DIR = "local-dir:"


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """The model's eval preprocessing, read from open_clip's ``preprocess_cfg``."""

    size: tuple[int, int]  # (height, width)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"

    @classmethod
    def from_cfg(cls, cfg: dict[str, Any]) -> Preprocess:
        size = cfg.get("size", 224)
        size = (size, size) if isinstance(size, int) else tuple(size)
        return cls(
            size=(int(size[0]), int(size[1])),
            mean=tuple(float(x) for x in cfg["mean"]),
            std=tuple(float(x) for x in cfg["std"]),
            interpolation=cfg.get("interpolation", "bicubic"),
            resize_mode=cfg.get("resize_mode", "shortest"),
        )


def resolve_model(model: str, pretrained: str | None) -> tuple[str, str | None]:
    """(open_clip model name, pretrained) for what a user wrote: a name, ``hf-hub:``, ``local-dir:`` or a dir."""
    if model.startswith(("hf-hub:", LOCAL_DIR)):
        return model, None
    if os.path.isdir(model):
        return LOCAL_DIR + os.path.abspath(model), None
    return model, pretrained


def pick_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class ClipModel:
    """An open_clip model in eval mode with its tokenizer and preprocessing; encodes to unit vectors."""

    def __init__(self, model: Any, tokenizer: Callable, preprocess: Preprocess, reference: Callable,
                 device: str, precision: str, name: str):
        import torch

        self.model = model
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.reference_transform = reference  # open_clip's own PIL -> tensor eval transform
        self.device = device
        self.name = name
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        with torch.inference_mode():
            self.embed_dim = int(model.encode_text(tokenizer(["x"]).to(device)).shape[1])
        self._mean = torch.tensor(preprocess.mean, device=device).view(1, 3, 1, 1) * 255.0
        self._std = torch.tensor(preprocess.std, device=device).view(1, 3, 1, 1) * 255.0

    def _autocast(self):
        import contextlib

        import torch

        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.split(":")[0], dtype=self.autocast_dtype)

    def pixels(self, batch: Any) -> Any:
        """Model input from a decoded batch: uint8 NHWC (normalised here, on the device) or float NCHW."""
        import torch

        x = torch.as_tensor(batch).to(self.device, non_blocking=True)
        if x.dtype == torch.uint8:
            x = x.permute(0, 3, 1, 2).float()  # a new tensor: normalised in place, no temporaries
            x = x.sub_(self._mean).div_(self._std)
        return x

    def encode_images(self, batch: Any) -> np.ndarray:
        import torch

        with torch.inference_mode(), self._autocast():
            emb = self.model.encode_image(self.pixels(batch))
        return _unit(emb.float().cpu().numpy())

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        import torch

        out = []
        for i in range(0, len(texts), batch_size):
            tokens = self.tokenizer(list(texts[i:i + batch_size])).to(self.device)
            with torch.inference_mode(), self._autocast():
                out.append(self.model.encode_text(tokens).float().cpu().numpy())
        if not out:
            return np.zeros((0, self.embed_dim), np.float32)
        return _unit(np.concatenate(out))


def _unit(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32, copy=False)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def load_clip(model: str, pretrained: str | None = None, device: str = "auto",
              precision: str = "auto") -> ClipModel:
    """Load an open_clip model the way a user names it (see module docstring); eval mode, on ``device``."""
    import open_clip
    import torch

    device = pick_device(device)
    if precision == "auto":
        precision = "fp32" if device == "cpu" else ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    name, pre = resolve_model(model, pretrained)
    net, _, reference = open_clip.create_model_and_transforms(name, pretrained=pre, device=device)
    net.eval()
    cfg = getattr(net.visual, "preprocess_cfg", None) or {}
    if not cfg:
        raise ValueError(f"open_clip model {model!r} has no preprocess_cfg; cannot reproduce its preprocessing")
    log.info("loaded open_clip %s (pretrained=%s) on %s, %s", name, pre, device, precision)
    return ClipModel(net, open_clip.get_tokenizer(name), Preprocess.from_cfg(cfg), reference, device,
                     precision, name)


# -- Pillow decoding ---------------------------------------------------------------------------------
def _resized_size(w: int, h: int, pre: Preprocess) -> tuple[int, int]:
    """(width, height) after open_clip's resize; torchvision's arithmetic (int() truncation of the long side)."""
    th, tw = pre.size
    if pre.resize_mode == "squash":
        return tw, th
    target = th  # shortest mode with a square target (open_clip's default)
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = target, int(target * long / short)
    return (new_short, new_long) if w <= h else (new_long, new_short)


class PilDecoder:
    """Bytes -> uint8 HWC arrays of the model's input size, on a thread pool (see module docstring)."""

    def __init__(self, preprocess: Preprocess, threads: int = 2, draft: float | None = 2.0,
                 reference: Callable | None = None, max_pixels: int | None = None):
        from PIL import Image

        self.max_pixels = max_pixels or DEFAULT_MAX_PIXELS
        self.pre = preprocess
        self.draft = draft
        self.threads = max(1, threads)
        self._resample = Image.Resampling.BILINEAR if preprocess.interpolation == "bilinear" \
            else Image.Resampling.BICUBIC
        self._mode = "bilinear" if preprocess.interpolation == "bilinear" else "bicubic"
        square = preprocess.size[0] == preprocess.size[1]
        # Only open_clip's 'longest' mode (and non-square 'shortest') take open_clip's own transform.
        self._fast = preprocess.resize_mode == "squash" or (preprocess.resize_mode == "shortest" and square)
        if not self._fast and reference is None:
            raise ValueError(f"resize_mode {preprocess.resize_mode!r} needs open_clip's reference transform")
        self._reference = reference
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    @property
    def pool(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(self.threads, thread_name_prefix="clip-decode")
        return self._pool

    def decode(self, data: bytes | None) -> np.ndarray | None:
        """One image, or None when the bytes do not decode (any reason: truncated, not an image, bomb)."""
        from curate.images import open_image

        if not data:
            return None
        try:
            img = open_image(data, self.max_pixels)  # allowlisted format, pixels checked from the header
            orientation = exif_orientation(img)
            if not self._fast:
                return self._reference(_upright(img, orientation)).numpy()
            th, tw = self.pre.size
            if self.draft and img.format == "JPEG":
                # DCT-domain downscale, never below what the resize needs (draft keeps both sides >= request).
                side = int(min(th, tw) * self.draft)
                req = (int(tw * self.draft), int(th * self.draft)) if self.pre.resize_mode == "squash" \
                    else (side, side)
                img.draft("RGB" if img.mode == "RGB" else None, req)
            img.load()
            img = _upright(img, orientation)
            w, h = _resized_size(img.width, img.height, self.pre)
            top, left = int(round((h - th) / 2.0)), int(round((w - tw) / 2.0))
            # Same order as open_clip: resize in the image's own mode, crop, then convert to RGB.
            if (w, h) != img.size and img.mode in ("RGB", "L"):
                return self._resize_torch(img, w, h, top, left)
            # palette / alpha modes (and images already at size): open_clip's very Pillow operations;
            # a uint8 kernel would move palette picks and alpha edges
            if (w, h) != img.size:
                img = img.resize((w, h), self._resample)
            if (w, h) != (tw, th):
                img = img.crop((left, top, left + tw, top + th))
            arr = np.asarray(img.convert("RGB"))
            return arr if arr.shape == (th, tw, 3) else None
        except Exception as e:  # noqa: BLE001 - any decode failure is per-row data, not a crash
            log.debug("undecodable image: %s: %s", type(e).__name__, e)
            return None

    def _resize_torch(self, img: Any, w: int, h: int, top: int, left: int) -> np.ndarray | None:
        """Resize to (w, h) with torch's uint8 antialiased kernel, then the center crop, as HWC uint8."""
        import torch
        import torch.nn.functional as F

        th, tw = self.pre.size
        x = torch.from_numpy(np.array(img))  # a writable copy (torch warns on read-only buffers)
        if x.ndim == 2:
            x = x.unsqueeze(-1)
        # 1xCxHxW view of the HWC pixels: channels-last strides, the layout torch's uint8 kernel wants
        x = F.interpolate(x.permute(2, 0, 1).unsqueeze(0), size=(h, w), mode=self._mode, antialias=True)
        x = x[0, :, top:top + th, left:left + tw].permute(1, 2, 0)
        if x.shape[2] == 1:
            x = x.expand(th, tw, 3)
        arr = np.ascontiguousarray(x.numpy())
        return arr if arr.shape == (th, tw, 3) else None

    def submit(self, items: Sequence[bytes | None]) -> list[concurrent.futures.Future]:
        return [self.pool.submit(self.decode, b) for b in items]

    @staticmethod
    def collect(futures: list[concurrent.futures.Future]) -> tuple[np.ndarray | None, np.ndarray]:
        """Stack finished decodes: (batch of the good ones or None, bool mask of which succeeded)."""
        arrays = [f.result() for f in futures]
        ok = np.array([a is not None for a in arrays], dtype=bool)
        good = [a for a in arrays if a is not None]
        return (np.stack(good) if good else None), ok

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


_ORIENTATION = 0x0112


def exif_orientation(img: Any) -> int:
    """The EXIF orientation tag (1 = upright) from an opened image's header; 1 when absent or unreadable."""
    try:
        return int(img.getexif().get(_ORIENTATION, 1) or 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block is no reason to lose the image
        return 1


def _upright(img: Any, orientation: int) -> Any:
    """The image as a viewer shows it. DALI's decoder applies EXIF orientation (adjust_orientation), as
    do download's resize and recaption's decode, so the Pillow path does too: one image, one score."""
    if orientation == 1:
        return img
    from PIL import ImageOps

    return ImageOps.exif_transpose(img)


# -- DALI decoding -----------------------------------------------------------------------------------
# What DALI's image decoder (nvImageCodec) reads, as Pillow names the formats. Not GIF (DALI has no GIF
# decoder); MPO is a multi-picture camera JPEG whose first picture is an ordinary JPEG, which DALI
# decodes. Anything else goes to the Pillow fallback instead of failing DALI's batch.
DALI_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "TIFF", "BMP", "JPEG2000", "PPM"})
# Above this many pixels Pillow refuses an image as a decompression bomb (2x its MAX_IMAGE_PIXELS, the
# PilDecoder's effective limit); the DALI path uses the same bound, read from the header.
DEFAULT_MAX_PIXELS = 2 * 89_478_485
# Decoded pixels one DALI run may hold (uint8 RGB: 3 bytes each, ~1.5 GB): a batch of large images is
# cut into several runs instead of decoding 256 full-resolution photos at once.
DEFAULT_BATCH_PIXELS = 512 * 1024 * 1024

# Substrings of errors that mean the device, not the image, failed: these are raised, never turned into
# rejected rows (a retried task on a healthy worker decodes the same bytes fine).
_DEVICE_ERRORS = ("out of memory", "cudaerror", "cuda error", "cuda_error", "cuda runtime", "device-side",
                  "illegal memory access", "bad_alloc", "cannot allocate", "can't allocate", "nvml",
                  "driver", "unspecified launch failure", "ecc error")


class DecoderDeviceError(RuntimeError):
    """The decoder's device failed (out of memory, CUDA error): retry the shard, do not reject rows."""


def is_device_error(e: BaseException) -> bool:
    text = f"{type(e).__name__}: {e}".lower()
    return isinstance(e, MemoryError) or any(k in text for k in _DEVICE_ERRORS)


@dataclasses.dataclass(frozen=True)
class _Header:
    format: str | None  # Pillow's format name, None when the bytes are not an image Pillow can open
    pixels: int


def _header(data: bytes | None) -> _Header:
    import warnings

    from PIL import Image

    if not data:
        return _Header(None, 0)
    from curate.images import ImageRejected, open_image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            # the pixel cap is the caller's (max_pixels); here only the allowlist refuses
            with open_image(data, 1 << 62) as img:
                w, h = img.size
                return _Header(img.format, w * h)
        except ImageRejected as e:
            return _Header("bomb", 1 << 62) if e.why == "too_many_pixels" else _Header(None, 0)


class DaliDecoder:
    """Bytes -> normalised float NCHW batches with DALI, on GPU (``mixed``) or CPU.

    Before DALI sees a batch, each image's header is read: formats DALI cannot decode (GIF, ...) go to
    ``fallback`` (the Pillow decoder, so they are scored as on the CPU path) and are normalised like
    DALI's output; images over ``max_pixels`` are rejected; the rest run in pieces of at most
    ``max_batch_pixels`` decoded pixels. A DALI failure is classified: a device problem raises
    DecoderDeviceError; anything else is a bad image, found by bisecting and rejected alone."""

    def __init__(self, preprocess: Preprocess, device: str = "gpu", batch_size: int = 256, threads: int = 2,
                 device_id: int = 0, fallback: PilDecoder | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_batch_pixels: int = DEFAULT_BATCH_PIXELS):
        if preprocess.resize_mode not in ("shortest", "squash") or \
                (preprocess.resize_mode == "shortest" and preprocess.size[0] != preprocess.size[1]):
            raise ValueError(f"DALI decoder supports resize_mode shortest (square) and squash, not "
                             f"{preprocess.resize_mode!r} {preprocess.size}")
        self.pre = preprocess
        self.gpu = device == "gpu"
        self.batch_size = batch_size
        self.threads = max(1, threads)
        self.device_id = device_id
        self.fallback = fallback
        self.max_pixels = max_pixels
        self.max_batch_pixels = max_batch_pixels
        self._pipe = None
        self._last: Any = None

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types

        pre = self.pre
        h, w = pre.size
        interp = types.INTERP_LINEAR if pre.interpolation == "bilinear" else types.INTERP_CUBIC

        @pipeline_def(batch_size=self.batch_size, num_threads=self.threads,
                      device_id=self.device_id if self.gpu else None, prefetch_queue_depth=1,
                      exec_async=False, exec_pipelined=False)
        def pipe():
            enc = fn.external_source(name="enc", dtype=types.UINT8, ndim=1)
            img = fn.decoders.image(enc, device="mixed" if self.gpu else "cpu", output_type=types.RGB)
            if pre.resize_mode == "squash":
                img = fn.resize(img, size=(h, w), interp_type=interp, antialias=True)
            else:
                img = fn.resize(img, resize_shorter=h, interp_type=interp, antialias=True)
            return fn.crop_mirror_normalize(
                img, crop=(h, w), crop_pos_x=0.5, crop_pos_y=0.5, dtype=types.FLOAT, output_layout="CHW",
                mean=[m * 255.0 for m in pre.mean], std=[s * 255.0 for s in pre.std])

        p = pipe()
        p.build()
        return p

    def _run(self, items: list[bytes]) -> Any:
        import torch

        if self._pipe is None:
            self._pipe = self._build()
        self._pipe.feed_input("enc", [np.frombuffer(b, dtype=np.uint8) for b in items])
        (out,) = self._pipe.run()
        if self.gpu:
            from nvidia.dali.plugin.pytorch import feed_ndarray

            t = out.as_tensor()
            dst = torch.empty(t.shape(), dtype=torch.float32, device=f"cuda:{self.device_id}")
            feed_ndarray(t, dst, cuda_stream=torch.cuda.current_stream(self.device_id))
            return dst
        return torch.from_numpy(np.array(out.as_tensor()))

    def decode_batch(self, items: Sequence[bytes | None]) -> tuple[Any, np.ndarray]:
        """(float NCHW tensor of the decodable images or None, bool mask aligned with ``items``)."""
        heads = [_header(b) for b in items]
        ok = np.array([h.format is not None and h.pixels <= self.max_pixels for h in heads], dtype=bool)
        dali = [i for i in range(len(items)) if ok[i] and heads[i].format in DALI_FORMATS]
        other = [i for i in range(len(items)) if ok[i] and heads[i].format not in DALI_FORMATS]
        parts: dict[int, Any] = {}
        start = 0
        while start < len(dali):  # pieces of at most max_batch_pixels decoded pixels (at least one image)
            end, budget = start + 1, heads[dali[start]].pixels
            while end < len(dali) and budget + heads[dali[end]].pixels <= self.max_batch_pixels:
                budget += heads[dali[end]].pixels
                end += 1
            piece = dali[start:end]
            out, good = self._decode_dali([items[i] for i in piece])
            kept = [i for j, i in enumerate(piece) if good[j]]
            ok[[i for j, i in enumerate(piece) if not good[j]]] = False
            for row, i in enumerate(kept):
                parts[i] = out[row]
            start = end
        for i in other:
            x = self._fallback(items[i])
            if x is None:
                ok[i] = False
            else:
                parts[i] = x
        rows = [i for i in range(len(items)) if ok[i]]
        if not rows:
            return None, ok
        import torch

        return torch.stack([parts[i] for i in rows]), ok

    def _fallback(self, data: bytes | None) -> Any:
        """A format DALI cannot read, through the Pillow decoder, normalised as DALI's output is."""
        import torch

        a = self.fallback.decode(data) if self.fallback is not None else None
        if a is None:
            return None
        x = torch.from_numpy(np.array(a)).permute(2, 0, 1).float()  # a writable copy
        x = (x - torch.tensor(self.pre.mean).view(3, 1, 1) * 255.0) / (torch.tensor(self.pre.std).view(3, 1, 1) * 255.0)
        return x.to(f"cuda:{self.device_id}") if self.gpu else x

    def _decode_dali(self, blobs: list[bytes]) -> tuple[Any, list[bool]]:
        """Decode one piece; bad images are found by bisection and left out. Device errors raise."""
        if self._try(blobs):
            out, self._last = self._last, None
            return out, [True] * len(blobs)
        log.info("DALI batch of %d failed; isolating undecodable images", len(blobs))
        bad = self._bisect(blobs)
        good = [j not in bad for j in range(len(blobs))]
        survivors = [b for b, g in zip(blobs, good, strict=True) if g]
        return (self._run(survivors) if survivors else None), good

    def _try(self, blobs: list[bytes]) -> bool:
        """Run DALI on ``blobs``: True (output in ``_last``) or False for bad data; a device failure
        raises DecoderDeviceError (the shard is retried; no row is rejected for it)."""
        try:
            self._last = self._run(blobs)
            return True
        except Exception as e:  # noqa: BLE001 - classified right here
            self._pipe = None  # a pipeline that raised is not reused
            if is_device_error(e):
                raise DecoderDeviceError(f"DALI decoder device failure: {type(e).__name__}: {e}") from e
            log.debug("DALI failed on %d image(s): %s", len(blobs), e)
            return False

    def _bisect(self, blobs: list[bytes]) -> set[int]:
        """Positions of the blobs DALI cannot decode: O(bad * log n) pipeline runs."""
        if len(blobs) == 1:
            return {0}  # the caller already saw it fail
        half = len(blobs) // 2
        bad = set()
        for offset, part in ((0, blobs[:half]), (half, blobs[half:])):
            if not self._try(part):
                bad |= {offset + j for j in self._bisect(part)}
        return bad


# -- batched scoring ---------------------------------------------------------------------------------
def embed_images(clip: ClipModel, images: Sequence[bytes | None], decoder: PilDecoder | DaliDecoder,
                 batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit image embeddings (float32 [N, D], zeros where undecodable) and the bool mask of decoded rows.

    With Pillow, batch i+1 decodes on the thread pool while the model runs batch i.
    """
    n = len(images)
    emb = np.zeros((n, clip.embed_dim), np.float32)
    ok = np.zeros(n, dtype=bool)
    starts = list(range(0, n, batch_size))
    if isinstance(decoder, PilDecoder):
        pending = decoder.submit(images[0:batch_size]) if starts else []
        for j, s in enumerate(starts):
            current = pending
            if j + 1 < len(starts):
                nxt = starts[j + 1]
                pending = decoder.submit(images[nxt:nxt + batch_size])
            batch, mask = decoder.collect(current)
            _store(clip, emb, ok, s, batch, mask)
    else:
        for s in starts:
            batch, mask = decoder.decode_batch(images[s:s + batch_size])
            _store(clip, emb, ok, s, batch, mask)
    return emb, ok


def _store(clip: ClipModel, emb: np.ndarray, ok: np.ndarray, start: int, batch: Any, mask: np.ndarray) -> None:
    rows = start + np.flatnonzero(mask)
    ok[start:start + len(mask)] = mask
    if batch is not None and len(rows):
        emb[rows] = clip.encode_images(batch)
