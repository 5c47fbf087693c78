"""Removal requests over a lineage: a dataset owning tars (synth), a Parquet-only stage pointing into
them (passthrough, with rejects), an export that owns its own tars, and an import that adopted tars."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from curate import schema
from curate.cli import main
from curate.dataset import Dataset, read_images
from curate.removal import Request, remove
from curate.runner import run_stage
from curate.verify import verify
from curate.wds import iter_tar

SYNTH = "curate.testing.stages:Synth"
PASS = "curate.testing.stages:Passthrough"


@pytest.fixture
def lineage(ray_session, tmp_path):
    pipe = {"name": "rm", "output": str(tmp_path / "out"), "input": str(tmp_path), "stages": [
        {"stage": SYNTH, "name": "synth", "config": {"shards": 3, "rows_per_shard": 8}},
        {"stage": PASS, "name": "pass", "config": {"drop_every": 3}},
        {"stage": "export", "config": {"samples_per_shard": 7, "seed": 3}},
    ]}
    (tmp_path / "pipe.yaml").write_text(yaml.safe_dump(pipe))
    assert main(["run", str(tmp_path / "pipe.yaml")]) == 0
    out = tmp_path / "out"
    # an import adopts copies of those tars (adopted tars belong to no dataset and are never written)
    external = tmp_path / "external"
    external.mkdir()
    for tar in (out / "synth" / "shards").glob("*.tar"):
        shutil.copy(tar, external / tar.name)
    run_stage("import", str(external), str(out / "imported"))
    return tmp_path, {name: Dataset(str(out / name)) for name in ("synth", "pass", "export", "imported")}


def _rows(ds: Dataset) -> dict[str, dict]:
    """uid -> (row without the offset, image bytes), kept and rejected rows alike."""
    out = {}
    for folder, it in (("kept", ds.iter_shards()), ("rejected", ds.iter_rejects())):
        for _, t in it:
            blobs = read_images(t, ds)
            for row, blob in zip(t.to_pylist(), blobs, strict=True):
                row.pop(schema.IMAGE_OFFSET, None)
                out[row[schema.UID]] = {"row": row, "bytes": blob, "where": folder}
    return out


def _tar_members(ds: Dataset) -> dict[str, bytes]:
    out = {}
    for n in ds.shard_ids():
        p = ds.shard_path(n, "tar")
        if not ds.fs.exists(p):
            continue
        data = Path(p).read_bytes()
        with open(p, "rb") as f:
            for m in iter_tar(f):
                out[m.name] = data[m.offset:m.offset + m.size]
    return out


def _every_string_in_parquet(root: Path) -> set[str]:
    import pyarrow.parquet as pq

    seen = set()
    for p in root.rglob("*.parquet"):
        t = pq.read_table(p)
        for col in t.columns:
            if pa.types.is_string(col.type) or pa.types.is_dictionary(col.type):
                seen.update(v for v in col.cast(pa.string()).to_pylist() if v)
    return seen


def test_remove_everywhere_others_byte_identical_verify_passes(lineage, tmp_path):
    root, dss = lineage
    before = {name: _rows(ds) for name, ds in dss.items()}
    members_before = {name: _tar_members(ds) for name, ds in dss.items()}
    # victims: two kept by passthrough (so in export too), one it rejected
    kept_pass = [u for u, r in before["pass"].items() if r["where"] == "kept"]
    rejected_pass = [u for u, r in before["pass"].items() if r["where"] == "rejected"]
    victims = {kept_pass[0], kept_pass[5], rejected_pass[0]}
    by_sha = before["synth"][kept_pass[9]]["row"][schema.SHA256]  # a fourth one, named by sha256
    victims_all = victims | {kept_pass[9]}
    uid_file = root / "uids.txt"
    uid_file.write_text("\n".join(sorted(victims)) + "\n")
    sha_file = root / "sha.txt"
    sha_file.write_text(by_sha + "\n")
    paths = [ds.url for ds in dss.values()]

    assert main(["remove", "--uids", str(uid_file), "--reason", "takedown #1", "--by", "legal", *paths]) == 0
    assert main(["remove", "--sha256", str(sha_file), *paths]) == 0

    for name, ds in dss.items():
        ds.refresh()
        # the import made its own uids for the same images: there only the sha256 request matches
        vic = {u for u, r in before[name].items() if u in victims or r["row"].get(schema.SHA256) == by_sha}
        assert vic and (name == "imported" or vic == victims_all & before[name].keys())
        after = _rows(ds)
        # gone from kept rows, rejects, and every Parquet table of the dataset (_plan too)
        assert not vic & after.keys(), name
        assert not vic & _every_string_in_parquet(Path(ds.root)), name
        # every other sample: same row (except where its bytes moved) and the same image bytes
        assert after.keys() == before[name].keys() - vic
        for uid, r in after.items():
            assert r == before[name][uid], (name, uid)
        # tar members of the removed samples are gone, every other member is byte-identical
        gone = {before[name][u]["row"][schema.KEY] for u in vic}
        want = {m: b for m, b in members_before[name].items() if m.split(".")[0] not in gone}
        assert _tar_members(ds) == want
        for blob in _tar_members(ds).values():
            assert not any(u.encode() in blob for u in vic)  # export's KEY.json names uids
        problems, checked = verify(ds)
        assert problems == [] and checked == sum(1 for r in after.values() if r["where"] == "kept")
        assert main(["verify", ds.url]) == 0
        m = ds.manifest()
        assert m["totals"]["kept"] == sum(e["rows"] for e in m["shards"]) == checked
        assert m["totals"]["rows_in"] == len(after)
        assert m["totals"]["dropped"] == sum(m["totals"]["drops"].values()) == len(after) - checked
        assert sum(r["count"] for r in m["removals"]) == len(vic)
        assert m["removals"][0]["reason"] == "takedown #1" and m["removals"][0]["by"] == "legal"
        assert m["removals"][1]["request"] == {"kind": "sha256", "entries": 1}
        if m["owns_images"]:
            sizes = ds.read_json("shards", "sizes.json")
            # keyed by tar name: an export's carry their split (train-00000.tar, val-00004.tar)
            assert sizes == {(f"{e['split']}-" if "split" in e else "") + f"{e['shard']}.tar": e["rows"]
                             for e in m["shards"]}
            assert all((Path(ds.path("shards")) / tar).is_file() for tar in sizes)
        for n in ds.shard_ids():
            idx = Path(ds.shard_path(n, "idx"))
            if idx.exists():
                text = idx.read_text()
                assert int(text.split()[1]) == ds.stats(n)["rows_out"]
                assert not any(f" {k}." in text for k in gone)
    # the adopted tars were never written; the record says they still hold the bytes
    remain = dss["imported"].manifest()["removals"][1]["bytes_remain_in"]
    assert remain and all(t.startswith(str(root / "external")) for t in remain)
    # and the pipeline still recognises its outputs as complete: nothing is redone
    stamp = {n: Path(dss[n].root, "_manifest.json").read_bytes() for n in ("synth", "pass", "export")}
    assert main(["run", str(root / "pipe.yaml")]) == 0
    assert stamp == {n: Path(dss[n].root, "_manifest.json").read_bytes() for n in ("synth", "pass", "export")}


def test_remove_by_url_and_domain_resolves_across_datasets(ray_session, tmp_path):
    src = tmp_path / "src"
    run_stage(SYNTH, str(tmp_path), str(src), config={"shards": 2, "rows_per_shard": 4})
    ds = Dataset(str(src))
    # synth rows carry no url column: a domain request matches nothing and says so
    assert remove([ds.url], Request(domains=frozenset({"example.com"})))[0]["removed"] == 0
    uid = ds.read_shard(1).column(schema.UID)[2].as_py()
    r = remove([ds.url], Request(uids=frozenset({uid})))
    assert r[0]["removed"] == 1 and r[0]["tar_rewritten"] == 1
    assert verify(Dataset(str(src))) == ([], 7)
    assert hashlib.sha256(Path(src, "shards", "00000.tar").read_bytes()).hexdigest()  # untouched shard exists


def test_interrupted_removal_rerun_finishes_the_job(ray_session, tmp_path, monkeypatch):
    """Killed after the owner's tar was blanked but before the downstream dataset was done: the
    downstream rows of the victim point at blanked bytes (verify names it), no other pointer moved,
    and the same command again finishes the job and records the count once."""
    from curate import removal

    src, down = tmp_path / "src", tmp_path / "pass"
    run_stage(SYNTH, str(tmp_path), str(src), config={"shards": 2, "rows_per_shard": 6})
    run_stage(PASS, str(src), str(down), config={"drop_every": 0})
    before = _rows(Dataset(str(down)))
    victim = Dataset(str(src)).read_shard(0).column(schema.UID)[1].as_py()
    real = removal._remove_from

    def crash_on_downstream(ds, *args, **kwargs):
        if ds.root == str(down):
            raise KeyboardInterrupt("killed")
        return real(ds, *args, **kwargs)

    monkeypatch.setattr(removal, "_remove_from", crash_on_downstream)
    request = Request(uids=frozenset({victim}))
    with pytest.raises(KeyboardInterrupt):
        remove([str(src), str(down)], request)
    problems, _ = verify(Dataset(str(down)))
    assert len(problems) == 2 and "blanked" in problems[0] and str(src) in problems[1]
    assert Dataset(str(down)).exists("_plan", "removal-pending.json")

    monkeypatch.setattr(removal, "_remove_from", real)
    remove([str(src), str(down)], request)
    after = _rows(Dataset(str(down)))
    assert after.keys() == before.keys() - {victim}
    assert all(after[u] == before[u] for u in after)
    assert verify(Dataset(str(down))) == ([], 11) and verify(Dataset(str(src))) == ([], 11)
    assert not Dataset(str(down)).exists("_plan", "removal-pending.json")
    assert [r["count"] for r in Dataset(str(down)).manifest()["removals"]] == [1]
    assert [r["count"] for r in Dataset(str(src)).manifest()["removals"]] == [1]


def test_clip_retrieval_style_embedding_files_lose_the_rows(ray_session, tmp_path):
    """clip's export_npy layout (embeddings/{img_emb,text_emb}/*.npy row-aligned with
    embeddings/metadata/*.parquet): removed rows leave all three, the others keep their vectors."""
    import io

    import numpy as np
    import pyarrow.parquet as pq

    src = tmp_path / "src"
    run_stage(SYNTH, str(tmp_path), str(src), config={"shards": 2, "rows_per_shard": 5})
    ds = Dataset(str(src))
    vectors = {}
    for n in ds.shard_ids():
        t = ds.read_shard(n)
        name = ds.shard_name(n)
        uids = t.column(schema.UID).to_pylist()
        for folder, seed in (("img_emb", 1), ("text_emb", 2)):
            arr = np.random.default_rng(seed + n).standard_normal((len(uids), 8)).astype(np.float16)
            (src / "embeddings" / folder).mkdir(parents=True, exist_ok=True)
            buf = io.BytesIO()
            np.save(buf, arr)
            (src / "embeddings" / folder / f"{folder}_{name}.npy").write_bytes(buf.getvalue())
            vectors.update({(folder, u): arr[i].tobytes() for i, u in enumerate(uids)})
        (src / "embeddings" / "metadata").mkdir(parents=True, exist_ok=True)
        pq.write_table(t.select([schema.UID, schema.KEY]), src / "embeddings" / "metadata" / f"metadata_{name}.parquet")
    victim = ds.read_shard(1).column(schema.UID)[3].as_py()
    remove([ds.url], Request(uids=frozenset({victim})))
    meta = pq.read_table(src / "embeddings" / "metadata" / "metadata_00001.parquet")
    uids = meta.column(schema.UID).to_pylist()
    assert victim not in uids and len(uids) == 4
    for folder in ("img_emb", "text_emb"):
        arr = np.load(src / "embeddings" / folder / f"{folder}_00001.npy")
        assert [arr[i].tobytes() for i in range(len(uids))] == [vectors[(folder, u)] for u in uids]


def test_removal_on_object_storage(ray_session, s3_bucket):
    """The same removal over s3:// (a local S3 server): tars rewritten by copy + rename, pointers of
    the downstream dataset moved, both verify."""
    src, down = f"s3://{s3_bucket}/src", f"s3://{s3_bucket}/pass"
    run_stage(SYNTH, "/", src, config={"shards": 2, "rows_per_shard": 4})
    run_stage(PASS, src, down, config={"drop_every": 0})
    before = _rows(Dataset(down))
    victim = Dataset(src).read_shard(1).column(schema.UID)[0].as_py()
    results = remove([src, down], Request(uids=frozenset({victim}), reason="s3 test"))
    assert [r["removed"] for r in results] == [1, 1] and results[0]["tar_rewritten"] == 1
    after = _rows(Dataset(down))
    assert after.keys() == before.keys() - {victim} and all(after[u] == before[u] for u in after)
    assert verify(Dataset(src)) == ([], 7) and verify(Dataset(down)) == ([], 7)
    assert Dataset(down).manifest()["removals"][0]["reason"] == "s3 test"
    fs = Dataset(src).fs
    assert not [p for p in fs.find(Dataset(src).root) if ".tmp-" in p]
