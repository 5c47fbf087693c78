"""A small real-photo classification set for zero-shot tests, in the three layouts trainer.eval reads.

Images are real clip-art drawings from Debian's openclipart package (classes = its categories), or the
photos scikit-image ships when that package is absent; each shrunk to 64 px and saved as JPEG. Classes
get different numbers of images, so two different predictors rarely reach the same accuracy by chance.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from PIL import Image

from curate.wds import TarWriter

CLIPART = Path("/usr/share/openclipart/png")
CATEGORIES = ("animals", "food", "buildings", "electronics", "plants", "tools", "transportation")
COUNTS = (9, 8, 6, 5, 7, 4, 10)


def _jpeg(image: Image.Image, seed: int = 0) -> bytes:
    # The drawing over grey noise (the background the test models train on), not over white.
    import numpy as np

    image = image.convert("RGBA")
    image.thumbnail((64, 64))
    noise = np.random.default_rng(seed).integers(60, 140, (image.size[1], image.size[0], 3), dtype=np.uint8)
    flat = Image.fromarray(noise)
    flat.paste(image, mask=image.split()[3])
    out = io.BytesIO()
    flat.save(out, "JPEG", quality=90)
    return out.getvalue()


def _sources() -> dict[str, list[bytes]]:
    if CLIPART.is_dir():
        out = {}
        for cat, n in zip(CATEGORIES, COUNTS, strict=True):
            files = sorted(p for p in (CLIPART / cat).rglob("*.png") if p.stat().st_size < 40_000)[:n]
            out[cat] = [_jpeg(Image.open(p), i) for i, p in enumerate(files)]
        return out
    import numpy as np
    from skimage import data

    photos = {"cat": data.chelsea(), "astronaut": data.astronaut(), "coffee": data.coffee(), "rocket": data.rocket()}
    out = {}
    for (name, arr), n in zip(photos.items(), COUNTS, strict=False):
        img = Image.fromarray(np.asarray(arr))
        w, h = img.size
        out[name] = [_jpeg(img.crop((i * w // 20, i * h // 30, w - i * w // 25, h - i * h // 20))) for i in range(n)]
    return out


def write_imagefolder(root: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """DIR/<class>/<n>.jpg; returns (class names in index order, [(file, label)] in reading order)."""
    items = []
    classes = sorted(_sources().items())
    for label, (name, images) in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i, data in enumerate(images):
            f = root / name / f"{i:03d}.jpg"
            f.write_bytes(data)
            items.append((str(f), label))
    return [c for c, _ in classes], items


def write_cls_tars(root: Path, items: list[tuple[str, int]], per_tar: int = 12) -> None:
    """The same images as webdataset tars with KEY.jpg + KEY.cls."""
    root.mkdir(parents=True)
    for n, lo in enumerate(range(0, len(items), per_tar)):
        with open(root / f"{n:05d}.tar", "wb") as f:
            w = TarWriter(f)
            for i, (path, label) in enumerate(items[lo:lo + per_tar]):
                w.add(f"{n:05d}{i:04d}", {"jpg": Path(path).read_bytes(), "cls": str(label),
                                          "json": json.dumps({"label": label})})
            w.close()


def read_pairs(dataset: str | Path) -> list[tuple[str, bytes, str]]:
    """(key, image bytes, caption) of every sample of a dataset's tars, in shard and member order."""
    import tarfile

    root = Path(dataset)
    folder = root / "shards" if (root / "shards").is_dir() else root
    out = []
    for tar in sorted(folder.glob("*.tar")):
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(tar) as tf:
            for info in tf:
                if info.isreg():
                    key, _, ext = info.name.partition(".")
                    members.setdefault(key, {})[ext] = tf.extractfile(info).read()
        for key, m in members.items():
            image = next(m[e] for e in ("jpg", "jpeg", "png", "webp") if e in m)
            out.append((key, image, m["txt"].decode("utf-8")))
    return out
