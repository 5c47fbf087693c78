"""Scale benchmark: import -> filter -> dedup -> export on synthetic distinct samples, at growing N.

Data: N distinct 32 px JPEG images with captions, in WebDataset tars of 10,000 samples, generated
once under bench/.cache/scale (a larger N reuses the tars of a smaller one). Each stage runs as its
own ``curate <stage>`` process, as a user runs it; measured per stage: wall seconds (process start to
exit, the embedded Ray start included), the stage's own seconds (its manifest), and the peak resident
memory of the driver and of the whole process tree (driver + Ray + workers; sums over /proc every
0.1 s). Per-sample figures (stage seconds / N, peak tree memory / N) are printed per N, so a flat
curve reads as equal columns.

    .venv/bin/python bench/scale.py [--rows 100000 400000] [--near-dup-hashes 20000000] [--shuffle-quality]

``--near-dup-hashes H``: the distributed near-dup engine on a local 3-node cluster
(infra/local-cluster.sh, head + 2 workers): H random pHashes (with planted near pairs) in keys files,
``dedup.near_pairs_distributed`` over the cluster, bytes written counted against the hash column and
against what the shuffle engine would have written (17 B per row per table, derived).

Baseline: the smallest N in the same run. Last line ``ratio: X.XX`` = stage seconds per sample at the
largest N / at the smallest (1.00 is flat; below 1 means per-sample cost falls with N).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "bench" / ".cache" / "scale"
TAR_ROWS = 10_000
STAGES = ("import", "filter", "dedup", "export")
STAGE_SETS = {
    "import": [],
    "filter": ["min_side=16", "max_aspect_ratio=3", "caption_min_words=2"],
    "dedup": [],
    "export": ["samples_per_shard=10000"],
}

sys.path.insert(0, str(ROOT))


def build_tars(rows: int) -> Path:
    """Tars of TAR_ROWS distinct samples up to ``rows``; a folder of links to the first ones."""
    from PIL import Image

    from curate.wds import TarWriter

    tars = CACHE / "tars"
    tars.mkdir(parents=True, exist_ok=True)
    need = -(-rows // TAR_ROWS)
    for t in range(need):
        path = tars / f"part-{t:05d}.tar"
        if path.exists():
            continue
        rng = random.Random(t)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            w = TarWriter(f)
            for i in range(TAR_ROWS):
                # distinct content: a random 8x8 colour grid scaled to 32 px (distinct pHashes)
                img = Image.frombytes("RGB", (8, 8), rng.randbytes(192)).resize((32, 32), Image.NEAREST)
                buf = io.BytesIO()
                img.save(buf, "JPEG", quality=90)
                n = t * TAR_ROWS + i
                w.add(f"{n:09d}", {"jpg": buf.getvalue(), "txt": f"synthetic sample number {n} of the scale run",
                                   "json": json.dumps({"url": f"http://example.invalid/{n}.jpg"})})
            w.close()
        tmp.rename(path)
    folder = CACHE / f"input-{rows}"
    if not folder.exists():
        part = folder.with_suffix(".tmp")
        shutil.rmtree(part, ignore_errors=True)
        part.mkdir()
        for t in range(need):
            (part / f"part-{t:05d}.tar").symlink_to(tars / f"part-{t:05d}.tar")
        part.rename(folder)
    return folder


def _proc_table() -> tuple[dict[int, int], dict[int, list[int]]]:
    rss, children = {}, {}
    page = os.sysconf("SC_PAGE_SIZE")
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
            fields = stat[stat.rindex(")") + 2:].split()
            rss[int(d)] = int(fields[21]) * page
            children.setdefault(int(fields[1]), []).append(int(d))
        except (OSError, ValueError, IndexError):
            continue
    return rss, children


def run_measured(cmd: list[str], log_path: Path, env: dict) -> dict:
    """Wall seconds, exit code, peak RSS of the driver and of its whole process tree."""
    peak_driver = peak_tree = 0
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True)
        done = threading.Event()

        def sample() -> None:
            nonlocal peak_driver, peak_tree
            while not done.is_set():
                rss, children = _proc_table()
                total, todo = 0, [proc.pid]
                while todo:
                    pid = todo.pop()
                    total += rss.get(pid, 0)
                    todo.extend(children.get(pid, []))
                peak_driver = max(peak_driver, rss.get(proc.pid, 0))
                peak_tree = max(peak_tree, total)
                done.wait(0.1)

        t = threading.Thread(target=sample, daemon=True)
        t.start()
        rc = proc.wait()
        done.set()
        t.join()
        try:
            os.killpg(proc.pid, 9)  # what this run started and left behind (Ray daemons), nothing else
        except ProcessLookupError:
            pass
    return {"rc": rc, "wall": time.perf_counter() - start, "driver_mb": peak_driver / 2**20,
            "tree_mb": peak_tree / 2**20}


def pipeline(rows: int, work: Path) -> dict[str, dict]:
    folder = build_tars(rows)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    curate = Path(sys.executable).parent / "curate"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_DEDUP_LOGS": "0"}
    env.pop("RAY_ADDRESS", None)
    res, prev = {}, str(folder)
    for stage in STAGES:
        out = work / stage
        cmd = [str(curate), stage, "--input", prev, "--output", str(out)]
        for s in STAGE_SETS[stage]:
            cmd += ["--set", s]
        r = run_measured(cmd, work / f"{stage}.log", env)
        manifest = out / "_manifest.json"
        if r["rc"] != 0 or not manifest.exists():
            raise SystemExit(f"{stage} at {rows} rows failed (rc {r['rc']}); see {work / (stage + '.log')}")
        m = json.loads(manifest.read_text())
        r["seconds"] = m["seconds"]
        r["rows_in"] = m["totals"]["rows_in"]
        r["kept"] = m["totals"]["kept"]
        res[stage] = r
        prev = str(out)
    return res


def report(results: dict[int, dict[str, dict]]) -> float:
    print(f"{'rows':>9} {'stage':<8}{'wall s':>9}{'stage s':>9}{'us/sample':>11}{'driver MB':>11}{'tree MB':>9}"
          f"{'B/sample':>10}{'kept':>9}")
    for rows, res in results.items():
        for stage, r in res.items():
            print(f"{rows:>9} {stage:<8}{r['wall']:>9.1f}{r['seconds']:>9.1f}{1e6 * r['seconds'] / rows:>11.0f}"
                  f"{r['driver_mb']:>11.0f}{r['tree_mb']:>9.0f}{r['tree_mb'] * 2**20 / rows:>10.0f}{r['kept']:>9}")
        total = sum(r["seconds"] for r in res.values())
        print(f"{rows:>9} {'total':<8}{sum(r['wall'] for r in res.values()):>9.1f}{total:>9.1f}"
              f"{1e6 * total / rows:>11.0f}")
    small, large = min(results), max(results)
    per = {n: sum(r["seconds"] for r in results[n].values()) / n for n in (small, large)}
    return per[large] / per[small]


# -- the distributed near-dup engine on a local 3-node cluster ------------------------------------
NEAR_DRIVER = """
import json, sys, time
import numpy as np
import ray
from curate.dataset import Dataset
from curate.runner import plan_map
from curate.stage import PlanContext, RunOptions
from curate.stages.dedup import DedupConfig, DedupStage, near_pairs_distributed
from curate import neardup

out_url, shards, per = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ray.init(address=sys.argv[4], logging_level="ERROR", log_to_driver=False)
cfg = DedupConfig(engine="distributed", confirm="none", crop_radius=0)
stage = DedupStage(cfg)
out = Dataset(out_url)
slots = int(ray.cluster_resources().get("CPU", 1))
ctx = PlanContext(input_path=None, input=None, output=out, plan_dir=out.path("_plan"), options=RunOptions(),
                  map=plan_map(stage), slots=slots)
total = shards * per
blocks = neardup.choose_blocks(total, cfg.radius)
t = time.perf_counter()
a, b = near_pairs_distributed(ctx, cfg, 0, list(range(shards)), {n: n * per for n in range(shards)}, total, blocks)
seconds = time.perf_counter() - t
print(json.dumps({"seconds": seconds, "pairs": int(len(a)), "blocks": blocks, "slots": slots,
                  "tables": len(neardup.tables(blocks, cfg.radius))}))
"""


def write_hash_keys(out: Path, hashes: int, shards: int, planted: int) -> int:
    """Keys files (the dedup scan's output) holding only pHashes: random, plus near copies."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    keys = out / "_plan" / "dedup" / "keys"
    keys.mkdir(parents=True, exist_ok=True)
    per = hashes // shards
    rng = np.random.default_rng(7)
    column_bytes = 0
    for n in range(shards):
        h = rng.integers(0, 2**64 - 1, per, dtype=np.uint64, endpoint=True)
        k = planted // shards
        flips = np.zeros(k, np.uint64)
        for _ in range(3):  # up to 3 bits flipped: within radius 6
            flips |= np.uint64(1) << rng.integers(0, 64, k).astype(np.uint64)
        h[per - k:] = h[:k] ^ flips
        pq.write_table(pa.table({"phash": pa.array(h, pa.uint64())}), keys / f"{n:08d}.parquet")
        column_bytes += 8 * per
    return column_bytes


def near_dup_cluster(hashes: int, shards: int) -> dict:
    state = Path(f"/tmp/curate-scale-cluster-{os.getuid()}")
    env = {**os.environ, "CURATE_CLUSTER_DIR": str(state), "PYTHON": sys.executable, "HEAD_CPUS": "1",
           "WORKER_CPUS": "1", "OBJECT_STORE_MB": "512"}
    out = CACHE / "near-dup"
    shutil.rmtree(out, ignore_errors=True)
    column = write_hash_keys(out, hashes, shards, planted=hashes // 100)
    script = CACHE / "near_driver.py"
    script.write_text(NEAR_DRIVER)
    try:
        started = subprocess.run([str(ROOT / "infra" / "local-cluster.sh"), "start", "2"], env=env,
                                 capture_output=True, text=True)
        if started.returncode != 0:
            raise SystemExit(f"local cluster did not start: {started.stderr[-2000:]}")
        cluster = dict(line.split("=", 1) for line in (state / "env").read_text().split() if "=" in line)
        denv = {**env, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": cluster.get("RAY_AUTH_MODE", ""),
                "RAY_AUTH_TOKEN_PATH": cluster.get("RAY_AUTH_TOKEN_PATH", "")}
        denv.pop("RAY_ADDRESS", None)
        written = {"total": 0}
        stop = threading.Event()
        near_dir = out / "_plan" / "dedup" / "near"

        def watch() -> None:  # the engine's files, at their largest (they are removed at the end)
            while not stop.is_set():
                size = sum(p.stat().st_size for p in near_dir.rglob("*") if p.is_file()) if near_dir.exists() else 0
                written["total"] = max(written["total"], size)
                stop.wait(0.2)

        t = threading.Thread(target=watch, daemon=True)
        t.start()
        r = subprocess.run([sys.executable, str(script), str(out), str(shards), str(hashes // shards),
                            cluster["RAY_GCS_ADDRESS"]], env=denv, capture_output=True, text=True, cwd=ROOT)
        stop.set()
        t.join()
        if r.returncode != 0:
            raise SystemExit(f"near-dup driver failed: {r.stderr[-3000:]}")
        res = json.loads(r.stdout.strip().splitlines()[-1])
    finally:
        subprocess.run([str(ROOT / "infra" / "local-cluster.sh"), "stop"], env=env, capture_output=True)
    res.update(column_bytes=column, written_bytes=written["total"], hashes=hashes,
               shuffle_bytes=17 * hashes * res["tables"])
    return res


# -- export's windowed shuffle: what the window costs ---------------------------------------------
def shuffle_quality(shards: int, rows: int, window: int, contiguous: bool = False, seed: int = 0) -> tuple[float, float]:
    """(r over all rows, worst |r| inside a window) between input and output positions, from the
    export plan's own functions; ``contiguous``: windows of consecutive shards (no seeded order)."""
    import numpy as np

    from curate.stages.export import permute, place_windows, position_correlation, windows_of

    ids = list(range(shards))
    wins = [ids[i:i + window] for i in range(0, shards, window)] if contiguous else windows_of(ids, window, seed)
    a, b = [], []
    for p in place_windows(wins, {n: (rows, 0) for n in ids}):
        local = permute(np.arange(p.offset[0], p.offset[0] + rows, dtype=np.uint64), p.count[0], seed, 2 * p.window)
        a.append(p.shard * rows + np.arange(rows))
        b.append(p.base[0] + local.astype(np.int64))
    x, y = np.concatenate(a), np.concatenate(b)
    worst = max(abs(position_correlation(x[m], y[m])) for m in (np.isin(x // rows, w) for w in wins))
    return position_correlation(x, y), worst


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[100_000, 400_000])
    ap.add_argument("--near-dup-hashes", type=int, default=0,
                    help="also run the distributed near-dup engine on a local 3-node cluster at this many hashes")
    ap.add_argument("--near-dup-shards", type=int, default=100)
    ap.add_argument("--skip-pipeline", action="store_true")
    ap.add_argument("--shuffle-quality", action="store_true",
                    help="print export's windowed-shuffle position correlations (docs/SCALING.md)")
    args = ap.parse_args(argv)
    print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    ratio = None
    if args.shuffle_quality:
        print("input shards x rows, window: r(all rows), worst |r| in a window; contiguous windows r(all)")
        for m, rows, w in ((60, 50, 6), (1000, 1000, 64), (4000, 500, 64), (1000, 1000, 16)):
            r, worst = shuffle_quality(m, rows, w)
            flat = shuffle_quality(m, rows, w, contiguous=True)[0]
            print(f"  {m} x {rows}, W {w}: {r:.4f}, {worst:.4f}; {flat:.3f}")
            ratio = abs(r) / abs(flat)  # the last case: seeded windows vs contiguous ones
    if not args.skip_pipeline:
        results = {}
        for rows in sorted(args.rows):
            t = time.perf_counter()
            build_tars(rows)
            print(f"input {rows} samples ready ({time.perf_counter() - t:.0f} s)", flush=True)
            results[rows] = pipeline(rows, CACHE / f"run-{rows}")
        ratio = report(results)
    if args.near_dup_hashes:
        r = near_dup_cluster(args.near_dup_hashes, args.near_dup_shards)
        print(f"near-dup, distributed units on 3 local nodes ({r['slots']} CPUs): {r['hashes']:,} hashes, "
              f"{r['tables']} tables (blocks {r['blocks']}), {r['seconds']:.0f} s, {r['pairs']:,} row pairs")
        print(f"  bytes written {r['written_bytes']:,} vs hash column {r['column_bytes']:,} "
              f"(x{r['written_bytes'] / r['column_bytes']:.3f}) + pairs {16 * r['pairs']:,}; "
              f"the shuffle engine writes 17 B x rows x tables = {r['shuffle_bytes']:,}")
        if ratio is None:
            ratio = r["written_bytes"] / r["shuffle_bytes"]
    print(f"load average at end: {os.getloadavg()[0]:.1f}")
    print(f"ratio: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
