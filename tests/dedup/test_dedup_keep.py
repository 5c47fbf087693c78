"""Which member of a duplicate cluster dedup keeps, under each ``keep`` policy.

Every cluster here is made of rows with one stored pHash and one colour signature (so they are
duplicates whatever the radius), differing only in size, CLIP score and position. The kept row of
each case is written out by hand from the policy's definition: resolution = most pixels (width x
height), then best clip score, then first position; clip_score = best score (a missing one ranks
last), then most pixels, then first position; first = earliest (shard, row).
"""

from __future__ import annotations

import pytest
from test_decisions import H_A, _decisions, _row
from test_dedup_stage import run_inline

from curate import schema
from curate.testing.datasets import write_image_dataset


def _uid(i: int) -> str:
    return f"{i:032x}"


def _rows(spec: list[tuple[int, int, int, float | None]]) -> list[dict]:
    """(row id, width, height, clip score) -> rows of one cluster."""
    return [_row(i, H_A, 0, **{schema.WIDTH: w, schema.HEIGHT: h, schema.CLIP_SCORE: s}) for i, w, h, s in spec]


CASES = [
    # (name, keep, shards of (id, width, height, clip), kept id)
    ("clip_best_not_largest", "clip_score", [[(0, 400, 400, 0.2), (1, 100, 100, 0.9), (2, 200, 200, 0.5)]], 1),
    ("clip_best_in_later_shard", "clip_score", [[(0, 400, 400, 0.3)], [(1, 100, 100, 0.31)]], 1),
    ("clip_negatives", "clip_score", [[(0, 400, 400, -0.3), (1, 100, 100, -0.1), (2, 300, 300, -0.2)]], 1),
    ("clip_missing_ranks_last", "clip_score", [[(0, 400, 400, None), (1, 100, 100, -0.9)]], 1),
    ("clip_tie_then_pixels", "clip_score", [[(0, 100, 100, 0.5), (1, 300, 300, 0.5), (2, 200, 200, 0.5)]], 1),
    ("clip_tie_pixels_tie_then_first", "clip_score", [[(2, 100, 100, 0.5), (1, 100, 100, 0.5)]], 2),
    ("resolution_most_pixels", "resolution", [[(0, 100, 100, 0.9), (1, 300, 300, 0.1), (2, 200, 200, 0.5)]], 1),
    ("resolution_is_area_not_side", "resolution", [[(0, 190, 190, 0.9), (1, 100, 400, 0.1)]], 1),
    ("resolution_tie_then_clip", "resolution", [[(0, 200, 200, 0.1), (1, 200, 200, 0.7), (2, 100, 400, 0.3)]], 1),
    ("resolution_tie_then_first", "resolution", [[(0, 200, 200, 0.5)], [(1, 200, 200, 0.5)]], 0),
    ("first_over_best", "first", [[(0, 100, 100, 0.1), (1, 400, 400, 0.9)]], 0),
    ("first_is_the_position_not_the_uid", "first", [[(5, 100, 100, 0.1), (1, 400, 400, 0.9)]], 5),
    ("first_across_shards", "first", [[(3, 100, 100, 0.1)], [(0, 400, 400, 0.9)]], 3),
]


@pytest.mark.parametrize(("name", "keep", "shards", "kept"), CASES, ids=[c[0] for c in CASES])
def test_kept_member(tmp_path, name, keep, shards, kept):
    ds = write_image_dataset(str(tmp_path / "in"), [_rows(s) for s in shards])
    got = _decisions(run_inline(ds, tmp_path / "out", keep=keep))
    ids = [i for s in shards for i, *_ in s]
    assert got[_uid(kept)] == (None, None), (name, got)
    for i in ids:
        if i != kept:
            assert got[_uid(i)] == ("dedup:near", _uid(kept)), (name, i, got[_uid(i)])
