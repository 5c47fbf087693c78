"""neardup's small pure parts against plain Python: leader clustering, equal keys, components.

Oracles: a union-find and a straightforward walk written here (rows, not classes), hand-made
graphs with the expected leaders written out, and a pairwise loop for equal keys. Small inputs, no
Ray: these run in well under a second, so the mutation run can afford them.
"""

from __future__ import annotations

import numpy as np
import pytest

from curate import neardup as nd


def _arr(x) -> np.ndarray:
    return np.asarray(x, dtype=np.int64)


def reference_leaders(n, order, rules):
    """Row-level definition: a leader takes every free row identical to it (same class under the
    rule's same edges, transitively) or near-linked to any row of its class, class by class."""
    lead, by = [-1] * n, [-1] * n
    classes = []
    for sa, sb, na, nb in rules:
        parent = list(range(n))

        def find(x, parent=parent):
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        for a, b in zip(sa, sb, strict=True):
            parent[find(a)] = find(b)
        cls = [find(x) for x in range(n)]
        near = {(cls[a], cls[b]) for a, b in zip(na, nb, strict=True)} | {
            (cls[b], cls[a]) for a, b in zip(na, nb, strict=True)
        }
        classes.append((cls, near))
    taken = [set() for _ in rules]
    for v in order:
        if lead[v] >= 0:
            continue
        lead[v] = v
        for r, (cls, near) in enumerate(classes):
            reach = {cls[v]} | {b for a, b in near if a == cls[v]}
            for c in reach - taken[r]:
                taken[r].add(c)
                for m in range(n):
                    if cls[m] == c and lead[m] < 0:
                        lead[m], by[m] = v, r
    return lead, by


def test_a_chain_is_not_followed():
    # 0 - 1 - 2 near edges; 0 first: takes 1, not 2
    lead, by = nd.leader_clusters(3, _arr([0, 1, 2]), [([], [], [0, 1], [1, 2])])
    assert lead.tolist() == [0, 0, 2] and by.tolist() == [-1, 0, -1]
    # the middle first takes both ends
    lead, by = nd.leader_clusters(3, _arr([1, 0, 2]), [([], [], [0, 1], [1, 2])])
    assert lead.tolist() == [1, 1, 1] and by.tolist() == [0, -1, 0]


def test_identical_rows_come_as_a_class_and_near_links_reach_the_whole_class():
    # 1 == 2 == 3 (same edges chained), 0 near 3: 0 takes the whole class; 4 near 1 only is free
    rules = [([1, 2], [2, 3], [0, 4], [3, 1])]
    lead, by = nd.leader_clusters(5, _arr([0, 4, 1, 2, 3]), rules)
    assert lead.tolist() == [0, 0, 0, 0, 4] and by.tolist() == [-1, 0, 0, 0, -1]


def test_rule_index_is_the_first_rule_that_links():
    rules = [([], [], [0], [1]), ([0], [2], [0], [1])]  # rule 0: 0~1 near; rule 1: 0==2, 0~1
    lead, by = nd.leader_clusters(3, _arr([0, 1, 2]), rules)
    assert lead.tolist() == [0, 0, 0] and by.tolist() == [-1, 0, 1]
    lead, by = nd.leader_clusters(3, _arr([2, 1, 0]), rules)
    # 2 leads; through rule 1 it is identical to 0 and near-linked to 1
    assert lead.tolist() == [2, 2, 2] and by.tolist() == [1, 1, -1]


def test_no_edges_every_row_leads():
    lead, by = nd.leader_clusters(4, _arr([3, 2, 1, 0]), [([], [], [], [])])
    assert lead.tolist() == [0, 1, 2, 3] and by.tolist() == [-1] * 4
    lead, by = nd.leader_clusters(0, _arr([]), [([], [], [], [])])
    assert lead.tolist() == [] and by.tolist() == []


@pytest.mark.parametrize("seed", range(12))
def test_random_graphs_match_the_reference(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 40))
    rules = []
    for _ in range(int(rng.integers(1, 4))):
        ms, mn = int(rng.integers(0, n)), int(rng.integers(0, 2 * n))
        sa, sb = rng.integers(0, n, ms), rng.integers(0, n, ms)
        na, nb = rng.integers(0, n, mn), rng.integers(0, n, mn)
        rules.append((sa.tolist(), sb.tolist(), na.tolist(), nb.tolist()))
    order = rng.permutation(n).tolist()
    lead, by = nd.leader_clusters(n, _arr(order), [tuple(_arr(x) for x in r) for r in rules])
    want_lead, want_by = reference_leaders(n, order, rules)
    assert lead.tolist() == want_lead
    assert by.tolist() == want_by


@pytest.mark.parametrize("seed", range(6))
def test_equal_key_pairs_link_each_row_to_its_groups_smallest_id(seed):
    rng = np.random.default_rng(seed)
    n = 30
    ids = rng.permutation(1000)[:n]
    keys = rng.integers(0, 4, (n, 2)).astype(np.uint64)
    valid = rng.random(n) < 0.8
    a, b = nd.equal_key_pairs(ids, keys, valid)
    want = set()
    for i in range(n):
        if not valid[i]:
            continue
        group = [ids[j] for j in range(n) if valid[j] and tuple(keys[j]) == tuple(keys[i])]
        if ids[i] != min(group):
            want.add((int(min(group)), int(ids[i])))
    assert set(zip(a.tolist(), b.tolist(), strict=True)) == want and len(a) == len(want)
    a1, b1 = nd.equal_key_pairs(ids, keys[:, 0])  # one key column, no validity
    want1 = {(int(min(ids[keys[:, 0] == keys[i, 0]])), int(ids[i])) for i in range(n)} - {
        (int(x), int(x)) for x in ids
    }
    assert set(zip(a1.tolist(), b1.tolist(), strict=True)) == want1
    assert [len(x) for x in nd.equal_key_pairs(ids[:1], keys[:1])] == [0, 0]


def test_components_are_labelled_by_their_smallest_id():
    nodes, labels = nd.components(_arr([10, 7, 3, 50]), _arr([7, 2, 9, 51]))
    assert nodes.tolist() == [2, 3, 7, 9, 10, 50, 51]
    assert labels.tolist() == [2, 3, 2, 3, 2, 50, 50]
    nodes, labels = nd.components(_arr([]), _arr([]))
    assert nodes.tolist() == [] and labels.tolist() == []


@pytest.mark.parametrize(("radius", "blocks"), [(0, None), (1, None), (3, 4), (3, 6), (5, None)])
def test_sort_path_equals_brute_force_on_small_inputs(radius, blocks):
    rng = np.random.default_rng(radius * 10 + (blocks or 0))
    base = rng.integers(0, 2**63, 60, dtype=np.uint64)
    near = base[:30].copy()
    for i in range(30):
        for bit in rng.choice(64, int(rng.integers(0, radius + 2)), replace=False):
            near[i] ^= np.uint64(1) << np.uint64(int(bit))
    h = np.concatenate([base, near, base[:4]])
    want = {(i, j) for i in range(len(h)) for j in range(i + 1, len(h))
            if bin(int(h[i]) ^ int(h[j])).count("1") <= radius}
    a, b = nd.near_pairs_sort(h, radius, blocks)
    got = set(zip(a.tolist(), b.tolist(), strict=True))
    # identical hashes are linked to their first row only: same components, fewer pairs
    assert got <= want
    nodes_w, labels_w = nd.components(_arr([p[0] for p in want]), _arr([p[1] for p in want]))
    nodes_g, labels_g = nd.components(a, b)
    assert dict(zip(nodes_g.tolist(), labels_g.tolist(), strict=True)) == dict(
        zip(nodes_w.tolist(), labels_w.tolist(), strict=True)
    )


def test_equal_key_pairs_at_two_rows_and_the_id_type():
    # the smallest input with a pair: two rows, one key
    a, b = nd.equal_key_pairs(np.array([9, 4], dtype=np.int32), np.array([7, 7], dtype=np.uint64))
    assert a.tolist() == [4] and b.tolist() == [9]
    assert a.dtype == b.dtype == np.int64  # row ids come back as int64 whatever they came in as
    for ids in ([], [3]):  # nothing to pair
        for valid in (None, np.ones(len(ids), bool)):
            a, b = nd.equal_key_pairs(np.array(ids, dtype=np.int32), np.zeros(len(ids), np.uint64), valid)
            assert a.tolist() == b.tolist() == [] and a.dtype == b.dtype == np.int64


def test_components_of_plain_lists_are_int64_ids():
    nodes, labels = nd.components([], [])
    assert nodes.dtype == labels.dtype == np.int64


@pytest.mark.parametrize(("blocks", "widths"), [
    (1, [64]), (2, [32, 32]), (5, [13, 13, 13, 13, 12]), (7, [10, 9, 9, 9, 9, 9, 9]), (16, [4] * 16)])
def test_block_layout_covers_the_64_bits_in_near_equal_blocks(blocks, widths):
    shifts = [sum(widths[:i]) for i in range(blocks)]
    assert nd.block_layout(blocks) == list(zip(shifts, widths, strict=True))


def test_sort_order_is_key_order_ties_by_position_packed_or_not():
    rng = np.random.default_rng(3)
    for keybits, n in ((60, 300), (20, 300), (58, 64), (59, 64)):  # 58 + 6 bits fit exactly; 59 + 6 do not
        keys = rng.integers(0, 4, n).astype(np.uint64) << np.uint64(keybits - 2)  # few keys: many ties
        keys |= rng.integers(0, 2, n).astype(np.uint64)
        want = sorted(range(n), key=lambda i: (int(keys[i]), i))
        assert nd._sort_order(keys, keybits).tolist() == want


def test_near_pairs_sort_small_cases_written_out():
    # two distinct hashes are enough for a pair
    assert _pairs2(nd.near_pairs_sort(np.array([0b1010, 0b1011], dtype=np.uint64), 1)) == {(0, 1)}
    # a plain list of ints is read as uint64 hashes
    assert _pairs2(nd.near_pairs_sort([1, 3, 7, 1 << 40], 1)) == {(0, 1), (1, 2)}
    # radius 0: only identical rows; rows with one hash but other groups (colours) are not linked
    h = np.array([5, 5, 5, 9], dtype=np.uint64)
    assert _pairs2(nd.near_pairs_sort(h, 0)) == {(0, 1), (0, 2)}
    for groups in (np.array([1, 2, 1, 3], np.uint64), np.array([[1], [2], [1], [3]], np.uint64)):
        assert _pairs2(nd.near_pairs_sort(h, 0, groups=groups)) == {(0, 2)}
        # radius 1: the other colour is a near pair of its class's first row
        assert _pairs2(nd.near_pairs_sort(h, 1, groups=groups)) == {(0, 2), (0, 1)}
    # a block count the pigeonhole cannot use is refused, not replaced
    with pytest.raises(ValueError, match="radius < blocks"):
        nd.near_pairs_sort(np.array([1, 2, 3], dtype=np.uint64), 4, blocks=4)


def _pairs2(p) -> set[tuple[int, int]]:
    return set(zip(p[0].tolist(), p[1].tolist(), strict=True))


def test_leader_arrays_are_int64_even_when_empty_or_without_edges():
    """The result feeds Arrow int64 columns: it is int64 whatever the input holds, including no rows at
    all (an empty list would otherwise come back as float64) and rules given as empty Python lists."""
    lead, by = nd.leader_clusters(0, [], [([], [], [], [])])
    assert lead.dtype == np.int64 and by.dtype == np.int64 and lead.size == by.size == 0
    lead, by = nd.leader_clusters(3, [2, 0, 1], [([], [], [], [])])
    assert lead.dtype == np.int64 and by.dtype == np.int64
    assert lead.tolist() == [0, 1, 2] and by.tolist() == [-1, -1, -1]
