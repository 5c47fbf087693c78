"""A small learnable image-text dataset in the export layout, and helpers to run the trainer on it.

Images are coloured shapes on noisy backgrounds (real JPEGs), captions name the colour and the shape,
so a tiny CLIP can learn the pairing in a few dozen CPU steps. The held-out split holds one sample of
each (colour, shape) pair, so every caption there is distinct and retrieval chance is 1/24.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from curate.wds import TarWriter

COLORS = {
    "red": (220, 30, 30), "green": (30, 190, 40), "blue": (30, 40, 220), "yellow": (235, 220, 40),
    "purple": (140, 40, 170), "orange": (245, 140, 20), "cyan": (40, 210, 220), "white": (250, 250, 250),
}
SHAPES = ("circle", "square", "triangle")
PAIRS = [(c, s) for c in COLORS for s in SHAPES]

# CPU on purpose, even on a GPU machine: the exact-resume checks (1e-6) and the 2-process gloo run need
# fp32 CPU arithmetic and must not ask for cuda:1 on a one-GPU machine. GPU tests add train.device=cuda.
TINY = ["model.tiny=true", "data.workers=1", "train.log_every=1", "train.device=cpu"]
TINY_GPU = [*TINY, "train.device=cuda"]


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    # ~8 test runs share 2 cores; more intra-op threads only make a tiny model slower.
    import torch

    torch.set_num_threads(1)


def _image(rng: np.random.Generator, color: str, shape: str, size: int = 64) -> bytes:
    noise = rng.integers(60, 140, (size, size, 3), dtype=np.uint8)
    img = Image.fromarray(noise)
    draw = ImageDraw.Draw(img)
    r = int(rng.integers(size // 4, size // 2 - 2))
    cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
    box = (cx - r, cy - r, cx + r, cy + r)
    fill = COLORS[color]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=90)
    return out.getvalue()


def write_dataset(root: Path, pairs: list[tuple[str, str]], per_shard: int, seed: int) -> list[str]:
    """Write ``pairs`` as export does, all of them its train split (``train-NNNNN.tar`` + ``NNNNN.idx``
    + sizes.json + a manifest naming the split); return the keys."""
    rng = np.random.default_rng(seed)
    shards = root / "shards"
    shards.mkdir(parents=True)
    sizes, keys = {}, []
    for n, lo in enumerate(range(0, len(pairs), per_shard)):
        name = f"{n:05d}"
        with open(shards / f"train-{name}.tar", "wb") as f:
            w = TarWriter(f)
            for i, (color, shape) in enumerate(pairs[lo : lo + per_shard]):
                key = f"{name}{i:04d}"
                w.add(key, {"jpg": _image(rng, color, shape), "txt": f"a {color} {shape}",
                            "json": json.dumps({"key": key, "caption": f"a {color} {shape}"})})
                keys.append(key)
            w.close()
        (shards / f"{name}.idx").write_text(w.index_text())
        sizes[f"train-{name}.tar"] = len(w)
    (shards / "sizes.json").write_text(json.dumps(sizes))
    train = {"shards": [f"{n:05d}" for n in range(len(sizes))], "rows": len(keys)}
    (root / "_manifest.json").write_text(json.dumps({"stage": "export", "shards": len(sizes),
                                                     "splits": {"train": train}}))
    return keys


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> dict:
    """{"train": path, "val": path, "train_keys": [...]}: 4 shards x 24 training pairs, 24 held out."""
    root = tmp_path_factory.mktemp("trainer-data")
    rng = np.random.default_rng(0)
    train_pairs = [PAIRS[i] for i in rng.permutation(np.repeat(np.arange(len(PAIRS)), 4))]
    keys = write_dataset(root / "train", train_pairs, per_shard=24, seed=1)
    write_dataset(root / "val", PAIRS, per_shard=24, seed=2)
    return {"train": str(root / "train"), "val": str(root / "val"), "train_keys": keys}


def read_metrics(output: Path) -> tuple[list[dict], list[dict]]:
    """(training rows, eval rows) of a run's metrics.jsonl."""
    rows = [json.loads(line) for line in (Path(output) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r], [r for r in rows if any(k.startswith("eval/") for k in r)]
