"""Complete datasets written directly, for tests that need a stage's input without running the stages
before it. They go through the same writers a stage's output does (TarWriter, Dataset.commit_shard,
the runner's manifest), so what a test reads is laid out exactly like real output.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from curate import schema
from curate.dataset import Dataset, make_key, new_attempt, sha256_hex
from curate.wds import TarWriter

IMAGE = "_image"  # the row key that carries a row's image bytes into write_image_dataset


class _Written:
    """What the runner's manifest writer needs to know of the stage that 'wrote' a dataset."""

    def __init__(self, writes_images: bool):
        self.writes_images = writes_images


def write_image_dataset(root: str, shards: Sequence[Sequence[dict[str, Any]]], stage: str = "download") -> Dataset:
    """A dataset that owns its bytes. ``shards[n]`` lists rows: ``IMAGE`` holds the image bytes and
    ``schema.IMAGE_FORMAT`` its extension; every other key is a column (uid, caption, url, extras).
    The key, sha256 (unless given) and pointers are filled in; the tar holds KEY.ext, KEY.txt (the
    caption) and KEY.json."""
    ds = Dataset(str(root))
    for n, rows in enumerate(shards):
        attempt = new_attempt()
        tar_file = ds.open_tmp_tar(n, attempt)
        writer = TarWriter(tar_file)
        records = []
        for i, row in enumerate(rows):
            row = dict(row)
            data, ext = row.pop(IMAGE), row[schema.IMAGE_FORMAT]
            key = make_key(n, i)
            meta = {k: v for k, v in row.items() if isinstance(v, (str, int, float, bool)) or v is None}
            where = writer.add(key, {ext: data, "txt": row.get(schema.CAPTION) or "",
                                     "json": json.dumps(meta, sort_keys=True)})
            row.setdefault(schema.SHA256, sha256_hex(data))
            row.update({schema.KEY: key, schema.IMAGE_TAR: ds.tar_url(n),
                        schema.IMAGE_OFFSET: where[ext][0], schema.IMAGE_LENGTH: where[ext][1]})
            records.append(row)
        writer.close()
        tar_file.close()
        table = _table(records) if records else _empty()
        _commit(ds, n, table, attempt, writer)
    return finish(ds, stage, writes_images=True)


def _table(records: list[dict[str, Any]]) -> pa.Table:
    """Rows to a table, schema columns typed as the schema says (a uint64 pHash above 2**63 would not
    fit the int64 that inference picks)."""
    names = list(dict.fromkeys(k for r in records for k in r))
    return pa.table({k: pa.array([r.get(k) for r in records], type=schema.TYPES.get(k)) for k in names})


def write_table_dataset(root: str, tables: Sequence[pa.Table], stage: str,
                        config: dict[str, Any] | None = None, input: str | None = None) -> Dataset:
    """A Parquet-only dataset (rows pointing into another dataset's tars), one table per shard;
    ``config`` is what its manifest records as the stage's config (e.g. a clip model's name).
    ``input`` is the dataset it was derived from: by default the one owning the tars its first
    pointer names, as a stage's run would have recorded it (pointers only reach the lineage)."""
    ds = Dataset(str(root))
    for n, table in enumerate(tables):
        _commit(ds, n, table, new_attempt(), None)
    if input is None:
        input = _pointed_dataset(tables)
    return finish(ds, stage, writes_images=False, config=config,
                  input={"url": Dataset(input).url} if input else None)


def _pointed_dataset(tables: Sequence[pa.Table]) -> str | None:
    for t in tables:
        if schema.IMAGE_TAR in t.column_names:
            first = next((p for p in t.column(schema.IMAGE_TAR).to_pylist() if p), None)
            if first and "/shards/" in first:
                return first.rsplit("/shards/", 1)[0]
    return None


def _empty() -> pa.Table:
    return pa.schema([schema.field(c) for c in (schema.UID, schema.CAPTION)]).empty_table()


def _commit(ds: Dataset, n: int, table: pa.Table, attempt: str, writer: TarWriter | None) -> None:
    table = schema.conform(table)
    rejects = table.slice(0, 0).append_column(schema.DROP_REASON, pa.array([], pa.string()))
    stats = {"rows_in": table.num_rows, "rows_out": table.num_rows, "rejected": 0, "drops": {},
             "tar_bytes": writer.bytes_written if writer else 0}
    ds.commit_shard(n, table, rejects, stats, attempt=attempt, tar_written=writer is not None,
                    idx_text=writer.index_text() if writer else None)


def finish(ds: Dataset, stage: str, writes_images: bool, config: dict[str, Any] | None = None,
           input: dict[str, Any] | None = None) -> Dataset:
    """Write the manifest the way the runner does, over the committed shards."""
    from curate.runner import write_manifest

    ids = ds.shard_ids()
    record = {"stage": stage, "config": config or {}, "input": input}
    write_manifest(ds, _Written(writes_images), record, {"shards": ids, "shard_digits": ds.shard_digits}, 0.0)
    ds.refresh()
    return ds
