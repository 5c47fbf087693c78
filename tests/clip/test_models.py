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
    assert torch.cuda.is_available()
