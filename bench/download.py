"""Download benchmark: curate's download stage vs img2dataset 1.47.0 on the same URL list, same server.

Both tools fetch the same URL list from the same local HTTP server (curate.demo.DemoServer in its own
process on 127.0.0.1): by default (``--data demo-valid``) the demo corpus' valid real clip-art
PNG/JPEG/WebP images repeated under distinct URLs to >= 2,000 rows; ``--data demo`` keeps the corpus'
deliberately broken entries (404, HTML as JPEG, truncated, a pixel bomb); with ``--data photos``
2,000 real 800 px JPEG photos from bench/assets.py. Both write WebDataset tars of 256 px images,
resize mode ``border``, JPEG quality 95, shards of the same size. img2dataset runs from its own virtual environment
(bench/.cache/img2dataset-venv, created here with ``pip install img2dataset==1.47.0``) under a memory
cap (``prlimit --as``) and a wall-clock cap (``timeout``); a crash or a hang is reported as its result.

Measured per tool: samples/s (input URLs / seconds) end to end (process start to exit) and over the
tool's own run time, successes, CPU seconds per image and peak resident memory of the whole process
tree (sums over /proc, sampled every 0.1 s). On a shared machine the CPU figure is the steadiest.

    .venv/bin/python bench/download.py [--data demo-valid|demo|photos] [--n 2000] [--shard-size 500] [--time-limit 600]

The last line is ``ratio: X.XX`` = curate samples/s / img2dataset samples/s over each tool's own run
time ("job": curate's manifest seconds, which exclude the embedded Ray start; img2dataset's first
shard start to last shard end); 0.00 when img2dataset produced nothing. The end-to-end wall ratio and
the CPU seconds per image of both process trees are printed above it.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "bench" / ".cache"
I2D_VENV = CACHE / "img2dataset-venv"
I2D_VERSION = "1.47.0"
WORK = CACHE / "download-bench"

sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def ensure_img2dataset() -> Path:
    exe = I2D_VENV / "bin" / "img2dataset"
    if exe.exists():
        return exe
    print(f"installing img2dataset=={I2D_VERSION} into {I2D_VENV} ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(I2D_VENV)], check=True)
    subprocess.run([str(I2D_VENV / "bin" / "pip"), "install", "-q", f"img2dataset=={I2D_VERSION}"], check=True)
    return exe


class Server:
    """The photo folder served by curate.demo.DemoServer in a separate process."""

    def __init__(self, root: Path):
        code = (
            "import sys, time\n"
            "from curate.demo import DemoServer\n"
            f"s = DemoServer({str(root)!r}, max_connections=512).start()\n"
            "print(s.port, flush=True)\n"
            "sys.stdin.read()\n"
        )
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     cwd=ROOT, text=True)
        self.port = int(self.proc.stdout.readline())
        self.base_url = f"http://127.0.0.1:{self.port}"

    def cpu_seconds(self) -> float:
        """User + system CPU the server process has used so far."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.terminate()
        self.proc.wait(timeout=10)


# The web at a distance: an asyncio server on H loopback addresses (127.0.0.1 .. 127.0.0.H, one port)
# that answers each request after a lognormal delay around the median asked for. Per URL, fixed by
# a hash of its path and query: 5% answer 404, 3% answer 503 to their first request and the image
# after (a transient failure a retry recovers), the rest the image.
LATENCY_SERVER = """
import asyncio, hashlib, math, random, sys
from pathlib import Path
from aiohttp import web

root, median_ms, hosts, sigma = Path(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
types = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp"}
files = {p.name: (p.read_bytes(), types.get(p.suffix.lower(), "application/octet-stream"))
         for p in root.rglob("*") if p.is_file() and p.suffix.lower() in types}
failed_once = set()
rng = random.Random(0)

async def handle(request):
    if request.path == "/__reset":  # between tools: every transient 503 fires again
        failed_once.clear()
        return web.Response(text="ok")
    await asyncio.sleep(median_ms / 1000 * math.exp(rng.gauss(0, sigma)))
    key = request.path_qs
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") % 100
    if h < 5:
        return web.Response(status=404, text="not found")
    if h < 8 and key not in failed_once:
        failed_once.add(key)
        return web.Response(status=503, text="busy")
    hit = files.get(request.path.rsplit("/", 1)[-1])
    if hit is None:
        return web.Response(status=404, text="not found")
    return web.Response(body=hit[0], content_type=hit[1])

async def main():
    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    first = web.TCPSite(runner, "127.0.0.1", 0, backlog=2048)
    await first.start()
    port = first._server.sockets[0].getsockname()[1]
    for i in range(2, hosts + 1):
        await web.TCPSite(runner, f"127.0.0.{i}", port, backlog=2048).start()
    print(port, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

asyncio.run(main())
"""


class LatencyServer(Server):
    """LATENCY_SERVER over ``root`` in its own process; ``url(i, name)`` spreads URLs over the hosts."""

    def __init__(self, root: Path, median_ms: float, hosts: int, sigma: float = 0.5):
        script = WORK / "latency_server.py"
        script.write_text(LATENCY_SERVER)
        self.proc = subprocess.Popen([sys.executable, str(script), str(root), str(median_ms), str(hosts), str(sigma)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT, text=True)
        self.port = int(self.proc.stdout.readline())
        self.hosts = hosts
        self.base_url = f"http://127.0.0.1:{self.port}"

    def reset(self) -> None:
        import urllib.request

        urllib.request.urlopen(f"{self.base_url}/__reset", timeout=10).read()

    def url(self, i: int, name: str) -> str:
        return f"http://127.0.0.{1 + i % self.hosts}:{self.port}/{name}?copy={i}"


_WARM: list[subprocess.Popen] = []


def start_warm_ray() -> str:
    """A local Ray head (``ray start --block`` in its own session) started before the clock; its GCS
    address for RAY_ADDRESS. Only this process group is ended afterwards."""
    import socket

    port = 6390 + os.getuid() % 500
    ray = Path(sys.executable).parent / "ray"
    proc = subprocess.Popen([str(ray), "start", "--head", "--block", f"--port={port}", "--include-dashboard=false",
                             f"--num-cpus={os.cpu_count()}", "--node-ip-address=127.0.0.1", "--disable-usage-stats"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    _WARM.append(proc)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.5)
    time.sleep(3)  # raylet registration after the GCS port opens
    return f"127.0.0.1:{port}"


def stop_warm_ray() -> None:
    while _WARM:
        proc = _WARM.pop()
        try:
            os.killpg(proc.pid, 15)
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, 9)


def tree_sample(root: int) -> tuple[int, dict[int, int]]:
    """(sum of RSS in bytes, {pid: user+system CPU ticks}) over ``root`` and its descendants (/proc)."""
    children: dict[int, list[int]] = {}
    info: dict[int, tuple[int, int]] = {}
    page = os.sysconf("SC_PAGE_SIZE")
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
            fields = stat[stat.rindex(")") + 2:].split()
            pid, ppid = int(d), int(fields[1])
            info[pid] = (int(fields[21]) * page, int(fields[11]) + int(fields[12]))
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(pid)
    rss, cpu, todo = 0, {}, [root]
    while todo:
        pid = todo.pop()
        if pid in info:
            rss += info[pid][0]
            cpu[pid] = info[pid][1]
        todo.extend(children.get(pid, []))
    return rss, cpu


def run_measured(cmd: list[str], log_path: Path, env: dict | None = None) -> dict:
    """Run ``cmd``: wall seconds, exit code, peak RSS and CPU seconds of its whole process tree."""
    peak = 0
    ticks: dict[int, int] = {}
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                start_new_session=True)
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                rss, cpu = tree_sample(proc.pid)
                peak = max(peak, rss)
                for pid, t in cpu.items():
                    ticks[pid] = max(ticks.get(pid, 0), t)
                done.wait(0.1)

        t = threading.Thread(target=sample, daemon=True)
        t.start()
        rc = proc.wait()
        done.set()
        t.join()
        # Ray leaves daemons behind when its driver exits abnormally; end what this run started.
        try:
            os.killpg(proc.pid, 9)
        except ProcessLookupError:
            pass
    return {"rc": rc, "seconds": time.perf_counter() - start, "peak_rss_mb": peak / 2**20,
            "cpu_seconds": sum(ticks.values()) / os.sysconf("SC_CLK_TCK")}


# One thread, each tool's own image path on the distinct files of the list, in its own venv: CPU ms per
# image for decode + resize + encode (curate: also the sha256 and pHash it stores).
CODEC_CURATE = """
import hashlib, json, sys, time
from curate.images import ImageConfig, process_image
from curate.phash import phash_pil
blobs = [open(f, "rb").read() for f in json.load(open(sys.argv[1]))]
cfg = ImageConfig(image_size=int(sys.argv[2]), resize_mode=sys.argv[3], output_format="jpg", encode_quality=95)
best = 1e9
for _ in range(2):
    t = time.process_time()
    for b in blobs:
        p = process_image(b, cfg, keep_image=True)
        if p.image is not None:
            phash_pil(p.image)
            hashlib.sha256(p.data).hexdigest()
    best = min(best, time.process_time() - t)
print(1000 * best / len(blobs))
"""
CODEC_IMG2DATASET = """
import io, json, sys, time
import cv2
from img2dataset.resizer import ResizeMode, Resizer
cv2.setNumThreads(1)
blobs = [open(f, "rb").read() for f in json.load(open(sys.argv[1]))]
r = Resizer(image_size=int(sys.argv[2]), resize_mode=ResizeMode[sys.argv[3]], resize_only_if_bigger=False,
            encode_format="jpg", encode_quality=95)
best = 1e9
for _ in range(2):
    t = time.process_time()
    for b in blobs:
        r(io.BytesIO(b))
    best = min(best, time.process_time() - t)
print(1000 * best / len(blobs))
"""


def codec_ms(python: Path, code: str, files: list[Path], args) -> float | None:
    """CPU ms per image of a tool's image path (see CODEC_*), run from a neutral directory."""
    listing = WORK / "codec-files.json"
    listing.write_text(json.dumps([str(f) for f in files]))
    script = WORK / "codec.py"
    script.write_text(code)
    r = subprocess.run([str(python), str(script), str(listing), str(args.image_size), args.resize_mode],
                       capture_output=True, text=True, cwd=WORK, env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1",
                                                                     "PYTHONPATH": str(ROOT)})
    try:
        return float(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        print(f"codec timing failed for {python}: {r.stderr[-500:]}")
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=2000, help="URLs in the list (>= 2000 for the report)")
    ap.add_argument("--data", choices=("photos", "demo", "demo-valid"), default="demo-valid",
                    help="photos: bench/assets real JPEG photos; demo: the demo corpus repeated; demo-valid: "
                         "the same without its deliberately broken entries (404, HTML, truncated, pixel bomb)")
    ap.add_argument("--shard-size", type=int, default=500)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--resize-mode", default="border")
    ap.add_argument("--time-limit", type=int, default=600, help="seconds before img2dataset counts as hung")
    ap.add_argument("--mem-limit-gb", type=float, default=6.0, help="prlimit --as for img2dataset processes")
    ap.add_argument("--processes", type=int, default=2, help="img2dataset processes_count (cores here)")
    ap.add_argument("--threads", type=int, default=32, help="img2dataset thread_count per process")
    ap.add_argument("--latency", type=float, default=None, metavar="MS",
                    help="serve with a lognormal delay around MS per response, 5%% 404 and 3%% transient 503 "
                         "(the demo corpus' valid images); the ratio is then end to end")
    ap.add_argument("--hosts", type=int, default=20, help="with --latency: loopback addresses the URLs spread over")
    ap.add_argument("--i2d-shard-size", type=int, default=None,
                    help="img2dataset number_sample_per_shard (default: --shard-size)")
    ap.add_argument("--curate-shard-size", type=int, default=None,
                    help="curate shard_size (default: --shard-size; with --latency: curate's own default)")
    ap.add_argument("--warm-ray", action="store_true",
                    help="run curate against a local Ray started before the clock (RAY_ADDRESS), as a "
                         "pipeline's second stage or a cluster would; default: the embedded Ray start is timed")
    args = ap.parse_args(argv)

    i2d = ensure_img2dataset()
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    url_list = WORK / "urls.parquet"
    server: Server
    if args.latency is not None:
        from curate.demo import CORPUS, read_entries

        entries = [e for e in read_entries(CORPUS) if e["kind"] in ("ok", "duplicate", "near_duplicate")]
        distinct = [CORPUS / e["file"] for e in entries]
        server = LatencyServer(CORPUS, args.latency, args.hosts)
        urls = [server.url(i, distinct[i % len(distinct)].name) for i in range(args.n)]
        caps = [entries[i % len(entries)]["caption"] for i in range(args.n)]
        pq.write_table(pa.table({"url": urls, "caption": caps}), url_list)
        what = (f"the demo corpus' {len(distinct)} valid clip-art images over {args.hosts} hosts, "
                f"{args.latency:g} ms median latency (lognormal), 5% 404, 3% 503 once")
    elif args.data == "photos":
        from assets import photos

        photo_paths = photos(min(args.n, 2000), max_side=800)
        server = Server(photo_paths[0].parent)
        urls = [f"{server.base_url}/{photo_paths[i % len(photo_paths)].name}"
                + (f"?copy={i // len(photo_paths)}" if i >= len(photo_paths) else "") for i in range(args.n)]
        pq.write_table(pa.table({"url": urls, "caption": [f"photo {i}" for i in range(args.n)]}), url_list)
        what = f"{len(photo_paths)} distinct real photos (800 px JPEG)"
        distinct = list(photo_paths)
    else:
        from curate.demo import CORPUS, read_entries, write_url_list

        server = Server(CORPUS)
        entries = read_entries(CORPUS)
        distinct = [CORPUS / e["file"] for e in entries if e["kind"] in ("ok", "duplicate", "near_duplicate")]
        if args.data == "demo-valid":
            broken = {e["file"] for e in entries if e["kind"] not in ("ok", "duplicate", "near_duplicate")}
            keep = len(entries) - len(broken)
            write_url_list(url_list, server.base_url, repeat=-(-args.n // keep))
            table = pq.read_table(url_list)
            files = [u.split(server.base_url + "/", 1)[1].split("?", 1)[0] for u in table["url"].to_pylist()]
            table = table.filter(pa.array([f not in broken for f in files]))
            pq.write_table(table, url_list)
            args.n = table.num_rows
            what = f"the demo corpus' {keep} valid clip-art entries repeated under distinct URLs"
        else:
            args.n = write_url_list(url_list, server.base_url, repeat=-(-args.n // len(entries)))
            what = f"the demo corpus ({len(entries)} clip-art entries incl. broken ones) repeated under distinct URLs"
    try:
        print(f"{args.n} URLs: {what}, served from {server.base_url}", flush=True)

        # curate: same geometry and format; one host, so the per-host limit is the connection count.
        cur_out = WORK / "curate-out"
        sets = [f"image.image_size={args.image_size}",
                f"image.resize_mode={args.resize_mode}", "image.output_format=jpg", "image.encode_quality=95"]
        if args.latency is not None:
            # curate's own defaults: shard_size, connections (growing), 16 per host, 2 retries
            sets += ["fetch.allowed_networks=[127.0.0.0/24]"]
            if args.curate_shard_size:
                sets += [f"shard_size={args.curate_shard_size}"]
        else:
            sets += [f"shard_size={args.curate_shard_size or args.shard_size}",
                     "fetch.allowed_networks=[127.0.0.1/32]", "fetch.connections=64",
                     "fetch.per_host_connections=64"]
        curate_exe = Path(sys.executable).parent / "curate"
        cmd = [str(curate_exe), "download", "--input", str(url_list), "--output", str(cur_out)]
        for s in sets:
            cmd += ["--set", s]
        env = {**os.environ, "RAY_DEDUP_LOGS": "0", "PYTHONPATH": str(ROOT)}
        warm = start_warm_ray() if args.warm_ray else None
        if warm is not None:
            env["RAY_ADDRESS"] = warm
        s0 = server.cpu_seconds()
        cur = run_measured(cmd, WORK / "curate.log", env)
        cur["server_cpu"] = server.cpu_seconds() - s0
        manifest = json.loads((cur_out / "_manifest.json").read_text()) if (cur_out / "_manifest.json").exists() else None
        cur["successes"] = manifest["totals"]["kept"] if manifest else 0
        # The stage's own run time: plan, all shards, manifest; not Python or Ray start-up.
        cur["job_seconds"] = manifest["seconds"] if manifest else None
        cur["result"] = "ok" if cur["rc"] == 0 and manifest else f"failed (rc {cur['rc']}, see {WORK / 'curate.log'})"
        if warm is not None:
            stop_warm_ray()
        shard_stats = [json.loads(p.read_text()) for p in (cur_out / "shards").glob("*.stats.json")]
        cur["shards"] = len(shard_stats)
        cur["connections"] = [s.get("connections") for s in sorted(shard_stats, key=lambda s: s.get("shard", 0))]

        # img2dataset: its own venv, capped.
        i2d_out = WORK / "img2dataset-out"
        mem = int(args.mem_limit_gb * 1024**3)
        cmd = ["prlimit", f"--as={mem}", "timeout", "-k", "10", str(args.time_limit), str(i2d),
               "--url_list", str(url_list), "--input_format", "parquet", "--url_col", "url", "--caption_col", "caption",
               "--output_format", "webdataset", "--output_folder", str(i2d_out),
               "--processes_count", str(args.processes), "--thread_count", str(args.threads),
               "--image_size", str(args.image_size), "--resize_mode", args.resize_mode,
               "--encode_format", "jpg", "--encode_quality", "95",
               "--number_sample_per_shard", str(args.i2d_shard_size or args.shard_size),
               "--distributor", "multiprocessing",
               "--enable_wandb", "False", "--retries", "0", "--timeout", "10"]
        # no update check over the network from albumentations (there is no network here)
        if isinstance(server, LatencyServer):
            server.reset()
        s0 = server.cpu_seconds()
        ref = run_measured(cmd, WORK / "img2dataset.log", {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"})
        ref["server_cpu"] = server.cpu_seconds() - s0
        stats = [json.loads(Path(p).read_text()) for p in glob.glob(str(i2d_out / "*_stats.json"))]
        ref["successes"] = sum(s.get("successes", 0) for s in stats)
        # img2dataset's own run time: first shard start to last shard end, as its stats record them.
        ref["job_seconds"] = (max(s["end_time"] for s in stats) - min(s["start_time"] for s in stats)) if stats else None
        if ref["rc"] in (124, 137):
            ref["result"] = f"hung: killed after {args.time_limit}s ({ref['successes']} successes in finished shards)"
        elif ref["rc"] != 0:
            ref["result"] = f"crashed (rc {ref['rc']}, see {WORK / 'img2dataset.log'})"
        else:
            ref["result"] = "ok"
    finally:
        server.close()
    codec = {"curate download": codec_ms(Path(sys.executable), CODEC_CURATE, distinct, args),
             f"img2dataset {I2D_VERSION}": codec_ms(I2D_VENV / "bin" / "python", CODEC_IMG2DATASET, distinct, args)}

    print()
    print(f"{'tool':<20}{'result':<8}{'wall s':>8}{'wall/s':>9}{'job s':>8}{'job/s':>9}{'CPU ms/img':>12}"
          f"{'server ms/img':>15}{'codec ms/img':>14}{'successes':>11}{'peak RSS MB':>13}")
    rows = {}
    for name, r in (("curate download", cur), (f"img2dataset {I2D_VERSION}", ref)):
        ok = r["result"] == "ok"
        job = r.get("job_seconds")
        rows[name] = {
            "wall_rate": args.n / r["seconds"] if ok else 0.0,
            "job_rate": args.n / job if ok and job else 0.0,
            "cpu_ms": 1000 * r["cpu_seconds"] / args.n,
        }
        x = rows[name]
        c_ms = f"{codec[name]:.2f}" if codec[name] is not None else "-"
        print(f"{name:<20}{'ok' if ok else 'FAILED':<8}{r['seconds']:>8.1f}{x['wall_rate']:>9.1f}"
              f"{(job or 0):>8.1f}{x['job_rate']:>9.1f}{x['cpu_ms']:>12.1f}{1000 * r['server_cpu'] / args.n:>15.2f}"
              f"{c_ms:>14}{r['successes']:>11d}{r['peak_rss_mb']:>13.0f}")
        if not ok:
            print(f"  {name}: {r['result']}")
    c, b = rows["curate download"], rows[f"img2dataset {I2D_VERSION}"]
    print("wall: process start to exit (curate: Python + embedded Ray start included); job: the tool's own run time")
    print("(curate: manifest seconds; img2dataset: first shard start to last shard end); CPU: user+system of the tree")
    print("server: the HTTP server's CPU per URL during the tool's run (it shares the same cores); codec: one")
    print("thread, the tool's own decode + resize + encode (curate: + sha256 + pHash) per distinct image")
    print(f"success counts: curate {cur['successes']} / img2dataset {ref['successes']} of {args.n}")
    if b["job_rate"] > 0 and codec["curate download"] is not None:
        budget = 1000 * (os.cpu_count() or 1) / (3 * b["job_rate"])
        print(f"3x img2dataset's job rate = {3 * b['job_rate']:.0f} samples/s leaves {budget:.2f} ms of CPU per "
              f"sample on {os.cpu_count()} cores for everything (server included); curate's codec work alone is "
              f"{codec['curate download']:.2f} ms")
    if b["wall_rate"] > 0:
        print(f"wall ratio: {c['wall_rate'] / b['wall_rate']:.2f}   CPU per image ratio (img2dataset / curate): "
              f"{b['cpu_ms'] / max(c['cpu_ms'], 1e-9):.2f}")
    print(f"curate: {cur.get('shards')} shards, peak connections per shard task {cur.get('connections')}")
    print(f"job ratio: {c['job_rate'] / b['job_rate']:.2f}" if b["job_rate"] > 0 else "job ratio: 0.00")
    if args.latency is not None:
        # at web latency the figure that matters is end to end, start-up included
        print(f"ratio: {c['wall_rate'] / b['wall_rate']:.2f}" if b["wall_rate"] > 0 else "ratio: 0.00")
    else:
        print(f"ratio: {c['job_rate'] / b['job_rate']:.2f}" if b["job_rate"] > 0 else "ratio: 0.00")
    return 0


if __name__ == "__main__":
    sys.exit(main())
