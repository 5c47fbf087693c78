"""All near-duplicate pairs among 10M 64-bit hashes: multi-index hashing vs brute force.

    .venv/bin/python bench/near_dup.py [N] [RADIUS] [SUBSET]     # defaults 10,000,000, dedup's radius, 100,000

N uniformly random 64-bit hashes plus 10,000 planted near-duplicates (a copy of a random hash with
1..RADIUS bits flipped). Ours: ``curate.neardup.near_pairs_sort`` (the dedup stage's single-node
engine) over all N + 10,000: seconds, peak memory, recall of the planted pairs (must be 100%).
Brute force (faiss ``IndexBinaryFlat`` exhaustive range search, one thread) is infeasible at N, so
it runs on a random SUBSET in the same process, where ours runs too (same pairs checked); its time at
N is extrapolated as t_subset * (N / SUBSET)^2 (all-pairs work is quadratic) and printed as an
extrapolation. The faiss binary-hash path and the partitioned (distributed) kernel are checked
against a numpy all-pairs reference on 10,000 hashes. Times are process CPU seconds (the machine is
shared; wall is printed too). Last line: ``ratio: X.XX`` = extrapolated brute force CPU seconds /
our CPU seconds at N.
"""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from curate import neardup  # noqa: E402
from curate.stages.dedup import DedupConfig  # noqa: E402

PLANTED = 10_000


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _pairset(a: np.ndarray, b: np.ndarray, n: int) -> np.ndarray:
    return np.unique(a.astype(np.uint64) * np.uint64(n) + b.astype(np.uint64))


def make(n: int, radius: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    h = rng.integers(0, 2**64 - 1, n, dtype=np.uint64, endpoint=True)
    src = rng.choice(n, PLANTED, replace=False)
    near = h[src].copy()
    flips = rng.integers(1, radius + 1, PLANTED)
    for i in range(PLANTED):
        for bit in rng.choice(64, flips[i], replace=False):
            near[i] ^= np.uint64(1) << np.uint64(int(bit))
    return np.concatenate([h, near]), src.astype(np.int64), n + np.arange(PLANTED, dtype=np.int64)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    n = int(argv[0]) if argv else 10_000_000
    radius = int(argv[1]) if len(argv) > 1 else DedupConfig().radius
    subset = int(argv[2]) if len(argv) > 2 else 100_000
    hashes, pa_, pb_ = make(n, radius)
    total = len(hashes)
    blocks = neardup.choose_blocks(total, radius)
    print(
        f"{n:,} random 64-bit hashes + {PLANTED:,} planted near-duplicates, radius {radius}: "
        f"{blocks} blocks, {len(neardup.tables(blocks, radius))} tables of "
        f"{min(neardup.Scheme(radius, blocks).keybits)}-{max(neardup.Scheme(radius, blocks).keybits)}-bit keys"
    )
    base_rss = _rss_mb()
    t = time.perf_counter()
    c = time.process_time()
    a, b = neardup.near_pairs_sort(hashes, radius)
    secs, cpu = time.perf_counter() - t, time.process_time() - c
    peak = _rss_mb()
    found = _pairset(a, b, total)
    planted = _pairset(np.minimum(pa_, pb_), np.maximum(pa_, pb_), total)
    recall = np.isin(planted, found).mean()
    d = np.bitwise_count(hashes[a] ^ hashes[b])
    print(
        f"ours (sort engine) at {total:,}: {secs:.1f} s wall, {cpu:.1f} s CPU, peak RSS {peak:.0f} MB "
        f"(hashes + inputs {base_rss:.0f} MB before the search); {len(a):,} pairs, all within radius: "
        f"{bool((d <= radius).all())}; recall of planted pairs {recall:.2%}"
    )
    if recall < 1.0:
        print("ERROR: a planted pair was missed")

    # Brute force on a subset (with planted pairs in it): faiss IndexBinaryFlat's exhaustive range
    # search (optimised popcount scan, 1 thread: per core, like ours), ours on the same subset.
    import faiss

    faiss.omp_set_num_threads(1)
    rng = np.random.default_rng(1)
    keep_pairs = rng.choice(PLANTED, min(PLANTED, subset // 20), replace=False)
    rest = rng.choice(n, subset - 2 * len(keep_pairs), replace=False)
    idx = np.unique(np.concatenate([rest, pa_[keep_pairs], pb_[keep_pairs]]))
    sub = hashes[idx]
    flat = faiss.IndexBinaryFlat(64)
    flat.add(sub.view(np.uint8).reshape(-1, 8))
    t, c = time.perf_counter(), time.process_time()
    lims, _, labels = flat.range_search(sub.view(np.uint8).reshape(-1, 8), radius + 1)  # faiss: < radius
    t_bf, c_bf = time.perf_counter() - t, time.process_time() - c
    q = np.repeat(np.arange(len(sub)), np.diff(lims.astype(np.int64)))
    keep = labels > q
    bf = (q[keep], labels[keep].astype(np.int64))
    t, c = time.perf_counter(), time.process_time()
    ours = neardup.near_pairs_sort(sub, radius)
    t_ours_sub, c_ours_sub = time.perf_counter() - t, time.process_time() - c
    same = np.array_equal(_pairset(*bf, len(sub)), _pairset(*ours, len(sub)))
    print(
        f"subset of {len(sub):,}: brute force (faiss IndexBinaryFlat) {c_bf:.2f} s CPU ({t_bf:.2f} s wall), "
        f"ours {c_ours_sub:.3f} s CPU ({t_ours_sub:.3f} s wall); identical pairs: {same} ({len(bf[0])} pairs)"
    )
    # and the other paths on a small subset against a plain numpy all-pairs reference
    small = sub[:10_000]
    ref = _pairset(*neardup.near_pairs_bruteforce(small, radius), len(small))
    t = time.perf_counter()
    fa = neardup.near_pairs_faiss(small, radius)
    t_fa = time.perf_counter() - t
    scheme = neardup.Scheme.for_size(len(small), radius)
    parts = neardup.partition_rows(scheme, np.arange(len(small)), small, 4)
    dist = [neardup.pairs_in_partition(scheme, [p]) for p in parts]
    dist_pairs = _pairset(
        np.concatenate([x[0] for x in dist]), np.concatenate([x[1] for x in dist]), len(small)
    )
    print(
        f"10,000-hash check vs numpy all-pairs: sort {np.array_equal(ref, _pairset(*neardup.near_pairs_sort(small, radius), len(small)))}, "
        f"faiss binary hash {np.array_equal(ref, _pairset(*fa, len(small)))} ({t_fa:.2f} s), "
        f"partitioned (distributed kernel) {np.array_equal(ref, dist_pairs)}"
    )
    scale = (total / len(sub)) ** 2
    c_bf_full = c_bf * scale
    print(
        f"brute force at {total:,} (EXTRAPOLATED, quadratic from the subset): {c_bf_full:,.0f} s CPU "
        f"= {c_bf_full / 3600:,.1f} core-hours; ours measured: {cpu:.1f} s CPU ({secs:.1f} s wall)"
    )
    print(f"ratio: {c_bf_full / cpu:.2f}")
    return 0 if recall == 1.0 and same else 1


if __name__ == "__main__":
    raise SystemExit(main())
