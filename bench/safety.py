"""Benchmark: the safety stage's heads on stored embeddings, and export's face detection per image.

1. Heads. 10,000 rows of stored 768-d float16 image embeddings (ViT-L/14 width) in a curate dataset,
   scored by three heads of LAION's shapes (NSFW: 768-1024-2048-1024-256-1 relu/sigmoid like the AutoKeras
   detector; aesthetic: the improved predictor's 768-1024-128-64-16-1; watermark: linear), random weights
   in the curate-head/1 format.
   - ours: ``SafetyStage.process`` on each shard as read from Parquet (embeddings to one float32 matrix,
     one batched matmul chain per head, threshold rules, columns written);
   - baseline: "a plain per-row torch loop": the same Parquet rows, each embedding turned into a tensor
     and passed through the three ``nn.Sequential`` heads one row at a time.
   Both give the same scores (checked). Reported: rows/s each and their ratio.
2. Faces. Real photos (bench/assets.py, about ``--face-side`` px on the long side) decoded to grayscale:
   - ours: ``FaceBlurrer.detect_gray`` (detection copy of at most 640 px, histogram-equalised, OpenCV's
     frontal cascade, minNeighbors 5);
   - baseline: OpenCV's documented default use, ``CascadeClassifier.detectMultiScale(gray)`` with default
     settings (scaleFactor 1.1, minNeighbors 3) on the full-resolution image.
   Reported: ms per image each, faces found by each, and the ratio baseline / ours.
The last line is ``ratio: X.XX`` of the face detection (the heads' ratio is on the line before it).

    .venv/bin/python bench/safety.py [--rows 10000] [--faces 60] [--face-side 1600]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

DIM = 768
SHAPES = {"nsfw": ((1024, 2048, 1024, 256), "relu", "sigmoid"),
          "aesthetic": ((1024, 128, 64, 16), "none", "identity"),
          "watermark": ((), "relu", "sigmoid")}


def _dataset(root: str, rows: int, shard: int):
    import pyarrow as pa

    from curate import schema
    from curate.testing.datasets import write_table_dataset

    rng = np.random.default_rng(0)
    tables = []
    for s in range(0, rows, shard):
        n = min(shard, rows - s)
        x = rng.normal(size=(n, DIM)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        tables.append(pa.table({
            schema.UID: [f"{s + i:032x}" for i in range(n)],
            schema.IMAGE_EMBEDDING: pa.FixedSizeListArray.from_arrays(pa.array(x.astype(np.float16).reshape(-1)), DIM),
        }))
    return write_table_dataset(root, tables, "clip", config={"model": "ViT-L-14", "pretrained": "openai"})


def bench_heads(rows: int) -> float:
    import torch

    from curate import schema
    from curate.dataset import Dataset
    from curate.heads import load_head
    from curate.stage import ShardContext
    from curate.stages.safety import SafetyConfig, SafetyStage
    from curate.testing.safety import write_head

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        ds = _dataset(f"{tmp}/in", rows, 2500)
        specs = []
        for i, (name, (hidden, act, out)) in enumerate(SHAPES.items()):
            path = write_head(f"{tmp}/{name}.safetensors", DIM, "ViT-L-14", hidden=hidden, activation=act,
                              output=out, seed=i)
            specs.append({"name": name, "path": str(path), **({"drop_above": 0.5} if name == "nsfw" else {})})
        stage = SafetyStage(SafetyConfig(heads=specs))
        stage.check(ds)
        stage.setup()
        out = Dataset(f"{tmp}/out")

        t = time.perf_counter()
        ours = []
        for n in ds.shard_ids():
            ctx = ShardContext(shard=n, input_path=ds.url, input=ds, output=out, plan_dir="", options=None)
            res = stage.process(ds.read_shard(n), ctx)
            ours.append(np.array(res.column(schema.PUNSAFE).to_pylist(), np.float32))
        t_ours = time.perf_counter() - t

        heads = [load_head(s["path"]) for s in specs]
        modules = []
        for h in heads:
            layers: list[torch.nn.Module] = []
            for j, (w, b) in enumerate(zip(h.weights, h.biases, strict=True)):
                lin = torch.nn.Linear(w.shape[1], w.shape[0])
                lin.weight.data = torch.from_numpy(w.copy())
                lin.bias.data = torch.from_numpy(b.copy())
                layers.append(lin)
                if j < len(h.weights) - 1 and h.meta.activation == "relu":
                    layers.append(torch.nn.ReLU())
            if h.meta.output == "sigmoid":
                layers.append(torch.nn.Sigmoid())
            modules.append(torch.nn.Sequential(*layers).eval())
        t = time.perf_counter()
        base = []
        with torch.no_grad():
            for n in ds.shard_ids():
                for vec in ds.read_shard(n).column(schema.IMAGE_EMBEDDING).to_pylist():
                    x = torch.tensor(vec, dtype=torch.float32)[None]
                    scores = [float(m(x)[0, 0]) for m in modules]
                    base.append(scores[0])
        t_base = time.perf_counter() - t
    np.testing.assert_allclose(np.concatenate(ours), np.array(base, np.float32), rtol=1e-3, atol=1e-4)
    r_ours, r_base = rows / t_ours, rows / t_base
    print(f"heads: {rows} rows x {len(specs)} heads (768-d, LAION shapes), 1 torch thread")
    print(f"  ours (SafetyStage.process per shard): {t_ours:.2f} s, {r_ours:,.0f} rows/s")
    print(f"  baseline (per-row torch loop):         {t_base:.2f} s, {r_base:,.0f} rows/s")
    return r_ours / r_base


def bench_faces(n: int, side: int) -> float:
    import cv2
    from PIL import Image

    import bench.assets as assets
    from curate.faces import CASCADES, FaceBlurrer, FaceConfig

    cv2.setNumThreads(1)
    paths = assets.photos(n, side)
    from skimage import data as skdata

    grays = [np.asarray(Image.open(p).convert("L")) for p in paths]
    astro = np.asarray(Image.fromarray(skdata.astronaut()).convert("L"))
    big_astro = cv2.resize(astro, (side, side), interpolation=cv2.INTER_CUBIC)
    grays += [big_astro]
    ours = FaceBlurrer(FaceConfig())
    base = cv2.CascadeClassifier(cv2.data.haarcascades + CASCADES["frontal_default"])
    base.detectMultiScale(grays[0])
    ours.detect_gray(grays[0])
    t = time.perf_counter()
    found_ours = [len(ours.detect_gray(g)) for g in grays]
    t_ours = time.perf_counter() - t
    t = time.perf_counter()
    found_base = [len(base.detectMultiScale(g)) for g in grays]
    t_base = time.perf_counter() - t
    px = np.mean([g.size for g in grays]) / 1e6
    print(f"faces: {len(grays)} real photos (~{px:.1f} MP each; the last is skimage's astronaut at {side} px), "
          "1 OpenCV thread")
    print(f"  ours (<=640 px copy, equalised, minNeighbors 5): {1000 * t_ours / len(grays):.1f} ms/image, "
          f"{sum(found_ours)} faces, astronaut {found_ours[-1]}")
    print(f"  baseline (detectMultiScale defaults, full res):  {1000 * t_base / len(grays):.1f} ms/image, "
          f"{sum(found_base)} faces, astronaut {found_base[-1]}")
    return t_base / t_ours


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--faces", type=int, default=60)
    ap.add_argument("--face-side", type=int, default=1600)
    args = ap.parse_args(argv)
    heads = bench_heads(args.rows)
    faces = bench_faces(args.faces, args.face_side)
    print(f"heads ratio (ours / per-row loop, rows/s): {heads:.2f}")
    print(f"ratio: {faces:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
