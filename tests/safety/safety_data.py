"""Inputs for the safety / decontaminate / face tests: datasets with stored embeddings, real images."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from curate import schema
from curate.dataset import Dataset, uid_for
from curate.testing.datasets import IMAGE, write_image_dataset, write_table_dataset

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "demo" / "corpus"


def unit_rows(n: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def embedding_dataset(root, shards: list[int], dim: int, model: str = "ViT-L-14", seed: int = 0,
                      captions: list[str] | None = None) -> tuple[Dataset, np.ndarray, list[str]]:
    """A clip-like output: rows with float16 image/text embeddings, its manifest naming ``model``."""
    tables, allx, uids = [], [], []
    k = 0
    for n, rows in enumerate(shards):
        x = unit_rows(rows, dim, seed + n).astype(np.float16)
        t = unit_rows(rows, dim, seed + 100 + n).astype(np.float16)
        u = [uid_for("safety-test", n, i) for i in range(rows)]
        caps = [(captions[(k + i) % len(captions)] if captions else f"picture {n} {i}") for i in range(rows)]
        k += rows
        tables.append(pa.table({
            schema.UID: u,
            schema.CAPTION: caps,
            schema.IMAGE_EMBEDDING: pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1), pa.float16()), dim),
            schema.TEXT_EMBEDDING: pa.FixedSizeListArray.from_arrays(pa.array(t.reshape(-1), pa.float16()), dim),
        }))
        allx.append(x.astype(np.float32))
        uids += u
    ds = write_table_dataset(str(root), tables, "clip", config={"model": model, "pretrained": "openai"})
    return ds, np.concatenate(allx), uids


def corpus_entries() -> list[dict]:
    return [json.loads(line) for line in (CORPUS / "captions.jsonl").read_text().splitlines() if line.strip()]


def demo_images(kinds=("ok", "near_duplicate", "duplicate")) -> list[tuple[str, bytes, str, str | None]]:
    """(file, bytes, caption, of) of the decodable demo corpus entries."""
    out = []
    for e in corpus_entries():
        if e["kind"] in kinds:
            out.append((e["file"], (CORPUS / e["file"]).read_bytes(), e["caption"], e.get("of")))
    return out


def image_dataset(root, rows: list[tuple[bytes, str]], shard_size: int = 50, tag: str = "img") -> Dataset:
    """A dataset owning its tars; ``rows`` are (bytes, caption); ext sniffed from the bytes."""
    shards = []
    for s in range(0, len(rows), shard_size):
        recs = []
        for i, (data, caption) in enumerate(rows[s:s + shard_size]):
            img = Image.open(io.BytesIO(data))
            ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}[img.format]
            recs.append({IMAGE: data, schema.IMAGE_FORMAT: ext, schema.UID: uid_for(tag, s + i),
                         schema.CAPTION: caption, schema.WIDTH: img.width, schema.HEIGHT: img.height})
        shards.append(recs)
    return write_image_dataset(str(root), shards)


def encode(arr: np.ndarray, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **kw)
    return buf.getvalue()
