"""Benchmark: adopting an existing WebDataset folder (the import stage) vs doing it by hand.

Data: 2,000 real JPEG photos (~800 px, bench/assets.photos) with captions, in 4 tars written by the
webdataset library. Both sides run in ONE process on the same files and produce the same per-sample
facts: key, caption, width, height, sha256 of the image bytes, 64-bit pHash, and a validated decode.

- ours: the import stage's plan + per-shard load/process/commit (the runner's own shard code, no Ray),
  writing Parquet, rejects, stats and a DALI .idx per tar;
- baseline: the webdataset library iterating the tars, PIL full decode, imagehash.phash (what a user
  or Data-Juicer-style tool does), rows kept in memory (no output written).

    .venv/bin/python bench/import_adopt.py [N]

Last line: ``ratio: X.XX`` = our samples/s / baseline samples/s.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import assets  # noqa: E402

CACHE = assets.CACHE / "import"


def build_input(n: int, tars: int = 4) -> Path:
    import webdataset as wds

    folder = CACHE / f"wds-{n}"
    if (folder / "done").exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    photos = assets.photos(n)
    per = (n + tars - 1) // tars
    for t in range(tars):
        with wds.TarWriter(str(folder / f"part-{t:03d}.tar")) as sink:
            for i in range(t * per, min(n, (t + 1) * per)):
                p = photos[i]
                sink.write(
                    {
                        "__key__": f"{i:07d}",
                        "jpg": p.read_bytes(),
                        "txt": f"photo {i} from {p.parent.name}",
                        "json": json.dumps({"url": f"http://example.com/{i}.jpg"}).encode(),
                    }
                )
    (folder / "done").write_text("ok")
    return folder


def run_ours(folder: Path, out: Path) -> tuple[float, int]:
    from curate.dataset import Dataset
    from curate.runner import ShardEnv, execute_shard
    from curate.stage import PlanContext, RunOptions
    from curate.stages.import_ import ImportConfig, ImportStage

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    stage = ImportStage(ImportConfig())
    stage.setup()
    ds = Dataset(str(out))
    ds.fs.makedirs(ds.root, exist_ok=True)
    opts = RunOptions(progress=False)
    ctx = PlanContext(str(folder), None, ds, ds.path("_plan"), opts, lambda f, xs: [f(x) for x in xs])
    ids = stage.plan(ctx)
    env = ShardEnv("import", str(folder), ds.url, 5, opts)
    kept = sum(execute_shard(stage, n, env)["rows_out"] for n in ids)
    return time.perf_counter() - t0, kept


def run_baseline(folder: Path) -> tuple[float, int]:
    import imagehash
    import webdataset as wds
    from PIL import Image

    t0 = time.perf_counter()
    rows = []
    urls = [str(p) for p in sorted(folder.glob("*.tar"))]
    for s in wds.WebDataset(urls, shardshuffle=False):
        data = s["jpg"]
        img = Image.open(io.BytesIO(data))
        img.load()
        rows.append(
            {
                "key": s["__key__"],
                "caption": s["txt"].decode(),
                "width": img.width,
                "height": img.height,
                "sha256": hashlib.sha256(data).hexdigest(),
                "phash": str(imagehash.phash(img)),
                "meta": json.loads(s["json"]),
            }
        )
    return time.perf_counter() - t0, len(rows)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    n = int(args[0]) if args else 2000
    folder = build_input(n)
    out = CACHE / "out"
    # warm the page cache for both sides alike
    for p in folder.glob("*.tar"):
        p.read_bytes()
    c0 = time.process_time()
    base_s, base_n = run_baseline(folder)
    c1 = time.process_time()
    ours_s, ours_n = run_ours(folder, out)
    c2 = time.process_time()
    base_cpu, ours_cpu = c1 - c0, c2 - c1
    assert ours_n == base_n == n, (ours_n, base_n, n)
    ours_rate, base_rate = n / ours_s, n / base_s
    print(f"input: {n} real JPEG photos (~800 px) in {len(list(folder.glob('*.tar')))} webdataset tars")
    print(f"baseline (webdataset + PIL + imagehash, 1 process): {base_s:.2f} s, {base_rate:.1f} samples/s")
    print(f"ours (import stage, 1 process, writes parquet+idx): {ours_s:.2f} s, {ours_rate:.1f} samples/s")
    # On a shared machine wall time includes waiting for a core; CPU time per sample does not.
    print(f"cpu seconds: baseline {base_cpu:.2f}, ours {ours_cpu:.2f}; cpu ratio {base_cpu / ours_cpu:.2f}")
    print(f"ratio: {ours_rate / base_rate:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
