"""Crash-order injection for the shard commit: a crash before each rename, then a rerun.

Every rename the commit makes (the data files', then the stats marker's) is counted; run k crashes
just before the k-th. After each crash the directory is checked from the outside (file listing and
bytes, not the commit code): a shard whose marker exists has every file whole, and a rerun after
clearing the debris commits the same bytes as a commit that never crashed.
"""

from __future__ import annotations

import os

import pyarrow as pa
import pytest

from curate import schema
from curate.dataset import Dataset, new_attempt


class Crash(Exception):
    pass


TAR = b"tar bytes of shard 3\n" * 40
IDX = "member 0 512\n"
FILES = ("00003.parquet", "00003.tar", "00003.idx", "00003.stats.json")


def _tables() -> tuple[pa.Table, pa.Table]:
    kept = pa.table({schema.UID: [f"{i:032x}" for i in range(5)], schema.CAPTION: [f"c{i}" for i in range(5)]})
    rej = pa.table({schema.UID: [f"{9:032x}"], schema.CAPTION: ["x"], schema.DROP_REASON: ["f:r"]})
    return kept, rej


def _commit(ds: Dataset) -> None:
    attempt = new_attempt()
    with ds.open_tmp_tar(3, attempt) as f:
        f.write(TAR)
    kept, rej = _tables()
    ds.commit_shard(3, kept, rej, {"rows_in": 6, "rows_out": 5}, attempt=attempt, tar_written=True, idx_text=IDX)


def _snapshot(root) -> dict[str, bytes]:
    out = {}
    for folder in ("shards", "rejects"):
        d = root / folder
        for name in sorted(os.listdir(d)) if d.exists() else []:
            out[f"{folder}/{name}"] = (d / name).read_bytes()
    return out


def _crash_before(ds: Dataset, k: int) -> list[int]:
    calls = [0]
    real = ds.rename

    def rename(src: str, dst: str) -> None:
        calls[0] += 1
        if calls[0] == k:
            raise Crash(f"killed before rename {k}: {dst}")
        real(src, dst)

    ds.rename = rename  # type: ignore[method-assign]
    return calls


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    root = tmp_path_factory.mktemp("clean")
    ds = Dataset(str(root))
    calls = _crash_before(ds, 0)
    _commit(ds)
    return _snapshot(root), calls[0]


def test_a_clean_commit_renames_every_file(clean):
    snap, renames = clean
    assert {f"shards/{n}" for n in FILES} | {"rejects/00003.parquet"} == set(snap)
    assert snap["shards/00003.tar"] == TAR and snap["shards/00003.idx"] == IDX.encode()
    assert renames >= 5  # tar, idx, kept, rejects, then the marker


def test_crash_before_each_rename_never_leaves_a_marker_without_its_files(clean, tmp_path):
    want, renames = clean
    for k in range(1, renames + 1):
        root = tmp_path / f"k{k}"
        ds = Dataset(str(root))
        _crash_before(ds, k)
        with pytest.raises(Crash):
            _commit(ds)
        after = Dataset(str(root))
        # the marker is renamed last, so a crash before any rename leaves the shard uncommitted
        assert not (root / "shards" / "00003.stats.json").exists(), k
        assert after.shard_ids() == [], k
        # and a rerun clears the debris and commits the same bytes as a run that never crashed
        after.clear_shard(3)
        after.sweep_tmp()
        _commit(after)
        assert _snapshot(root) == want, k
        assert after.read_shard(3).num_rows == 5 and after.read_rejects(3).num_rows == 1


def test_marker_is_the_last_file_renamed(clean, tmp_path):
    _, renames = clean
    ds = Dataset(str(tmp_path / "order"))
    order = []
    real = ds.rename

    def rename(src: str, dst: str) -> None:
        order.append(os.path.basename(dst))
        real(src, dst)

    ds.rename = rename  # type: ignore[method-assign]
    _commit(ds)
    assert order[-1] == "00003.stats.json"
    assert set(order[:-1]) >= {"00003.parquet", "00003.tar", "00003.idx"}
