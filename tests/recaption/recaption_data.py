"""Small image datasets for the recaption tests.

``write_source`` writes a download-like dataset (tars + Parquet pointers, committed through the real Dataset code) whose images
are JPEG, PNG and transparent PNG, with optional corrupt members.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from curate import schema
from curate.dataset import Dataset, uid_for
from curate.testing.datasets import IMAGE, write_image_dataset

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
    out = []
    for n in range(shards):
        records = []
        for i in range(rows):
            data, ext = sample_image(n * rows + i)
            if (n, i) in corrupt:
                data, ext = CORRUPT, "jpg"
            records.append({
                IMAGE: data,
                schema.IMAGE_FORMAT: ext,
                schema.UID: uid_for("recaption-test", n, i),
                schema.CAPTION: f"original caption {n}-{i}: a small {'red' if i % 2 else 'blue'} house",
                "extra": i,
            })
        out.append(records)
    return write_image_dataset(str(root), out)
