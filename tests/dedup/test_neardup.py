"""Multi-index hashing: every path finds exactly the brute-force pairs / components."""

from __future__ import annotations

import numpy as np
import pytest

from curate import neardup as nd


def _hashes(n: int, planted: int, radius: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    h = rng.integers(0, 2**64 - 1, n, dtype=np.uint64, endpoint=True)
    src = rng.choice(n, planted, replace=False)
    near = h[src].copy()
    for i in range(planted):
        for bit in rng.choice(64, rng.integers(0, radius + 2), replace=False):  # some just outside
            near[i] ^= np.uint64(1) << np.uint64(int(bit))
    return np.concatenate([h, near, h[:3], h[:1]])  # plus exact repeats


def _pairs(p) -> set[tuple[int, int]]:
    return set(zip(p[0].tolist(), p[1].tolist(), strict=True))


def _comps(p) -> dict[int, int]:
    nodes, labels = nd.components(*p)
    return dict(zip(nodes.tolist(), labels.tolist(), strict=True))


@pytest.mark.parametrize("radius,blocks", [(1, None), (4, None), (4, 5), (4, 8), (6, None), (6, 7), (8, 11)])
def test_all_paths_equal_bruteforce(radius, blocks):
    h = _hashes(1500, 200, radius, seed=radius)
    ref = nd.near_pairs_bruteforce(h, radius)
    srt = nd.near_pairs_sort(h, radius, blocks)
    fai = nd.near_pairs_faiss(h, radius, blocks)
    scheme = nd.Scheme.for_size(len(h), radius, blocks)
    # distributed: rows arrive in two "shards", are partitioned, each partition processed alone
    ids = np.arange(len(h))
    pieces = [nd.partition_rows(scheme, ids[s], h[s], 4) for s in (slice(0, 700), slice(700, None))]
    dist = [nd.pairs_in_partition(scheme, [pieces[0][q], pieces[1][q]]) for q in range(4)]
    dis = (np.concatenate([d[0] for d in dist]), np.concatenate([d[1] for d in dist]))
    # identical hashes are linked as a star, so pair sets match once those are excluded...
    distinct = {(a, b) for a, b in _pairs(ref) if h[a] != h[b]}
    for got in (srt, fai, dis):
        assert {(a, b) for a, b in _pairs(got) if h[a] != h[b]} == distinct
        assert len(_pairs(got)) == len(got[0])  # no pair reported twice
    # ...and the clusters are identical
    assert _comps(ref) == _comps(srt) == _comps(fai) == _comps(dis)
    assert len(distinct) >= 50


def test_pigeonhole_worst_case_bits_spread_over_blocks():
    # Differences placed one per block (the case a band scheme must not miss).
    for radius in (3, 6):
        scheme = nd.Scheme.for_size(10, radius)
        base = np.uint64(0x0123456789ABCDEF)
        other = base
        for shift, _ in scheme.layout[:radius]:
            other ^= np.uint64(1) << np.uint64(shift)
        h = np.array([base, other, ~base], dtype=np.uint64)
        assert _pairs(nd.near_pairs_sort(h, radius)) == {(0, 1)}
        assert _pairs(nd.near_pairs_faiss(h, radius)) == {(0, 1)}


def test_empty_and_tiny_inputs():
    e = np.empty(0, dtype=np.uint64)
    for f in (nd.near_pairs_sort, nd.near_pairs_faiss, nd.near_pairs_bruteforce):
        assert len(f(e, 4)[0]) == 0
        assert len(f(np.array([5], dtype=np.uint64), 4)[0]) == 0
    nodes, labels = nd.components(np.empty(0, np.int64), np.empty(0, np.int64))
    assert len(nodes) == 0


def test_equal_key_pairs_and_components():
    ids = np.array([10, 11, 12, 13, 14, 15])
    keys = np.array([[1, 2], [3, 4], [1, 2], [1, 3], [3, 4], [1, 2]], dtype=np.uint64)
    a, b = nd.equal_key_pairs(ids, keys)
    assert _pairs((a, b)) == {(10, 12), (10, 15), (11, 14)}
    valid = np.array([True, True, False, True, True, True])
    assert _pairs(nd.equal_key_pairs(ids, keys, valid)) == {(10, 15), (11, 14)}
    nodes, labels = nd.components(np.array([5, 7, 9]), np.array([7, 8, 20]))
    assert dict(zip(nodes.tolist(), labels.tolist(), strict=True)) == {5: 5, 7: 5, 8: 5, 9: 9, 20: 9}


def test_choose_blocks_grows_with_n():
    assert nd.choose_blocks(1000, 4) <= nd.choose_blocks(10_000_000, 4)
    assert nd.choose_blocks(10_000_000, 6) > 7  # r + 1 bands would be far too short there
    with pytest.raises(ValueError):
        nd.choose_blocks(10, 40)


def _grouped(n: int, radius: int, seed: int):
    """Hashes with near pairs, exact repeats, and repeats that differ in their identity (colour)."""
    h = _hashes(n, n // 6, radius, seed)
    rng = np.random.default_rng(seed + 100)
    colour = rng.integers(0, 3, len(h)).astype(np.uint64)  # few values: many same-hash, same-colour rows
    return h, np.column_stack([h, colour])


@pytest.mark.parametrize("radius,blocks,max_rows,tasks", [
    (4, None, 10**9, 1), (6, None, 10**9, 3), (6, 8, 700, 1), (3, None, 400, 2), (8, 11, 10**9, 5)])
def test_unit_engine_gives_exactly_the_sort_engines_pairs(radius, blocks, max_rows, tasks):
    h, groups = _grouped(1500, radius, seed=radius + tasks)
    for g in (None, groups):
        want = _pairs(nd.near_pairs_sort(h, radius, blocks, g))
        got_p = nd.near_pairs_units(h, radius, g, blocks, max_rows=max_rows, tasks=tasks, shards=3)
        got = _pairs(got_p)
        assert got == want
        assert len(got) == len(got_p[0])  # none twice
    # planted near pairs are really there (not two empty sets agreeing)
    assert len({(a, b) for a, b in want if h[a] != h[b]}) >= 50


def test_hash_units_split_tables_then_blocks():
    units = nd.hash_units(10, rows=1000, max_rows=5000, tasks=4)
    assert sorted(t for u in units for t in u[0]) == list(range(10)) and len(units) == 4
    assert all(u[1:] == (0, 1) for u in units)
    units = nd.hash_units(3, rows=10_000, max_rows=4000, tasks=4)
    assert units == [((t,), b, 3) for t in range(3) for b in range(3)]
    scheme = nd.Scheme(4, 6)
    h = _hashes(3000, 0, 4)
    parts = [nd.in_block(scheme, h, 2, b, 3) for b in range(3)]
    assert (sum(p.astype(int) for p in parts) == 1).all()  # every row in exactly one block


def test_resolve_with_nothing_to_resolve():
    e64, eu = np.empty(0, np.int64), np.empty(0, np.uint64)
    for groups in (None, np.empty((0, 3), np.uint64)):
        a, b = nd.resolve_hash_pairs(eu, eu, e64, eu, groups)
        assert len(a) == len(b) == 0
