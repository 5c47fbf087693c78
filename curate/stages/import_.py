"""The import stage: adopt existing WebDataset or img2dataset tars without copying their bytes.

``plan`` lists the input's ``.tar`` files in a fixed order, one input shard per tar (a tar named
``NNNNN.tar`` keeps its number), and notes which have img2dataset's ``NNNNN.parquet`` beside them.
Each shard scans its tar's headers (never trusting them: truncation, PAX long names, directories,
duplicate and non-contiguous members), reads every sample's members once in offset order, decodes
the image cheaply to validate it (JPEG at reduced scale), and computes sha256 and the pHash on the way.

Rows point into the source tar (``image_tar`` is its absolute URL); the source is only ever read. The
dataset's ``shards/NNNNN.idx`` is a DALI index of the kept samples of that source tar, so DALI reads
exactly the adopted samples from the tars where they are.

Sample keys: a member ``a/b.c.jpg`` belongs to key ``a/b.c`` (the name up to its LAST dot), which is
what a writer given the key ``a/b.c`` meant; webdataset's reader would split at the first dot instead
and see extensions ``c.jpg``, ``c.txt``.

Rejects (``drop_reason``): ``import:missing_caption``, ``import:missing_image`` (a key with no image
member, or an img2dataset row that failed to download), ``import:undecodable``,
``import:too_many_pixels`` (declared size over ``max_pixels``: not decoded), ``import:duplicate_key``
(a key seen again in the same tar with members it already has), ``import:duplicate_uid`` (an input
uid seen before: in the same tar, or in an earlier tar's img2dataset parquet), ``import:bad_member``
(a member over its size cap, a ``.json`` that does not parse as an object within the caps, or a
field of the wrong type where curate needs one: caption, url, uid). A bad sample costs its row, never
the shard: the tar, its members and its img2dataset parquet are all untrusted input.

JSON fields become columns up to ``max_json_columns`` distinct names (in order of first appearance);
the fields beyond go, per row, into one JSON-text column ``json_extra``, so nothing is dropped and a
tar of thousands of distinct keys cannot make thousands of columns.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import re
import tarfile
from collections import Counter
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field, field_validator

from curate import phash, schema
from curate.config import ConfigError
from curate.dataset import Dataset, to_url, uid_for, url_to_fs
from curate.images import SAFE_FORMATS, ImageFormat, ImageRejected, error_text, open_image
from curate.stage import PlanContext, ShardContext, Stage, StageConfig
from curate.wds import IDX_VERSION, TarScan, iter_tar

log = logging.getLogger(__name__)

STAGE = "import"
PLAN_SUBDIR = "import"  # the stage's plan store, _plan/import/
PLAN_FILE = "tars.json"
EARLIER_UIDS_FILE = "earlier_uids.json"  # shard -> input uids an earlier tar already has
MAX_EXAMPLES = 10  # names of odd keys kept in a shard's stats
JSON_EXTRA = "json_extra"  # the per-row JSON text of the json fields beyond max_json_columns
BAD_MEMBER = "bad_member"

# Private columns between load and process; never written.
_TXT_OFF, _TXT_LEN = "__txt_offset", "__txt_length"
_JSON_OFF, _JSON_LEN = "__json_offset", "__json_length"
_MEMBERS = "__members"
_REASON = "__reason"
_OCC = "__occurrence"
_WHY = "__why"  # the message of a load-time reject (an input field of the wrong type)
_PRIVATE = (_TXT_OFF, _TXT_LEN, _JSON_OFF, _JSON_LEN, _MEMBERS, _REASON, _OCC, _WHY)

# Input fields the stage sets itself from the bytes; an input's own values of these are not kept
# (width/height) or kept under another name (sha256 -> original_sha256).
_COMPUTED = {
    schema.WIDTH,
    schema.HEIGHT,
    schema.SHA256,
    schema.IMAGE_TAR,
    schema.IMAGE_OFFSET,
    schema.IMAGE_LENGTH,
    schema.IMAGE_FORMAT,
    schema.PHASH,
    schema.COLOR_SIG,
    schema.PHASH_CROPS,
    schema.KEY,
    schema.DROP_REASON,
}
# Input fields taken as they are (the row's identity and img2dataset's bookkeeping).
_TAKEN = {
    schema.UID,
    schema.URL,
    schema.CAPTION,
    schema.STATUS,
    schema.ERROR_MESSAGE,
    schema.ORIGINAL_WIDTH,
    schema.ORIGINAL_HEIGHT,
}
_ORDER = (
    schema.UID,
    schema.KEY,
    schema.URL,
    schema.CAPTION,
    schema.STATUS,
    schema.ERROR_MESSAGE,
    schema.WIDTH,
    schema.HEIGHT,
    schema.ORIGINAL_WIDTH,
    schema.ORIGINAL_HEIGHT,
    schema.SHA256,
    schema.ORIGINAL_SHA256,
    schema.PHASH,
    schema.COLOR_SIG,
    schema.PHASH_CROPS,
    schema.IMAGE_TAR,
    schema.IMAGE_OFFSET,
    schema.IMAGE_LENGTH,
    schema.IMAGE_FORMAT,
    schema.DROP_REASON,
)


class ImportConfig(StageConfig):
    # Image member extensions, in order of preference when a sample has several.
    image_exts: tuple[str, ...] = Field(("jpg", "jpeg", "png", "webp"), min_length=1)
    caption_exts: tuple[str, ...] = Field(("txt",), min_length=1)
    compute_phash: bool = True
    # Declared width x height above this is rejected from the header, never decoded (pixel bombs).
    max_pixels: int = Field(100_000_000, ge=1)
    # Image formats parsed at all (a subset of the safe list); any other is import:undecodable unread.
    image_formats: tuple[ImageFormat, ...] = Field(SAFE_FORMATS, min_length=1)
    # Size caps per member, checked from the tar header before a byte is read: a bigger member is
    # import:bad_member. Captions and json are small text; an image is bounded by max_pixels anyway.
    max_image_bytes: int = Field(256 << 20, ge=1)
    max_caption_bytes: int = Field(64 << 10, ge=1)
    max_json_bytes: int = Field(1 << 20, ge=1)
    # Distinct json field names made into columns; later ones go into json_extra.
    max_json_columns: int = Field(64, ge=0, le=4096)
    # A key whose members are not contiguous (other samples in between) is adopted (its members are
    # found by offset; counted in the shard's stats) or refused (the shard fails naming tar and key).
    noncontiguous: Literal["adopt", "refuse"] = "adopt"

    @field_validator("image_exts", "caption_exts")
    @classmethod
    def _lower(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        # member extensions are compared lower-cased (KEY.JPG is a jpg)
        return tuple(e.lower().lstrip(".") for e in v)


# -- plan --------------------------------------------------------------------------------------
def list_tars(input_url: str) -> list[dict[str, Any]]:
    """The input's tars in a fixed order, with their shard numbers and img2dataset parquet, if any."""
    fs, root = url_to_fs(input_url)
    packed: list[str] = []
    if root.endswith(".tar") and fs.isfile(root):
        paths, base = [root], posixpath.dirname(root)
    else:
        base = root
        found = fs.find(root)
        paths = sorted(p for p in found if p.endswith(".tar"))
        # Byte offsets into a compressed stream cannot be pointed at: such tars are not adoptable.
        packed = sorted(
            p for p in found if p.endswith((".tar.gz", ".tgz", ".tar.zst", ".tar.bz2", ".tar.xz"))
        )
        if packed:
            log.warning(
                "import: %d compressed tars (e.g. %s) cannot be adopted in place; decompress them first",
                len(packed),
                packed[0],
            )
    if not paths:
        hint = "; compressed tars must be decompressed first" if packed else ""
        raise ConfigError(f"{STAGE}: no .tar files under {input_url}{hint}")
    rels = [posixpath.relpath(p, base) for p in paths]
    stems = [posixpath.basename(r)[: -len(".tar")] for r in rels]
    # img2dataset-style NNNNN.tar keep their numbers, so shard 00003 is 00003.tar.
    numbered = all(s.isdigit() for s in stems) and len({int(s) for s in stems}) == len(stems)
    out = []
    for i, (path, rel, stem) in enumerate(zip(paths, rels, stems, strict=True)):
        parquet = path[: -len(".tar")] + ".parquet"
        out.append(
            {
                "shard": int(stem) if numbered else i,
                "tar": to_url(fs, path),
                "rel": rel,
                "parquet": to_url(fs, parquet) if fs.exists(parquet) else None,
            }
        )
    return out


# -- reading a tar's structure -----------------------------------------------------------------
def split_member(name: str) -> tuple[str, str]:
    """``a/b.c.jpg`` -> (``a/b.c``, ``jpg``): the key is the name up to its last dot."""
    slash = name.rfind("/") + 1
    dot = name.rfind(".")
    if dot <= slash:
        return name, ""
    return name[:dot], name[dot + 1 :]


def _group(members, tar: str, cfg: ImportConfig, stats: dict[str, Any]) -> list[dict[str, Any]]:
    """Samples of a tar in order of first appearance: {key, members: {ext: (offset, size, name)},
    occurrence, reason}.

    A run of contiguous members with one key is a sample; a run repeating an extension it already
    has starts a new one. A later run of a key seen before joins it when it adds only new extensions
    (a non-contiguous sample) and is a duplicate key otherwise.
    """
    samples: list[dict[str, Any]] = []
    by_key: dict[str, list[dict[str, Any]]] = {}
    current: dict[str, Any] | None = None
    noncontiguous: list[str] = []
    skipped: Counter = Counter()
    for m in members:
        if m.type not in (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE):
            skipped["not_a_regular_file"] += 1
            continue
        base = posixpath.basename(m.name)
        if not base or base.startswith("."):  # hidden files, as webdataset and DALI skip them
            skipped["hidden"] += 1
            continue
        key, ext = split_member(m.name)
        ext = ext.lower()
        if not ext:
            skipped["no_extension"] += 1
            continue
        if current is not None and current["key"] == key and ext not in current["members"]:
            current["members"][ext] = (m.offset, m.size, m.name)
            continue
        seen = by_key.get(key)
        if seen is not None and current is not None and current["key"] != key:
            first = seen[0]
            if ext not in first["members"] and first["reason"] is None:
                if cfg.noncontiguous == "refuse":
                    raise ValueError(
                        f"{tar}: key {key!r} has non-contiguous members (member {m.name!r} at byte "
                        f"{m.offset} follows other samples); set noncontiguous=adopt to adopt it"
                    )
                if key not in noncontiguous:
                    noncontiguous.append(key)
                first["members"][ext] = (m.offset, m.size, m.name)
                current = first
                continue
        sample = {
            "key": key,
            "members": {ext: (m.offset, m.size, m.name)},
            "occurrence": len(seen) if seen else 0,
            "reason": "duplicate_key" if seen else None,
        }
        by_key.setdefault(key, []).append(sample)
        samples.append(sample)
        current = sample
    if noncontiguous:
        log.warning(
            "%s: %d keys have non-contiguous members (adopted), e.g. %r",
            tar,
            len(noncontiguous),
            noncontiguous[0],
        )
    stats["noncontiguous_keys"] = len(noncontiguous)
    stats["noncontiguous_examples"] = noncontiguous[:MAX_EXAMPLES]
    stats["skipped_members"] = dict(sorted(skipped.items()))
    dup = [s["key"] for s in samples if s["reason"] == "duplicate_key"]
    stats["duplicate_keys"] = len(dup)
    stats["duplicate_key_examples"] = dup[:MAX_EXAMPLES]
    return samples


_BLANK = re.compile(r"\s")


def _idx_line(members: dict[str, tuple[int, int, str]]) -> str:
    # DALI splits index lines on whitespace; a name is only informative there, so blanks become '_'.
    return " ".join(
        f"{ext} {off} {size} {_BLANK.sub('_', name)}"
        for ext, (off, size, name) in sorted(members.items(), key=lambda kv: kv[1][0])
    )


# -- per row -----------------------------------------------------------------------------------
def _decode(data: bytes, cfg: ImportConfig, signature) -> tuple[int, int, tuple[int, bytes] | None]:
    """(width, height, (pHash, colour signature)) of the image; raises _Reject when it is not usable."""
    try:
        img = open_image(data, cfg.max_pixels, cfg.image_formats)
    except ImageRejected as e:
        raise _Reject(e.why, str(e)) from None
    w, h = img.size
    try:
        # JPEGs decode at 1/2..1/8 scale in the DCT domain: that validates the whole entropy
        # stream at a fraction of the cost, and is exactly the input phash_bytes hashes, so
        # dedup's hashes of these bytes agree with ours bit for bit.
        phash.draft(img)
        img.load()
    except Exception as e:  # noqa: BLE001 - truncated or corrupt data
        raise _Reject("undecodable", error_text(e)) from None
    return w, h, (signature(img) if signature is not None else None)


class _Reject(Exception):
    def __init__(self, why: str, message: str):
        super().__init__(message)
        self.why = why


def _json_fields(raw: bytes | None) -> tuple[dict[str, Any], str | None]:
    """A sample's json object, or ({}, why not). Nesting deeper than Python's recursion limit and
    integers longer than its digit limit are errors of this member, not of the shard."""
    if raw is None:
        return {}, None
    try:
        obj = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        return {}, f"unreadable json member: {type(e).__name__}: {str(e)[:200]}"
    if not isinstance(obj, dict):
        return {}, "json member is not an object"
    return obj, None


# Fields curate needs as text: a value of another type rejects the row instead of failing the shard.
_TEXT_FIELDS = (schema.CAPTION, schema.URL, schema.UID)


def _text(value: Any) -> tuple[str | None, bool]:
    """(text, ok): None stays None, numbers become their digits, anything else is not ok."""
    if value is None or isinstance(value, str):
        return value, True
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value), True
    return None, False


def _text_column(col: pa.ChunkedArray | pa.Array) -> tuple[pa.Array, list[bool]]:
    """An input column curate reads as text, as strings, and which rows held something else."""
    vals = [_text(v) for v in col.to_pylist()]
    return pa.array([v for v, _ in vals], pa.string()), [ok for _, ok in vals]


def _column(values: list[Any]) -> pa.Array:
    """An Arrow column from input values of unknown, possibly mixed types: nested values as JSON
    text, and everything as text when the scalars do not share one type."""
    vals = [json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v for v in values]
    try:
        return pa.array(vals)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        return pa.array([None if v is None else str(v) for v in vals], pa.string())


def _json_columns(json_rows: list[dict[str, Any]], taken: set[str], max_columns: int,
                  reasons: list[str | None], errors: list[str | None]) -> dict[str, list[Any]]:
    """Fields of each sample's json as columns (the parquet's win where both exist): the first
    ``max_columns`` distinct names, the rest per row as JSON text in ``json_extra``. A text field
    (url, uid) of another type rejects its row."""
    n = len(json_rows)
    out: dict[str, list[Any]] = {}
    extra: list[dict[str, Any] | None] = [None] * n
    for i, fields in enumerate(json_rows):
        for k, v in fields.items():
            target = _input_name(k)
            if target is None or target in taken or target == schema.CAPTION:
                continue
            if target in _TEXT_FIELDS:
                v, ok = _text(v)
                if not ok and reasons[i] is None:
                    reasons[i], errors[i] = BAD_MEMBER, f"json field {k!r} is not text"
            elif target in (schema.ORIGINAL_WIDTH, schema.ORIGINAL_HEIGHT) and not (
                    isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 31):
                v = None  # a size we cannot use is no size: the decoded one stands in
            if target in out or len(out) < max_columns or target in _TEXT_FIELDS:
                out.setdefault(target, [None] * n)[i] = v
            else:
                row = extra[i] = extra[i] if extra[i] is not None else {}
                row[k] = v
    if any(e is not None for e in extra):
        out[JSON_EXTRA] = [None if e is None else json.dumps(e, sort_keys=True, default=str) for e in extra]
    return out


def _typed(col: pa.Array, target: str, name: str, rows: dict[str, list[Any]]) -> pa.Array:
    """An img2dataset parquet column as curate needs it: text fields as strings (a row whose value is
    a list or a map is import:bad_member, not a failed shard), sizes as integers where they are."""
    if target in (*_TEXT_FIELDS, schema.STATUS, schema.ERROR_MESSAGE) and not pa.types.is_string(col.type):
        col, ok = _text_column(col)
        if target in _TEXT_FIELDS:
            for i, good in enumerate(ok):
                if not good and rows[_REASON][i] is None:
                    rows[_REASON][i] = BAD_MEMBER
                    rows[_WHY][i] = f"parquet column {name!r} holds a {target} that is not text"
    elif target in (schema.ORIGINAL_WIDTH, schema.ORIGINAL_HEIGHT) and not pa.types.is_integer(col.type):
        col = pa.array([v if isinstance(v, int) and not isinstance(v, bool) else None for v in col.to_pylist()],
                       pa.int64())
    return col


def _parquet_uids(url: str) -> list[str | None]:
    """The input uid column of an img2dataset parquet (read alone), or [] when it has none."""
    fs, path = url_to_fs(url)
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        if schema.UID not in pf.schema_arrow.names:
            return []
        return [None if u is None else str(u) for u in pf.read(columns=[schema.UID]).column(0).to_pylist()]


def _input_name(name: str) -> str | None:
    """Where an input field goes: its own name, ``original_sha256``, ``input_<name>`` when it would
    collide with a curate column, or None (not kept)."""
    if name in _TAKEN:
        return name
    if name == schema.SHA256:
        return schema.ORIGINAL_SHA256
    if name in (schema.WIDTH, schema.HEIGHT, schema.KEY):
        return None
    # curate's private names (``__...``) and json_extra are never obeyed: kept under input_<name>
    if name in schema.TYPES or name in _COMPUTED or name.startswith("__") or name == JSON_EXTRA:
        return f"input_{name}"
    return name


class _Samples:
    """What reading a shard's samples found, per row."""

    def __init__(self, n: int):
        self.width: list[int | None] = [None] * n
        self.height: list[int | None] = [None] * n
        self.sha: list[str | None] = [None] * n
        self.sigs: list[tuple[int, bytes] | None] = [None] * n
        self.json_rows: list[dict[str, Any]] = [{} for _ in range(n)]
        self.bad_json = 0


class ImportStage(Stage):
    name = STAGE
    Config = ImportConfig
    reads_dataset = False
    fingerprints_input = True

    def __init__(self, config: ImportConfig):
        super().__init__(config)
        self.config: ImportConfig = config
        self._phash = None

    def setup(self) -> None:
        if self.config.compute_phash:
            from curate.phash import signature_pil

            self._phash = signature_pil

    # -- plan ------------------------------------------------------------------------------
    def plan(self, ctx: PlanContext) -> list[int]:
        assert ctx.input_path is not None
        tars = list_tars(ctx.input_path)
        # An input uid repeated in a later tar's parquet is rejected there (duplicates inside one
        # tar are found by the shard itself). uids that exist only in webdataset .json members are
        # checked within their tar only: finding them would mean reading every tar here.
        with_parquet = [t for t in tars if t["parquet"]]
        seen: set[str] = set()
        earlier: dict[str, list[str]] = {}
        for t, uids in zip(
            with_parquet, ctx.map(_parquet_uids, [t["parquet"] for t in with_parquet]), strict=True
        ):
            mine = {u for u in uids if u is not None}
            dup = sorted(mine & seen)
            if dup:
                earlier[str(t["shard"])] = dup
            seen |= mine
        if earlier:
            log.warning(
                "import: %d input uids repeat a uid of an earlier tar; rejected as import:duplicate_uid",
                sum(map(len, earlier.values())),
            )
        store = ctx.plan_store(PLAN_SUBDIR)
        store.write_json(earlier, EARLIER_UIDS_FILE)
        store.write_json(tars, PLAN_FILE)
        kinds = Counter("img2dataset" if t["parquet"] else "webdataset" for t in tars)
        log.info("import: %d tars under %s (%s)", len(tars), ctx.input_path, dict(kinds))
        return [t["shard"] for t in tars]

    def _entry(self, ctx: ShardContext) -> dict[str, Any]:
        tars = ctx.plan_store(PLAN_SUBDIR).read_json(PLAN_FILE)
        for t in tars:
            if t["shard"] == ctx.shard:
                return t
        raise KeyError(f"shard {ctx.shard} is not in the import plan")

    # -- load: the tar's structure, joined with img2dataset's parquet ------------------------
    # Over 80 lines: the two input kinds (a bare tar, a tar with img2dataset's parquet) share the
    # row builder ``add`` and differ only in the order rows come in.
    def load(self, shard: int, ctx: ShardContext) -> pa.Table:
        entry = self._entry(ctx)
        fs, path = url_to_fs(entry["tar"])
        scan = TarScan()
        st: dict[str, Any] = {"tar": entry["tar"]}
        size = fs.size(path)
        with fs.open(path, "rb") as f:
            members = list(iter_tar(f, size, scan))
            if not scan.truncated and size > 0:
                # A tar cut exactly between two members parses cleanly; only the missing
                # end-of-archive blocks (two zero blocks) tell that members may be lost.
                end = scan.end + (-scan.end) % 512
                f.seek(end)
                tail = f.read(1024)
                if len(tail) < 1024 or tail.strip(b"\0"):
                    scan.truncated = True
                    scan.error = f"no end-of-archive marker after byte {end}"
        st["members"] = len(members)
        st["truncated"] = scan.truncated
        if scan.truncated:
            st["tar_error"] = scan.error
            log.warning(
                "import: tar %s is truncated or damaged (%s); keeping the %d members before the break",
                entry["tar"],
                scan.error,
                len(members),
            )
        samples = _group(members, entry["tar"], self.config, st)
        ctx.stats["import"] = st

        rows: dict[str, list[Any]] = {
            c: []
            for c in (schema.KEY, schema.IMAGE_OFFSET, schema.IMAGE_LENGTH, schema.IMAGE_FORMAT, *_PRIVATE)
        }
        parquet = None
        if entry["parquet"]:
            pfs, ppath = url_to_fs(entry["parquet"])
            with pfs.open(ppath, "rb") as f:
                parquet = pq.read_table(f)

        def add(sample: dict[str, Any] | None, key: str) -> None:
            m = sample["members"] if sample else {}
            img_ext = next((e for e in self.config.image_exts if e in m), None)
            txt_ext = next((e for e in self.config.caption_exts if e in m), None)
            rows[schema.KEY].append(key)
            rows[schema.IMAGE_FORMAT].append(img_ext)
            rows[schema.IMAGE_OFFSET].append(m[img_ext][0] if img_ext else None)
            rows[schema.IMAGE_LENGTH].append(m[img_ext][1] if img_ext else None)
            rows[_TXT_OFF].append(m[txt_ext][0] if txt_ext else None)
            rows[_TXT_LEN].append(m[txt_ext][1] if txt_ext else None)
            rows[_JSON_OFF].append(m["json"][0] if "json" in m else None)
            rows[_JSON_LEN].append(m["json"][1] if "json" in m else None)
            rows[_MEMBERS].append(json.dumps({e: list(v) for e, v in m.items()}) if m else None)
            reason = sample["reason"] if sample else None
            if reason is None and img_ext is None:
                reason = "missing_image"
            rows[_REASON].append(reason)
            rows[_WHY].append(None)
            rows[_OCC].append(sample["occurrence"] if sample else 0)

        if parquet is None:
            for s in samples:
                add(s, s["key"])
            table = pa.table(rows)
        else:
            # img2dataset: the parquet lists every input row (failed downloads too); the tar holds
            # the successes. Rows follow the parquet; tar samples it does not list come after.
            first = {s["key"]: s for s in samples if s["occurrence"] == 0}
            keys = (
                [str(k) if k is not None else None for k in parquet.column(schema.KEY).to_pylist()]
                if schema.KEY in parquet.column_names
                else [None] * parquet.num_rows
            )
            listed: Counter = Counter()
            for k in keys:
                listed[k] += 1
                if k is not None and listed[k] == 1:
                    add(first.get(k), k)
                else:  # a parquet row without a key, or repeating one: it cannot own a tar sample
                    why = "duplicate_key" if k is not None else "missing_image"
                    add({"members": {}, "reason": why, "occurrence": listed[k] - 1}, k)
            extra = [s for s in samples if s["key"] not in listed or s["occurrence"] > 0]
            for s in extra:
                add(s, s["key"])
            cols = {}
            for name in parquet.column_names:
                target = _input_name(name)
                if target is None:
                    continue
                col = _typed(parquet.column(name).combine_chunks(), target, name, rows)
                if len(extra):
                    col = pa.concat_arrays([col, pa.nulls(len(extra), col.type)])
                cols[target] = col
            table = pa.table(rows)
            for name, col in cols.items():
                table = table.append_column(name, col)
        st["samples"] = len(samples)
        return table

    def _read_sample(self, f, i: int, get: dict[str, list[Any]], got: _Samples, reasons: list[str | None],
                     errors: list[str | None], captions: list[str | None]) -> None:
        """Read row ``i``'s members (caption, json, image) from the open tar, each within its size cap
        (from the tar header, before a byte is read), validate and hash the image. A bad member is
        this row's reject, never the shard's failure."""
        cfg = self.config

        def read(off: int | None, length: int | None, cap: int, what: str) -> bytes | None:
            if off is None:
                return None
            if length > cap:
                raise _Reject(BAD_MEMBER, f"{what} member is {length:,} bytes, over the cap of {cap:,}")
            f.seek(off)
            data = f.read(length)
            return data if len(data) == length else None

        try:
            txt = read(get[_TXT_OFF][i], get[_TXT_LEN][i], cfg.max_caption_bytes, "caption")
            raw = read(get[_JSON_OFF][i], get[_JSON_LEN][i], cfg.max_json_bytes, "json")
        except _Reject as r:
            if reasons[i] is None:
                reasons[i], errors[i] = r.why, str(r)
            return
        fields, err = _json_fields(raw)
        got.bad_json += err is not None
        if err is not None and reasons[i] is None:
            reasons[i], errors[i] = BAD_MEMBER, err
        got.json_rows[i] = fields
        if txt is not None:
            captions[i] = txt.decode("utf-8", errors="replace")
        elif captions[i] is None and isinstance(fields.get(schema.CAPTION), str):
            captions[i] = fields[schema.CAPTION]
        if reasons[i] is not None:
            return
        try:
            data = read(get[schema.IMAGE_OFFSET][i], get[schema.IMAGE_LENGTH][i], cfg.max_image_bytes, "image")
            if data is None:
                raise _Reject("missing_image", "image member runs past the end of the tar")
            got.sha[i] = hashlib.sha256(data).hexdigest()
            got.width[i], got.height[i], got.sigs[i] = _decode(data, cfg, self._phash)
        except _Reject as r:
            reasons[i], errors[i] = r.why, str(r)

    # -- process: read each sample once, validate, hash ------------------------------------
    # Over 80 lines: the output row is assembled column by column in one fixed order, which reads
    # best in one place (each step is a line or two).
    def process(self, table: pa.Table, ctx: ShardContext) -> pa.Table:
        entry = self._entry(ctx)
        cfg = self.config
        n = table.num_rows
        fs, path = url_to_fs(entry["tar"])
        cols = set(table.column_names)
        get = {c: table.column(c).to_pylist() for c in table.column_names}
        reasons: list[str | None] = list(get[_REASON])
        errors: list[str | None] = [w or e for w, e in zip(get[_WHY], get.get(schema.ERROR_MESSAGE, [None] * n),
                                                          strict=True)]
        captions: list[str | None] = list(get.get(schema.CAPTION, [None] * n))
        order = sorted(
            (i for i in range(n) if get[_MEMBERS][i] is not None),
            key=lambda i: min(v[0] for v in json.loads(get[_MEMBERS][i]).values()),
        )
        got = _Samples(n)
        with fs.open(path, "rb") as f:
            for done, i in enumerate(order):
                ctx.rows_done(done)
                self._read_sample(f, i, get, got, reasons, errors, captions)
        width, height, sha, sigs, json_rows, bad_json = (got.width, got.height, got.sha, got.sigs, got.json_rows,
                                                        got.bad_json)

        json_cols = _json_columns(json_rows, cols, cfg.max_json_columns, reasons, errors)
        json_uids = json_cols.pop(schema.UID, [None] * n)
        uids: list[str | None] = list(get[schema.UID]) if schema.UID in get else json_uids
        for i, e in enumerate(json_cols.pop(schema.ERROR_MESSAGE, [None] * n)):
            errors[i] = errors[i] or _text(e)[0]
        seen_uids: set[str] = set(
            (ctx.plan_store(PLAN_SUBDIR).read_json(EARLIER_UIDS_FILE) or {}).get(str(ctx.shard), [])
        )
        rel = entry["rel"]
        for i in range(n):
            cap = captions[i]
            if reasons[i] is None and (cap is None or not cap.strip()):
                reasons[i] = "missing_caption"
            if uids[i] is None:
                parts = (rel, get[schema.KEY][i], cap)
                uids[i] = uid_for(*parts, get[_OCC][i]) if get[_OCC][i] else uid_for(*parts)
            else:
                uids[i] = str(uids[i])
            if uids[i] in seen_uids and reasons[i] is None:
                reasons[i], errors[i] = "duplicate_uid", "this uid appears earlier in the input"
            seen_uids.add(uids[i])

        out = table.drop_columns([c for c in _PRIVATE if c in cols])
        out = schema.with_column(out, schema.UID, uids)
        out = schema.with_column(out, schema.CAPTION, captions)
        if schema.URL not in out.column_names:
            out = schema.with_column(out, schema.URL, json_cols.pop(schema.URL, [None] * n), pa.string())
        for name, values in json_cols.items():
            out = out.append_column(name, _column(values))
        out = schema.with_column(out, schema.WIDTH, width)
        out = schema.with_column(out, schema.HEIGHT, height)
        for orig, now in ((schema.ORIGINAL_WIDTH, width), (schema.ORIGINAL_HEIGHT, height)):
            if orig in out.column_names:
                have = out.column(orig).to_pylist()
                out = schema.with_column(
                    out, orig, [h if h is not None else w for h, w in zip(have, now, strict=True)]
                )
            else:
                out = schema.with_column(out, orig, now)
        out = schema.with_column(out, schema.SHA256, sha)
        if cfg.compute_phash:
            out = schema.with_column(out, schema.PHASH, [None if x is None else x[0] for x in sigs])
            out = schema.with_column(out, schema.COLOR_SIG, [None if x is None else x[1] for x in sigs])
            out = schema.with_column(out, schema.PHASH_CROPS, [None if x is None else x[2] for x in sigs])
        out = schema.with_column(out, schema.IMAGE_TAR, [entry["tar"]] * n, pa.string())
        out = schema.with_column(out, schema.ERROR_MESSAGE, errors)
        out = schema.with_column(
            out, schema.DROP_REASON, [schema.reason(STAGE, r) if r else None for r in reasons]
        )
        # Curate's columns first, in one fixed order, then the input's own in their order: shards
        # of one input kind have identical schemas.
        head = [c for c in _ORDER if c in out.column_names]
        out = out.select(head + [c for c in out.column_names if c not in head])

        # The DALI index of the adopted samples, pointing into the source tar, in tar order.
        lines = [
            _idx_line({e: tuple(v) for e, v in json.loads(get[_MEMBERS][i]).items()})
            for i in order
            if reasons[i] is None
        ]
        ctx.output.write_bytes(
            f"{IDX_VERSION} {len(lines)}\n{''.join(x + chr(10) for x in lines)}".encode(),
            "shards",
            f"{ctx.output.shard_name(ctx.shard)}.idx",
        )
        st = ctx.stats.setdefault("import", {})
        st["bad_json"] = bad_json
        return out

    def explain(self, output: Dataset, uid: str) -> dict[str, Any] | None:
        for where, reader in (("kept", output.read_shard), ("rejected", output.read_rejects)):
            for n in output.shard_ids():
                t = reader(n)
                hit = t.filter(pc.equal(t.column(schema.UID), uid))
                if hit.num_rows:
                    row = hit.slice(0, 1).to_pylist()[0]
                    return {
                        "stage": STAGE,
                        "decision": where,
                        "reason": row.get(schema.DROP_REASON),
                        "error_message": row.get(schema.ERROR_MESSAGE),
                        "source_tar": row.get(schema.IMAGE_TAR),
                        "key": row.get(schema.KEY),
                        "shard": output.shard_name(n),
                    }
        return None
