"""The dataset directory and the tar writer, without Ray."""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import tarfile
import uuid
from pathlib import Path

import pyarrow as pa
import pytest

from curate import schema
from curate.dataset import Dataset, DatasetError, digits_for, make_key, read_images
from curate.wds import TarScan, TarWriter, iter_tar, parse_index, split_name


def _write_tar(path: Path, n: int) -> list[dict]:
    with open(path, "wb") as f:
        w = TarWriter(f)
        out = []
        for i in range(n):
            data = bytes([i]) * (100 + 37 * i)
            where = w.add(make_key(0, i), {"jpg": data, "txt": f"caption {i}", "json": "{}"})
            out.append({"data": data, "where": where})
        w.close()
        (path.with_suffix(".idx")).write_text(w.index_text())
    return out


def test_tar_is_readable_by_tarfile_and_pointers_are_exact(tmp_path):
    tar = tmp_path / "00000.tar"
    written = _write_tar(tar, 5)
    with tarfile.open(tar) as tf:
        members = tf.getmembers()
        assert [m.name for m in members][:3] == ["000000000.jpg", "000000000.txt", "000000000.json"]
        assert all(m.isreg() and m.mtime == members[0].mtime for m in members)
        assert tf.extractfile("000000003.jpg").read() == written[3]["data"]
    raw = tar.read_bytes()
    for w in written:
        off, size = w["where"]["jpg"]
        assert raw[off : off + size] == w["data"]


def test_index_matches_dalis_own_wds2idx(tmp_path):
    tar = tmp_path / "00000.tar"
    _write_tar(tar, 4)
    tool = Path(sys.executable).with_name("wds2idx")
    ref = tmp_path / "ref.idx"
    subprocess.run([str(tool), str(tar), str(ref)], check=True, capture_output=True)
    assert parse_index(tar.with_suffix(".idx").read_text()) == parse_index(ref.read_text())
    assert tar.with_suffix(".idx").read_text().split("\n")[0] == ref.read_text().split("\n")[0]


def test_iter_tar_stops_at_truncation_and_keeps_intact_members(tmp_path):
    tar = tmp_path / "t.tar"
    _write_tar(tar, 6)
    raw = tar.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(raw[: len(raw) // 2])
    scan = TarScan()
    with open(cut, "rb") as f:
        members = list(iter_tar(f, scan=scan))
    assert scan.truncated and scan.error
    assert 0 < len(members) < 18
    for m in members:
        assert m.offset + m.size <= len(raw) // 2


def test_tar_writer_refuses_bad_names():
    w = TarWriter(io.BytesIO())
    with pytest.raises(ValueError):
        w.add("a.b", {"jpg": b"x"})
    with pytest.raises(ValueError):
        w.add("1" * 98, {"jpg": b"x"})


def test_split_name_follows_webdataset():
    assert split_name("dir/abc.def.jpg") == ("dir/abc", "def.jpg")
    assert split_name("000010002.json") == ("000010002", "json")


def test_keys_and_digits():
    assert make_key(3, 17) == "000030017"
    assert make_key(123456, 2, 6, 5) == "12345600002"
    assert digits_for(100000, 5) == 5
    assert digits_for(100001, 5) == 6


def _commit(ds: Dataset, n: int, rows: int, tar_rows: int = 0):
    kept = pa.table({schema.UID: [f"{n:02d}{i:030d}" for i in range(rows)]})
    rejects = pa.table({schema.UID: ["f" * 32], schema.DROP_REASON: ["x:y"]})
    ds.commit_shard(n, kept, rejects, {"rows_in": rows + 1, "rows_out": rows, "rejected": 1, "drops": {"x:y": 1}})


@pytest.mark.parametrize("root", ["local", "memory"])
def test_commit_and_read_back_on_any_filesystem(tmp_path, root):
    url = str(tmp_path / "ds") if root == "local" else f"memory://curate-test-{uuid.uuid4().hex}/ds"
    ds = Dataset(url)
    assert ds.shard_ids() == [] and not ds.is_complete()
    _commit(ds, 0, 3)
    _commit(ds, 2, 4)
    assert ds.shard_ids() == [0, 2]
    assert ds.read_shard(2).num_rows == 4
    assert ds.read_rejects(0).column(schema.DROP_REASON).to_pylist() == ["x:y"]
    assert [n for n, _ in ds.iter_shards(columns=[schema.UID, "absent"])] == [0, 2]
    leftovers = [p for p in ds.fs.find(ds.root) if p.endswith(".tmp")]
    assert leftovers == []
    with pytest.raises(DatasetError):
        ds.clear_shard(0)


def test_clear_shard_removes_debris_of_a_killed_attempt(tmp_path):
    ds = Dataset(str(tmp_path / "ds"))
    ds.fs.makedirs(ds.path("shards"), exist_ok=True)
    for name in ("00001.parquet", "00001.tar.tmp", "00001.idx"):
        Path(ds.path("shards", name)).write_bytes(b"partial")
    ds.clear_shard(1)
    assert sorted(p.name for p in Path(ds.path("shards")).iterdir()) == []


def test_a_dataset_cut_into_splits_names_its_tars_by_split(tmp_path):
    """The plan's splits name the tars (train-00000.tar, val-00001.tar); everything else keeps the
    shard number alone, a killed attempt's split-named tar is cleared, sizes.json lists the names."""
    ds = Dataset(str(tmp_path / "ds"))
    ds.write_json({"shards": [0, 1], "shard_digits": 5, "splits": {"train": [0], "val": [1]}}, "_plan", "plan.json")
    assert ds.shard_path(1, "tar") == ds.path("shards", "val-00001.tar")
    assert ds.shard_path(1, "idx") == ds.path("shards", "00001.idx")
    with ds.open_tmp_tar(1, "a1") as f:
        f.write(b"partial")
    ds.clear_shard(1)
    assert list(Path(ds.path("shards")).iterdir()) == []
    t = pa.table({schema.UID: ["0" * 32]})
    rejects = t.slice(0, 0).append_column(schema.DROP_REASON, pa.array([], pa.string()))
    for n, split in ((0, "train"), (1, "val")):
        with ds.open_tmp_tar(n, "a2") as f:
            f.write(b"\0" * 1024)
        ds.commit_shard(n, t, rejects, {"rows_in": 1, "rows_out": 1, "rejected": 0, "drops": {}, "split": split},
                        attempt="a2", tar_written=True)
    ds.write_manifest(ds.build_manifest({"owns_images": True, "shard_digits": 5}))
    assert sorted(p.name for p in Path(ds.path("shards")).glob("*.tar")) == ["train-00000.tar", "val-00001.tar"]
    assert ds.read_json("shards", "sizes.json") == {"train-00000.tar": 1, "val-00001.tar": 1}
    assert Dataset(ds.url).tar_url(1) == ds.path("shards", "val-00001.tar")
    ds.delete(ds.path("_plan", "plan.json"))
    assert Dataset(ds.url).tar_url(1) == ds.path("shards", "val-00001.tar")  # from the manifest alone
    # an export made before tars carried their split: its plan records none, its manifest does
    old = Dataset(str(tmp_path / "old"))
    old.write_json({"shards": [0, 1], "shard_digits": 5}, "_plan", "plan.json")
    old.write_json({"shard_digits": 5, "splits": {"train": {"shards": ["00000"]}, "val": {"shards": ["00001"]}}},
                   "_manifest.json")
    assert old.shard_path(1, "tar") == old.path("shards", "00001.tar")
    # a dataset that is not cut into splits keeps NNNNN.tar
    plain = Dataset(str(tmp_path / "plain"))
    plain.write_json({"shards": [0], "shard_digits": 5}, "_plan", "plan.json")
    assert plain.shard_path(0, "tar") == plain.path("shards", "00000.tar")


def test_read_images_opens_each_tar_once_and_aligns_rows(tmp_path):
    from curate.testing.datasets import finish

    (tmp_path / "tars").mkdir()
    a, b = tmp_path / "tars" / "a.tar", tmp_path / "tars" / "b.tar"
    wa, wb = _write_tar(a, 3), _write_tar(b, 2)
    rows = [(b, wb[1]), (a, wa[2]), (a, wa[0]), (b, wb[0])]
    table = pa.table({
        schema.IMAGE_TAR: [str(p) for p, _ in rows] + [str(a)],
        schema.IMAGE_OFFSET: [w["where"]["jpg"][0] for _, w in rows] + [10**9],
        schema.IMAGE_LENGTH: [w["where"]["jpg"][1] for _, w in rows] + [5],
        schema.SHA256: [hashlib.sha256(w["data"]).hexdigest() for _, w in rows] + ["0" * 64],
    })
    # a dataset that adopted those tars, as import does: its pointers may lead into them
    ds = finish(Dataset(str(tmp_path / "ds")), "import", writes_images=False, input={"url": str(tmp_path / "tars")})
    got = read_images(table, ds)
    assert got[:4] == [w["data"] for _, w in rows]
    assert got[4] is None  # beyond the end of the tar


def test_conform_casts_known_columns_and_keeps_extras():
    t = pa.table({schema.WIDTH: [1, 2], schema.IMAGE_TAR: ["a", "a"], "extra": [1.5, 2.5]})
    c = schema.conform(t)
    assert c.schema.field(schema.WIDTH).type == pa.int32()
    assert pa.types.is_dictionary(c.schema.field(schema.IMAGE_TAR).type)
    assert c.schema.field("extra").type == pa.float64()


def test_plan_store_keeps_a_stages_files_under_its_own_plan_folder(tmp_path):
    """A stage's plan files land (atomically, no temp file left) under _plan/<stage>/ of its output,
    read back as written; delete removes one file or a whole folder of the store and nothing else."""
    ds = Dataset(str(tmp_path / "out"))
    store = ds.plan_store("dedup")
    table = pa.table({"a": [1, 2, 3], "shard": [0, 1, 0]})
    store.write_table(table, "keys", "00000000.parquet")
    store.write_json({"threshold": 0.25}, "threshold.json")
    store.write_bytes(b"\x00\x01", "parts", "p0.npz")
    root = tmp_path / "out" / "_plan" / "dedup"
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) == [
        "keys/00000000.parquet", "parts/p0.npz", "threshold.json"]
    assert store.read_table("keys", "00000000.parquet").equals(table)
    assert store.read_table("keys", "00000000.parquet", columns=["a"], filters=[("shard", "=", 0)]).column(
        "a").to_pylist() == [1, 3]
    assert store.read_json("threshold.json") == {"threshold": 0.25} and store.read_json("none.json") is None
    assert store.read_bytes("parts", "p0.npz") == b"\x00\x01" and store.exists("parts", "p0.npz")
    other = ds.plan_store("clip")
    other.write_json({}, "threshold.json")
    store.delete("parts")
    assert not store.exists("parts") and store.exists("threshold.json") and other.exists("threshold.json")
    assert store.path("x") == str(root / "x")
