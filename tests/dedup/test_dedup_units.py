"""dedup's decision helpers called directly: crop entries and their row pairs, exact keys, the
identity columns, MinHash bands, pairs within exact-key groups, and the texts a user reads.

Expected values are written out by hand or computed by brute force in plain Python.
"""

from __future__ import annotations

import itertools

import numpy as np
import pyarrow as pa
import pytest

from curate import phash, schema
from curate.stages import dedup as d
from curate.stages.dedup import DedupConfig

CROPS = DedupConfig()  # radius 6, crop_radius 3, rules exact + near: crop matching on
NO_CROPS = DedupConfig(crop_radius=0)
N = phash.CROP_COUNT


# -- captions ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "want"), [
    (None, ""),
    ("", ""),
    ("A  Cat!", "a cat"),
    ("  --Hello, World--  ", "hello world"),
    ("snake_case_words", "snake case words"),
    ("Straße", "strasse"),  # casefold, not lower
    ("ＦＵＬＬ ｗｉｄｔｈ", "full width"),  # NFKC
    ("tab\tand\nnewline", "tab and newline"),
    ("déjà vu", "déjà vu"),  # letters with accents are word characters
])
def test_normalize_caption(text, want):
    assert d.normalize_caption(text) == want


# -- crop entries ----------------------------------------------------------------------------------
def _crop_table(crops: list[list[int] | None]) -> pa.Table:
    return pa.table({schema.PHASH_CROPS: pa.array(
        [None if c is None else phash.crops_to_bytes(c) for c in crops], schema.TYPES[schema.PHASH_CROPS])})


H = np.array([0x11, 0x22, 0x33], dtype=np.uint64)
C0 = [0x100 + k for k in range(N)]
C2 = [0x300 + k for k in range(N)]


def test_entries_add_each_rows_crops_after_the_full_images():
    keys = _crop_table([C0, None, C2])
    gids = np.array([10, 11, 12], dtype=np.int64)
    ids, hv, g, k = d._entries(CROPS, keys, gids, H, None, np.array([True, True, True]), None)
    crop_ids = [(10 << 3) + j for j in range(1, N + 1)] + [(12 << 3) + j for j in range(1, N + 1)]
    assert ids.tolist() == [10 << 3, 11 << 3, 12 << 3, *crop_ids]
    assert hv.tolist() == [0x11, 0x22, 0x33, *C0, *C2]
    # group words: a full image is its own hash with a zero word; a crop carries its row's hash
    # and its own entry id, so no crop is ever "identical" to a full image or to another crop
    assert g.tolist() == [[0x11, 0], [0x22, 0], [0x33, 0]] + [[0x11, i] for i in crop_ids[:N]] + \
        [[0x33, i] for i in crop_ids[N:]]
    assert k is None and g.dtype == hv.dtype == np.uint64  # words of 64 bits: no float in between


def test_entries_of_the_valid_rows_only():
    keys = _crop_table([C0, None, C2])
    gids = np.array([10, 11, 12], dtype=np.int64)
    groups = np.array([[1, 2], [3, 4], [5, 6]], dtype=np.uint64)
    key = np.array([[7, 8], [9, 9], [5, 5]], dtype=np.uint64)
    # row 0 invalid: the entries are row 1 (no crops) and row 2 (crops)
    ids, hv, g, k = d._entries(CROPS, keys, gids, H, groups, np.array([False, True, True]), key)
    crop_ids = [(12 << 3) + j for j in range(1, N + 1)]
    assert ids.tolist() == [11 << 3, 12 << 3, *crop_ids]
    assert hv.tolist() == [0x22, 0x33, *C2]
    assert g.tolist() == [[3, 4, 0], [5, 6, 0]] + [[5, 6, i] for i in crop_ids]
    assert g.dtype == np.uint64
    assert k.tolist() == [[9, 9], [5, 5]] + [[5, 5]] * N


def test_entries_with_one_word_groups():
    keys = _crop_table([None, C2])
    ids, hv, g, k = d._entries(CROPS, keys, np.array([0, 1]), H[:2], np.array([4, 5], dtype=np.uint64),
                               np.array([True, True]), None)
    assert ids.tolist() == [0, 8, *range(9, 9 + N)]
    assert g.tolist() == [[4, 0], [5, 0]] + [[5, i] for i in range(9, 9 + N)]


@pytest.mark.parametrize("cfg", [NO_CROPS, DedupConfig(rules=["exact"]), DedupConfig(radius=0, crop_radius=0)])
def test_entries_without_crop_matching_are_the_valid_rows(cfg):
    keys = _crop_table([C0, None, C2])
    groups = np.array([[1], [2], [3]], dtype=np.uint64)
    key = np.array([[7, 8], [9, 9], [5, 5]], dtype=np.uint64)
    ids, hv, g, k = d._entries(cfg, keys, np.array([10, 11, 12]), H, groups, np.array([True, False, True]), key)
    assert ids.tolist() == [10, 12] and hv.tolist() == [0x11, 0x33]
    assert g.tolist() == [[1], [3]] and k.tolist() == [[7, 8], [5, 5]]


def test_entries_without_a_crop_column_are_the_valid_rows():
    keys = pa.table({schema.UID: ["a", "b", "c"]})
    ids, hv, g, k = d._entries(CROPS, keys, np.array([10, 11, 12]), H, None, np.array([True, True, False]))
    assert ids.tolist() == [10, 11] and hv.tolist() == [0x11, 0x22] and g is None and k is None


def test_rows_of_keeps_pairs_with_a_full_image_between_two_rows():
    def e(row: int, entry: int) -> int:
        return (row << 3) + entry

    a = np.array([e(5, 0), e(5, 2), e(7, 1), e(9, 0), e(4, 0), e(6, 5)], dtype=np.int64)
    b = np.array([e(6, 1), e(6, 0), e(8, 3), e(9, 4), e(3, 0), e(2, 0)], dtype=np.int64)
    ra, rb = d._rows_of(CROPS, a, b)
    # kept: full-crop, crop-full, full-full, crop(5)-full; dropped: crop-crop, a row with itself
    assert ra.tolist() == [5, 5, 4, 6] and rb.tolist() == [6, 6, 3, 2]
    # without crop matching the ids are row ids already
    ra, rb = d._rows_of(NO_CROPS, a, b)
    assert ra.tolist() == a.tolist() and rb.tolist() == b.tolist()


# -- columns ---------------------------------------------------------------------------------------
def test_u64_colors_crops_read_nulls_as_zero_and_invalid():
    v, ok = d._u64(pa.chunked_array([pa.array([5, None, 7], pa.uint64())]))
    assert v.tolist() == [5, 0, 7] and ok.tolist() == [True, False, True]
    red, blue = bytes(range(48)), bytes(range(100, 148))
    col = pa.chunked_array([pa.array([red], pa.binary(48)), pa.array([None, blue], pa.binary(48))])
    c, ok = d._colors(col)
    assert c.shape == (3, 48) and c.dtype == np.uint8
    assert c.tolist() == [list(red), [0] * 48, list(blue)] and ok.tolist() == [True, False, True]
    cr, ok = d._crops(_crop_table([None, C0, C2]).column(0))
    assert cr.dtype == np.uint64 and cr.tolist() == [[0] * N, C0, C2] and ok.tolist() == [False, True, True]


def test_near_groups_add_the_colour_words_only_when_colour_confirms():
    sig = bytes(range(48))
    keys = pa.table({schema.COLOR_SIG: pa.array([sig, None], pa.binary(48))})
    h = np.array([3, 4], dtype=np.uint64)
    assert d._near_groups(DedupConfig(confirm="none"), keys, h) is None
    assert d._near_groups(DedupConfig(confirm="clip"), keys, h) is None
    g = d._near_groups(DedupConfig(), keys, h)
    words = np.frombuffer(sig, dtype=np.uint64).tolist()
    assert g.tolist() == [[3, *words], [4, 0, 0, 0, 0, 0, 0]]


def _key_table(sha, cap, ph=None, sig=None, perms=4) -> pa.Table:
    cols = {
        d._SHA_HI: pa.array([None if s is None else s[0] for s in sha], pa.uint64()),
        d._SHA_LO: pa.array([None if s is None else s[1] for s in sha], pa.uint64()),
        d._CAP_HI: pa.array([None if c is None else c[0] for c in cap], pa.uint64()),
        d._CAP_LO: pa.array([None if c is None else c[1] for c in cap], pa.uint64()),
    }
    if ph is not None:
        cols[schema.PHASH] = pa.array(ph, pa.uint64())
        cols[schema.COLOR_SIG] = pa.array([bytes([i]) * 48 for i in range(len(ph))], pa.binary(48))
    if sig is not None:
        cols[d._SIG] = pa.array(sig, pa.list_(pa.uint64(), perms))
    return pa.table(cols)


def test_rule_key_needs_every_exact_kind_and_is_equal_only_when_all_agree():
    sha = [(1, 2), (1, 2), (1, 2), None, (1, 3)]
    cap = [(5, 6), (5, 6), (5, 7), (5, 6), None]
    keys = _key_table(sha, cap)
    key, ok = d._rule_key(keys, ["near"])
    assert key is None and ok.tolist() == [True] * 5
    key, ok = d._rule_key(keys, ["exact"])
    assert ok.tolist() == [True, True, True, False, True]
    assert key.shape == (5, 2) and key.dtype == np.uint64
    same = [[bool((key[i] == key[j]).all()) for j in range(5)] for i in range(5)]
    assert same[0][1] and same[0][2] and not same[0][4]
    key, ok = d._rule_key(keys, ["caption"])
    assert ok.tolist() == [True, True, True, True, False]
    assert (key[0] == key[3]).all() and not (key[0] == key[2]).all()
    key, ok = d._rule_key(keys, ["exact", "caption", "near"])
    assert ok.tolist() == [True, True, True, False, False]
    assert (key[0] == key[1]).all() and not (key[0] == key[2]).all()
    # the key of (exact + caption) is not the key of exact alone
    assert not (key[0] == d._rule_key(keys, ["exact"])[0][0]).all()


def test_identity_is_every_column_the_rule_compares():
    sha = [(1, 2), (3, 4)]
    cap = [(5, 6), (7, 8)]
    sig = [[11, 12, 13, 14], [21, 22, 23, 24]]
    keys = _key_table(sha, cap, ph=[100, 200], sig=sig)
    got = d._identity(keys, ["exact", "near"], color=True)
    c0 = np.frombuffer(bytes([0]) * 48, np.uint64).tolist()
    c1 = np.frombuffer(bytes([1]) * 48, np.uint64).tolist()
    assert got.tolist() == [[1, 2, 100, *c0], [3, 4, 200, *c1]]
    assert d._identity(keys, ["exact", "near"], color=False).tolist() == [[1, 2, 100], [3, 4, 200]]
    assert d._identity(keys, ["caption"], color=True).tolist() == [[5, 6], [7, 8]]
    assert d._identity(keys, ["caption", "caption_near"], color=True).tolist() == [[5, 6, *sig[0]], [7, 8, *sig[1]]]
    assert d._identity(keys, ["near", "caption"], color=False).tolist() == [[5, 6, 100], [7, 8, 200]]


def test_sigs_skip_null_signatures_and_invalid_rows():
    sig = [[1, 2, 3, 4], None, [5, 6, 7, 8], [9, 9, 9, 9]]
    keys = _key_table([None] * 4, [None] * 4, sig=sig)
    s, ok = d._sigs(keys, np.array([True, True, True, False]), 4)
    assert ok.tolist() == [True, False, True, False]
    assert s.dtype == np.uint64 and s.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]


# -- pair searches -------------------------------------------------------------------------------
def _pairs(a, b) -> set[tuple[int, int]]:
    return {(min(x, y), max(x, y)) for x, y in zip(a.tolist(), b.tolist(), strict=True)}


@pytest.mark.parametrize("seed", range(3))
def test_near_in_groups_is_brute_force_within_equal_keys(seed):
    rng = np.random.default_rng(seed)
    n = 60
    base = rng.integers(0, 2**63, 6, dtype=np.uint64)
    hashes = []
    for i in range(n):  # distinct hashes around a few bases, so many pairs are near
        h = int(base[i % 6])
        for bit in rng.choice(64, int(rng.integers(1, 9)), replace=False):
            h ^= 1 << int(bit)
        hashes.append(h)
    assert len(set(hashes)) == n
    key = rng.integers(0, 3, (n, 2)).astype(np.uint64)
    ids = rng.permutation(1000)[:n].astype(np.int64)
    radius = 5
    want = {(min(ids[i], ids[j]), max(ids[i], ids[j])) for i, j in itertools.combinations(range(n), 2)
            if (key[i] == key[j]).all() and bin(hashes[i] ^ hashes[j]).count("1") <= radius}
    assert want
    a, b = d._near_in_groups(ids, key, np.array(hashes, dtype=np.uint64), radius)
    assert len(a) == len(want) and _pairs(a, b) == want
    assert (a < b).all()  # within a group rows are in id order


def test_near_in_groups_links_identical_rows_and_splits_other_groups():
    ids = np.array([7, 3, 5, 9], dtype=np.int64)
    key = np.array([[1, 1], [1, 1], [1, 1], [1, 2]], dtype=np.uint64)
    h = np.array([8, 8, 8, 8], dtype=np.uint64)
    a, b = d._near_in_groups(ids, key, h, 0)
    assert _pairs(a, b) == {(3, 5), (3, 7)}  # a star on the smallest id; 9 has another key
    # groups (colours) say which rows are identical: 3 has other colours, so it is linked to the
    # others only as a near pair (none at radius 0, the star's centre at radius 1)
    g = np.array([[1], [2], [1], [1]], dtype=np.uint64)
    assert _pairs(*d._near_in_groups(ids, key, h, 0, g)) == {(5, 7)}
    assert _pairs(*d._near_in_groups(ids, key, h, 1, g)) == {(3, 5), (5, 7)}
    a, b = d._near_in_groups(ids[:1], key[:1], h[:1], 3)
    assert a.tolist() == [] and b.tolist() == [] and a.dtype == b.dtype == np.int64
    a, b = d._near_in_groups(ids[:2], key[:2], h[:2] ^ np.array([0, 7], np.uint64), 3)  # two rows: a pair
    assert a.tolist() == [3] and b.tolist() == [7]
    a, b = d._near_in_groups(ids[2:], key[2:], h[2:], 3)  # two rows, two keys: no group of 2
    assert a.dtype == np.int64 and a.tolist() == [] and b.tolist() == []


SIGS = np.array([[1, 2, 3, 4], [1, 2, 3, 9], [1, 2, 3, 4], [7, 8, 3, 4]], dtype=np.uint64)
IDS = np.array([100, 101, 102, 103], dtype=np.int64)


@pytest.mark.parametrize(("band", "threshold", "want"), [
    # band 0 (columns 0, 1): rows 0, 1 and 2 share the bucket; 0 and 1 agree on 3 of 4 values;
    # 2 is identical to 0 and is linked to it here only
    (0, 0.75, {(100, 101), (100, 102)}),
    (0, 0.76, {(100, 102)}),
    # band 1 (columns 2, 3): rows 0, 2 and 3 share it; 3 agrees with 0 on 2 of 4 values
    (1, 0.5, {(100, 103)}),
    (1, 0.51, set()),
])
def test_minhash_band_pairs(band, threshold, want):
    a, b = d._minhash_band_pairs(IDS, SIGS, None, band, 2, threshold)
    assert _pairs(a, b) == want and len(a) == len(want)


def test_minhash_band_pairs_need_the_exact_key_too():
    rk = np.array([[1, 1], [1, 1], [2, 2], [1, 1]], dtype=np.uint64)
    a, b = d._minhash_band_pairs(IDS, SIGS, rk, 0, 2, 0.75)
    assert _pairs(a, b) == {(100, 101)}  # 0 and 2: same signature, other exact key
    rk = np.array([[1, 1], [1, 1], [1, 1], [2, 2]], dtype=np.uint64)
    assert _pairs(*d._minhash_band_pairs(IDS, SIGS, rk, 1, 2, 0.5)) == set()
    assert _pairs(*d._minhash_band_pairs(IDS, SIGS, rk, 0, 2, 0.75)) == {(100, 101), (100, 102)}
    # the same exact key does not lift a pair over the Jaccard threshold
    same = np.ones((4, 2), dtype=np.uint64)
    assert _pairs(*d._minhash_band_pairs(IDS, SIGS, same, 1, 2, 0.5)) == {(100, 103)}
    assert _pairs(*d._minhash_band_pairs(IDS, SIGS, same, 1, 2, 0.51)) == set()
    a, b = d._minhash_band_pairs(IDS[:1], SIGS[:1], None, 0, 2, 0.5)
    assert a.tolist() == [] and b.tolist() == [] and a.dtype == b.dtype == np.int64
    a, b = d._minhash_band_pairs(IDS[:2], SIGS[:2], None, 0, 2, 0.75)  # two rows: a pair
    assert a.tolist() == [100] and b.tolist() == [101]


# -- texts -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("cfg", "want"), [
    (DedupConfig(), True),
    (DedupConfig(rules=["caption+near"]), True),
    (DedupConfig(confirm="clip"), True),
    (DedupConfig(confirm="none"), False),
    (DedupConfig(rules=["exact", "caption_near"]), False),
])
def test_confirms(cfg, want):
    assert d._confirms(cfg) is want


BASE = "each dropped member is within radius 6 of the kept one (distance: pHash bits)"


@pytest.mark.parametrize(("cfg", "want"), [
    (DedupConfig(), BASE + ", or a crop of one within 3 of the other (crop: true), confirmed by color "
     "(confirm: colour Delta-E)"),
    (DedupConfig(crop_radius=0, confirm="clip"), BASE + ", confirmed by clip (confirm: CLIP cosine)"),
    (DedupConfig(radius=4, crop_radius=2, confirm="none"),
     "each dropped member is within radius 4 of the kept one (distance: pHash bits), or a crop of one "
     "within 2 of the other (crop: true)"),
    (DedupConfig(rules=["exact"]), BASE),
])
def test_rule_text(cfg, want):
    assert d._rule_text(cfg) == want


def test_missing_confirmation_texts():
    both = d.missing_confirmation(DedupConfig(), [schema.UID, schema.PHASH])
    assert both == (
        "dedup: the input has no color_sig or phash_crops column (written before they existed), so near "
        "duplicates cannot be confirmed and cropped copies cannot be matched; rerun import/download, or "
        "add --set rehash=true to compute them from the image bytes, or --set confirm=none "
        "--set crop_radius=0")
    one = d.missing_confirmation(DedupConfig(crop_radius=0), [schema.PHASH])
    assert one == (
        "dedup: the input has no color_sig column (written before it existed), so near duplicates "
        "cannot be confirmed; rerun import/download, or add --set rehash=true to compute it from the "
        "image bytes, or --set confirm=none")
    clip = d.missing_confirmation(DedupConfig(confirm="clip", crop_radius=0), [schema.PHASH])
    assert clip == ("dedup: confirm=clip needs the image_embedding column; run `clip` with "
                    "--set embeddings=true first, or use --set confirm=color")
    assert d.missing_confirmation(DedupConfig(confirm="clip"), [schema.PHASH, schema.PHASH_CROPS,
                                                                 schema.IMAGE_EMBEDDING]) is None
    # colour is not needed when the rules have no near kind, nor crops
    assert d.missing_confirmation(DedupConfig(rules=["exact", "caption"]), [schema.PHASH]) is None


def test_radius_zero_with_every_image_undecodable(tmp_path):
    # the identical-rows path of a near rule gets no valid row at all (it once raised on zero rows)
    from test_dedup_stage import run_inline

    from curate.testing.datasets import IMAGE, write_image_dataset

    rows = [{schema.UID: f"{i:032x}", schema.CAPTION: "same", IMAGE: b"<html>no image</html>",
             schema.IMAGE_FORMAT: "jpg", schema.WIDTH: 10, schema.HEIGHT: 10} for i in range(3)]
    ds = write_image_dataset(str(tmp_path / "in"), [rows])
    got = run_inline(ds, tmp_path / "out", rules=["near"], radius=0, crop_radius=0)[0]
    assert got.column(schema.DROP_REASON).to_pylist() == ["dedup:undecodable"] * 3
    got = run_inline(ds, tmp_path / "keep", rules=["near"], radius=0, crop_radius=0, undecodable="keep")[0]
    assert got.column(schema.DROP_REASON).to_pylist() == [None] * 3


# -- explain -------------------------------------------------------------------------------------
def test_explain_whole_answer(tmp_path):
    from test_decisions import H_A, H_B, H_C, _row
    from test_dedup_stage import run_inline

    from curate.dataset import Dataset
    from curate.stages.dedup import DedupStage
    from curate.testing.datasets import write_image_dataset

    ds = write_image_dataset(str(tmp_path / "in"), [[_row(0, H_A, 300)], [_row(1, H_B, 200), _row(2, H_C, 100)]])
    stage = DedupStage(DedupConfig())
    out = Dataset(str(tmp_path / "out"))
    assert stage.explain(out, "0" * 32) is None  # no plan yet
    run_inline(ds, tmp_path / "out")
    a, b, c = (f"{i:032x}" for i in range(3))
    want = {
        "duplicate_cluster": 0,
        "rule": "each dropped member is within radius 6 of the kept one (distance: pHash bits), or a crop "
                "of one within 3 of the other (crop: true), confirmed by color (confirm: colour Delta-E)",
        "size": 2,
        "kept": a,
        "members": [
            {schema.UID: a, "kept": True, "kind": "", schema.DUP_OF: None, "distance": None, "confirm": None,
             schema.PHASH: f"{H_A:016x}", "pixels": 300 * 300, "crop": False, "hamming_to_this": 5},
            {schema.UID: b, "kept": False, "kind": "near", schema.DUP_OF: a, "distance": 5, "confirm": 0.0,
             schema.PHASH: f"{H_B:016x}", "pixels": 200 * 200, "crop": False, "hamming_to_this": 0},
        ],
    }
    assert stage.explain(out, b) == want
    got = stage.explain(out, a)
    assert [m["hamming_to_this"] for m in got["members"]] == [0, 5]
    assert stage.explain(out, c) == {"duplicate_cluster": None, "note": "no duplicate of this sample was found"}


def test_explain_exact_copies_without_a_hash(tmp_path):
    from test_dedup_stage import run_inline

    from curate.dataset import Dataset
    from curate.stages.dedup import DedupStage
    from curate.testing.datasets import IMAGE, write_image_dataset

    rows = [{schema.UID: f"{i:032x}", schema.CAPTION: "x", IMAGE: b"not an image", schema.IMAGE_FORMAT: "jpg",
             schema.WIDTH: 10, schema.HEIGHT: 10} for i in range(2)]
    ds = write_image_dataset(str(tmp_path / "in"), [rows])
    got = run_inline(ds, tmp_path / "out", rules=["exact"], undecodable="keep")[0]
    assert got.column(schema.DROP_REASON).to_pylist() == [None, "dedup:exact"]
    info = DedupStage(DedupConfig(rules=["exact"])).explain(Dataset(str(tmp_path / "out")), f"{1:032x}")
    assert info["kept"] == f"{0:032x}" and info["size"] == 2
    for m in info["members"]:
        assert m[schema.PHASH] is None and m["distance"] is None and "hamming_to_this" not in m


# -- every rule kind in one process ------------------------------------------------------------------
def _plan_keys(crops: bool = False) -> pa.Table:
    """Five plan rows: 1 is an exact copy of 0 (another caption); 2 has 0's caption and a pHash 3 bits
    away; 3 is unrelated; 4 has 3's caption, no sha256 and no pHash (undecodable)."""
    h0 = 0x0F0F_F0F0_1234_8765
    sha = [(1, 1), (1, 1), (2, 2), (3, 3), None]
    caps = ["a red bicycle", "copy", "a red bicycle", "green hills", "green hills"]
    cap = [d._key128(c.encode()) for c in caps]
    sig = [d.minhash(c, 8, 4) for c in caps]
    sig[4] = sig[3]
    t = _key_table(sha, cap, ph=[h0, h0, h0 ^ 0b111, ~h0 & (2**64 - 1), 0], sig=sig, perms=8)
    t = t.set_column(t.column_names.index(schema.PHASH), schema.PHASH,
                     pa.array([h0, h0, h0 ^ 0b111, ~h0 & (2**64 - 1), None], pa.uint64()))
    t = t.set_column(t.column_names.index(schema.COLOR_SIG), schema.COLOR_SIG,
                     pa.array([bytes(48)] * 5, pa.binary(48)))
    crop = [h0 ^ (1 << 60)] * N if crops else None  # row 3's crops: 1 bit from row 0's full image
    return t.append_column(schema.PHASH_CROPS, pa.array([None, None, None, None if crop is None else
                                                         phash.crops_to_bytes(crop), None], pa.binary(40)))


RULES = ["exact", "near", "caption", "exact+caption", "caption+near", "caption_near", "exact+near"]


@pytest.mark.parametrize("engine", ["sort", "faiss"])
def test_edges_of_every_rule_kind(engine):
    cfg = DedupConfig(rules=RULES, minhash_perms=8, minhash_bands=4)
    gids = np.arange(10, 15, dtype=np.int64)
    edges = d._edges_local(cfg, _plan_keys(), gids, engine)
    got = [_pairs(a, b) for a, b in edges]
    assert got == [{(10, 11)}, {(10, 11), (10, 12)}, {(10, 12), (13, 14)}, set(), {(10, 12)}, {(10, 12), (13, 14)},
                   {(10, 11)}]
    assert all(a.dtype == np.int64 for a, _ in edges)


def test_edges_radius_zero_confirmation_and_crops():
    gids = np.arange(5, dtype=np.int64)
    keys = _plan_keys()
    # radius 0: identical rows only (the pHash and, with colour confirmation, the colour)
    assert [_pairs(*e) for e in d._edges_local(DedupConfig(rules=["near"], radius=0, crop_radius=0), keys, gids,
                                               "sort")] == [{(0, 1)}]
    assert [_pairs(*e) for e in d._edges_local(DedupConfig(rules=["near"], radius=0, crop_radius=0,
                                                           confirm="none"), keys, gids, "sort")] == [{(0, 1)}]
    # a wider radius reaches row 2 only (row 3 is the complement)
    assert [_pairs(*e) for e in d._edges_local(DedupConfig(rules=["near"], radius=2, crop_radius=0), keys, gids,
                                               "sort")] == [{(0, 1)}]
    # row 3's crops are 1 bit from rows 0 and 1 (one class: the pair goes to its first row) and 4
    # bits from row 2: crop pairs, found by the search and kept for the confirmation to check
    keys = _plan_keys(crops=True)
    for rules, want in ((["near"], {(0, 1), (0, 2), (0, 3), (2, 3)}), (["exact+near"], {(0, 1)})):
        got = d._edges_local(DedupConfig(rules=rules), keys, gids, "sort")
        assert [_pairs(*e) for e in got] == [want]
    got = d._edges_local(DedupConfig(rules=["near"], crop_radius=0), keys, gids, "sort")
    assert [_pairs(*e) for e in got] == [{(0, 1), (0, 2)}]


def test_colors_are_zero_where_null_whatever_bytes_the_null_slot_holds():
    # Arrow leaves a null slot's bytes unspecified: build one holding 0xFF
    data = pa.py_buffer(bytes(range(48)) + b"\xff" * 48)
    validity = pa.py_buffer(bytes([0b01]))
    arr = pa.FixedSizeBinaryArray.from_buffers(pa.binary(48), 2, [validity, data])
    c, ok = d._colors(pa.chunked_array([arr]))
    assert c.tolist() == [list(range(48)), [0] * 48] and ok.tolist() == [True, False]


def test_crops_are_zero_where_null_whatever_bytes_the_null_slot_holds():
    data = pa.py_buffer(b"\xee" * phash.CROP_BYTES + phash.crops_to_bytes(C2))
    validity = pa.py_buffer(bytes([0b10]))
    arr = pa.FixedSizeBinaryArray.from_buffers(pa.binary(phash.CROP_BYTES), 2, [validity, data])
    c, ok = d._crops(pa.chunked_array([arr]))
    assert c.tolist() == [[0] * N, C2] and ok.tolist() == [False, True]


def test_an_exact_near_rule_needs_the_sha256_as_well_as_the_phash():
    # two rows with one pHash and colour but no sha256: not exact copies, so not linked by exact+near
    keys = _key_table([None, None], [(1, 1), (1, 1)], ph=[77, 77], sig=None)
    keys = keys.set_column(keys.column_names.index(schema.COLOR_SIG), schema.COLOR_SIG,
                           pa.array([bytes(48)] * 2, pa.binary(48)))
    gids = np.arange(2, dtype=np.int64)
    got = d._edges_local(DedupConfig(rules=["exact+near", "caption+near", "exact", "caption"], crop_radius=0),
                         keys, gids, "sort")
    assert [_pairs(*e) for e in got] == [set(), {(0, 1)}, set(), {(0, 1)}]
    # radius 0 links identical rows only: the colour is part of what makes them identical
    keys = keys.set_column(keys.column_names.index(schema.COLOR_SIG), schema.COLOR_SIG,
                           pa.array([bytes(48), bytes([9]) * 48], pa.binary(48)))
    got = d._edges_local(DedupConfig(rules=["caption+near"], radius=0, crop_radius=0), keys, gids, "sort")
    assert [_pairs(*e) for e in got] == [set()]


def test_groups_for_the_first_rows_only_mean_every_later_row_is_distinct():
    """The one-process engines get group words for the full-image entries only (crop entries follow
    and are each distinct): the same pairs as the full-width groups with a unique word per crop."""
    from curate import neardup

    rng = np.random.default_rng(3)
    base = rng.integers(0, 2**63, 60, dtype=np.uint64)
    flips = (np.uint64(1) << rng.integers(0, 64, 200).astype(np.uint64))
    h = np.concatenate([base[rng.integers(0, 60, 300)], base[rng.integers(0, 60, 200)] ^ flips])
    words = rng.integers(0, 3, (300, 2)).astype(np.uint64)  # a few colour classes per hash
    own = np.concatenate([np.zeros(300, np.uint64), np.arange(1, 201, dtype=np.uint64)])
    wide = np.column_stack([np.concatenate([words, np.zeros((200, 2), np.uint64)]), own])
    for find in (neardup.near_pairs_sort, neardup.near_pairs_faiss):
        short = set(zip(*(x.tolist() for x in find(h, 6, None, words)), strict=True))
        full = set(zip(*(x.tolist() for x in find(h, 6, None, wide)), strict=True))
        assert short == full and len(short) > 500
    uniq, first, sa, sb = neardup._collapse(h, words)
    assert set(range(300, 500)) <= set(first.tolist())  # every later row is its own distinct row
    assert not set(sb.tolist()) & set(range(300, 500))
