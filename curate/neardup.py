"""All pairs of 64-bit hashes within a Hamming radius, and connected components of duplicate edges.

Multi-index hashing by pigeonhole. Cut the 64 bits into ``B`` blocks. Two hashes within radius ``r``
differ in at most ``r`` blocks, so at least ``B - r`` blocks are identical: every such pair shares the
exact key made of some ``B - r``-subset of blocks. One "table" per subset (``C(B, B - r)`` tables);
within a table, rows with the same key are candidates, verified by their full Hamming distance.

``B = r + 1`` is the textbook scheme (r + 1 bands, any pair shares a band); it is what faiss's
``IndexBinaryMultiHash`` does with ``nflip = 0``. At 10M hashes its bands (64 / (r + 1) ~ 10 bits)
are far too short: every band bucket holds thousands of unrelated hashes and the candidate count
explodes. Larger ``B`` (Manku, Jain & Das Sarma, WWW 2007) makes keys of ~21-32 bits at the price
of more tables; ``choose_blocks`` picks ``B`` from a cost model (tables x sort + candidates x verify).

A pair sharing several keys is reported by one table only: the first (lexicographic) subset of its
identical blocks. That keeps the output exact and duplicate free, and lets tables be processed in
any order or on any worker, which is what the distributed path does: rows are partitioned by
(table, key) so that every group lives on exactly one worker (``partition_rows`` then
``pairs_in_partition``). All paths return exactly the set of pairs within the radius (tests compare
them with brute force), so clusters built from them are identical.

Hashes are uint64 numpy arrays; row ids are int64 arrays.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Sequence

import numpy as np

log = logging.getLogger(__name__)

BITS = 64
MAX_BLOCKS = 16

# Cost model of the sort kernel on this kind of machine: ns per row per table (key, sort, scan) and
# ns per candidate pair (gather, xor, popcount, canonical check). Only the ratio matters.
_NS_PER_ROW_TABLE = 35.0
_NS_PER_CANDIDATE = 150.0


# -- layout ------------------------------------------------------------------------------------
def block_layout(blocks: int) -> list[tuple[int, int]]:
    """(shift, width) of each block; widths differ by at most one bit."""
    widths = [BITS // blocks + (1 if i < BITS % blocks else 0) for i in range(blocks)]
    out, shift = [], 0
    for w in widths:
        out.append((shift, w))
        shift += w
    return out


def tables(blocks: int, radius: int) -> list[tuple[int, ...]]:
    """The block subsets whose concatenation is a table key, in lexicographic order."""
    return list(itertools.combinations(range(blocks), blocks - radius))


def estimate_seconds(n: int, radius: int, blocks: int) -> float:
    layout = block_layout(blocks)
    cost = 0.0
    for combo in tables(blocks, radius):
        keybits = sum(layout[b][1] for b in combo)
        candidates = n * (n - 1) / 2 / 2.0**keybits
        cost += n * _NS_PER_ROW_TABLE + candidates * _NS_PER_CANDIDATE
    return cost * 1e-9


def choose_blocks(n: int, radius: int) -> int:
    """Number of blocks minimising the estimated cost for ``n`` hashes (r + 1 for small n)."""
    if not 0 <= radius < BITS // 2:
        raise ValueError(f"radius must be in [0, {BITS // 2}), got {radius}")
    best = min(
        range(radius + 1, min(MAX_BLOCKS, BITS) + 1), key=lambda b: (estimate_seconds(n, radius, b), b)
    )
    return best


def _canonical_lookup(blocks: int, radius: int) -> np.ndarray:
    """For each mask of identical blocks, the index of the first table whose subset it contains."""
    combos = tables(blocks, radius)
    lookup = np.full(1 << blocks, -1, dtype=np.int32)
    need = blocks - radius
    for mask in range(1 << blocks):
        eq = [b for b in range(blocks) if mask >> b & 1]
        if len(eq) >= need:
            lookup[mask] = combos.index(tuple(eq[:need]))
    return lookup


class Scheme:
    """Blocks, tables and the precomputed bits of one (radius, blocks) choice."""

    def __init__(self, radius: int, blocks: int):
        if not radius < blocks <= MAX_BLOCKS:
            raise ValueError(f"need radius < blocks <= {MAX_BLOCKS}, got radius={radius} blocks={blocks}")
        self.radius = radius
        self.blocks = blocks
        self.layout = block_layout(blocks)
        self.tables = tables(blocks, radius)
        self.canonical = _canonical_lookup(blocks, radius)
        self.keybits = [sum(self.layout[b][1] for b in c) for c in self.tables]

    @classmethod
    def for_size(cls, n: int, radius: int, blocks: int | None = None) -> Scheme:
        return cls(radius, blocks or choose_blocks(n, radius))

    def key(self, hashes: np.ndarray, t: int) -> np.ndarray:
        """Key of table ``t``: its blocks' bits, concatenated (uint64)."""
        key = np.zeros(len(hashes), dtype=np.uint64)
        pos = 0
        for b in self.tables[t]:
            shift, width = self.layout[b]
            part = (hashes >> np.uint64(shift)) & np.uint64((1 << width) - 1)
            key |= part << np.uint64(pos)
            pos += width
        return key

    def permuted(self, hashes: np.ndarray, t: int) -> np.ndarray:
        """The hash with table ``t``'s key bits moved to the low end (same Hamming distances)."""
        rest = [b for b in range(self.blocks) if b not in self.tables[t]]
        out = self.key(hashes, t)
        pos = self.keybits[t]
        for b in rest:
            shift, width = self.layout[b]
            out |= ((hashes >> np.uint64(shift)) & np.uint64((1 << width) - 1)) << np.uint64(pos)
            pos += width
        return out

    def first_table(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Index of the table that owns each pair (a[i], b[i]) (-1 if none: too far apart)."""
        x = a ^ b
        mask = np.zeros(len(x), dtype=np.int64)
        for i, (shift, width) in enumerate(self.layout):
            same = ((x >> np.uint64(shift)) & np.uint64((1 << width) - 1)) == 0
            mask |= same.astype(np.int64) << i
        return self.canonical[mask]


# -- kernels -----------------------------------------------------------------------------------
def popcount(x: np.ndarray) -> np.ndarray:
    return np.bitwise_count(x)


def _equal_runs(sorted_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All (i, j), i < j, positions in a sorted array with equal keys. Work is O(n + pairs)."""
    firsts, seconds = [], []
    cand = np.flatnonzero(sorted_keys[1:] == sorted_keys[:-1])
    d = 1
    n = len(sorted_keys)
    while cand.size:
        firsts.append(cand)
        seconds.append(cand + d)
        d += 1
        cand = cand[cand + d < n]
        # sorted: k[i] == k[i + d] implies k[i] == k[i + d - 1], so candidates only shrink
        cand = cand[sorted_keys[cand] == sorted_keys[cand + d]]
    if not firsts:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty
    return np.concatenate(firsts), np.concatenate(seconds)


def _sort_order(keys: np.ndarray, keybits: int) -> np.ndarray:
    """Positions of ``keys`` in key order; packs key and position into one uint64 when they fit,
    because numpy sorts plain uint64 several times faster than it argsorts."""
    n = len(keys)
    posbits = max(1, int(n - 1).bit_length())
    if keybits + posbits <= BITS:
        packed = (keys << np.uint64(posbits)) | np.arange(n, dtype=np.uint64)
        packed.sort()
        return (packed & np.uint64((1 << posbits) - 1)).astype(np.int64)
    return np.argsort(keys, kind="stable")


def _table_pairs(
    scheme: Scheme, hashes: np.ndarray, t: int, keys: np.ndarray | None = None, keybits: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (positions) within the radius that table ``t`` owns, among distinct ``hashes``."""
    if keys is None:
        keys = scheme.key(hashes, t)
        keybits = scheme.keybits[t]
    order = _sort_order(keys, keybits)
    i, j = _equal_runs(keys[order])
    if not i.size:
        return i, j
    a, b = order[i], order[j]
    ha, hb = hashes[a], hashes[b]
    ok = popcount(ha ^ hb) <= scheme.radius
    a, b, ha, hb = a[ok], b[ok], ha[ok], hb[ok]
    ok = scheme.first_table(ha, hb) == t
    a, b = a[ok], b[ok]
    return np.minimum(a, b), np.maximum(a, b)


def _collapse(
    hashes: np.ndarray, groups: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Distinct rows, the index of each row's distinct row, and the pairs among identical rows
    (each row to the first row of its group: same components, linear size).

    Rows are identical when their ``groups`` keys are equal (default: their hashes); a key may be
    a 2-D array (rows of several uint64 words), e.g. the pHash with a colour signature, so that
    rows with one pHash but other colours stay distinct and are compared like any near pair.
    The distinct hashes returned may then repeat; the kernels handle equal hashes.

    ``groups`` with fewer rows than ``hashes`` covers the first rows only; every later row is
    distinct (dedup's crop entries, which follow the full images' entries)."""
    if groups is not None and 0 < len(groups) < len(hashes):
        n = len(groups)
        uniq, first, sa, sb = _collapse(hashes[:n], groups)
        rest = np.arange(n, len(hashes))
        return np.concatenate([uniq, hashes[n:]]), np.concatenate([first, rest]), sa, sb
    if groups is not None and len(groups) == 0:
        groups = None if len(hashes) == 0 else np.arange(len(hashes), dtype=np.uint64)
    key = hashes if groups is None else np.asarray(groups, dtype=np.uint64).reshape(len(hashes), -1)
    if key.ndim == 2 and key.shape[1] == 1:
        key = key[:, 0]
    if key.ndim == 1:
        _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
    else:
        _, first, inverse = np.unique(key, axis=0, return_index=True, return_inverse=True)
    inverse = np.asarray(inverse).reshape(-1)
    rows = np.arange(len(hashes))
    rep = first[inverse]
    dup = rows != rep
    return hashes[first], first, rep[dup], rows[dup]


def _expand(pairs_u: tuple[np.ndarray, np.ndarray], first: np.ndarray, same: tuple[np.ndarray, np.ndarray]):
    a = np.concatenate([first[pairs_u[0]], same[0]]).astype(np.int64)
    b = np.concatenate([first[pairs_u[1]], same[1]]).astype(np.int64)
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    return lo, hi


def near_pairs_sort(
    hashes: np.ndarray, radius: int, blocks: int | None = None, groups: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """All row pairs (i < j) with Hamming distance <= radius, by sorting each table's keys.

    Rows with identical hashes are linked to the first such row (not all pairwise), so the output
    has the same connected components as the full pair set with linear size in a flat group.
    ``groups``: what makes rows identical (see ``_collapse``).
    """
    hashes = np.ascontiguousarray(hashes, dtype=np.uint64)
    uniq, first, sa, sb = _collapse(hashes, groups)
    pa_, pb_ = [], []
    if radius > 0 and len(uniq) > 1:
        scheme = Scheme.for_size(len(uniq), radius, blocks)
        for t in range(len(scheme.tables)):
            a, b = _table_pairs(scheme, uniq, t)
            pa_.append(a)
            pb_.append(b)
    empty = np.empty(0, dtype=np.int64)
    pu = (np.concatenate(pa_) if pa_ else empty, np.concatenate(pb_) if pb_ else empty)
    return _expand(pu, first, (sa, sb))


def near_pairs_faiss(
    hashes: np.ndarray, radius: int, blocks: int | None = None, groups: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Same result as ``near_pairs_sort``, with faiss binary hash indexes doing the search.

    ``blocks == radius + 1`` with equal-width bands is one ``IndexBinaryMultiHash`` (nflip=0);
    otherwise one ``IndexBinaryHash`` per table over codes permuted so the table's key comes first.
    """
    import faiss  # lazy: only this path needs it

    hashes = np.ascontiguousarray(hashes, dtype=np.uint64)
    uniq, first, sa, sb = _collapse(hashes, groups)
    pa_, pb_ = [], []
    empty = np.empty(0, dtype=np.int64)
    if radius > 0 and len(uniq) > 1:
        scheme = Scheme.for_size(len(uniq), radius, blocks)
        if scheme.blocks == radius + 1:
            # r + 1 bands of b bits (leftover bits in no band: the pigeonhole still holds)
            b = BITS // (radius + 1)
            index = faiss.IndexBinaryMultiHash(BITS, radius + 1, b)
            codes = uniq.view(np.uint8).reshape(-1, 8)
            index.add(codes)
            lims, _, labels = index.range_search(codes, radius + 1)  # faiss: distance < radius
            q = np.repeat(np.arange(len(uniq)), np.diff(lims.astype(np.int64)))
            keep = labels > q
            pa_.append(q[keep])
            pb_.append(labels[keep].astype(np.int64))
        else:
            for t in range(len(scheme.tables)):
                codes = scheme.permuted(uniq, t).view(np.uint8).reshape(-1, 8)
                index = faiss.IndexBinaryHash(BITS, scheme.keybits[t])
                index.add(codes)
                lims, _, labels = index.range_search(codes, radius + 1)  # faiss: distance < radius
                del index
                q = np.repeat(np.arange(len(uniq)), np.diff(lims.astype(np.int64)))
                keep = labels > q
                a, b = q[keep], labels[keep].astype(np.int64)
                own = scheme.first_table(uniq[a], uniq[b]) == t
                pa_.append(a[own])
                pb_.append(b[own])
    pu = (np.concatenate(pa_) if pa_ else empty, np.concatenate(pb_) if pb_ else empty)
    return _expand(pu, first, (sa, sb))


def near_pairs_bruteforce(
    hashes: np.ndarray, radius: int, chunk: int = 2048
) -> tuple[np.ndarray, np.ndarray]:
    """Every pair compared (O(n^2)): the reference the other paths are tested against."""
    hashes = np.ascontiguousarray(hashes, dtype=np.uint64)
    n = len(hashes)
    pa_, pb_ = [], []
    for s in range(0, n, chunk):
        block = hashes[s : s + chunk]
        d = popcount(block[:, None] ^ hashes[None, :])
        i, j = np.nonzero(d <= radius)
        i = i + s
        keep = j > i
        pa_.append(i[keep])
        pb_.append(j[keep])
    empty = np.empty(0, dtype=np.int64)
    return (
        np.concatenate(pa_).astype(np.int64) if pa_ else empty,
        np.concatenate(pb_).astype(np.int64) if pb_ else empty,
    )


# -- distributed: partition by (table, key) -----------------------------------------------------
def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: spreads keys evenly over partitions."""
    x = x.copy()
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def partition_rows(
    scheme: Scheme, ids: np.ndarray, hashes: np.ndarray, parts: int, groups: np.ndarray | None = None
) -> list[dict[str, np.ndarray]]:
    """Split rows into ``parts`` pieces so that each (table, key) group lands in exactly one piece.

    Each piece holds columns ``table`` (uint8), ``id`` (int64), ``hash`` (uint64) and ``group``
    (uint64 words, what makes rows identical: see ``_collapse``); a row appears once per table.
    Written by each input shard's task, read back per partition by ``pairs_in_partition``.
    """
    hashes = np.ascontiguousarray(hashes, dtype=np.uint64)
    ids = np.asarray(ids, dtype=np.int64)
    groups = hashes[:, None] if groups is None else np.asarray(groups, np.uint64)
    if groups.ndim == 1:
        groups = groups[:, None]
    width = groups.shape[1]
    cols = ("table", "id", "hash", "group")
    out: list[dict[str, list[np.ndarray]]] = [{c: [] for c in cols} for _ in range(parts)]
    if len(ids):
        for t in range(len(scheme.tables)):
            key = scheme.key(hashes, t)
            p = (_mix(key ^ np.uint64(t * 0x9E3779B97F4A7C15 % (1 << 64))) % np.uint64(parts)).astype(
                np.int64
            )
            order = np.argsort(p, kind="stable")
            bounds = np.searchsorted(p[order], np.arange(parts + 1))
            for q in range(parts):
                sel = order[bounds[q] : bounds[q + 1]]
                if sel.size:
                    out[q]["table"].append(np.full(sel.size, t, dtype=np.uint8))
                    out[q]["id"].append(ids[sel])
                    out[q]["hash"].append(hashes[sel])
                    out[q]["group"].append(groups[sel])
    empty = {"table": np.empty(0, np.uint8), "id": np.empty(0, np.int64), "hash": np.empty(0, np.uint64),
             "group": np.empty((0, width), np.uint64)}
    return [{c: np.concatenate(piece[c]) if piece[c] else empty[c] for c in cols} for piece in out]


def pairs_in_partition(
    scheme: Scheme, pieces: Sequence[dict[str, np.ndarray]]
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (row ids) within the radius among the rows of one partition (all its pieces)."""
    def cat(c: str, dtype) -> np.ndarray:
        return np.concatenate([p[c] for p in pieces]) if pieces else np.empty(0, dtype)

    table, ids, hashes = cat("table", np.uint8), cat("id", np.int64), cat("hash", np.uint64)
    groups = np.concatenate([p["group"] for p in pieces]) if pieces else np.empty((0, 1), np.uint64)
    pa_, pb_ = [], []
    for t in np.unique(table):
        sel = table == t
        tid, th, tg = ids[sel], hashes[sel], groups[sel]
        # identical rows: link to the smallest id (a star, as in the single-node path)
        order = np.lexsort((tid, *[tg[:, c] for c in range(tg.shape[1] - 1, -1, -1)]))
        tid, th, tg = tid[order], th[order], tg[order]
        newg = np.ones(len(tid), dtype=bool)
        newg[1:] = np.any(tg[1:] != tg[:-1], axis=1)
        rep = tid[np.maximum.accumulate(np.where(newg, np.arange(len(tid)), 0))]
        # Identical rows share every key, so table 0's partition holds each whole group: link
        # them there only, once.
        if t == 0:
            pa_.append(rep[~newg])
            pb_.append(tid[~newg])
        uh, uid = th[newg], tid[newg]
        a, b = _table_pairs(scheme, uh, int(t))
        pa_.append(uid[a])
        pb_.append(uid[b])
    empty = np.empty(0, dtype=np.int64)
    a = np.concatenate(pa_) if pa_ else empty
    b = np.concatenate(pb_) if pb_ else empty
    return np.minimum(a, b), np.maximum(a, b)


# -- distributed without a shuffle: tasks read the hash column themselves ---------------------------
# The shuffle above writes every row once per table. Here each task reads the hash column (8 bytes a
# row) and works on distinct hash *values*: a unit of work is some tables (all rows) or, when the
# column is too large for one task, one table and one block of its keys. Units return pairs of hash
# values within the radius and the values that occur more than once; one more read of the rows whose
# value is in a pair or repeats (with what makes rows identical, see ``_collapse``) turns them into
# exactly the row pairs ``near_pairs_sort`` gives (``resolve_hash_pairs``). Bytes written: the pairs.
def hash_units(n_tables: int, rows: int, max_rows: int, tasks: int = 1) -> list[tuple[tuple[int, ...], int, int]]:
    """Units of work as ``(tables, block, blocks)``.

    ``rows <= max_rows``: every unit holds the whole column once and runs a share of the tables,
    split into ``tasks`` units (the cluster's slots). Beyond: one unit per (table, block) with
    ``blocks`` chosen so a block holds about ``max_rows`` rows of the table's keys.
    """
    if rows <= max_rows:
        k = max(1, min(n_tables, tasks))
        chunks = np.array_split(np.arange(n_tables), k)
        return [(tuple(int(t) for t in c), 0, 1) for c in chunks if len(c)]
    blocks = math.ceil(rows / max_rows)
    return [((t,), b, blocks) for t in range(n_tables) for b in range(blocks)]


def in_block(scheme: Scheme, hashes: np.ndarray, t: int, block: int, blocks: int) -> np.ndarray:
    """Which ``hashes`` have table ``t``'s key in ``block`` of ``blocks`` (equal keys, equal block)."""
    if blocks == 1:
        return np.ones(len(hashes), dtype=bool)
    key = scheme.key(hashes, t) ^ np.uint64(t * 0x9E3779B97F4A7C15 % (1 << 64))
    return (_mix(key) % np.uint64(blocks)) == np.uint64(block)


def hash_pairs(scheme: Scheme, hashes: np.ndarray, tables: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Pairs ``(a < b)`` of distinct hash values within the radius that ``tables`` own (``hashes`` may
    repeat: only distinct values are compared)."""
    u = np.unique(np.asarray(hashes, dtype=np.uint64))
    pa_, pb_ = [np.empty(0, np.uint64)], [np.empty(0, np.uint64)]
    for t in tables:
        a, b = _table_pairs(scheme, u, t)
        pa_.append(u[a])
        pb_.append(u[b])
    return np.concatenate(pa_), np.concatenate(pb_)


def repeated(hashes: np.ndarray) -> np.ndarray:
    """The values that occur more than once (sorted)."""
    v, c = np.unique(np.asarray(hashes, dtype=np.uint64), return_counts=True)
    return v[c > 1]


def resolve_hash_pairs(
    pair_a: np.ndarray, pair_b: np.ndarray, ids: np.ndarray, hashes: np.ndarray, groups: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Row pairs from pairs of hash values, as ``near_pairs_sort`` reports them.

    ``ids`` / ``hashes`` / ``groups``: every row whose hash is in a pair or occurs more than once (the
    other rows have no pair). Rows identical in ``groups`` (default: the hash) are linked to the
    group's smallest id; the first rows of two groups are a pair when their hashes are equal or
    form one of the given pairs.
    """
    ids = np.asarray(ids, dtype=np.int64)
    hashes = np.asarray(hashes, dtype=np.uint64)
    empty = np.empty(0, np.int64)
    if not len(ids):
        if len(pair_a):
            raise ValueError("resolve_hash_pairs: a paired hash has no row among those given")
        return empty, empty
    key = hashes[:, None] if groups is None else np.asarray(groups, np.uint64).reshape(len(ids), -1)
    # hash first, so identity groups (which share the hash) come out sorted by hash
    order = np.lexsort((ids, *[key[:, c] for c in range(key.shape[1] - 1, -1, -1)], hashes))
    k, i, h = key[order], ids[order], hashes[order]
    new = np.ones(len(i), dtype=bool)
    new[1:] = np.any(k[1:] != k[:-1], axis=1) | (h[1:] != h[:-1])
    rep = i[np.maximum.accumulate(np.where(new, np.arange(len(i)), 0))]
    star_a, star_b = rep[~new], i[~new]
    rid, rh = i[new], h[new]  # one row per identity group, sorted by hash
    # groups with one hash and another identity (colour): every pair of them (distance 0)
    ea, eb = _equal_runs(rh)
    same_a, same_b = rid[ea], rid[eb]
    # groups of two hash values of a pair: every group of one with every group of the other
    pair_a = np.asarray(pair_a, np.uint64)
    pair_b = np.asarray(pair_b, np.uint64)
    lo_a, hi_a = np.searchsorted(rh, pair_a, "left"), np.searchsorted(rh, pair_a, "right")
    lo_b, hi_b = np.searchsorted(rh, pair_b, "left"), np.searchsorted(rh, pair_b, "right")
    ca, cb = hi_a - lo_a, hi_b - lo_b
    if np.any(ca == 0) or np.any(cb == 0):
        raise ValueError("resolve_hash_pairs: a paired hash has no row among those given")
    count = ca * cb
    which = np.repeat(np.arange(len(count)), count)
    within = np.arange(int(count.sum())) - np.repeat(np.cumsum(count) - count, count)
    xa = rid[lo_a[which] + within // cb[which]]
    xb = rid[lo_b[which] + within % cb[which]]
    a = np.concatenate([star_a, same_a, xa])
    b = np.concatenate([star_b, same_b, xb])
    return np.minimum(a, b), np.maximum(a, b)


def near_pairs_units(
    hashes: np.ndarray, radius: int, groups: np.ndarray | None = None, blocks: int | None = None,
    max_rows: int = 100_000_000, tasks: int = 1, shards: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """The unit engine in one process (what the distributed dedup plan does with one task per unit
    and ``shards`` input pieces read in turn): same pairs as ``near_pairs_sort``."""
    hashes = np.ascontiguousarray(hashes, dtype=np.uint64)
    empty = np.empty(0, np.int64)
    if radius <= 0 or len(hashes) < 2:
        return near_pairs_sort(hashes, radius, blocks, groups)
    scheme = Scheme.for_size(len(hashes), radius, blocks)
    pieces = np.array_split(np.arange(len(hashes)), max(1, shards))
    ha, hb, rep = [], [], []
    for tables_, block, nblocks in hash_units(len(scheme.tables), len(hashes), max_rows, tasks):
        for t in tables_:
            # a unit reads the column shard by shard and keeps its block's rows
            mine = np.concatenate([hashes[p][in_block(scheme, hashes[p], t, block, nblocks)] for p in pieces])
            a, b = hash_pairs(scheme, mine, [t])
            ha.append(a)
            hb.append(b)
            if t == 0:  # equal values share every key, so table 0's blocks see each repeat whole
                rep.append(repeated(mine))
    pa_, pb_ = np.concatenate(ha), np.concatenate(hb)
    wanted = np.unique(np.concatenate([pa_, pb_, *rep]))
    rows = np.flatnonzero(np.isin(hashes, wanted))
    if not len(rows):
        return empty, empty
    g = None if groups is None else np.asarray(groups, np.uint64).reshape(len(hashes), -1)[rows]
    return resolve_hash_pairs(pa_, pb_, rows, hashes[rows], g)


# -- exact keys and components -----------------------------------------------------------------
def equal_key_pairs(
    ids: np.ndarray, keys: np.ndarray, valid: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Rows with identical keys (rows of a 2-D uint64 array), each linked to the group's smallest id."""
    ids = np.asarray(ids, dtype=np.int64)
    # (numpy cannot infer the width of zero rows: reshape(0, -1) raises)
    keys = np.asarray(keys, dtype=np.uint64).reshape(len(ids), -1) if len(ids) else np.empty((0, 1), np.uint64)
    if valid is not None:
        ids, keys = ids[valid], keys[valid]
    if len(ids) < 2:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty
    order = np.lexsort((ids, *[keys[:, c] for c in range(keys.shape[1] - 1, -1, -1)]))
    k, i = keys[order], ids[order]
    new = np.ones(len(i), dtype=bool)
    new[1:] = np.any(k[1:] != k[:-1], axis=1)
    rep = i[np.maximum.accumulate(np.where(new, np.arange(len(i)), 0))]
    return rep[~new], i[~new]


def components(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Connected components of the graph with edges (a[i], b[i]) over arbitrary int64 ids.

    Returns (nodes, label): every id that appears in an edge, and its component, labelled by the
    smallest id in it (so labels do not depend on edge order or on which path found the edges).
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    nodes, inv = np.unique(np.concatenate([a, b]), return_inverse=True)
    m = len(nodes)
    if m == 0:
        return nodes, nodes.copy()
    ea, eb = inv[: len(a)], inv[len(a) :]
    graph = coo_matrix((np.ones(len(ea), dtype=np.int8), (ea, eb)), shape=(m, m))
    _, comp = connected_components(graph, directed=False)
    # label each component by its smallest node id (nodes are sorted: first occurrence is min)
    first = np.full(comp.max() + 1, m, dtype=np.int64)
    np.minimum.at(first, comp, np.arange(m))
    return nodes, nodes[first[comp]]


def partitions_for(rows: int, tables_: int, rows_per_partition: int = 4_000_000) -> int:
    """How many partitions keep each one near ``rows_per_partition`` row-table entries."""
    return max(1, math.ceil(rows * tables_ / rows_per_partition))


# -- clusters without chains -------------------------------------------------------------------
def _csr(keys: np.ndarray, values: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Offsets and values of a compressed adjacency: values[off[k]:off[k+1]] belong to key k."""
    order = np.argsort(keys, kind="stable")
    off = np.zeros(n + 1, dtype=np.int64)
    np.add.at(off, keys + 1, 1)
    return np.cumsum(off), values[order]


def leader_clusters(
    n: int, order: np.ndarray, rules: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]
) -> tuple[np.ndarray, np.ndarray]:
    """Star ("leader") clustering of ``n`` nodes: no row is dropped for resembling a row that
    resembles the kept one.

    ``order``: all node positions, best first (the keep policy). ``rules``: per rule in config order,
    ``(same_a, same_b, near_a, near_b)`` node positions. A same edge joins rows that are identical for
    the rule (equal keys: an equivalence, so its connected components are classes of mutually
    identical rows); a near edge joins two rows within the rule's threshold, and so every member of
    one's class to every member of the other's.

    Walking ``order``, the first unassigned node becomes a leader (kept) and takes every unassigned
    node directly linked to it: its own classes and the classes one near edge away. Each taken node
    is within the threshold of its leader, never of a neighbour only. A class is taken whole the
    first time any leader reaches it, so the work is linear in nodes plus edges. Returns
    ``(leader, rule)``: each node's leader (itself when it leads) and the index of the rule that
    linked it (-1 for leaders).
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    leader = np.full(n, -1, dtype=np.int64)
    linked_by = np.full(n, -1, dtype=np.int64)
    per_rule = []
    for sa, sb, na, nb in rules:
        sa, sb = np.asarray(sa, np.int64), np.asarray(sb, np.int64)
        graph = coo_matrix((np.ones(len(sa), dtype=np.int8), (sa, sb)), shape=(n, n))
        k, cls = connected_components(graph, directed=False)
        mem_off, mem = _csr(cls, np.arange(n, dtype=np.int64), k)
        ca, cb = cls[np.asarray(na, np.int64)], cls[np.asarray(nb, np.int64)]
        keep = ca != cb
        ca, cb = ca[keep], cb[keep]
        adj_off, adj = _csr(np.concatenate([ca, cb]), np.concatenate([cb, ca]), k)
        per_rule.append(
            (cls.tolist(), mem_off.tolist(), mem.tolist(), adj_off.tolist(), adj.tolist(), [False] * k)
        )
    lead = leader.tolist()
    by = linked_by.tolist()
    for v in np.asarray(order, dtype=np.int64).tolist():
        if lead[v] >= 0:
            continue
        lead[v] = v
        for r, (cls, mem_off, mem, adj_off, adj, taken) in enumerate(per_rule):
            c = cls[v]
            for t in [c, *adj[adj_off[c] : adj_off[c + 1]]]:
                if taken[t]:
                    continue
                taken[t] = True
                for m in mem[mem_off[t] : mem_off[t + 1]]:
                    if lead[m] < 0:
                        lead[m] = v
                        by[m] = r
    return np.asarray(lead, dtype=np.int64), np.asarray(by, dtype=np.int64)
