"""semdedup: planted near-duplicate embeddings across shards are found globally, the keep policy picks the
representative, everything else is kept; and end to end after the clip stage on real images."""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from clip_data import corpus_images, write_dataset
from PIL import Image

from curate import schema
from curate.dataset import Dataset, uid_for
from curate.runner import run_stage
from curate.stages.semdedup import SemDedupConfig, SemDedupStage


def _write_embeddings(root, shards: list[dict]) -> Dataset:
    """A complete dataset of metadata rows with image_embedding (no tars: semdedup reads no pixels)."""
    ds = Dataset(str(root))
    for n, cols in enumerate(shards):
        emb = cols.pop("emb")
        table = pa.table(cols)
        flat = pa.array(emb.astype(np.float16).reshape(-1), pa.float16())
        arr = pa.FixedSizeListArray.from_arrays(flat, emb.shape[1])
        if "null" in table.column_names:
            arr = pa.array([None if z else v for z, v in zip(table.column("null").to_pylist(), arr.to_pylist(),
                                                               strict=True)], arr.type)
            table = table.drop_columns(["null"])
        table = schema.conform(table.append_column(schema.IMAGE_EMBEDDING, arr))
        rejects = table.slice(0, 0).append_column(schema.DROP_REASON, pa.array([], pa.string()))
        ds.commit_shard(n, table, rejects, {"rows_in": table.num_rows, "drops": {}}, attempt="t")
    ds.write_json({"schema_version": schema.SCHEMA_VERSION, "stage": "clip", "config": {}, "input": None,
                   "shard_digits": 5, "shards": [], "totals": {},
                   "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, "_manifest.json")
    ds.refresh()
    return ds


def test_planted_duplicates_found_across_shards(ray_session, tmp_path):
    rng = np.random.default_rng(0)
    dim, per_shard = 32, 40
    emb = rng.normal(size=(3 * per_shard, dim))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    pixels = rng.integers(100, 1000, 3 * per_shard)
    # planted groups: (members as global row ids); later members are noisy copies of the first
    groups = [(0, 45, 90), (5, 6), (17, 118), (50, 99), (60, 61, 62, 100)]
    for g in groups:
        for m in g[1:]:
            noise = rng.normal(size=dim)
            emb[m] = emb[g[0]] + 0.04 * noise / np.linalg.norm(noise)
            emb[m] /= np.linalg.norm(emb[m])
    pixels[45] = 5000  # the best-resolution member of the first group is not the first one
    shards = []
    for n in range(3):
        sl = slice(n * per_shard, (n + 1) * per_shard)
        px = pixels[sl]
        shards.append({
            schema.UID: [uid_for("sem", n, i) for i in range(per_shard)],
            schema.WIDTH: pa.array(px, pa.int32()), schema.HEIGHT: pa.array(np.ones(per_shard), pa.int32()),
            schema.CLIP_SCORE: pa.array(rng.random(per_shard), pa.float32()),
            "null": [n == 2 and i == 30 for i in range(per_shard)],
            "emb": emb[sl],
        })
    inp = _write_embeddings(tmp_path / "in", shards)
    uid = {n * per_shard + i: uid_for("sem", n, i) for n in range(3) for i in range(per_shard)}
    summary = run_stage("semdedup", inp.url, str(tmp_path / "out"),
                        config={"threshold": 0.95, "n_clusters": 4, "groups": 3, "keep": "resolution"})
    out = Dataset(str(tmp_path / "out"))
    rejects = pa.concat_tables([t for _, t in out.iter_rejects()])
    got = dict(zip(rejects.column(schema.UID).to_pylist(), rejects.column(schema.DUP_OF).to_pylist(), strict=True))
    expect = {}
    for g in groups:
        best = max(g, key=lambda m: (pixels[m], -m))
        for m in g:
            if m != best:
                expect[uid[m]] = uid[best]
    assert got == expect
    assert set(rejects.column(schema.DROP_REASON).to_pylist()) == {"semdedup:duplicate"}
    assert summary["kept"] == 3 * per_shard - len(expect)
    kept = pa.concat_tables([t for _, t in out.iter_shards()])
    assert kept.column(schema.DUP_OF).null_count == kept.num_rows  # kept rows name no representative
    assert uid[2 * per_shard + 30] in kept.column(schema.UID).to_pylist()  # no embedding: passes
    stage = SemDedupStage(SemDedupConfig(threshold=0.95, n_clusters=4, groups=3))
    assert stage.explain(out, uid[0])["duplicate_of"][schema.DUP_OF] == uid[45]
    assert {r[schema.UID] for r in stage.explain(out, uid[45])["represents"]} == {uid[0], uid[90]}

    # keep: first -> the earliest member of each group is the representative
    run_stage("semdedup", inp.url, str(tmp_path / "first"),
              config={"threshold": 0.95, "n_clusters": 4, "groups": 2, "keep": "first"})
    rej = pa.concat_tables([t for _, t in Dataset(str(tmp_path / "first")).iter_rejects()])
    got = dict(zip(rej.column(schema.UID).to_pylist(), rej.column(schema.DUP_OF).to_pylist(), strict=True))
    assert got == {uid[m]: uid[g[0]] for g in groups for m in g[1:]}


def test_semdedup_without_embeddings_is_refused(ray_session, tmp_path):
    inp = write_dataset(tmp_path / "in", [corpus_images(2)])
    with pytest.raises(Exception, match="embeddings: true"):
        run_stage("semdedup", inp.url, str(tmp_path / "out"))


# Real photographs that scikit-image ships inside its wheel (the `bench` extra, installed by make).
SKIMAGE_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "hubble_deep_field.jpg",
                  "retina.jpg", "motorcycle_left.png", "ihc.png", "camera.png", "moon.png", "coins.png",
                  "brick.png", "grass.png", "gravel.png", "cell.png")


def _photos(n: int) -> list[tuple[bytes, str, str]]:
    """Real photos re-encoded at 640 px (clip art is too uniform for a random model)."""
    import skimage

    data = Path(skimage.__file__).parent / "data"
    files = [str(data / name) for name in SKIMAGE_PHOTOS[:n]]
    out = []
    for f in files:
        img = Image.open(f).convert("RGB")
        img.thumbnail((640, 640))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        out.append((buf.getvalue(), "jpg", f.rsplit("/", 1)[-1].replace("_", " ")))
    return out


def test_after_clip_on_real_images(tiny_clip, ray_session, tmp_path):
    """clip (embeddings) then semdedup: a half-size copy and an exact copy of a photo are removed in
    favour of the original (largest; ties by input order)."""
    rows = _photos(12)
    img = Image.open(io.BytesIO(rows[3][0]))
    small = io.BytesIO()
    img.resize((img.width // 2, img.height // 2), Image.Resampling.LANCZOS).save(small, "JPEG", quality=85)
    shards = [rows[:6], rows[6:] + [(small.getvalue(), "jpg", "a smaller copy"), rows[3]]]
    inp = write_dataset(tmp_path / "in", shards)
    run_stage("clip", inp.url, str(tmp_path / "clip"),
              config={"model": tiny_clip, "pretrained": None, "device": "cpu", "embeddings": True,
                      "resources": {"num_cpus": 1}})
    run_stage("semdedup", str(tmp_path / "clip"), str(tmp_path / "sem"),
              config={"threshold": 0.998, "n_clusters": 3, "keep": "resolution"})
    out = Dataset(str(tmp_path / "sem"))
    rej = pa.concat_tables([t for _, t in out.iter_rejects()])
    dropped = dict(zip(rej.column(schema.UID).to_pylist(), rej.column(schema.DUP_OF).to_pylist(), strict=True))
    original = uid_for("clip-test", 0, 3)
    assert dropped == {uid_for("clip-test", 1, 6): original, uid_for("clip-test", 1, 7): original}
