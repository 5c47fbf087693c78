"""curate.models.clip: loading through the user's paths, and preprocessing that matches open_clip's.

Measured tolerances (max |score difference| against open_clip's own preprocess on 300 demo-corpus clip-art
images (jpg/png/webp) + 20 photos; tiny random ViT at 64 px / at 224 px input):
  - Pillow, full decode: 1.4e-4 / 2.6e-5 (RGB/L images resized by torch's uint8 antialiased kernel;
    palette and alpha images take open_clip's exact operations: 1e-7 / 8e-7);
  - Pillow, JPEG draft at 2x the input size (the default): 4.3e-3 / 2.6e-5 (at 1x: 1.3e-2 / 3.0e-3);
  - DALI CPU: 1.6e-2 (RGBA images: DALI drops alpha before resizing, Pillow after; JPEG rows 6e-3).
The asserts below use those bounds with headroom.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from clip_data import CORRUPT, corpus_images, reference_scores

from curate.models.clip import DaliDecoder, PilDecoder, embed_images, load_clip

ROWS = 48


@pytest.fixture(scope="module")
def rows():
    return corpus_images(ROWS)


@pytest.fixture(scope="module")
def reference(tiny_clip, rows):
    return reference_scores(tiny_clip, rows)


def _scores(clip, rows, decoder, batch_size=16):
    img, ok = embed_images(clip, [r[0] for r in rows], decoder, batch_size)
    txt = clip.encode_texts([r[2] for r in rows])
    return np.where(ok, (img * txt).sum(1), np.nan), ok


def test_loads_through_every_user_path(tiny_clip, tmp_path, rows):
    """A directory, local-dir:, and a built-in-style name + checkpoint file give the same model."""
    import open_clip

    by_dir = load_clip(tiny_clip, device="cpu")
    by_schema = load_clip(f"local-dir:{tiny_clip}", pretrained="ignored", device="cpu")
    # A user with a config of their own and an epoch checkpoint: register the config, pass the file.
    with open(f"{tiny_clip}/open_clip_config.json") as f:
        cfg = json.load(f)
    (tmp_path / "tiny-test-vit.json").write_text(json.dumps(cfg["model_cfg"]))
    open_clip.add_model_config(tmp_path / "tiny-test-vit.json")
    by_file = load_clip("tiny-test-vit", pretrained=f"{tiny_clip}/open_clip_model.safetensors", device="cpu")
    texts = [r[2] for r in rows[:4]]
    a = by_dir.encode_texts(texts)
    assert np.allclose(a, by_schema.encode_texts(texts), atol=1e-6)
    assert np.allclose(a, by_file.encode_texts(texts), atol=1e-6)
    assert by_dir.preprocess.size == (64, 64) and by_dir.preprocess.interpolation == "bicubic"
    with pytest.raises(RuntimeError):
        load_clip("tiny-test-vit", pretrained=str(tmp_path / "missing.pt"), device="cpu")


def test_pil_full_decode_equals_open_clip(tiny_clip, rows, reference):
    from PIL import Image

    clip = load_clip(tiny_clip, device="cpu")
    ours, ok = _scores(clip, rows, PilDecoder(clip.preprocess, threads=2, draft=None))
    assert ok.all() and np.isfinite(reference).all()
    diff = np.abs(ours - reference)
    assert diff.max() < 1e-3
    exact = np.array([Image.open(io.BytesIO(r[0])).mode not in ("RGB", "L") for r in rows])
    assert exact.sum() >= 5 and diff[exact].max() < 1e-5  # palette / alpha: open_clip's very operations


def test_pil_pixels_within_two_levels_of_open_clip(tiny_clip, rows):
    """The decoder's uint8 pixels against open_clip's own transform (un-normalised): RGB/L images go
    through torch's uint8 kernel (at most 2 of 255 apart), palette / alpha images are identical."""
    from PIL import Image

    clip = load_clip(tiny_clip, device="cpu")
    dec = PilDecoder(clip.preprocess, threads=1, draft=None)
    mean = np.array(clip.preprocess.mean, np.float32).reshape(3, 1, 1)
    std = np.array(clip.preprocess.std, np.float32).reshape(3, 1, 1)
    modes = set()
    for data, _, _ in rows:
        img = Image.open(io.BytesIO(data))
        modes.add(img.mode)
        ref = (clip.reference_transform(img).numpy() * std + mean) * 255.0
        ours = dec.decode(data).transpose(2, 0, 1).astype(np.float32)
        worst = np.abs(ours - np.round(ref)).max()
        assert worst <= (2 if img.mode in ("RGB", "L") else 0.5), (img.mode, img.size, worst)
    assert "RGB" in modes and modes - {"RGB", "L"}  # both paths were exercised


def test_pil_draft_within_tolerance(tiny_clip, rows, reference):
    clip = load_clip(tiny_clip, device="cpu")
    ours, ok = _scores(clip, rows, PilDecoder(clip.preprocess, threads=2, draft=2.0))
    diff = np.abs(ours - reference)
    assert ok.all()
    assert diff.max() < 5e-3
    jpeg = np.array([r[1] == "jpg" for r in rows])
    assert diff[~jpeg].max() < 1e-3  # draft only touches JPEGs
    assert diff[jpeg].max() > 0  # ... and it does take the draft path for them


def test_corrupt_bytes_do_not_stop_the_batch(tiny_clip, rows, reference):
    clip = load_clip(tiny_clip, device="cpu")
    bad = list(rows[:10])
    bad[3] = (CORRUPT, "jpg", "x")
    bad[7] = (rows[7][0][: len(rows[7][0]) // 3], rows[7][1], rows[7][2])  # truncated
    bad[8] = (b"", "jpg", "empty")
    bad[1] = (rows[1][0][: len(rows[1][0]) // 2], rows[1][1], rows[1][2])  # a second truncated one
    for dec in (PilDecoder(clip.preprocess, draft=None), DaliDecoder(clip.preprocess, device="cpu", batch_size=16)):
        scores, ok = _scores(clip, bad, dec, batch_size=16)
        assert list(np.flatnonzero(~ok)) == [1, 3, 7, 8]
        good = [i for i in range(10) if ok[i]]
        assert np.abs(scores[good] - reference[good]).max() < 2e-2


def test_dali_cpu_within_tolerance(tiny_clip, rows, reference):
    clip = load_clip(tiny_clip, device="cpu")
    ours, ok = _scores(clip, rows, DaliDecoder(clip.preprocess, device="cpu", batch_size=16, threads=2))
    assert ok.all()
    assert np.abs(ours - reference).max() < 2e-2


@pytest.mark.gpu
def test_dali_mixed_gpu_within_tolerance(tiny_clip, rows, reference):
    clip = load_clip(tiny_clip, device="cuda", precision="fp32")
    ours, ok = _scores(clip, rows, DaliDecoder(clip.preprocess, device="gpu", batch_size=16))
    assert ok.all()
    assert np.abs(ours - reference).max() < 2e-2
    bf16 = load_clip(tiny_clip, device="cuda", precision="bf16")
    low, _ = _scores(bf16, rows, DaliDecoder(bf16.preprocess, device="gpu", batch_size=16))
    assert np.abs(low - reference).max() < 5e-2
    # both really ran on the device, and bf16 arithmetic is not fp32's (else the bf16 path was skipped)
    assert clip.device.startswith("cuda") and bf16.device.startswith("cuda")
    assert not np.array_equal(low, ours)


# -- DALI: formats, pixel guard, errors, EXIF orientation (issue 21) -----------------------------------------
def _encode(img, fmt: str, **kw) -> bytes:
    from PIL import Image  # noqa: F401 - the plugins register on import

    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _picture(w: int = 96, h: int = 64):
    """An asymmetric picture: a gradient with a red block in the top-left corner."""
    from PIL import Image

    x = np.zeros((h, w, 3), np.uint8)
    x[..., 1] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
    x[..., 2] = np.linspace(0, 255, h, dtype=np.uint8)[:, None]
    x[: h // 3, : w // 3] = (230, 20, 20)
    return Image.fromarray(x)


def test_dali_allowlist_sends_gif_to_pillow_and_decodes_mpo(tiny_clip, rows, caplog):
    from PIL import Image

    from curate.models.clip import DALI_FORMATS

    clip = load_clip(tiny_clip, device="cpu")
    pic = Image.open(io.BytesIO(rows[0][0])).convert("RGB")
    gif = _encode(pic.convert("P"), "GIF")
    mpo = _encode(pic, "MPO", save_all=True, append_images=[pic.rotate(90)])  # a two-picture camera JPEG
    assert Image.open(io.BytesIO(mpo)).format == "MPO" and "MPO" in DALI_FORMATS and "GIF" not in DALI_FORMATS
    batch = [rows[1][0], gif, mpo, rows[2][0]]
    pil = PilDecoder(clip.preprocess, draft=None, reference=clip.reference_transform)
    ref, ref_ok = embed_images(clip, batch, pil, 8)
    assert ref_ok.all()

    caplog.set_level("INFO", logger="curate.models.clip")
    dali = DaliDecoder(clip.preprocess, device="cpu", batch_size=8, fallback=pil)
    emb, ok = embed_images(clip, batch, dali, 8)
    assert ok.all()  # before: the GIF failed DALI's batch, was bisected out and rejected; MPO was refused
    assert "isolating" not in caplog.text  # no batch failed: the GIF never reached DALI
    assert (emb * ref).sum(1).min() > 0.999  # GIF through Pillow exactly, MPO (DALI) within its tolerance
    # without a fallback the GIF row is rejected up front, the others still decode in one batch
    _, ok = DaliDecoder(clip.preprocess, device="cpu", batch_size=8).decode_batch(batch)
    assert list(ok) == [True, False, True, True]


def test_dali_pixel_guard_and_bounded_batches(tiny_clip, rows):
    import struct
    import zlib

    clip = load_clip(tiny_clip, device="cpu")

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    # a 300-byte PNG declaring 40,000 x 40,000 pixels: rejected from its header, never decoded
    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 40000, 40000, 8, 2, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(b"\x00" * 1000)) + chunk(b"IEND", b"")
    images = [r[0] for r in rows[:6]]
    whole = DaliDecoder(clip.preprocess, device="cpu", batch_size=8)
    out, ok = whole.decode_batch([images[0], bomb, *images[1:]])
    assert list(ok) == [True, False, True, True, True, True, True]
    # one image per DALI run when the pixel budget is tiny: the same pixels as one big run
    tiny_budget = DaliDecoder(clip.preprocess, device="cpu", batch_size=8, max_batch_pixels=1)
    out2, ok2 = tiny_budget.decode_batch([images[0], bomb, *images[1:]])
    assert (ok2 == ok).all() and torch.equal(out, out2)
    # a lower max_pixels rejects the larger images by their header
    from PIL import Image

    sizes = [Image.open(io.BytesIO(b)).size for b in images]
    limit = sorted(w * h for w, h in sizes)[2]
    _, ok3 = DaliDecoder(clip.preprocess, device="cpu", batch_size=8, max_pixels=limit).decode_batch(images)
    assert list(ok3) == [w * h <= limit for w, h in sizes]


def test_dali_device_failures_raise_and_bad_images_do_not(tiny_clip, rows):
    from curate.models.clip import DecoderDeviceError, is_device_error

    clip = load_clip(tiny_clip, device="cpu")
    dec = DaliDecoder(clip.preprocess, device="cpu", batch_size=8)
    # DALI's real error for a corrupt image is classified as bad data ...
    with pytest.raises(Exception) as bad:
        dec._run([CORRUPT])
    assert not is_device_error(bad.value)
    # ... and the errors of a failing device are not
    for msg in ("CUDA error: out of memory", "cudaErrorIllegalAddress: an illegal memory access was encountered",
                "nvjpeg: Can't allocate memory for the decoded image", "std::bad_alloc"):
        assert is_device_error(RuntimeError(msg)), msg

    class FailingDevice(DaliDecoder):
        """DALI whose device runs out of memory on any batch of more than one image."""

        def _run(self, items):
            if len(items) > 1:
                raise RuntimeError("[nvImageCodec] CUDA error: out of memory (cudaErrorMemoryAllocation)")
            return super()._run(items)

    images = [r[0] for r in rows[:4]]
    with pytest.raises(DecoderDeviceError, match="out of memory"):
        FailingDevice(clip.preprocess, device="cpu", batch_size=8).decode_batch(images)  # never a reject


def test_exif_orientation_is_applied_on_every_path(tiny_clip):
    """A camera JPEG stored sideways with EXIF orientation 6 decodes like the upright picture on the
    Pillow path, the DALI path and recaption's decoder; ignoring the tag would give other pixels."""
    from PIL import Image

    from curate.stages.recaption import decode_image

    upright = _picture()
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what the camera wrote
    tagged = _encode(stored, "JPEG", quality=95, exif=exif)
    plain = _encode(upright, "JPEG", quality=95)
    sideways = _encode(stored, "JPEG", quality=95)  # the same stored pixels without the tag

    clip = load_clip(tiny_clip, device="cpu")
    pil = PilDecoder(clip.preprocess, draft=None)
    a, b, c = (pil.decode(x).astype(np.float32) for x in (tagged, plain, sideways))
    assert np.abs(a - b).mean() < 3 and np.abs(a - c).mean() > 20

    dali = DaliDecoder(clip.preprocess, device="cpu", batch_size=4)
    out, ok = dali.decode_batch([tagged, plain, sideways])
    assert ok.all()
    assert (out[0] - out[1]).abs().mean() < 0.05 and (out[0] - out[2]).abs().mean() > 0.3
    # DALI and Pillow agree on the tagged image (Pillow's uint8 pixels normalised like DALI's output)
    mean = torch.tensor(clip.preprocess.mean).view(3, 1, 1) * 255
    std = torch.tensor(clip.preprocess.std).view(3, 1, 1) * 255
    pil_norm = (torch.from_numpy(a).permute(2, 0, 1) - mean) / std
    assert (out[0] - pil_norm).abs().mean() < 0.05

    r = np.asarray(decode_image(tagged, 0, False, 10**8), np.float32)
    assert r.shape == (64, 96, 3) and np.abs(r - np.asarray(upright, np.float32)).mean() < 3


@pytest.mark.gpu
def test_dali_gpu_on_corrupt_gif_mpo_bomb_and_a_real_device_oom(tiny_clip, rows, reference):
    """DALI mixed on the GPU: a corrupt JPEG is rejected alone, a GIF scores through the Pillow
    fallback, an MPO decodes, a header bomb never reaches the device; scores within tolerance of
    open_clip's CPU preprocess. Then the device really runs out of memory: that raises, no row is
    rejected for it."""
    import struct
    import zlib

    from PIL import Image

    from curate.models.clip import DecoderDeviceError

    clip = load_clip(tiny_clip, device="cuda", precision="fp32")
    pic = Image.open(io.BytesIO(rows[0][0])).convert("RGB")
    gif = _encode(pic.convert("P"), "GIF")
    mpo = _encode(pic, "MPO", save_all=True, append_images=[pic.rotate(90)])

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 40000, 40000, 8, 2, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(b"\x00" * 1000)) + chunk(b"IEND", b"")
    good = [r[0] for r in rows[1:9]]
    batch = [good[0], CORRUPT, gif, good[1], mpo, bomb, *good[2:]]
    pil = PilDecoder(clip.preprocess, draft=None, reference=clip.reference_transform)
    dali = DaliDecoder(clip.preprocess, device="gpu", batch_size=16, fallback=pil)
    emb, ok = embed_images(clip, batch, dali, 16)
    assert list(ok) == [True, False, True, True, True, False] + [True] * 6
    ref, ref_ok = embed_images(clip, batch, pil, 16)
    assert (ref_ok == ok).all()
    assert (emb[ok] * ref[ok]).sum(1).min() > 0.99

    # fill the device, leaving less than one decoded batch of large photos needs
    big = _encode(_picture(4000, 3000), "JPEG", quality=95)
    free, _ = torch.cuda.mem_get_info()
    hog = torch.empty(max(0, free - 64 * 1024**2), dtype=torch.uint8, device="cuda")
    try:
        with pytest.raises(DecoderDeviceError):
            DaliDecoder(clip.preprocess, device="gpu", batch_size=16).decode_batch([big] * 16)
    finally:
        del hog
        torch.cuda.empty_cache()
