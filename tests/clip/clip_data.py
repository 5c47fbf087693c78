"""Small datasets of real images for the clip / semdedup tests (tars + Parquet pointers, committed through
the real Dataset code), and the straightforward open_clip scoring the stage is checked against."""

from __future__ import annotations

import glob
import io
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from curate import schema
from curate.dataset import Dataset, make_key, sha256_hex, uid_for
from curate.wds import TarWriter

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
    ds = Dataset(str(root))
    manifest_shards = []
    for n, rows in enumerate(shards):
        tar_file = ds.open_tmp_tar(n, "t")
        writer = TarWriter(tar_file)
        records = []
        for i, (data, ext, caption) in enumerate(rows):
            key = make_key(n, i)
            where = writer.add(key, {ext: data, "txt": caption.encode()})
            try:
                w, h = Image.open(io.BytesIO(data)).size
            except Exception:  # noqa: BLE001 - corrupt on purpose
                w = h = 0
            records.append({
                schema.UID: uid_for(tag, n, i),
                schema.CAPTION: caption,
                schema.KEY: key,
                schema.WIDTH: w,
                schema.HEIGHT: h,
                schema.SHA256: sha256_hex(data),
                schema.IMAGE_TAR: ds.tar_url(n),
                schema.IMAGE_OFFSET: where[ext][0],
                schema.IMAGE_LENGTH: where[ext][1],
                schema.IMAGE_FORMAT: ext,
            })
        writer.close()
        tar_file.close()
        table = schema.conform(pa.Table.from_pylist(records))
        rejects = table.slice(0, 0).append_column(schema.DROP_REASON, pa.array([], pa.string()))
        ds.commit_shard(n, table, rejects, {"rows_in": len(rows), "rows_out": len(rows), "drops": {}},
                        attempt="t", tar_written=True, idx_text=writer.index_text())
        manifest_shards.append({"shard": ds.shard_name(n), "rows": len(rows)})
    ds.write_json(
        {
            "schema_version": schema.SCHEMA_VERSION, "stage": "download", "config": {}, "input": None,
            "run": {"stage": "download"}, "owns_images": True, "shard_digits": 5, "shards": manifest_shards,
            "totals": {"kept": sum(len(r) for r in shards)},
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
        "_manifest.json",
    )
    ds.refresh()
    return ds


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
