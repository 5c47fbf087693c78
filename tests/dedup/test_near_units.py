"""The distributed pHash engine that reads the hash column (no shuffle): same decisions as the one
process engine, bytes written bounded by the pairs, and the memory-sized one-process limit."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from dedup_data import build_corpus, write_dataset

from curate import neardup, schema
from curate.dataset import Dataset
from curate.stage import PlanContext, RunOptions, ShardContext
from curate.stages import dedup
from curate.stages.dedup import DedupConfig, DedupStage


def _run(inp: Dataset, out_root, slots: int, written: list[int], **cfg) -> dict[str, tuple]:
    def local_map(fn, items):
        res = [fn(i) for i in items]
        if fn is dedup._near_unit:
            written.extend(res)
        return res

    stage = DedupStage(DedupConfig(**cfg))
    out = Dataset(str(out_root))
    ctx = PlanContext(input_path=inp.url, input=inp, output=out, plan_dir=out.path("_plan"),
                      options=RunOptions(), map=local_map, slots=slots)
    rows = {}
    for n in stage.plan(ctx):
        sctx = ShardContext(shard=n, input_path=inp.url, input=inp, output=out, plan_dir=out.path("_plan"),
                            options=RunOptions())
        for r in stage.process(inp.read_shard(n), sctx).to_pylist():
            rows[r[schema.UID]] = (r[schema.DROP_REASON], r[schema.DUP_OF])
    assert not out.fs.exists(out.path("_plan", "dedup", "near"))  # intermediate files are gone
    return rows


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("src"), build_corpus())


@pytest.mark.parametrize("slots,hashes_per_task", [(1, 10**8), (3, 10**8), (2, 1000)])
def test_units_decide_like_the_sort_engine(dataset, tmp_path, slots, hashes_per_task):
    want = _run(dataset, tmp_path / "sort", 1, [], engine="sort")
    written: list[int] = []
    got = _run(dataset, tmp_path / "dist", slots, written, engine="distributed", hashes_per_task=hashes_per_task)
    assert got == want
    assert sum(1 for v in want.values() if v[1]) > 40
    # the entries searched: every row's pHash and its crops' (oracle for the pairs: brute force)
    out = Dataset(str(tmp_path / "dist"))
    keys = pq.read_table(out.path("_plan", "dedup", "keys"), columns=[schema.PHASH, schema.PHASH_CROPS])
    h = keys.column(schema.PHASH).drop_null().to_numpy()
    crops = np.concatenate([np.frombuffer(b, "<u8") for b in keys.column(schema.PHASH_CROPS).drop_null().to_pylist()])
    entries = np.concatenate([h, crops])
    assert len(crops) == 5 * len(h) > 0
    values = np.unique(entries)
    value_pairs = len(neardup.near_pairs_bruteforce(values, DedupConfig().radius)[0])
    tables = len(neardup.tables(neardup.choose_blocks(len(h), DedupConfig().radius), DedupConfig().radius))
    units = len(written)
    assert units == (min(slots, tables) if hashes_per_task > len(entries) else
                     tables * -(-len(entries) // hashes_per_task))
    # bytes written: the pairs of values (16 B, at most all within the radius), the repeated values,
    # a few hundred bytes of container per file; the shuffle wrote 17 B per entry per table
    assert 0 < sum(written) <= 600 * units + 16 * value_pairs + 8 * len(entries)
    assert sum(written) < 17 * len(entries) * tables / 4

def test_one_process_limit_follows_memory():
    assert dedup.local_limit(DedupConfig(local_max_rows=123)) == 123
    free = dedup.available_memory()
    assert free > 0
    assert dedup.local_limit(DedupConfig()) == max(1_000_000, free // dedup.LOCAL_BYTES_PER_ROW)

