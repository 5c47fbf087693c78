"""The import stage end to end: the runner on embedded Ray, the CLI, verify, and DALI reading the
adopted samples through our .idx straight from the source tars."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import webdataset as wds
from importer_builders import image_bytes, raw_tar, write_img2dataset_shard

from curate import schema
from curate.cli import main
from curate.dataset import Dataset, read_images
from curate.runner import run_stage
from curate.verify import verify


@pytest.fixture
def mixed_folder(tmp_path):
    """An img2dataset shard and a webdataset-library tar with one bad sample, side by side."""
    folder = tmp_path / "input"
    folder.mkdir()
    write_img2dataset_shard(
        folder,
        0,
        [
            {"url": "http://h/0", "caption": "first", "image": image_bytes(0)},
            {"url": "http://h/1", "caption": "lost", "error": "timeout"},
            {"url": "http://h/2", "caption": "third", "image": image_bytes(2, "png")},
        ],
    )
    with wds.TarWriter(str(folder / "00001.tar")) as sink:
        for i in range(4):
            sink.write(
                {
                    "__key__": f"w{i}",
                    "jpg": image_bytes(10 + i),
                    "txt": f"webdataset {i}",
                    "json": json.dumps({"url": f"http://w/{i}"}).encode(),
                }
            )
        sink.write({"__key__": "w9", "jpg": b"definitely not a jpeg", "txt": "broken"})
    return folder


def test_run_stage_then_verify_and_resume(ray_session, mixed_folder, tmp_path):
    out = tmp_path / "imported"
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in mixed_folder.glob("*.tar")}
    summary = run_stage("import", str(mixed_folder), str(out))
    assert summary["rows_in"] == 8 and summary["kept"] == 6
    assert summary["drops"] == {"import:missing_image": 1, "import:undecodable": 1}
    ds = Dataset(str(out))
    assert ds.is_complete() and ds.shard_ids() == [0, 1]
    assert not ds.manifest()["owns_images"]
    problems, checked = verify(ds)
    assert problems == [] and checked == 6
    t = pa.concat_tables([t for _, t in ds.iter_shards()], promote_options="default")
    assert sorted(t.column(schema.CAPTION).to_pylist()) == sorted(
        ["first", "third"] + [f"webdataset {i}" for i in range(4)]
    )
    want = {
        "first": image_bytes(0),
        "third": image_bytes(2, "png"),
        **{f"webdataset {i}": image_bytes(10 + i) for i in range(4)},
    }
    for cap, blob in zip(t.column(schema.CAPTION).to_pylist(), read_images(t, ds), strict=True):
        assert blob == want[cap]
    # rerun: complete with the same config and input, so nothing is redone
    again = run_stage("import", str(mixed_folder), str(out))
    assert again["skipped"] is True
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in mixed_folder.glob("*.tar")} == before


def test_cli_import_inspect_and_verify(ray_session, mixed_folder, tmp_path, capsys):
    out = str(tmp_path / "cli-out")
    assert (
        main(["import", "--input", str(mixed_folder), "--output", out, "--set", "compute_phash=false"]) == 0
    )
    ds = Dataset(out)
    assert schema.PHASH not in ds.read_shard(0).column_names
    assert main(["verify", out]) == 0
    rej = pa.concat_tables([t for _, t in ds.iter_rejects()], promote_options="default")
    uid = rej.filter(pa.compute.equal(rej.column(schema.CAPTION), "broken")).column(schema.UID)[0].as_py()
    capsys.readouterr()
    assert main(["inspect", out, "--uid", uid]) == 0
    assert "import:undecodable" in capsys.readouterr().out
    # a mistyped config key fails before any work, in one line
    assert (
        main(
            [
                "import",
                "--input",
                str(mixed_folder),
                "--output",
                str(tmp_path / "x"),
                "--set",
                "compute_phsh=false",
            ]
        )
        != 0
    )
    assert not (tmp_path / "x").exists()


def test_dali_reads_the_adopted_samples_from_the_source_tar(tmp_path):
    """Our shards/NNNNN.idx + the untouched source tar = exactly the kept samples, for DALI."""
    pytest.importorskip("nvidia.dali")
    from importer_builders import import_direct
    from nvidia.dali import fn, pipeline_def

    folder = tmp_path / "in"
    folder.mkdir()
    good = {k: image_bytes(i) for i, k in enumerate(["a", "c", "e"])}
    raw_tar(
        folder / "src.tar",
        [
            ("a.jpg", good["a"]),
            ("a.txt", b"caption a"),
            ("b.jpg", b"junk"),
            ("b.txt", b"caption b"),
            ("c.jpg", good["c"]),
            ("c.txt", b"caption c"),
            ("d.jpg", image_bytes(9)),  # no caption: rejected
            ("e.jpg", good["e"]),
            ("e.txt", b"caption e"),
        ],
    )
    ds = import_direct(folder, tmp_path / "out")
    idx = ds.shard_path(0, "idx")

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def pipe():
        img, txt = fn.readers.webdataset(
            paths=[str(folder / "src.tar")],
            index_paths=[idx],
            ext=["jpg", "txt"],
            missing_component_behavior="error",
        )
        return img, txt

    p = pipe()
    p.build()
    assert p.epoch_size()["__Webdataset_0"] == 3
    seen = {}
    for _ in range(3):
        img, txt = p.run()
        seen[bytes(np.array(txt[0])).decode()] = bytes(np.array(img[0]))
    assert seen == {f"caption {k}": v for k, v in good.items()}


def test_import_of_a_single_tar_path(tmp_path):
    from importer_builders import import_direct

    raw_tar(tmp_path / "one.tar", [("k.webp", image_bytes(3, "webp")), ("k.txt", b"just one")])
    ds = import_direct(tmp_path / "one.tar", tmp_path / "out")
    t = ds.read_shard(0)
    assert t.column(schema.CAPTION).to_pylist() == ["just one"]
    assert read_images(t, ds) == [image_bytes(3, "webp")]
    assert Path(t.column(schema.IMAGE_TAR)[0].as_py()) == tmp_path / "one.tar"


def test_import_the_demo_corpus_as_webdataset(tmp_path):
    """Every real image of the bundled corpus (PNG with alpha, palette PNGs, JPEG, WebP) adopted; the
    corpus' broken files rejected for the right reason."""
    from importer_builders import import_direct

    from curate.demo import CORPUS, read_entries

    entries = [e for e in read_entries() if (CORPUS / e["file"]).exists()]
    folder = tmp_path / "corpus-wds"
    folder.mkdir()
    with wds.TarWriter(str(folder / "corpus.tar")) as sink:
        for i, e in enumerate(entries):
            ext = e["file"].rsplit(".", 1)[1]
            sink.write(
                {
                    "__key__": f"{i:06d}",
                    ext: (CORPUS / e["file"]).read_bytes(),
                    "txt": e["caption"],
                    "json": json.dumps({"kind": e["kind"]}).encode(),
                }
            )
    ds = import_direct(folder, tmp_path / "out")
    kept = ds.read_shard(0)
    rej = ds.read_rejects(0)
    want_rejected = {
        "truncated": "import:undecodable",
        "html_as_image": "import:undecodable",
        "pixel_bomb": "import:too_many_pixels",
    }
    assert (
        dict(zip(rej.column("kind").to_pylist(), rej.column(schema.DROP_REASON).to_pylist(), strict=True))
        == want_rejected
    )
    assert kept.num_rows == len(entries) - 3
    assert set(kept.column("kind").to_pylist()) == {"ok", "duplicate", "near_duplicate"}
    assert kept.column(schema.PHASH).null_count == 0
    # exact duplicates share sha256 and pHash with their original
    by_file = {e["file"]: i for i, e in enumerate(entries)}
    sha = dict(zip(kept.column(schema.KEY).to_pylist(), kept.column(schema.SHA256).to_pylist(), strict=True))
    for e in entries:
        if e["kind"] == "duplicate":
            assert sha[f"{by_file[e['file']]:06d}"] == sha[f"{by_file[e['of']]:06d}"]


def test_demo_run_downloads_the_corpus_and_import_adopts_the_download(ray_session, tmp_path):
    """`python -m curate.demo run --pipeline P`: the corpus served on 127.0.0.1, downloaded by the
    download stage, and the download's own tars + parquet adopted again by import."""
    import yaml

    from curate import demo

    pipe = tmp_path / "p.yaml"
    urls = tmp_path / "urls.parquet"
    pipe.write_text(
        yaml.safe_dump(
            {
                "name": "demo-test",
                "output": str(tmp_path / "out"),
                "input": str(urls),
                "stages": [
                    {
                        "stage": "download",
                        "config": {"shard_size": 200, "fetch": {"allowed_networks": ["127.0.0.1/32"]}},
                    },
                    {"stage": "import"},
                ],
            }
        )
    )
    assert demo.main(["run", "--port", "0", "--urls", str(urls), "--pipeline", str(pipe)]) == 0
    down = Dataset(str(tmp_path / "out" / "download"))
    imp = Dataset(str(tmp_path / "out" / "import"))
    assert down.is_complete() and imp.is_complete()
    d_totals, i_totals = down.manifest()["totals"], imp.manifest()["totals"]
    broken = sum(
        1 for e in demo.read_entries() if e["kind"] in ("missing", "truncated", "html_as_image", "pixel_bomb")
    )
    assert d_totals["dropped"] == broken and d_totals["kept"] == len(demo.read_entries()) - broken
    assert i_totals["rows_in"] == d_totals["kept"]  # a curate shard parquet lists its kept rows only
    assert i_totals["kept"] == d_totals["kept"]
    d = pa.concat_tables([t for _, t in down.iter_shards()], promote_options="default")
    i = pa.concat_tables([t for _, t in imp.iter_shards()], promote_options="default")
    assert sorted(d.column(schema.SHA256).to_pylist()) == sorted(i.column(schema.SHA256).to_pylist())
    assert verify(imp)[0] == []
