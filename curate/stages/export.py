"""export: reshard the kept samples of any curated dataset into training shards (ARCHITECTURE §2, §4).

The input is any curated dataset: its rows point (image_tar / image_offset / image_length) at the
bytes in whichever dataset owns them. Export copies those bytes, never re-encoded, into new tars
``KEY.<ext> + KEY.txt + KEY.json``, with Parquet, DALI ``.idx`` and ``sizes.json`` beside them (the
runner writes the last two), so webdataset, HF ``datasets``, DALI and open_clip read the output as is.

Planning is global and memory-bounded. Pass 1 reads only ``uid`` and ``image_length`` of each input
shard (in parallel) to count rows, estimate sample size and pick the held-out split. Pass 2 gives
every row a global position with a seeded pseudo-random permutation (a Feistel network over the row's
global index, so no process ever holds the whole dataset) and writes each input shard's rows,
tagged with their output shard and index, to ``_plan/export/parts/``, sorted by output shard with
one row group per output shard. Input shards are cut, in a seeded order, into windows of
``shuffle_window`` shards, and each window's rows are permuted over its own run of output positions
(one window, a full shuffle, when the input has no more shards than that). An output shard's ``load``
reads its row group from the parts of the windows it overlaps (about two): W x R + 2M small reads in
all rather than inputs x outputs, each found from the part's footer statistics without touching the
other groups. ``position_correlation`` measures what the window costs in shuffle quality.

Layout of the output: train shards are ``0 .. T-1`` and validation shards ``T .. T+V-1``, their tars
``shards/train-NNNNN.tar`` and ``shards/val-NNNNN.tar`` (so a reader given only the folder, HF
``datasets``, opens just the tars and finds both splits); every row carries ``split``, every shard's
stats say its split, and :func:`split_shards` returns both lists.
The held-out set depends only on the uids (not on ``seed``), so reshuffling keeps the same val set.
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import json
import logging
import math
import time
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field, model_validator

from curate import schema
from curate.config import ConfigError
from curate.dataset import Dataset, digits_for, make_key, read_images, sha256_hex
from curate.faces import FaceConfig
from curate.images import sniff
from curate.stage import PlanContext, ShardContext, Stage, StageConfig

log = logging.getLogger(__name__)

NAME = "export"
SPLIT_TRAIN = "train"
SPLIT_VAL = "val"
SOURCE_ORIGINAL = "original"
SOURCE_RECAPTION = "recaption"

# Internal columns of the plan parts; never written to the output.
_OUT_SHARD = "_export_shard"
_OUT_INDEX = "_export_index"
_PLAN_SUBDIR = "export"
_PLAN_FILE = "export.json"

# Salts keep the three uses of the uid hash independent of each other.
_SPLIT_SALT = b"curate-export-split"
_CAPTION_SALT = b"curate-export-caption"
# Tar bytes per sample besides the image: three 512-byte headers, padding, txt and json.
_SAMPLE_OVERHEAD = 3 * (512 + 256) + 768
_FEISTEL_ROUNDS = 6
_READ_BATCH_BYTES = 64 * 1024 * 1024
_EXPORTED = ("jpg", "png", "webp")  # member extensions export writes (what DALI and the peers decode)
# Columns the per-sample json leaves out: pointers describe this tar itself, the rest are internal.
_JSON_SKIP = {*schema.POINTER_COLUMNS, schema.DROP_REASON, _OUT_SHARD, _OUT_INDEX}


class ExportConfig(StageConfig):
    seed: int = 0
    # Input shards shuffled together: the inputs are cut (in a seeded order) into windows of this
    # many shards, and each window's rows are permuted over its own run of output positions, so an
    # output shard reads from the parts of about two windows (~2 x shuffle_window reads) instead of
    # from every input shard (M x R reads in all). An input of at most this many shards is one
    # window: a full shuffle. docs/SCALING.md gives the measured shuffle quality.
    shuffle_window: int = Field(64, ge=1)
    # Samples per output shard; when None, derived from target_shard_bytes and the mean sample size.
    samples_per_shard: int | None = Field(None, ge=1)
    target_shard_bytes: int = Field(1_000_000_000, ge=4096)
    # What KEY.txt holds: the original caption, the recaption, or a per-sample mix (Recap-DataComp:
    # probability recaption_probability of the new caption, seeded and fixed per uid).
    caption: Literal["original", "recaption", "mix"] = "original"
    recaption_probability: float = Field(0.8, ge=0.0, le=1.0)
    # caption="recaption" and a row has none: write its original caption, or reject the row.
    missing_recaption: Literal["original", "drop"] = "original"
    # Held-out split by uid hash. val_min_count lifts tiny fractions of small datasets to a usable
    # size (never above half the rows); it is the number of smallest hashes each plan task returns.
    val_fraction: float = Field(0.0, ge=0.0, le=0.5)
    val_min_count: int = Field(0, ge=0, le=1_000_000)
    # Accepted for old configs and ignored: every image's bytes are checked against the row's sha256
    # when read (curate.lineage), and a row without one is not exported.
    verify_sha256: bool = True
    # Member name of the image: its real format (KEY.jpg / .png / .webp), or KEY.jpg for every image
    # whatever its bytes (img2dataset's skip_reencode habit). Decoders sniff the content either way;
    # "jpg" is for readers that want one image column, like HF datasets' webdataset builder, which
    # infers its columns from the first samples and refuses or drops the other extensions.
    image_extension: Literal["format", "jpg"] = "format"
    # Detect faces (OpenCV cascade, curate.faces) and blur them in the exported image: those images are
    # re-encoded, all others keep their bytes; face_count / face_boxes / face_blurred per row, and the
    # manifest's "altered" names the rows whose bytes changed.
    blur_faces: bool = False
    faces: FaceConfig = FaceConfig()

    @model_validator(mode="after")
    def _check(self) -> ExportConfig:
        if self.val_min_count and not self.val_fraction:
            raise ValueError("val_min_count needs val_fraction > 0")
        return self


# -- hashing and the permutation -------------------------------------------------------------------
def _hash64(salt: bytes, uids: list[str]) -> np.ndarray:
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(u.encode(), digest_size=8, key=salt).digest(), "big") for u in uids),
        dtype=np.uint64,
        count=len(uids),
    )


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 arrays (wrapping arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def permute(index: np.ndarray, n: int, seed: int, stream: int) -> np.ndarray:
    """A seeded bijection of ``0..n-1`` evaluated element-wise.

    A balanced Feistel network over the smallest even-width bit domain holding n, with cycle walking
    to stay inside ``0..n-1``: any worker can place any row without seeing the others.
    """
    index = np.asarray(index, dtype=np.uint64)
    if n <= 1:
        return index.copy()
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    shift = np.uint64(half)
    keys = [
        np.uint64(int.from_bytes(hashlib.blake2b(f"{seed}:{stream}:{r}".encode(), digest_size=8).digest(), "big"))
        for r in range(_FEISTEL_ROUNDS)
    ]

    def encrypt(x: np.ndarray) -> np.ndarray:
        left, right = x >> shift, x & mask
        for k in keys:
            left, right = right, left ^ (_mix64(right ^ k) & mask)
        return (left << shift) | right

    out = encrypt(index)
    bad = out >= np.uint64(n)
    while bad.any():
        out[bad] = encrypt(out[bad])
        bad = out >= np.uint64(n)
    return out


def _caption_draw(seed: int, uids: list[str]) -> np.ndarray:
    """Uniform [0, 1) per uid, fixed by seed: the same uid gets the same caption in every export."""
    return _hash64(_CAPTION_SALT + str(seed).encode(), uids).astype(np.float64) / 2.0**64


# -- plan --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Layout:
    """What pass 2 needs to place a row; plain data shipped to the plan tasks."""

    input_url: str
    output_url: str
    input_digits: int
    seed: int
    val_threshold: int  # rows whose split hash is below this are held out
    samples_per_shard: int
    train_shards: int


@dataclasses.dataclass(frozen=True)
class _Place:
    """Where one input shard's rows go: its window, and per split (train, val) the window's first
    output position, the window's row count and this shard's first row within the window."""

    shard: int
    window: int
    base: tuple[int, int]
    count: tuple[int, int]
    offset: tuple[int, int]


def windows_of(shards: list[int], window: int, seed: int) -> list[list[int]]:
    """The input shards cut into windows of at most ``window``, in a seeded order (one window, in
    input order, when they fit one)."""
    m = len(shards)
    if m <= window:
        return [list(shards)] if m else []
    order = permute(np.arange(m, dtype=np.uint64), m, seed, stream=-1).astype(np.int64)
    k = math.ceil(m / window)
    return [[shards[i] for i in part.tolist()] for part in np.array_split(order, k)]


def place_windows(windows: list[list[int]], rows: dict[int, tuple[int, int]]) -> list[_Place]:
    """Output positions per window: window w holds positions base .. base + count - 1 of each split,
    windows one after another; ``rows``: (train, val) rows of each input shard."""
    out, base = [], [0, 0]
    for w, members in enumerate(windows):
        count = [sum(rows[n][k] for n in members) for k in (0, 1)]
        offset = [0, 0]
        for n in members:
            out.append(_Place(n, w, (base[0], base[1]), (count[0], count[1]), (offset[0], offset[1])))
            offset = [offset[k] + rows[n][k] for k in (0, 1)]
        base = [base[k] + count[k] for k in (0, 1)]
    return out


def parts_of_shard(record: dict[str, Any], shard: int) -> list[str]:
    """The plan parts an output shard reads: those of the windows whose positions it overlaps."""
    windows = record.get("windows")
    if windows is None:
        return list(record["parts"])
    n_train = len(record["splits"][SPLIT_TRAIN]["shards"])  # train shards are 0 .. n_train - 1
    split = 0 if shard < n_train else 1
    per = record["samples_per_shard"]
    lo = (shard - (0 if split == 0 else n_train)) * per
    hi = lo + record["rows_per_shard"][shard]
    names = []
    for w in windows:
        base, count = w["base"][split], w["count"][split]
        if count and base < hi and base + count > lo:
            names += [record["parts"][i] for i in w["parts"]]
    return names


def position_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two position lists (0 for a perfect shuffle, 1 for none)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def _scan(item: tuple[str, int, int, int]) -> dict[str, Any]:
    """Pass 1 over one input shard: counts, bytes, and the split hashes the driver needs."""
    url, n, threshold, keep_smallest = item
    t = Dataset(url).read_shard(n, columns=[schema.UID, schema.IMAGE_LENGTH])
    hashes = _hash64(_SPLIT_SALT, t.column(schema.UID).to_pylist())
    lengths = t.column(schema.IMAGE_LENGTH) if schema.IMAGE_LENGTH in t.column_names else None
    image_bytes = int(pc.sum(lengths).as_py() or 0) if lengths is not None else 0
    smallest = np.sort(hashes)[:keep_smallest].tolist() if keep_smallest else []
    return {
        "shard": n,
        "rows": t.num_rows,
        "image_bytes": image_bytes,
        "below": int((hashes < np.uint64(threshold)).sum()) if threshold else 0,
        "smallest": smallest,
    }


def _place(item: tuple[_Layout, _Place]) -> int:
    """Pass 2 over one input shard: give each row its output shard and index; write the part."""
    lay, where = item
    n = where.shard
    table = Dataset(lay.input_url).read_shard(n)
    uids = table.column(schema.UID).to_pylist()
    if lay.val_threshold:
        is_val = _hash64(_SPLIT_SALT, uids) < np.uint64(lay.val_threshold)
    else:
        is_val = np.zeros(len(uids), dtype=bool)
    shard = np.empty(len(uids), dtype=np.int64)
    index = np.empty(len(uids), dtype=np.int64)
    per = lay.samples_per_shard
    for split, (mask, first) in enumerate(((~is_val, 0), (is_val, lay.train_shards))):
        count = int(mask.sum())
        if not count:
            continue
        offset, total = where.offset[split], where.count[split]
        # one stream per (window, split); window 0 keeps the streams of a single global shuffle
        stream = 2 * where.window + split
        local = permute(np.arange(offset, offset + count, dtype=np.uint64), total, lay.seed, stream)
        pos = where.base[split] + local.astype(np.int64)
        shard[mask] = first + pos // per
        index[mask] = pos % per
    if schema.IMAGE_TAR in table.column_names and pa.types.is_dictionary(table.schema.field(schema.IMAGE_TAR).type):
        # Parts of different input shards must concatenate; plain strings always do.
        i = table.column_names.index(schema.IMAGE_TAR)
        table = table.set_column(i, schema.IMAGE_TAR, table.column(i).cast(pa.string()))
    table = schema.with_column(table, schema.SPLIT, np.where(is_val, SPLIT_VAL, SPLIT_TRAIN).tolist())
    table = table.append_column(_OUT_SHARD, pa.array(shard)).append_column(_OUT_INDEX, pa.array(index))
    table = table.sort_by([(_OUT_SHARD, "ascending"), (_OUT_INDEX, "ascending")])

    store = Dataset(lay.output_url).plan_store(_PLAN_SUBDIR)
    shards = table.column(_OUT_SHARD).to_numpy()
    starts = np.flatnonzero(np.r_[True, shards[1:] != shards[:-1]]) if len(shards) else np.array([], dtype=int)
    bounds = [*starts.tolist(), len(shards)]
    # One row group per output shard: load() reads only the groups it needs.
    store.write_table(table, "parts", f"{n:0{lay.input_digits}d}.parquet", row_group_sizes=np.diff(bounds).tolist())
    return table.num_rows


def _val_threshold(scans: list[dict[str, Any]], total: int, cfg: ExportConfig) -> tuple[int, list[int]]:
    """The split-hash threshold and, per scan, how many of its rows fall below it."""
    if not cfg.val_fraction or not total:
        return 0, [0] * len(scans)
    frac_threshold = min(int(cfg.val_fraction * 2.0**64), 2**64 - 1)
    want = min(cfg.val_min_count, total // 2)
    if sum(s["below"] for s in scans) >= want:
        return frac_threshold, [s["below"] for s in scans]
    # The want-th smallest hash overall is among the want smallest of every shard.
    smallest = list(heapq.merge(*(s["smallest"] for s in scans)))[:want]
    threshold = smallest[-1] + 1
    return threshold, [sum(1 for h in s["smallest"] if h < threshold) for s in scans]


# -- the stage -----------------------------------------------------------------------------------------
class ExportStage(Stage):
    name = NAME
    Config = ExportConfig
    writes_images = True

    def __init__(self, config: ExportConfig):
        super().__init__(config)
        self._layout: dict[str, Any] | None = None
        self._faces = None  # FaceBlurrer, built on the first shard that needs it

    def needs(self) -> dict[str, str]:
        if self.config.caption == "original":
            return {}
        return {schema.RECAPTION: "add a recaption step before it, or set caption: original"}

    def plan(self, ctx: PlanContext) -> list[int]:
        cfg: ExportConfig = self.config
        inp = ctx.input
        assert inp is not None
        ids = inp.shard_ids()
        in_schema = inp.schema()
        if cfg.caption != "original" and (in_schema is None or schema.RECAPTION not in in_schema.names):
            raise ConfigError(
                f"export: caption={cfg.caption!r} needs a {schema.RECAPTION!r} column, and {inp.url} has none "
                "(run the recaption stage first, or use caption=original)")
        store = ctx.plan_store(_PLAN_SUBDIR)
        out = ctx.output
        store.delete("parts")  # a half-written earlier plan

        t = time.perf_counter()
        frac_threshold = min(int(cfg.val_fraction * 2.0**64), 2**64 - 1)
        scans = ctx.map(_scan, [(inp.url, n, frac_threshold, cfg.val_min_count) for n in ids])
        total = sum(s["rows"] for s in scans)
        threshold, val_counts = _val_threshold(scans, total, cfg)
        n_val = sum(val_counts)
        n_train = total - n_val
        if cfg.samples_per_shard:
            per = cfg.samples_per_shard
        else:
            mean = (sum(s["image_bytes"] for s in scans) / total if total else 0) + _SAMPLE_OVERHEAD
            per = max(1, int(cfg.target_shard_bytes // mean))
        train_shards = math.ceil(n_train / per)
        val_shards = math.ceil(n_val / per)
        scan_seconds = time.perf_counter() - t

        lay = _Layout(
            input_url=inp.url, output_url=out.url, input_digits=inp.shard_digits,
            seed=cfg.seed, val_threshold=threshold, samples_per_shard=per, train_shards=train_shards,
        )
        rows = {s["shard"]: (s["rows"] - v, v) for s, v in zip(scans, val_counts, strict=True) if s["rows"]}
        windows = windows_of(list(rows), cfg.shuffle_window, cfg.seed)
        places = place_windows(windows, rows)
        items = [(lay, p) for p in places]
        t = time.perf_counter()
        placed = ctx.map(_place, items)
        assert sum(placed) == total, (sum(placed), total)

        counts = [per] * (train_shards + val_shards)
        if train_shards:
            counts[train_shards - 1] = n_train - per * (train_shards - 1)
        if val_shards:
            counts[-1] = n_val - per * (val_shards - 1)
        record = {
            "rows": total,
            "samples_per_shard": per,
            "shard_digits": digits_for(len(counts), 5),
            "index_digits": digits_for(per, 4),
            "parts": [f"{p.shard:0{lay.input_digits}d}.parquet" for p in places],
            # per window: its parts (indexes into "parts") and its (train, val) output positions
            "windows": [
                {"parts": [i for i, p in enumerate(places) if p.window == w],
                 "base": list(next(p.base for p in places if p.window == w)),
                 "count": list(next(p.count for p in places if p.window == w))}
                for w in range(len(windows))
            ],
            "rows_per_shard": counts,
            "splits": {
                SPLIT_TRAIN: {"shards": list(range(train_shards)), "rows": n_train},
                SPLIT_VAL: {"shards": list(range(train_shards, train_shards + val_shards)), "rows": n_val},
            },
            "val_threshold": str(threshold),
            "seconds": {"scan": scan_seconds, "place": time.perf_counter() - t},
        }
        store.write_json(record, _PLAN_FILE)
        # the tars are named by split (train-00000.tar, val-00041.tar): a reader given the folder alone
        # (HF datasets) then finds the tars, and both splits, by their names
        ctx.splits = {name: info["shards"] for name, info in record["splits"].items() if info["shards"]}
        log.info("export plan: %d rows -> %d train shards (%d rows) + %d val shards (%d rows), %d per shard",
                 total, train_shards, n_train, val_shards, n_val, per)
        return list(range(len(counts)))

    def _plan_record(self, out: Dataset) -> dict[str, Any]:
        if self._layout is None:
            self._layout = out.plan_store(_PLAN_SUBDIR).read_json(_PLAN_FILE)
            if self._layout is None:
                raise RuntimeError(f"{out.url}: export plan {_PLAN_SUBDIR}/{_PLAN_FILE} is missing")
        return self._layout

    def load(self, shard: int, ctx: ShardContext) -> pa.Table:
        rec = self._plan_record(ctx.output)
        fs = ctx.output.fs
        parts = []
        for name in parts_of_shard(rec, shard):
            with fs.open(ctx.plan_store(_PLAN_SUBDIR).path("parts", name), "rb") as f:
                parts.append(_read_shard_groups(pq.ParquetFile(f), shard))
        table = pa.concat_tables(parts, promote_options="default") if parts else pa.table({})
        table = table.sort_by(_OUT_INDEX)
        if table.num_rows != rec["rows_per_shard"][shard]:
            raise RuntimeError(f"export plan: shard {shard} gathered {table.num_rows} rows, "
                               f"planned {rec['rows_per_shard'][shard]}")
        return table

    # Over 80 lines: one pass per sample builds its tar members and its row together, in the same order.
    def process(self, table: pa.Table, ctx: ShardContext) -> pa.Table:
        cfg: ExportConfig = self.config
        rec = self._plan_record(ctx.output)
        assert ctx.tar is not None and ctx.tar_url is not None
        n = table.num_rows
        cols = table.column_names
        uids = table.column(schema.UID).to_pylist()
        captions = table.column(schema.CAPTION).to_pylist() if schema.CAPTION in cols else [None] * n
        recaps = table.column(schema.RECAPTION).to_pylist() if schema.RECAPTION in cols else [None] * n
        formats = table.column(schema.IMAGE_FORMAT).to_pylist() if schema.IMAGE_FORMAT in cols else [None] * n
        indexes = table.column(_OUT_INDEX).to_pylist()
        if cfg.caption == "original":
            want_recap = np.zeros(n, dtype=bool)
        elif cfg.caption == "recaption":
            want_recap = np.ones(n, dtype=bool)
        else:
            want_recap = _caption_draw(cfg.seed, uids) < cfg.recaption_probability
        # The json holds the row's scalar metadata; embeddings and other nested columns stay in Parquet.
        json_cols = [c for c in cols if c not in _JSON_SKIP and not _nested(table.schema.field(c).type)]
        meta = table.select(json_cols).to_pylist()
        # Readers that infer int64 from JSON (HF datasets, pandas) overflow on a uint64 above 2**63:
        # such columns (the pHash) go into KEY.json as 16 hex digits, the text imagehash prints.
        for c in json_cols:
            if pa.types.is_uint64(table.schema.field(c).type):
                for m in meta:
                    if m[c] is not None:
                        m[c] = f"{m[c]:016x}"

        keys = table.column(schema.KEY).to_pylist() if schema.KEY in cols else [None] * n
        tars = table.column(schema.IMAGE_TAR).to_pylist() if schema.IMAGE_TAR in cols else [None] * n
        offsets = table.column(schema.IMAGE_OFFSET).to_pylist() if schema.IMAGE_OFFSET in cols else [None] * n
        lengths = table.column(schema.IMAGE_LENGTH).to_pylist() if schema.IMAGE_LENGTH in cols else [None] * n
        planned_lengths = list(lengths)
        reasons: list[str | None] = [None] * n
        sources: list[str | None] = [None] * n
        face = _FaceColumns(n, table.column(schema.SHA256).to_pylist() if schema.SHA256 in cols else [None] * n) \
            if cfg.blur_faces else None
        if face is not None and self._faces is None:
            from curate.faces import FaceBlurrer

            self._faces = FaceBlurrer(cfg.faces)
        read_seconds, face_seconds, images, first, why = 0.0, 0.0, [], 0, []
        t = time.perf_counter()
        for i in range(n):
            if i == first + len(images):
                # Bytes are read a batch at a time, so a worker holds READ_BATCH_BYTES, not a shard.
                r = time.perf_counter()
                first, stop = i, _batch_end(planned_lengths, i, _READ_BATCH_BYTES)
                images = read_images(table.slice(first, stop - first), ctx.input, why)
                read_seconds += time.perf_counter() - r
            data = images[i - first]
            if data is None:
                # read_images checked the pointer (inside the lineage, on a tar member) and the sha256
                corrupt = (why[i - first] or "").startswith("sha256")
                reasons[i] = schema.reason(NAME, "corrupt" if corrupt else "unreadable")
                continue
            # the format is the bytes', never the row's say-so (image_format is only a column)
            ext = sniff(data)
            if ext not in _EXPORTED:
                reasons[i] = schema.reason(NAME, "unsupported_format")
                continue
            formats[i] = ext
            if cfg.image_extension == "jpg":
                ext = "jpg"
            text, source = captions[i], SOURCE_ORIGINAL
            if want_recap[i]:
                if recaps[i]:
                    text, source = recaps[i], SOURCE_RECAPTION
                elif cfg.caption == "recaption" and cfg.missing_recaption == "drop":
                    reasons[i] = schema.reason(NAME, "no_recaption")
                    continue
            if not text:
                reasons[i] = schema.reason(NAME, "no_caption")
                continue
            if face is not None:
                # detection in the same pass that writes the tar: the blurred bytes are what goes in
                f0 = time.perf_counter()
                try:
                    blurred = self._faces.blur(data, formats[i])
                except Exception as e:  # noqa: BLE001 - a row we cannot check for faces is not published
                    log.debug("face detection failed on %s: %s", uids[i], e)
                    reasons[i] = schema.reason(NAME, "faces_unchecked")
                    continue
                finally:
                    face_seconds += time.perf_counter() - f0
                data = face.record(i, blurred, meta[i])
            key = make_key(ctx.shard, indexes[i], rec["shard_digits"], rec["index_digits"])
            row = meta[i]
            row[schema.KEY] = key
            row[schema.IMAGE_FORMAT] = formats[i]
            row[schema.CAPTION_SOURCE] = source
            where = ctx.tar.add(key, {ext: data, "txt": text.encode("utf-8"), "json": _json_bytes(row)})
            keys[i], sources[i] = key, source
            tars[i], (offsets[i], lengths[i]) = ctx.tar_url, where[ext]
        ctx.add_time("read_images", read_seconds)
        ctx.add_time("write", time.perf_counter() - t - read_seconds - face_seconds)
        if face is not None:
            ctx.add_time("faces", face_seconds)

        table = table.drop_columns([_OUT_SHARD, _OUT_INDEX])
        table = schema.with_column(table, schema.KEY, keys)
        table = schema.with_column(table, schema.IMAGE_TAR, tars, pa.string())
        table = schema.with_column(table, schema.IMAGE_OFFSET, offsets)
        table = schema.with_column(table, schema.IMAGE_LENGTH, lengths)
        table = schema.with_column(table, schema.IMAGE_FORMAT, formats)
        table = schema.with_column(table, schema.CAPTION_SOURCE, sources)
        table = schema.with_column(table, schema.DROP_REASON, reasons)
        if face is not None:
            table = face.apply(table, reasons, uids, ctx.stats)
        split = SPLIT_VAL if ctx.shard in rec["splits"][SPLIT_VAL]["shards"] else SPLIT_TRAIN
        kept_sources = [s for s in sources if s is not None]
        ctx.stats.update({
            "split": split,
            "caption_source": {
                SOURCE_ORIGINAL: kept_sources.count(SOURCE_ORIGINAL),
                SOURCE_RECAPTION: kept_sources.count(SOURCE_RECAPTION),
            },
        })
        return table

    def explain(self, output: Dataset, uid: str) -> dict[str, Any] | None:
        """Why this uid went to its split and got its caption (``curate inspect`` shows the row)."""
        cfg: ExportConfig = self.config
        rec = output.plan_store(_PLAN_SUBDIR).read_json(_PLAN_FILE)
        if rec is None:
            return None
        threshold = int(rec["val_threshold"])
        position = int(_hash64(_SPLIT_SALT, [uid])[0]) / 2.0**64
        out: dict[str, Any] = {
            "split": SPLIT_VAL if threshold and position < threshold / 2.0**64 else SPLIT_TRAIN,
            "split_why": (f"uid hash at {position:.6f} of the hash range; held out below {threshold / 2.0**64:.6f} "
                          f"(val_fraction={cfg.val_fraction}, val_min_count={cfg.val_min_count})"),
            "caption_mode": cfg.caption,
        }
        if cfg.caption == "mix":
            draw = float(_caption_draw(cfg.seed, [uid])[0])
            out["caption_why"] = (f"draw {draw:.4f} {'<' if draw < cfg.recaption_probability else '>='} "
                                  f"recaption_probability {cfg.recaption_probability}: "
                                  f"{'recaption' if draw < cfg.recaption_probability else 'original'} "
                                  "(original if the row has no recaption)")
        return out


class _FaceColumns:
    """Per-row face results of one shard, and what they change in the row (sha256, json)."""

    def __init__(self, n: int, sha256: list[str | None]):
        self.count: list[int | None] = [None] * n
        self.boxes: list[list[list[int]] | None] = [None] * n
        self.blurred: list[bool | None] = [None] * n
        self.before: list[str | None] = [None] * n
        self.sha256 = sha256

    def record(self, i: int, result: Any, meta: dict[str, Any]) -> bytes:
        self.count[i] = len(result.boxes)
        self.boxes[i] = [list(b) for b in result.boxes]
        self.blurred[i] = result.altered
        meta[schema.FACE_COUNT] = self.count[i]
        meta[schema.FACE_BLURRED] = result.altered
        if result.altered:
            self.before[i] = self.sha256[i]
            self.sha256[i] = sha256_hex(result.data)
            meta[schema.SHA256] = self.sha256[i]
            meta[schema.UNBLURRED_SHA256] = self.before[i]
        return result.data

    def apply(self, table: pa.Table, reasons: list[str | None], uids: list[str], stats: dict[str, Any]) -> pa.Table:
        table = schema.with_column(table, schema.FACE_COUNT, self.count)
        table = schema.with_column(table, schema.FACE_BOXES, self.boxes)
        table = schema.with_column(table, schema.FACE_BLURRED, self.blurred)
        table = schema.with_column(table, schema.UNBLURRED_SHA256, self.before)
        table = schema.with_column(table, schema.SHA256, self.sha256)
        altered = [u for u, b, r in zip(uids, self.blurred, reasons, strict=True) if b and r is None]
        stats["faces"] = {"checked": sum(c is not None for c in self.count),
                          "faces": sum(c or 0 for c in self.count), "blurred": len(altered)}
        # the runner lifts this into the manifest: which rows' bytes differ from their source
        stats["altered"] = {"why": "blur_faces", "column": schema.FACE_BLURRED, "rows": len(altered),
                            "uids": sorted(altered)}
        return table


def split_shards(dataset: Dataset | str) -> dict[str, list[int]]:
    """Shard numbers of each split of an exported dataset: ``{"train": [...], "val": [...]}``.

    From the manifest's ``splits`` where the runner recorded them, else from the committed shards'
    stats (each names its split), so it works on any export, finished or not.
    """
    ds = dataset if isinstance(dataset, Dataset) else Dataset(dataset)
    out: dict[str, list[int]] = {SPLIT_TRAIN: [], SPLIT_VAL: []}
    recorded = (ds.manifest() or {}).get("splits")
    if recorded:
        for split, info in recorded.items():
            out[split] = sorted(int(name) for name in info["shards"])
        return out
    for n in ds.shard_ids():
        out.setdefault(ds.stats(n).get("split", SPLIT_TRAIN), []).append(n)
    return out


def _read_shard_groups(pf: pq.ParquetFile, shard: int) -> pa.Table:
    """The row groups of a plan part that belong to output ``shard`` (one group per shard, so the
    footer's statistics find them without reading the others; like a reducer's fetch of one block
    from each map output in a sort-based shuffle)."""
    md = pf.metadata
    col = md.schema.names.index(_OUT_SHARD)
    groups = [g for g in range(md.num_row_groups) if md.row_group(g).column(col).statistics.min == shard]
    return pf.read_row_groups(groups)


def _batch_end(lengths: list[int | None], start: int, budget: int) -> int:
    """End (exclusive) of the run of rows from ``start`` whose images fit in ``budget`` bytes (at least one)."""
    total, end = 0, start
    while end < len(lengths):
        total += lengths[end] or 0
        if total > budget and end > start:
            break
        end += 1
    return end


def _nested(t: pa.DataType) -> bool:
    return (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)
            or pa.types.is_struct(t) or pa.types.is_map(t) or pa.types.is_binary(t)
            or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t))


def _json_value(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _json_bytes(row: dict[str, Any]) -> bytes:
    clean = {k: _json_value(v) for k, v in row.items()}
    return json.dumps(clean, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str).encode()
