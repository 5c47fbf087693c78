"""``curate inspect``: what a dataset holds, and where one sample went and why."""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate import schema, stages
from curate.dataset import Dataset

_HIDDEN = (schema.IMAGE_EMBEDDING, schema.TEXT_EMBEDDING, schema.COLOR_SIG)


def describe(ds: Dataset, rows: int = 5) -> str:
    m = ds.manifest()
    lines = [f"dataset: {ds.url}"]
    if m is None:
        lines.append(f"state: INCOMPLETE ({len(ds.shard_ids())} shards committed, no manifest)")
    else:
        t = m["totals"]
        lines += [
            f"stage: {m['stage']}   shards: {len(m['shards'])}   created: {m['created']}",
            f"rows in: {t['rows_in']}   kept: {t['kept']}   dropped: {t['dropped']}",
        ]
        for reason, count in t["drops"].items():
            lines.append(f"  {reason}: {count}")
        if m.get("removals"):
            lines.append(f"removals: {len(m['removals'])} request(s)")
    sch = ds.schema()
    if sch is not None:
        lines.append("schema:")
        lines += [f"  {f.name}: {f.type}" for f in sch]
        first = ds.read_shard(ds.shard_ids()[0]).slice(0, rows)
        lines.append(f"first {first.num_rows} rows:")
        for r in _rows(first):
            lines.append("  " + json.dumps(r, default=str))
    return "\n".join(lines)


def _rows(table: pa.Table) -> list[dict[str, Any]]:
    keep = [c for c in table.column_names if c not in _HIDDEN]
    return table.select(keep).to_pylist()


def find(ds: Dataset, uid: str) -> tuple[str, int, dict[str, Any]] | None:
    """("shards" or "rejects", shard number, row) for a uid, scanning only the uid column first."""
    for n in ds.shard_ids():
        for folder, path in (("shards", ds.shard_path(n, "parquet")), ("rejects", ds.shard_path(n, "rejects.parquet"))):
            if not ds.fs.exists(path):
                continue
            uids = pq.read_table(path, columns=[schema.UID], filesystem=ds.fs).column(0)
            hit = pc.index(uids, uid).as_py()
            if hit >= 0:
                table = pq.read_table(path, filesystem=ds.fs).slice(hit, 1)
                return folder, n, _rows(table)[0]
    return None


def explain(ds: Dataset, uid: str) -> dict[str, Any]:
    found = find(ds, uid)
    out: dict[str, Any] = {"dataset": ds.url, "uid": uid}
    if found is None:
        out["found"] = False
        return out
    folder, n, row = found
    out.update(found=True, where=f"{folder}/{ds.shard_name(n)}.parquet",
               kept=folder == "shards", row=row)
    m = ds.manifest() or ds.read_json("_plan", "run.json") or {}
    stage_name = m.get("stage")
    if stage_name:
        try:
            cls = stages.get(stage_name)
        except (stages.UnknownStage, ImportError):
            cls = None
        if cls is not None:
            from curate.config import build

            cfg = build(cls.Config, m.get("config", {}), f"{stage_name} config")
            detail = cls(cfg).explain(ds, uid)
            if detail is not None:
                out["stage_detail"] = detail
    return out
