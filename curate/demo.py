"""The bundled demo corpus served over HTTP on 127.0.0.1, and the URL list that points at it.

``DemoServer`` is what the demo, the tests and the benchmarks download from: a threaded stdlib HTTP
server in a background thread, bounded in concurrent connections, that serves the corpus files
with their real content types. The corpus' deliberately broken entries stay broken on the wire: the
missing file answers 404, the HTML page with a ``.jpg`` name is served as ``image/jpeg``.

``write_url_list`` turns ``demo/corpus/captions.jsonl`` into the Parquet URL list the download
stage reads (``url``, ``caption``).

    python -m curate.demo serve [--root DIR] [--port 8000] [--urls OUT.parquet]
    python -m curate.demo urls OUT.parquet --base-url http://127.0.0.1:8000 [--repeat N]
    python -m curate.demo run [--pipeline pipelines/demo.yaml] [-- COMMAND ...]
        serve on 127.0.0.1:8765 (a free port if taken), write demo-output/urls.parquet, then run the
        pipeline in this process (or COMMAND); exit with its status.
    python -m curate.demo all
        ``make demo``: build the tiny demo models (once), run the demo pipeline as ``run`` does, train a
        tiny CLIP on its export and write the report; print where everything is.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from curate import schema

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "demo" / "corpus"
DEMO_PIPELINE = REPO / "pipelines" / "demo.yaml"
DEMO_OUT = REPO / "demo-output"
DEMO_URLS = DEMO_OUT / "urls.parquet"
DEMO_MODELS = DEMO_OUT / "models"
DEMO_REFERENCE = DEMO_OUT / "reference" / "demo_eval"
DEMO_BLOCKLISTS = DEMO_OUT / "blocklists"
# The demo's "evaluation set": resized, recompressed copies of a handful of corpus images, which the
# decontaminate step must find in the corpus; and one known-bad image for the pHash blocklist.
DEMO_EVAL_FILES = (
    "images/0000-fireworks-ganson.png", "images/0001-punaisa-01.png", "images/0005-pattinatrici-sul-ghiacc-01.png",
    "images/0007-dinosauri-architetto-fra-01.jpg", "images/0035-manga-girl-dirk-struve-01.jpg",
    "images/0067-owl-on-branch-ganson.jpg",
)
DEMO_BLOCKED_FILE = "images/0004-vacca-pezzata-rossa-val-01.png"
DEMO_TRAIN_STEPS = 50
# recipe (a) shrunk to a tiny model: a real run of the loop (DALI on CPU, accumulation, eval on the
# export's held-out split, checkpoint) in about a minute on a laptop.
DEMO_TRAIN_ARGS = [
    "--recipe", str(REPO / "trainer" / "recipes" / "clip_vit_l14_336.yaml"),
    "--set", "model.tiny=true", "train.global_batch=32", "train.accum=2", f"train.steps={DEMO_TRAIN_STEPS}",
    "train.log_every=10", "optim.lr=1e-3", "optim.warmup_steps=5", "optim.weight_decay=0.1", "data.workers=1",
]
# recipe (e) with a SentencePiece vocabulary trained on the demo export itself (small: a few hundred
# captions cannot fill 65,536 pieces), to show the tokenizer tool and the SentencePiece path end to end.
DEMO_SPM_VOCAB = 512
DEMO_SPM_STEPS = 20
DEMO_SPM_ARGS = [
    "--recipe", str(REPO / "trainer" / "recipes" / "vit_b16_sentencepiece.yaml"),
    "--set", "model.tiny=true", "tokenizer.context_length=32", f"tokenizer.vocab_size={DEMO_SPM_VOCAB}",
    "train.global_batch=32", "train.accum=2", f"train.steps={DEMO_SPM_STEPS}", "train.log_every=10",
    "optim.lr=1e-3", "optim.warmup_steps=5", "optim.weight_decay=0.1", "data.workers=1",
]
# A fixed port keeps the demo's URL list identical from one `make demo` to the next.
DEMO_PORT = 8765
CAPTIONS_FILE = "captions.jsonl"

# mimetypes differs between systems (webp is missing on some); the corpus needs exactly these.
CONTENT_TYPES = {
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".png": "image/png",
    ".webp": "image/webp",
    ".gif": "image/gif",
    ".json": "application/json",
    ".jsonl": "application/jsonl",
    ".parquet": "application/vnd.apache.parquet",
    ".html": "text/html",
    ".txt": "text/plain; charset=utf-8",
}


def read_entries(root: str | Path = CORPUS) -> list[dict[str, Any]]:
    """The corpus entries (file, caption, kind, source, of), in URL-list order."""
    with open(Path(root) / CAPTIONS_FILE, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class _Handler(SimpleHTTPRequestHandler):
    # HTTP/1.1 keep-alive: downloaders reuse connections, as they would against a real host.
    protocol_version = "HTTP/1.1"
    # An idle keep-alive connection holds one of the bounded slots; give it back after a while.
    timeout = 30
    extensions_map = {**SimpleHTTPRequestHandler.extensions_map, **CONTENT_TYPES}

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("%s " + format, self.address_string(), *args)

    def list_directory(self, path):  # no directory listings: a folder URL is a 404, as on an image host
        self.send_error(404, "Not Found")
        return None


class _BoundedServer(ThreadingHTTPServer):
    """One thread per connection, at most ``max_connections`` at once; a new connection waits for a
    free slot (in the listen backlog) instead of growing threads without bound."""

    daemon_threads = True
    allow_reuse_address = True
    # socketserver's default backlog is 5: a client opening dozens of connections at once overflows
    # it, the kernel drops the SYNs and the client's TCP retransmit timer (1 s, 2 s, 4 s, ...) stalls
    # those connections for seconds. A real image host accepts far more.
    request_queue_size = 1024

    def __init__(self, addr, handler, max_connections: int):
        self._slots = threading.BoundedSemaphore(max_connections)
        super().__init__(addr, handler)

    def process_request(self, request, client_address):
        self._slots.acquire()
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class DemoServer:
    """Serve ``root`` over HTTP in a background thread.

    >>> with DemoServer("demo/corpus") as srv:
    ...     srv.base_url   # 'http://127.0.0.1:PORT'

    ``port=0`` picks a free port. Leaving the ``with`` block stops the server and closes its socket;
    connections still open are daemon threads and die with the process.
    """

    def __init__(
        self, root: str | Path = CORPUS, host: str = "127.0.0.1", port: int = 0, max_connections: int = 64
    ):
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise FileNotFoundError(f"demo server root {self.root} is not a directory")
        self.host = host
        self.port = port
        self.max_connections = max_connections
        self._server: _BoundedServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        if self._server is None:
            raise RuntimeError("DemoServer is not running")
        return f"http://{self.host}:{self.port}"

    def start(self) -> DemoServer:
        if self._server is not None:
            return self
        root = str(self.root)

        class Handler(_Handler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=root, **kwargs)

        self._server = _BoundedServer((self.host, self.port), Handler, self.max_connections)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="demo-http", daemon=True)
        self._thread.start()
        log.debug("serving %s at %s", self.root, self.base_url)  # callers print it with the URL list
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._server = None
        self._thread = None

    def __enter__(self) -> DemoServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def urls(base_url: str, root: str | Path = CORPUS, repeat: int = 1) -> tuple[list[str], list[str]]:
    """(urls, captions) of the corpus; copy r > 0 of each entry gets ``?copy=r`` so every URL is
    distinct while the server sends the same file."""
    if repeat < 1:
        raise ValueError("repeat must be >= 1")
    base = base_url.rstrip("/")
    entries = read_entries(root)
    out_urls: list[str] = []
    out_caps: list[str] = []
    for r in range(repeat):
        suffix = f"?copy={r}" if r else ""
        for e in entries:
            out_urls.append(f"{base}/{e['file']}{suffix}")
            out_caps.append(e["caption"])
    return out_urls, out_caps


def write_url_list(out_path: str | Path, base_url: str, repeat: int = 1, root: str | Path = CORPUS) -> int:
    """Write the corpus as a Parquet URL list (``url``, ``caption``) at ``out_path``; return its rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    u, c = urls(base_url, root, repeat)
    table = pa.table({schema.URL: pa.array(u, pa.string()), schema.CAPTION: pa.array(c, pa.string())})
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        try:
            if pq.read_table(out).equals(table):
                return table.num_rows  # unchanged: leave the file (and its mtime) alone
        except Exception:  # noqa: BLE001 - an unreadable old list is simply replaced
            pass
    tmp = out.with_name(out.name + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(out)
    return table.num_rows


def ensure_models(models: Path = DEMO_MODELS) -> None:
    """The demo's tiny random models (real architectures), built once; a killed build is redone."""
    from curate.testing import safety as tiny_safety
    from curate.testing import tiny_models, tiny_vlms

    for final, build in (
        (models / "clip", lambda d: tiny_models.write_tiny_clip(d)),
        (models / "vlm" / "blip", lambda d: tiny_vlms.build("blip", d)),
        # heads record the clip model by the name the pipeline gives it (its directory)
        (models / "heads", lambda d: tiny_safety.write_demo_heads(d, models / "clip", "demo-output/models/clip")),
        (models / "text_classifier", lambda d: tiny_safety.write_text_classifier(d)),
    ):
        if final.exists():
            continue
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        build(tmp)
        tmp.rename(final)
        print(f"built tiny demo model {final}", flush=True)


def ensure_safety_inputs(reference: Path = DEMO_REFERENCE, blocklists: Path = DEMO_BLOCKLISTS,
                         root: Path = CORPUS) -> None:
    """The demo's reference set for decontaminate and its pHash blocklist for safety (built once)."""
    from curate.phash import phash_bytes, to_hex
    from curate.testing.safety import write_reference_copies

    if not reference.exists():
        tmp = reference.with_name(reference.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        write_reference_copies(tmp, {f: (root / f).read_bytes() for f in DEMO_EVAL_FILES})
        tmp.rename(reference)
    phash_list = blocklists / "phash.txt"
    if not phash_list.exists():
        blocklists.mkdir(parents=True, exist_ok=True)
        (h,) = phash_bytes([(root / DEMO_BLOCKED_FILE).read_bytes()])
        phash_list.write_text(f"# known-bad images for the demo's safety step\n{to_hex(h)}\n")


def run_demo(args: argparse.Namespace) -> int:
    """``make demo``: models, the pipeline over the served corpus, a short training run, the report."""
    from curate.cli import main as curate_main
    from curate.config import load_pipeline

    started = time.time()
    ensure_models()
    ensure_safety_inputs()
    with _start(args.root, args.host, args.port) as srv:
        n = write_url_list(args.urls, srv.base_url, args.repeat, args.root)
        print(f"serving {srv.root} at {srv.base_url}; {n} urls in {args.urls}", flush=True)
        # --overwrite redoes only steps whose output was made with another config (an older curate's
        # demo-output); complete steps with this config are skipped, interrupted ones resume
        rc = curate_main(["run", args.pipeline, "--overwrite"])
    if rc:
        return rc
    pipe = load_pipeline(args.pipeline)
    export = Path(pipe.output) / pipe.stages[-1].dirname
    train_out = DEMO_OUT / "train"
    print(f"training a tiny CLIP on {export} (CPU, {DEMO_TRAIN_STEPS} steps) ...", flush=True)
    rc = subprocess.call([sys.executable, "-m", "trainer.train", "--data", str(export),
                          "--output", str(train_out), *DEMO_TRAIN_ARGS])
    if rc:
        print(f"training failed (exit {rc})", file=sys.stderr)
        return rc
    rc = train_sentencepiece_demo(export, DEMO_OUT)
    if rc:
        return rc
    report = DEMO_OUT / "report.html"
    if _report_is_current(export, report, DEMO_OUT / "report.json"):
        print(f"report: {report} is up to date (same datasets); not written again", flush=True)
    else:
        rc = curate_main(["report", str(export), "--out", str(report), "--json", str(DEMO_OUT / "report.json")])
        if rc:
            return rc
    metrics = _last_metrics(train_out / "metrics.jsonl")
    print("\n".join([
        "",
        f"demo finished in {time.time() - started:.0f} s",
        f"  datasets, one per stage:  {', '.join(str(Path(pipe.output) / s.dirname) for s in pipe.stages)}",
        f"  training shards:          {export}/shards (tars + .idx + sizes.json)",
        f"  trained model:            {train_out}/model  (metrics: {train_out}/metrics.jsonl{metrics})",
        f"  SentencePiece tokenizer:  {DEMO_OUT / 'tokenizer'} (trained on the export; recipe (e) trained with it"
        f" in {DEMO_OUT / 'train_spm'})",
        f"  report:                   {report}  (open it in any browser)",
        "  inspect a dataset:        .venv/bin/curate inspect " + str(export),
    ]), flush=True)
    return 0


def train_sentencepiece_demo(export: Path, out: Path) -> int:
    """A SentencePiece tokenizer trained on the export's captions, then recipe (e) trained with it."""
    tok = out / "tokenizer"
    print(f"training a SentencePiece tokenizer ({DEMO_SPM_VOCAB} pieces at most) on {export} ...", flush=True)
    rc = subprocess.call([sys.executable, "-m", "trainer.tokenizer", "--data", str(export), "--kind", "sentencepiece",
                          "--vocab-size", str(DEMO_SPM_VOCAB), "--out", str(tok)])
    if rc:
        print(f"tokenizer training failed (exit {rc})", file=sys.stderr)
        return rc
    print(f"training recipe (e) with it (CPU, {DEMO_SPM_STEPS} steps) ...", flush=True)
    rc = subprocess.call([sys.executable, "-m", "trainer.train", "--data", str(export), "--output",
                          str(out / "train_spm"), *DEMO_SPM_ARGS, f"tokenizer.name={tok / 'spm.model'}"])
    if rc:
        print(f"SentencePiece training failed (exit {rc})", file=sys.stderr)
    return rc


def _report_is_current(export: Path, html_path: Path, json_path: Path) -> bool:
    """A rerun of the demo whose datasets did not change keeps the report it already wrote."""
    from curate.dataset import Dataset
    from curate.report import fingerprint, lineage, up_to_date

    return json_path.exists() and up_to_date(str(html_path), fingerprint(lineage(Dataset(str(export)))))


def _last_metrics(path: Path) -> str:
    """'; first loss A, last loss B' from a trainer metrics log, for the closing summary."""
    if not path.exists():
        return ""
    losses = [r["loss"] for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]
    return f"; loss {losses[0]:.3f} -> {losses[-1]:.3f}" if losses else ""


def _start(root: str, host: str, port: int) -> DemoServer:
    """A started server on ``port``, or on a free port when that one is taken."""
    try:
        return DemoServer(root, host, port).start()
    except OSError as e:
        if port == 0:
            raise
        log.warning("port %d is taken (%s); serving on a free port instead", port, e)
        return DemoServer(root, host, 0).start()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m curate.demo", description="serve the demo corpus")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="serve the corpus over HTTP until interrupted")
    s.add_argument("--root", default=str(CORPUS))
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--urls", help="also write the URL list for this server to this Parquet file")
    s.add_argument("--repeat", type=int, default=1)
    u = sub.add_parser("urls", help="write the Parquet URL list for a server at --base-url")
    u.add_argument("out")
    u.add_argument("--base-url", required=True)
    u.add_argument("--root", default=str(CORPUS))
    u.add_argument("--repeat", type=int, default=1)
    r = sub.add_parser("run", help="serve the corpus while a command runs; exit with its status")
    r.add_argument("--root", default=str(CORPUS))
    r.add_argument("--host", default="127.0.0.1")
    r.add_argument("--port", type=int, default=DEMO_PORT, help="0: any free port")
    r.add_argument("--urls", default=str(DEMO_URLS), help="where to write the URL list for this server")
    r.add_argument("--repeat", type=int, default=1)
    r.add_argument("--pipeline", default=str(DEMO_PIPELINE), help="pipeline to run when no command is given")
    r.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...] instead of the pipeline")
    a = sub.add_parser("all", help="make demo: models, the demo pipeline, a short training run, the report")
    for flag, default in (("--root", str(CORPUS)), ("--host", "127.0.0.1"), ("--urls", str(DEMO_URLS)),
                          ("--pipeline", str(DEMO_PIPELINE))):
        a.add_argument(flag, default=default)
    a.add_argument("--port", type=int, default=DEMO_PORT)
    a.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.cmd == "run":
        command = args.command[1:] if args.command[:1] == ["--"] else args.command
        if not command and Path(args.pipeline).resolve() == DEMO_PIPELINE:
            ensure_models()
            ensure_safety_inputs()
        with _start(args.root, args.host, args.port) as srv:
            n = write_url_list(args.urls, srv.base_url, args.repeat, args.root)
            print(f"serving {srv.root} at {srv.base_url}; {n} urls in {args.urls}", flush=True)
            if command:
                return subprocess.call(command)
            from curate.cli import main as curate_main

            return curate_main(["run", args.pipeline])
    if args.cmd == "all":
        return run_demo(args)
    if args.cmd == "urls":
        n = write_url_list(args.out, args.base_url, args.repeat, args.root)
        print(f"wrote {n} urls to {args.out}")
        return 0
    with DemoServer(args.root, args.host, args.port) as srv:
        if args.urls:
            n = write_url_list(args.urls, srv.base_url, args.repeat, args.root)
            print(f"wrote {n} urls to {args.urls}")
        print(f"serving {srv.root} at {srv.base_url} (Ctrl-C to stop)", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
