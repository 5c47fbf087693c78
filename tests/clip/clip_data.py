"""Small datasets of real images for the clip / semdedup tests (tars + Parquet pointers, committed through
the real Dataset code), and the straightforward open_clip scoring the stage is checked against."""

from __future__ import annotations

import glob
import io
from pathlib import Path

import numpy as np
from PIL import Image

from curate import schema
from curate.dataset import Dataset, uid_for
from curate.testing.datasets import IMAGE, write_image_dataset

ROOT = Path(__file__).resolve().parents[2]
CORRUPT = b"\xff\xd8\xff\xe0 truncated jpeg header, then nothing" * 3


def corpus_images(n: int) -> list[tuple[bytes, str, str]]:
    """(bytes, ext, caption) of n real images (the demo corpus' clip art as jpg/png/webp, and photos)."""
    import json

    out = []
    lines = (ROOT / "demo" / "corpus" / "captions.jsonl").read_text().splitlines()
    for line in lines:
        rec = json.loads(line)
        if rec.get("kind") != "ok":
            continue
        path = ROOT / "demo" / "corpus" / rec["file"]
        out.append((path.read_bytes(), path.suffix.lstrip("."), rec["caption"]))
        if len(out) == n:
            return out
    for path in sorted(glob.glob("/usr/share/backgrounds/*.jpg")):
        out.append((Path(path).read_bytes(), "jpg", Path(path).stem.replace("_", " ")))
        if len(out) == n:
            return out
    i = 0
    while len(out) < n:  # synthetic JPEGs as a last resort
        rng = np.random.default_rng(i)
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)).save(buf, "JPEG")
        out.append((buf.getvalue(), "jpg", f"noise {i}"))
        i += 1
    return out


def write_dataset(root, shards: list[list[tuple[bytes, str, str]]], tag: str = "clip-test") -> Dataset:
    """A complete dataset owning its tars; ``shards[n]`` lists (image bytes, ext, caption) rows."""
    out = []
    for n, rows in enumerate(shards):
        records = []
        for i, (data, ext, caption) in enumerate(rows):
            try:
                w, h = Image.open(io.BytesIO(data)).size
            except Exception:  # noqa: BLE001 - corrupt on purpose
                w = h = 0
            records.append({IMAGE: data, schema.IMAGE_FORMAT: ext, schema.UID: uid_for(tag, n, i),
                            schema.CAPTION: caption, schema.WIDTH: w, schema.HEIGHT: h})
        out.append(records)
    return write_image_dataset(str(root), out)


def reference_scores(model_dir: str, rows: list[tuple[bytes, str, str]]) -> np.ndarray:
    """The straightforward open_clip computation: its own preprocess, encode_image / encode_text,
    normalise, dot. NaN where open_clip's preprocess cannot open the image."""
    import open_clip
    import torch

    name = f"local-dir:{model_dir}"
    model, _, preprocess = open_clip.create_model_and_transforms(name)
    model.eval()
    tok = open_clip.get_tokenizer(name)
    out = np.full(len(rows), np.nan, np.float32)
    with torch.no_grad():
        for i, (data, _, caption) in enumerate(rows):
            try:
                x = preprocess(Image.open(io.BytesIO(data))).unsqueeze(0)
            except Exception:  # noqa: BLE001
                continue
            a = model.encode_image(x)
            b = model.encode_text(tok([caption]))
            a = a / a.norm(dim=-1, keepdim=True)
            b = b / b.norm(dim=-1, keepdim=True)
            out[i] = float((a * b).sum())
    return out
