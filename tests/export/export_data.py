"""Small curated datasets for the export tests, written with the real dataset and tar code.

``source``: a dataset that owns its bytes (like download's output), three shards of JPEG and PNG
images. ``curated``: a pointer-only dataset over it (like filter/recaption output): some rows dropped,
a ``recaption`` column on most rows, a clip score and an embedding column, so export has to follow
pointers into another dataset and carry every kind of column.
"""

from __future__ import annotations

import io
import random

import numpy as np
import pyarrow as pa
from PIL import Image

from curate import schema
from curate.dataset import Dataset, uid_for
from curate.testing.datasets import IMAGE, write_image_dataset, write_table_dataset

SOURCE_SHARDS = (40, 35, 45)


def _image(rng: random.Random, fmt: str) -> bytes:
    w, h = rng.randint(24, 48), rng.randint(24, 48)
    arr = np.array([[rng.randrange(256) for _ in range(3)] for _ in range(w * h)], dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr.reshape(h, w, 3)).save(buf, format=fmt)
    return buf.getvalue()


def write_source(root, seed: int = 0) -> Dataset:
    """A download-like dataset: tars + parquet + idx, committed through Dataset.commit_shard."""
    rng = random.Random(seed)
    shards = []
    for n, rows in enumerate(SOURCE_SHARDS):
        records = []
        for i in range(rows):
            fmt, ext = ("PNG", "png") if i % 3 == 0 else ("JPEG", "jpg")
            records.append({
                IMAGE: _image(rng, fmt),
                schema.IMAGE_FORMAT: ext,
                schema.UID: uid_for("test", n, i),
                schema.URL: f"http://example.invalid/{n}/{i}.{ext}",
                schema.CAPTION: f"a picture number {n}-{i} of some colourful noise",
                schema.STATUS: schema.STATUS_SUCCESS,
                "extra_column": i,  # carried through untouched
            })
        shards.append(records)
    return write_image_dataset(str(root), shards)


def write_curated(root, source: Dataset, drop_every: int = 7, recaption_every: int = 5) -> Dataset:
    """A pointer-only dataset over ``source``: every drop_every-th row dropped, and every
    recaption_every-th row left without a recaption."""
    tables = []
    for n in source.shard_ids():
        t = source.read_shard(n)
        keep = [i for i in range(t.num_rows) if i % drop_every != 3]
        t = t.take(keep)
        uids = t.column(schema.UID).to_pylist()
        recaps = [None if j % recaption_every == 0 else f"a detailed new caption for {u[:8]}"
                  for j, u in enumerate(uids)]
        t = schema.with_column(t, schema.RECAPTION, recaps)
        t = schema.with_column(t, schema.CLIP_SCORE, [0.25 + 0.001 * j for j in range(t.num_rows)])
        emb = pa.array([[0.5, -0.5, 0.5, -0.5]] * t.num_rows, schema.embedding_type(4))
        tables.append(t.append_column(schema.IMAGE_EMBEDDING, emb))
    return write_table_dataset(str(root), tables, "recaption")
