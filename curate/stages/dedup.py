"""dedup: global duplicate removal across all shards (exact, perceptual, caption), ARCHITECTURE §4.

Plan (once, over the whole input):
1. scan, one task per input shard: read only uid, sha256, phash, caption and the keep-score columns
   (width, height, clip_score); hash the images that have no pHash yet from their bytes (undecodable
   ones get none); write ``_plan/dedup/keys/NNNNN.parquet``: (row, uid, phash, 128-bit sha and caption
   keys, pixels, clip score, MinHash signature when asked). Only these few numbers travel further.
2. edges, per rule (``rules``: kinds joined by "+", e.g. ``near+caption``; a pair is a duplicate when
   any rule holds): rows with equal exact keys; pHash pairs within ``radius`` (multi-index hashing,
   ``curate.neardup``); near pairs within groups of equal exact keys; MinHash caption pairs.
   ``engine``: ``sort`` (numpy, one process), ``faiss`` (faiss binary hash indexes, one process) or
   ``distributed``: a pHash rule runs as tasks that each read the pHash column and search some tables
   (or one table's block of keys), writing only pairs of hash values; the rows of those values are
   read back once to give row pairs (``near_pairs_distributed``). Rules with an exact key partition
   rows by key, one Ray task per partition. No process holds all rows; all engines find the same pairs.
3. confirmation: a pHash pair counts only when a second signal agrees (``confirm``): the colour
   signatures stored beside the pHash (mean Delta-E <= ``color_threshold``) or the CLIP image
   embeddings (cosine >= ``clip_threshold``); rows identical in pHash and colour need none.
4. clusters without chains (``neardup.leader_clusters``): rows in keep-policy order (resolution,
   clip_score or first seen, ties by position); the first row not yet taken is kept and takes every
   row directly linked to it by a rule, so a dropped row is always within the rule's threshold of its
   ``dup_of`` and never dropped for resembling a row that resembles the kept one. Dropped rows are
   rejected as ``dedup:<rule that links them to the kept row>``.
   ``_plan/dedup/decisions/NNNNN.parquet`` (per input shard) and ``clusters.parquet`` (each
   member's kept row, pHash distance and confirmation score: explain and the report read it).
Every plan file is written atomically and is a pure function of the input and config, so a plan
killed anywhere and rerun gives the same decisions.

Apply (per shard): set ``phash`` on every row and ``drop_reason`` / ``dup_of`` on the rejected ones.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import posixpath
import re
import unicodedata
import zlib
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field, field_validator, model_validator

from curate import neardup, phash, schema
from curate.config import ConfigError
from curate.dataset import Dataset, read_images, sha256_hex
from curate.stage import PlanContext, ShardContext, Stage, StageConfig

log = logging.getLogger(__name__)

NAME = "dedup"
KINDS = ("exact", "near", "caption", "caption_near")
UNDECODABLE = "undecodable"
_SUB = "dedup"

# plan columns (internal to the plan files)
_ROW, _SHA_HI, _SHA_LO, _CAP_HI, _CAP_LO, _PIXELS, _SIG = (
    "row",
    "sha_hi",
    "sha_lo",
    "cap_hi",
    "cap_lo",
    "pixels",
    "minhash",
)
_GID, _KIND, _CLUSTER, _KEPT = "gid", "kind", "cluster", "kept"
_DISTANCE, _CONFIRM = "distance", "confirm"  # to the kept row: pHash bits; Delta-E or cosine
_CROP = "crop"  # the distance is from one row's crop hash to the other's full image (crop matching)
_MERSENNE = (1 << 61) - 1


class DedupConfig(StageConfig):
    # Each rule is a set of kinds that must all hold for a pair: exact (same sha256), near (pHash
    # within radius), caption (same normalised caption), caption_near (MinHash Jaccard >= caption_jaccard).
    rules: list[str] = ["exact", "near"]
    # 6 of 64 bits: on real photos and clip art it catches ~all resizes, recompressions and brightness
    # shifts and most text overlays, with few unrelated pairs; bench/near_dup.py measures the cost.
    radius: int = Field(6, ge=0, le=20)
    keep: Literal["resolution", "clip_score", "first"] = "resolution"
    # drop: rows whose image does not decode are rejected as dedup:undecodable; keep: kept, null phash.
    undecodable: Literal["drop", "keep"] = "drop"
    engine: Literal["auto", "sort", "faiss", "distributed"] = "auto"
    # auto: one process up to this many rows, distributed beyond; None: as many as the driver's
    # available memory holds at LOCAL_BYTES_PER_ROW (a 64 GB head: ~40M rows).
    local_max_rows: int | None = Field(None, ge=1)
    rows_per_partition: int = Field(4_000_000, ge=1000)
    # distributed pHash rules: a task holds at most this many hashes (~40 B each while it sorts);
    # beyond, each table's keys are cut into blocks of about this size, one task per (table, block).
    hashes_per_task: int = Field(100_000_000, ge=1000)
    blocks: int | None = Field(None, ge=1, le=neardup.MAX_BLOCKS)  # None: chosen by cost model
    caption_min_chars: int = Field(1, ge=1)  # shorter normalised captions never count as duplicates
    caption_jaccard: float = Field(0.8, gt=0, le=1)
    minhash_perms: int = Field(64, ge=8, le=512)
    minhash_bands: int = Field(16, ge=1)
    shingle_chars: int = Field(4, ge=1, le=16)
    max_pixels: int = Field(phash.DEFAULT_MAX_PIXELS, ge=1)
    # A pHash pair counts only when a second signal agrees: color, clip or none.
    # color: the colour signatures download / import store beside the pHash (mean Delta-E <=
    # color_threshold); clip: image embeddings from `clip` with embeddings: true (cosine >=
    # clip_threshold).
    confirm: Literal["color", "clip", "none"] = "color"
    # Mean colour difference (CIE76 Delta-E, 4x4 grid) at or below which a pHash pair is confirmed.
    # bench/decisions.py: planted resizes / recompressions / crops / text on real clip art and photos
    # move it by at most ~5; recoloured variants of one drawing by tens.
    color_threshold: float = Field(8.0, gt=0, le=100)
    # CLIP image-embedding cosine at or above which a pHash pair is confirmed (confirm: clip).
    clip_threshold: float = Field(0.9, ge=-1, le=1)
    # Crop matching: a pair also counts as near when one row's crop hashes (97% of each side: corners,
    # centre; see phash.CROP_FRACTION) are within crop_radius of the other's full-image pHash, so a
    # copy cut by 1-5% is found. 0 turns it off; at most radius. 3 adds no wrong drop on the labelled
    # sets of bench/decisions.py (crop recall 64 -> 110 of 120 on clip art); 4-6 find more crops but
    # add wrong clip-art drops (the table in BENCHMARKS.md).
    crop_radius: int = Field(3, ge=0, le=20)
    # Compute missing colour signatures and crop hashes from the image bytes (datasets written before
    # they existed).
    rehash: bool = False

    @model_validator(mode="after")
    def _blocks(self) -> DedupConfig:
        if self.blocks is not None and self.radius > 0 and self.blocks <= self.radius:
            raise ValueError(f"blocks ({self.blocks}) must be > radius ({self.radius}): pigeonhole needs it")
        if self.minhash_bands > self.minhash_perms:
            raise ValueError("minhash_bands must be <= minhash_perms")
        if self.crop_radius > self.radius:
            raise ValueError(f"crop_radius ({self.crop_radius}) must be <= radius ({self.radius})")
        return self

    @property
    def crops(self) -> bool:
        """Whether near rules also match crops (crop_radius > 0 and some rule has near)."""
        return self.crop_radius > 0 and self.radius > 0 and any("near" in r.split("+") for r in self.rules)

    @field_validator("rules")
    @classmethod
    def _rules(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("rules must name at least one rule")
        for rule in v:
            parts = rule.split("+")
            bad = [p for p in parts if p not in KINDS]
            if bad or len(set(parts)) != len(parts):
                raise ValueError(f"rule {rule!r}: kinds are {', '.join(KINDS)}, joined by '+', each once")
            if "near" in parts and "caption_near" in parts:
                raise ValueError(f"rule {rule!r}: near and caption_near cannot be combined")
        return v


# -- per-row keys ------------------------------------------------------------------------------
_NON_WORD = re.compile(r"[\W_]+", re.UNICODE)


def normalize_caption(text: str | None) -> str:
    """Casefolded, NFKC, punctuation and runs of spaces collapsed: 'A  Cat!' == 'a cat'."""
    if not text:
        return ""
    return _NON_WORD.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def _key128(data: bytes) -> tuple[int, int]:
    d = hashlib.blake2b(data, digest_size=16).digest()
    return int.from_bytes(d[:8], "big"), int.from_bytes(d[8:], "big")


def minhash(text: str, perms: int, shingle: int) -> list[int]:
    """MinHash signature (perms values) of the character shingles of a normalised caption."""
    grams = {text[i : i + shingle] for i in range(max(1, len(text) - shingle + 1))}
    x = np.fromiter((zlib.crc32(g.encode()) for g in grams), dtype=np.uint64, count=len(grams))
    rng = np.random.default_rng(0x5EED)  # fixed: signatures must agree across workers and runs
    a = rng.integers(1, 1 << 32, perms, dtype=np.uint64)
    b = rng.integers(0, 1 << 32, perms, dtype=np.uint64)
    # x, a, b < 2**32: a*x + b < 2**64, no overflow before the modulo
    v = (a[None, :] * x[:, None] + b[None, :]) % np.uint64(_MERSENNE)
    return v.min(axis=0).tolist()


@dataclasses.dataclass(frozen=True)
class _ScanJob:
    input_url: str
    output_url: str
    shard: int
    config: dict[str, Any]


def _plan_path(ds: Dataset, *parts: str) -> str:
    """A file of dedup's plan store (``_plan/dedup/``); written only through the store's writer."""
    return ds.plan_store(_SUB).path(*parts)


def _write_atomic(ds: Dataset, table: pa.Table, path: str) -> None:
    store = ds.plan_store(_SUB)
    store.write_table(table, posixpath.relpath(path, store.path()))


# Over 80 lines: one read of the shard computes every key (sha256, pHash, caption), so no image is decoded twice.
def _scan_shard(job: _ScanJob) -> dict[str, int]:
    """Phase 1 on one input shard: the keys file (skipped when a previous attempt wrote it)."""
    cfg = DedupConfig(**job.config)
    inp, out = Dataset(job.input_url), Dataset(job.output_url)
    path = _plan_path(out, "keys", f"{job.shard:08d}.parquet")
    if out.fs.exists(path):
        t = pq.read_table(path, columns=[schema.PHASH], filesystem=out.fs)
        return {"shard": job.shard, "rows": t.num_rows, "undecodable": t.column(0).null_count, "hashed": 0}
    kinds = {k for rule in cfg.rules for k in rule.split("+")}
    cols = [
        schema.UID,
        schema.SHA256,
        schema.PHASH,
        schema.COLOR_SIG,
        schema.PHASH_CROPS,
        schema.CAPTION,
        schema.WIDTH,
        schema.HEIGHT,
        schema.CLIP_SCORE,
    ]
    have_cols = set(inp.schema().names)
    t = inp.read_shard(job.shard, columns=[c for c in cols if c in have_cols])
    n = t.num_rows
    have = set(t.column_names)
    hashes = t.column(schema.PHASH).to_pylist() if schema.PHASH in have else [None] * n
    colors = t.column(schema.COLOR_SIG).to_pylist() if schema.COLOR_SIG in have else [None] * n
    crops = t.column(schema.PHASH_CROPS).to_pylist() if schema.PHASH_CROPS in have else [None] * n
    shas = t.column(schema.SHA256).to_pylist() if schema.SHA256 in have else [None] * n
    need_color = cfg.confirm == "color" and cfg.rehash
    need_crops = cfg.crops and cfg.rehash
    missing = [
        i
        for i in range(n)
        if hashes[i] is None
        or ("exact" in kinds and shas[i] is None)
        or (need_color and colors[i] is None)
        or (need_crops and crops[i] is None)
    ]
    if missing:
        # only the rows without a hash (or colour signature) are read back from their tars
        ptr = inp.read_shard(job.shard, columns=[*schema.POINTER_COLUMNS, schema.SHA256]).take(missing)
        blobs = read_images(ptr, inp)
        new = phash.signatures_bytes(blobs, max_pixels=cfg.max_pixels)
        for i, blob, sig in zip(missing, blobs, new, strict=True):
            if sig is not None and (hashes[i] is None or colors[i] is None or crops[i] is None):
                hashes[i], colors[i], crops[i] = sig
            if shas[i] is None and blob is not None and sig is not None:
                shas[i] = sha256_hex(blob)
    sha_hi, sha_lo = [], []
    for s in shas:
        hi, lo = (int(s[:16], 16), int(s[16:32], 16)) if s else (None, None)
        sha_hi.append(hi)
        sha_lo.append(lo)
    caps = t.column(schema.CAPTION).to_pylist() if schema.CAPTION in have else [None] * n
    norm = [normalize_caption(c) for c in caps]
    cap_keys = [_key128(c.encode()) if len(c) >= cfg.caption_min_chars else (None, None) for c in norm]
    w = t.column(schema.WIDTH).to_pylist() if schema.WIDTH in have else [None] * n
    h = t.column(schema.HEIGHT).to_pylist() if schema.HEIGHT in have else [None] * n
    pixels = [(a or 0) * (b or 0) for a, b in zip(w, h, strict=True)]
    clip = t.column(schema.CLIP_SCORE).to_pylist() if schema.CLIP_SCORE in have else [None] * n
    arrays = {
        _ROW: pa.array(range(n), pa.int32()),
        schema.UID: t.column(schema.UID),
        schema.PHASH: pa.array(hashes, pa.uint64()),
        schema.COLOR_SIG: pa.array(colors, schema.TYPES[schema.COLOR_SIG]),
        schema.PHASH_CROPS: pa.array(crops, schema.TYPES[schema.PHASH_CROPS]),
        _SHA_HI: pa.array(sha_hi, pa.uint64()),
        _SHA_LO: pa.array(sha_lo, pa.uint64()),
        _CAP_HI: pa.array([k[0] for k in cap_keys], pa.uint64()),
        _CAP_LO: pa.array([k[1] for k in cap_keys], pa.uint64()),
        _PIXELS: pa.array(pixels, pa.int64()),
        schema.CLIP_SCORE: pa.array(clip, pa.float32()),
    }
    if "caption_near" in kinds:
        sigs = [
            minhash(c, cfg.minhash_perms, cfg.shingle_chars) if len(c) >= cfg.caption_min_chars else None
            for c in norm
        ]
        arrays[_SIG] = pa.array(sigs, pa.list_(pa.uint64(), cfg.minhash_perms))
    keys = pa.table(arrays)
    _write_atomic(out, keys, path)
    return {
        "shard": job.shard,
        "rows": n,
        "undecodable": keys.column(schema.PHASH).null_count,
        "hashed": len(missing),
    }


# -- rules -------------------------------------------------------------------------------------
def _u64(col: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    valid = ~np.asarray(col.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    return np.asarray(col.fill_null(0).to_numpy(), dtype=np.uint64), valid


def _colors(col: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """Colour signatures as (N, COLOR_BYTES) uint8 (zeros where null) and their validity."""
    arr = col.combine_chunks()
    valid = ~np.asarray(arr.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    arr = pc.fill_null(arr, pa.scalar(bytes(phash.COLOR_BYTES), arr.type))
    data = np.frombuffer(arr.buffers()[1], dtype=np.uint8)
    start = arr.offset * phash.COLOR_BYTES
    return data[start : start + len(arr) * phash.COLOR_BYTES].reshape(-1, phash.COLOR_BYTES), valid


def _near_groups(cfg: DedupConfig, keys: pa.Table, h: np.ndarray) -> np.ndarray | None:
    """What makes two rows identical for a near rule: the pHash, and the colour signature when
    colour confirms (rows with one pHash but other colours are then compared like any near pair)."""
    if cfg.confirm != "color":
        return None
    c, _ = _colors(keys.column(schema.COLOR_SIG))
    return np.column_stack([h, np.ascontiguousarray(c).view(np.uint64)])


def _crops(col: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """Crop hashes as (N, CROP_COUNT) uint64 (zeros where null) and their validity."""
    arr = col.combine_chunks()
    valid = ~np.asarray(arr.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    arr = pc.fill_null(arr, pa.scalar(bytes(phash.CROP_BYTES), arr.type))
    data = np.frombuffer(arr.buffers()[1], dtype="<u8")
    start = arr.offset * phash.CROP_COUNT
    words = data[start : start + len(arr) * phash.CROP_COUNT].reshape(-1, phash.CROP_COUNT)
    return words.astype(np.uint64), valid


# Crop matching (``crop_radius``): for a near rule every row enters the pair search as its full-image
# pHash and its CROP_COUNT crop hashes. An entry's id is the row's gid shifted left by _ENTRY_BITS
# plus the entry's index (0: the full image, 1..CROP_COUNT: a crop). Crop entries carry a group word of
# their own, so the engines' collapse of identical rows (a class, star-linked) only ever merges full
# images, exactly as without crops. ``_rows_of`` maps entry pairs back to row pairs, keeping those
# between two rows with at least one full image (crop to crop says nothing); whether a crop pair is
# within crop_radius is checked with the confirmation, in ``_decide``. Every engine gets the same
# entries, so sort, faiss and distributed still give identical decisions.
_ENTRY_BITS = 3


def _entries(
    cfg: DedupConfig,
    keys: pa.Table,
    gids: np.ndarray,
    h: np.ndarray,
    groups: np.ndarray | None,
    valid: np.ndarray,
    key: np.ndarray | None = None,
    crop_groups: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(entry ids, hashes, groups, exact keys) of the valid rows for a near rule's pair search.

    ``crop_groups=False``: the groups cover the full-image entries only (they come first) and every
    crop entry is distinct, which is what the crop entries' own words say anyway; ``neardup``'s
    engines read a shorter groups array that way (``_collapse``). Six times fewer group words in
    memory: the one-process engine's largest arrays."""
    ids, hv = gids[valid], h[valid]
    g = None if groups is None else groups[valid]
    k = None if key is None else key[valid]
    if not cfg.crops or schema.PHASH_CROPS not in keys.column_names:
        return ids, hv, g, k
    crops, ok = _crops(keys.column(schema.PHASH_CROPS))
    sel = np.flatnonzero(ok[valid])
    cid = ((ids[sel, None] << _ENTRY_BITS) + np.arange(1, phash.CROP_COUNT + 1)).reshape(-1)
    g = hv[:, None] if g is None else g.reshape(len(ids), g.shape[1] if g.ndim == 2 else 1)
    entry_ids = np.concatenate([ids << _ENTRY_BITS, cid])
    entry_hashes = np.concatenate([hv, crops[valid][sel].reshape(-1)])
    if not crop_groups:
        assert k is None, "exact keys need every entry's group words"
        return entry_ids, entry_hashes, g, None
    words = np.concatenate([g, np.repeat(g[sel], phash.CROP_COUNT, axis=0)])
    own = np.concatenate([np.zeros(len(ids), np.uint64), cid.astype(np.uint64)])
    return (
        entry_ids,
        entry_hashes,
        np.column_stack([words, own]),
        None if k is None else np.concatenate([k, np.repeat(k[sel], phash.CROP_COUNT, axis=0)]),
    )


def _rows_of(cfg: DedupConfig, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row pairs of the entry pairs a near rule's search found (see ``_entries``)."""
    if not cfg.crops:
        return a, b
    mask = (1 << _ENTRY_BITS) - 1
    ra, rb, ka, kb = a >> _ENTRY_BITS, b >> _ENTRY_BITS, a & mask, b & mask
    keep = (ra != rb) & ((ka == 0) | (kb == 0))
    return ra[keep], rb[keep]


def _mix2(parts: list[np.ndarray]) -> np.ndarray:
    """Combine several uint64 key columns into two (a 128-bit key), order-sensitive."""
    hi = np.full(len(parts[0]), 0x243F6A8885A308D3, dtype=np.uint64)
    lo = np.full(len(parts[0]), 0x13198A2E03707344, dtype=np.uint64)
    for i, p in enumerate(parts):
        hi = neardup._mix(hi ^ p ^ np.uint64(i))
        lo = neardup._mix(lo + p * np.uint64(0x9E3779B97F4A7C15) + np.uint64(i))
    return np.stack([hi, lo], axis=1)


def _rule_key(keys: pa.Table, kinds: list[str]) -> tuple[np.ndarray | None, np.ndarray]:
    """The rule's exact key per row (N, 2) uint64 and its validity; None when it has no exact kind."""
    n = keys.num_rows
    valid = np.ones(n, dtype=bool)
    parts: list[np.ndarray] = []
    for k, cols in (("exact", (_SHA_HI, _SHA_LO)), ("caption", (_CAP_HI, _CAP_LO))):
        if k in kinds:
            for c in cols:
                v, ok = _u64(keys.column(c))
                parts.append(v)
                valid &= ok
    if not parts:
        return None, valid
    return _mix2(parts), valid


def _near_in_groups(ids, key, hashes, radius, groups=None) -> tuple[np.ndarray, np.ndarray]:
    """Pairs with equal exact key AND pHash within radius (rows already filtered to valid ones)."""
    if len(ids) < 2:
        e = np.empty(0, np.int64)
        return e, e
    order = np.lexsort((ids, key[:, 1], key[:, 0]))
    k, i, h = key[order], ids[order], hashes[order]
    g = None if groups is None else groups[order]
    new = np.ones(len(i), dtype=bool)
    new[1:] = np.any(k[1:] != k[:-1], axis=1)
    starts = np.flatnonzero(new)
    sizes = np.diff(np.append(starts, len(i)))
    pa_, pb_ = [], []
    for s, z in zip(starts[sizes > 1].tolist(), sizes[sizes > 1].tolist(), strict=True):
        a, b = neardup.near_pairs_sort(h[s : s + z], radius, groups=None if g is None else g[s : s + z])
        pa_.append(i[s : s + z][a])
        pb_.append(i[s : s + z][b])
    e = np.empty(0, np.int64)
    return (np.concatenate(pa_) if pa_ else e), (np.concatenate(pb_) if pb_ else e)


def _band_key(sigs: np.ndarray, band: int, per: int) -> np.ndarray:
    return _mix2([sigs[:, band * per + j] for j in range(per)])[:, 0]


def _minhash_band_pairs(
    ids: np.ndarray, sigs: np.ndarray, rk: np.ndarray | None, band: int, per: int, threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    """Caption pairs that share MinHash band ``band``'s bucket and agree on >= threshold of the
    signature (the Jaccard estimate), and on the rule's exact key ``rk`` when it has one.

    Rows identical in (signature, rk) are linked as a star in band 0 only (they share every bucket).
    The union over all bands is the same whether bands run in one process or on many workers.
    """
    e = np.empty(0, np.int64)
    if len(ids) < 2:
        return e, e
    perms = sigs.shape[1]
    full = sigs if rk is None else np.concatenate([sigs, rk], axis=1)
    uniq, first, inverse = np.unique(full, axis=0, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    key = _band_key(uniq, band, per)
    order = np.argsort(key, kind="stable")
    i, j = neardup._equal_runs(key[order])  # every pair in a bucket, not a star: near != equal
    a, b = order[i], order[j]
    ok = (uniq[a, :perms] == uniq[b, :perms]).mean(axis=1) >= threshold
    if rk is not None:
        ok &= np.all(uniq[a, perms:] == uniq[b, perms:], axis=1)
    a, b = first[a[ok]], first[b[ok]]
    if band == 0:
        rows = np.arange(len(ids))
        same = rows != first[inverse]
        a = np.concatenate([a, first[inverse][same]])
        b = np.concatenate([b, rows[same]])
    return ids[a], ids[b]


def _sigs(keys: pa.Table, valid: np.ndarray, perms: int) -> tuple[np.ndarray, np.ndarray]:
    col = keys.column(_SIG)
    valid = valid & ~np.asarray(col.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    flat = col.filter(pa.array(valid)).combine_chunks().flatten().to_numpy()
    return np.asarray(flat, dtype=np.uint64).reshape(-1, perms), valid


def _edges_local(
    cfg: DedupConfig, keys: pa.Table, gids: np.ndarray, engine: str
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Edges of each rule, in one process (keys: all shards' plan rows, gids: their global ids)."""
    h, hvalid = _u64(keys.column(schema.PHASH))
    groups = _near_groups(cfg, keys, h)
    out = []
    for rule in cfg.rules:
        kinds = rule.split("+")
        key, valid = _rule_key(keys, kinds)
        if "near" in kinds:
            valid &= hvalid
            g = None if groups is None else groups[valid]
            if key is None and cfg.radius == 0 and g is not None:
                out.append(neardup.equal_key_pairs(gids[valid], g))
            elif key is None:
                find = neardup.near_pairs_faiss if engine == "faiss" else neardup.near_pairs_sort
                ids, eh, eg, _ = _entries(cfg, keys, gids, h, groups, valid, crop_groups=False)
                a, b = find(eh, cfg.radius, cfg.blocks, eg)
                out.append(_rows_of(cfg, ids[a], ids[b]))
            else:
                ids, eh, eg, ek = _entries(cfg, keys, gids, h, groups, valid, key)
                out.append(_rows_of(cfg, *_near_in_groups(ids, ek, eh, cfg.radius, eg)))
        elif "caption_near" in kinds:
            sigs, valid = _sigs(keys, valid, cfg.minhash_perms)
            per = cfg.minhash_perms // cfg.minhash_bands
            rk = key[valid] if key is not None else None
            res = [
                _minhash_band_pairs(gids[valid], sigs, rk, band, per, cfg.caption_jaccard)
                for band in range(cfg.minhash_bands)
            ]
            out.append((np.concatenate([a for a, _ in res]), np.concatenate([b for _, b in res])))
        else:
            out.append(neardup.equal_key_pairs(gids, key, valid))
    return out


# -- distributed edges -------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _PartJob:
    output_url: str
    shard: int
    offset: int
    parts: int
    blocks: int
    config: dict[str, Any]


def _part_path(out: Dataset, rule: int, q: int, shard: int) -> str:
    return _plan_path(out, "parts", f"r{rule}", f"p{q:05d}", f"{shard:08d}.npz")


def _partition_shard(job: _PartJob) -> int:
    """Distributed phase 2a: one input shard's rows, split into partitions per rule."""
    cfg = DedupConfig(**job.config)
    out = Dataset(job.output_url)
    keys = pq.read_table(_plan_path(out, "keys", f"{job.shard:08d}.parquet"), filesystem=out.fs)
    gids = job.offset + np.arange(keys.num_rows, dtype=np.int64)
    h, hvalid = _u64(keys.column(schema.PHASH))
    groups = _near_groups(cfg, keys, h)
    if groups is None:
        groups = h[:, None]
    scheme = neardup.Scheme(cfg.radius, job.blocks) if cfg.radius > 0 else None
    for r, rule in enumerate(cfg.rules):
        kinds = rule.split("+")
        key, valid = _rule_key(keys, kinds)
        if "near" in kinds:
            valid &= hvalid
        if "caption_near" in kinds:
            sigs, valid = _sigs(keys, valid, cfg.minhash_perms)
            per = cfg.minhash_perms // cfg.minhash_bands
            ids = gids[valid]
            rk = key[valid] if key is not None else np.zeros((len(ids), 2), np.uint64)
            pieces: list[dict[str, list[np.ndarray]]] = [
                {"band": [], "id": [], "sig": [], "rk": []} for _ in range(job.parts)
            ]
            for band in range(cfg.minhash_bands):
                bk = _band_key(sigs, band, per) ^ np.uint64(band * 0x9E3779B97F4A7C15 % (1 << 64))
                p = (neardup._mix(bk) % np.uint64(job.parts)).astype(np.int64)
                for q in range(job.parts):
                    sel = p == q
                    pieces[q]["band"].append(np.full(int(sel.sum()), band, np.int16))
                    pieces[q]["id"].append(ids[sel])
                    pieces[q]["sig"].append(sigs[sel])
                    pieces[q]["rk"].append(rk[sel])
            for q, piece in enumerate(pieces):
                arrays = {k: np.concatenate(v) for k, v in piece.items()}
                arrays["has_rk"] = np.array(key is not None)
                _save_npz(out, _part_path(out, r, q, job.shard), arrays)
            continue
        if "near" in kinds and key is None:
            if scheme is None:  # radius 0: identical hashes (and colours), an exact key
                key = _mix2(list(groups.T))
            else:
                continue  # the hash-table tasks read this rule's column themselves (_near_unit)
        if "near" in kinds:
            ids, eh, eg, ek = _entries(cfg, keys, gids, h, groups, valid, key)
        else:
            ids, eh, eg, ek = gids[valid], h[valid], groups[valid], key[valid]
        p = (neardup._mix(ek[:, 0] ^ ek[:, 1]) % np.uint64(job.parts)).astype(np.int64)
        for q in range(job.parts):
            sel = p == q
            _save_npz(
                out,
                _part_path(out, r, q, job.shard),
                {"id": ids[sel], "key": ek[sel], "hash": eh[sel], "group": eg[sel]},
            )
    return job.shard


def _save_npz(out: Dataset, path: str, arrays: dict[str, np.ndarray]) -> None:
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    store = out.plan_store(_SUB)
    store.write_bytes(buf.getvalue(), posixpath.relpath(path, store.path()))


@dataclasses.dataclass(frozen=True)
class _ReduceJob:
    output_url: str
    rule: int
    part: int
    shards: tuple[int, ...]
    blocks: int
    config: dict[str, Any]


def _reduce_partition(job: _ReduceJob) -> tuple[int, np.ndarray, np.ndarray]:
    """Distributed phase 2b: the pairs of one rule inside one partition (all shards' pieces)."""
    import io

    cfg = DedupConfig(**job.config)
    out = Dataset(job.output_url)
    pieces = []
    for s in job.shards:
        with out.fs.open(_part_path(out, job.rule, job.part, s), "rb") as f:
            z = np.load(io.BytesIO(f.read()))
            pieces.append({k: z[k] for k in z.files})
    kinds = cfg.rules[job.rule].split("+")
    if "caption_near" in kinds:
        band = np.concatenate([p["band"] for p in pieces])
        ids = np.concatenate([p["id"] for p in pieces]).astype(np.int64)
        sigs = (
            np.concatenate([p["sig"] for p in pieces]).reshape(len(ids), cfg.minhash_perms).astype(np.uint64)
        )
        rk = np.concatenate([p["rk"] for p in pieces]).reshape(len(ids), 2).astype(np.uint64)
        has_rk = bool(pieces[0]["has_rk"]) if pieces else False
        per = cfg.minhash_perms // cfg.minhash_bands
        res = [
            _minhash_band_pairs(
                ids[band == b],
                sigs[band == b],
                rk[band == b] if has_rk else None,
                int(b),
                per,
                cfg.caption_jaccard,
            )
            for b in np.unique(band)
        ]
        e = np.empty(0, np.int64)
        return job.rule, np.concatenate([e, *(a for a, _ in res)]), np.concatenate([e, *(b for _, b in res)])
    if "near" in kinds and "key" not in (pieces[0] if pieces else {"key": 1}):
        a, b = neardup.pairs_in_partition(neardup.Scheme(cfg.radius, job.blocks), pieces)
        return job.rule, *_rows_of(cfg, a, b)
    ids = np.concatenate([p["id"] for p in pieces]).astype(np.int64)
    key = np.concatenate([p["key"] for p in pieces]).reshape(-1, 2).astype(np.uint64)
    h = np.concatenate([p["hash"] for p in pieces]).astype(np.uint64)
    if "near" in kinds:
        g = np.concatenate([p["group"] for p in pieces]).astype(np.uint64)
        a, b = _rows_of(cfg, *_near_in_groups(ids, key, h, cfg.radius, g))
    else:
        a, b = neardup.equal_key_pairs(ids, key)
    return job.rule, a, b


# The one-process plan holds every shard's keys table (uid, sha and caption keys, pHash, colour
# signature, crop hashes) and the pair search's arrays: six entries a row with crop matching (the
# image and its five crops), each with its id and hash, group words for the images. Measured on
# bench/scale.py's keys with the default rules: the driver's peak grows ~1.35 KB a row from 100k to
# 1M rows (329 MB -> 1,548 MB); 400 B, the figure before crop matching, let `auto` pick this engine
# for ~4x more rows than memory holds. 1,600 leaves ~20% for the rest of the plan.
LOCAL_BYTES_PER_ROW = 1600


def available_memory() -> int:
    """Bytes this machine can still give (MemAvailable), or its free pages where that is unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def local_limit(cfg: DedupConfig) -> int:
    """Rows the one-process engine takes before ``auto`` goes distributed."""
    if cfg.local_max_rows is not None:
        return cfg.local_max_rows
    return max(1_000_000, available_memory() // LOCAL_BYTES_PER_ROW)


# -- distributed near pairs without a shuffle ------------------------------------------------------
def _unit_rule(cfg: DedupConfig, rule: str) -> bool:
    """A pHash rule with no exact kind: its pairs come from tasks that read the hash column."""
    kinds = rule.split("+")
    return "near" in kinds and cfg.radius > 0 and not {"exact", "caption"} & set(kinds)


@dataclasses.dataclass(frozen=True)
class _UnitJob:
    output_url: str
    rule: int
    unit: int
    tables: tuple[int, ...]
    block: int
    blocks: int  # key blocks per table (1: the unit holds the whole column)
    scheme_blocks: int  # bit blocks of the multi-index scheme
    shards: tuple[int, ...]
    config: dict[str, Any]


def _unit_path(out: Dataset, rule: int, name: str) -> str:
    return _plan_path(out, "near", f"r{rule}", name)


def _shard_entries(cfg: DedupConfig, out: Dataset, shard: int, offset: int, identity: bool):
    """One shard's pair-search entries for a near rule (``_entries``: the pHash, and the crops'
    where crops match), read from its keys file: (entry ids, hashes, identity words or None)."""
    cols = [schema.PHASH]
    if cfg.crops:
        cols.append(schema.PHASH_CROPS)
    if identity and cfg.confirm == "color":
        cols.append(schema.COLOR_SIG)
    path = _plan_path(out, "keys", f"{shard:08d}.parquet")
    keys = pq.read_table(path, columns=[c for c in cols if c in pq.read_schema(path, filesystem=out.fs).names],
                         filesystem=out.fs)
    h, valid = _u64(keys.column(schema.PHASH))
    groups = _near_groups(cfg, keys, h) if identity else None
    gids = offset + np.arange(keys.num_rows, dtype=np.int64)
    ids, eh, eg, _ = _entries(cfg, keys, gids, h, groups, valid)
    return ids, eh, eg if identity else None


def _near_unit(job: _UnitJob) -> int:
    """One unit of the near engine: read the pHash column shard by shard, keep this unit's key
    block, and write the pairs of hash values its tables own (plus repeated values, for table 0).
    Skipped when an earlier attempt wrote the file. Returns the bytes written."""
    out = Dataset(job.output_url)
    path = _unit_path(out, job.rule, f"u{job.unit:06d}.npz")
    if out.fs.exists(path):
        return int(out.fs.size(path))
    cfg = DedupConfig(**job.config)
    scheme = neardup.Scheme(cfg.radius, job.scheme_blocks)
    # blocks == 1: one column serves every table of the unit; else each table keeps its block's rows
    own = job.tables[:1] if job.blocks == 1 else job.tables
    held: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {t: [] for t in own}
    for n in job.shards:
        ids, h, _ = _shard_entries(cfg, out, n, 0, identity=False)
        full = (ids & ((1 << _ENTRY_BITS) - 1)) == 0  # the image's own pHash, not a crop's
        for t in own:
            sel = neardup.in_block(scheme, h, t, job.block, job.blocks)
            held[t].append((h[sel], full[sel]))
    a_, b_, rep = [], [], []
    for t in own:
        column = np.concatenate([c for c, _ in held[t]] or [np.empty(0, np.uint64)])
        full = np.concatenate([f for _, f in held[t]] or [np.empty(0, bool)])
        del held[t]
        a, b = neardup.hash_pairs(scheme, column, job.tables if job.blocks == 1 else [t])
        if cfg.crops:  # a pair of crop hashes only links crops, which _rows_of drops: not written
            fulls = column[full]
            keep = np.isin(a, fulls) | np.isin(b, fulls)
            a, b = a[keep], b[keep]
        a_.append(a)
        b_.append(b)
        if 0 in (job.tables if job.blocks == 1 else (t,)):
            rep.append(neardup.repeated(column))  # equal values share every key: table 0 sees each whole
    arrays = {"a": np.concatenate(a_), "b": np.concatenate(b_)}
    if rep:
        arrays["repeated"] = np.concatenate(rep)
    _save_npz(out, path, arrays)
    return int(out.fs.size(path))


@dataclasses.dataclass(frozen=True)
class _NearRowsJob:
    output_url: str
    rule: int
    shard: int
    offset: int
    config: dict[str, Any]


def _near_rows(job: _NearRowsJob) -> dict[str, np.ndarray]:
    """The entries of one shard whose hash is in a pair or repeats: entry id, hash, identity."""
    cfg = DedupConfig(**job.config)
    out = Dataset(job.output_url)
    wanted = _load_npz(out, _unit_path(out, job.rule, "wanted.npz"))["values"]
    ids, eh, eg = _shard_entries(cfg, out, job.shard, job.offset, identity=True)
    hit = np.isin(eh, wanted)
    return {"id": ids[hit], "hash": eh[hit], "group": eg[hit] if eg is not None else None}


def _load_npz(out: Dataset, path: str) -> dict[str, np.ndarray]:
    import io

    with out.fs.open(path, "rb") as f:
        z = np.load(io.BytesIO(f.read()))
        return {k: z[k] for k in z.files}


def near_pairs_distributed(ctx: PlanContext, cfg: DedupConfig, rule: int, shards: list[int],
                           offsets: dict[int, int], total: int, blocks: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of one near rule with tasks that read the pHash column (``neardup.hash_units``): bytes
    written are the pairs of hash values and the values wanted back, never rows x tables."""
    out = ctx.output
    scheme = neardup.Scheme(cfg.radius, blocks)
    entries = total * (1 + (phash.CROP_COUNT if cfg.crops else 0))
    units = neardup.hash_units(len(scheme.tables), entries, cfg.hashes_per_task, ctx.slots)
    cfg_dict = cfg.model_dump(mode="json")
    jobs = [_UnitJob(out.url, rule, u, tables, block, nblocks, blocks, tuple(shards), cfg_dict)
            for u, (tables, block, nblocks) in enumerate(units)]
    written = sum(ctx.map(_near_unit, jobs))
    parts = [_load_npz(out, _unit_path(out, rule, f"u{u:06d}.npz")) for u in range(len(jobs))]
    pa_ = np.concatenate([p["a"] for p in parts] or [np.empty(0, np.uint64)])
    pb_ = np.concatenate([p["b"] for p in parts] or [np.empty(0, np.uint64)])
    wanted = np.unique(np.concatenate([pa_, pb_, *(p["repeated"] for p in parts if "repeated" in p)]))
    del parts
    path = _unit_path(out, rule, "wanted.npz")
    _save_npz(out, path, {"values": wanted})
    written += int(out.fs.size(path))
    got = ctx.map(_near_rows, [_NearRowsJob(out.url, rule, n, offsets[n], cfg_dict) for n in shards])
    ids = np.concatenate([g["id"] for g in got] or [np.empty(0, np.int64)])
    hashes = np.concatenate([g["hash"] for g in got] or [np.empty(0, np.uint64)])
    with_groups = [g["group"] for g in got if g["group"] is not None]
    groups = np.concatenate(with_groups) if with_groups else None
    log.info("dedup near (rule %d): %d units, %d hash pairs, %d entries read back, %d bytes written",
             rule, len(jobs), len(pa_), len(ids), written)
    return _rows_of(cfg, *neardup.resolve_hash_pairs(pa_, pb_, ids, hashes, groups))


# -- keep policy, decisions --------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _MembersJob:
    output_url: str
    input_url: str
    shard: int
    offset: int
    rows: tuple[int, ...]
    embeddings: bool = False


def _members(job: _MembersJob) -> dict[str, Any]:
    """Everything the decision needs of the given rows of one shard (cluster candidates only): uid,
    keep scores, the per-rule identity keys and the confirmation signals."""
    out = Dataset(job.output_url)
    rows = pa.array(job.rows, pa.int64())
    t = pq.read_table(_plan_path(out, "keys", f"{job.shard:08d}.parquet"), filesystem=out.fs).take(rows)
    res: dict[str, Any] = {
        "gid": job.offset + np.asarray(job.rows, dtype=np.int64),
        "table": t.drop_columns([c for c in (_ROW,) if c in t.column_names]),
    }
    if job.embeddings:
        emb = Dataset(job.input_url).read_shard(job.shard, columns=[schema.IMAGE_EMBEDDING]).take(rows)
        col = emb.column(0).combine_chunks()
        dim = col.type.list_size
        res["emb"] = np.asarray(col.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(-1, dim)
    return res


def _identity(keys: pa.Table, kinds: list[str], color: bool) -> np.ndarray:
    """Per row, the words that must be equal for two rows to be identical under a rule."""
    parts: list[np.ndarray] = []
    for kind, cols in (
        ("exact", (_SHA_HI, _SHA_LO)),
        ("caption", (_CAP_HI, _CAP_LO)),
        ("near", (schema.PHASH,)),
    ):
        if kind in kinds:
            parts += [_u64(keys.column(c))[0][:, None] for c in cols]
    if "near" in kinds and color:
        parts.append(np.ascontiguousarray(_colors(keys.column(schema.COLOR_SIG))[0]).view(np.uint64))
    if "caption_near" in kinds:
        col = keys.column(_SIG).combine_chunks()
        parts.append(np.asarray(col.flatten().to_numpy(), dtype=np.uint64).reshape(keys.num_rows, -1))
    return np.concatenate(parts, axis=1)


def _confirms(cfg: DedupConfig) -> bool:
    return cfg.confirm != "none" and any("near" in rule.split("+") for rule in cfg.rules)


def missing_confirmation(cfg: DedupConfig, columns: list[str]) -> str | None:
    """Why the input cannot confirm or crop-match near pairs as configured (one line with the
    fix), or None."""
    # Without a stored pHash the scan hashes the bytes and gets every signal from that decode.
    stored = schema.PHASH in columns and not cfg.rehash
    lacks = []  # (column, what it is for, the setting that does without it)
    if _confirms(cfg) and cfg.confirm == "color" and stored and schema.COLOR_SIG not in columns:
        lacks.append((schema.COLOR_SIG, "near duplicates cannot be confirmed", "confirm=none"))
    if cfg.crops and stored and schema.PHASH_CROPS not in columns:
        lacks.append((schema.PHASH_CROPS, "cropped copies cannot be matched", "crop_radius=0"))
    if lacks:
        return (
            f"dedup: the input has no {' or '.join(c for c, _, _ in lacks)} column (written before "
            f"{'they' if len(lacks) > 1 else 'it'} existed), so {' and '.join(w for _, w, _ in lacks)}; "
            "rerun import/download, or add --set rehash=true to compute "
            f"{'them' if len(lacks) > 1 else 'it'} from the image bytes, or "
            + " ".join(f"--set {s}" for _, _, s in lacks)
        )
    if not _confirms(cfg):
        return None
    if cfg.confirm == "clip" and schema.IMAGE_EMBEDDING not in columns:
        return (
            f"dedup: confirm=clip needs the {schema.IMAGE_EMBEDDING} column; run `clip` with "
            "--set embeddings=true first, or use --set confirm=color"
        )
    return None


class DedupStage(Stage):
    name = NAME
    Config = DedupConfig

    def needs(self) -> dict[str, str]:
        if self.config.confirm != "clip":
            return {}
        return {schema.IMAGE_EMBEDDING: "set embeddings: true on a clip step before it, or confirm: color"}

    def check(self, input: Dataset | None) -> None:
        assert input is not None
        schema_ = input.schema()
        why = missing_confirmation(self.config, list(schema_.names) if schema_ is not None else [])
        if why:
            raise ConfigError(why)

    # -- plan ----------------------------------------------------------------------------------
    def plan(self, ctx: PlanContext) -> list[int] | None:
        cfg: DedupConfig = self.config
        assert ctx.input is not None
        out = ctx.output
        shards = ctx.input.shard_ids()
        cfg_dict = cfg.model_dump(mode="json")
        scans = ctx.map(_scan_shard, [_ScanJob(ctx.input.url, out.url, n, cfg_dict) for n in shards])
        rows = {s["shard"]: s["rows"] for s in scans}
        offsets, total = {}, 0
        for n in shards:
            offsets[n] = total
            total += rows[n]
        engine = cfg.engine
        if engine == "auto":
            engine = "sort" if total <= local_limit(cfg) else "distributed"
        blocks = cfg.blocks or neardup.choose_blocks(max(total, 2), cfg.radius) if cfg.radius > 0 else 0
        log.info(
            "dedup plan: %d rows in %d shards, engine %s, radius %d", total, len(shards), engine, cfg.radius
        )

        undecodable = np.empty(0, np.int64)
        if engine == "distributed":
            unit_rules = [r for r, rule in enumerate(cfg.rules) if _unit_rule(cfg, rule)]
            shuffled = [r for r in range(len(cfg.rules)) if r not in unit_rules]
            res: list[tuple[int, np.ndarray, np.ndarray]] = []
            if shuffled:  # exact keys and captions: one row per rule to its key's partition
                parts = neardup.partitions_for(total, len(shuffled), cfg.rows_per_partition)
                ctx.map(
                    _partition_shard, [_PartJob(out.url, n, offsets[n], parts, blocks, cfg_dict) for n in shards]
                )
                jobs = [_ReduceJob(out.url, r, q, tuple(shards), blocks, cfg_dict) for r in shuffled for q in range(parts)]
                res = ctx.map(_reduce_partition, jobs)
            for r in unit_rules:
                res.append((r, *near_pairs_distributed(ctx, cfg, r, shards, offsets, total, blocks)))
            # intermediate only, removed once reduced
            for sub in ("parts", "near"):
                out.plan_store(_SUB).delete(sub)
            edges = [
                (
                    np.concatenate([a for rr, a, _ in res if rr == r] or [np.empty(0, np.int64)]),
                    np.concatenate([b for rr, _, b in res if rr == r] or [np.empty(0, np.int64)]),
                )
                for r in range(len(cfg.rules))
            ]
            if cfg.undecodable == "drop":
                und = []
                for n in shards:
                    t = pq.read_table(
                        _plan_path(out, "keys", f"{n:08d}.parquet"), columns=[schema.PHASH], filesystem=out.fs
                    )
                    und.append(
                        offsets[n] + np.flatnonzero(t.column(0).is_null().to_numpy(zero_copy_only=False))
                    )
                undecodable = np.concatenate(und) if und else undecodable
        else:
            tables = [
                pq.read_table(_plan_path(out, "keys", f"{n:08d}.parquet"), filesystem=out.fs) for n in shards
            ]
            keys = pa.concat_tables(tables) if tables else None
            gids = np.arange(total, dtype=np.int64)
            edges = _edges_local(cfg, keys, gids, engine) if keys is not None and total else []
            if cfg.undecodable == "drop" and keys is not None:
                undecodable = np.flatnonzero(
                    keys.column(schema.PHASH).is_null().to_numpy(zero_copy_only=False)
                )
        if cfg.undecodable == "drop" and len(undecodable):
            und_set = undecodable
            edges = [
                (
                    a[~np.isin(a, und_set) & ~np.isin(b, und_set)],
                    b[~np.isin(a, und_set) & ~np.isin(b, und_set)],
                )
                for a, b in edges
            ]
        self._decide(ctx, cfg, shards, offsets, edges, undecodable)
        return shards

    # Over 80 lines: the duplicate kinds are settled in one pass over the clusters in the keep rule's order;
    # splitting it needs the cluster state moved into its own class.
    def _decide(
        self,
        ctx: PlanContext,
        cfg: DedupConfig,
        shards: list[int],
        offsets: dict[int, int],
        edges: list[tuple[np.ndarray, np.ndarray]],
        undecodable: np.ndarray,
    ) -> None:
        out = ctx.output
        empty = np.empty(0, np.int64)
        nodes = np.unique(np.concatenate([empty, *(x for e in edges for x in e)]))
        # fetch what the decision needs of every candidate, shard by shard in gid order
        starts = np.array([offsets[n] for n in shards], dtype=np.int64)
        which = np.searchsorted(starts, nodes, side="right") - 1 if len(shards) else empty
        use_clip = cfg.confirm == "clip" and _confirms(cfg)
        jobs = []
        for j, n in enumerate(shards):
            sel = nodes[which == j]
            if len(sel):
                rows = tuple((sel - offsets[n]).tolist())
                jobs.append(_MembersJob(out.url, ctx.input.url, n, offsets[n], rows, use_clip))
        mem = ctx.map(_members, jobs) if jobs else []
        m = len(nodes)
        if mem:
            keys = pa.concat_tables([x["table"] for x in mem])
        else:
            keys = pa.table({schema.UID: pa.array([], pa.string())})
        uid = keys.column(schema.UID).to_pylist()
        # a member without a pHash (an undecodable exact copy, undecodable: keep) has no distance
        ph, has_ph = _u64(keys.column(schema.PHASH)) if m else (np.empty(0, np.uint64), np.empty(0, bool))
        pixels = keys.column(_PIXELS).to_numpy() if m else empty
        clip = keys.column(schema.CLIP_SCORE).to_numpy(zero_copy_only=False) if m else np.empty(0)
        clip = np.nan_to_num(np.asarray(clip, dtype=np.float64), nan=-np.inf)
        color, color_ok = _colors(keys.column(schema.COLOR_SIG)) if m else (np.empty((0, 48)), empty)
        emb = np.concatenate([x["emb"] for x in mem]) if use_clip and mem else None
        crops = None
        if m and cfg.crops and schema.PHASH_CROPS in keys.column_names:
            crops = _crops(keys.column(schema.PHASH_CROPS))

        def reach(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            """pHash bits between node positions a and b, and whether that is crop-aligned: the
            full-image distance, or (crop matching) one's crop to the other's full image when the
            full images are beyond the radius and the crop is within crop_radius."""
            full = phash.hamming_np(ph[a], ph[b]).astype(np.int64)
            if crops is None:
                return full, np.zeros(len(a), dtype=bool)
            c, ok = crops
            far = np.int64(phash.HASH_SIZE * phash.HASH_SIZE + 1)
            cd = np.minimum(
                np.where(ok[a], phash.crop_distance(c[a], ph[b]), far),
                np.where(ok[b], phash.crop_distance(c[b], ph[a]), far),
            ).astype(np.int64)
            aligned = (full > cfg.radius) & (cd <= cfg.crop_radius)
            return np.where(aligned, cd, full), aligned

        def confirmation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
            """The second signal between node positions a and b (Delta-E, or cosine)."""
            if use_clip:
                return np.einsum("ij,ij->i", emb[a], emb[b])
            d = phash.color_distance(color[a], color[b])
            return np.where(color_ok[a] & color_ok[b], d, np.inf)

        def confirmed(a: np.ndarray, b: np.ndarray) -> np.ndarray:
            if not _confirms(cfg):
                return np.ones(len(a), dtype=bool)
            c = confirmation(a, b)
            return c >= cfg.clip_threshold if use_clip else c <= cfg.color_threshold

        split = []
        for rule, (ea, eb) in zip(cfg.rules, edges, strict=True):
            kinds = rule.split("+")
            a, b = np.searchsorted(nodes, ea), np.searchsorted(nodes, eb)
            if m:
                ident = _identity(keys, kinds, cfg.confirm == "color")
                same = np.all(ident[a] == ident[b], axis=1)
            else:
                same = np.ones(0, dtype=bool)
            near = ~same
            if "near" in kinds:
                bits, aligned = reach(a, b)
                near &= (bits <= cfg.radius) & (~aligned | (bits <= cfg.crop_radius)) & confirmed(a, b)
            split.append((a[same], b[same], a[near], b[near]))
        # keep policy: best first, ties by position (gid)
        if cfg.keep == "resolution":
            order = np.lexsort((nodes, -clip, -pixels))
        elif cfg.keep == "clip_score":
            order = np.lexsort((nodes, -pixels, -clip))
        else:
            order = np.argsort(nodes, kind="stable")
        leader, by = neardup.leader_clusters(m, order, split)
        pos = np.arange(m)
        kept = leader == pos
        in_cluster = ~kept | np.isin(pos, leader[~kept])
        distance = np.full(m, -1, dtype=np.int64)
        cropped = np.zeros(m, dtype=bool)
        score = np.full(m, np.nan)
        d = ~kept
        distance[d], cropped[d] = reach(pos[d], leader[d])
        distance[d & ~(has_ph & has_ph[leader])] = -1
        if _confirms(cfg) and d.any():
            score[d] = confirmation(pos[d], leader[d])
        rules = [*cfg.rules, ""]
        c = in_cluster
        clusters = pa.table(
            {
                _GID: pa.array(nodes[c], pa.int64()),
                schema.UID: pa.array([u for u, x in zip(uid, c, strict=True) if x], pa.string()),
                _CLUSTER: pa.array(nodes[leader[c]], pa.int64()),
                _KEPT: pa.array(kept[c]),
                _KIND: pa.array([rules[k] for k in by[c].tolist()], pa.string()),
                schema.DUP_OF: pa.array(
                    [None if kept[i] else uid[leader[i]] for i in np.flatnonzero(c).tolist()], pa.string()
                ),
                schema.PHASH: pa.array(ph[c], pa.uint64(), mask=~has_ph[c]),
                _PIXELS: pa.array(pixels[c], pa.int64()),
                _DISTANCE: pa.array(np.where(distance[c] >= 0, distance[c], None).tolist(), pa.int32()),
                _CROP: pa.array(cropped[c]),
                _CONFIRM: pa.array(
                    [None if np.isnan(x) or np.isinf(x) else float(x) for x in score[c].tolist()], pa.float32()
                ),
            }
        )
        _write_atomic(out, clusters, _plan_path(out, "clusters.parquet"))
        und_by_shard = np.searchsorted(starts, undecodable, side="right") - 1 if len(shards) else undecodable
        for j, n in enumerate(shards):
            sel = (which == j) & ~kept
            rows = (nodes[sel] - offsets[n]).tolist()
            dup = [uid[i] for i in leader[sel].tolist()]
            kinds = [rules[k] for k in by[sel].tolist()]
            und = (undecodable[und_by_shard == j] - offsets[n]).tolist()
            table = pa.table(
                {
                    _ROW: pa.array(rows + und, pa.int64()),
                    schema.DUP_OF: pa.array(dup + [None] * len(und), pa.string()),
                    _KIND: pa.array(kinds + [UNDECODABLE] * len(und), pa.string()),
                }
            )
            _write_atomic(out, table, _plan_path(out, "decisions", f"{n:08d}.parquet"))

    # -- apply ---------------------------------------------------------------------------------
    def process(self, table: pa.Table, ctx: ShardContext) -> pa.Table:
        out = ctx.output
        keys = pq.read_table(
            _plan_path(out, "keys", f"{ctx.shard:08d}.parquet"),
            columns=[schema.UID, schema.PHASH, schema.COLOR_SIG, schema.PHASH_CROPS],
            filesystem=out.fs,
        )
        if keys.num_rows != table.num_rows or not keys.column(schema.UID).equals(table.column(schema.UID)):
            raise RuntimeError(
                f"dedup: input shard {ctx.shard} changed since the plan; rerun with --overwrite"
            )
        dec = pq.read_table(_plan_path(out, "decisions", f"{ctx.shard:08d}.parquet"), filesystem=out.fs)
        n = table.num_rows
        reasons: list[str | None] = [None] * n
        dup_of: list[str | None] = [None] * n
        for row, d, k in zip(
            dec.column(_ROW).to_pylist(),
            dec.column(schema.DUP_OF).to_pylist(),
            dec.column(_KIND).to_pylist(),
            strict=True,
        ):
            reasons[row] = schema.reason(NAME, k)
            dup_of[row] = d
        ctx.stats["duplicates"] = sum(1 for d in dup_of if d is not None)
        table = schema.with_column(table, schema.PHASH, keys.column(schema.PHASH))
        table = schema.with_column(table, schema.COLOR_SIG, keys.column(schema.COLOR_SIG))
        if keys.column(schema.PHASH_CROPS).null_count < keys.num_rows or schema.PHASH_CROPS in table.column_names:
            table = schema.with_column(table, schema.PHASH_CROPS, keys.column(schema.PHASH_CROPS))
        table = schema.with_column(table, schema.DUP_OF, pa.array(dup_of, pa.string()))
        return schema.with_column(table, schema.DROP_REASON, pa.array(reasons, pa.string()))

    # -- explain -------------------------------------------------------------------------------
    def explain(self, output: Dataset, uid: str) -> dict[str, Any] | None:
        path = _plan_path(output, "clusters.parquet")
        if not output.fs.exists(path):
            return None
        t = pq.read_table(path, filesystem=output.fs)
        hit = t.filter(pc.equal(t.column(schema.UID), uid))
        if hit.num_rows == 0:
            return {"duplicate_cluster": None, "note": "no duplicate of this sample was found"}
        cluster = hit.column(_CLUSTER)[0].as_py()
        members = t.filter(pc.equal(t.column(_CLUSTER), cluster))
        cols = [schema.UID, _KEPT, _KIND, schema.DUP_OF, _DISTANCE, _CONFIRM, schema.PHASH, _PIXELS]
        rows = members.select([c for c in [*cols, _CROP] if c in members.column_names]).to_pylist()
        for r in rows:
            r[schema.PHASH] = None if r[schema.PHASH] is None else phash.to_hex(r[schema.PHASH])
            if r[schema.PHASH] is not None:
                me = hit.column(schema.PHASH)[0].as_py()
                r["hamming_to_this"] = None if me is None else phash.hamming(me, int(r[schema.PHASH], 16))
        kept = [r[schema.UID] for r in rows if r[_KEPT]]
        return {
            "duplicate_cluster": cluster,
            "rule": _rule_text(self.config),
            "size": len(rows),
            "kept": kept[0] if kept else None,
            "members": rows,
        }


def _rule_text(cfg: DedupConfig) -> str:
    text = f"each dropped member is within radius {cfg.radius} of the kept one (distance: pHash bits)"
    if cfg.crops:
        text += f", or a crop of one within {cfg.crop_radius} of the other (crop: true)"
    if _confirms(cfg):
        signal = "colour Delta-E" if cfg.confirm == "color" else "CLIP cosine"
        text += f", confirmed by {cfg.confirm} (confirm: {signal})"
    return text


def cluster_members(output: Dataset) -> dict[str, dict[str, Any]]:
    """uid -> {kept, kind, distance, confirm, crop} for every member of a duplicate cluster of a finished
    dedup output (the report shows them); empty when the plan files are gone."""
    path = _plan_path(output, "clusters.parquet")
    if not output.fs.exists(path):
        return {}
    cols = [schema.UID, _KEPT, _KIND, _DISTANCE, _CONFIRM, _CROP]
    have = pq.read_schema(path, filesystem=output.fs).names
    t = pq.read_table(path, columns=[c for c in cols if c in have], filesystem=output.fs)
    confirm = ((output.manifest() or {}).get("config") or {}).get("confirm")
    signal = {"color": "colour Delta-E", "clip": "CLIP cosine"}.get(confirm)
    return {r.pop(schema.UID): {**r, "signal": signal} for r in t.to_pylist()}
