"""The import stage on folders written by other tools: real tars, real images, real Parquet."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pytest
import webdataset as wds
from importer_builders import image_bytes, import_direct, raw_tar, write_img2dataset_shard

from curate import schema
from curate.dataset import Dataset, read_images
from curate.phash import phash_bytes, signatures_bytes
from curate.wds import parse_index


def rows(ds: Dataset) -> pa.Table:
    return pa.concat_tables([t for _, t in ds.iter_shards()]) if ds.shard_ids() else None


def rejects(ds: Dataset) -> pa.Table:
    return pa.concat_tables([t for _, t in ds.iter_rejects()])


def sha_file(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture
def wds_folder(tmp_path):
    """Two tars written by the webdataset library: jpg/png/webp, json metadata, a dotted key and a
    name longer than 100 bytes (a PAX header), in a nested folder."""
    folder = tmp_path / "wds"
    (folder / "part").mkdir(parents=True)
    samples = {}
    for t in range(2):
        with wds.TarWriter(str(folder / "part" / f"shard-{t}.tar")) as sink:
            for i in range(6):
                seed = t * 10 + i
                fmt = ("jpg", "png", "webp")[i % 3]
                key = f"s{t}_{i:03d}"
                if i == 4:
                    key = f"dir/sub.{t}.name"  # dotted key in a subfolder
                if i == 5:
                    key = "long_" + "x" * 120 + f"_{t}"  # > 100 bytes: PAX long name
                data = image_bytes(seed, fmt)
                cap = f"a picture number {seed} with words"
                meta = {
                    "url": f"http://example.com/{seed}.{fmt}",
                    "similarity": 0.25 + i / 100,
                    "source": {"site": "example", "id": seed},
                }
                sink.write({"__key__": key, fmt: data, "txt": cap, "json": json.dumps(meta).encode()})
                samples[key] = (data, cap, fmt, meta)
    return folder, samples


def test_import_webdataset_library_folder(wds_folder, tmp_path):
    folder, samples = wds_folder
    before = {p: sha_file(p) for p in folder.rglob("*.tar")}
    ds = import_direct(folder, tmp_path / "out")
    t = rows(ds)
    assert t.num_rows == len(samples) == 12
    assert rejects(ds).num_rows == 0
    by_key = {r[schema.KEY]: r for r in t.to_pylist()}
    assert set(by_key) == set(samples)
    blobs = read_images(t, ds)
    for r, blob in zip(t.to_pylist(), blobs, strict=True):
        data, cap, fmt, meta = samples[r[schema.KEY]]
        assert blob == data  # exact bytes, read from the source tar
        assert r[schema.CAPTION] == cap
        assert r[schema.IMAGE_FORMAT] == fmt
        assert r[schema.URL] == meta["url"]
        assert r["similarity"] == pytest.approx(meta["similarity"])
        assert json.loads(r["source"]) == meta["source"]
        assert r[schema.SHA256] == hashlib.sha256(data).hexdigest()
        assert (r[schema.WIDTH], r[schema.HEIGHT]) == (96, 64)
        assert (r[schema.ORIGINAL_WIDTH], r[schema.ORIGINAL_HEIGHT]) == (96, 64)
        assert r[schema.PHASH] == phash_bytes([data])[0]  # the hash dedup would compute from bytes
        # the colour signature and crop hashes, from the same decode, equal what dedup's rehash computes
        assert (r[schema.COLOR_SIG], r[schema.PHASH_CROPS]) == signatures_bytes([data])[0][1:]
        assert Path(r[schema.IMAGE_TAR]).is_absolute() and r[schema.IMAGE_TAR].startswith(str(folder))
        assert len(r[schema.UID]) == 32
    assert len(set(t.column(schema.UID).to_pylist())) == 12
    # the source is only read; we own no tar
    assert {p: sha_file(p) for p in folder.rglob("*.tar")} == before
    assert not list((tmp_path / "out").rglob("*.tar"))
    stats = ds.stats(0)["import"]
    assert stats["tar"].endswith("part/shard-0.tar") and not stats["truncated"]


def test_uids_are_deterministic_across_runs(wds_folder, tmp_path):
    folder, _ = wds_folder
    a = rows(import_direct(folder, tmp_path / "a"))
    b = rows(import_direct(folder, tmp_path / "b"))
    assert a.column(schema.UID).to_pylist() == b.column(schema.UID).to_pylist()
    assert a.column(schema.PHASH).to_pylist() == b.column(schema.PHASH).to_pylist()


def test_dali_index_points_into_the_source_tar(wds_folder, tmp_path):
    folder, samples = wds_folder
    ds = import_direct(folder, tmp_path / "out")
    for n in ds.shard_ids():
        t = ds.read_shard(n)
        idx = parse_index(Path(ds.shard_path(n, "idx")).read_text())
        assert len(idx) == t.num_rows
        src = Path(t.column(schema.IMAGE_TAR)[0].as_py()).read_bytes()
        with tarfile.open(fileobj=io.BytesIO(src)) as tf:
            truth = {m.offset_data: (m.name, m.size) for m in tf.getmembers()}
        keys = t.column(schema.KEY).to_pylist()
        for entry, key in zip(idx, keys, strict=True):
            for ext, (off, size) in entry.items():
                name, real_size = truth[off]
                assert name == f"{key}.{ext}" and size == real_size
            data, cap, fmt, _ = samples[key]
            off, size = entry[fmt]
            assert src[off : off + size] == data
            off, size = entry["txt"]
            assert src[off : off + size].decode() == cap


def test_import_img2dataset_layout(tmp_path):
    folder = tmp_path / "i2d"
    folder.mkdir()
    want = {}
    for shard in (0, 1):
        rs = []
        for i in range(5):
            seed = shard * 100 + i
            if i == 2:
                rs.append({"url": f"http://h/{seed}", "caption": f"failed {seed}", "error": "HTTP 404"})
            else:
                rs.append(
                    {"url": f"http://h/{seed}", "caption": f"caption {seed}", "image": image_bytes(seed)}
                )
            want[f"{shard:05d}{i:04d}"] = rs[-1]
        write_img2dataset_shard(folder, shard, rs)
    ds = import_direct(folder, tmp_path / "out")
    assert ds.shard_ids() == [0, 1]  # NNNNN.tar keeps its number
    kept, rej = rows(ds), rejects(ds)
    assert kept.num_rows == 8 and rej.num_rows == 2
    for r, blob in zip(kept.to_pylist(), read_images(kept, ds), strict=True):
        src = want[r[schema.KEY]]
        assert blob == src["image"]
        assert r[schema.CAPTION] == src["caption"] and r[schema.URL] == src["url"]
        assert r[schema.STATUS] == "success"
        assert (r[schema.ORIGINAL_WIDTH], r[schema.ORIGINAL_HEIGHT]) == (192, 128)  # img2dataset's, kept
        assert (r[schema.WIDTH], r[schema.HEIGHT]) == (96, 64)
        assert r[schema.SHA256] == hashlib.sha256(src["image"]).hexdigest()
        assert r[schema.ORIGINAL_SHA256] == hashlib.sha256(b"original:" + src["image"]).hexdigest()
        assert r["exif"] == "{}"
    for r in rej.to_pylist():
        assert r[schema.DROP_REASON] == "import:missing_image"
        assert r[schema.STATUS] == "failed_to_download" and r[schema.ERROR_MESSAGE] == "HTTP 404"
        assert r[schema.CAPTION].startswith("failed")
    assert len(set(kept.column(schema.UID).to_pylist() + rej.column(schema.UID).to_pylist())) == 10


def test_rejects_with_reasons(tmp_path, make_image):
    good = make_image(1)
    jpg = make_image(2)
    members = [
        ("000.jpg", good),
        ("000.txt", b"a good sample"),
        ("001.jpg", make_image(3)),  # no caption at all
        ("002.jpg", make_image(4)),
        ("002.txt", b"   "),  # blank caption
        ("003.jpg", b"<html><body>not an image</body></html>"),
        ("003.txt", b"html served as jpg"),
        ("004.jpg", jpg[: len(jpg) // 2]),
        ("004.txt", b"truncated jpeg"),
        ("005.txt", b"caption without an image"),
        ("005.json", b'{"url": "http://x/5"}'),
        ("006.jpg", make_image(6)),
        ("006.txt", b"first of a repeated key"),
        ("006.jpg", make_image(7)),
        ("006.txt", b"second of a repeated key"),
        ("007.png", _pixel_bomb()),
        ("007.txt", b"a pixel bomb"),
        ("008.jpg", make_image(8)),
        ("008.json", b'{"caption": "caption from json"}'),
    ]
    folder = tmp_path / "in"
    folder.mkdir()
    raw_tar(folder / "a.tar", members)
    ds = import_direct(folder, tmp_path / "out")
    kept = {r[schema.KEY]: r for r in rows(ds).to_pylist()}
    rej = rejects(ds).to_pylist()
    reasons = {(r[schema.KEY], r[schema.CAPTION]): r[schema.DROP_REASON] for r in rej}
    assert set(kept) == {"000", "006", "008"}
    assert kept["006"][schema.CAPTION] == "first of a repeated key"
    assert kept["008"][schema.CAPTION] == "caption from json"
    assert reasons == {
        ("001", None): "import:missing_caption",
        ("002", "   "): "import:missing_caption",
        ("003", "html served as jpg"): "import:undecodable",
        ("004", "truncated jpeg"): "import:undecodable",
        ("005", "caption without an image"): "import:missing_image",
        ("006", "second of a repeated key"): "import:duplicate_key",
        ("007", "a pixel bomb"): "import:too_many_pixels",
    }
    by_key = {r[schema.KEY]: r for r in rej}
    assert by_key["005"][schema.URL] == "http://x/5"
    assert "truncated" in by_key["004"][schema.ERROR_MESSAGE]
    assert all(
        r[schema.ERROR_MESSAGE]
        for r in rej
        if r[schema.DROP_REASON] in ("import:undecodable", "import:too_many_pixels")
    )
    stats = ds.stats(0)
    assert stats["rows_in"] == 10 and stats["rows_out"] == 3 and stats["import"]["duplicate_keys"] == 1
    # every input sample once, uids unique over kept + rejects
    uids = [r[schema.UID] for r in kept.values()] + [r[schema.UID] for r in rej]
    assert len(uids) == len(set(uids)) == 10


def _pixel_bomb(width: int = 20_000, height: int = 20_000) -> bytes:
    import struct
    import zlib

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    comp = zlib.compressobj(9)
    row = b"\0" * (1 + width // 8)
    body = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def test_truncated_tar_keeps_intact_samples(tmp_path, make_image):
    folder = tmp_path / "in"
    folder.mkdir()
    imgs = [make_image(i, size=(200, 150)) for i in range(6)]
    members = []
    for i, data in enumerate(imgs):
        members += [(f"{i:03d}.jpg", data), (f"{i:03d}.txt", f"caption {i}".encode())]
    raw_tar(folder / "cut.tar", members)
    raw_tar(folder / "whole.tar", [("100.jpg", imgs[0]), ("100.txt", b"whole tar sample")])
    full = (folder / "cut.tar").read_bytes()
    with tarfile.open(folder / "cut.tar") as tf:
        m4 = tf.getmember("004.jpg")
    (folder / "cut.tar").write_bytes(full[: m4.offset_data + m4.size // 2])  # cut inside sample 004's image
    ds = import_direct(folder, tmp_path / "out")
    by_tar = {ds.stats(n)["import"]["tar"]: ds.stats(n) for n in ds.shard_ids()}
    cut = by_tar[str(folder / "cut.tar")]
    assert cut["import"]["truncated"] is True and "004.jpg" in cut["import"]["tar_error"]
    assert by_tar[str(folder / "whole.tar")]["import"]["truncated"] is False
    kept = rows(ds)
    keys = sorted(kept.column(schema.KEY).to_pylist())
    assert keys == ["000", "001", "002", "003", "100"]
    for r, blob in zip(kept.to_pylist(), read_images(kept, ds), strict=True):
        if r[schema.KEY] != "100":
            assert blob == imgs[int(r[schema.KEY])]


def test_tar_cut_between_members_is_reported(tmp_path, make_image):
    folder = tmp_path / "in"
    folder.mkdir()
    raw_tar(
        folder / "a.tar",
        [("0.jpg", make_image(0)), ("0.txt", b"zero"), ("1.jpg", make_image(1)), ("1.txt", b"one")],
    )
    with tarfile.open(folder / "a.tar") as tf:
        m = tf.getmember("1.jpg")
    data = (folder / "a.tar").read_bytes()
    (folder / "a.tar").write_bytes(data[: m.offset])  # exactly before 1.jpg's header: parses cleanly
    ds = import_direct(folder, tmp_path / "out")
    st = ds.stats(0)["import"]
    assert st["truncated"] is True and "end-of-archive" in st["tar_error"]
    assert rows(ds).column(schema.KEY).to_pylist() == ["0"]


def test_noncontiguous_members_adopted_or_refused(tmp_path, make_image):
    folder = tmp_path / "in"
    folder.mkdir()
    a, b = make_image(1), make_image(2)
    raw_tar(folder / "x.tar", [("k1.jpg", a), ("k2.jpg", b), ("k2.txt", b"two"), ("k1.txt", b"one, split")])
    ds = import_direct(folder, tmp_path / "out")
    kept = {r[schema.KEY]: r for r in rows(ds).to_pylist()}
    assert kept["k1"][schema.CAPTION] == "one, split" and kept["k2"][schema.CAPTION] == "two"
    assert read_images(rows(ds).filter(pa.compute.equal(rows(ds).column(schema.KEY), "k1")), ds) == [a]
    st = ds.stats(0)["import"]
    assert st["noncontiguous_keys"] == 1 and st["noncontiguous_examples"] == ["k1"]
    idx = parse_index(Path(ds.shard_path(0, "idx")).read_text())
    assert sorted(len(e) for e in idx) == [2, 2]
    with pytest.raises(ValueError, match=r"x\.tar.*'k1'"):
        import_direct(folder, tmp_path / "out2", noncontiguous="refuse")


def test_gnu_long_names_directories_and_hidden_files(tmp_path, make_image):
    folder = tmp_path / "in"
    folder.mkdir()
    long_key = "deep/" + "y" * 150
    with tarfile.open(folder / "g.tar", "w", format=tarfile.GNU_FORMAT) as tf:
        d = tarfile.TarInfo("deep")
        d.type = tarfile.DIRTYPE
        tf.addfile(d)
        for name, data in (
            (".hidden.txt", b"x"),
            (f"{long_key}.jpg", make_image(5)),
            (f"{long_key}.txt", b"gnu long"),
        ):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    ds = import_direct(folder, tmp_path / "out")
    t = rows(ds)
    assert t.column(schema.KEY).to_pylist() == [long_key]
    assert read_images(t, ds) == [make_image(5)]
    assert ds.stats(0)["import"]["skipped_members"] == {"hidden": 1, "not_a_regular_file": 1}


def test_input_uid_kept_and_repeats_rejected(tmp_path, make_image):
    folder = tmp_path / "in"
    folder.mkdir()
    u = "0123456789abcdef0123456789abcdef"
    raw_tar(
        folder / "u.tar",
        [
            ("a.jpg", make_image(1)),
            ("a.txt", b"one"),
            ("a.json", json.dumps({"uid": u}).encode()),
            ("b.jpg", make_image(2)),
            ("b.txt", b"two"),
            ("b.json", json.dumps({"uid": u}).encode()),
        ],
    )
    ds = import_direct(folder, tmp_path / "out")
    assert rows(ds).column(schema.UID).to_pylist() == [u]
    assert rejects(ds).column(schema.DROP_REASON).to_pylist() == ["import:duplicate_uid"]


def test_empty_input_is_a_clear_error(tmp_path):
    from curate.config import ConfigError

    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no .tar files"):
        import_direct(tmp_path / "empty", tmp_path / "out")


def test_input_on_another_fsspec_filesystem(tmp_path, make_image):
    """Tars and parquet read through fsspec (memory:// here; s3:// works the same way)."""
    import fsspec

    fs = fsspec.filesystem("memory")
    local = tmp_path / "i2d"
    local.mkdir()
    write_img2dataset_shard(
        local,
        7,
        [
            {"url": "http://h/a", "caption": "on memory fs", "image": make_image(1)},
            {"url": "http://h/b", "caption": "failed", "error": "HTTP 500"},
        ],
    )
    for p in local.iterdir():
        fs.pipe(f"/imp-src/{p.name}", p.read_bytes())
    try:
        ds = import_direct("memory://imp-src", tmp_path / "out")
        t = rows(ds)
        assert ds.shard_ids() == [7]
        (tar,) = t.column(schema.IMAGE_TAR).to_pylist()
        assert tar.startswith("memory://") and tar.endswith("/imp-src/00007.tar")
        assert read_images(t, ds) == [make_image(1)]
        assert rejects(ds).column(schema.STATUS).to_pylist() == ["failed_to_download"]
    finally:
        fs.rm("/imp-src", recursive=True)


def test_img2dataset_parquet_repeating_a_key(tmp_path, make_image):
    folder = tmp_path / "i2d"
    folder.mkdir()
    write_img2dataset_shard(folder, 0, [{"url": "http://h/a", "caption": "a", "image": make_image(1)}])
    import pyarrow.parquet as pq

    t = pq.read_table(folder / "00000.parquet")
    pq.write_table(pa.concat_tables([t, t, t]), folder / "00000.parquet")
    ds = import_direct(folder, tmp_path / "out")
    assert rows(ds).num_rows == 1
    rej = rejects(ds)
    assert rej.column(schema.DROP_REASON).to_pylist() == ["import:duplicate_key"] * 2
    uids = rows(ds).column(schema.UID).to_pylist() + rej.column(schema.UID).to_pylist()
    assert len(set(uids)) == 3


def test_input_uid_repeated_in_a_later_img2dataset_shard(tmp_path, make_image):
    """DataComp-style inputs carry a uid column; a uid already adopted from an earlier tar is a reject."""
    import pyarrow.parquet as pq

    folder = tmp_path / "i2d"
    folder.mkdir()
    uids = {0: ["a" * 32, "b" * 32], 1: ["c" * 32, "a" * 32]}
    for shard in (0, 1):
        write_img2dataset_shard(
            folder,
            shard,
            [
                {
                    "url": f"http://h/{shard}/{i}",
                    "caption": f"c{shard}{i}",
                    "image": make_image(shard * 10 + i),
                }
                for i in range(2)
            ],
        )
        t = pq.read_table(folder / f"{shard:05d}.parquet")
        pq.write_table(t.append_column("uid", pa.array(uids[shard])), folder / f"{shard:05d}.parquet")
    ds = import_direct(folder, tmp_path / "out")
    assert sorted(rows(ds).column(schema.UID).to_pylist()) == ["a" * 32, "b" * 32, "c" * 32]
    rej = rejects(ds).to_pylist()
    assert [(r[schema.UID], r[schema.CAPTION], r[schema.DROP_REASON]) for r in rej] == [
        ("a" * 32, "c11", "import:duplicate_uid")
    ]


def test_compressed_tars_are_named_not_adopted(tmp_path):
    from curate.config import ConfigError

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.tar.gz").write_bytes(b"\x1f\x8b")
    with pytest.raises(ConfigError, match="compressed tars must be decompressed"):
        import_direct(tmp_path / "in", tmp_path / "out")
