"""Real images for benchmarks, built once and cached under bench/.cache/ (git-ignored).

``photos(n, max_side)``: n distinct real JPEG photos about ``max_side`` px on the long side, made by
deterministic crops, resizes and JPEG recompressions of real pictures:
  - Debian's ``ukui-wallpapers`` and ``lomiri-wallpapers`` (/usr/share/backgrounds, 4K photos and art);
    installed with apt-get when missing and running as root, else the error says what to install;
  - the sample photos that scikit-image ships (astronaut, coffee, chelsea, rocket, ...) and
    scikit-learn's (china, flower), when those packages are installed (read from their data folders,
    without importing them).
The same sources and arguments give the same files, byte for byte.

``clipart(n)``: n paths of real clip-art PNG/JPEG/WebP images: the demo corpus' good images cycled
(``full_size=False``), or the original openclipart-png files, some of them 20k px wide
(``full_size=True``, the data img2dataset was measured on).

    .venv/bin/python bench/assets.py [N] [MAX_SIDE]     # build the photo cache and print where it is
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import logging
import os
import random
import subprocess
import sys
import warnings
from pathlib import Path

from PIL import Image

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent
CACHE = ROOT / ".cache"
CORPUS = ROOT.parent / "demo" / "corpus"
WALLPAPER_PACKAGES = ("ukui-wallpapers", "lomiri-wallpapers")
CLIPART_PACKAGE = "openclipart-png"
PHOTO_EXTS = (".jpg", ".jpeg", ".png")
# scikit-image's data folder holds photos and synthetic test patterns; only the photos are used.
SKIMAGE_PHOTOS = (
    "astronaut.png",
    "brick.png",
    "camera.png",
    "cell.png",
    "chelsea.png",
    "coffee.png",
    "coins.png",
    "grass.png",
    "gravel.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "microaneurysms.png",
    "moon.png",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "page.png",
    "retina.jpg",
    "rocket.jpg",
    "text.png",
    "clock_motion.png",
)
SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")


def _package_files(packages: tuple[str, ...]) -> list[str]:
    res = subprocess.run(["dpkg", "-L", *packages], capture_output=True, text=True, check=False)
    return res.stdout.split("\n") if res.returncode == 0 else []


def ensure_debian(packages: tuple[str, ...]) -> None:
    """Install the Debian packages when missing (as root), else raise saying what to install."""
    missing = [
        p
        for p in packages
        if subprocess.run(["dpkg", "-s", p], capture_output=True, check=False).returncode != 0
    ]
    if not missing:
        return
    if os.geteuid() != 0:
        raise RuntimeError(f"missing Debian packages; run: sudo apt-get install {' '.join(missing)}")
    log.info("installing %s", " ".join(missing))
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
    if subprocess.run(cmd, env=env, capture_output=True, check=False).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, check=False)
        subprocess.run(cmd, env=env, capture_output=True, check=True)


def _data_dir(package: str, sub: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        return None
    d = Path(spec.origin).parent / sub
    return d if d.is_dir() else None


def photo_sources() -> list[Path]:
    """Every real photo the variants are cut from, in a fixed order."""
    ensure_debian(WALLPAPER_PACKAGES)
    out = sorted(
        Path(f)
        for f in _package_files(WALLPAPER_PACKAGES)
        if f.lower().endswith(PHOTO_EXTS) and Path(f).is_file()
    )
    sk = _data_dir("skimage", "data")
    if sk is not None:
        out += [sk / n for n in SKIMAGE_PHOTOS if (sk / n).is_file()]
    skl = _data_dir("sklearn", "datasets/images")
    if skl is not None:
        out += [skl / n for n in SKLEARN_PHOTOS if (skl / n).is_file()]
    if not out:
        raise RuntimeError("no source photos found")
    return out


def _fingerprint(sources: list[Path], max_side: int) -> str:
    h = hashlib.sha1(str(max_side).encode())
    for p in sources:
        h.update(f"{p.name}:{p.stat().st_size}\n".encode())
    return h.hexdigest()[:10]


def _variant(src: Image.Image, i: int, max_side: int) -> bytes:
    """Variant ``i`` of a source: a crop (50-100% of each side), resized to ``max_side`` on the long
    side, JPEG at quality 70-95, sometimes mirrored; all choices from a seed of ``i``."""
    rng = random.Random(i)
    w, h = src.size
    # Small sources (scikit-image's 512 px photos) are cropped less so they are not blown up much.
    lo = 0.5 if max(w, h) >= 2 * max_side else 0.8
    cw, ch = round(w * rng.uniform(lo, 1.0)), round(h * rng.uniform(lo, 1.0))
    # keep aspect ratios sensible (at most 2:1), like real photos
    if cw > 2 * ch:
        cw = 2 * ch
    if ch > 2 * cw:
        ch = 2 * cw
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    img = src.crop((x, y, x + cw, y + ch))
    scale = max_side / max(cw, ch)
    img = img.resize((max(1, round(cw * scale)), max(1, round(ch * scale))), Image.Resampling.BICUBIC)
    if rng.random() < 0.3:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=rng.randint(70, 95), optimize=False)
    return buf.getvalue()


def _load_rgb(path: Path, max_side: int) -> Image.Image:
    with Image.open(path) as im:
        im.draft("RGB", (2 * max_side, 2 * max_side))  # JPEG: decode at reduced scale when it is big
        im = im.convert("RGBA") if im.mode in ("RGBA", "LA", "P", "PA") else im.convert("RGB")
        if im.mode == "RGBA":
            bg = Image.new("RGB", im.size, (255, 255, 255))
            bg.paste(im, mask=im.getchannel("A"))
            im = bg
        # Sources are up to 4096 px; variants never need more than ~2x max_side of detail.
        if max(im.size) > 3 * max_side:
            im.thumbnail((3 * max_side, 3 * max_side), Image.Resampling.LANCZOS)
        return im


def photos(n: int = 2000, max_side: int = 800) -> list[Path]:
    """``n`` distinct real JPEG photos about ``max_side`` px on the long side (cached)."""
    sources = photo_sources()
    folder = CACHE / "photos" / f"s{max_side}-{_fingerprint(sources, max_side)}"
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{i:05d}.jpg" for i in range(n)]
    todo = [i for i, p in enumerate(paths) if not p.exists()]
    if todo:
        log.info("building %d photos in %s from %d sources", len(todo), folder, len(sources))
        by_source: dict[int, list[int]] = {}
        for i in todo:
            by_source.setdefault(i % len(sources), []).append(i)
        for s, items in sorted(by_source.items()):
            src = _load_rgb(sources[s], max_side)
            for i in items:
                tmp = paths[i].with_suffix(".tmp")
                tmp.write_bytes(_variant(src, i, max_side))
                tmp.replace(paths[i])
        (folder / "sources.json").write_text(json.dumps([str(p) for p in sources], indent=1) + "\n")
    return paths


def clipart(n: int, full_size: bool = False) -> list[Path]:
    """``n`` paths of real clip art: the demo corpus' good images cycled, or (``full_size``) distinct
    original openclipart-png files in a fixed order (raises if fewer than ``n`` exist)."""
    if full_size:
        ensure_debian((CLIPART_PACKAGE,))
        files = sorted(
            f for f in _package_files((CLIPART_PACKAGE,)) if f.endswith(".png") and os.path.isfile(f)
        )
        files = sorted(files, key=lambda f: hashlib.sha1(f.encode()).hexdigest())
        if len(files) < n:
            raise ValueError(f"{CLIPART_PACKAGE} has {len(files)} PNGs, asked for {n}")
        return [Path(f) for f in files[:n]]
    with open(CORPUS / "captions.jsonl", encoding="utf-8") as f:
        good = [CORPUS / e["file"] for e in map(json.loads, f) if e["kind"] == "ok"]
    return [good[i % len(good)] for i in range(n)]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    n = int(args[0]) if args else 2000
    side = int(args[1]) if len(args) > 1 else 800
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        paths = photos(n, side)
    total = sum(p.stat().st_size for p in paths)
    print(f"{len(paths)} photos, {total / 1e6:.1f} MB, in {paths[0].parent}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
