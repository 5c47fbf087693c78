"""Reading URL lists: parquet, csv, tsv, json, jsonl, txt (each optionally gzipped), from one file, a
list of files or a folder, on any fsspec filesystem.

Rows come out as Arrow batches with the url under ``schema.URL``, the caption under
``schema.CAPTION`` and every other input column carried through (renamed ``input_<name>`` when it
would collide with a column the download stage writes). Each row gets a ``uid``: the input's own
``uid`` column when it has one (DataComp-style), else a 128-bit hash of the file's name relative to
the input root, the row number in that file, the url and the caption, so the same input always
gives the same uids, whatever machine or order reads it.

Files are read in sorted order and rows in file order, streaming in batches, so a list larger than
memory can be cut into shards.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import posixpath
from collections.abc import Iterator, Sequence

import pyarrow as pa

from curate import schema
from curate.dataset import uid_for, url_to_fs

log = logging.getLogger(__name__)

FORMATS = ("parquet", "csv", "tsv", "json", "jsonl", "txt")
BATCH_ROWS = 65536

# Columns the download stage writes; an input column of the same name is kept as input_<name>.
OWNED = frozenset({
    schema.KEY, schema.STATUS, schema.ERROR_MESSAGE, schema.WIDTH, schema.HEIGHT, schema.ORIGINAL_WIDTH,
    schema.ORIGINAL_HEIGHT, schema.SHA256, schema.IMAGE_TAR, schema.IMAGE_OFFSET, schema.IMAGE_LENGTH,
    schema.IMAGE_FORMAT, schema.PHASH, schema.DROP_REASON,
})


class InputError(ValueError):
    """The URL list cannot be read as asked (missing column, unknown format, no files)."""


def file_format(path: str, forced: str | None = None) -> tuple[str, bool]:
    """(format, gzipped) of ``path`` from its extension, or ``forced``."""
    name = path.lower()
    gz = name.endswith(".gz")
    if gz:
        name = name[:-3]
    if forced:
        return forced, gz
    ext = name.rsplit(".", 1)[-1] if "." in posixpath.basename(name) else ""
    if ext == "ndjson":
        ext = "jsonl"
    if ext not in FORMATS:
        raise InputError(f"{path}: unknown URL list format {ext!r}; expected one of {', '.join(FORMATS)} (+ .gz)")
    return ext, gz


def list_inputs(paths: str | Sequence[str], forced_format: str | None = None) -> list[tuple[str, str]]:
    """(url of file, name relative to its input root) for every input file, sorted.

    A folder contributes every file with a known extension below it; names relative to the folder
    make uids independent of where the folder lives.
    """
    if isinstance(paths, str):
        paths = [paths]
    out: list[tuple[str, str]] = []
    for p in paths:
        fs, root = url_to_fs(p)
        if fs.isdir(root):
            found = sorted(f for f in fs.find(root) if _known(f, forced_format))
            for f in found:
                out.append((_url(fs, f), posixpath.relpath(f, root)))
        elif fs.exists(root):
            out.append((_url(fs, root), posixpath.basename(root)))
        else:
            raise InputError(f"input {p} does not exist")
    if not out:
        raise InputError(f"no URL list files found in {list(paths)}")
    return out


def _known(path: str, forced: str | None) -> bool:
    try:
        file_format(path, forced)
        return True
    except InputError:
        return False


def _url(fs, path: str) -> str:
    from curate.dataset import to_url

    return to_url(fs, path)


def _open(url: str, gz: bool):
    fs, path = url_to_fs(url)
    f = fs.open(path, "rb")
    return gzip.GzipFile(fileobj=f, mode="rb") if gz else f


def _batches(url: str, fmt: str, gz: bool) -> Iterator[pa.Table]:
    """Raw rows of one file as tables of at most BATCH_ROWS rows, columns as in the file."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        with _open(url, gz) as f:
            src = io.BytesIO(f.read()) if gz else f  # parquet needs seeks; gzip streams cannot
            pf = pq.ParquetFile(src)
            for b in pf.iter_batches(batch_size=BATCH_ROWS):
                yield pa.Table.from_batches([b])
    elif fmt in ("csv", "tsv"):
        import pyarrow.csv as pcsv

        delim = "\t" if fmt == "tsv" else ","
        with _open(url, gz) as f:
            first = f.readline().decode("utf-8-sig", "replace").rstrip("\r\n")
        # Every column as string: type inference on the first block breaks on later blocks.
        cols = [c.strip().strip('"') for c in first.split(delim)] if first else []
        with _open(url, gz) as f:
            reader = pcsv.open_csv(
                f,
                read_options=pcsv.ReadOptions(block_size=1 << 22, encoding="utf8"),
                parse_options=pcsv.ParseOptions(delimiter=delim, newlines_in_values=True),
                convert_options=pcsv.ConvertOptions(column_types={c: pa.string() for c in cols},
                                                    strings_can_be_null=False),
            )
            for b in reader:
                yield pa.Table.from_batches([b])
    elif fmt == "json":
        with _open(url, gz) as f:
            rows = json.load(f)
        if isinstance(rows, dict):  # pandas "columns" orientation: {col: {idx: value}} or {col: [values]}
            rows = pa.Table.from_pydict({k: list(v.values()) if isinstance(v, dict) else v
                                          for k, v in rows.items()}).to_pylist()
        for i in range(0, len(rows), BATCH_ROWS):
            yield _from_rows(rows[i:i + BATCH_ROWS])
    elif fmt == "jsonl":
        with _open(url, gz) as f:
            buf = []
            for line in io.TextIOWrapper(f, encoding="utf-8"):
                if line.strip():
                    buf.append(json.loads(line))
                if len(buf) >= BATCH_ROWS:
                    yield _from_rows(buf)
                    buf = []
            if buf:
                yield _from_rows(buf)
    elif fmt == "txt":
        with _open(url, gz) as f:
            buf = []
            for line in io.TextIOWrapper(f, encoding="utf-8"):
                line = line.strip()
                if line:
                    buf.append(line)
                if len(buf) >= BATCH_ROWS:
                    yield pa.table({"url": pa.array(buf, pa.string())})
                    buf = []
            if buf:
                yield pa.table({"url": pa.array(buf, pa.string())})
    else:  # pragma: no cover - file_format rejects it first
        raise InputError(f"unknown format {fmt}")


def _from_rows(rows: list) -> pa.Table:
    t = pa.Table.from_pylist(rows)
    for i, f in enumerate(t.schema):
        if pa.types.is_null(f.type):  # an all-null column in this batch: string keeps batches compatible
            t = t.set_column(i, pa.field(f.name, pa.string()), t.column(i).cast(pa.string()))
    return t


def read_url_list(
    paths: str | Sequence[str],
    url_col: str = "url",
    caption_col: str | None = "caption",
    uid_col: str = "uid",
    extra_columns: Sequence[str] | None = None,
    input_format: str | None = None,
) -> Iterator[pa.Table]:
    """Normalised batches (uid, url, caption, extras...) of every input row, in a fixed order.

    ``extra_columns`` None carries every other column; a list carries only those.
    """
    for url, name in list_inputs(paths, input_format):
        fmt, gz = file_format(url, input_format)
        row0 = 0
        for raw in _batches(url, fmt, gz):
            yield _normalise(raw, url, name, row0, fmt, url_col, caption_col, uid_col, extra_columns)
            row0 += raw.num_rows


def _normalise(raw: pa.Table, url: str, name: str, row0: int, fmt: str, url_col: str,
               caption_col: str | None, uid_col: str, extra_columns: Sequence[str] | None) -> pa.Table:
    cols = raw.column_names
    src_url = "url" if fmt == "txt" else url_col
    if src_url not in cols:
        raise InputError(f"{url}: no url column {src_url!r}; columns are {cols}")
    urls = raw.column(src_url).cast(pa.string())
    if caption_col and caption_col in cols:
        captions = raw.column(caption_col).cast(pa.string())
    else:
        if caption_col and caption_col != "caption" and fmt != "txt":
            raise InputError(f"{url}: no caption column {caption_col!r}; columns are {cols}")
        captions = pa.nulls(raw.num_rows, pa.string())
    url_list = urls.to_pylist()
    cap_list = captions.to_pylist()
    given = raw.column(uid_col).cast(pa.string()).to_pylist() if uid_col in cols else [None] * raw.num_rows
    uids = [g if g else uid_for(name, row0 + i, u, c)
            for i, (g, u, c) in enumerate(zip(given, url_list, cap_list, strict=True))]
    out = {schema.UID: pa.array(uids, pa.string()), schema.URL: urls, schema.CAPTION: captions}
    used = {src_url, caption_col, uid_col}
    extras = [c for c in cols if c not in used] if extra_columns is None else list(extra_columns)
    for c in extras:
        if c not in cols:
            raise InputError(f"{url}: extra column {c!r} not found; columns are {cols}")
        target = f"input_{c}" if (c in OWNED or c in out) else c
        out[target] = raw.column(c)
    return pa.table(out)
