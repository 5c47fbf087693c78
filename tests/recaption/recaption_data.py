"""Small image datasets for the recaption tests.

``write_source`` writes a download-like dataset (tars + Parquet pointers, committed through the real Dataset code) whose images
are JPEG, PNG and transparent PNG, with optional corrupt members.
"""

from __future__ import annotations

import io
import time

import numpy as np
import pyarrow as pa
from PIL import Image

from curate import schema
from curate.dataset import Dataset, make_key, new_attempt, sha256_hex, uid_for
from curate.wds import TarWriter

CORRUPT = b"\xff\xd8\xff\xe0 this is not a jpeg at all" * 4


def image_bytes(seed: int, fmt: str = "JPEG", size: tuple[int, int] = (48, 40), mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    channels = 4 if mode == "RGBA" else 3
    arr = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format=fmt)
    return buf.getvalue()


def sample_image(i: int) -> tuple[bytes, str]:
    """Row i's image: a rotation of JPEG / PNG / transparent PNG at varied sizes."""
    kind = i % 3
    size = (40 + 7 * (i % 5), 36 + 5 * (i % 4))
    if kind == 0:
        return image_bytes(i, "JPEG", size), "jpg"
    if kind == 1:
        return image_bytes(i, "PNG", size), "png"
    return image_bytes(i, "PNG", size, "RGBA"), "png"


def write_source(root, shards: int = 2, rows: int = 6, corrupt: frozenset[tuple[int, int]] = frozenset()) -> Dataset:
    """A committed, complete dataset that owns its tars. ``corrupt``: (shard, row) pairs whose image
    member holds bytes that are not an image."""
    ds = Dataset(str(root))
    counts = {}
    for n in range(shards):
        attempt = new_attempt()
        tar_file = ds.open_tmp_tar(n, attempt)
        writer = TarWriter(tar_file)
        records = []
        for i in range(rows):
            data, ext = sample_image(n * rows + i)
            if (n, i) in corrupt:
                data, ext = CORRUPT, "jpg"
            key = make_key(n, i)
            caption = f"original caption {n}-{i}: a small {'red' if i % 2 else 'blue'} house"
            where = writer.add(key, {ext: data, "txt": caption.encode()})
            records.append({
                schema.UID: uid_for("recaption-test", n, i),
                schema.CAPTION: caption,
                schema.KEY: key,
                schema.SHA256: sha256_hex(data),
                schema.IMAGE_TAR: ds.tar_url(n),
                schema.IMAGE_OFFSET: where[ext][0],
                schema.IMAGE_LENGTH: where[ext][1],
                schema.IMAGE_FORMAT: ext,
                "extra": i,
            })
        writer.close()
        tar_file.close()
        table = schema.conform(pa.Table.from_pylist(records))
        rejects = table.slice(0, 0).append_column(schema.DROP_REASON, pa.array([], pa.string()))
        ds.commit_shard(n, table, rejects, {"rows_in": rows, "rows_out": rows, "rejected": 0, "drops": {}},
                        attempt=attempt, tar_written=True, idx_text=writer.index_text())
        counts[n] = rows
    ds.write_json(
        {
            "schema_version": schema.SCHEMA_VERSION,
            "stage": "download",
            "config": {},
            "input": None,
            "run": {"stage": "download"},
            "owns_images": True,
            "shard_digits": 5,
            "shards": [{"shard": ds.shard_name(n), "rows": r} for n, r in counts.items()],
            "totals": {"kept": sum(counts.values())},
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
        "_manifest.json",
    )
    ds.refresh()
    return ds
