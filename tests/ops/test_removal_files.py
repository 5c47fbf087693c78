"""Removal on small datasets written straight to disk (no Ray, no stage run): the tars, indexes,
Parquet files and manifests are built here with the dataset's own writer, and every outcome is
read back with tarfile, pyarrow and plain byte comparisons, never with the removal code itself.

A source dataset owns its tars (two samples' members per key: ``jpg`` and ``txt``); a Parquet-only
dataset made from it points into those tars, carries ``dup_of`` links, rejects and ``_plan`` tables.
"""

from __future__ import annotations

import getpass
import hashlib
import io
import json
import re
import tarfile
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate import removal, schema
from curate.config import fingerprint
from curate.dataset import Dataset, count_rows, make_key, new_attempt, set_failpoint
from curate.removal import RemovalError, Request, remove, resolve
from curate.wds import FIXED_MTIME, TarWriter


def _uid(name: str, n: int, i: int) -> str:
    return hashlib.md5(f"{name}/{n}/{i}".encode()).hexdigest()


def _image(n: int, i: int) -> bytes:
    # different lengths, so members end at different places inside their 512-byte blocks
    return hashlib.sha256(f"img{n}-{i}".encode()).digest() * (3 + 5 * i + n)


def _finish_dataset(ds: Dataset, base: dict) -> Dataset:
    m = ds.build_manifest({"shard_digits": 5, "removals": [], **base})
    ds.write_manifest(m)
    return Dataset(ds.url)


def make_source(root: Path, shards: int = 2, rows: int = 4, failed: int = 1, name: str = "src") -> Dataset:
    """``rows`` downloaded samples per shard (txt, jpg, json members) and ``failed`` rejected rows without
    bytes; URLs on a few hosts."""
    ds = Dataset(str(root / name))
    hosts = ["a.example.com", "Example.COM.", "notexample.com", "b.other.org"]
    for n in range(shards):
        attempt = new_attempt()
        cols: dict[str, list] = {c: [] for c in (schema.UID, schema.KEY, schema.URL, schema.SHA256, schema.CAPTION,
                                               schema.IMAGE_TAR, schema.IMAGE_OFFSET, schema.IMAGE_LENGTH)}
        with ds.open_tmp_tar(n, attempt) as f:
            w = TarWriter(f)
            for i in range(rows):
                key, data = make_key(n, i), _image(n, i)
                # three members, the image in the middle (as some tars order them)
                where = w.add(key, {"txt": f"caption {n} {i}", "jpg": data, "json": json.dumps({"i": "x" * (7 * i)})})
                for c, v in ((schema.UID, _uid(name, n, i)), (schema.KEY, key),
                             (schema.URL, f"http://{hosts[i % len(hosts)]}/{n}/{i}.jpg"),
                             (schema.SHA256, hashlib.sha256(data).hexdigest()), (schema.CAPTION, f"caption {n} {i}"),
                             (schema.IMAGE_TAR, ds.tar_url(n)), (schema.IMAGE_OFFSET, where["jpg"][0]),
                             (schema.IMAGE_LENGTH, where["jpg"][1])):
                    cols[c].append(v)
            w.close()
        kept = schema.conform(pa.table(cols))
        rej = schema.conform(pa.table({
            schema.UID: [_uid(name, n, 100 + j) for j in range(failed)],
            schema.KEY: [make_key(n, rows + j) for j in range(failed)],
            schema.URL: [f"http://dead.example.net/{n}/{j}" for j in range(failed)],
            schema.SHA256: pa.array([None] * failed, pa.string()),
            schema.CAPTION: ["gone"] * failed,
            schema.IMAGE_TAR: pa.array([None] * failed, pa.string()),
            schema.IMAGE_OFFSET: pa.array([None] * failed, pa.int64()),
            schema.IMAGE_LENGTH: pa.array([None] * failed, pa.int64()),
            schema.DROP_REASON: ["download:http_404"] * failed,
        }))
        stats = {**count_rows(kept, rej), "shard": ds.shard_name(n),
                 "tar_bytes": Path(ds.path("shards", f"{ds.shard_name(n)}.tar.tmp-{attempt}")).stat().st_size}
        ds.commit_shard(n, kept, rej, stats, attempt=attempt, tar_written=True, idx_text=w.index_text())
    return _finish_dataset(ds, {"stage": "download", "owns_images": True, "input": {"url": str(root / "urls.txt"),
                                                                                   "files": 1}})


def make_down(root: Path, src: Dataset, name: str = "down") -> Dataset:
    """A Parquet-only dataset made from ``src``: every other row rejected, ``dup_of`` naming the first
    row of the shard, a decision table under _plan/ (two row groups), a run record."""
    ds = Dataset(str(root / name))
    for n in src.shard_ids():
        t = src.read_shard(n)
        first = t.column(schema.UID)[0].as_py()
        dup = [None] + [first] * (t.num_rows - 1)
        t = t.append_column(schema.DUP_OF, pa.array(dup, pa.string()))
        odd = pa.array([i % 2 == 1 for i in range(t.num_rows)])
        kept = t.filter(pa.compute.invert(odd))
        rej = t.filter(odd).append_column(schema.DROP_REASON, pa.array(["dedup:duplicate"] * (t.num_rows // 2)))
        ds.commit_shard(n, schema.conform(kept), schema.conform(rej), {**count_rows(kept, rej), "shard": ds.shard_name(n)})
    plan = pa.table({schema.UID: [u for _, t in src.iter_shards() for u in t.column(schema.UID).to_pylist()]})
    plan = plan.append_column(schema.DUP_OF, pa.array([None] * plan.num_rows, pa.string()))
    ds.write_table(plan, "_plan", "dedup", "decisions.parquet", row_group_sizes=[3, plan.num_rows - 3])
    run = {"stage": "dedup", "input": {"url": src.url, "manifest": fingerprint(src.manifest())}}
    ds.write_json(run, "_plan", "run.json")
    return _finish_dataset(ds, {"stage": "dedup", "owns_images": False, "input": run["input"], "run": run})


def _members(path: str) -> dict[str, tuple[int, bytes]]:
    """name -> (data offset, bytes), as tarfile reads the tar."""
    out = {}
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            assert m.isfile(), m.name
            out[m.name] = (m.offset_data, tf.extractfile(m).read())
    return out


def _spans(path: str) -> dict[str, tuple[int, int]]:
    """key -> (first header offset, end of its last member's padded data), from tarfile."""
    out: dict[str, tuple[int, int]] = {}
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            key = m.name.split(".")[0]
            end = m.offset_data + -(-m.size // 512) * 512
            out[key] = (out.get(key, (m.offset, 0))[0], end)
    return out


def _rows(ds: Dataset, folder: str = "shards") -> dict[str, dict]:
    out = {}
    for p in sorted(Path(ds.root, folder).glob("*.parquet")):
        for r in pq.read_table(p).to_pylist():
            out[r[schema.UID]] = r
    return out


def _idx(path: str) -> list[str]:
    return Path(path).read_text().splitlines()


def _uids_of(ds: Dataset, n: int, folder: str = "shards") -> list[str]:
    return pq.read_table(Path(ds.root, folder, f"{n:05d}.parquet")).column(schema.UID).to_pylist()


@pytest.fixture(autouse=True)
def _no_fsync(monkeypatch):
    """fsync at commit is not what these tests check; without it they run twice as fast here."""
    monkeypatch.setenv("CURATE_DURABLE", "0")


@pytest.fixture
def src(tmp_path):
    return make_source(tmp_path)


# -- the request ----------------------------------------------------------------------------------
def test_request_files_strip_comments_and_lower_all_but_urls(tmp_path):
    (tmp_path / "u").write_text("  ABCdef \n# a comment\n\n   \nabcdef\n")
    (tmp_path / "url").write_text("http://Host/A.jpg\n#http://x/\n")
    (tmp_path / "d").write_text("Example.COM\n")
    (tmp_path / "s").write_text("FFEE\n")
    r = Request.from_files(uids=str(tmp_path / "u"), urls=str(tmp_path / "url"), domains=str(tmp_path / "d"),
                           sha256=str(tmp_path / "s"), reason="why", by="me")
    assert r.uids == {"abcdef"} and r.urls == {"http://Host/A.jpg"} and r.domains == {"example.com"}
    assert r.sha256 == {"ffee"} and (r.reason, r.by) == ("why", "me")
    assert r.size == 4 and r.kind == "uids"
    assert Request.from_files() == Request()
    assert Request().size == 0 and Request().kind == "none"
    assert Request(urls=frozenset({"a", "b"}), sha256=frozenset({"c"})).kind == "urls"
    assert Request(domains=frozenset({"a"}), sha256=frozenset({"c"})).kind == "domains"
    assert Request(sha256=frozenset({"c", "d"})).kind == "sha256"
    assert Request(sha256=frozenset({"c", "d"})).size == 2
    with pytest.raises(RemovalError, match="request file not found: .*missing"):
        Request.from_files(urls=str(tmp_path / "missing"))


def test_empty_request_and_incomplete_dataset_are_refused(tmp_path, src):
    with pytest.raises(RemovalError) as e:
        remove([src.url], Request())
    assert str(e.value) == "the removal request lists nothing"
    (tmp_path / "half").mkdir()
    with pytest.raises(RemovalError) as e:
        remove([src.url, str(tmp_path / "half")], Request(uids=frozenset({"x"})))
    assert str(e.value) == f"{tmp_path / 'half'} is not a complete curate dataset (no _manifest.json)"
    assert not src.exists("_plan", removal.JOURNAL)


def test_resolve_by_url_domain_and_sha256(src):
    rows = {**_rows(src), **_rows(src, "rejects")}
    by_url = {r[schema.URL]: u for u, r in rows.items()}

    def hits(**kw) -> set[str]:
        return resolve([src], Request(**{k: frozenset(v) for k, v in kw.items()}))

    assert hits(uids={"zz"}) == {"zz"}
    assert hits(urls={"http://a.example.com/1/0.jpg"}) == {by_url["http://a.example.com/1/0.jpg"]}
    # a rejected row (no bytes) is found too
    assert hits(urls={"http://dead.example.net/0/0"}) == {by_url["http://dead.example.net/0/0"]}
    # a domain names the host and its subdomains, case- and trailing-dot-blind, never a mere suffix
    want = {u for u, r in rows.items() if re.match(r"http://([a-z.]+\.)?example\.com\.?/", r[schema.URL].lower())}
    assert len(want) == 4 and hits(domains={"example.com"}) == want
    assert hits(domains={"com"}) == {u for u, r in rows.items() if ".com" in r[schema.URL].lower()}
    assert hits(domains={"a.example.com"}) == {u for u, r in rows.items() if "//a.example.com/" in r[schema.URL]}
    assert hits(domains={"ample.com"}) == set()
    assert hits(domains={"example.net", "other.org"}) == {u for u, r in rows.items()
                                                          if "example.net" in r[schema.URL] or "other.org" in r[schema.URL]}
    sha = next(r[schema.SHA256] for r in rows.values() if r[schema.SHA256])
    assert hits(sha256={sha}) == {u for u, r in rows.items() if r[schema.SHA256] == sha}
    assert hits(sha256={"0" * 64}) == set()
    # several kinds in one request: the union
    assert hits(uids={"zz"}, urls={"http://a.example.com/1/0.jpg"}, sha256={sha}) == (
        {"zz", by_url["http://a.example.com/1/0.jpg"]} | {u for u, r in rows.items() if r[schema.SHA256] == sha})


def test_resolve_reads_original_sha256_upper_case_and_skips_missing_columns(tmp_path):
    ds = Dataset(str(tmp_path / "t"))
    kept = pa.table({schema.UID: ["a", "b", "c", "d"],
                     schema.SHA256: ["AA", None, "cc", "dd"],
                     schema.ORIGINAL_SHA256: [None, "BB", "zz", None]})
    ds.commit_shard(0, kept, kept.slice(0, 0), {**count_rows(kept, None), "shard": "00000"})
    ds = _finish_dataset(ds, {"owns_images": False})
    assert resolve([ds], Request(sha256=frozenset({"aa", "bb"}))) == {"a", "b"}
    assert resolve([ds], Request(sha256=frozenset({"cc"}))) == {"c"}
    # no url column: url and domain requests match nothing
    assert resolve([ds], Request(urls=frozenset({"aa"}), domains=frozenset({"aa"}))) == set()


@pytest.mark.parametrize("url,host", [
    ("http://Ex.COM./a", "ex.com"), ("https://u:p@a.b.c:8080/x", "a.b.c"), ("", None), (None, None),
    ("no-scheme", None), ("http://[::1/", None), ("http://./", None), ("http://x..", "x"),
])
def test_host(url, host):
    assert removal._host(url) == host


@pytest.mark.parametrize("host,domains,hit", [
    ("a.b.c", {"c"}, True), ("a.b.c", {"b.c"}, True), ("a.b.c", {"a.b.c"}, True), ("a.b.c", {"x.a.b.c"}, False),
    ("ab.c", {"b.c"}, False), ("a.b.c", {"a.b"}, False), ("c", {"c"}, True), ("a.b.c", set(), False),
])
def test_domain_hit(host, domains, hit):
    assert removal._domain_hit(host, frozenset(domains)) is hit


# -- blanking a tar ---------------------------------------------------------------------------------
def _victim_check(src_before: dict, ds: Dataset, n: int, gone_keys: set[str]) -> None:
    """The shard's tar after the removal, against its bytes and members before (read by tarfile)."""
    path = ds.shard_path(n, "tar")
    old, new = src_before[path], Path(path).read_bytes()
    spans = _spans_bytes(old)
    want = {m: v for m, v in _members_bytes(old).items() if m.split(".")[0] not in gone_keys}
    assert _members(path) == want
    # every byte outside the blanked samples is where it was (pointers into the tar stay valid)
    kept_end = max((e for k, (s, e) in spans.items() if k not in gone_keys), default=0)
    for k, (s, e) in spans.items():
        if k not in gone_keys:
            assert new[s:e] == old[s:e], k
    assert new[kept_end:] == b"\0" * 1024
    assert len(new) == kept_end + 1024
    for k in gone_keys:
        s, e = spans[k]
        if e <= kept_end:  # one PAX global header whose record is a comment of zeros, over the whole sample
            info = tarfile.TarInfo.frombuf(new[s:s + 512], "utf-8", "surrogateescape")
            assert info.type == tarfile.XGLTYPE and info.size == e - s - 512
            assert re.fullmatch(rb"\d+ comment=0*\n", new[s + 512:e])
    for m, (_, data) in _members_bytes(old).items():
        if m.split(".")[0] in gone_keys:
            assert data not in new, m
    # the new DALI index: the old one without the removed samples' lines, the count rewritten
    return None


def _members_bytes(data: bytes) -> dict[str, tuple[int, bytes]]:
    out = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        for m in tf.getmembers():
            out[m.name] = (m.offset_data, tf.extractfile(m).read())
    return out


def _spans_bytes(data: bytes) -> dict[str, tuple[int, int]]:
    out: dict[str, tuple[int, int]] = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        for m in tf.getmembers():
            key = m.name.split(".")[0]
            out[key] = (out.get(key, (m.offset, 0))[0], m.offset_data + -(-m.size // 512) * 512)
    return out


def _tars(ds: Dataset) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(Path(ds.root, "shards").glob("*.tar"))}


def _check_idx(before: list[str], after_path: str, gone_keys: set[str]) -> None:
    keep = [ln for ln in before[1:] if not any(f" {k}." in ln for k in gone_keys)]
    assert _idx(after_path) == [f"{before[0].split()[0]} {len(keep)}", *keep]


@pytest.mark.parametrize("victims", [[(1, 1)], [(1, 0), (1, 2)], [(1, 3)], [(1, 2), (1, 3)], [(0, 0), (1, 1)]])
def test_blanked_members_leave_every_other_byte_in_place(src, victims):
    tars = _tars(src)
    idx = {n: _idx(src.shard_path(n, "idx")) for n in src.shard_ids()}
    rows_before = _rows(src)
    parquet0 = Path(src.shard_path(0, "parquet")).read_bytes()
    doomed = {_uids_of(src, n)[i] for n, i in victims}
    [res] = remove([src.url], Request(uids=frozenset(doomed), reason="test", by="tester"))
    ds = Dataset(src.url)
    for n in (0, 1):
        gone = {make_key(m, i) for m, i in victims if m == n}
        if gone:
            _victim_check(tars, ds, n, gone)
            _check_idx(idx[n], ds.shard_path(n, "idx"), gone)
            st = json.loads(Path(ds.shard_path(n, "stats.json")).read_text())
            assert st["removed"] == len(gone) and st["rows_out"] == 4 - len(gone) and st["rejected"] == 1
            assert st["rows_in"] == 5 - len(gone)
            assert st["tar_bytes"] == Path(ds.shard_path(n, "tar")).stat().st_size
        else:  # untouched shard: same files
            assert Path(ds.shard_path(n, "tar")).read_bytes() == tars[ds.shard_path(n, "tar")]
            assert Path(ds.shard_path(n, "parquet")).read_bytes() == parquet0
            assert "removed" not in json.loads(Path(ds.shard_path(n, "stats.json")).read_text())
    after = _rows(ds)
    assert after.keys() == rows_before.keys() - doomed
    assert all(after[u] == rows_before[u] for u in after)
    assert res["removed"] == res["removed_kept"] == len(doomed) and res["removed_rejected"] == 0
    assert res["tar_rewritten"] == len({n for n, _ in victims}) and res["bytes_remain_in"] == [] and res["note"] is None
    # the index and the Parquet pointers agree for every kept row
    for n in ds.shard_ids():
        offsets = {int(x) for ln in _idx(ds.shard_path(n, "idx"))[1:] for x in ln.split()[1::4]}
        assert set(pq.read_table(ds.shard_path(n, "parquet")).column(schema.IMAGE_OFFSET).to_pylist()) <= offsets
    m = ds.manifest()
    assert m["totals"]["kept"] == 8 - len(doomed) and m["totals"]["rows_in"] == 10 - len(doomed)
    assert json.loads(Path(ds.root, "shards", "sizes.json").read_text()) == {
        f"{n:05d}.tar": 4 - sum(1 for v, _ in victims if v == n) for n in (0, 1)}
    [rec] = m["removals"]
    assert rec["count"] == rec["kept_rows"] == len(doomed) and rec["rejected_rows"] == 0
    assert rec["tars_rewritten"] == sorted({ds.tar_url(n) for n, _ in victims})
    assert (rec["reason"], rec["by"], rec["request"]) == ("test", "tester", {"kind": "uids", "entries": len(doomed)})
    assert json.loads(Path(ds.root, "_plan", "removals.json").read_text()) == m["removals"]
    assert not list(Path(ds.root).rglob("*.tmp-*")) and not Path(ds.root, "_plan", removal.JOURNAL).exists()


def test_removing_every_sample_of_a_shard_leaves_an_empty_tar(src):
    doomed = set(_uids_of(src, 0))
    remove([src.url], Request(uids=frozenset(doomed)))
    ds = Dataset(src.url)
    assert Path(ds.shard_path(0, "tar")).read_bytes() == b"\0" * 1024
    assert _idx(ds.shard_path(0, "idx")) == [_idx(ds.shard_path(1, "idx"))[0].split()[0] + " 0"]
    assert _uids_of(ds, 0) == [] and len(_uids_of(ds, 0, "rejects")) == 1


def test_blank_region_is_skipped_by_tar_readers():
    for length in (1024, 1536, 4096, 512 * 41):
        region = removal._blank_region(length)
        assert len(region) == length
        after = io.BytesIO()
        w = TarWriter(after)
        w.add("k", {"txt": b"after"})
        w.close()
        data = region + after.getvalue()
        with tarfile.open(fileobj=io.BytesIO(data)) as tf:
            assert [(m.name, m.offset, tf.extractfile(m).read()) for m in tf.getmembers()] == [
                ("k.txt", length, b"after")]
        info = tarfile.TarInfo.frombuf(region[:512], "utf-8", "surrogateescape")
        assert info.type == tarfile.XGLTYPE and info.size == length - 512
        # fixed fields: the same removal gives the same bytes
        assert (info.name, info.mode, info.mtime, info.uname, info.gname) == (
            "pax_global_header", 0o644, FIXED_MTIME, "", "")
        body = region[512:]
        assert body.endswith(b"\n") and re.fullmatch(rb"(\d+) comment=0*\n", body)
        assert int(body.split()[0]) == len(body)


def test_removing_a_rejected_row_and_dup_of_links_downstream(tmp_path, src):
    down = make_down(tmp_path, src)
    rows_k, rows_r = _rows(down), _rows(down, "rejects")
    first = _uids_of(src, 1)[0]  # a representative: the other rows of shard 1 name it in dup_of
    rej_victim = _uids_of(down, 0, "rejects")[0]
    tars = _tars(src)
    results = remove([down.url, src.url], Request(uids=frozenset({first, rej_victim})))
    # the source goes first (lineage order), whatever order the command named them in
    assert [r["dataset"] for r in results] == [src.url, down.url]
    d = Dataset(down.url)
    after_k, after_r = _rows(d), _rows(d, "rejects")
    assert after_k.keys() == rows_k.keys() - {first} and after_r.keys() == rows_r.keys() - {rej_victim}
    for u, r in {**after_k, **after_r}.items():
        old = {**rows_k, **rows_r}[u]
        if old[schema.DUP_OF] == first:
            assert r == {**old, schema.DUP_OF: None}
        else:
            assert r == old
    assert sum(1 for u in {**rows_k, **rows_r} if {**rows_k, **rows_r}[u][schema.DUP_OF] == first) == 3
    # shard 0 of the downstream dataset lost only a rejected row (kept in the source: its bytes go)
    st0 = json.loads(Path(d.shard_path(0, "stats.json")).read_text())
    assert (st0["removed"], st0["rows_out"], st0["rejected"]) == (1, 2, 1)
    assert Dataset(src.url).manifest()["removals"][0]["tars_rewritten"] == [src.tar_url(0), src.tar_url(1)]
    _victim_check(tars, Dataset(src.url), 0, {make_key(0, 1)})
    rd = results[1]
    assert (rd["removed_kept"], rd["removed_rejected"], rd["removed"], rd["tar_rewritten"]) == (1, 1, 2, 0)
    # the decision table lost the row, kept its two row groups and cleared nothing else
    plan = Path(d.root, "_plan", "dedup", "decisions.parquet")
    t = pq.read_table(plan)
    assert first not in t.column(schema.UID).to_pylist() and rej_victim not in t.column(schema.UID).to_pylist()
    assert t.num_rows == 6 and pq.ParquetFile(plan).metadata.num_row_groups == 2
    sizes = [pq.ParquetFile(plan).metadata.row_group(g).num_rows for g in range(2)]
    assert sizes == [3 - 1, 5 - 1] and rd["plan_rows_removed"] == 2  # rej_victim in group 1, first in group 2
    rec = d.manifest()["removals"][0]
    assert (rec["count"], rec["kept_rows"], rec["rejected_rows"], rec["plan_rows_removed"]) == (2, 1, 1, 2)
    assert rec["tars_rewritten"] == [] and "bytes_remain_in" not in rec
    # the downstream manifest records its input's new fingerprint, the run record too
    new_fp = fingerprint(Dataset(src.url).manifest())
    run = {"stage": "dedup", "input": {"url": src.url, "manifest": new_fp}}
    assert d.manifest()["input"] == run["input"] and d.manifest()["run"] == run
    assert json.loads(Path(d.root, "_plan", "run.json").read_text()) == run
    assert d.manifest()["totals"] == {**d.manifest()["totals"], "kept": 3, "dropped": 3, "rows_in": 6}


def test_downstream_given_alone_names_the_tars_that_keep_the_bytes(tmp_path, src):
    down = make_down(tmp_path, src)
    (Path(down.root) / "_plan" / "notes.txt").write_text(f"see {_uids_of(src, 0)[0]}\n")
    (Path(down.root) / "_plan" / "other.log").write_text(f"see {_uids_of(src, 0)[0]}\n")
    victim = _uids_of(src, 0)[0]
    tars = _tars(src)
    [res] = remove([down.url], Request(uids=frozenset({victim})))
    assert res["bytes_remain_in"] == [src.tar_url(0)]
    assert res["note"].startswith("bytes of removed samples remain in 1 tar(s)") and src.tar_url(0) in res["note"]
    assert res["note"].endswith("uids still mentioned in _plan/notes.txt")
    rec = Dataset(down.url).manifest()["removals"][0]
    assert rec["bytes_remain_in"] == [src.tar_url(0)] and rec["uids_still_in"] == ["_plan/notes.txt"]
    assert "note" in rec
    assert _tars(src) == tars  # a dataset not given is never written
    # a request that matches nothing there: a record with a zero count, no note
    [res] = remove([down.url], Request(uids=frozenset({"f" * 32})))
    assert res["removed"] == 0 and res["note"] is None and res["bytes_remain_in"] == []
    assert [r["count"] for r in Dataset(down.url).manifest()["removals"]] == [1, 0]


def test_foreign_tars_skip_nulls_own_and_given_datasets():
    class Owner:
        url = "/data/src/"

    class OwnerX:
        url = "/data/upperX"

    t = pa.table({schema.IMAGE_TAR: ["/data/src/shards/0.tar", None, "/data/own.tar", "/data/srcx/1.tar",
                                     "/other/2.tar", "/other/2.tar", "/data/upperX/shards/0.tar"]})
    assert removal._foreign_tars(t, "/data/own.tar", {"/data/src": Owner(), "/data/upperX": OwnerX()}) == {
        "/data/srcx/1.tar", "/other/2.tar"}
    assert removal._foreign_tars(t, None, {}) == {"/data/src/shards/0.tar", "/data/own.tar", "/data/srcx/1.tar",
                                                  "/other/2.tar", "/data/upperX/shards/0.tar"}
    assert removal._foreign_tars(pa.table({"x": [1]}), None, {}) == set()


def test_imported_dataset_drops_index_lines_never_writes_adopted_tars(tmp_path, src):
    """An import's shard points into adopted tars and keeps its own index of them."""
    ds = Dataset(str(tmp_path / "imp"))
    t = src.read_shard(1)
    ext_tar = tmp_path / "external.tar"
    ext_tar.write_bytes(Path(src.shard_path(1, "tar")).read_bytes())
    t = t.set_column(t.column_names.index(schema.IMAGE_TAR), schema.IMAGE_TAR,
                     pa.array([str(ext_tar)] * t.num_rows, pa.string()))
    ds.commit_shard(0, schema.conform(t), schema.conform(t.slice(0, 0).append_column(
        schema.DROP_REASON, pa.array([], pa.string()))), {**count_rows(t, None), "shard": "00000"},
        idx_text=Path(src.shard_path(1, "idx")).read_text())
    imp = _finish_dataset(ds, {"stage": "import", "owns_images": False, "input": {"url": str(tmp_path), "files": 1}})
    before_idx = _idx(imp.shard_path(0, "idx"))
    ext = ext_tar.read_bytes()
    victim = t.column(schema.UID)[2].as_py()
    [res] = remove([imp.url], Request(uids=frozenset({victim})))
    assert ext_tar.read_bytes() == ext
    _check_idx(before_idx, imp.shard_path(0, "idx"), {make_key(1, 2)})
    assert res["bytes_remain_in"] == [str(ext_tar)] and res["tar_rewritten"] == 0
    # a rejected row only: the index stays as it is
    idx_now = Path(imp.shard_path(0, "idx")).read_bytes()
    assert removal._drop_from_index(imp, 0, pa.table({schema.UID: ["x"]})) is None
    assert removal._drop_from_index(imp, 0, pa.table({schema.IMAGE_OFFSET: pa.array([None, 3], pa.int64())})) is None
    assert Path(imp.shard_path(0, "idx")).read_bytes() == idx_now


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def _parquet_bytes(t: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(t, buf)
    return buf.getvalue()


@pytest.mark.parametrize("where", ["local", "memory"])
def test_npy_embeddings_lose_the_rows_in_step_with_their_metadata(where, tmp_path):
    """clip's clip-retrieval-style files: the arrays lose the rows, then the metadata; a rerun after a
    kill between them finishes without cutting an array twice."""
    ds = Dataset(str(tmp_path / "e") if where == "local" else f"memory://npy-{uuid.uuid4().hex}/e")

    def read(*parts: str) -> bytes:
        with ds.fs.open(ds.path(*parts), "rb") as f:
            return f.read()

    shard_uids = {n: [f"{n}u{i}" for i in range(4)] for n in (0, 1)}
    vectors = {}
    for n, uids in shard_uids.items():
        for folder, seed in (("img_emb", 1), ("text_emb", 2)):
            arr = np.random.default_rng(seed + n).standard_normal((len(uids), 4)).astype(np.float16)
            ds.write_bytes(_npy(arr), "embeddings", folder, f"{folder}_{n:05d}.npy")
            vectors.update({(folder, u): arr[i].tobytes() for i, u in enumerate(uids)})
        ds.write_bytes(_parquet_bytes(pa.table({schema.UID: uids})), "embeddings", "metadata", f"metadata_{n:05d}.parquet")
    ds.write_bytes(b"x", "embeddings", "metadata", "notes.txt")
    # sorts first: a metadata file without uids is passed over, the others still cleaned
    ds.write_bytes(_parquet_bytes(pa.table({"other": [1]})), "embeddings", "metadata", "metadata_0.parquet")
    victims = {shard_uids[0][2], shard_uids[1][1], shard_uids[1][3]}
    old_meta = read("embeddings", "metadata", "metadata_00001.parquet")
    old_text = read("embeddings", "text_emb", "text_emb_00001.npy")

    def check() -> None:
        for n, uids in shard_uids.items():
            left = [u for u in uids if u not in victims]
            meta = pq.read_table(io.BytesIO(read("embeddings", "metadata", f"metadata_{n:05d}.parquet")))
            assert meta.column(schema.UID).to_pylist() == left
            for folder in ("img_emb", "text_emb"):
                arr = np.load(io.BytesIO(read("embeddings", folder, f"{folder}_{n:05d}.npy")))
                assert [a.tobytes() for a in arr] == [vectors[(folder, u)] for u in left]

    assert removal._clean_npy_embeddings(ds, pa.array(sorted(victims))) == 3
    check()
    # again: nothing more goes
    assert removal._clean_npy_embeddings(ds, pa.array(sorted(victims))) == 0
    check()
    # killed after the image array was cut, before the text array and the metadata: finished, once
    ds.write_bytes(old_meta, "embeddings", "metadata", "metadata_00001.parquet")
    ds.write_bytes(old_text, "embeddings", "text_emb", "text_emb_00001.npy")
    assert removal._clean_npy_embeddings(ds, pa.array(sorted(victims))) == 2
    check()
    # an array whose length matches neither: refused, with the file named
    ds.write_bytes(_npy(np.zeros((7, 4), np.float16)), "embeddings", "img_emb", "img_emb_00000.npy")
    with pytest.raises(RemovalError, match=r"img_emb_00000\.npy has 7 rows but its metadata has 3"):
        removal._clean_npy_embeddings(ds, pa.array([shard_uids[0][0]]))
    # a missing array: the other is still cut
    ds.fs.rm(ds.path("embeddings", "img_emb", "img_emb_00000.npy"))
    assert removal._clean_npy_embeddings(ds, pa.array([shard_uids[0][0]])) == 1
    assert len(np.load(io.BytesIO(read("embeddings", "text_emb", "text_emb_00000.npy")))) == 2


def test_no_embeddings_or_plan_folder_is_nothing_to_do(tmp_path):
    ds = Dataset(str(tmp_path / "empty"))
    assert removal._clean_npy_embeddings(ds, pa.array(["a"])) == 0
    assert removal._clean_plan(ds, pa.array(["a"])) == 0
    assert removal._plan_rows(ds) == 0
    assert removal._plan_text_mentions(ds, {"a"}) == []
    assert removal._plan_text_mentions(ds, set()) == []


@pytest.mark.parametrize("where", ["local", "memory"])
def test_plan_tables_and_text_files(tmp_path, where):
    """Every Parquet table under _plan/ with uids loses the rows; one without uid or dup_of, or with
    nothing to change, is left as it is, whichever order the files are found in."""
    ds = Dataset(str(tmp_path / "p") if where == "local" else f"memory://plan-{uuid.uuid4().hex}/p")

    def read(*parts: str) -> pa.Table:
        return pq.read_table(ds.path(*parts), filesystem=ds.fs)

    def raw(*parts: str) -> bytes:
        with ds.fs.open(ds.path(*parts), "rb") as f:
            return f.read()

    ds.write_table(pa.table({"w": [1, 2]}), "_plan", "a.parquet")  # found first: no uid, no dup_of
    ds.write_table(pa.table({schema.UID: ["q", "r"]}), "_plan", "b.parquet")  # nothing to drop
    ds.write_table(pa.table({schema.UID: ["a", "b", "c"], "v": [1, 2, 3]}), "_plan", "x", "t.parquet")
    ds.write_table(pa.table({schema.DUP_OF: ["a", "z", None]}), "_plan", "y.parquet")
    ds.write_bytes(b"debris", "_plan", "x", "t.parquet.tmp-dead")
    for ext in ("json", "jsonl", "txt", "csv", "tsv", "log"):
        ds.write_bytes(b"has b inside", "_plan", f"f.{ext}")
    ds.write_bytes(b"b", "_plan", removal.JOURNAL)
    assert removal._plan_rows(ds) == 5
    assert sorted(removal._plan_text_mentions(ds, {"b", "q"})) == [f"_plan/f.{e}" for e in
                                                                   ("csv", "json", "jsonl", "tsv", "txt")]
    assert removal._plan_text_mentions(ds, {"nothing"}) == []
    a, b = raw("_plan", "a.parquet"), raw("_plan", "b.parquet")
    assert removal._clean_plan(ds, pa.array(["a"])) == 1
    assert read("_plan", "x", "t.parquet").to_pydict() == {schema.UID: ["b", "c"], "v": [2, 3]}
    assert read("_plan", "y.parquet").to_pydict() == {schema.DUP_OF: [None, "z", None]}
    assert (raw("_plan", "a.parquet"), raw("_plan", "b.parquet")) == (a, b)
    assert raw("_plan", "x", "t.parquet.tmp-dead") == b"debris"
    assert removal._plan_rows(ds) == 4
    before = {p: raw(posixpath_rel(ds, p)) for p in ds.fs.find(ds.path("_plan"))}
    steps: list = []
    set_failpoint(lambda op, path: steps.append((op, path)))
    try:
        assert removal._clean_plan(ds, pa.array(["a"])) == 0
    finally:
        set_failpoint(None)
    assert steps == []  # a table with nothing to change is not written again
    assert {p: raw(posixpath_rel(ds, p)) for p in ds.fs.find(ds.path("_plan"))} == before


def posixpath_rel(ds: Dataset, p: str) -> str:
    return p[len(ds.root.rstrip("/")) + 1:]


def test_plan_tables_keep_one_row_group_per_original_one(tmp_path):
    ds = Dataset(str(tmp_path / "p"))
    uids = [f"u{i}" for i in range(9)]
    ds.write_table(pa.table({schema.UID: uids}), "_plan", "d.parquet", row_group_sizes=[2, 3, 4])
    # the first group loses both rows, the second one, the third two
    assert removal._clean_plan(ds, pa.array(["u0", "u1", "u3", "u5", "u6"])) == 5
    f = pq.ParquetFile(ds.path("_plan", "d.parquet"))
    assert [f.metadata.row_group(g).num_rows for g in range(f.metadata.num_row_groups)] == [0, 2, 2]
    assert f.read().column(schema.UID).to_pylist() == ["u2", "u4", "u7", "u8"]


def test_dup_of_helpers():
    doomed = pa.array(["a"])
    t = pa.table({schema.UID: ["x", "y", "z"], schema.DUP_OF: ["a", None, "b"]})
    assert removal._mentions_dup(t, doomed) and not removal._mentions_dup(t, pa.array(["q"]))
    assert not removal._mentions_dup(pa.table({schema.UID: ["a"]}), doomed)
    out = removal._clear_dup_of(t, doomed)
    assert out.to_pydict() == {schema.UID: ["x", "y", "z"], schema.DUP_OF: [None, None, "b"]}
    assert out.schema == t.schema
    assert removal._clear_dup_of(t, pa.array(["q"])) is t


def test_lineage_order_puts_inputs_first(tmp_path, src):
    down = make_down(tmp_path, src)
    down2 = make_down(tmp_path, Dataset(down.url), name="down2")
    other = make_source(tmp_path, shards=1, name="other")
    order = removal._lineage_order([down2, other, down, src])
    assert [d.url for d in order] == [src.url, down.url, down2.url, other.url]
    assert [d.url for d in removal._lineage_order([down2, src])] == [down2.url, src.url]  # middle not given
    assert [d.url for d in removal._lineage_order([other, src])] == [other.url, src.url]


def test_dataset_without_keys_cannot_blank_its_tar(src):
    n = 0
    ds = Dataset(src.url)
    with pytest.raises(RemovalError, match="has no key column"):
        removal._blank_tar(ds, n, None, new_attempt())


def test_damaged_or_foreign_tars_are_refused(tmp_path, src):
    path = Path(src.shard_path(1, "tar"))
    data = path.read_bytes()
    path.write_bytes(data[:700])
    with pytest.raises(RemovalError, match="is damaged .* run `curate verify` first"):
        removal._blank_tar(src, 1, set(), new_attempt())
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        info = tarfile.TarInfo("00010000.jpg")
        info.size = 3
        tf.addfile(info, io.BytesIO(b"abc"))
        d = tarfile.TarInfo("adir")
        d.type = tarfile.DIRTYPE
        tf.addfile(d)
    path.write_bytes(buf.getvalue())
    with pytest.raises(RemovalError, match="member 'adir' is not a regular file"):
        removal._blank_tar(src, 1, set(), new_attempt())
    # nothing to blank: nothing staged
    path.write_bytes(data)
    keys = set(pq.read_table(src.shard_path(1, "parquet")).column(schema.KEY).to_pylist())
    assert removal._blank_tar(src, 1, keys, new_attempt()) == (None, None)
    assert not list(Path(src.root).rglob("*.tmp-*"))


def test_copy_refuses_a_short_read():
    dst = io.BytesIO()
    removal._copy(io.BytesIO(b"0123456789"), dst, 2, 5, "t")
    assert dst.getvalue() == b"23456"
    with pytest.raises(RemovalError, match=r"t: short read at 8"):
        removal._copy(io.BytesIO(b"0123456789"), io.BytesIO(), 8, 5, "t")


def test_copy_in_chunks(monkeypatch):
    monkeypatch.setattr(removal, "_COPY_CHUNK", 3)
    for start, length in ((4, 20), (4, 19), (0, 1), (7, 0)):
        dst = io.BytesIO()
        removal._copy(io.BytesIO(bytes(range(50))), dst, start, length, "t")
        assert dst.getvalue() == bytes(range(start, start + length))


# -- journal, rerun, records ------------------------------------------------------------------------
class Kill(BaseException):
    pass


def test_killed_mid_call_rerun_counts_once_and_records_once(tmp_path, src):
    down = make_down(tmp_path, src)
    victim = _uids_of(src, 1)[2]
    rows_src = _rows(src)
    seen: list[str] = []

    def kill_on_down_stats(op: str, path: str) -> None:
        seen.append(path)
        if op == "rename" and path.endswith(".stats.json") and path.startswith(down.root):
            raise Kill(path)

    set_failpoint(kill_on_down_stats)
    try:
        with pytest.raises(Kill):
            remove([src.url, down.url], Request(uids=frozenset({victim}), reason="first"))
    finally:
        set_failpoint(None)
    journal = json.loads(Path(down.root, "_plan", removal.JOURNAL).read_text())
    assert journal["before"]["kept"] == 4 and journal["before"]["rows_in"] == 8
    assert journal["request"]["reason"] == "first" and journal["request"]["by"] == getpass.getuser()
    s_journal = json.loads(Path(src.root, "_plan", removal.JOURNAL).read_text())
    assert s_journal["call"] == journal["call"]
    # the rerun finishes the interrupted shard rewrite first, and counts from the totals before the call
    results = remove([src.url, down.url], Request(uids=frozenset({victim}), reason="second"))
    assert not Path(down.root, "_plan", removal.JOURNAL).exists()
    assert not Path(src.root, "_plan", removal.JOURNAL).exists()
    for url in (src.url, down.url):
        d = Dataset(url)
        recs = d.manifest()["removals"]
        assert len(recs) == 1 and recs[0]["count"] == 1 and recs[0]["reason"] == "second"
        assert recs[0]["call"] == journal["call"]
        assert not list(Path(d.root).rglob("*.tmp-*")) and not list(Path(d.root).rglob("*.commit.json"))
    s = Dataset(src.url)
    assert s.manifest()["removals"][0]["tars_rewritten"] == [s.tar_url(1)]
    assert _rows(s).keys() == rows_src.keys() - {victim}
    assert json.loads(Path(s.shard_path(1, "stats.json")).read_text())["removed"] == 1
    d = Dataset(down.url)
    st = json.loads(Path(d.shard_path(1, "stats.json")).read_text())
    assert st["removed"] == 1 and st["rows_out"] + st["rejected"] == 3
    # this call's own work: the interrupted call had done it all (counted in the records above)
    assert [r["removed"] for r in results] == [0, 0]
    # a later, separate call adds its own record
    remove([src.url], Request(uids=frozenset({_uids_of(src, 0)[0]})))
    recs = Dataset(src.url).manifest()["removals"]
    assert [r["count"] for r in recs] == [1, 1] and recs[0]["call"] != recs[1]["call"]
    assert recs[1]["tars_rewritten"] == [Dataset(src.url).tar_url(0)]  # shard 1 was blanked by the first call
    assert json.loads(Path(Dataset(src.url).shard_path(1, "stats.json")).read_text())["removed"] == 1
    remove([src.url], Request(uids=frozenset({_uids_of(src, 1)[0]})))  # the shard's removed count adds up
    assert json.loads(Path(Dataset(src.url).shard_path(1, "stats.json")).read_text())["removed"] == 2
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", recs[1]["time"])


def test_elsewhere_is_journaled_before_the_shard_rewrite_lands(tmp_path, src):
    down = make_down(tmp_path, src)
    victim = _uids_of(src, 0)[0]

    def kill(op: str, path: str) -> None:
        if op == "rename" and path.endswith("00000.stats.json"):
            raise Kill(path)

    set_failpoint(kill)
    try:
        with pytest.raises(Kill):
            remove([down.url], Request(uids=frozenset({victim})))
    finally:
        set_failpoint(None)
    assert json.loads(Path(down.root, "_plan", removal.JOURNAL).read_text())["elsewhere"] == [src.tar_url(0)]
    [res] = remove([down.url], Request(uids=frozenset({victim})))
    assert res["bytes_remain_in"] == [src.tar_url(0)]
    recs = Dataset(down.url).manifest()["removals"]
    assert len(recs) == 1 and recs[0]["count"] == 1 and recs[0]["bytes_remain_in"] == [src.tar_url(0)]


def test_a_finished_dataset_on_rerun_adds_no_empty_record(tmp_path, src):
    down = make_down(tmp_path, src)
    victim = _uids_of(src, 1)[2]
    calls = [0]
    real = removal._remove_from

    def kill_second(ds, *a, **k):
        calls[0] += 1
        if calls[0] == 2:
            raise Kill("second dataset")
        return real(ds, *a, **k)

    removal._remove_from = kill_second
    try:
        with pytest.raises(Kill):
            remove([src.url, down.url], Request(uids=frozenset({victim})))
    finally:
        removal._remove_from = real
    assert Dataset(src.url).manifest()["removals"][0]["count"] == 1
    remove([src.url, down.url], Request(uids=frozenset({victim})))
    for url in (src.url, down.url):
        recs = Dataset(url).manifest()["removals"]
        assert [r["count"] for r in recs] == [1], url
        assert len({r["call"] for r in recs}) == 1
    # its plan rows counted once as well (the rerun found none left to remove)
    assert Dataset(down.url).manifest()["removals"][0]["plan_rows_removed"] == 1


def test_user_falls_back_when_the_login_is_unknown(monkeypatch):
    assert removal._user() == getpass.getuser()

    def fail():
        raise KeyError("uid 12345")

    monkeypatch.setattr(getpass, "getuser", fail)
    assert removal._user() == "unknown"
    monkeypatch.setattr(getpass, "getuser", lambda: (_ for _ in ()).throw(OSError("no tty")))
    assert removal._user() == "unknown"


# -- edge cases of the shard rewrite ------------------------------------------------------------------
def test_kept_and_rejected_victims_in_one_owned_shard(src):
    tars = _tars(src)
    victims = {_uids_of(src, 1)[1], _uids_of(src, 1, "rejects")[0]}
    [res] = remove([src.url], Request(uids=frozenset(victims)))
    ds = Dataset(src.url)
    _victim_check(tars, ds, 1, {make_key(1, 1)})
    st = json.loads(Path(ds.shard_path(1, "stats.json")).read_text())
    assert (st["removed"], st["rows_out"], st["rejected"], st["rows_in"]) == (2, 3, 0, 3)
    assert (res["removed_kept"], res["removed_rejected"], res["tar_rewritten"]) == (1, 1, 1)
    rec = ds.manifest()["removals"][0]
    assert (rec["count"], rec["kept_rows"], rec["rejected_rows"]) == (2, 1, 1)


def _parquet_only(root: Path, name: str, shards: list[dict], rejects: bool = True) -> Dataset:
    ds = Dataset(str(root / name))
    for n, cols in enumerate(shards):
        kept = schema.conform(pa.table(cols))
        rej = kept.slice(0, 0).append_column(schema.DROP_REASON, pa.array([], pa.string()))
        ds.commit_shard(n, kept, rej, {**count_rows(kept, None), "shard": ds.shard_name(n)})
        if not rejects:
            Path(ds.shard_path(n, "rejects.parquet")).unlink()
    return _finish_dataset(ds, {"stage": "x", "owns_images": False})


def test_a_shard_only_naming_a_removed_uid_in_dup_of_is_rewritten(tmp_path):
    ds = _parquet_only(tmp_path, "d", [{schema.UID: ["a", "b"], schema.DUP_OF: [None, None]},
                                       {schema.UID: ["c", "d"], schema.DUP_OF: ["a", "b"]}])
    [res] = remove([ds.url], Request(uids=frozenset({"a"})))
    assert pq.read_table(ds.shard_path(1, "parquet")).to_pydict() == {schema.UID: ["c", "d"], schema.DUP_OF: [None, "b"]}
    assert pq.read_table(ds.shard_path(0, "parquet")).to_pydict() == {schema.UID: ["b"], schema.DUP_OF: [None]}
    st1 = json.loads(Path(ds.shard_path(1, "stats.json")).read_text())
    assert "removed" not in st1 and st1["rows_out"] == 2
    assert json.loads(Path(ds.shard_path(0, "stats.json")).read_text())["removed"] == 1
    assert res["removed"] == 1


def test_a_shard_without_a_rejects_file(tmp_path):
    ds = _parquet_only(tmp_path, "d", [{schema.UID: ["a", "b", "c"]}], rejects=False)
    [res] = remove([ds.url], Request(uids=frozenset({"b"})))
    assert pq.read_table(ds.shard_path(0, "parquet")).to_pydict() == {schema.UID: ["a", "c"]}
    rej = pq.read_table(ds.shard_path(0, "rejects.parquet"))
    assert rej.num_rows == 0 and rej.column_names == [schema.UID]
    assert (res["removed_kept"], res["removed_rejected"]) == (1, 0)
    st = json.loads(Path(ds.shard_path(0, "stats.json")).read_text())
    assert (st["removed"], st["rows_out"], st["rejected"]) == (1, 2, 0)


def test_old_style_regular_members_are_blanked_too(tmp_path):
    """Type flag NUL (a regular file in old tars) counts as a regular member."""
    ds = Dataset(str(tmp_path / "d"))
    attempt = new_attempt()
    keys, uids, offs = [], [], []
    with ds.open_tmp_tar(0, attempt) as f:
        pos = 0
        for i in range(3):
            data = bytes([65 + i]) * (100 + i)
            info = tarfile.TarInfo(f"{make_key(0, i)}.jpg")
            info.size, info.type = len(data), tarfile.AREGTYPE
            head = info.tobuf(format=tarfile.USTAR_FORMAT)
            f.write(head + data + b"\0" * (-len(data) % 512))
            keys.append(make_key(0, i))
            uids.append(f"u{i}")
            offs.append(pos + 512)
            pos += 512 + len(data) + (-len(data) % 512)
        f.write(b"\0" * 1024)
    kept = pa.table({schema.UID: uids, schema.KEY: keys})
    ds.commit_shard(0, kept, kept.slice(0, 0), {**count_rows(kept, None), "shard": "00000"}, attempt=attempt,
                    tar_written=True)
    ds = _finish_dataset(ds, {"owns_images": True})
    before = Path(ds.shard_path(0, "tar")).read_bytes()
    remove([ds.url], Request(uids=frozenset({"u1"})))
    got = _members(ds.shard_path(0, "tar"))
    assert got == {f"{keys[i]}.jpg": (offs[i], bytes([65 + i]) * (100 + i)) for i in (0, 2)}
    assert len(Path(ds.shard_path(0, "tar")).read_bytes()) == len(before)
    assert _idx(ds.shard_path(0, "idx"))[1:] == [f"jpg {offs[i]} {100 + i} {keys[i]}.jpg" for i in (0, 2)]


def test_lineage_order_survives_a_cycle(tmp_path):
    a = _parquet_only(tmp_path, "a", [{schema.UID: ["x"]}])
    b = _parquet_only(tmp_path, "b", [{schema.UID: ["y"]}])
    for ds, other in ((a, b), (b, a)):
        m = json.loads(Path(ds.root, "_manifest.json").read_text())
        Path(ds.root, "_manifest.json").write_text(json.dumps({**m, "input": {"url": other.url}}))
    order = removal._lineage_order([Dataset(a.url), Dataset(b.url)])
    assert sorted(d.url for d in order) == sorted([a.url, b.url]) and len(order) == 2


def test_downstream_without_a_run_record_gets_its_input_fingerprint(tmp_path, src):
    down = make_down(tmp_path, src)
    Path(down.root, "_plan", "run.json").unlink()
    m = json.loads(Path(down.root, "_manifest.json").read_text())
    m.pop("run")
    Path(down.root, "_manifest.json").write_text(json.dumps(m))
    remove([src.url, down.url], Request(uids=frozenset({_uids_of(src, 0)[2]})))
    d = Dataset(down.url)
    fp = fingerprint(Dataset(src.url).manifest())
    assert d.manifest()["run"] == {"input": {"url": src.url, "manifest": fp}}
    assert d.manifest()["input"] == {"url": src.url, "manifest": fp}
    assert not Path(down.root, "_plan", "run.json").exists()


def test_notes_name_the_tars_and_the_plan_files_exactly(tmp_path, src):
    down = make_down(tmp_path, src)
    victim = _uids_of(src, 0)[0]
    (Path(down.root) / "_plan" / "a.txt").write_bytes(b"\xff\xfe " + victim.encode())
    (Path(down.root) / "_plan" / "b.csv").write_text(victim)
    [res] = remove([down.url], Request(uids=frozenset({victim})))
    assert res["note"] == ("bytes of removed samples remain in 1 tar(s) not rewritten here (adopted source tars or "
                           f"a dataset not given), e.g. {src.tar_url(0)}; uids still mentioned in _plan/a.txt, "
                           "_plan/b.csv")
    rec = Dataset(down.url).manifest()["removals"][0]
    assert rec["note"] == "these tars were not rewritten (adopted source tars or datasets not given)"
    assert sorted(res) == ["bytes_remain_in", "dataset", "note", "plan_rows_removed", "removed", "removed_kept",
                           "removed_rejected", "tar_rewritten"]
    only_text = make_source(tmp_path, shards=1, name="solo")
    (Path(only_text.root) / "_plan").mkdir(exist_ok=True)
    (Path(only_text.root) / "_plan" / "c.json").write_text(_uids_of(only_text, 0)[0])
    [res] = remove([only_text.url], Request(uids=frozenset({_uids_of(only_text, 0)[0]})))
    assert res["note"] == "uids still mentioned in _plan/c.json"


def test_killed_while_dropping_the_journals_rerun_adds_no_empty_record(tmp_path, src):
    down = make_down(tmp_path, src)
    victim = _uids_of(src, 1)[2]
    journal = str(Path(down.root, "_plan", removal.JOURNAL))

    def kill(op: str, path: str) -> None:
        if op == "delete" and path == journal:
            raise Kill(path)

    set_failpoint(kill)
    try:
        with pytest.raises(Kill):
            remove([src.url, down.url], Request(uids=frozenset({victim})))
    finally:
        set_failpoint(None)
    assert not Path(src.root, "_plan", removal.JOURNAL).exists() and Path(journal).exists()
    remove([src.url, down.url], Request(uids=frozenset({victim})))
    for url in (src.url, down.url):
        assert [r["count"] for r in Dataset(url).manifest()["removals"]] == [1], url


def test_a_request_that_names_nothing_changes_nothing(src):
    before = _listing_bytes(Path(src.root))
    [res] = remove([src.url], Request(urls=frozenset({"http://nowhere.invalid/x.jpg"})))
    assert res["removed"] == 0 and res["tar_rewritten"] == 0
    after = _listing_bytes(Path(src.root))
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert changed == {"_manifest.json", "_plan/removals.json"}


def _listing_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_embeddings_are_cleaned_by_a_removal(src):
    root = Path(src.root)
    uids = _uids_of(src, 0)
    for folder in ("img_emb", "text_emb"):
        (root / "embeddings" / folder).mkdir(parents=True)
        np.save(root / "embeddings" / folder / f"{folder}_00000.npy", np.arange(8, dtype=np.float32).reshape(4, 2))
    (root / "embeddings" / "metadata").mkdir()
    pq.write_table(pa.table({schema.UID: uids}), root / "embeddings" / "metadata" / "metadata_00000.parquet")
    remove([src.url], Request(uids=frozenset({uids[1]})))
    assert pq.read_table(root / "embeddings" / "metadata" / "metadata_00000.parquet").column(0).to_pylist() == [
        uids[0], uids[2], uids[3]]
    for folder in ("img_emb", "text_emb"):
        assert np.load(root / "embeddings" / folder / f"{folder}_00000.npy").tolist() == [[0, 1], [4, 5], [6, 7]]


def test_an_owned_tar_without_keys_is_refused_through_remove(tmp_path):
    ds = Dataset(str(tmp_path / "d"))
    attempt = new_attempt()
    with ds.open_tmp_tar(0, attempt) as f:
        w = TarWriter(f)
        w.add("k0", {"jpg": b"a" * 10})
        w.close()
    kept = pa.table({schema.UID: ["u0"]})
    ds.commit_shard(0, kept, kept.slice(0, 0), {**count_rows(kept, None), "shard": "00000"}, attempt=attempt,
                    tar_written=True)
    ds = _finish_dataset(ds, {"owns_images": True})
    with pytest.raises(RemovalError) as e:
        remove([ds.url], Request(uids=frozenset({"u0"})))
    assert str(e.value) == (f"{ds.url}: shard 00000 has no key column; cannot tell which tar members belong to "
                            "which row")


def test_an_owning_dataset_shard_without_a_tar(tmp_path, src):
    """A shard in which every download failed holds no tar: its rows go, nothing is blanked."""
    ds = Dataset(src.url)
    rej = pa.table({schema.UID: ["x1", "x2"], schema.DROP_REASON: ["download:http_404"] * 2})
    ds.commit_shard(2, rej.slice(0, 0).drop_columns([schema.DROP_REASON]), rej,
                    {**count_rows(rej.slice(0, 0), rej), "shard": "00002"})
    ds = _finish_dataset(Dataset(src.url), {"stage": "download", "owns_images": True})
    [res] = remove([ds.url], Request(uids=frozenset({"x1"})))
    assert res["removed_rejected"] == 1 and res["tar_rewritten"] == 0
    assert pq.read_table(ds.shard_path(2, "rejects.parquet")).column(schema.UID).to_pylist() == ["x2"]
    assert not Path(ds.shard_path(2, "tar")).exists()


def test_bytes_elsewhere_are_collected_over_shards_and_rejected_rows(tmp_path, src):
    down = make_down(tmp_path, src)
    victims = {_uids_of(down, 0)[0], _uids_of(down, 1, "rejects")[0]}
    [res] = remove([down.url], Request(uids=frozenset(victims)))
    assert res["bytes_remain_in"] == [src.tar_url(0), src.tar_url(1)]
    assert Dataset(down.url).manifest()["removals"][0]["bytes_remain_in"] == [src.tar_url(0), src.tar_url(1)]


def test_removed_uids_leave_the_altered_lists_of_stats_and_manifest(tmp_path):
    """export lists the rows whose bytes it changed (blurred faces) by uid in each shard's stats and
    in the manifest: a removed uid leaves both lists."""
    ds = Dataset(str(tmp_path / "d"))
    for n, (uids, altered) in enumerate(((["a", "b", "c"], ["a", "c"]), (["d", "e"], ["e"]))):
        kept = pa.table({schema.UID: uids})
        stats = {**count_rows(kept, None), "shard": ds.shard_name(n),
                 "altered": {"why": "blur_faces", "column": "face_blurred", "rows": len(altered), "uids": altered}}
        ds.commit_shard(n, kept, kept.slice(0, 0), stats)
    ds = _finish_dataset(ds, {"owns_images": False})
    assert ds.manifest()["altered"]["uids"] == ["a", "c", "e"]
    remove([ds.url], Request(uids=frozenset({"c", "e", "b"})))
    d = Dataset(ds.url)
    st0 = json.loads(Path(d.shard_path(0, "stats.json")).read_text())
    assert st0["altered"] == {"why": "blur_faces", "column": "face_blurred", "rows": 1, "uids": ["a"]}
    assert json.loads(Path(d.shard_path(1, "stats.json")).read_text())["altered"] is None
    assert d.manifest()["altered"] == {"why": "blur_faces", "column": "face_blurred", "rows": 1,
                                       "shards": {"00000": 1}, "uids": ["a"]}
    remove([ds.url], Request(uids=frozenset({"a"})))
    assert "altered" not in Dataset(ds.url).manifest()
    assert json.loads(Path(d.shard_path(0, "stats.json")).read_text())["altered"] is None
    text = "".join(p.read_text() for p in Path(ds.root).rglob("*.json"))
    assert not any(f'"{u}"' in text for u in "abce")


def test_record_times_are_utc_whatever_the_local_zone(monkeypatch):
    import datetime
    import time

    monkeypatch.setenv("TZ", "Asia/Kolkata")  # UTC+05:30, no daylight saving
    time.tzset()
    try:
        stamp = datetime.datetime.strptime(removal._now(), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc)
    finally:
        monkeypatch.undo()
        time.tzset()
    assert abs((datetime.datetime.now(datetime.timezone.utc) - stamp).total_seconds()) < 120


def test_resolve_over_an_empty_shard(tmp_path):
    ds = _parquet_only(tmp_path, "d", [{schema.UID: pa.array([], pa.string()), schema.URL: pa.array([], pa.string())},
                                       {schema.UID: ["a"], schema.URL: ["http://x.example/1"]}])
    assert resolve([ds], Request(domains=frozenset({"example"}))) == {"a"}
    assert resolve([ds], Request(domains=frozenset({"other"}), urls=frozenset({"http://x.example/1"}))) == {"a"}
