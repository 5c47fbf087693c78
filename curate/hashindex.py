"""A small in-memory index of 64-bit perceptual hashes, queried by a streamed corpus.

Blocklists of known-bad images (``safety``) and evaluation sets (``decontaminate``) are small next to
the corpus: thousands to millions of hashes against billions of rows. So the reference side is held
in memory and each shard of the corpus is looked up against it, with the same multi-index hashing as
dedup (``curate.neardup.Scheme``: a pair within radius r agrees exactly on the blocks of at least one
table key), but asymmetric: per table, the reference keys are sorted once and every corpus hash
finds its candidates by binary search. Candidates are verified by their full Hamming distance, so
the answer is exact: the nearest reference hash within the radius, or none.
"""

from __future__ import annotations

import numpy as np

from curate.neardup import Scheme, popcount


class HashIndex:
    def __init__(self, hashes: np.ndarray, radius: int):
        self.hashes = np.ascontiguousarray(hashes, dtype=np.uint64)
        self.radius = int(radius)
        self.scheme: Scheme | None = None
        self._tables: list[tuple[np.ndarray, np.ndarray]] = []
        if self.radius > 0 and len(self.hashes):
            self.scheme = Scheme.for_size(max(len(self.hashes), 2), self.radius)
            for t in range(len(self.scheme.tables)):
                keys = self.scheme.key(self.hashes, t)
                order = np.argsort(keys, kind="stable")
                self._tables.append((keys[order], order))
        else:
            order = np.argsort(self.hashes, kind="stable")
            self._tables.append((self.hashes[order], order))

    def __len__(self) -> int:
        return len(self.hashes)

    def query(self, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For each query hash: (index of the nearest reference hash within the radius or -1, its
        Hamming distance or -1). Ties go to the lowest reference index, so the answer is deterministic."""
        q = np.ascontiguousarray(hashes, dtype=np.uint64)
        best = np.full(len(q), -1, dtype=np.int64)
        dist = np.full(len(q), 65, dtype=np.int64)
        if not len(q) or not len(self.hashes):
            return best, np.where(best >= 0, dist, -1)
        for t, (keys, order) in enumerate(self._tables):
            qk = self.scheme.key(q, t) if self.scheme is not None else q
            lo = np.searchsorted(keys, qk, side="left")
            hi = np.searchsorted(keys, qk, side="right")
            counts = hi - lo
            if not counts.any():
                continue
            rows = np.repeat(np.arange(len(q)), counts)
            starts = np.repeat(lo - np.cumsum(counts) + counts, counts)
            refs = order[starts + np.arange(len(rows))]
            d = popcount(q[rows] ^ self.hashes[refs]).astype(np.int64)
            ok = d <= self.radius
            rows, refs, d = rows[ok], refs[ok], d[ok]
            # keep, per row, the smallest (distance, reference index)
            better = (d < dist[rows]) | ((d == dist[rows]) & ((best[rows] < 0) | (refs < best[rows])))
            # several candidates of one row in this table: apply in an order where the best lands last
            sel = np.flatnonzero(better)
            if sel.size:
                order_sel = np.lexsort((-refs[sel], -d[sel]))
                r, f, dd = rows[sel][order_sel], refs[sel][order_sel], d[sel][order_sel]
                best[r] = f
                dist[r] = dd
        return best, np.where(best >= 0, dist, -1)
