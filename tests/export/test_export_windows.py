"""Export's windowed plan: every output shard reads the parts of about two windows (not every input
shard), the layout is still a bijection, and the shuffle stays within its documented bounds."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate import schema
from curate.dataset import Dataset, uid_for
from curate.stage import PlanContext, RunOptions, ShardContext
from curate.stages.export import (
    _OUT_INDEX,
    _OUT_SHARD,
    ExportConfig,
    ExportStage,
    parts_of_shard,
    position_correlation,
)
from curate.testing.datasets import write_table_dataset

SHARDS, ROWS, WINDOW, PER = 60, 50, 6, 40


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Dataset:
    root = tmp_path_factory.mktemp("many-shards")
    tables = [pa.table({schema.UID: [uid_for("w", n, i) for i in range(ROWS)],
                        schema.CAPTION: [f"{n}-{i}" for i in range(ROWS)],
                        schema.IMAGE_LENGTH: pa.array([1000] * ROWS, pa.int64())}) for n in range(SHARDS)]
    return write_table_dataset(str(root / "src"), tables, "filter")


def _plan(source: Dataset, out: Dataset, **cfg):
    stage = ExportStage(ExportConfig(samples_per_shard=PER, shuffle_window=WINDOW, **cfg))
    ctx = PlanContext(input_path=source.url, input=source, output=out, plan_dir=out.path("_plan"),
                      options=RunOptions(), map=lambda fn, items: [fn(i) for i in items])
    return stage, stage.plan(ctx)


def test_windowed_plan_reads_few_parts_and_shuffles_within_bounds(source, tmp_path):
    out = Dataset(str(tmp_path / "out"))
    stage, ids = _plan(source, out, val_fraction=0.1)
    rec = stage._plan_record(out)
    assert len(rec["windows"]) == math.ceil(SHARDS / WINDOW)

    # input position of every uid: shard order, then row order
    in_pos = {uid_for("w", n, i): n * ROWS + i for n in range(SHARDS) for i in range(ROWS)}
    in_shard = {u: p // ROWS for u, p in in_pos.items()}
    placed = {}
    for name in rec["parts"]:
        t = pq.read_table(out.path("_plan", "export", "parts", name), columns=[schema.UID, _OUT_SHARD, _OUT_INDEX])
        for u, s, i in zip(*(t.column(c).to_pylist() for c in (schema.UID, _OUT_SHARD, _OUT_INDEX)), strict=True):
            placed[u] = (s, i)
    # a bijection onto the planned shards
    assert sorted(placed) == sorted(in_pos)
    assert len(set(placed.values())) == len(placed)
    per_shard = Counter(s for s, _ in placed.values())
    assert [per_shard[s] for s in ids] == rec["rows_per_shard"]

    # reads: a shard opens the parts of the windows its positions overlap; windows of a split are
    # runs of positions, so overlaps <= shards + 2 x windows: reads <= W x R + 2 M, not M x R.
    # A train shard (windows hold more train rows than a shard) overlaps at most two windows.
    reads = [len(parts_of_shard(rec, s)) for s in ids]
    train = rec["splits"]["train"]["shards"]
    assert max(reads[s] for s in train) <= 2 * WINDOW
    assert sum(reads) <= WINDOW * (len(ids) + 2 * len(rec["windows"])) < SHARDS * len(ids) / 3
    for s in ids:
        ctx = ShardContext(shard=s, input_path=source.url, input=source, output=out, plan_dir=out.path("_plan"),
                           options=RunOptions())
        got = stage.load(s, ctx).column(schema.UID).to_pylist()
        assert sorted(got) == sorted(u for u, (sh, _) in placed.items() if sh == s)

    # quality (bounds in docs/SCALING.md): input vs output position over all rows |r| <= 3 / sqrt(M)
    # (windows are seeded draws of input shards), inside each window |r| <= 3 / sqrt(rows of it)
    uids = sorted(placed)
    a = np.array([in_pos[u] for u in uids])
    b = np.array([placed[u][0] * PER + placed[u][1] for u in uids])
    assert abs(position_correlation(a, b)) <= 3 / math.sqrt(SHARDS)
    for w in rec["windows"]:
        members = {int(rec["parts"][i].split(".")[0]) for i in w["parts"]}
        mine = np.array([in_shard[u] in members for u in uids])
        assert abs(position_correlation(a[mine], b[mine])) <= 3 / math.sqrt(mine.sum())
    # and every full train shard mixes most of its window's input shards
    for s in train[:-1]:
        sources = {in_shard[u] for u, (sh, _) in placed.items() if sh == s}
        assert len(sources) >= WINDOW // 2


def test_one_window_is_the_global_shuffle(source, tmp_path):
    # at most shuffle_window input shards: one window, every part read, as before windows existed
    out = Dataset(str(tmp_path / "one"))
    stage = ExportStage(ExportConfig(samples_per_shard=PER, shuffle_window=SHARDS))
    ctx = PlanContext(input_path=source.url, input=source, output=out, plan_dir=out.path("_plan"),
                      options=RunOptions(), map=lambda fn, items: [fn(i) for i in items])
    ids = stage.plan(ctx)
    rec = stage._plan_record(out)
    assert len(rec["windows"]) == 1
    assert all(len(parts_of_shard(rec, s)) == SHARDS for s in ids)
