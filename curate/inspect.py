"""``curate inspect``: what a dataset holds, and where one sample went and why.

A sample is followed through the whole lineage (each manifest names its input): the answer for a
uid or URL asked of the final export says at which stage it left and why, not only "not here".
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate import schema, stages
from curate.dataset import PLAN_DIR, RUN_FILE, Dataset

_HIDDEN = (schema.IMAGE_EMBEDDING, schema.TEXT_EMBEDDING, schema.COLOR_SIG, schema.PHASH_CROPS)


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
    m = ds.manifest() or ds.read_json(PLAN_DIR, RUN_FILE) or {}
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


# -- following a sample through the lineage ------------------------------------------------------
def _why(reason: str, row: dict[str, Any], config: dict[str, Any]) -> str:
    """A drop reason in words, with the row's value and the rule's setting where both are known."""
    stage, _, rule = reason.partition(":")
    w = row.get(schema.ORIGINAL_WIDTH) or row.get(schema.WIDTH)
    h = row.get(schema.ORIGINAL_HEIGHT) or row.get(schema.HEIGHT)
    if rule == "language" and config.get("languages") is not None:
        return f"language {row.get(schema.LANGUAGE) or 'unknown'} not in [{', '.join(config['languages'])}]"
    if rule == "min_side" and config.get("min_side"):
        return f"shorter side {min(w or 0, h or 0)} px < min_side {config['min_side']}"
    if rule == "max_side" and config.get("max_side"):
        return f"longer side {max(w or 0, h or 0)} px > max_side {config['max_side']}"
    if rule == "aspect_ratio" and w and h and config.get("max_aspect_ratio"):
        return f"aspect ratio {max(w / h, h / w):.2f} > max_aspect_ratio {config['max_aspect_ratio']}"
    if rule == "caption_min_chars" and config.get("caption_min_chars"):
        return f"caption {row.get(schema.CAPTION)!r} shorter than {config['caption_min_chars']} characters"
    if rule == "caption_min_words" and config.get("caption_min_words"):
        return f"caption {row.get(schema.CAPTION)!r} has fewer than {config['caption_min_words']} words"
    if row.get(schema.DUP_OF):
        return f"{rule}: duplicate of {row[schema.DUP_OF]}"
    if stage == "clip" and row.get(schema.CLIP_SCORE) is not None:
        return f"{rule} (clip_score {row[schema.CLIP_SCORE]:.4f})"
    if row.get(schema.ERROR_MESSAGE):
        return f"{rule}: {row[schema.ERROR_MESSAGE]}"
    return rule


def _member_note(detail: dict[str, Any], uid: str) -> str:
    """The " (5 bits from the kept row, confirm 1.23)" of a duplicate-cluster member, else ""."""
    me = next((m for m in detail.get("members") or [] if m.get(schema.UID) == uid), None)
    if not me or me.get("distance") is None:
        return ""
    confirm = f", confirm {me['confirm']:.2f}" if me.get("confirm") is not None else ""
    where = "a crop of " if me.get("crop") else ""
    return f" ({me['distance']} bits from {where}the kept row{confirm})"


def trace(ds: Dataset, uid: str) -> dict[str, Any]:
    """``explain`` for ``ds`` plus the sample's path through every dataset of its lineage: kept or
    dropped at each, and a one-line verdict ("dropped at filter: language nl not in [en]")."""
    from curate.report import lineage

    out = explain(ds, uid)
    path: list[dict[str, Any]] = []
    verdict = None
    for d in lineage(ds) if ds.is_complete() else [ds]:
        m = d.manifest() or {}
        stage_name = m.get("stage", "?")
        found = find(d, uid)
        if found is None:
            path.append({"stage": stage_name, "dataset": d.url, "found": False})
            continue
        folder, n, row = found
        step = {"stage": stage_name, "dataset": d.url, "found": True, "kept": folder == "shards",
                "where": f"{folder}/{d.shard_name(n)}.parquet"}
        if folder == "rejects" and verdict is None:
            reason = row.get(schema.DROP_REASON) or "?"
            step["reason"] = reason
            verdict = f"dropped at {stage_name}: {_why(reason, row, m.get('config') or {})}"
            # the dropping stage's own account (dedup: the cluster, each member's distance and
            # confirmation score), as `curate inspect` on that dataset would give it
            detail = out.get("stage_detail") if d.url == ds.url else explain(d, uid).get("stage_detail")
            if detail is not None:
                step["stage_detail"] = detail
                verdict += _member_note(detail, uid)
            if not out.get("found"):
                out["row"] = row
        path.append(step)
    if verdict is None:
        if out.get("found") and out.get("kept"):
            verdict = f"kept in {ds.url}"
        elif any(p["found"] for p in path):
            last = [p for p in path if p["found"]][-1]
            verdict = (f"kept at {last['stage']}, then absent from the next dataset "
                       "(removed on request, or not carried over)")
        else:
            verdict = f"not found in {ds.url} or any dataset it was made from"
    out["lineage"] = path
    out["verdict"] = verdict
    return out


def uids_for_url(ds: Dataset, url: str) -> list[str]:
    """uids of the rows with this URL in the oldest dataset of the lineage (every input row is in
    its shards or rejects there), else in ``ds`` itself."""
    from curate.report import lineage

    chain = lineage(ds) if ds.is_complete() else [ds]
    for d in chain:
        hits: list[str] = []
        for it in (d.iter_shards([schema.UID, schema.URL]), d.iter_rejects([schema.UID, schema.URL])):
            for _, t in it:
                if schema.URL not in t.column_names:
                    break
                mask = pc.equal(t.column(schema.URL), url)
                hits += t.filter(pc.fill_null(mask, False)).column(schema.UID).to_pylist()
        if hits:
            return sorted(set(hits))
    return []
