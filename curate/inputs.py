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

A URL list is untrusted input. A gzipped file may inflate to at most ``MAX_INFLATION`` times its
size (and never less than ``MIN_INFLATED_CAP``); a line of a txt or jsonl list may hold at most
``MAX_LINE_BYTES``; a whole-file json list at most ``MAX_JSON_FILE_BYTES``. Each is one clear error
naming the file, never a driver grown by gigabytes. JSON rows may differ in their keys: the columns
are those of all rows of a batch, in order of first appearance. Column names starting with ``__``
are curate's own and refused.
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
MAX_LINE_BYTES = 1 << 20  # a URL list's line: a URL, a caption and a few fields, never megabytes
MAX_JSON_FILE_BYTES = 1 << 30  # a json (not jsonl) list is parsed whole; larger lists belong in jsonl
MAX_INFLATION = 200  # text compresses 3-10x; a bomb inflates 1000x and more
MIN_INFLATED_CAP = 256 << 20
RESERVED_PREFIX = "__"  # curate's private column names (plan markers); an input may not use them

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
    if "://" in name:  # a URL's query (a signed URL's) is not part of its name
        name = name.split("?", 1)[0]
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


class _Capped(io.RawIOBase):
    """A decompressed stream that raises InputError past ``cap`` bytes."""

    def __init__(self, inner, cap: int, url: str):
        self._inner, self._cap, self._url, self._n = inner, cap, url, 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self._inner.read(min(len(b), self._cap + 1 - self._n))
        self._n += len(data)
        if self._n > self._cap:
            raise InputError(f"{self._url} inflates to more than {self._cap:,} bytes "
                             f"({MAX_INFLATION}x its compressed size): not a URL list curate reads; "
                             "decompress it yourself if it is one")
        b[:len(data)] = data
        return len(data)

    def close(self) -> None:
        self._inner.close()
        super().close()


def _open(url: str, gz: bool):
    fs, path = url_to_fs(url)
    f = fs.open(path, "rb")
    if not gz:
        return f
    cap = max(MIN_INFLATED_CAP, MAX_INFLATION * (fs.size(path) or 0))
    return io.BufferedReader(_Capped(gzip.GzipFile(fileobj=f, mode="rb"), cap, url), 1 << 16)


def _lines(f, url: str) -> Iterator[tuple[int, str]]:
    """(line number, text) of a text stream, refusing a line over MAX_LINE_BYTES before holding it."""
    n, buf = 0, b""
    too_long = f"is longer than {MAX_LINE_BYTES:,} bytes: not a URL list line"
    while True:
        chunk = f.read(1 << 16)  # any binary stream (fsspec's files take no size in readline)
        parts = (buf + chunk).split(b"\n")
        buf = parts.pop() if chunk else b""
        for raw in parts:
            n += 1
            if len(raw) > MAX_LINE_BYTES:
                raise InputError(f"{url}: line {n} {too_long}")
            yield n, raw.decode("utf-8", errors="replace")
        if len(buf) > MAX_LINE_BYTES:
            raise InputError(f"{url}: line {n + 1} {too_long}")
        if not chunk:
            return


def _json_row(text: str, url: str, line: int) -> dict:
    try:
        row = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise InputError(f"{url}: line {line} is not JSON: {type(e).__name__}: {str(e)[:200]}") from None
    if not isinstance(row, dict):
        raise InputError(f"{url}: line {line} is not a JSON object (got {type(row).__name__})")
    return row


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
            first = f.readline(MAX_LINE_BYTES).decode("utf-8-sig", "replace").rstrip("\r\n")
        # Every column as string: type inference on the first block breaks on later blocks.
        cols = [c.strip().strip('"') for c in first.split(delim)] if first else []
        names = headerless_names(cols)
        if names:
            cols = names
        with _open(url, gz) as f:
            try:
                reader = pcsv.open_csv(
                    f,
                    read_options=pcsv.ReadOptions(block_size=1 << 22, encoding="utf8", column_names=names),
                    parse_options=pcsv.ParseOptions(delimiter=delim, newlines_in_values=True),
                    convert_options=pcsv.ConvertOptions(column_types={c: pa.string() for c in cols},
                                                        strings_can_be_null=False),
                )
                for b in reader:
                    yield pa.Table.from_batches([b])
            except pa.ArrowInvalid as e:
                raise InputError(f"{url}: not a readable {fmt} URL list: {str(e)[:300]}") from None
    elif fmt == "json":
        with _open(url, gz) as f:
            raw = f.read(MAX_JSON_FILE_BYTES + 1)
        if len(raw) > MAX_JSON_FILE_BYTES:
            raise InputError(f"{url}: a json URL list over {MAX_JSON_FILE_BYTES:,} bytes is parsed whole; "
                             "write it as jsonl (one object per line) instead")
        try:
            rows = json.loads(raw)
        except (ValueError, RecursionError) as e:
            raise InputError(f"{url}: not JSON: {type(e).__name__}: {str(e)[:200]}") from None
        del raw
        if not isinstance(rows, (list, dict)):
            raise InputError(f"{url}: a json URL list is a list of objects, got {type(rows).__name__}")
        if isinstance(rows, dict):  # pandas "columns" orientation: {col: {idx: value}} or {col: [values]}
            rows = pa.Table.from_pydict({k: list(v.values()) if isinstance(v, dict) else v
                                          for k, v in rows.items()}).to_pylist()
        for i in range(0, len(rows), BATCH_ROWS):
            yield _from_rows(rows[i:i + BATCH_ROWS])
    elif fmt == "jsonl":
        with _open(url, gz) as f:
            buf = []
            for n, line in _lines(f, url):
                if line.strip():
                    buf.append(_json_row(line, url, n))
                if len(buf) >= BATCH_ROWS:
                    yield _from_rows(buf)
                    buf = []
            if buf:
                yield _from_rows(buf)
    elif fmt == "txt":
        with _open(url, gz) as f:
            buf = []
            for _, line in _lines(f, url):
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
    """A table of JSON rows whose columns are the keys of ALL rows (a key missing from the first row
    is not lost), in order of first appearance; a column whose values do not share a type is text."""
    bad = next((i for i, r in enumerate(rows) if not isinstance(r, dict)), None)
    if bad is not None:
        raise InputError(f"row {bad + 1} of a json URL list is not an object (got {type(rows[bad]).__name__})")
    names = list(dict.fromkeys(k for r in rows for k in r))
    cols = {}
    for k in names:
        vals = [r.get(k) for r in rows]
        try:
            cols[k] = pa.array(vals)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            cols[k] = pa.array([None if v is None else v if isinstance(v, str) else json.dumps(v) for v in vals],
                               pa.string())
    t = pa.table(cols) if cols else pa.table({})
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
    reserved = [c for c in cols if c.startswith(RESERVED_PREFIX)]
    if reserved:
        raise InputError(f"{url}: column {reserved[0]!r} uses a name reserved for curate's own bookkeeping "
                         f"(names starting with {RESERVED_PREFIX!r}); rename it in the input")
    src_url = "url" if fmt == "txt" else url_col
    if src_url not in cols:
        raise InputError(f"{url}: no url column {src_url!r}; columns are {cols}; "
                         "name the URL column with --set url_col=COLUMN (every file needs it)")
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


# -- checks before any work starts ------------------------------------------------------------
# Names URL lists use for their URL and caption columns (LAION: URL/TEXT; CC3M/CC12M exports:
# image_url/caption; many scrapes: link/alt). Compared case-insensitively, in this order of preference.
URL_COLUMN_NAMES = ("url", "image_url", "img_url", "imageurl", "image_link", "img_src", "photo_url",
                    "src", "link", "image", "uri")
CAPTION_COLUMN_NAMES = ("caption", "text", "alt", "alt_text", "alttext", "title", "description", "txt")
SNIFF_ROWS = 50


def looks_like_url(value: object) -> bool:
    return isinstance(value, str) and value.strip().lower().startswith(("http://", "https://"))


def headerless_names(first_fields: Sequence[str]) -> list[str] | None:
    """Column names for a CSV/TSV whose first line is data, not a header; None when it is a header.

    A header never holds a URL, so a first line with a http(s) field is data. The URL field is named
    ``url``, the next field ``caption`` and the rest ``column_N`` (N counted from 1).
    """
    at = next((i for i, v in enumerate(first_fields) if looks_like_url(v)), None)
    if at is None:
        return None
    names = [f"column_{i + 1}" for i in range(len(first_fields))]
    names[at] = "url"
    rest = [i for i in range(len(first_fields)) if i != at]
    if rest:
        names[rest[0]] = "caption"
    return names


def _first_rows(url: str, fmt: str, gz: bool) -> pa.Table:
    for batch in _batches(url, fmt, gz):
        return batch.slice(0, SNIFF_ROWS)
    return pa.table({})


def _pick(columns: Sequence[str], known: Sequence[str]) -> str | None:
    lower = {c.lower(): c for c in columns}
    return next((lower[k] for k in known if k in lower), None)


def check_url_list(paths: str | Sequence[str], url_col: str, caption_col: str | None,
                   input_format: str | None, url_col_given: bool, caption_col_given: bool,
                   ) -> tuple[dict[str, str], list[str]]:
    """Look at the first rows of the first input file before any work starts.

    Returns (config updates, notes): where the configured column is the default and missing, a
    column with a well-known name (``URL``, ``image_url``, ``TEXT``...) or, for the URL, the one
    column holding http(s) URLs is used instead, and a note says so. A column the user named that
    is missing, or a URL column that cannot be found, is an InputError whose message names the fix.
    """
    files = list_inputs(paths, input_format)
    url, name = files[0]
    fmt, gz = file_format(url, input_format)
    if fmt == "txt":
        return {}, []
    rows = _first_rows(url, fmt, gz)
    cols = rows.column_names
    reserved = [c for c in cols if c.startswith(RESERVED_PREFIX)]
    if reserved:
        raise InputError(f"{name}: column {reserved[0]!r} uses a name reserved for curate's own bookkeeping "
                         f"(names starting with {RESERVED_PREFIX!r}); rename it in the input")
    updates: dict[str, str] = {}
    notes: list[str] = []
    if fmt in ("csv", "tsv") and _headerless(url, gz, fmt):
        notes.append(f"{name} has no header row (its first line holds a URL): reading it as "
                     + ", ".join(f"column {i + 1} = {c}" for i, c in enumerate(cols) if not c.startswith("column_")))
    if url_col not in cols:
        shown = ", ".join(cols) if cols else "none"
        if url_col_given:
            raise InputError(f"{name} has no column {url_col!r} (columns: {shown}); "
                             "name the URL column with --set url_col=COLUMN")
        found = _pick(cols, URL_COLUMN_NAMES)
        if found is None:
            holding = [c for c in cols if rows.num_rows
                       and all(looks_like_url(v) for v in rows.column(c).to_pylist() if v is not None)
                       and any(looks_like_url(v) for v in rows.column(c).to_pylist())]
            found = holding[0] if len(holding) == 1 else None
        if found is None:
            raise InputError(f"{name} has no column {url_col!r} (columns: {shown}); "
                             "name the URL column with --set url_col=COLUMN")
        updates["url_col"] = found
        notes.append(f"{name} has no column {url_col!r}; using {found!r} as the URL column "
                     f"(say --set url_col={found} to make it explicit)")
    if caption_col and caption_col not in cols:
        found = None if caption_col_given else _pick(cols, CAPTION_COLUMN_NAMES)
        if caption_col_given:
            raise InputError(f"{name} has no column {caption_col!r} (columns: {', '.join(cols)}); "
                             "name the caption column with --set caption_col=COLUMN, or --set caption_col=null")
        if found is not None and found != updates.get("url_col"):
            updates["caption_col"] = found
            notes.append(f"{name} has no column {caption_col!r}; using {found!r} as the caption column "
                         f"(say --set caption_col={found} to make it explicit)")
        else:
            notes.append(f"{name} has no caption column; captions are left empty "
                         "(name one with --set caption_col=COLUMN)")
    return updates, notes


def _headerless(url: str, gz: bool, fmt: str) -> bool:
    delim = "\t" if fmt == "tsv" else ","
    with _open(url, gz) as f:
        first = f.readline(MAX_LINE_BYTES).decode("utf-8-sig", "replace").rstrip("\r\n")
    return headerless_names([c.strip().strip('"') for c in first.split(delim)]) is not None


_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.zst", ".tar.bz2", ".tar.xz")


def _file_kind(path: str) -> str:
    """'urls' for a URL list, 'tar' for a tar, else 'other', from the name alone."""
    low = path.lower()
    if low.endswith(_TAR_SUFFIXES):
        return "tar"
    return "urls" if _known(path, None) else "other"


def dataset_problem(path: str) -> str | None:
    """Why ``path`` is not a complete curate dataset, as one line that names the fix; None if it is."""
    from curate.dataset import PLAN_DIR, Dataset

    fs, root = url_to_fs(path)
    if not fs.exists(root):
        return f"{path} does not exist"
    if fs.isfile(root):
        kind = _file_kind(root)
        parent = posixpath.dirname(posixpath.dirname(root))
        if posixpath.basename(posixpath.dirname(root)) in ("shards", "rejects") and \
                fs.exists(posixpath.join(parent, "_manifest.json")):
            owner = posixpath.dirname(posixpath.dirname(path.rstrip("/")))  # string ops: URLs too
            return f"{path} is one file of the curate dataset {owner}: give the dataset folder, {owner}"
        if kind == "urls":
            return (f"{path} is not a curate dataset: this is a URL list: use "
                    f"`curate download --input {path} --output DIR` first")
        if kind == "tar":
            return (f"{path} is not a curate dataset: this is a tar file: use "
                    f"`curate import --input {path} --output DIR` to adopt it first")
        return f"{path} is a file, not a curate dataset (a curate dataset is a folder with _manifest.json)"
    ds = Dataset(path)
    if ds.is_complete():
        return None
    if ds.read_json(PLAN_DIR, "run.json") is not None or ds.shard_ids():
        return (f"{path} is an unfinished curate dataset (no _manifest.json yet): "
                "rerun the command that wrote it to finish it")
    kinds = {_file_kind(f) for f in fs.find(root)}
    if "tar" in kinds:
        return (f"{path} holds tar files but is not a curate dataset: use "
                f"`curate import --input {path} --output DIR` to adopt them first")
    if "urls" in kinds:
        return (f"{path} holds URL lists but is not a curate dataset: use "
                f"`curate download --input {path} --output DIR` first")
    return f"{path} is not a curate dataset (no _manifest.json): curate did not write it"


def import_input_problem(path: str) -> str | None:
    """For ``curate import``: a URL list (not tars) given as input, with the hint to download it."""
    fs, root = url_to_fs(path)
    if fs.isfile(root) and _file_kind(root) == "urls":
        return (f"{path} is a URL list, not WebDataset tars: "
                f"use `curate download --input {path} --output DIR` to fetch its images")
    if fs.isdir(root):
        kinds = {_file_kind(f) for f in fs.find(root)}
        if "tar" not in kinds and "urls" in kinds:
            return (f"{path} holds URL lists but no .tar files: "
                    f"use `curate download --input {path} --output DIR` to fetch its images")
    return None


def check_raw_input(stage_name: str, cfg, input: str) -> tuple[dict[str, str], list[str]]:
    """(config updates, notes) for the raw input of download or import; raises InputError."""
    if stage_name == "import":
        problem = import_input_problem(input)
        if problem:
            raise InputError(problem)
    if stage_name == "download":
        given = cfg.model_fields_set
        return check_url_list(input, cfg.url_col, cfg.caption_col, cfg.input_format,
                              "url_col" in given, "caption_col" in given)
    return {}, []
