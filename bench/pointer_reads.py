"""Cost of reading image bytes through confined, checked pointers (issue 17) against a plain reader.

Baseline: the reader before the checks (one open per tar, seek + read in offset order, no checks).
Ours: ``dataset.read_images`` (lineage check, the tar header before each member, sha256 of the bytes).
For scale, the same run also times a Pillow decode of those images (what every stage that reads
bytes does next). Usage: ``python bench/pointer_reads.py [N_IMAGES]``; last line ``ratio: X.XX``
(ours / baseline, read step alone).
"""

from __future__ import annotations

import io
import sys
import tempfile
import time

import numpy as np
from PIL import Image

from curate import schema
from curate.dataset import read_images, url_to_fs
from curate.testing.datasets import IMAGE, write_image_dataset


def _jpeg(rng: np.random.Generator) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def plain_read(table) -> list[bytes]:
    tars = table.column(schema.IMAGE_TAR).to_pylist()
    offs = table.column(schema.IMAGE_OFFSET).to_pylist()
    lens = table.column(schema.IMAGE_LENGTH).to_pylist()
    out: list[bytes] = [b""] * len(tars)
    by: dict[str, list[int]] = {}
    for i, t in enumerate(tars):
        by.setdefault(t, []).append(i)
    for tar, rows in by.items():
        fs, path = url_to_fs(tar)
        with fs.open(path, "rb") as f:
            for i in sorted(rows, key=lambda i: offs[i]):
                f.seek(offs[i])
                out[i] = f.read(lens[i])
    return out


def main(n: int = 1000) -> None:
    rng = np.random.default_rng(0)
    root = tempfile.mkdtemp()
    ds = write_image_dataset(f"{root}/src", [[{IMAGE: _jpeg(rng), schema.IMAGE_FORMAT: "jpg", schema.CAPTION: "c",
                                                schema.UID: f"{i:032x}"} for i in range(n)]])
    table = ds.read_shard(0)
    print(f"{n} images, {sum(table.column(schema.IMAGE_LENGTH).to_pylist()) / n / 1024:.0f} KiB each")
    base, ours = [], []
    for _ in range(5):  # interleaved, best of 5: the machine's other load hits both alike
        t = time.perf_counter()
        a = plain_read(table)
        base.append(time.perf_counter() - t)
        t = time.perf_counter()
        b = read_images(table, ds)
        ours.append(time.perf_counter() - t)
        assert a == b
    t = time.perf_counter()
    for blob in a:
        Image.open(io.BytesIO(blob)).load()
    decode = time.perf_counter() - t
    print(f"baseline (plain reader): {min(base) * 1e3 / n:.3f} ms/image")
    print(f"checked reader: {min(ours) * 1e3 / n:.3f} ms/image")
    print(f"Pillow decode of the same images: {decode * 1e3 / n:.3f} ms/image")
    print(f"added per image, as a share of read + decode: {(min(ours) - min(base)) / (min(base) + decode):.1%}")
    print(f"ratio: {min(ours) / min(base):.2f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1000)
