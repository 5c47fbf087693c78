"""The dataset's file naming, commit protocol, debris sweeping and readers, checked from outside:
file listings, raw bytes and pyarrow's own view of the Parquet files."""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate import schema
from curate.dataset import (
    Dataset,
    DatasetError,
    digits_for,
    make_key,
    new_attempt,
    read_images,
    tmp_name,
    write_parquet,
)
from curate.wds import TarWriter


@pytest.fixture(autouse=True)
def _no_fsync(monkeypatch):
    """fsync at commit is not what these tests check; without it they run twice as fast here."""
    monkeypatch.setenv("CURATE_DURABLE", "0")


def _tables(rows: int, tag: str = "a") -> tuple[pa.Table, pa.Table]:
    kept = pa.table({schema.UID: [f"{tag}{i:031x}" for i in range(rows)], schema.CAPTION: [f"{tag} {i}" for i in range(rows)]})
    rej = pa.table({schema.UID: [f"{tag}{99:031x}"], schema.CAPTION: ["r"], schema.DROP_REASON: ["f:r"]})
    return kept, rej


def _stats(rows: int, tag: str = "a") -> dict:
    return {"rows_in": rows + 1, "rows_out": rows, "rejected": 1, "drops": {"f:r": 1}, "tag": tag}


def _listing(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_names():
    assert tmp_name("/d/shards/00001.parquet", "7-abc") == "/d/shards/00001.parquet.tmp-7-abc"
    a, b = tmp_name("/x/f.json"), tmp_name("/x/f.json")
    assert a != b and re.fullmatch(r"/x/f\.json\.tmp-[0-9a-f]{12}", a) and re.fullmatch(r"/x/f\.json\.tmp-[0-9a-f]{12}", b)
    assert re.fullmatch(r"\d+-[0-9a-f]{8}", new_attempt())
    assert make_key(0, 0) == "000000000"
    assert make_key(7, 12, 2) == "070012"
    assert make_key(7, 12, index_digits=2) == "0000712"
    assert make_key(7, 12, 5, 4) == "000070012"
    assert [digits_for(c, 5) for c in (0, 1, 2, 10, 99_999, 100_000, 100_001, 1_000_001)] == [5, 5, 5, 5, 5, 5, 6, 7]
    assert [digits_for(c, 1) for c in (0, 1, 9, 10, 11, 101)] == [1, 1, 1, 1, 2, 3]
    assert digits_for(-3, 2) == 2


def test_shard_names_and_paths(tmp_path):
    ds = Dataset(str(tmp_path / "d"))
    root = str(tmp_path / "d")
    assert ds.shard_name(3) == "00003" and ds.shard_name(123456) == "123456"
    assert ds.shard_path(3, "parquet") == f"{root}/shards/00003.parquet"
    assert ds.shard_path(3, "rejects.parquet") == f"{root}/rejects/00003.parquet"
    assert ds.shard_path(3, "tar") == f"{root}/shards/00003.tar"
    assert ds.shard_path(3, "stats.json") == f"{root}/shards/00003.stats.json"
    ds.shard_digits = 7
    assert ds.shard_name(3) == "0000003" and ds.shard_path(3, "idx") == f"{root}/shards/0000003.idx"
    # read from the plan where there is no manifest yet
    ds2 = Dataset(str(tmp_path / "e"))
    ds2.write_json({"shard_digits": 6}, "_plan", "plan.json")
    assert ds2.shard_name(4) == "000004"


def test_write_bytes_lands_whole_under_its_name_and_leaves_no_temp(tmp_path):
    ds = Dataset(str(tmp_path / "d"))
    ds.write_bytes(b"first", "a", "b.bin")
    ds.write_bytes(b"second", "a", "b.bin")
    assert _listing(tmp_path / "d") == {"a/b.bin": b"second"}
    ds.write_json({"b": 1, "a": [2]}, "x.json")
    assert json.loads((tmp_path / "d" / "x.json").read_bytes()) == {"a": [2], "b": 1}


@pytest.mark.parametrize("where", ["local", "memory"])
def test_rename_moves_and_a_missing_source_raises(tmp_path, where):
    ds = Dataset(str(tmp_path / "d") if where == "local" else f"memory://rename-{uuid.uuid4().hex}/d")
    ds.write_bytes(b"old", "dst")
    ds.write_bytes(b"new", "src")
    ds.rename(ds.path("src"), ds.path("dst"))
    assert not ds.fs.exists(ds.path("src"))
    with ds.fs.open(ds.path("dst"), "rb") as f:
        assert f.read() == b"new"
    with pytest.raises(FileNotFoundError):
        ds.rename(ds.path("src"), ds.path("other"))
    assert not ds.fs.exists(ds.path("other"))
    # the listing is fresh after a rename (no stale cache on object stores)
    assert sorted(p.rsplit("/", 1)[1] for p in ds.fs.ls(ds.root, detail=False)) == ["dst"]


def test_shard_ids_are_the_committed_stats_files(tmp_path):
    ds = Dataset(str(tmp_path / "d"))
    assert ds.shard_ids() == []
    shards = tmp_path / "d" / "shards"
    shards.mkdir(parents=True)
    for name in ("00010.stats.json", "00002.stats.json", "00011.stats.json.tmp-1-ab", "00003.parquet", "sizes.json",
                 "abcde.stats.json", "00004.commit.json", "00005.stats.jsonx", "00012stats.json"):
        (shards / name).write_text("{}")
    (tmp_path / "d" / "rejects").mkdir()
    (tmp_path / "d" / "rejects" / "00007.stats.json").write_text("{}")
    assert ds.shard_ids() == [2, 10]
    assert [n for n, _ in []] == []


def test_commit_publishes_every_file_and_returns_its_stats(tmp_path):
    ds = Dataset(str(tmp_path / "d"))
    attempt = new_attempt()
    with ds.open_tmp_tar(1, attempt) as f:
        f.write(b"T" * 1024)
    kept, rej = _tables(3)
    out = ds.commit_shard(1, kept, rej, _stats(3), attempt=attempt, tar_written=True, idx_text="v1.2 0\n")
    assert out == _stats(3)
    files = _listing(tmp_path / "d")
    assert sorted(files) == ["rejects/00001.parquet", "shards/00001.idx", "shards/00001.parquet",
                             "shards/00001.stats.json", "shards/00001.tar"]
    assert files["shards/00001.tar"] == b"T" * 1024 and files["shards/00001.idx"] == b"v1.2 0\n"
    assert json.loads(files["shards/00001.stats.json"]) == _stats(3)
    assert pq.read_table(tmp_path / "d" / "shards" / "00001.parquet").equals(kept)
    assert pq.read_table(tmp_path / "d" / "rejects" / "00001.parquet").equals(rej)
    # without a tar and an index: only the Parquet files and the marker
    ds.commit_shard(2, kept, rej, _stats(3))
    assert {k for k in _listing(tmp_path / "d") if "00002" in k} == {
        "rejects/00002.parquet", "shards/00002.parquet", "shards/00002.stats.json"}


def test_a_second_attempt_at_a_committed_shard_changes_nothing(tmp_path):
    ds = Dataset(str(tmp_path / "d"))
    kept, rej = _tables(3)
    ds.commit_shard(0, kept, rej, _stats(3))
    before = _listing(tmp_path / "d")
    late = Dataset(str(tmp_path / "d"))
    attempt = new_attempt()
    with late.open_tmp_tar(0, attempt) as f:
        f.write(b"zombie")
    k2, r2 = _tables(5, "b")
    out = late.commit_shard(0, k2, r2, _stats(5, "b"), attempt=attempt, tar_written=True, idx_text="x")
    assert out == _stats(3)  # the committed shard's stats
    assert _listing(tmp_path / "d") == before  # its own staged files are gone too


def test_a_claim_whose_files_are_gone_is_taken_over(tmp_path):
    ds = Dataset(str(tmp_path / "d"))
    (tmp_path / "d" / "shards").mkdir(parents=True)
    (tmp_path / "d" / "shards" / "00000.commit.json").write_text(json.dumps({"attempt": "dead", "files": ["parquet"]}))
    kept, rej = _tables(2)
    assert ds.commit_shard(0, kept, rej, _stats(2)) == _stats(2)
    assert sorted(_listing(tmp_path / "d")) == ["rejects/00000.parquet", "shards/00000.parquet",
                                                 "shards/00000.stats.json"]
    assert pq.read_table(tmp_path / "d" / "shards" / "00000.parquet").equals(kept)


def test_a_decided_claim_of_another_attempt_is_finished_not_replaced(tmp_path):
    """Another attempt staged every file and published its record, then died: a new attempt
    finishes that commit and discards its own files."""
    ds = Dataset(str(tmp_path / "d"))
    kept, rej = _tables(2)
    first = new_attempt()
    exts = ds._stage(0, kept, rej, _stats(2), first, False, None)
    ds.write_json({"attempt": first, "files": exts}, "shards", "00000.commit.json")
    k2, r2 = _tables(4, "b")
    assert ds.commit_shard(0, k2, r2, _stats(4, "b")) == _stats(2)
    assert pq.read_table(tmp_path / "d" / "shards" / "00000.parquet").equals(kept)
    assert sorted(_listing(tmp_path / "d")) == ["rejects/00000.parquet", "shards/00000.parquet",
                                                 "shards/00000.stats.json"]


def test_clear_shard_removes_only_that_shards_debris(tmp_path):
    ds = Dataset(str(tmp_path / "d"))
    kept, rej = _tables(2)
    ds.commit_shard(1, kept, rej, _stats(2))
    shards, rejects = tmp_path / "d" / "shards", tmp_path / "d" / "rejects"
    debris = ["shards/00010.parquet.tmp-x", "shards/00010.tar", "rejects/00010.parquet", "shards/00010.idx.tmp-y"]
    others = ["shards/00100.parquet.tmp-x", "shards/000100.tar", "shards/sizes.json", "rejects/00011.parquet"]
    for rel in debris + others:
        (tmp_path / "d" / rel).write_bytes(b"x")
    before = _listing(tmp_path / "d")
    ds.clear_shard(10)
    assert _listing(tmp_path / "d") == {k: v for k, v in before.items() if k not in debris}
    with pytest.raises(DatasetError, match="refusing to clear committed shard 00001"):
        ds.clear_shard(1)
    assert _listing(tmp_path / "d") == {k: v for k, v in before.items() if k not in debris}
    assert shards.exists() and rejects.exists()
    Dataset(str(tmp_path / "none")).clear_shard(0)  # nothing there: nothing to do


def test_clear_shard_finishes_a_decided_commit(tmp_path):
    ds = Dataset(str(tmp_path / "d"))
    kept, rej = _tables(2)
    attempt = new_attempt()
    exts = ds._stage(4, kept, rej, _stats(2), attempt, False, None)
    ds.write_json({"attempt": attempt, "files": exts}, "shards", "00004.commit.json")
    ds.clear_shard(4)
    assert ds.shard_ids() == [4] and pq.read_table(ds.shard_path(4, "parquet")).equals(kept)
    assert sorted(_listing(tmp_path / "d")) == ["rejects/00004.parquet", "shards/00004.parquet",
                                                 "shards/00004.stats.json"]


def test_sweep_tmp_removes_every_temp_file_after_finishing_decided_commits(tmp_path):
    ds = Dataset(str(tmp_path / "d"))
    assert Dataset(str(tmp_path / "missing")).sweep_tmp() == 0
    kept, rej = _tables(2)
    ds.commit_shard(0, kept, rej, _stats(2))
    attempt = new_attempt()
    exts = ds._stage(3, kept, rej, _stats(2), attempt, False, None)
    ds.write_json({"attempt": attempt, "files": exts}, "shards", "00003.commit.json")
    for rel in ("shards/00009.parquet.tmp-zz", "_plan/x/t.parquet.tmp-1-2", "a.json.tmp-q", "rejects/00009.parquet.tmp-9"):
        (tmp_path / "d" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "d" / rel).write_bytes(b"x")
    (tmp_path / "d" / "keep.tmp").write_bytes(b"y")
    (tmp_path / "d" / "tmp-keep").write_bytes(b"y")
    assert ds.sweep_tmp() == 4
    assert sorted(_listing(tmp_path / "d")) == [
        "keep.tmp", "rejects/00000.parquet", "rejects/00003.parquet", "shards/00000.parquet",
        "shards/00000.stats.json", "shards/00003.parquet", "shards/00003.stats.json", "tmp-keep"]
    assert ds.sweep_tmp() == 0


def test_read_selects_present_columns_in_the_asked_order(tmp_path):
    ds = Dataset(str(tmp_path / "d"))
    kept, rej = _tables(3)
    ds.commit_shard(0, kept, rej, _stats(3))
    assert ds.read_shard(0).equals(kept)
    t = ds.read_shard(0, [schema.CAPTION, "absent", schema.UID])
    assert t.column_names == [schema.CAPTION, schema.UID] and t.num_rows == 3
    assert ds.read_shard(0, []).num_columns == 0
    assert ds.read_rejects(0, [schema.DROP_REASON]).column(0).to_pylist() == ["f:r"]
    assert ds.read_table("rejects", "00000.parquet").equals(rej)


def test_write_parquet_fixed_options(tmp_path):
    t = pa.table({"a": list(range(50)), "b": [f"s{i}" for i in range(50)]})
    fs = fsspec.filesystem("file")
    write_parquet(t, str(tmp_path / "x.parquet"), fs)
    write_parquet(t, str(tmp_path / "y.parquet"), fs)
    assert (tmp_path / "x.parquet").read_bytes() == (tmp_path / "y.parquet").read_bytes()
    f = pq.ParquetFile(tmp_path / "x.parquet")
    assert f.read().equals(t)
    col = f.metadata.row_group(0).column(0)
    assert col.compression == "ZSTD" and col.is_stats_set and col.statistics.max == 49
    assert b"ARROW:schema" in f.metadata.metadata
    assert f.metadata.num_row_groups == 1


def test_read_images_fills_why_for_refused_rows(tmp_path):
    from curate.testing.datasets import finish

    ds = Dataset(str(tmp_path / "d"))
    attempt = new_attempt()
    data = b"image bytes" * 30
    with ds.open_tmp_tar(0, attempt) as f:
        w = TarWriter(f)
        where = w.add(make_key(0, 0), {"jpg": data})
        w.close()
    kept = pa.table({schema.UID: ["a", "b"], schema.IMAGE_TAR: [ds.tar_url(0), None],
                     schema.IMAGE_OFFSET: [where["jpg"][0], None], schema.IMAGE_LENGTH: [where["jpg"][1], None],
                     schema.SHA256: [hashlib.sha256(data).hexdigest(), None]})
    ds.commit_shard(0, kept, kept.slice(0, 0), {"rows_in": 2, "rows_out": 2, "rejected": 0, "drops": {}},
                    attempt=attempt, tar_written=True)
    finish(ds, "synth", True)
    ds = Dataset(ds.url)
    why: list = []
    assert read_images(ds.read_shard(0), ds, why) == [data, None]
    assert why[0] is None and why[1] and why[1].startswith("no pointer")
    assert read_images(ds.read_shard(0), ds) == [data, None]


def test_every_storage_change_of_a_commit_passes_the_failpoint_in_order(tmp_path):
    """The steps a fault-injection test can stop at: staged files, the claim, the renames (stats
    last), then the record's removal; each named by what it changes."""
    from curate.dataset import set_failpoint

    ds = Dataset(str(tmp_path / "d"))
    steps: list[tuple[str, str]] = []
    set_failpoint(lambda op, path: steps.append((op, path)))
    try:
        kept, rej = _tables(2)
        ds.commit_shard(0, kept, rej, _stats(2), attempt="7-a")
    finally:
        set_failpoint(None)
    s, r = str(tmp_path / "d" / "shards"), str(tmp_path / "d" / "rejects")
    assert steps == [
        ("write", f"{s}/00000.parquet.tmp-7-a"), ("write", f"{r}/00000.parquet.tmp-7-a"),
        ("write", f"{s}/00000.stats.json.tmp-7-a"),
        ("write", f"{s}/00000.commit.json.tmp-7-a"), ("rename", f"{s}/00000.commit.json"),
        ("rename", f"{s}/00000.parquet"), ("rename", f"{r}/00000.parquet"), ("rename", f"{s}/00000.stats.json"),
        ("delete", f"{s}/00000.commit.json"),
    ]


@pytest.mark.parametrize("where", ["local", "memory"])
def test_a_failed_rename_names_the_missing_file(tmp_path, where):
    ds = Dataset(str(tmp_path / "d") if where == "local" else f"memory://rename-{uuid.uuid4().hex}/d")
    ds.write_bytes(b"x", "present")
    with pytest.raises(FileNotFoundError, match="gone-file"):
        ds.rename(ds.path("gone-file"), ds.path("present"))
