"""A learnable image-caption set for comparing curation choices with tiny models on a CPU.

Images are coloured shapes on grey noise (real JPEGs); captions name the colour and the shape, so a tiny
CLIP learns the pairing in a few dozen steps. ``shuffle`` plants a quality defect: that fraction of the
samples get each other's captions (a seeded permutation among them), the images unchanged. Written in
export's layout, all of it the train split (``train-NNNNN.tar`` + DALI ``NNNNN.idx`` + ``sizes.json`` + a
manifest naming the split), which the trainer reads.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from curate.dataset import tar_file_name
from curate.wds import TarWriter

COLORS = {
    "red": (220, 30, 30), "green": (30, 190, 40), "blue": (30, 40, 220), "yellow": (235, 220, 40),
    "purple": (140, 40, 170), "orange": (245, 140, 20), "cyan": (40, 210, 220), "white": (250, 250, 250),
}
SHAPES = ("circle", "square", "triangle")
PAIRS = [(c, s) for c in COLORS for s in SHAPES]


def shape_image(rng: np.random.Generator, color: str, shape: str, size: int = 64) -> bytes:
    img = Image.fromarray(rng.integers(60, 140, (size, size, 3), dtype=np.uint8))
    draw = ImageDraw.Draw(img)
    r = int(rng.integers(size // 4, size // 2 - 2))
    cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=COLORS[color])
    elif shape == "square":
        draw.rectangle(box, fill=COLORS[color])
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLORS[color])
    out = io.BytesIO()
    img.save(out, "JPEG", quality=90)
    return out.getvalue()


def write_shapes(root: str | Path, copies: int, *, seed: int, shuffle: float = 0.0, per_shard: int = 48,
                 image_seed: int | None = None) -> dict:
    """``copies`` samples of every (colour, shape) pair, in seeded order; ``shuffle`` of them swap captions.

    The images depend only on ``image_seed`` (default ``seed``), so a clean and a shuffled variant
    written with the same image seed hold the same pictures. Returns {"n", "shuffled"}.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    pairs = [PAIRS[i] for i in rng.permutation(np.repeat(np.arange(len(PAIRS)), copies))]
    img_rng = np.random.default_rng(seed if image_seed is None else image_seed)
    images = [shape_image(img_rng, c, s) for c, s in pairs]
    captions = [f"a {c} {s}" for c, s in pairs]
    moved = 0
    if shuffle:
        plant = np.random.default_rng([seed, 1])
        chosen = plant.choice(len(pairs), size=int(round(shuffle * len(pairs))), replace=False)
        permuted = plant.permutation(chosen)
        new = list(captions)
        for src, dst in zip(chosen, permuted, strict=True):
            new[dst] = captions[src]
        moved = sum(a != b for a, b in zip(new, captions, strict=True))
        captions = new
    shards = root / "shards"
    shards.mkdir(parents=True)
    sizes = {}
    for n, lo in enumerate(range(0, len(pairs), per_shard)):
        name = f"{n:05d}"
        tar = tar_file_name(name, "train")
        with open(shards / tar, "wb") as f:
            w = TarWriter(f)
            for i in range(lo, min(lo + per_shard, len(pairs))):
                key = f"{name}{i - lo:04d}"
                w.add(key, {"jpg": images[i], "txt": captions[i], "json": json.dumps({"key": key})})
            w.close()
        (shards / f"{name}.idx").write_text(w.index_text())
        sizes[tar] = len(w)
    (shards / "sizes.json").write_text(json.dumps(sizes))
    train = {"shards": [f"{n:05d}" for n in range(len(sizes))], "rows": len(pairs)}
    (root / "_manifest.json").write_text(json.dumps({"stage": "export", "shards": len(sizes),
                                                     "splits": {"train": train}, "planted_shuffle": shuffle}))
    return {"n": len(pairs), "shuffled": moved}
