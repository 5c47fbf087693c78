"""Hostile inputs (issue 17): a dataset, a tar, a URL list and a cluster are untrusted.

One test per reproduced hole, its input built here, each asserting the safe outcome: a one-line error
(exit 2) or a per-row reject with its reason; bounded memory where memory was the attack, measured
(tracemalloc for Python allocations, the peak RSS of a fresh process for decoders' C allocations);
nothing written outside the output; no request to an address the guard refuses (hits counted on a
local HTTP server). Plus relocation (issue 22): a copied export verifies and re-exports.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import threading
import tracemalloc
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from curate import schema
from curate.cli import main
from curate.dataset import Dataset
from curate.testing.datasets import IMAGE, write_image_dataset, write_table_dataset

ROOT = Path(__file__).resolve().parents[2]
MiB = 1 << 20


# -- inputs built here ---------------------------------------------------------------------------
def jpeg(seed: int, size=(48, 40)) -> bytes:
    img = Image.new("RGB", size, (seed * 37 % 256, seed * 91 % 256, 120))
    for x in range(0, size[0], 6):
        for y in range(size[1]):
            img.putpixel((x, y), (seed % 256, 0, 0))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n%%EndComments\n"
       b"(/tmp/pwned) (w) file closefile\nshowpage\n%%EOF\n")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def grey_png(width: int, height: int) -> bytes:
    """A real, fully decodable greyscale PNG of width x height (all black), built row by row so that
    building it never holds the pixels."""
    comp = zlib.compressobj(9)
    row = b"\x00" * (width + 1)
    body = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", body) + _chunk(b"IEND", b"")


def ico_with_png(png: bytes, declared: int = 16) -> bytes:
    """An ICO whose directory declares a declared x declared icon and holds ``png`` as its image."""
    head = struct.pack("<HHH", 0, 1, 1)
    entry = struct.pack("<BBBBHHII", declared, declared, 0, 0, 1, 32, len(png), 6 + 16)
    return head + entry + png


def raw_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def import_direct(inp: Path, out: Path, **config) -> Dataset:
    """The import stage's plan and every shard in this process (the runner's own shard code, no Ray),
    and the manifest the runner writes."""
    from curate.runner import ShardEnv, execute_shard
    from curate.stage import PlanContext, RunOptions
    from curate.stages.import_ import ImportConfig, ImportStage
    from curate.testing.datasets import finish

    stage = ImportStage(ImportConfig(**config))
    stage.setup()
    ds = Dataset(str(out))
    ds.fs.makedirs(ds.root, exist_ok=True)
    ctx = PlanContext(input_path=str(inp), input=None, output=ds, plan_dir=ds.path("_plan"),
                      options=RunOptions(progress=False), map=lambda f, xs: [f(x) for x in xs])
    ids = stage.plan(ctx)
    env = ShardEnv("import", str(inp), ds.url, 5, RunOptions(progress=False))
    for n in ids:
        execute_shard(stage, n, env)
    ds.shard_digits = 5
    return finish(ds, "import", writes_images=False, input={"url": str(inp)})


def all_rows(ds: Dataset, rejects: bool = False) -> pa.Table:
    it = ds.iter_rejects() if rejects else ds.iter_shards()
    parts = [t for _, t in it]
    return pa.concat_tables(parts, promote_options="permissive") if parts else pa.table({})


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


class Hits:
    """A local HTTP server that counts every request (and can serve one body)."""

    def __init__(self, body: bytes = b""):
        self.count = 0
        self.body = body
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self, with_body: bool) -> None:
                outer.count += 1
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(outer.body)))
                self.end_headers()
                if with_body:
                    self.wfile.write(outer.body)

            def do_GET(self):  # noqa: N802
                self._answer(True)

            def do_HEAD(self):  # noqa: N802
                self._answer(False)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hits():
    servers = []

    def make(body: bytes = b"") -> Hits:
        servers.append(Hits(body))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def rss_growth_mib(code: str, setup: str = "") -> float:
    """Peak-RSS growth (MiB) of running ``code`` in a fresh Python, after ``setup`` (imports, inputs)
    has run: what a decoder allocates in C, which tracemalloc cannot see."""
    script = (f"import resource, sys\n{setup}\n"
              "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
              f"{code}\n"
              "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    lines = [x for x in err if x.startswith("curate: error:")]
    assert len(lines) == 1 and "Traceback" not in "\n".join(err), err
    return lines[0]


# -- 1. the cluster's job API ----------------------------------------------------------------------
def _ray_start_commands(path: Path) -> list[str]:
    text = path.read_text()
    if path.suffix == ".sh":
        return [text]
    cmds = []
    for doc in yaml.safe_load_all(text):
        stack = [doc]
        while stack:
            x = stack.pop()
            if isinstance(x, dict):
                stack.extend(x.values())
            elif isinstance(x, list):
                stack.extend(x)
            elif isinstance(x, str) and "ray start" in x:
                cmds.append(x)
    return cmds


def _env_token(doc) -> list[bool]:
    """For every container of a KubeRay manifest: whether its env sets RAY_AUTH_MODE=token."""
    out = []
    stack = [doc]
    while stack:
        x = stack.pop()
        if isinstance(x, dict):
            if "image" in x and "name" in x:
                env = {e.get("name"): e.get("value") for e in x.get("env") or [] if isinstance(e, dict)}
                out.append(env.get("RAY_AUTH_MODE") == "token")
            stack.extend(x.values())
        elif isinstance(x, list):
            stack.extend(x)
    return out


def test_01_every_cluster_manifest_requires_a_token_for_the_job_api():
    manifests = sorted((ROOT / "infra").rglob("*.yaml")) + sorted((ROOT / "infra").rglob("*.sh"))
    cluster = [p for p in manifests if "ray start" in p.read_text() or "kind: RayCluster" in p.read_text()
               or "kind: RayJob" in p.read_text()]
    assert {p.name for p in cluster} >= {"aws-cluster.yaml", "raycluster.yaml", "rayjob.yaml", "local-cluster.sh"}
    for path in cluster:
        text = path.read_text()
        if "private network:" in text.lower():  # the documented exception: a reason written down
            continue
        if path.suffix == ".sh":
            # the script exports the mode to every `ray start` it runs, and never turns it off
            assert "export RAY_AUTH_MODE=token" in text and "RAY_AUTH_MODE=disabled" not in text, path
            continue
        docs = [d for d in yaml.safe_load_all(text) if d]
        for d in docs:
            # a RayJob with rayClusterSpec starts a cluster; one with a clusterSelector uses an existing one
            spec = d.get("spec", {}) if d.get("kind") == "RayCluster" else \
                d.get("spec", {}).get("rayClusterSpec") if d.get("kind") == "RayJob" else None
            if not spec:
                continue
            # KubeRay's own token mode (the operator makes every Ray container use it), or each
            # container's environment
            flags = _env_token(spec)
            assert (spec.get("authOptions") or {}).get("mode") == "token" or (flags and all(flags)), \
                f"{path.name}: {d['metadata']['name']} starts Ray without token auth"
        for cmd in _ray_start_commands(path):
            assert "RAY_AUTH_MODE=token" in cmd, f"{path.name}: {cmd!r} starts Ray without token auth"
    aws = yaml.safe_load((ROOT / "infra" / "aws-cluster.yaml").read_text())
    assert "~/.ray/auth_token" in aws.get("file_mounts", {}), "the token must reach every node"
    head = " ".join(aws["head_start_ray_commands"])
    assert "--dashboard-host=0.0.0.0" not in head


# -- 2. a dataset's pointers -------------------------------------------------------------------------
def test_02_pointers_are_confined_to_the_lineage_and_verified(tmp_path, hits, ray_session):
    from curate.lineage import lineage
    from curate.report import build_report, render_html
    from curate.runner import run_stage

    secret = tmp_path / "home" / ".aws" / "credentials"
    secret.parent.mkdir(parents=True)
    secret.write_bytes(b"[default]\naws_secret_access_key=TOPSECRETKEY\n" + b"x" * 600)
    internal = hits(b"INTERNAL-BYTES" * 100)
    good = [jpeg(i) for i in range(4)]
    src = write_image_dataset(tmp_path / "src", [[
        {IMAGE: good[i], schema.IMAGE_FORMAT: "jpg", schema.UID: f"{i:032x}", schema.CAPTION: f"photo {i}"}
        for i in range(4)] + [
        # real tar member, real sha256, but PostScript: its "jpg" format column lies
        {IMAGE: EPS, schema.IMAGE_FORMAT: "jpg", schema.UID: f"{9:032x}", schema.CAPTION: "eps"}]])
    t = src.read_shard(0)
    rows = t.to_pylist()
    tar = rows[0][schema.IMAGE_TAR]
    bad = [dict(rows[0], **{schema.UID: "a" * 32, schema.IMAGE_TAR: str(secret), schema.IMAGE_OFFSET: 512,
                            schema.IMAGE_LENGTH: 40,
                            schema.SHA256: hashlib.sha256(secret.read_bytes()[512:552]).hexdigest()}),
           dict(rows[1], **{schema.UID: "b" * 32, schema.IMAGE_TAR: internal.url + "/x.tar"}),
           dict(rows[2], **{schema.UID: "c" * 32, schema.SHA256: None}),
           # inside the lineage's tar, but not on a member: the bytes of another member's header
           dict(rows[3], **{schema.UID: "d" * 32, schema.IMAGE_TAR: tar, schema.IMAGE_OFFSET: 512 * 3}),
           # inside the dataset's own folder, named like a tar, but a link to the credentials
           dict(rows[0], **{schema.UID: "e" * 32, schema.IMAGE_TAR: str(tmp_path / "hostile" / "shards" / "x.tar"),
                            schema.IMAGE_OFFSET: 512, schema.IMAGE_LENGTH: 40,
                            schema.SHA256: hashlib.sha256(secret.read_bytes()[512:552]).hexdigest()}),
           rows[3], rows[4]]
    hostile = write_table_dataset(tmp_path / "hostile", [pa.Table.from_pylist(bad, schema=t.schema)], "filter",
                                  input=src.url)
    (tmp_path / "hostile" / "shards" / "x.tar").symlink_to(secret)
    # a manifest whose input is an internal URL: the lineage must not follow it over the network
    m = hostile.manifest()
    hostile.write_json({**m, "input": {"url": internal.url + "/dataset"}}, "_manifest.json")
    hostile.refresh()
    assert [d.url for d in lineage(hostile).datasets] == [hostile.url]
    hostile.write_json(m, "_manifest.json")
    hostile.refresh()

    out = tmp_path / "export"
    summary = run_stage("export", hostile.url, str(out), config={"samples_per_shard": 10})
    got = all_rows(Dataset(str(out)))
    assert got.column(schema.UID).to_pylist() == [f"{3:032x}"]  # only the honest row
    rej = {r[schema.UID]: r[schema.DROP_REASON] for r in all_rows(Dataset(str(out)), True).to_pylist()}
    assert rej == {"a" * 32: "export:unreadable", "b" * 32: "export:unreadable", "c" * 32: "export:unreadable",
                   "d" * 32: "export:unreadable", "e" * 32: "export:unreadable",
                   f"{9:032x}": "export:unsupported_format"}
    assert summary["kept"] == 1
    written = b"".join(p.read_bytes() for p in files_under(out))
    assert b"TOPSECRETKEY" not in written and b"INTERNAL-BYTES" not in written and b"PS-Adobe" not in written
    page = render_html(build_report(hostile))
    assert "TOPSECRET" not in page
    assert internal.count == 0  # neither export, the lineage walk nor the report touched it


def test_02_a_tampered_location_never_leads_outside_the_dataset(tmp_path):
    from curate.lineage import Lineage

    ds = write_image_dataset(tmp_path / "ds", [[{IMAGE: jpeg(1), schema.IMAGE_FORMAT: "jpg",
                                                 schema.UID: "1" * 32, schema.CAPTION: "c"}]])
    sibling = tmp_path / "ds-other" / "shards"
    sibling.mkdir(parents=True)
    shutil.copy(ds.path("shards", "00000.tar"), sibling / "00000.tar")
    for location in ("/", str(tmp_path), "s3://elsewhere"):
        ds.write_json({**ds.manifest(), "location": location}, "_manifest.json")
        ds.refresh()
        lin = Lineage(ds)
        for pointer in (f"{location.rstrip('/')}/-other/shards/00000.tar", str(sibling / "00000.tar"),
                        "/etc/passwd.tar", "http://127.0.0.1:1/x.tar", f"{tmp_path}/ds/../ds-other/shards/00000.tar"):
            where = lin.locate(pointer)
            assert where is None or where.startswith(ds.url + "/"), (location, pointer, where)


# -- 3. formats beyond the web's ---------------------------------------------------------------------
def test_03_eps_disguised_as_jpg_is_refused_before_any_decoder(tmp_path, monkeypatch):
    from curate.images import ImageConfig, ImageRejected, open_image, process_image

    # a Ghostscript stand-in that leaves a mark when anything runs it
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    mark = tmp_path / "gs-ran"
    (bin_dir / "gs").write_text(f"#!/bin/sh\ntouch {mark}\nexit 1\n")
    (bin_dir / "gs").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    from PIL import EpsImagePlugin

    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None, raising=False)
    with pytest.raises(ImageRejected, match="accepted format"):
        open_image(EPS)
    got = process_image(EPS, ImageConfig())  # the download stage's per-image path
    assert got.status == "failed_to_decode" and "accepted format" in got.error and got.data is None
    (tmp_path / "in").mkdir()
    raw_tar(tmp_path / "in" / "a.tar", [("k.jpg", EPS), ("k.txt", b"a poster")])
    ds = import_direct(tmp_path / "in", tmp_path / "out")
    (r,) = all_rows(ds, rejects=True).to_pylist()
    assert r[schema.DROP_REASON] == "import:undecodable" and "accepted format" in r[schema.ERROR_MESSAGE]
    assert not mark.exists()
    # narrowing the list is a setting; EPS can never be named in it
    with pytest.raises(ValueError):
        ImageConfig(formats=("EPS",))


# -- 4. ICO with a big PNG inside ------------------------------------------------------------------
def test_04_ico_with_a_big_png_inside_costs_no_decode(tmp_path):
    ico = tmp_path / "icon.ico"
    ico.write_bytes(ico_with_png(grey_png(6000, 6000)))
    setup = (f"from curate.images import ImageConfig, process_image\n"
             f"from curate.stages.import_ import ImportConfig, _decode, _Reject\n"
             f"data = open({str(ico)!r}, 'rb').read()\n")
    code = ("r = process_image(data, ImageConfig(max_pixels=1_000_000))\n"
            "assert r.status == 'failed_to_decode' and 'accepted format' in r.error, r.error\n"
            "try:\n    _decode(data, ImportConfig(max_pixels=1_000_000), None)\n    sys.exit(3)\n"
            "except _Reject as e:\n    assert e.why == 'undecodable'\n")
    assert rss_growth_mib(code, setup) < 16  # decoding the PNG inside would take ~36-144 MiB


# -- 5. the report and rejected bombs -------------------------------------------------------------
def test_05_report_thumbnails_never_decode_a_bomb(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(grey_png(9000, 9000))  # 81 Mpx: a download cap of 100 Mpx lets it through
    setup = f"from curate.report import _thumb\ndata = open({str(bomb)!r}, 'rb').read()\n"
    code = "assert _thumb(data) is None\n"
    assert rss_growth_mib(code, setup) < 16  # a decode is 81 MiB, its RGB copy 243 MiB more
    # the same path still makes thumbnails of honest images
    small = tmp_path / "small.png"
    small.write_bytes(grey_png(300, 200))
    assert rss_growth_mib("assert _thumb(data) is not None\n",
                          f"from curate.report import _thumb\ndata = open({str(small)!r}, 'rb').read()\n") < 16


# -- 6. bad json members ---------------------------------------------------------------------------
def test_06_a_bad_json_member_rejects_its_row_not_the_import(tmp_path):
    (tmp_path / "in").mkdir()
    raw_tar(tmp_path / "in" / "a.tar", [
        ("deep.jpg", jpeg(1)), ("deep.txt", b"deep"), ("deep.json", b"[" * 100_000),
        ("big.jpg", jpeg(2)), ("big.txt", b"big int"), ("big.json", b'{"n": ' + b"9" * 5000 + b"}"),
        ("list.jpg", jpeg(3)), ("list.txt", b"a list"), ("list.json", b"[1, 2]"),
        ("ok.jpg", jpeg(4)), ("ok.txt", b"fine"), ("ok.json", b'{"source": "web"}'),
    ])
    ds = import_direct(tmp_path / "in", tmp_path / "out")
    kept = all_rows(ds).to_pylist()
    assert [r[schema.KEY] for r in kept] == ["ok"] and kept[0]["source"] == "web"
    rej = {r[schema.KEY]: (r[schema.DROP_REASON], r[schema.ERROR_MESSAGE]) for r in all_rows(ds, True).to_pylist()}
    assert set(rej) == {"deep", "big", "list"}
    assert all(reason == "import:bad_member" for reason, _ in rej.values())
    assert "RecursionError" in rej["deep"][1] and "ValueError" in rej["big"][1] and "not an object" in rej["list"][1]


# -- 7. huge members -------------------------------------------------------------------------------
def test_07_a_huge_caption_member_is_never_read(tmp_path):
    (tmp_path / "in").mkdir()
    huge = tmp_path / "in" / "a.tar"
    with tarfile.open(huge, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in (("k.jpg", jpeg(1)), ("ok.jpg", jpeg(2)), ("ok.txt", b"small")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("k.txt")
        info.size = 48 * MiB
        tf.addfile(info, io.BytesIO(b"word " * (info.size // 5) + b"x" * (info.size % 5)))
    tracemalloc.start()
    try:
        ds = import_direct(tmp_path / "in", tmp_path / "out")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * MiB, f"{peak / MiB:.1f} MiB"  # reading the caption alone would be 48 MiB
    rej = all_rows(ds, True).to_pylist()
    assert [(r[schema.KEY], r[schema.DROP_REASON]) for r in rej] == [("k", "import:bad_member")]
    assert "over the cap" in rej[0][schema.ERROR_MESSAGE]
    assert all_rows(ds).column(schema.CAPTION).to_pylist() == ["small"]


# -- 8. thousands of json keys ---------------------------------------------------------------------
def test_08_json_keys_become_columns_only_up_to_a_cap(tmp_path):
    (tmp_path / "in").mkdir()
    members = []
    for i in range(400):
        fields = {f"k{i}_{j}": j for j in range(20)}
        members += [(f"{i:04d}.jpg", jpeg(i % 7)), (f"{i:04d}.txt", f"c {i}".encode()),
                    (f"{i:04d}.json", json.dumps(fields).encode())]
    raw_tar(tmp_path / "in" / "a.tar", members)
    ds = import_direct(tmp_path / "in", tmp_path / "out", max_json_columns=32, compute_phash=False)
    t = all_rows(ds)
    assert t.num_rows == 400
    from_json = [c for c in t.column_names if re.fullmatch(r"k\d+_\d+", c)]
    assert len(from_json) == 32 and len(t.column_names) < 64  # not 8,000 columns
    last = json.loads(t.column("json_extra").to_pylist()[-1])
    assert last == {f"k399_{j}": j for j in range(20)}  # nothing dropped: the rest is kept as JSON text


# -- 9. wrong column types in an img2dataset parquet -----------------------------------------------
@pytest.mark.parametrize("captions, kept_captions, bad", [
    ([5, 6, 7], ["5", "6", "7"], 0),  # int64: numbers are text that reads as digits
    ([["a"], ["b"], ["c", "d"]], [], 3),  # a list is no caption: rejected per row
])
def test_09_a_wrong_caption_type_rejects_rows_not_the_shard(tmp_path, captions, kept_captions, bad):
    folder = tmp_path / "in"
    folder.mkdir()
    raw_tar(folder / "00000.tar", [(f"00000000{i}.jpg", jpeg(i)) for i in range(3)])
    pq.write_table(pa.table({"key": [f"00000000{i}" for i in range(3)], "caption": captions,
                             "url": [f"http://h/{i}" for i in range(3)],
                             "status": ["success"] * 3}), folder / "00000.parquet")
    ds = import_direct(folder, tmp_path / "out")
    kept = all_rows(ds)
    assert (sorted(kept.column(schema.CAPTION).to_pylist()) if kept.num_rows else []) == kept_captions
    rej = all_rows(ds, True).to_pylist()
    assert len(rej) == bad and all(r[schema.DROP_REASON] == "import:bad_member" for r in rej)
    assert all("not text" in r[schema.ERROR_MESSAGE] for r in rej)


def test_09_wrong_types_in_json_members_reject_rows_not_the_shard(tmp_path):
    (tmp_path / "in").mkdir()
    raw_tar(tmp_path / "in" / "a.tar", [
        ("a.jpg", jpeg(1)), ("a.txt", b"a"), ("a.json", b'{"url": ["http://h/1"], "uid": {"x": 1}}'),
        ("b.jpg", jpeg(2)), ("b.txt", b"b"), ("b.json", b'{"original_width": "wide", "error_message": [1]}'),
        ("c.jpg", jpeg(3)), ("c.txt", b"c"), ("c.json", b'{"url": 12345}'),
    ])
    ds = import_direct(tmp_path / "in", tmp_path / "out")
    kept = {r[schema.KEY]: r for r in all_rows(ds).to_pylist()}
    assert set(kept) == {"b", "c"}
    assert kept["b"][schema.ORIGINAL_WIDTH] == 48 and kept["c"][schema.URL] == "12345"
    (r,) = all_rows(ds, True).to_pylist()
    assert r[schema.KEY] == "a" and r[schema.DROP_REASON] == "import:bad_member" and "not text" in r[schema.ERROR_MESSAGE]


# -- 10. gzipped URL lists ---------------------------------------------------------------------------
def test_10_a_gzipped_url_list_cannot_inflate_without_bound(tmp_path, capsys, monkeypatch, ray_session):
    from curate import inputs
    from curate.inputs import InputError, read_url_list

    bomb = tmp_path / "urls.txt.gz"
    with gzip.open(bomb, "wb", compresslevel=9) as f:
        f.write(b"http://h/" + b"a" * (64 * MiB))  # one 64 MiB "URL": no newline anywhere
    assert bomb.stat().st_size < 200_000
    tracemalloc.start()
    try:
        with pytest.raises(InputError, match="longer than"):
            for _ in read_url_list(str(bomb)):
                pass
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * MiB, f"{peak / MiB:.1f} MiB"
    # and through the command: one line, exit 2
    rc = main(["download", "--input", str(bomb), "--output", str(tmp_path / "out")])
    assert rc == 2 and "longer than" in one_line_error(capsys)
    # many short lines that inflate past the cap
    monkeypatch.setattr(inputs, "MIN_INFLATED_CAP", 1 * MiB)
    lines = tmp_path / "lines.txt.gz"
    with gzip.open(lines, "wb", compresslevel=9) as f:
        f.write(b"http://h/x\n" * (4 * MiB // 11))
    with pytest.raises(InputError, match="inflates to more than"):
        for _ in read_url_list(str(lines)):
            pass


# -- 11. JSON rows with differing keys --------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["jsonl", "json"])
def test_11_json_url_lists_take_their_columns_from_every_row(tmp_path, fmt):
    from curate.inputs import read_url_list

    rows = [{"url": "http://h/0"}] + [{"url": f"http://h/{i}", "caption": f"cap {i}", "extra": i}
                                      for i in range(1, 5)] + [{"url": "http://h/5", "late": "only here"}]
    path = tmp_path / f"urls.{fmt}"
    path.write_text("\n".join(json.dumps(r) for r in rows) if fmt == "jsonl" else json.dumps(rows))
    t = pa.concat_tables(list(read_url_list(str(path))))
    assert t.column(schema.CAPTION).to_pylist() == [None, "cap 1", "cap 2", "cap 3", "cap 4", None]
    assert t.column("extra").to_pylist() == [None, 1, 2, 3, 4, None]
    assert t.column("late").to_pylist() == [None] * 5 + ["only here"]


# -- 12. curate's private names in an input -------------------------------------------------------
def test_12_an_input_column_with_a_reserved_name_is_refused(tmp_path, capsys, ray_session):
    path = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": ["http://h/0", "http://h/1"], "caption": ["a", "b"],
                             "__curate_retry_of": [0, 0]}), path)
    out = tmp_path / "out"
    rc = main(["download", "--input", str(path), "--output", str(out)])
    line = one_line_error(capsys)
    assert rc == 2 and "__curate_retry_of" in line and "reserved" in line
    assert not list(out.rglob("*.parquet"))


# -- 13. the report escapes what a manifest holds ---------------------------------------------------
def test_13_a_tampered_manifest_cannot_inject_markup(tmp_path):
    from curate.report import build_report, render_html

    ds = write_image_dataset(tmp_path / "ds", [[{IMAGE: jpeg(1), schema.IMAGE_FORMAT: "jpg",
                                                 schema.UID: "1" * 32, schema.CAPTION: "<b>cap</b>"}]])
    m = ds.manifest()
    evil = "<script>alert(1)</script>"
    m["stage"] = evil
    m["seconds"] = evil
    m["totals"].update({"rows_in": evil, "kept": evil, "dropped": evil, "drops": {evil: evil}})
    m["shards"] = evil
    m["removals"] = [{"count": evil}]
    ds.write_json(m, "_manifest.json")
    ds.refresh()
    page = render_html(build_report(ds))
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)" in page
    assert "<b>cap</b>" not in page


# -- 14. credentials in input URLs -------------------------------------------------------------------
def test_14_credentials_in_urls_are_never_recorded(tmp_path, hits, capsys, ray_session):
    from curate.config import ConfigError
    from curate.jobs import run_step

    server = hits(b"http://127.0.0.1:9/a.jpg\n")
    url = server.url.replace("http://", "http://alice:s3cretPW@") + "/urls.txt?X-Amz-Signature=SIGVALUE"
    out = tmp_path / "out"
    rc = main(["-v", "download", "--input", url, "--output", str(out), "--set", "fetch.retries=0"])
    err = capsys.readouterr().err
    assert rc == 0, err
    written = b"".join(p.read_bytes() for p in files_under(out))
    assert b"alice" in written  # the URL is recorded ...
    assert b"s3cretPW" not in written and b"SIGVALUE" not in written  # ... without its secrets
    assert "s3cretPW" not in err and "SIGVALUE" not in err
    # a cluster job's entrypoint is visible to whoever lists jobs: such a step is refused, not submitted
    with pytest.raises(ConfigError, match="credential"):
        run_step(None, ("download", url, str(tmp_path / "job-out"), None, ()), stream=io.StringIO())


# -- 15. --overwrite on a folder curate did not write ----------------------------------------------
def test_15_overwrite_never_deletes_a_folder_curate_did_not_write(tmp_path, capsys, ray_session):
    (tmp_path / "in").mkdir()
    raw_tar(tmp_path / "in" / "a.tar", [("k.jpg", jpeg(1)), ("k.txt", b"cap")])
    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "chapter1.tex").write_text("years of work")
    rc = main(["import", "--input", str(tmp_path / "in"), "--output", str(mine), "--overwrite"])
    line = one_line_error(capsys)
    assert rc == 2 and "not a curate dataset" in line
    assert files_under(mine) == {mine / "chapter1.tex"} and (mine / "chapter1.tex").read_text() == "years of work"


# -- relocation (issue 22) -----------------------------------------------------------------------------
def _export(src: str, out: str) -> Dataset:
    from curate.runner import run_stage

    run_stage("export", src, out, config={"samples_per_shard": 3})
    return Dataset(out)


def _bytes_by_uid(ds: Dataset) -> dict[str, bytes]:
    from curate.dataset import read_images

    t = all_rows(ds)
    return dict(zip(t.column(schema.UID).to_pylist(), read_images(t, ds), strict=True))


def test_a_copied_export_verifies_and_reexports(tmp_path, s3_bucket, capsys, ray_session):
    import fsspec

    src = write_image_dataset(tmp_path / "src", [[
        {IMAGE: jpeg(i), schema.IMAGE_FORMAT: "jpg", schema.UID: f"{i:032x}", schema.CAPTION: f"p {i}"}
        for i in range(n * 4, n * 4 + 4)] for n in range(2)])
    first = _export(src.url, str(tmp_path / "export"))
    want = _bytes_by_uid(first)
    assert len(want) == 8 and all(want.values())
    # to another folder; the original is gone, so nothing can be read from where it was written
    moved = tmp_path / "elsewhere" / "export-copy"
    shutil.copytree(first.root, moved)
    shutil.rmtree(first.root)
    assert main(["verify", str(moved)]) == 0, capsys.readouterr().err
    again = _export(str(moved), str(tmp_path / "re-export"))
    assert _bytes_by_uid(again) == want
    # a dataset written before locations were recorded still rebases from its own pointers
    old = Dataset(str(moved))
    m = old.manifest()
    del m["location"]
    old.write_json(m, "_manifest.json")
    assert main(["verify", str(moved)]) == 0, capsys.readouterr().err
    # to another bucket
    fs = fsspec.filesystem("s3")
    fs.put(str(moved), f"{s3_bucket}/copied/export", recursive=True)
    url = f"s3://{s3_bucket}/copied/export"
    assert main(["verify", url]) == 0, capsys.readouterr().err
    third = _export(url, f"s3://{s3_bucket}/re-export")
    assert _bytes_by_uid(third) == want
