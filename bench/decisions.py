"""Decision quality on labelled real data: which near duplicates dedup drops, and language ID.

    .venv/bin/python bench/decisions.py [--originals 2000] [--photos-per-source 4]

Near duplicates, two real sets, built once under bench/.cache/decisions/ (deterministic):

- **clip art**: openclipart-png (Debian) PNGs in a fixed order (sha1 of the path), fitted to 256 px
  with alpha kept, at most ``--per-folder`` from one category folder (the package holds 1,378
  procedurally generated thin-line stars that would otherwise be a sixth of the set). Originals that
  are the same picture as an earlier one (mean absolute difference < 3/255 on a 48x48 RGB rendering
  over white, the labelling oracle) are left out, so every family below is one picture. Positives: one
  planted edit of each of the first ``--planted`` originals, cycling through rescale 50-90%, JPEG
  q60-90 (matted on white), crop <= 5%, small overlaid text and PNG -> JPEG. Hard negatives:
  recoloured variants (hue turned 90-270 degrees) of colourful originals, and the package's flags.
- **photos**: Debian's wallpaper packages and scikit-image's photos, each cut into non-overlapping
  quarters (distinct pictures, the oracle removing look-alike quarters), fitted to 640 px; each
  quarter also at 50% and 75% resolution, as a JPEG q60-90, cropped <= 5% and PNG <-> JPEG.

A drop is right when the dropped row and the row it is recorded as a duplicate of come from the same
picture (family); precision = right drops / drops, recall = right drops / (family members - 1).
"beyond radius" counts drops farther from their ``dup_of`` than the radius (for ours: the full-image
pHash distance, or the crop-aligned one where dedup's crop matching linked the pair). Ours: the real stages
(``import`` computes the pHash, colour signature and crop hashes from its decode, ``dedup`` with its defaults)
through the runner on an embedded Ray. Baseline: ``imagehash.phash`` of every image (as imagehash
reads it: alpha dropped) and connected components of the pairs within the same radius, keeping the
largest image of each component.

Language ID: ``bench/lang_id.py`` on its committed hand-labelled captions (its own docstring).

Last line: ``ratio: X.XX`` = our near-duplicate F1 on clip art / imagehash's.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import io
import json
import logging
import os
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import assets  # noqa: E402

from curate import phash, schema  # noqa: E402
from curate.stages.dedup import DedupConfig  # noqa: E402

CACHE = assets.CACHE / "decisions"
EDITS_CLIP = ("rescale", "jpeg", "crop", "text", "png2jpeg")
EDITS_PHOTO = ("half", "three_quarters", "jpeg", "crop", "text", "format")
RADIUS = DedupConfig().radius
warnings.simplefilter("ignore", Image.DecompressionBombWarning)
Image.MAX_IMAGE_PIXELS = None


# -- building the labelled sets ------------------------------------------------------------------
def _fit(im: Image.Image, side: int) -> Image.Image:
    s = side / max(im.size)
    return im.resize((max(1, round(im.size[0] * s)), max(1, round(im.size[1] * s))), Image.Resampling.LANCZOS)


def _over_white(im: Image.Image) -> Image.Image:
    if im.mode != "RGBA":
        return im.convert("RGB")
    bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
    bg.alpha_composite(im)
    return bg.convert("RGB")


def _oracle(im: Image.Image) -> np.ndarray:
    return np.asarray(_over_white(im).resize((48, 48), Image.Resampling.BOX), dtype=np.float32)


def _distinct(images: list[Image.Image], limit: float = 3.0) -> list[int]:
    """Indices of images that are not the same picture as an earlier one (the labelling oracle)."""
    keep: list[int] = []
    thumbs: list[np.ndarray] = []
    aspects: list[float] = []
    for i, im in enumerate(images):
        t, a = _oracle(im), im.size[0] / im.size[1]
        same = any(abs(a - b) < 0.05 * a and float(np.abs(t - u).mean()) < limit
                   for u, b in zip(thumbs, aspects, strict=True))
        if not same:
            keep.append(i)
            thumbs.append(t)
            aspects.append(a)
    return keep


def _encode(im: Image.Image, fmt: str, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG":
        _over_white(im).save(buf, "JPEG", quality=quality)
    else:
        im.save(buf, "PNG")
    return buf.getvalue()


def _text(im: Image.Image, rng: random.Random) -> Image.Image:
    out = im.copy()
    w, h = out.size
    d = ImageDraw.Draw(out)
    d.text((rng.randint(0, max(1, w // 2)), rng.randint(0, max(1, h - 14))), "sample.com", fill=(90, 90, 90, 255))
    return out


def _crop(im: Image.Image, rng: random.Random) -> Image.Image:
    w, h = im.size
    c = rng.uniform(0.01, 0.05)
    dx, dy = round(w * c), round(h * c)
    x, y = rng.randint(0, dx), rng.randint(0, dy)
    return im.crop((x, y, w - (dx - x), h - (dy - y)))


def _scale(im: Image.Image, f: float) -> Image.Image:
    return im.resize((max(1, round(im.size[0] * f)), max(1, round(im.size[1] * f))), Image.Resampling.LANCZOS)


def _recolour(im: Image.Image, degrees: float) -> Image.Image:
    rgba = im.convert("RGBA")
    a = rgba.getchannel("A")
    h, s, v = rgba.convert("RGB").convert("HSV").split()
    h = h.point(lambda x: (x + round(degrees / 360 * 256)) % 256)
    out = Image.merge("HSV", (h, s, v)).convert("RGB").convert("RGBA")
    out.putalpha(a)
    return out


def _chroma(im: Image.Image) -> float:
    rgb = np.asarray(_over_white(im).resize((32, 32), Image.Resampling.BOX), dtype=np.float32) / 255
    return float((rgb.max(-1) - rgb.min(-1)).mean())


def clipart_set(originals: int, planted: int, per_folder: int, recolours: int) -> list[dict]:
    """Items: {bytes, fmt, family, kind, name}."""
    assets.ensure_debian((assets.CLIPART_PACKAGE,))
    files = sorted(f for f in assets._package_files((assets.CLIPART_PACKAGE,))
                   if f.endswith(".png") and os.path.isfile(f))
    files.sort(key=lambda f: hashlib.sha1(f.encode()).hexdigest())
    per: collections.Counter = collections.Counter()
    picked: list[tuple[str, Image.Image]] = []
    for f in files:
        if len(picked) >= originals:
            break
        folder = "/".join(Path(f).parts[-3:-1])
        if per[folder] >= per_folder:
            continue
        with Image.open(f) as im:
            if im.size[0] * im.size[1] > 25_000_000:
                continue  # the package's pixel bombs (up to 21k x 30k) are not clip art to dedup
            picked.append((f, _fit(im.convert("RGBA"), 256)))
        per[folder] += 1
    keep = _distinct([im for _, im in picked])
    picked = [picked[i] for i in keep]
    items = [{"bytes": _encode(im, "PNG"), "fmt": "png", "family": i, "kind": "original",
              "name": f.split("/png/")[-1]} for i, (f, im) in enumerate(picked)]
    rng = random.Random(12)
    for i, (f, im) in enumerate(picked[:planted]):
        kind = EDITS_CLIP[i % len(EDITS_CLIP)]
        if kind == "rescale":
            data, fmt = _encode(_scale(im, rng.uniform(0.5, 0.9)), "PNG"), "png"
        elif kind == "jpeg":
            data, fmt = _encode(im, "JPEG", rng.randint(60, 90)), "jpg"
        elif kind == "crop":
            data, fmt = _encode(_crop(im, rng), "PNG"), "png"
        elif kind == "text":
            data, fmt = _encode(_text(im, rng), "PNG"), "png"
        else:
            data, fmt = _encode(im, "JPEG", 90), "jpg"
        items.append({"bytes": data, "fmt": fmt, "family": i, "kind": kind, "name": f.split("/png/")[-1]})
    fam = len(picked)
    made = 0
    for f, im in picked:
        if made >= recolours:
            break
        if _chroma(im) < 0.08:
            continue  # black-and-white drawings have no colour to turn
        rec = _recolour(im, rng.uniform(90, 270))
        if float(np.abs(_oracle(rec) - _oracle(im)).mean()) < 10:
            continue  # the hue turn changed too little to be another picture
        items.append({"bytes": _encode(rec, "PNG"), "fmt": "png", "family": fam, "kind": "recoloured",
                      "name": "recoloured:" + f.split("/png/")[-1]})
        fam += 1
        made += 1
    return items


def photo_set(per_source: int) -> list[dict]:
    sources = [p for p in assets.photo_sources() if p.suffix.lower() in (".jpg", ".jpeg", ".png")]
    tiles: list[tuple[str, Image.Image]] = []
    for src in sources:
        im = assets._load_rgb(src, 1280)
        w, h = im.size
        cuts = [(0, 0, w // 2, h // 2), (w // 2, 0, w, h // 2), (0, h // 2, w // 2, h), (w // 2, h // 2, w, h)]
        for c in cuts[:per_source]:
            tiles.append((f"{src.name}#{cuts.index(c)}", _fit(im.crop(c), 640)))
    keep = _distinct([t for _, t in tiles], limit=6.0)
    tiles = [tiles[i] for i in keep]
    rng = random.Random(34)
    items = []
    for fam, (name, im) in enumerate(tiles):
        items.append({"bytes": _encode(im, "JPEG", 92), "fmt": "jpg", "family": fam, "kind": "original", "name": name})
        for kind in EDITS_PHOTO:
            if kind == "half":
                data, fmt = _encode(_scale(im, 0.5), "JPEG", 90), "jpg"
            elif kind == "three_quarters":
                data, fmt = _encode(_scale(im, 0.75), "JPEG", 90), "jpg"
            elif kind == "jpeg":
                data, fmt = _encode(im, "JPEG", rng.randint(60, 90)), "jpg"
            elif kind == "crop":
                data, fmt = _encode(_crop(im, rng), "JPEG", 90), "jpg"
            elif kind == "text":
                data, fmt = _encode(_text(im, rng), "JPEG", 90), "jpg"
            else:
                data, fmt = _encode(im, "PNG"), "png"
            items.append({"bytes": data, "fmt": fmt, "family": fam, "kind": kind, "name": name})
    return items


# -- running both tools ----------------------------------------------------------------------------
def _write_tars(items: list[dict], folder: Path, per_tar: int = 1000) -> None:
    from curate.wds import TarWriter

    folder.mkdir(parents=True, exist_ok=True)
    for t in range(0, len(items), per_tar):
        with open(folder / f"{t // per_tar:05d}.tar", "wb") as f:
            w = TarWriter(f)
            for i, it in enumerate(items[t : t + per_tar], start=t):
                meta = {"uid": f"{i:032x}", "family": it["family"], "kind": it["kind"]}
                w.add(f"{i:06d}", {it["fmt"]: it["bytes"], "txt": it["name"], "json": json.dumps(meta)})
            w.close()


def run_ours(
    items: list[dict], work: Path, **overrides
) -> tuple[dict[int, int | None], dict[int, int], float]:
    """(dup_of item index per item or None, pHash per item, seconds) from import + dedup (the import
    is reused when ``work`` already holds it: a dedup setting sweep)."""
    from curate.dataset import Dataset
    from curate.runner import run_stage

    t = time.perf_counter()
    if not (work / "imported").exists():
        _write_tars(items, work / "tars")
        t = time.perf_counter()
        run_stage("import", str(work / "tars"), str(work / "imported"))
    name = "deduped" + "".join(f"-{k}{v}" for k, v in sorted(overrides.items()))
    run_stage("dedup", str(work / "imported"), str(work / name), config=overrides or None)
    seconds = time.perf_counter() - t
    ds = Dataset(str(work / name))
    cols = [schema.UID, schema.PHASH, schema.PHASH_CROPS, schema.DUP_OF]
    rows = [r for _, tb in ds.iter_shards(cols) for r in tb.to_pylist()]
    rows += [r for _, tb in ds.iter_rejects([*cols, schema.DROP_REASON]) for r in tb.to_pylist()]
    dup = {int(r[schema.UID], 16): (int(r[schema.DUP_OF], 16) if r[schema.DUP_OF] else None) for r in rows}
    hashes = {int(r[schema.UID], 16): (r[schema.PHASH], r[schema.PHASH_CROPS]) for r in rows}
    return dup, hashes, seconds


def run_imagehash(items: list[dict]) -> tuple[dict[int, int | None], dict[int, int], float]:
    import imagehash

    from curate import neardup

    t = time.perf_counter()
    hashes = np.array([int(str(imagehash.phash(Image.open(io.BytesIO(it["bytes"])))), 16) for it in items],
                      dtype=np.uint64)
    a, b = neardup.near_pairs_bruteforce(hashes, RADIUS)
    nodes, label = neardup.components(a, b)
    seconds = time.perf_counter() - t
    size = [Image.open(io.BytesIO(it["bytes"])).size for it in items]
    dup: dict[int, int | None] = {i: None for i in range(len(items))}
    groups = collections.defaultdict(list)
    for n, lab in zip(nodes.tolist(), label.tolist(), strict=True):
        groups[lab].append(n)
    for members in groups.values():
        keeper = min(members, key=lambda i: (-size[i][0] * size[i][1], i))
        for m in members:
            if m != keeper:
                dup[m] = keeper
    return dup, {i: (int(h), None) for i, h in enumerate(hashes)}, seconds


def _reach(a: tuple, b: tuple) -> int:
    """pHash bits between two rows: full images, or one's crop hash to the other's full image
    (dedup's crop matching) when that is closer; 65 when a hash is missing."""
    if a[0] is None or b[0] is None:
        return 65
    bits = phash.hamming(a[0], b[0])
    for crops, full in ((a[1], b[0]), (b[1], a[0])):
        if crops is not None:
            c, _ = phash.crops_from_bytes([crops])
            bits = min(bits, int(phash.crop_distance(c, np.array([full], np.uint64))[0]))
    return bits


def score(items: list[dict], dup: dict[int, int | None], hashes: dict[int, int]) -> dict:
    fam = [it["family"] for it in items]
    sizes = collections.Counter(fam)
    positives = sum(n - 1 for n in sizes.values())
    drops = [(i, d) for i, d in dup.items() if d is not None]
    right = [(i, d) for i, d in drops if fam[i] == fam[d]]
    wrong = [(i, d) for i, d in drops if fam[i] != fam[d]]
    beyond = sum(1 for i, d in drops if _reach(hashes[i], hashes[d]) > RADIUS)
    p = len(right) / len(drops) if drops else 1.0
    r = len(right) / positives if positives else 1.0
    by_kind = collections.Counter(items[i]["kind"] for i, _ in right)
    kinds = collections.Counter(it["kind"] for it in items if it["kind"] not in ("original", "recoloured"))
    return {"drops": len(drops), "right": len(right), "wrong": len(wrong), "positives": positives,
            "precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0, "beyond": beyond,
            "wrong_pairs": [(items[i]["name"], items[i]["kind"], items[d]["name"], items[d]["kind"])
                            for i, d in wrong],
            "recall_by_kind": {k: f"{by_kind.get(k, 0)}/{n}" for k, n in sorted(kinds.items())}}


def _table(name: str, ours: dict, base: dict, secs: tuple[float, float]) -> None:
    print(f"\n{name}")
    print(f"  {'':18s} {'drops':>6s} {'wrong':>6s} {'precision':>10s} {'recall':>8s} {'F1':>7s} {'beyond':>7s} {'s':>6s}")
    for label, s, t in (("curate dedup", ours, secs[0]), ("imagehash + CC", base, secs[1])):
        print(f"  {label:18s} {s['drops']:6d} {s['wrong']:6d} {s['precision']:10.4f} {s['recall']:8.4f} "
              f"{s['f1']:7.4f} {s['beyond']:7d} {t:6.1f}")
    print(f"  recall by edit, curate:    {ours['recall_by_kind']}")
    print(f"  recall by edit, imagehash: {base['recall_by_kind']}")
    for label, s in (("curate", ours), ("imagehash", base)):
        folders = collections.Counter("/".join(w[0].split(":")[-1].split("/")[:2]) for w in s["wrong_pairs"])
        print(f"  wrong drops by folder ({label}): {dict(folders.most_common(8))}")
    for w in ours["wrong_pairs"]:
        print(f"  wrong drop (curate): {w[0]} [{w[1]}] as dup of {w[2]} [{w[3]}]")


def near_dup(items: list[dict], name: str, sweep: list[int]) -> tuple[dict, dict]:
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        dup, hashes, t_ours = run_ours(items, Path(tmp))
        for cr in sweep:
            s = score(items, *run_ours(items, Path(tmp), crop_radius=cr)[:2])
            print(f"  crop_radius {cr}: drops {s['drops']} wrong {s['wrong']} precision {s['precision']:.4f} "
                  f"recall {s['recall']:.4f} F1 {s['f1']:.4f} recall by edit {s['recall_by_kind']}")
    bdup, bhashes, t_base = run_imagehash(items)
    ours, base = score(items, dup, hashes), score(items, bdup, bhashes)
    n_fam = len({it["family"] for it in items})
    _table(f"{name}: {len(items)} images, {n_fam} pictures, {ours['positives']} planted duplicates, radius {RADIUS}",
           ours, base, (t_ours, t_base))
    return ours, base


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--originals", type=int, default=2000)
    ap.add_argument("--planted", type=int, default=600)
    ap.add_argument("--per-folder", type=int, default=100)
    ap.add_argument("--recolours", type=int, default=200)
    ap.add_argument("--photos-per-source", type=int, default=4)
    ap.add_argument("--skip-language", action="store_true")
    ap.add_argument("--crop-radii", default="0,4,6",
                    help="dedup crop_radius values to score besides the default (comma list; '' for none)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    CACHE.mkdir(parents=True, exist_ok=True)
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    t = time.perf_counter()
    clip = clipart_set(args.originals, args.planted, args.per_folder, args.recolours)
    photos = photo_set(args.photos_per_source)
    print(f"data built in {time.perf_counter() - t:.1f} s")
    sweep = [int(x) for x in args.crop_radii.split(",") if x.strip()]
    ours_c, base_c = near_dup(clip, "clip art (openclipart-png)", sweep)
    near_dup(photos, "photos (wallpapers + scikit-image)", sweep)
    if not args.skip_language:
        import lang_id

        print("\nlanguage ID (bench/lang_id.py: hand-labelled captions, ours vs lingua)")
        for line in lang_id.lines(lang_id.score()):
            print(line)
    print(f"ratio: {ours_c['f1'] / base_c['f1']:.2f}" if base_c["f1"] else "ratio: inf")
    return 0


if __name__ == "__main__":
    sys.exit(main())
