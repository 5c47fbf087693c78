"""clip's selection without a model: the global top fraction and the per-row reasons.

Oracles: plain ``sorted()`` over Python floats (score descending, then uid ascending; of two zeros,
+0.0 ranks above -0.0, as the sign bit says), and keep counts written out by hand (round half up).
The scores come from Parquet files as the plan writes them; the per-row reasons go through
``ClipStage.process`` with a threshold plan over the input's own ``clip_score``, so no model loads.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate import schema
from curate.dataset import PLAN_DIR, Dataset
from curate.stage import RunOptions, ShardContext
from curate.stages.clip import PLAN_SUBDIR, ClipConfig, ClipStage, keep_top, sortable_bits, top_threshold


def oracle_order(scores: list[float], uids: list[str]) -> list[int]:
    return sorted(range(len(scores)), key=lambda i: (-scores[i], -math.copysign(1.0, scores[i]), uids[i]))


def write_files(tmp_path, shards: list[list[tuple[str, float | None]]]) -> list[str]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    files = []
    for n, rows in enumerate(shards):
        t = pa.table({schema.UID: [u for u, _ in rows],
                      schema.CLIP_SCORE: pa.array([s for _, s in rows], pa.float32())})
        path = tmp_path / f"{n:05d}.parquet"
        pq.write_table(t, path)
        files.append(str(path))
    return files


def f32(x: float) -> float:
    return float(np.float32(x))


def test_sortable_bits_order_is_the_float_order():
    values = [-1.0, -0.75, -0.5, -0.2500001, -0.25, -1e-30, -0.0, 0.0, 1e-30, 0.1, 0.28, 0.2800001, 0.5, 1.0,
              -3.0, 2.5, float(np.float32(-0.3)), float(np.float32(0.3))]
    scores = np.array(values, np.float32)
    keys = sortable_bits(scores)
    assert keys.dtype == np.uint32
    by_key = sorted(range(len(values)), key=lambda i: int(keys[i]))
    by_value = sorted(range(len(values)), key=lambda i: (float(scores[i]), math.copysign(1.0, float(scores[i]))))
    assert by_key == by_value
    # negatives below every non-negative: the top bit is the sign, inverted
    assert all(int(k) < 0x80000000 for k, v in zip(keys, scores, strict=True) if math.copysign(1, v) < 0)
    assert all(int(k) >= 0x80000000 for k, v in zip(keys, scores, strict=True) if math.copysign(1, v) > 0)


@pytest.mark.parametrize(
    ("n", "fraction", "k"),
    [(10, 0.3, 3), (5, 0.5, 3), (5, 0.3, 2), (7, 0.5, 4), (4, 0.125, 1), (4, 0.12, 0), (9, 1.0, 9), (1, 0.5, 1),
     (3, 0.16, 0), (3, 0.17, 1)],
)
def test_keep_count_rounds_half_up(tmp_path, n, fraction, k):
    rows = [(f"{i:032x}", f32(0.01 * i)) for i in range(n)]
    th = top_threshold(write_files(tmp_path, [rows]), fraction)
    assert (th["keep"], th["scored"]) == (k, n)


def _check_against_oracle(tmp_path, shards, fraction):
    files = write_files(tmp_path, shards)
    scored = [(u, s) for rows in shards for u, s in rows if s is not None]
    uids, scores = [u for u, _ in scored], [f32(s) for _, s in scored]
    k = math.floor(fraction * len(scored) + 0.5)
    th = top_threshold(files, fraction)
    assert th["keep"] == k and th["scored"] == len(scored)
    want = set(oracle_order(scores, uids)[:k])
    kept = keep_top(np.array(scores, np.float32), uids, th)
    assert set(np.flatnonzero(kept).tolist()) == want
    if k:
        last = oracle_order(scores, uids)[k - 1]
        assert th["uid"] == uids[last] and th["score"] == scores[last]
    else:
        assert th["key"] is None and th["uid"] is None and th["score"] is None
    return th


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.3, 0.5, 0.77, 0.99, 1.0])
def test_top_fraction_equals_sorted_on_mixed_signs_ties_and_nulls(tmp_path, fraction):
    rng = np.random.default_rng(3)
    shards = []
    for _ in range(4):
        m = int(rng.integers(0, 30))
        pool = [-0.9, -0.5, -0.5, -0.0, 0.0, 0.1, 0.28, 0.28, 0.3]
        rows = []
        for _ in range(m):
            s = float(rng.choice(pool)) if rng.random() < 0.5 else float(rng.normal(0, 0.4))
            rows.append((f"{int(rng.integers(0, 2**62)):032x}", None if rng.random() < 0.1 else s))
        shards.append(rows)
    _check_against_oracle(tmp_path, shards, fraction)


@pytest.mark.parametrize("fraction", [0.2, 0.5, 0.8])
def test_all_negative_scores(tmp_path, fraction):
    # the best of negatives is the one nearest zero; a sign-blind key would keep the most negative
    rows = [(f"{i:032x}", -0.05 * (i + 1)) for i in range(10)]
    th = _check_against_oracle(tmp_path, [rows[:4], rows[4:]], fraction)
    assert th["score"] < 0


def test_ties_at_the_threshold_are_broken_by_uid(tmp_path):
    rows = [("c" * 32, 0.5), ("a" * 32, 0.5), ("b" * 32, 0.5), ("d" * 32, 0.9), ("e" * 32, 0.1)]
    th = _check_against_oracle(tmp_path, [rows[:2], rows[2:]], 0.6)  # keep 3: d, then a and b of the tie
    assert th["uid"] == "b" * 32
    kept = keep_top(np.array([s for _, s in rows], np.float32), [u for u, _ in rows], th)
    assert kept.tolist() == [False, True, True, True, False]


def test_scores_spread_in_the_low_bits_and_in_the_high_bits(tmp_path):
    # one pass decides on the top 16 bits, the next on the low 16: scores sharing their high bits
    # and scores differing only there are both ordered exactly
    near = [(f"{i:032x}", f32(0.3 + i * 1e-7)) for i in range(12)]
    far = [(f"f{i:031x}", -0.5 + 0.1 * i) for i in range(8)]
    for fraction in (0.1, 0.25, 0.4, 0.6, 0.9):
        _check_against_oracle(tmp_path, [near[:6], far, near[6:]], fraction)


def test_every_pass_goes_through_the_map_function(tmp_path):
    files = write_files(tmp_path, [[("a" * 32, 0.1)], [("b" * 32, 0.2)], [("c" * 32, None)]])
    calls = []

    def mapper(fn, items):
        calls.append((fn.__name__, len(items)))
        return [fn(i) for i in items]

    th = top_threshold(files, 0.5, mapper)
    assert th["keep"] == 1 and th["uid"] == "b" * 32
    assert [n for _, n in calls] == [3, 3, 3]
    assert len({name for name, _ in calls}) == 3


def test_nothing_scored_or_nothing_kept(tmp_path):
    files = write_files(tmp_path, [[("a" * 32, None)], []])
    th = top_threshold(files, 0.5)
    assert th == {"keep": 0, "scored": 0, "key": None, "uid": None, "score": None}
    assert keep_top(np.array([0.9], np.float32), ["a" * 32], th).tolist() == [False]


# -- the per-row reasons, through process ------------------------------------------------------
def _process(tmp_path, scores, concepts=None, **cfg) -> list[str | None]:
    uids = [f"{i:032x}" for i in range(len(scores))]
    cols = {schema.UID: uids, schema.CLIP_SCORE: pa.array(scores, pa.float32())}
    if concepts is not None:
        cols[schema.CLIP_CONCEPT] = pa.array(concepts, pa.string())
    table = pa.table(cols)
    files = write_files(tmp_path, [list(zip(uids, scores, strict=True))])
    stage = ClipStage(ClipConfig(top_fraction=cfg.pop("top_fraction", 1.0), **cfg))
    out = Dataset(str(tmp_path / "out"))
    th = top_threshold(files, stage.config.top_fraction)
    out.write_json({**th, "source": "input"}, PLAN_DIR, PLAN_SUBDIR, "threshold.json")
    ctx = ShardContext(shard=0, input_path=None, input=None, output=out, plan_dir="", options=RunOptions())
    got = stage.process(table, ctx)
    assert got.column(schema.CLIP_SCORE).to_pylist() == pa.array(scores, pa.float32()).to_pylist()
    return got.column(schema.DROP_REASON).to_pylist()


def test_min_score_at_below_and_above(tmp_path):
    s = [f32(0.28), float(np.nextafter(np.float32(0.28), np.float32(0))), f32(0.29), f32(-0.5), None]
    assert _process(tmp_path, s, min_score=f32(0.28)) == [
        None, "clip:low_score", None, "clip:low_score", "clip:undecodable"
    ]
    assert _process(tmp_path / "off", s) == [None, None, None, None, "clip:undecodable"]


def test_reasons_in_order_undecodable_concept_low_score_below_top(tmp_path):
    scores = [None, 0.9, 0.1, 0.5, 0.6, 0.7]
    concepts = ["nsfw", "nsfw", "nsfw", None, None, None]
    got = _process(tmp_path, scores, concepts, min_score=0.2, top_fraction=0.5)
    # scored: 5 rows, keep round(2.5) = 3 best: 0.9, 0.7, 0.6
    assert got == ["clip:undecodable", "clip:concept", "clip:concept", "clip:below_top_fraction", None, None]
    tagged = _process(tmp_path / "tag", scores, concepts, min_score=0.2, top_fraction=0.5, concept_action="tag")
    assert tagged == ["clip:undecodable", None, "clip:low_score", "clip:below_top_fraction", None, None]


def test_missing_threshold_is_an_error_naming_the_fix(tmp_path):
    stage = ClipStage(ClipConfig(top_fraction=0.5))
    ctx = ShardContext(shard=0, input_path=None, input=None, output=Dataset(str(tmp_path)), plan_dir="",
                       options=RunOptions())
    table = pa.table({schema.UID: ["a" * 32], schema.CLIP_SCORE: pa.array([0.5], pa.float32())})
    with pytest.raises(RuntimeError, match="--overwrite"):
        stage.process(table, ctx)


def _f32_from_bits(bits: int) -> float:
    return float(np.array([bits], np.uint32).view(np.float32)[0])


def test_threshold_in_a_bin_just_below_a_filled_one(tmp_path):
    # the first pass picks a bin of the top 16 bits; the rows in the bins above it (here the adjacent
    # one) count towards k in the second pass
    hi = 0x3E9A  # a positive float's top 16 bits (~0.30)
    scores = ([_f32_from_bits((hi + 1) << 16 | low) for low in (5, 9)]
              + [_f32_from_bits(hi << 16 | low) for low in (1, 2, 3, 7, 8)]
              + [_f32_from_bits((hi - 1) << 16 | low) for low in (4, 6, 0xFFFF)])
    rows = [(f"{i:032x}", s) for i, s in enumerate(scores)]
    for fraction in (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8):
        _check_against_oracle(tmp_path / f"{fraction}", [rows[::2], rows[1::2]], fraction)


def test_keep_top_returns_booleans_also_for_no_rows(tmp_path):
    rows = [("a" * 32, 0.5), ("b" * 32, 0.1)]
    th = top_threshold(write_files(tmp_path, [rows]), 0.5)
    kept = keep_top(np.array([0.5, 0.1], np.float32), ["a" * 32, "b" * 32], th)
    assert kept.dtype == np.bool_ and kept.tolist() == [True, False]
    assert keep_top(np.array([], np.float32), [], th).dtype == np.bool_
    none = top_threshold(write_files(tmp_path / "none", [[("c" * 32, None)]]), 0.5)
    assert keep_top(np.array([0.9], np.float32), ["c" * 32], none).dtype == np.bool_


def test_score_files_on_any_filesystem():
    # the plan reads score files through fsspec URLs (object storage on a cluster); memory:// here
    import fsspec

    fs = fsspec.filesystem("memory")
    files = []
    for n, rows in enumerate([[("a" * 32, 0.2), ("b" * 32, -0.4)], [("c" * 32, 0.7)]]):
        t = pa.table({schema.UID: [u for u, _ in rows], schema.CLIP_SCORE: pa.array([s for _, s in rows],
                                                                                     pa.float32())})
        with fs.open(f"/clip-sel/{n}.parquet", "wb") as f:
            pq.write_table(t, f)
        files.append(f"memory:///clip-sel/{n}.parquet")
    th = top_threshold(files, 0.67)
    assert (th["keep"], th["uid"]) == (2, "a" * 32)


def test_float64_scores_are_keyed_as_their_float32():
    # scores may arrive as float64 (a table cast, a Python list): the key is the float32 one
    values = [0.5, -0.5, 0.28, -0.0, 1.0]
    want = sortable_bits(np.array(values, np.float32))
    assert sortable_bits(np.array(values, np.float64)).tolist() == want.tolist()
    assert sortable_bits(values).tolist() == want.tolist()
