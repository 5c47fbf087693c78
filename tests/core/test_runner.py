"""The runner on a real embedded Ray: commit, skip, resume after SIGKILL, failures, verify, S3."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from curate import schema
from curate.cli import main
from curate.config import ConfigError
from curate.dataset import Dataset
from curate.runner import StageFailed, run_stage
from curate.stage import RunOptions
from curate.verify import verify

SYNTH = "curate.testing.stages:Synth"
PASS = "curate.testing.stages:Passthrough"


def _uids(ds: Dataset) -> tuple[list[str], list[str]]:
    kept, dropped = [], []
    for _, t in ds.iter_shards([schema.UID]):
        kept += t.column(0).to_pylist()
    for _, t in ds.iter_rejects([schema.UID]):
        dropped += t.column(0).to_pylist()
    return kept, dropped


def test_stage_chain_commits_every_row_once(ray_session, tmp_path):
    src = str(tmp_path / "src")
    s = run_stage(SYNTH, str(tmp_path), src, config={"shards": 4, "rows_per_shard": 7})
    assert (s["rows_in"], s["kept"]) == (28, 28)
    ds = Dataset(src)
    assert ds.shard_ids() == [0, 1, 2, 3]
    assert ds.read_json("shards", "sizes.json") == {f"0000{i}.tar": 7 for i in range(4)}
    assert verify(ds) == ([], 28)

    out = str(tmp_path / "pt")
    s = run_stage(PASS, src, out, config={"drop_every": 3})
    kept, dropped = _uids(Dataset(out))
    src_uids = _uids(ds)[0]
    assert sorted(kept + dropped) == sorted(src_uids)
    assert len(set(kept + dropped)) == 28
    assert all(int(u, 16) % 3 == 0 for u in dropped) and dropped
    assert s["drops"] == {"passthrough:divisible": len(dropped)}
    assert schema.DROP_REASON not in Dataset(out).schema().names
    # the pointers of a Parquet-only stage still resolve to the source's bytes
    assert verify(Dataset(out)) == ([], len(kept))


def test_complete_output_is_skipped_and_other_config_refused(ray_session, tmp_path):
    src = str(tmp_path / "src")
    run_stage(SYNTH, str(tmp_path), src, config={"shards": 2, "rows_per_shard": 3})
    before = Path(src, "_manifest.json").read_text()
    again = run_stage(SYNTH, str(tmp_path), src, config={"shards": 2, "rows_per_shard": 3})
    assert again["skipped"] and Path(src, "_manifest.json").read_text() == before
    with pytest.raises(ConfigError, match="different config"):
        run_stage(SYNTH, str(tmp_path), src, config={"shards": 2, "rows_per_shard": 4})
    s = run_stage(SYNTH, str(tmp_path), src, config={"shards": 2, "rows_per_shard": 4},
                  options=RunOptions(overwrite=True))
    assert s["kept"] == 8


def test_failing_shard_names_itself_and_other_shards_stay_committed(ray_session, tmp_path):
    src = str(tmp_path / "src")
    run_stage(SYNTH, str(tmp_path), src, config={"shards": 4, "rows_per_shard": 2})
    out = str(tmp_path / "out")
    with pytest.raises(StageFailed, match="shard 2: RuntimeError: injected failure on shard 2"):
        run_stage(PASS, src, out, config={"fail_on_shard": 2})
    ds = Dataset(out)
    assert not ds.is_complete() and 2 not in ds.shard_ids()
    assert all(not p.endswith(".tmp") for p in ds.fs.find(ds.root))


def _pipeline(tmp_path: Path, shards: int, sleep: float) -> Path:
    pipe = {
        "name": "kill-test",
        "output": str(tmp_path / "out"),
        "input": str(tmp_path),
        "stages": [
            {"stage": SYNTH, "name": "synth",
             "config": {"shards": shards, "rows_per_shard": 6, "sleep_per_shard": sleep,
                        "resources": {"concurrency": 1}}},
            {"stage": PASS, "name": "pass", "config": {"drop_every": 2, "sleep_per_shard": sleep,
                                                       "resources": {"concurrency": 1}}},
        ],
    }
    path = tmp_path / "pipe.yaml"
    path.write_text(yaml.safe_dump(pipe))
    return path


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.suffix in (".parquet", ".tar", ".idx") or p.name == "sizes.json"}


def test_sigkill_mid_run_then_rerun_equals_uninterrupted_run(ray_session, tmp_path):
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    clean.mkdir()
    killed.mkdir()
    assert main(["run", str(_pipeline(clean, 6, 0.0))]) == 0

    pipe = _pipeline(killed, 6, 0.6)
    env = {**os.environ, "RAY_ADDRESS": ""}
    proc = subprocess.Popen([sys.executable, "-m", "curate.cli", "run", str(pipe)], env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stats = killed / "out" / "synth" / "shards"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(stats.glob("*.stats.json"))) < 2:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its Ray workers, mid-stage
    proc.wait()
    partial = Dataset(str(killed / "out" / "synth"))
    assert not partial.is_complete() and 2 <= len(partial.shard_ids()) < 6

    assert main(["run", str(pipe)]) == 0
    for step in ("synth", "pass"):
        a, b = _files(clean / "out" / step), _files(killed / "out" / step)
        assert a.keys() == b.keys() and len(a) > 0
        for name in a:
            if name.endswith(".parquet") and step == "synth":
                # pointers name each run's own tar; everything else is equal
                ta, tb = pq.read_table(clean / "out" / step / name), pq.read_table(killed / "out" / step / name)
                assert ta.drop_columns([schema.IMAGE_TAR]).equals(tb.drop_columns([schema.IMAGE_TAR]))
            elif step == "synth" or not name.endswith(".parquet"):
                assert a[name] == b[name], name
        ds = Dataset(str(killed / "out" / step))
        kept, dropped = _uids(ds)
        assert len(kept) + len(dropped) == 36 == len(set(kept + dropped))
        assert verify(ds)[0] == []
        assert not [p for p in (killed / "out" / step).rglob("*.tmp")]


def test_verify_names_truncated_tar_and_flipped_byte(ray_session, tmp_path, capsys):
    src = tmp_path / "src"
    run_stage(SYNTH, str(tmp_path), str(src), config={"shards": 3, "rows_per_shard": 4})
    ds = Dataset(str(src))
    row = ds.read_shard(1).slice(2, 1).to_pylist()[0]
    tar1 = src / "shards" / "00001.tar"
    raw = bytearray(tar1.read_bytes())
    raw[row[schema.IMAGE_OFFSET] + 40] ^= 0xFF
    tar1.write_bytes(bytes(raw))
    tar2 = src / "shards" / "00002.tar"
    tar2.write_bytes(tar2.read_bytes()[:3000])

    assert main(["verify", str(src)]) == 1
    out = capsys.readouterr().out
    assert f"shard 00001 row 2 (uid {row[schema.UID]}" in out and "sha256" in out
    assert "shard 00002: tar" in out and "damaged" in out
    assert "shard 00000" not in out


def test_s3_dataset_through_ray_workers(ray_session, s3_bucket):
    src = f"s3://{s3_bucket}/src"
    run_stage(SYNTH, "/", src, config={"shards": 2, "rows_per_shard": 3})
    out = f"s3://{s3_bucket}/pt"
    s = run_stage(PASS, src, out, config={"drop_every": 2})
    assert s["rows_in"] == 6
    ds = Dataset(out)
    assert ds.is_complete() and ds.url.startswith("s3://")
    assert verify(ds)[0] == [] and verify(Dataset(src))[0] == []


def test_empty_shards_flow_through_every_step(ray_session, tmp_path):
    src = str(tmp_path / "src")
    s = run_stage(SYNTH, str(tmp_path), src, config={"shards": 2, "rows_per_shard": 0})
    assert (s["rows_in"], s["kept"]) == (0, 0)
    out = str(tmp_path / "pt")
    s = run_stage(PASS, src, out, config={"drop_every": 2})
    ds = Dataset(out)
    assert ds.is_complete() and ds.shard_ids() == [0, 1] and s["kept"] == 0
    assert verify(ds) == ([], 0)
