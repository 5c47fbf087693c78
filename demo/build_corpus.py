"""Build the bundled demo corpus (demo/corpus/) from Debian's public-domain Open Clip Art packages.

Reproducible: the same package versions give the same files, byte for byte (selection by a hash of
the source path, encoders with fixed settings, no timestamps in the outputs).

Sources (Debian bookworm, public domain, see /usr/share/doc/openclipart-*/copyright):
  openclipart-png 1:0.18+dfsg-19   the images (/usr/share/openclipart/png/**.png)
  openclipart-svg 1:0.18+dfsg-19   the captions: each SVG's <dc:description>, else its <dc:title>

Output:
  demo/corpus/images/              PNG (most), JPEG and WebP, long side 128..512 px
  demo/corpus/captions.jsonl       one line per URL-list entry: file, caption, kind, source, of
  demo/corpus/manifest.json        package versions, counts, and which entries are broken or duplicated

Entry kinds (``kind`` in captions.jsonl):
  ok               a real image with its real caption
  duplicate        the exact bytes of entry ``of`` under another name (exact dedup has work)
  near_duplicate   entry ``of`` resized and/or recompressed (perceptual dedup has work)
  missing          no file behind the URL: the server answers 404
  truncated        the first part of a real JPEG only
  html_as_image    an HTML page with a .jpg name (served as image/jpeg)
  pixel_bomb       a valid 1-bit PNG of a few KB declaring 30000 x 30000 px (900 Mpx)

Run as root to install the packages when missing:  python demo/build_corpus.py [--n 300]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import re
import shutil
import struct
import subprocess
import sys
import warnings
import xml.etree.ElementTree as ET
import zlib
from pathlib import Path

from PIL import Image

# The package holds real PNGs declaring up to 21k x 30k px; only their headers are read here.
warnings.simplefilter("ignore", Image.DecompressionBombWarning)
log = logging.getLogger("build_corpus")

PACKAGES = ("openclipart-png", "openclipart-svg")
PNG_ROOT = Path("/usr/share/openclipart/png")
SVG_ROOT = Path("/usr/share/openclipart/svg")
OUT = Path(__file__).resolve().parent / "corpus"

NS = {
    "dc": "http://purl.org/dc/elements/1.1/",
    "cc": "http://web.resource.org/cc/",
}
# Descriptions that say how a file was made rather than what it shows.
BORING = re.compile(
    r"@|https?:|www\.|made with|created with|create with|inkscape|sodipodi|converted|part of|"
    r"^clipart by|openclipart|public domain|\.svg|drawn for",
    re.IGNORECASE,
)
LONG_SIDES = (128, 192, 256, 256, 320, 384, 384, 512)


def package_versions() -> dict[str, str]:
    out = {}
    for pkg in PACKAGES:
        res = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True, text=True, check=False
        )
        out[pkg] = res.stdout.strip() if res.returncode == 0 else ""
    return out


def ensure_packages() -> dict[str, str]:
    versions = package_versions()
    missing = [p for p, v in versions.items() if not v]
    if missing:
        if os.geteuid() != 0:
            sys.exit(f"install the Debian packages first: apt-get install {' '.join(missing)}")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *missing], check=True, env=env)
        versions = package_versions()
    return versions


def _clean(text: str) -> str:
    return " ".join(text.split())


def svg_text(svg: Path) -> tuple[str, str]:
    """(title, description) of the SVG's Dublin Core metadata, whitespace-normalised."""
    try:
        work = ET.parse(svg).find(".//cc:Work", NS)
    except ET.ParseError:
        return "", ""
    if work is None:
        return "", ""
    title = _clean(work.findtext("dc:title", default="", namespaces=NS) or "")
    desc = _clean(work.findtext("dc:description", default="", namespaces=NS) or "")
    return title, desc


def caption_of(title: str, desc: str, freq: dict[str, int]) -> str | None:
    """The description when it describes this picture, else the title; None when neither does.

    A text shared by several files ("Lemon SVG theme", "SVG Road Signs") names a collection, not
    the picture, so it is not a caption.
    """
    if desc and not BORING.search(desc) and len(desc.split()) >= 2 and len(desc) <= 300 and freq[desc] < 3:
        return desc
    if title and not BORING.search(title) and "_" not in title and len(title) >= 3 and freq[title] < 3:
        return title
    return None


def _rank(rel: str) -> str:
    return hashlib.sha1(rel.encode()).hexdigest()


def candidates() -> list[tuple[Path, str, str]]:
    """(png path, caption, relative source name) for every usable image, in a deterministic order."""
    seen_bytes: set[str] = set()
    pngs = sorted(PNG_ROOT.rglob("*.png"), key=lambda p: _rank(str(p.relative_to(PNG_ROOT))))
    texts = {}
    for svg in SVG_ROOT.rglob("*.svg"):
        texts[svg] = svg_text(svg)
    freq: dict[str, int] = {}
    for title, desc in texts.values():
        for t in {title, desc} - {""}:
            freq[t] = freq.get(t, 0) + 1
    out = []
    for png in pngs:
        rel = png.relative_to(PNG_ROOT)
        svg = SVG_ROOT / rel.with_suffix(".svg")
        if svg not in texts:
            continue
        caption = caption_of(*texts[svg], freq)
        if caption is None:
            continue
        try:
            with Image.open(png) as im:
                w, h = im.size
        except Exception:  # noqa: BLE001 - a few package files are not readable PNGs; skip them
            continue
        # Small icons make poor demo images; huge ones (up to 21k x 30k px) are slow to downscale.
        if max(w, h) < 200 or w * h > 20_000_000 or max(w, h) > 4 * min(w, h):
            continue
        digest = hashlib.sha256(png.read_bytes()).hexdigest()
        if digest in seen_bytes:  # the package ships some files twice in different folders
            continue
        seen_bytes.add(digest)
        out.append((png, caption, str(rel)))
    return out


def _slug(rel: str) -> str:
    stem = Path(rel).stem.lower()
    return re.sub(r"[^a-z0-9]+", "-", stem).strip("-")[:40]


def _flatten(im: Image.Image) -> Image.Image:
    """RGB on a white background (JPEG has no alpha; clip art is drawn on transparent)."""
    im = im.convert("RGBA")
    bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
    return Image.alpha_composite(bg, im).convert("RGB")


def encode(im: Image.Image, fmt: str, quality: int = 85) -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        im.save(buf, "PNG", optimize=True)
    elif fmt == "jpg":
        _flatten(im).save(buf, "JPEG", quality=quality, optimize=True)
    elif fmt == "webp":
        im.convert("RGBA").save(buf, "WEBP", quality=quality, method=4)
    else:
        raise ValueError(fmt)
    return buf.getvalue()


def pixel_bomb_png(width: int = 30_000, height: int = 30_000) -> bytes:
    """A valid 1-bit grayscale PNG declaring ``width`` x ``height``: ~110 MB of zero rows that
    zlib squeezes into a file of about 100 KB."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    parts = [comp.compress(row) for _ in range(height)]
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


HTML_PAGE = b"""<!DOCTYPE html>
<html><head><title>Image not available</title></head>
<body><h1>Sorry, this image is no longer available</h1>
<p>The page you requested was moved. <a href="/">Back to the gallery</a>.</p></body></html>
"""


def build(n: int, out: Path) -> dict:
    versions = ensure_packages()
    cands = candidates()
    if len(cands) < n:
        raise SystemExit(f"only {len(cands)} usable images, asked for {n}")
    chosen = cands[:n]
    if out.exists():
        shutil.rmtree(out)
    (out / "images").mkdir(parents=True)

    entries: list[dict] = []
    files: dict[str, bytes] = {}

    def put(name: str, data: bytes | None, caption: str, kind: str, source: str, of: str | None = None):
        file = f"images/{name}"
        if data is not None:
            (out / file).write_bytes(data)
            files[file] = data
        entries.append({"file": file, "caption": caption, "kind": kind, "source": source, "of": of})

    for i, (png, caption, rel) in enumerate(chosen):
        h = int(_rank(rel)[:8], 16)
        side = LONG_SIDES[h % len(LONG_SIDES)]
        # ~60% PNG, 25% JPEG, 15% WebP
        fmt = "png" if h % 20 < 12 else ("jpg" if h % 20 < 17 else "webp")
        with Image.open(png) as im:
            im.load()
            scale = side / max(im.size)
            if scale < 1:
                size = (max(1, round(im.size[0] * scale)), max(1, round(im.size[1] * scale)))
                im = im.convert("RGBA").resize(size, Image.Resampling.LANCZOS)
            data = encode(im, fmt)
        put(f"{i:04d}-{_slug(rel)}.{fmt}", data, caption, "ok", f"openclipart-png:{rel}")

    ok = [e for e in entries if e["kind"] == "ok"]
    # Exact duplicates: reposts of the same bytes under another name; half keep the caption, half
    # carry another real caption (so dedup must choose which caption survives).
    for j, src in enumerate(ok[5:65:10]):
        cap = src["caption"] if j % 2 == 0 else ok[-1 - j]["caption"]
        ext = src["file"].rsplit(".", 1)[1]
        put(f"dup-{j:02d}.{ext}", files[src["file"]], cap, "duplicate", src["source"], src["file"])

    # Near-duplicates: the same picture resized to 75% and/or recompressed as JPEG.
    for j, src in enumerate(ok[7:87:10]):
        with Image.open(io.BytesIO(files[src["file"]])) as im:
            im.load()
            if j % 2 == 0:
                im = im.convert("RGBA").resize(
                    (max(1, im.size[0] * 3 // 4), max(1, im.size[1] * 3 // 4)), Image.Resampling.BICUBIC
                )
            data = encode(im, "jpg", quality=60 if j % 2 else 75)
        put(f"near-{j:02d}.jpg", data, src["caption"], "near_duplicate", src["source"], src["file"])

    jpg_src = next(e for e in ok if e["file"].endswith(".jpg") and len(files[e["file"]]) > 4000)
    put("bad-missing.jpg", None, "A red bicycle leaning against a wall", "missing", "none")
    put(
        "bad-truncated.jpg",
        files[jpg_src["file"]][: len(files[jpg_src["file"]]) // 2],
        jpg_src["caption"],
        "truncated",
        jpg_src["source"],
        jpg_src["file"],
    )
    put("bad-html.jpg", HTML_PAGE, "Sunset over the harbour", "html_as_image", "none")
    put("bad-bomb.png", pixel_bomb_png(), "A very large blank poster", "pixel_bomb", "none")

    with open(out / "captions.jsonl", "w", encoding="utf-8") as f:
        for e in entries:
            f.write(json.dumps(e, ensure_ascii=False, sort_keys=True) + "\n")

    kinds: dict[str, list[str]] = {}
    for e in entries:
        kinds.setdefault(e["kind"], []).append(e["file"])
    formats: dict[str, int] = {}
    for name in files:
        ext = name.rsplit(".", 1)[1]
        formats[ext] = formats.get(ext, 0) + 1
    manifest = {
        "packages": versions,
        "license": "public domain (Open Clip Art Library, see /usr/share/doc/openclipart-png/copyright)",
        "built_by": "demo/build_corpus.py",
        "entries": len(entries),
        "counts": {k: len(v) for k, v in sorted(kinds.items())},
        "formats": dict(sorted(formats.items())),
        "bytes": sum(len(b) for b in files.values()),
        "broken": {
            k: v for k, v in kinds.items() if k in ("missing", "truncated", "html_as_image", "pixel_bomb")
        },
        "duplicates": {e["file"]: e["of"] for e in entries if e["kind"] == "duplicate"},
        "near_duplicates": {e["file"]: e["of"] for e in entries if e["kind"] == "near_duplicate"},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=300, help="number of real images")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    m = build(args.n, args.out)
    log.info("wrote %s: %d entries, %.1f MB, %s", args.out, m["entries"], m["bytes"] / 1e6, m["counts"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
