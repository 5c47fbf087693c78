"""Resume: a recaption run SIGKILLed after some shards redoes only the rest.

The killed run is a real ``curate recaption`` process (driver, Ray and the model actor, killed as a
process group). The rerun must leave every committed shard's files as they were (same bytes, same
modification time: not rewritten), commit the others, and end with the same rows as a run that was
never interrupted: every input uid exactly once in shards ∪ rejects.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import yaml
from recaption_data import write_source

from curate import schema
from curate.cli import main
from curate.dataset import Dataset

SHARDS = 6


def _committed_files(root: Path) -> dict[str, tuple[bytes, int]]:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and "_plan" not in p.parts and p.name != "_manifest.json":
            out[str(p.relative_to(root))] = (p.read_bytes(), p.stat().st_mtime_ns)
    return out


def _rows(ds: Dataset) -> pa.Table:
    kept = pa.concat_tables([t for _, t in ds.iter_shards()])
    rejected = pa.concat_tables([t for _, t in ds.iter_rejects()])
    kept = kept.append_column(schema.DROP_REASON, pa.nulls(kept.num_rows, pa.string()))
    return pa.concat_tables([kept, rejected.select(kept.column_names)]).sort_by(schema.UID)


def test_killed_run_redoes_only_uncommitted_shards(ray_session, tiny_vlms, tmp_path):
    src = write_source(tmp_path / "src", shards=SHARDS, rows=12, corrupt=frozenset({(4, 0)}))
    config = {
        "model": tiny_vlms["llava"],
        "max_new_tokens": 24,
        "batch_size": 4,
        "on_bad": "reject",
        # one shard at a time, so the kill lands between shard commits with work left
        "resources": {"concurrency": 1},
    }
    cfg_file = tmp_path / "recaption.yaml"
    cfg_file.write_text(yaml.safe_dump(config))
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    argv = ["recaption", "--input", src.url, "--output", str(killed), "--config", str(cfg_file)]

    env = {**os.environ, "RAY_ADDRESS": ""}
    proc = subprocess.Popen([sys.executable, "-m", "curate.cli", *argv], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shards_dir = killed / "shards"
    deadline = time.time() + 240
    try:
        while time.time() < deadline and len(list(shards_dir.glob("*.stats.json"))) < 2:
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # driver, Ray and the model actor, mid-run
        proc.wait()
    partial = Dataset(str(killed))
    done = partial.shard_ids()
    assert not partial.is_complete() and 2 <= len(done) < SHARDS, done
    before = _committed_files(killed)
    committed_before = {k: v for k, v in before.items() if any(
        k.startswith(f"{d}/{partial.shard_name(n)}.") for n in done for d in ("shards", "rejects"))}
    assert len(committed_before) == 3 * len(done)  # parquet, rejects parquet, stats marker

    assert main(argv) == 0
    after = _committed_files(killed)
    for name, (data, mtime) in committed_before.items():
        assert after[name] == (data, mtime), f"{name} was rewritten by the rerun"
    resumed = Dataset(str(killed))
    assert resumed.is_complete() and resumed.shard_ids() == list(range(SHARDS))

    assert main(["recaption", "--input", src.url, "--output", str(clean), "--config", str(cfg_file)]) == 0
    a, b = _rows(resumed), _rows(Dataset(str(clean)))
    assert a.equals(b)
    uids = a.column(schema.UID).to_pylist()
    assert len(uids) == len(set(uids)) == SHARDS * 12
    assert a.column(schema.DROP_REASON).to_pylist().count("recaption:undecodable") == 1
