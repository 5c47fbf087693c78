"""export end to end through the runner on embedded Ray, plus the pure pieces (permutation) alone."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from curate import schema
from curate.config import ConfigError
from curate.dataset import Dataset, read_images
from curate.runner import run_stage
from curate.stage import RunOptions
from curate.stages.export import ExportConfig, permute, split_shards
from curate.wds import parse_index

CONFIG = {
    "samples_per_shard": 16,
    "seed": 3,
    "caption": "mix",
    "recaption_probability": 0.5,
    "val_fraction": 0.01,
    "val_min_count": 12,
}


def _all_rows(ds: Dataset) -> pa.Table:
    return pa.concat_tables([t for _, t in ds.iter_shards()], promote_options="default")


def _files(ds: Dataset) -> dict[str, bytes]:
    """Every output file whose content should be reproducible (not stats/manifest: they hold timings)."""
    out = {}
    for path in sorted(ds.fs.find(ds.path("shards"))):
        if path.endswith((".tar", ".idx", ".parquet", "sizes.json")):
            with ds.fs.open(path, "rb") as f:
                out[path] = f.read()
    for path in sorted(ds.fs.find(ds.path("rejects"))):
        with ds.fs.open(path, "rb") as f:
            out[path] = f.read()
    return out


@pytest.fixture(scope="module")
def exported(curated, tmp_path_factory, ray_session):
    out = tmp_path_factory.mktemp("export-out") / "export"
    summary = run_stage("export", curated.url, str(out), config=CONFIG)
    return Dataset(str(out)), summary


def test_counts_bytes_and_layout(curated, exported):
    out, summary = exported
    src = _all_rows(curated)
    got = _all_rows(out)
    assert summary["kept"] == got.num_rows == src.num_rows  # nothing unreadable here
    assert sorted(got.column(schema.UID).to_pylist()) == sorted(src.column(schema.UID).to_pylist())

    # Bytes behind the new pointers are exactly the source bytes (no re-encoding).
    src_bytes = dict(zip(src.column(schema.UID).to_pylist(), read_images(src, curated), strict=True))
    new_bytes = read_images(got, out)
    for uid, data in zip(got.column(schema.UID).to_pylist(), new_bytes, strict=True):
        assert data is not None and data == src_bytes[uid]

    # Shards of 16, keys = shard digits + index digits, pointers into this dataset's own tars.
    sizes = json.loads(out.fs.cat(out.path("shards", "sizes.json")))
    ids = out.shard_ids()
    assert len(ids) >= 6
    for n in ids:
        t = out.read_shard(n)
        # the tar is named by its rows' split (train-00000.tar, val-00041.tar), in shards/
        (split,) = set(t.column(schema.SPLIT).to_pylist())
        tar = f"{split}-{out.shard_name(n)}.tar"
        assert sizes[tar] == t.num_rows <= 16
        assert set(t.column(schema.IMAGE_TAR).to_pylist()) == {out.tar_url(n)} == {out.url_of("shards", tar)}
        keys = t.column(schema.KEY).to_pylist()
        assert all(k.startswith(out.shard_name(n)) and len(k) == 9 and k.isdigit() for k in keys)
        assert keys == sorted(keys)
        # The tar holds image + txt + json per sample, contiguous, in key order, as the idx says.
        with tarfile.open(out.shard_path(n, "tar")) as tf:
            names = tf.getnames()
            members = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
        assert [nm.split(".")[0] for nm in names[::3]] == keys
        idx = parse_index(out.fs.cat(out.shard_path(n, "idx")).decode())
        assert len(idx) == t.num_rows
        rows = t.to_pylist()
        for row, entry in zip(rows, idx, strict=True):
            ext = row[schema.IMAGE_FORMAT]
            assert entry[ext] == (row[schema.IMAGE_OFFSET], row[schema.IMAGE_LENGTH])
            meta = json.loads(members[f"{row[schema.KEY]}.json"])
            assert meta[schema.UID] == row[schema.UID] and meta[schema.KEY] == row[schema.KEY]
            assert meta["extra_column"] == row["extra_column"]
            assert schema.IMAGE_EMBEDDING not in meta and schema.IMAGE_TAR not in meta
            text = members[f"{row[schema.KEY]}.txt"].decode()
            want = row[schema.RECAPTION] if row[schema.CAPTION_SOURCE] == "recaption" else row[schema.CAPTION]
            assert text == want and meta[schema.CAPTION_SOURCE] == row[schema.CAPTION_SOURCE]
            assert meta[schema.CAPTION] == row[schema.CAPTION]  # the original is never overwritten


def test_global_shuffle(curated, exported):
    out, _ = exported
    shard_of = {}
    for n, t in curated.iter_shards(columns=[schema.UID]):
        shard_of.update(dict.fromkeys(t.column(schema.UID).to_pylist(), n))
    train = split_shards(out)["train"]
    mixed = 0
    for n in train[:-1]:
        origins = Counter(shard_of[u] for u in out.read_shard(n, [schema.UID]).column(schema.UID).to_pylist())
        mixed += len(origins) > 1
    assert mixed == len(train) - 1  # every full shard draws from several input shards
    first = out.read_shard(0, [schema.UID]).column(schema.UID).to_pylist()
    in_order = curated.read_shard(0, [schema.UID]).column(schema.UID).to_pylist()
    assert first != in_order[: len(first)]


def test_held_out_split(curated, exported):
    out, _ = exported
    splits = split_shards(out)
    total = sum(t.num_rows for _, t in curated.iter_shards(columns=[schema.UID]))
    # 1% of ~100 rows is 1; val_min_count lifts it to 12.
    val = pa.concat_tables([out.read_shard(n) for n in splits["val"]])
    assert val.num_rows == 12 and total > 90
    assert set(val.column(schema.SPLIT).to_pylist()) == {"val"}
    train = pa.concat_tables([out.read_shard(n) for n in splits["train"]])
    assert set(train.column(schema.SPLIT).to_pylist()) == {"train"}
    assert splits["val"] and min(splits["val"]) > max(splits["train"])  # val shards come after train
    assert not set(val.column(schema.UID).to_pylist()) & set(train.column(schema.UID).to_pylist())


def test_caption_mix(exported):
    out, _ = exported
    t = _all_rows(out)
    sources = t.column(schema.CAPTION_SOURCE).to_pylist()
    has_recap = [r is not None for r in t.column(schema.RECAPTION).to_pylist()]
    # Rows without a recaption always fall back to the original.
    assert all(s == "original" for s, h in zip(sources, has_recap, strict=True) if not h)
    chosen = [s == "recaption" for s, h in zip(sources, has_recap, strict=True) if h]
    assert 0.3 < sum(chosen) / len(chosen) < 0.7  # p = 0.5 on ~80 rows
    per_shard = sum(out.stats(n)["caption_source"]["recaption"] for n in out.shard_ids())
    assert per_shard == sum(chosen)


def test_deterministic_rerun_and_caption_choice_per_uid(curated, exported, tmp_path):
    out, _ = exported
    before = _files(out)
    run_stage("export", curated.url, out.url, config=CONFIG, options=RunOptions(overwrite=True))
    after = _files(out)
    assert before.keys() == after.keys() and len(before) > 10
    assert all(before[k] == after[k] for k in before)  # byte-identical tars, idx, parquet, sizes.json

    # Another seed reshuffles and redraws the mix, but keeps the held-out set (it hangs on uids only).
    other = Dataset(str(tmp_path / "other"))
    run_stage("export", curated.url, other.url, config={**CONFIG, "seed": 4})
    a, b = _all_rows(out), _all_rows(other)
    assert a.column(schema.UID).to_pylist() != b.column(schema.UID).to_pylist()
    val = {u for u, s in zip(a.column(schema.UID).to_pylist(), a.column(schema.SPLIT).to_pylist(), strict=True)
           if s == "val"}
    val_b = {u for u, s in zip(b.column(schema.UID).to_pylist(), b.column(schema.SPLIT).to_pylist(), strict=True)
             if s == "val"}
    assert val == val_b
    src_a = dict(zip(a.column(schema.UID).to_pylist(), a.column(schema.CAPTION_SOURCE).to_pylist(), strict=True))
    src_b = dict(zip(b.column(schema.UID).to_pylist(), b.column(schema.CAPTION_SOURCE).to_pylist(), strict=True))
    assert src_a != src_b


def test_unreadable_and_corrupt_rows_are_rejected(curated, tmp_path, ray_session):
    # A pointer-only dataset where one row points past the end of its tar, one at the wrong bytes.
    bad = Dataset(str(tmp_path / "bad"))
    t = curated.read_shard(0)
    offsets = t.column(schema.IMAGE_OFFSET).to_pylist()
    lengths = t.column(schema.IMAGE_LENGTH).to_pylist()
    offsets[0] = 10**9
    offsets[1] = offsets[2]
    lengths[1] = lengths[2]
    t = schema.with_column(t, schema.IMAGE_OFFSET, offsets)
    t = schema.with_column(t, schema.IMAGE_LENGTH, lengths)
    rejects = t.slice(0, 0).append_column(schema.DROP_REASON, pa.array([], pa.string()))
    bad.commit_shard(0, t, rejects, {"rows_in": t.num_rows, "rows_out": t.num_rows, "rejected": 0, "drops": {}})
    # derived from curated, as its manifest says: pointers may lead only into that lineage
    bad.write_json({"run": {}, "shard_digits": 5, "shards": [], "totals": {}, "input": {"url": curated.url}},
                   "_manifest.json")
    out = Dataset(str(tmp_path / "out"))
    summary = run_stage("export", bad.url, out.url, config={"samples_per_shard": 8})
    assert summary["drops"] == {"export:corrupt": 1, "export:unreadable": 1}
    assert summary["kept"] == t.num_rows - 2
    uids = t.column(schema.UID).to_pylist()
    rejected = pa.concat_tables([r for _, r in out.iter_rejects()])
    assert dict(zip(rejected.column(schema.UID).to_pylist(), rejected.column(schema.DROP_REASON).to_pylist(),
                    strict=True)) == {uids[0]: "export:unreadable", uids[1]: "export:corrupt"}
    # sizes.json counts what is in the tars, not what was planned.
    sizes = json.loads(out.fs.cat(out.path("shards", "sizes.json")))
    assert sum(sizes.values()) == t.num_rows - 2
    for n in out.shard_ids():
        with tarfile.open(fileobj=io.BytesIO(out.fs.cat(out.shard_path(n, "tar")))) as tf:
            assert len(tf.getnames()) == 3 * sizes[f"train-{out.shard_name(n)}.tar"]


def test_target_bytes_sizes_shards(curated, tmp_path, ray_session):
    out = Dataset(str(tmp_path / "out"))
    src = _all_rows(curated)
    mean = sum(src.column(schema.IMAGE_LENGTH).to_pylist()) / src.num_rows
    target = int(20 * (mean + 3000))  # about 20 samples of image + tar headers + txt + json
    run_stage("export", curated.url, out.url, config={"target_shard_bytes": target})
    sizes = list(json.loads(out.fs.cat(out.path("shards", "sizes.json"))).values())
    assert 15 <= sizes[0] <= 25 and len(set(sizes[:-1])) == 1 and sum(sizes) == src.num_rows
    tar_bytes = [out.fs.size(out.shard_path(n, "tar")) for n in out.shard_ids()[:-1]]
    assert all(0.6 * target < b < 1.5 * target for b in tar_bytes)


def test_recaption_mode_needs_column_and_drop_policy(curated, tmp_path, ray_session):
    src = Dataset(str(tmp_path / "nocap"))
    t = curated.read_shard(0).drop_columns([schema.RECAPTION])
    rejects = t.slice(0, 0).append_column(schema.DROP_REASON, pa.array([], pa.string()))
    src.commit_shard(0, t, rejects, {"rows_in": t.num_rows, "rows_out": t.num_rows, "rejected": 0, "drops": {}})
    src.write_json({"run": {}, "shard_digits": 5, "shards": [], "totals": {}}, "_manifest.json")
    with pytest.raises(ConfigError, match="recaption"):
        run_stage("export", src.url, str(tmp_path / "o1"), config={"caption": "recaption"})

    out = Dataset(str(tmp_path / "o2"))
    summary = run_stage("export", curated.url, out.url,
                        config={"caption": "recaption", "missing_recaption": "drop", "samples_per_shard": 50})
    recaps = _all_rows(curated).column(schema.RECAPTION).to_pylist()
    assert summary["drops"] == {"export:no_recaption": sum(r is None for r in recaps)}
    assert set(_all_rows(out).column(schema.CAPTION_SOURCE).to_pylist()) == {"recaption"}


def test_config_is_strict():
    with pytest.raises(ValueError):
        ExportConfig(captions="mix")
    with pytest.raises(ValueError):
        ExportConfig(val_min_count=10)  # without a val_fraction it would mean nothing
    with pytest.raises(ValueError):
        ExportConfig(recaption_probability=1.5)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 16, 100, 1000, 4097])
def test_permute_is_a_seeded_bijection(n):
    idx = np.arange(n, dtype=np.uint64)
    p = permute(idx, n, seed=1, stream=0)
    assert sorted(p.tolist()) == list(range(n))
    assert np.array_equal(p, permute(idx, n, seed=1, stream=0))
    # Evaluated piecewise (as plan tasks do, one input shard each), it gives the same positions.
    half = n // 2
    assert np.array_equal(np.r_[permute(idx[:half], n, 1, 0), permute(idx[half:], n, 1, 0)], p)
    if n >= 16:
        assert not np.array_equal(p, permute(idx, n, seed=2, stream=0))
        assert not np.array_equal(p, idx)


def test_resume_after_a_lost_shard_gives_the_same_bytes(curated, exported):
    """A run killed after the plan and some commits: the rerun redoes only the missing shard, from the
    recorded plan, and the output is byte-identical to the uninterrupted run."""
    out, _ = exported
    before = _files(out)
    victim = out.shard_ids()[2]
    name = out.shard_name(victim)
    for folder in ("shards", "rejects"):
        for path in out.fs.ls(out.path(folder), detail=False):
            if path.rsplit("/", 1)[-1].startswith(name + "."):
                out.fs.rm(path)
    out.fs.rm(out.path("_manifest.json"))
    out.fs.rm(out.path("shards", "sizes.json"))
    out.refresh()
    plan_parts = out.fs.ls(out.path("_plan", "export", "parts"), detail=False)
    summary = run_stage("export", curated.url, out.url, config=CONFIG)
    assert not summary["skipped"]
    assert out.fs.ls(out.path("_plan", "export", "parts"), detail=False) == plan_parts  # plan reused
    after = _files(out)
    assert before.keys() == after.keys()
    assert all(before[k] == after[k] for k in before)


def test_explain_says_why(curated, exported):
    from curate.inspect import explain

    out, _ = exported
    t = out.read_shard(split_shards(out)["val"][0], [schema.UID, schema.CAPTION_SOURCE, schema.RECAPTION])
    uid = t.column(schema.UID)[0].as_py()
    info = explain(out, uid)
    assert info["kept"] and info["row"][schema.SPLIT] == "val"
    detail = info["stage_detail"]
    assert detail["split"] == "val" and "val_min_count=12" in detail["split_why"]
    chose = "recaption" if "recaption (original" in detail["caption_why"] else "original"
    if t.column(schema.RECAPTION)[0].as_py() is not None:
        assert chose == t.column(schema.CAPTION_SOURCE)[0].as_py()


def test_cli_runs_export_and_refuses_a_bad_config(curated, tmp_path, ray_session, capsys):
    from curate.cli import main

    out = tmp_path / "cli"
    assert main(["export", "--input", curated.url, "--output", str(out), "--set", "caption=recap"]) != 0
    assert "caption" in capsys.readouterr().err
    assert not out.exists()  # refused before any work
    assert main(["export", "--input", curated.url, "--output", str(out), "--set", "samples_per_shard=40",
                 "--set", "caption=mix"]) == 0
    sizes = json.loads((out / "shards" / "sizes.json").read_text())
    assert sum(sizes.values()) == _all_rows(curated).num_rows and len(sizes) == 3


def test_empty_input_gives_an_empty_complete_export(curated, tmp_path, ray_session):
    src = Dataset(str(tmp_path / "empty"))
    t = curated.read_shard(0).slice(0, 0)
    rejects = t.append_column(schema.DROP_REASON, pa.array([], pa.string()))
    src.commit_shard(0, t, rejects, {"rows_in": 0, "rows_out": 0, "rejected": 0, "drops": {}})
    src.write_json({"run": {}, "shard_digits": 5, "shards": [], "totals": {}}, "_manifest.json")
    out = Dataset(str(tmp_path / "out"))
    summary = run_stage("export", src.url, out.url, config={"val_fraction": 0.1, "val_min_count": 5})
    assert summary["kept"] == 0 and out.is_complete() and out.shard_ids() == []


def _run_without_ray(src: Dataset, out: Dataset, config: dict) -> dict[int, bytes]:
    """plan / load / process called directly (serial map, no Ray): Arrow in, tar bytes out."""
    from curate.stage import PlanContext, ShardContext
    from curate.stages.export import ExportStage
    from curate.wds import TarWriter

    stage = ExportStage(ExportConfig(**config))
    plan_dir = out.path("_plan")
    ids = stage.plan(PlanContext(input_path=src.url, input=src, output=out, plan_dir=plan_dir,
                                 options=RunOptions(), map=lambda fn, items: [fn(i) for i in items]))
    tars = {}
    for n in ids:
        buf = io.BytesIO()
        ctx = ShardContext(shard=n, input_path=src.url, input=src, output=out, plan_dir=plan_dir,
                           options=RunOptions(), tar=TarWriter(buf), tar_url=f"/nowhere/{n}.tar")
        result = stage.process(stage.load(n, ctx), ctx)
        assert result.num_rows == ctx.tar.__len__() and result.column(schema.DROP_REASON).null_count == result.num_rows
        ctx.tar.close()
        tars[n] = buf.getvalue()
    return tars


def test_batched_reads_write_the_same_tars(curated, tmp_path, monkeypatch):
    import curate.stages.export as export

    config = {"samples_per_shard": 30, "caption": "mix", "val_fraction": 0.1}
    whole = _run_without_ray(curated, Dataset(str(tmp_path / "a")), config)
    monkeypatch.setattr(export, "_READ_BATCH_BYTES", 1)  # every image read on its own
    batched = _run_without_ray(curated, Dataset(str(tmp_path / "b")), config)
    assert len(whole) >= 4 and whole == batched


def test_export_on_object_storage(s3_bucket, ray_session, tmp_path):
    """Input tars, pointer-only input, plan parts and output all on S3 (moto), through Ray workers; HF
    ``datasets`` reads each split from one glob of the bucket, the trainer finds both splits."""
    from export_data import write_curated, write_source

    from curate.verify import verify

    source = write_source(f"s3://{s3_bucket}/download")
    curated = write_curated(f"s3://{s3_bucket}/recaption", source)
    out = Dataset(f"s3://{s3_bucket}/export")
    summary = run_stage("export", curated.url, out.url,
                        config={**CONFIG, "samples_per_shard": 40, "image_extension": "jpg"})
    src = _all_rows(curated)
    got = _all_rows(out)
    assert summary["kept"] == got.num_rows == src.num_rows and out.url.startswith("s3://")
    assert all(u.startswith(f"s3://{s3_bucket}/export/shards/") for u in set(got.column(schema.IMAGE_TAR).to_pylist()))
    src_bytes = dict(zip(src.column(schema.UID).to_pylist(), read_images(src, curated), strict=True))
    assert [src_bytes[u] for u in got.column(schema.UID).to_pylist()] == read_images(got, out)
    assert verify(out)[0] == []
    splits = split_shards(out)
    assert sorted(sum(splits.values(), [])) == out.shard_ids()

    import datasets

    from trainer.data import find_shards

    # HF resolves data_dir on local disk only; on a bucket the split-named tars are one glob per split
    files = {"train": f"{out.url}/shards/train-*.tar", "validation": f"{out.url}/shards/val-*.tar"}
    hf = datasets.load_dataset("webdataset", data_files=files, cache_dir=str(tmp_path / "hf"))
    for split, hf_split in (("train", "train"), ("val", "validation")):
        keys = got.filter(pc.equal(got[schema.SPLIT], split))[schema.KEY].to_pylist()
        assert keys and sorted(hf[hf_split]["__key__"]) == sorted(keys)
        tars = [t for t, _ in find_shards(out.url, split)]
        assert tars == [f"s3://{s3_bucket}/export/shards/{split}-{out.shard_name(n)}.tar" for n in splits[split]]


def test_uint64_columns_are_hex_in_key_json_and_hf_reads_without_features(tmp_path, ray_session):
    import datasets
    from PIL import Image

    from curate.testing.datasets import IMAGE, write_image_dataset

    def jpeg(i: int) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (32, 32), (i * 40 % 256, 90, 30)).save(buf, "JPEG")
        return buf.getvalue()

    big = (1 << 64) - 12345  # a pHash above 2**63: int64 readers overflow on it as a JSON number
    rows = [{schema.UID: f"{i:032x}", schema.CAPTION: f"c{i}", IMAGE: jpeg(i), schema.IMAGE_FORMAT: "jpg",
             schema.WIDTH: 32, schema.HEIGHT: 32, schema.PHASH: big - i} for i in range(6)]
    src = write_image_dataset(str(tmp_path / "src"), [rows])
    t = src.read_shard(0)
    assert t.column(schema.PHASH).type == pa.uint64()
    run_stage("export", src.url, str(tmp_path / "out"), config={"val_fraction": 0})
    # the folder alone: no data_files, no features
    hf = datasets.load_dataset("webdataset", data_dir=str(tmp_path / "out"), split="train",
                               cache_dir=str(tmp_path / "hf"))
    assert len(hf) == 6
    assert sorted(m[schema.PHASH] for m in hf["json"]) == sorted(f"{big - i:016x}" for i in range(6))
