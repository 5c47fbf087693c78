"""dedup through the real runner on embedded Ray: global across shards and workers, engines
identical, rerun after SIGKILL gives the same decisions, CLI explain."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
from dedup_data import build_corpus, write_dataset

from curate import schema
from curate.cli import main
from curate.dataset import Dataset
from curate.runner import run_stage


@pytest.fixture(scope="module")
def corpus():
    return build_corpus(n_originals=30, edited=12, copies=4)


@pytest.fixture(scope="module")
def source(corpus, tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("src"), corpus, shards=5, empty_shard=False)


def _decisions(root) -> dict[str, tuple]:
    ds = Dataset(str(root))
    out = {}
    for n in ds.shard_ids():
        for folder in (ds.read_shard(n), ds.read_rejects(n)):
            for r in folder.to_pylist():
                out[r[schema.UID]] = (n, r.get(schema.DROP_REASON), r.get(schema.DUP_OF), r.get(schema.PHASH))
    return out


def test_global_across_shards_and_engines(ray_session, corpus, source, tmp_path):
    results = {}
    for engine in ("sort", "distributed"):
        summary = run_stage(
            "dedup", source.url, str(tmp_path / engine), config={"engine": engine, "rows_per_partition": 1000}
        )
        assert summary["rows_in"] == len(corpus)
        results[engine] = _decisions(tmp_path / engine)
    assert results["sort"] == results["distributed"]
    dec = results["sort"]
    assert len(dec) == len(corpus)  # every row exactly once in shards or rejects
    # duplicates found across shards: a rejected row's representative lives in another shard
    shard_of = {u: v[0] for u, v in dec.items()}
    cross = [u for u, v in dec.items() if v[2] and shard_of[v[2]] != v[0]]
    assert len(cross) >= 20
    assert sum(1 for v in dec.values() if v[1] == "dedup:undecodable") == 1
    assert Dataset(str(tmp_path / "sort")).shard_ids() == source.shard_ids()


def test_empty_shard_through_runner(ray_session, tmp_path):
    samples = build_corpus(n_originals=4, edited=1, copies=1)
    src = write_dataset(tmp_path / "src", samples, shards=2, empty_shard=True)
    summary = run_stage("dedup", src.url, str(tmp_path / "out"))
    assert summary["rows_in"] == len(samples)
    out = Dataset(str(tmp_path / "out"))
    assert out.shard_ids() == [0, 1, 2] and out.read_shard(1).num_rows == 0


def test_rerun_after_sigkill_same_decisions(ray_session, source, tmp_path):
    run_stage("dedup", source.url, str(tmp_path / "clean"))
    killed = tmp_path / "killed"
    env = {**os.environ, "RAY_ADDRESS": ""}
    proc = subprocess.Popen(
        [sys.executable, "-m", "curate.cli", "dedup", "--input", source.url, "--output", str(killed)],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    keys = killed / "_plan" / "dedup" / "keys"
    deadline = time.time() + 180
    while time.time() < deadline and len(list(keys.glob("*.parquet"))) < 2 and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # mid-plan: some keys files written, no decisions yet
    proc.wait()
    assert not Dataset(str(killed)).is_complete()
    run_stage("dedup", source.url, str(killed))
    assert _decisions(killed) == _decisions(tmp_path / "clean")
    for name in ("clusters.parquet",):
        a = pq.read_table(tmp_path / "clean" / "_plan" / "dedup" / name)
        b = pq.read_table(killed / "_plan" / "dedup" / name)
        assert a.equals(b)
    assert not list(killed.rglob("*.tmp-*"))


def test_cli_explain(ray_session, source, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["dedup", "--input", source.url, "--output", str(out), "--set", "radius=4"]) == 0
    dec = _decisions(out)
    uid = next(u for u, v in dec.items() if v[2])
    capsys.readouterr()
    assert main(["inspect", str(out), "--uid", uid]) == 0
    text = capsys.readouterr().out
    info = json.loads(text[text.index("{") :])
    detail = info["stage_detail"]
    assert detail["kept"] == dec[uid][2]
    assert uid in {m[schema.UID] for m in detail["members"]}


def test_object_storage_distributed(ray_session, s3_bucket, tmp_path):
    samples = build_corpus(n_originals=8, edited=3, copies=2)
    src = write_dataset(f"s3://{s3_bucket}/src", samples, shards=3, empty_shard=False)
    local = write_dataset(tmp_path / "src", samples, shards=3, empty_shard=False)
    run_stage("dedup", src.url, f"s3://{s3_bucket}/out", config={"engine": "distributed"})
    run_stage("dedup", local.url, str(tmp_path / "out"), config={"engine": "sort"})
    assert _decisions(f"s3://{s3_bucket}/out") == _decisions(tmp_path / "out")
    assert sum(1 for v in _decisions(tmp_path / "out").values() if v[2]) >= 8
