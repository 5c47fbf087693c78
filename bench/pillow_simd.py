"""pillow-simd vs Pillow on the download stage's image path: decode (JPEG draft when shrinking), resize to
256 px (keep_ratio, area averaging to shrink as the stage does), encode JPEG q95.

pillow-simd replaces Pillow's ``PIL`` package, so the two cannot share a venv: this script builds
pillow-simd from source into its own venv under bench/.cache/ (it needs a C compiler and the libjpeg /
zlib / libpng / libwebp headers: Debian's libjpeg-dev zlib1g-dev libpng-dev libwebp-dev), then times the
same worker code under both interpreters on the same 2,000 real photos, one process each, in this run.

    .venv/bin/python bench/pillow_simd.py [--n 2000] [--size 256]

The last line is ``ratio: X.XX`` = pillow-simd images/s / Pillow images/s. curate supports pillow-simd
without requiring it: install it in place of Pillow (README) and every stage uses it; the download
stage records which one ran in each shard's stats.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "bench" / ".cache"
SIMD_VENV = CACHE / "pillow-simd-venv"
SIMD_VERSION = "12.1.1.post0"
sys.path.insert(0, str(ROOT / "bench"))

# Runs under either interpreter: only PIL and the standard library.
WORKER = r"""
import io, json, sys, time
from PIL import Image, features
files = json.loads(sys.stdin.read())
size = int(sys.argv[1])
blobs = [open(f, "rb").read() for f in files]
def one(data):
    img = Image.open(io.BytesIO(data))
    w, h = img.size
    scale = size / max(w, h)
    if scale < 1 and img.format == "JPEG":
        img.draft("RGB", (int(w * scale), int(h * scale)))
    img = img.convert("RGB")
    w, h = img.size
    scale = size / max(w, h)
    target = (max(1, round(w * scale)), max(1, round(h * scale)))
    # the stage's defaults (curate/images.py): area averaging (Pillow's BOX) to shrink, Lanczos to enlarge
    img = img.resize(target, Image.Resampling.BOX if scale < 1 else Image.Resampling.LANCZOS)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=95)
    return len(out.getvalue())
for b in blobs[:50]:
    one(b)  # warm-up
best = float("inf")
for _ in range(2):
    t = time.perf_counter()
    for b in blobs:
        one(b)
    best = min(best, time.perf_counter() - t)
import PIL
print(json.dumps({"version": PIL.__version__, "seconds": best, "n": len(blobs)}))
"""


def ensure_simd() -> Path:
    py = SIMD_VENV / "bin" / "python"
    ok = py.exists() and subprocess.run([str(py), "-c", "import PIL; assert 'post' in PIL.__version__"],
                                        capture_output=True).returncode == 0
    if not ok:
        print(f"building pillow-simd=={SIMD_VERSION} into {SIMD_VENV} (compiles from source) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(SIMD_VENV)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", f"pillow-simd=={SIMD_VERSION}"], check=True,
                       env={"CC": "cc -mavx2", "PATH": "/usr/bin:/bin"})
    return py


def run(python: str, files: list[str], size: int) -> dict:
    r = subprocess.run([python, "-c", WORKER, str(size)], input=json.dumps(files), capture_output=True,
                       text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--size", type=int, default=256)
    args = ap.parse_args(argv)
    from assets import photos

    files = [str(p) for p in photos(args.n)]
    simd = ensure_simd()
    base = run(sys.executable, files, args.size)
    fast = run(str(simd), files, args.size)
    for name, r in (("Pillow", base), ("pillow-simd", fast)):
        print(f"{name:12s} {r['version']:>14s}: {r['n'] / r['seconds']:7.1f} images/s "
              f"({1000 * r['seconds'] / r['n']:.2f} ms/img: decode+draft, resize to {args.size}, JPEG q95)")
    print(f"ratio: {base['seconds'] / fast['seconds']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
