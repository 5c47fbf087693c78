"""Datasets for the dedup/filter tests: real demo-corpus images plus made near-duplicates.

``build_corpus`` returns samples (bytes, ext, caption, truth) where ``truth`` names the original a
made duplicate comes from and how it was made (resized, re-encoded at low JPEG quality, slightly
cropped (centred, or 3% off two edges), brightness-shifted, text overlay, exact copy under another URL); ``write_dataset`` writes
them as a download-like dataset (tars + parquet, committed through the real Dataset code), spreading
each duplicate into a different shard from its original.
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageEnhance, ImageFont

from curate import schema
from curate.dataset import Dataset, uid_for
from curate.testing.datasets import IMAGE, write_image_dataset

CORPUS = Path(__file__).resolve().parents[2] / "demo" / "corpus"
EDITS = ("resized", "jpeg_q30", "crop2", "corner3", "bright", "text")


@dataclass
class Sample:
    data: bytes
    ext: str
    caption: str
    origin: str  # the original's name: samples with the same origin are true duplicates
    kind: str  # "original", an edit name, "copy", "same_caption", "broken"
    width: int = 0
    height: int = 0


def _encode(img: Image.Image, fmt: str = "JPEG", quality: int = 90) -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG":
        img.convert("RGB").save(buf, "JPEG", quality=quality)
    else:
        img.save(buf, fmt)
    return buf.getvalue()


def _flat(img: Image.Image) -> Image.Image:
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        bg.alpha_composite(img)
        return bg.convert("RGB")
    return img.convert("RGB")


def edit(img: Image.Image, how: str) -> Image.Image:
    w, h = img.size
    if how == "resized":
        return img.resize((max(8, w // 2), max(8, h // 2)), Image.Resampling.BICUBIC)
    if how == "jpeg_q30":
        return Image.open(io.BytesIO(_encode(img, quality=30)))
    if how == "crop2":
        dx, dy = max(1, w // 50), max(1, h // 50)
        return img.crop((dx, dy, w - dx, h - dy))
    if how == "corner3":  # 3% cut off the left and the top: the picture moves under the hash grid
        return img.crop((max(1, round(w * 0.03)), max(1, round(h * 0.03)), w, h))
    if how == "bright":
        return ImageEnhance.Brightness(img).enhance(1.15)
    if how == "text":
        out = img.copy()
        font = ImageFont.load_default(size=max(10, h // 14))
        ImageDraw.Draw(out).text(
            (w // 20, h - h // 7),
            "stock photo",
            fill=(255, 255, 255),
            font=font,
            stroke_width=1,
            stroke_fill=(0, 0, 0),
        )
        return out
    raise ValueError(how)


def corpus_files(n: int) -> list[dict]:
    entries = [json.loads(x) for x in (CORPUS / "captions.jsonl").read_text().splitlines() if x.strip()]
    return [e for e in entries if e["kind"] == "ok"][:n]


def build_corpus(n_originals: int = 40, edited: int = 20, copies: int = 4, seed: int = 0) -> list[Sample]:
    rng = random.Random(seed)
    out: list[Sample] = []
    files = corpus_files(n_originals)
    for i, e in enumerate(files):
        data = (CORPUS / e["file"]).read_bytes()
        img = Image.open(io.BytesIO(data))
        name = e["file"]
        out.append(Sample(data, name.rsplit(".", 1)[1], e["caption"], name, "original", *img.size))
        if i < edited:
            flat = _flat(img)
            for how in EDITS:
                v = edit(flat, how)
                out.append(
                    Sample(
                        _encode(v), "jpg", f"{e['caption']} ({how} {rng.randrange(1000)})", name, how, *v.size
                    )
                )
        if i < copies:  # the same bytes under another URL, another caption
            out.append(
                Sample(data, name.rsplit(".", 1)[1], f"copy {i} of something", name, "copy", *img.size)
            )
    # the same caption on different, unrelated images (corpus images not used above)
    for e in corpus_files(n_originals + 3)[n_originals:]:
        data = (CORPUS / e["file"]).read_bytes()
        img = Image.open(io.BytesIO(data))
        out.append(
            Sample(
                data,
                e["file"].rsplit(".", 1)[1],
                "the very same caption",
                e["file"],
                "same_caption",
                *img.size,
            )
        )
    out.append(Sample(b"<html>not an image</html>", "jpg", "a broken picture", "broken", "broken"))
    return out


def write_dataset(
    root, samples: list[Sample], shards: int = 4, empty_shard: bool = True, seed: int = 1
) -> Dataset:
    """Download-like dataset: samples shuffled over ``shards`` shards (plus one empty shard)."""
    rng = random.Random(seed)
    order = list(range(len(samples)))
    rng.shuffle(order)
    per = [order[k::shards] for k in range(shards)]
    if empty_shard:
        per.insert(1, [])
    rows = [[{
        IMAGE: samples[k].data,
        schema.IMAGE_FORMAT: samples[k].ext,
        schema.UID: uid_for("dedup-test", k),
        schema.URL: f"http://example.invalid/{k}.{samples[k].ext}",
        schema.CAPTION: samples[k].caption,
        schema.STATUS: schema.STATUS_SUCCESS,
        schema.WIDTH: samples[k].width,
        schema.HEIGHT: samples[k].height,
        "sample": k,  # extra column, carried through; the tests' ground truth key
    } for k in idxs] for idxs in per]
    return write_image_dataset(str(root), rows)
