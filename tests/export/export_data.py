"""Small curated datasets for the export tests, written with the real dataset and tar code.

``source``: a dataset that owns its bytes (like download's output), three shards of JPEG and PNG
images. ``curated``: a pointer-only dataset over it (like filter/recaption output): some rows dropped,
a ``recaption`` column on most rows, a clip score and an embedding column, so export has to follow
pointers into another dataset and carry every kind of column.
"""

from __future__ import annotations

import io
import random
import time

import numpy as np
import pyarrow as pa
from PIL import Image

from curate import schema
from curate.dataset import Dataset, make_key, new_attempt, sha256_hex, uid_for
from curate.wds import TarWriter

SOURCE_SHARDS = (40, 35, 45)


def _image(rng: random.Random, fmt: str) -> bytes:
    w, h = rng.randint(24, 48), rng.randint(24, 48)
    arr = np.array([[rng.randrange(256) for _ in range(3)] for _ in range(w * h)], dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr.reshape(h, w, 3)).save(buf, format=fmt)
    return buf.getvalue()


def _manifest(ds: Dataset, stage: str, shards: dict[int, int]) -> None:
    ds.write_json(
        {
            "schema_version": schema.SCHEMA_VERSION,
            "stage": stage,
            "config": {},
            "input": None,
            "run": {"stage": stage},
            "owns_images": stage == "download",
            "shard_digits": 5,
            "shards": [{"shard": ds.shard_name(n), "rows": r} for n, r in shards.items()],
            "totals": {"kept": sum(shards.values())},
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
        "_manifest.json",
    )


def write_source(root, seed: int = 0) -> Dataset:
    """A download-like dataset: tars + parquet + idx, committed through Dataset.commit_shard."""
    ds = Dataset(str(root))
    rng = random.Random(seed)
    counts = {}
    for n, rows in enumerate(SOURCE_SHARDS):
        attempt = new_attempt()
        tar_file = ds.open_tmp_tar(n, attempt)
        writer = TarWriter(tar_file)
        records = []
        for i in range(rows):
            fmt, ext = ("PNG", "png") if i % 3 == 0 else ("JPEG", "jpg")
            data = _image(rng, fmt)
            key = make_key(n, i)
            caption = f"a picture number {n}-{i} of some colourful noise"
            where = writer.add(key, {ext: data, "txt": caption, "json": b"{}"})
            records.append({
                schema.UID: uid_for("test", n, i),
                schema.URL: f"http://example.invalid/{n}/{i}.{ext}",
                schema.CAPTION: caption,
                schema.KEY: key,
                schema.STATUS: schema.STATUS_SUCCESS,
                schema.SHA256: sha256_hex(data),
                schema.IMAGE_TAR: ds.tar_url(n),
                schema.IMAGE_OFFSET: where[ext][0],
                schema.IMAGE_LENGTH: where[ext][1],
                schema.IMAGE_FORMAT: ext,
                "extra_column": i,  # carried through untouched
            })
        writer.close()
        tar_file.close()
        table = schema.conform(pa.Table.from_pylist(records))
        rejects = table.slice(0, 0).append_column(schema.DROP_REASON, pa.array([], pa.string()))
        ds.commit_shard(n, table, rejects, {"rows_in": rows, "rows_out": rows, "rejected": 0, "drops": {}},
                        attempt=attempt, tar_written=True, idx_text=writer.index_text())
        counts[n] = rows
    _manifest(ds, "download", counts)
    ds.refresh()
    return ds


def write_curated(root, source: Dataset, drop_every: int = 7, recaption_every: int = 5) -> Dataset:
    """A pointer-only dataset over ``source``: every drop_every-th row dropped, and every
    recaption_every-th row left without a recaption."""
    ds = Dataset(str(root))
    counts = {}
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
        t = t.append_column(schema.IMAGE_EMBEDDING, emb)
        t = schema.conform(t)
        rejects = t.slice(0, 0).append_column(schema.DROP_REASON, pa.array([], pa.string()))
        ds.commit_shard(n, t, rejects, {"rows_in": t.num_rows, "rows_out": t.num_rows, "rejected": 0,
                                        "drops": {}})
        counts[n] = t.num_rows
    _manifest(ds, "recaption", counts)
    ds.refresh()
    return ds
