"""pHash from bytes: curate.phash vs imagehash.phash on the same real JPEG photos, one core each.

    .venv/bin/python bench/phash.py [N] [MAX_SIDE]        # default 2000 photos of ~800 px

Reports, for the same images: images/s on one core for ours (Pillow draft decode at reduced scale,
batched numpy DCT) and for imagehash (full decode, Lanczos resize, scipy DCT); the floor (Pillow's
reduced-scale JPEG decode alone, i.e. the entropy decode that no hash can skip); agreement (bit
distance between the two hashes of each image); whether near-duplicates imagehash finds within the
radius are found by ours (made edits: resize, JPEG q30, 2% crop, +15% brightness, text overlay); and
the marginal cost of hashing an image that is already decoded (the download/import path).
Last line: ``ratio: X.XX`` = our images/s / imagehash's.
"""

from __future__ import annotations

import os

# One core each: BLAS threads would make our batched matmul look faster than a core can do.
for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import io  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import imagehash  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, ImageDraw, ImageEnhance, ImageFont  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import assets  # noqa: E402

from curate import phash  # noqa: E402
from curate.stages.dedup import DedupConfig  # noqa: E402

RADIUS = DedupConfig().radius
BATCH = 256


def _cpu() -> float:
    return time.process_time()


def bench_imagehash(blobs: list[bytes]) -> tuple[float, list[int]]:
    t = _cpu()
    out = [int(str(imagehash.phash(Image.open(io.BytesIO(b)))), 16) for b in blobs]
    return _cpu() - t, out


def bench_ours(blobs: list[bytes]) -> tuple[float, list[int]]:
    t = _cpu()
    out: list[int] = []
    for s in range(0, len(blobs), BATCH):
        out.extend(phash.phash_bytes(blobs[s : s + BATCH]))
    return _cpu() - t, out


def bench_floor(blobs: list[bytes], size: int) -> float:
    t = _cpu()
    for b in blobs:
        img = Image.open(io.BytesIO(b))
        img.draft("L", (size, size))
        img.load()
    return _cpu() - t


def _edits(img: Image.Image) -> list[Image.Image]:
    w, h = img.size
    out = [img.resize((w // 2, h // 2), Image.Resampling.BICUBIC)]
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=30)
    out.append(Image.open(io.BytesIO(buf.getvalue())))
    out.append(img.crop((w // 50, h // 50, w - w // 50, h - h // 50)))
    out.append(ImageEnhance.Brightness(img).enhance(1.15))
    t = img.copy()
    ImageDraw.Draw(t).text(
        (w // 20, h - h // 7),
        "stock photo",
        fill=(255, 255, 255),
        font=ImageFont.load_default(size=h // 14),
        stroke_width=1,
        stroke_fill=(0, 0, 0),
    )
    out.append(t)
    return out


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    n = int(argv[0]) if argv else 2000
    max_side = int(argv[1]) if len(argv) > 1 else 800
    paths = assets.photos(n, max_side)
    blobs = [p.read_bytes() for p in paths]
    sizes = [Image.open(io.BytesIO(b)).size for b in blobs[:200]]
    print(
        f"{len(blobs)} real JPEG photos, mean {np.mean([s[0] for s in sizes]):.0f}x"
        f"{np.mean([s[1] for s in sizes]):.0f} px, {np.mean([len(b) for b in blobs]) / 1e3:.0f} kB"
    )

    bench_ours(blobs[:100])  # warm caches and imports
    t_ref, ref = bench_imagehash(blobs)
    t_ours, ours = min(bench_ours(blobs), bench_ours(blobs), key=lambda r: r[0])
    t_floor = min(bench_floor(blobs, phash.REDUCE_TO), bench_floor(blobs, phash.REDUCE_TO))
    t_floor8 = bench_floor(blobs, 32)
    per = lambda t: t / len(blobs) * 1e3  # noqa: E731
    print(f"imagehash.phash from bytes : {per(t_ref):6.2f} ms/img  {len(blobs) / t_ref:7.0f} img/s per core")
    print(
        f"curate.phash_bytes         : {per(t_ours):6.2f} ms/img  {len(blobs) / t_ours:7.0f} img/s per core"
    )
    print(
        f"floor: draft decode alone  : {per(t_floor):6.2f} ms/img at our scale (shorter side >= {phash.REDUCE_TO}),"
        f" {per(t_floor8):.2f} ms/img at 1/8; ours = {t_ours / t_floor:.2f}x our-scale decode,"
        f" {t_ours / t_floor8:.2f}x the 1/8 decode"
    )

    d = np.array(
        [phash.hamming(a, b) for a, b in zip(ref, ours, strict=True) if a is not None and b is not None]
    )
    print(
        f"agreement (bits differing, ours vs imagehash, {len(d)} images): exact {np.mean(d == 0):.1%}, "
        f"<=2 {np.mean(d <= 2):.1%}, <=4 {np.mean(d <= 4):.1%}, mean {d.mean():.2f}, max {d.max()}"
    )

    # near-duplicates: pairs (original, edit) within RADIUS by imagehash; found by ours?
    k = min(300, len(blobs))
    both = ref_only = ours_only = total = 0
    for b in blobs[:k]:
        img = Image.open(io.BytesIO(b)).convert("RGB")
        eb = [_jpeg(e) for e in _edits(img)]
        r0 = int(str(imagehash.phash(Image.open(io.BytesIO(b)))), 16)
        o0 = phash.phash_bytes([b])[0]
        for e, oe in zip(eb, phash.phash_bytes(eb), strict=True):
            re_ = int(str(imagehash.phash(Image.open(io.BytesIO(e)))), 16)
            in_ref, in_ours = phash.hamming(r0, re_) <= RADIUS, phash.hamming(o0, oe) <= RADIUS
            both += in_ref and in_ours
            ref_only += in_ref and not in_ours
            ours_only += in_ours and not in_ref
            total += 1
    print(
        f"near-dup edits of {k} photos (radius {RADIUS}): imagehash finds {both + ref_only}/{total}, ours finds "
        f"{both + ours_only}/{total}; of imagehash's, ours finds {both / max(1, both + ref_only):.1%} "
        f"({ours_only} found only by ours)"
    )
    # all pairs among the photos within RADIUS
    ra, oa = np.array(ref, dtype=np.uint64), np.array(ours, dtype=np.uint64)
    iu = np.triu_indices(len(ra), 1)
    pr = phash.hamming_np(ra[:, None], ra[None, :])[iu] <= RADIUS
    do = phash.hamming_np(oa[:, None], oa[None, :])[iu]
    po = do <= RADIUS
    print(
        f"all {len(pr):,} photo pairs within radius {RADIUS}: imagehash {pr.sum()}, ours {po.sum()}, both "
        f"{(pr & po).sum()}; of imagehash's, ours finds {(pr & po).sum() / max(1, pr.sum()):.1%} within "
        f"{RADIUS}, {(pr & (do <= RADIUS + 2)).sum() / max(1, pr.sum()):.1%} within {RADIUS + 2}"
    )

    # marginal cost where the image is decoded anyway (download / import)
    dec = []
    t = _cpu()
    for b in blobs[:500]:
        img = Image.open(io.BytesIO(b))
        img.load()
        dec.append(img)
    t_dec = _cpu() - t
    t = _cpu()
    for img in dec:
        phash.phash_pil(img)
    t_pil = _cpu() - t
    small = [img.copy() for img in dec]
    for img in small:
        img.thumbnail((256, 256))
    t = _cpu()
    for img in small:
        phash.phash_pil(img)
    t_small = _cpu() - t
    m = len(dec)
    print(
        f"already decoded ({m} imgs): full decode {t_dec / m * 1e3:.2f} ms/img; phash_pil on it "
        f"{t_pil / m * 1e3:.2f} ms/img (+{t_pil / t_dec:.0%} of the decode); on a 256 px resize "
        f"{t_small / m * 1e3:.2f} ms/img"
    )
    print(f"ratio: {t_ref / t_ours:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
