"""The bundled demo corpus and its HTTP server: real files, real sockets on 127.0.0.1."""

from __future__ import annotations

import hashlib
import io
import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pyarrow.parquet as pq
import pytest
from PIL import Image

from curate import schema
from curate.demo import CORPUS, DemoServer, read_entries, write_url_list


def fetch(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), b""


def test_corpus_is_real_and_described():
    manifest = json.loads((CORPUS / "manifest.json").read_text())
    entries = read_entries()
    assert len(entries) == manifest["entries"] >= 300
    kinds = {e["kind"] for e in entries}
    assert {
        "ok",
        "duplicate",
        "near_duplicate",
        "missing",
        "truncated",
        "html_as_image",
        "pixel_bomb",
    } <= kinds
    assert set(manifest["formats"]) >= {"png", "jpg", "webp"}
    total = sum(p.stat().st_size for p in (CORPUS / "images").iterdir())
    assert total < 10_000_000
    sizes = set()
    for e in entries:
        assert e["caption"].strip(), e
        if e["kind"] != "ok":
            continue
        with Image.open(CORPUS / e["file"]) as im:
            im.load()
            sizes.add(im.size)
            assert im.format.lower() in ("png", "jpeg", "webp")
    assert len(sizes) > 50  # several sizes, not one


def test_broken_entries_are_broken_and_duplicates_duplicate():
    entries = {e["file"]: e for e in read_entries()}
    by_kind = {}
    for e in entries.values():
        by_kind.setdefault(e["kind"], []).append(e)
    assert not (CORPUS / by_kind["missing"][0]["file"]).exists()
    with pytest.raises(OSError, match="truncated"):
        with Image.open(CORPUS / by_kind["truncated"][0]["file"]) as im:
            im.load()
    with pytest.raises(Image.UnidentifiedImageError):
        Image.open(CORPUS / by_kind["html_as_image"][0]["file"])
    bomb = CORPUS / by_kind["pixel_bomb"][0]["file"]
    assert bomb.stat().st_size < 200_000
    with pytest.raises(Image.DecompressionBombError):
        Image.open(bomb)
    for e in by_kind["duplicate"]:
        assert (CORPUS / e["file"]).read_bytes() == (CORPUS / e["of"]).read_bytes()
    for e in by_kind["near_duplicate"]:
        a, b = (CORPUS / e["file"]).read_bytes(), (CORPUS / e["of"]).read_bytes()
        assert a != b
        ta, tb = _thumb(a), _thumb(b)
        assert ta[0] <= tb[0]  # resized down or same size, never bigger
        diff = sum(abs(x - y) for x, y in zip(ta[1], tb[1], strict=True)) / len(ta[1])
        assert diff < 12, (e, diff)  # the same picture: mean grey-level difference of a few units


def _thumb(data: bytes) -> tuple[tuple[int, int], list[int]]:
    """(size, 16x16 grey pixels) with transparency flattened on white, as the JPEG copies are."""
    with Image.open(io.BytesIO(data)) as im:
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        grey = Image.alpha_composite(bg, rgba).convert("L").resize((16, 16), Image.Resampling.BOX)
        return im.size, list(grey.tobytes())


def test_server_serves_every_entry_with_its_content_type(tmp_path):
    entries = read_entries()
    with DemoServer(CORPUS) as srv:
        assert srv.base_url.startswith("http://127.0.0.1:")
        n = write_url_list(tmp_path / "urls.parquet", srv.base_url)
        table = pq.read_table(tmp_path / "urls.parquet")
        assert n == table.num_rows == len(entries)
        assert table.column_names == [schema.URL, schema.CAPTION]
        assert table.column(schema.CAPTION).to_pylist() == [e["caption"] for e in entries]

        def one(i):
            return fetch(table.column(schema.URL)[i].as_py())

        # several connections at once, as a downloader would make
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(one, range(n)))
    want_type = {"png": "image/png", "jpg": "image/jpeg", "webp": "image/webp"}
    for e, (status, ctype, body) in zip(entries, results, strict=True):
        if e["kind"] == "missing":
            assert status == 404
            continue
        assert status == 200, e
        assert ctype == want_type[e["file"].rsplit(".", 1)[1]], (e, ctype)
        assert hashlib.sha256(body).digest() == hashlib.sha256((CORPUS / e["file"]).read_bytes()).digest()
    html = next(r for e, r in zip(entries, results, strict=True) if e["kind"] == "html_as_image")
    assert html[1] == "image/jpeg" and html[2].lstrip().lower().startswith(b"<!doctype html")


def test_repeat_gives_distinct_urls_for_the_same_files(tmp_path):
    with DemoServer(CORPUS) as srv:
        n = write_url_list(tmp_path / "u.parquet", srv.base_url, repeat=3)
        urls = pq.read_table(tmp_path / "u.parquet").column(schema.URL).to_pylist()
        assert n == 3 * len(read_entries()) == len(set(urls))
        first = urls[0]
        copy = urls[len(urls) // 3]
        assert copy != first and copy.split("?")[0] == first
        assert fetch(copy)[2] == fetch(first)[2] != b""


def test_server_stops_cleanly_and_frees_its_port():
    with DemoServer(CORPUS) as srv:
        url = srv.base_url + "/" + read_entries()[0]["file"]
        assert fetch(url)[0] == 200
        port = srv.port
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=2)
    # the same port can be bound again at once
    with DemoServer(CORPUS, port=port) as again:
        assert fetch(url)[0] == 200
        assert again.port == port


def test_directory_listing_is_refused():
    with DemoServer(CORPUS) as srv:
        assert fetch(srv.base_url + "/images/")[0] == 404


def test_python_m_curate_demo_serve(tmp_path):
    """The manual server: starts, writes its URL list, serves, stops on SIGINT."""
    import os
    import signal
    import subprocess
    import sys

    out = tmp_path / "urls.parquet"
    proc = subprocess.Popen(
        [sys.executable, "-m", "curate.demo", "serve", "--port", "0", "--urls", str(out)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        lines = []
        while not any(line.startswith("serving") for line in lines):
            line = proc.stdout.readline()
            assert line, f"server exited early: {lines}"
            lines.append(line)
        urls = pq.read_table(out).column(schema.URL).to_pylist()
        ok = next(u for u, e in zip(urls, read_entries(), strict=True) if e["kind"] == "ok")
        status, _, body = fetch(ok)
        assert status == 200 and len(body) > 0
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0


def test_python_m_curate_demo_run_serves_while_a_command_runs(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "urls.parquet"
    script = (
        "import sys, urllib.request, pyarrow.parquet as pq; "
        f"u = pq.read_table({str(out)!r}).column('url')[0].as_py(); "
        "sys.exit(0 if urllib.request.urlopen(u, timeout=10).status == 200 else 3)"
    )
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "curate.demo",
            "run",
            "--port",
            "0",
            "--urls",
            str(out),
            "--",
            sys.executable,
            "-c",
            script,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    fail = subprocess.run(
        [
            sys.executable,
            "-m",
            "curate.demo",
            "run",
            "--port",
            "0",
            "--urls",
            str(tmp_path / "u2.parquet"),
            "--",
            sys.executable,
            "-c",
            "raise SystemExit(7)",
        ],
        capture_output=True,
        timeout=60,
    )
    assert fail.returncode == 7
