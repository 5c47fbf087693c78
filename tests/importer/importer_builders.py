"""Builders of input folders as other tools write them: the webdataset library's TarWriter, and
img2dataset's output layout (NNNNN.tar + NNNNN.parquet + NNNNN_stats.json), written here by hand with
img2dataset's columns and key format (img2dataset itself is not installed in the project)."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from curate.dataset import Dataset
from curate.runner import ShardEnv, execute_shard
from curate.stage import PlanContext, RunOptions
from curate.stages.import_ import ImportConfig, ImportStage


def image_bytes(seed: int, fmt: str = "jpg", size: tuple[int, int] = (96, 64)) -> bytes:
    """A small real picture (gradients + a square, different per seed) encoded as ``fmt``."""
    w, h = size
    img = Image.new("RGB", size)
    px = img.load()
    for y in range(h):
        for x in range(w):
            px[x, y] = ((x * 255 // w + seed * 37) % 256, (y * 255 // h + seed * 91) % 256, (seed * 53) % 256)
    s = 8 + seed % 20
    img.paste(
        (255 - seed % 256, seed % 256, 128),
        (seed % (w - s), seed % (h - s), seed % (w - s) + s, seed % (h - s) + s),
    )
    buf = io.BytesIO()
    img.save(
        buf, {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt], **({"quality": 90} if fmt != "png" else {})
    )
    return buf.getvalue()


def raw_tar(path: Path, members: list[tuple[str, bytes]], fmt=tarfile.PAX_FORMAT) -> None:
    """A tar with exactly these members in this order (any names, duplicates allowed)."""
    with tarfile.open(path, "w", format=fmt) as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            ti.mtime = 1_600_000_000
            tf.addfile(ti, io.BytesIO(data))


def write_img2dataset_shard(folder: Path, shard: int, rows: list[dict]) -> None:
    """One img2dataset output shard. ``rows``: url, caption, and either ``image`` (bytes, success) or
    ``error`` (a failed download, listed in the parquet only), in input order."""
    from PIL import Image as _I

    records = []
    with tarfile.open(folder / f"{shard:05d}.tar", "w", format=tarfile.USTAR_FORMAT) as tf:
        for i, r in enumerate(rows):
            key = f"{shard:05d}{i:04d}"
            rec = {
                "url": r["url"],
                "caption": r["caption"],
                "key": key,
                "status": "success",
                "error_message": None,
                "width": None,
                "height": None,
                "original_width": None,
                "original_height": None,
                "exif": None,
                "sha256": None,
            }
            if "error" in r:
                rec["status"], rec["error_message"] = "failed_to_download", r["error"]
            else:
                data = r["image"]
                with _I.open(io.BytesIO(data)) as im:
                    rec["width"], rec["height"] = im.size
                rec["original_width"], rec["original_height"] = rec["width"] * 2, rec["height"] * 2
                rec["exif"] = "{}"
                # img2dataset hashes the bytes it downloaded, before resizing: not the stored bytes
                rec["sha256"] = hashlib.sha256(b"original:" + data).hexdigest()
                for ext, payload in (
                    ("jpg", data),
                    ("txt", r["caption"].encode()),
                    ("json", json.dumps(rec).encode()),
                ):
                    ti = tarfile.TarInfo(f"{key}.{ext}")
                    ti.size = len(payload)
                    tf.addfile(ti, io.BytesIO(payload))
            records.append(rec)
    schema_ = pa.schema(
        [
            ("url", pa.string()),
            ("caption", pa.string()),
            ("key", pa.string()),
            ("status", pa.string()),
            ("error_message", pa.string()),
            ("width", pa.int64()),
            ("height", pa.int64()),
            ("original_width", pa.int64()),
            ("original_height", pa.int64()),
            ("exif", pa.string()),
            ("sha256", pa.string()),
        ]
    )
    pq.write_table(pa.Table.from_pylist(records, schema=schema_), folder / f"{shard:05d}.parquet")
    ok = sum(r["status"] == "success" for r in records)
    stats = {
        "count": len(records),
        "successes": ok,
        "failed_to_download": len(records) - ok,
        "failed_to_resize": 0,
        "duration": 1.0,
        "status_dict": {"success": ok},
    }
    (folder / f"{shard:05d}_stats.json").write_text(json.dumps(stats))


def import_direct(inp: Path, out: Path, **config) -> Dataset:
    """Plan and run every shard of the import stage in this process, through the runner's own
    per-shard commit code (no Ray), and return the output dataset."""
    stage = ImportStage(ImportConfig(**config))
    stage.setup()
    ds = Dataset(str(out))
    ds.fs.makedirs(ds.root, exist_ok=True)
    ctx = PlanContext(
        input_path=str(inp),
        input=None,
        output=ds,
        plan_dir=ds.path("_plan"),
        options=RunOptions(progress=False),
        map=lambda f, xs: [f(x) for x in xs],
    )
    ids = stage.plan(ctx)
    env = ShardEnv("import", str(inp), ds.url, 5, RunOptions(progress=False))
    for n in ids:
        execute_shard(stage, n, env)
    ds.shard_digits = 5
    # the manifest the runner writes: pointers into the adopted tars are read through it
    from curate.testing.datasets import finish

    url = str(inp) if "://" in str(inp) else str(Path(inp).resolve())
    return finish(ds, "import", writes_images=False, input={"url": url})
