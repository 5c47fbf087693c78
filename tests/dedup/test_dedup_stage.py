"""dedup stage on real images with made duplicates: decisions, engines, precision/recall, bad input."""

from __future__ import annotations

import collections

import pyarrow as pa
import pytest
from dedup_data import EDITS, build_corpus, write_dataset

from curate import phash, schema
from curate.dataset import Dataset
from curate.stage import PlanContext, RunOptions, ShardContext
from curate.stages.dedup import DedupConfig, DedupStage, normalize_caption


def _local_map(fn, items):
    return [fn(i) for i in items]


def run_inline(inp: Dataset, out_root, **cfg) -> dict[int, pa.Table]:
    """Plan + apply in this process (the runner does the same through Ray)."""
    stage = DedupStage(DedupConfig(**cfg))
    out = Dataset(str(out_root))
    ctx = PlanContext(
        input_path=inp.url,
        input=inp,
        output=out,
        plan_dir=out.path("_plan"),
        options=RunOptions(),
        map=_local_map,
    )
    shards = stage.plan(ctx)
    res = {}
    for n in shards:
        sctx = ShardContext(
            shard=n,
            input_path=inp.url,
            input=inp,
            output=out,
            plan_dir=out.path("_plan"),
            options=RunOptions(),
        )
        res[n] = stage.process(inp.read_shard(n), sctx)
    return res


def _rows(res: dict[int, pa.Table]) -> list[dict]:
    return [r for t in res.values() for r in t.to_pylist()]


@pytest.fixture(scope="module")
def corpus():
    return build_corpus()


@pytest.fixture(scope="module")
def dataset(corpus, tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("src"), corpus)


def test_decisions_precision_recall(corpus, dataset, tmp_path):
    rows = _rows(run_inline(dataset, tmp_path / "out"))
    by_sample = {r["sample"]: r for r in rows}
    assert len(rows) == len(corpus)
    # bad image: rejected as undecodable, never a crash
    broken = [k for k, s in enumerate(corpus) if s.kind == "broken"]
    assert by_sample[broken[0]][schema.DROP_REASON] == "dedup:undecodable"
    # exact copies under other URLs: same cluster; the reason names the link to the kept row
    # (exact when the kept row has the same bytes, near when a better near copy was kept)
    by_uid = {r[schema.UID]: r for r in rows}
    for k, s in enumerate(corpus):
        if s.kind == "copy":
            orig = next(j for j, t in enumerate(corpus) if t.origin == s.origin and t.kind == "original")
            pair = [by_sample[k], by_sample[orig]]
            keepers = {r[schema.DUP_OF] or r[schema.UID] for r in pair}
            assert len(keepers) == 1
            assert any(r[schema.DROP_REASON] for r in pair)
            for r in pair:
                if r[schema.DROP_REASON]:
                    same = by_uid[r[schema.DUP_OF]][schema.SHA256] == r[schema.SHA256]
                    assert r[schema.DROP_REASON] == ("dedup:exact" if same else "dedup:near")
    # same caption, different images: not duplicates under the default rules
    for k, s in enumerate(corpus):
        if s.kind == "same_caption":
            assert by_sample[k][schema.DROP_REASON] is None
    # every rejected row points at a kept row of the same cluster
    kept_uids = {r[schema.UID] for r in rows if r[schema.DROP_REASON] is None}
    for r in rows:
        if r[schema.DROP_REASON] and r[schema.DROP_REASON] != "dedup:undecodable":
            assert r[schema.DUP_OF] in kept_uids
    # precision / recall of near-duplicate detection, pair level: an edit is found when it ends in
    # the same cluster as its original; precision counts same-cluster pairs with the same origin.
    cluster = {
        r["sample"]: r[schema.DUP_OF] or r[schema.UID]
        for r in rows
        if r[schema.DROP_REASON] != "dedup:undecodable"
    }
    orig_of = {s.origin: k for k, s in enumerate(corpus) if s.kind == "original"}
    uid_sample = {r[schema.UID]: r["sample"] for r in rows}
    found, total = collections.Counter(), collections.Counter()
    for k, s in enumerate(corpus):
        if s.kind in EDITS:
            total[s.kind] += 1
            # found: in its original's cluster, or dropped as a duplicate of another copy of it (a
            # same-size edit can lead a cluster of its own when it is not within reach of the original)
            found[s.kind] += cluster[k] == cluster[orig_of[s.origin]] or (
                by_sample[k][schema.DUP_OF] is not None
                and corpus[uid_sample[by_sample[k][schema.DUP_OF]]].origin == s.origin
            )
    members = collections.defaultdict(list)
    for k, c in cluster.items():
        members[c].append(k)
    pairs = [(a, b) for m in members.values() for i, a in enumerate(m) for b in m[i + 1 :]]
    wrong = [(corpus[a].origin, corpus[b].origin) for a, b in pairs if corpus[a].origin != corpus[b].origin]
    precision = 1 - len(wrong) / max(1, len(pairs))
    recall = sum(found.values()) / sum(total.values())
    report = {k: f"{found[k]}/{total[k]}" for k in EDITS}
    print(
        f"\nradius 6: recall {recall:.3f} by edit {report}; pair precision {precision:.3f} of {len(pairs)} pairs"
    )
    # The only unrelated pairs linked are the corpus' own look-alikes: the same arrow drawn in red
    # and in blue (pHash is grayscale: 2 bits apart), with each other's edits.
    assert all({"arrow-right" in o for o in pair} == {True} for pair in wrong), wrong[:5]
    assert precision >= 0.85
    for k in ("resized", "jpeg_q30"):
        assert found[k] == total[k], (k, report)
    assert found["bright"] >= 0.85 * total["bright"], report
    assert recall >= 0.85, report


def test_engines_identical(dataset, tmp_path):
    outs = {}
    for engine in ("sort", "faiss", "distributed"):
        rows = _rows(run_inline(dataset, tmp_path / engine, engine=engine, rows_per_partition=1000))
        outs[engine] = {
            r[schema.UID]: (r[schema.DROP_REASON], r[schema.DUP_OF], r[schema.PHASH]) for r in rows
        }
    assert outs["sort"] == outs["faiss"] == outs["distributed"]
    assert sum(1 for v in outs["sort"].values() if v[1]) > 40


def test_rules_combinations_and_keep_policy(corpus, dataset, tmp_path):
    by = {r["sample"]: r for r in _rows(run_inline(dataset, tmp_path / "cap", rules=["caption"]))}
    same = [k for k, s in enumerate(corpus) if s.kind == "same_caption"]
    assert sorted(by[k][schema.DROP_REASON] is None for k in same) == [False, False, True]
    assert all(by[k][schema.DROP_REASON] in (None, "dedup:caption") for k in same)
    # exact copies have other captions: "exact+caption" keeps them all
    by = {r["sample"]: r for r in _rows(run_inline(dataset, tmp_path / "ec", rules=["exact+caption"]))}
    assert all(by[k][schema.DROP_REASON] is None for k, s in enumerate(corpus) if s.kind == "copy")
    # keep=resolution: the half-size copy is never the kept one
    by = {r["sample"]: r for r in _rows(run_inline(dataset, tmp_path / "res", keep="resolution"))}
    for k, s in enumerate(corpus):
        if s.kind == "resized" and by[k][schema.DROP_REASON] is None:
            raise AssertionError("a resized copy was kept over its larger original")
    # keep=first: the kept member is the earliest row (shard, index) of its cluster
    res = run_inline(dataset, tmp_path / "first", keep="first")
    pos = {r[schema.UID]: (n, i) for n, t in res.items() for i, r in enumerate(t.to_pylist())}
    for t in res.values():
        for r in t.to_pylist():
            if r[schema.DUP_OF]:
                assert pos[r[schema.DUP_OF]] < pos[r[schema.UID]]


def test_caption_near_minhash(tmp_path):
    from dedup_data import Sample

    base = build_corpus(n_originals=8, edited=0, copies=0)[:8]
    caps = [
        "A red bicycle leaning against an old brick wall",
        "a red bicycle leaning against an old brick wall!",
        "A red bicycle leaning against the old brick wall",
        "Sunset over the harbour",
        "a blue car",
        "a blue cat",
        "Sunset over the harbour",
        "sunset over the harbour.",
    ]
    samples = [
        Sample(s.data, s.ext, c, s.origin, "original", s.width, s.height)
        for s, c in zip(base, caps, strict=True)
    ]
    samples.append(Sample(base[7].data, base[7].ext, "sunset over the harbour", "x", "copy", 1, 1))
    ds = write_dataset(tmp_path / "src", samples, shards=3, empty_shard=False)
    runs = {}
    for engine in ("sort", "distributed"):
        for rules in (["caption_near"], ["caption_near+exact"]):
            rows = _rows(
                run_inline(
                    ds,
                    tmp_path / f"{engine}{len(rules[0])}",
                    rules=rules,
                    caption_jaccard=0.7,
                    engine=engine,
                    rows_per_partition=1000,
                )
            )
            runs[engine, rules[0]] = {r["sample"]: (r[schema.DROP_REASON], r[schema.DUP_OF]) for r in rows}
    assert runs["sort", "caption_near"] == runs["distributed", "caption_near"]
    assert runs["sort", "caption_near+exact"] == runs["distributed", "caption_near+exact"]
    by = runs["sort", "caption_near"]
    # near-identical bicycle captions: one cluster of 3; the three sunsets + the copy: one of 4
    assert [by[k][0] is not None for k in range(9)].count(True) == 2 + 3
    assert by[4][0] is None and by[5][0] is None  # "car" vs "cat": too far at 0.7
    # with +exact only the byte-identical copy (same image, near caption) remains a duplicate
    ex = runs["sort", "caption_near+exact"]
    assert sorted(k for k, v in ex.items() if v[0]) in ([7], [8])
    assert normalize_caption("A  Cat!") == normalize_caption("a cat")


def test_undecodable_keep_and_explain(corpus, dataset, tmp_path):
    rows = _rows(run_inline(dataset, tmp_path / "keep", undecodable="keep"))
    broken = next(r for r in rows if corpus[r["sample"]].kind == "broken")
    assert broken[schema.DROP_REASON] is None and broken[schema.PHASH] is None
    stage = DedupStage(DedupConfig())
    out = Dataset(str(tmp_path / "keep"))
    dup = next(r for r in rows if r[schema.DUP_OF])
    info = stage.explain(out, dup[schema.UID])
    members = {m[schema.UID] for m in info["members"]}
    assert dup[schema.DUP_OF] in members and info["kept"] == dup[schema.DUP_OF]
    assert stage.explain(out, broken[schema.UID])["duplicate_cluster"] is None


def test_config_errors():
    with pytest.raises(ValueError):
        DedupConfig(rules=["near+bogus"])
    with pytest.raises(ValueError):
        DedupConfig(rules=[])
    with pytest.raises(ValueError):
        DedupConfig(radius=40)
    with pytest.raises(ValueError):
        DedupConfig(radius=6, blocks=6)


def test_crop_matching_finds_copies_cut_at_two_edges(corpus, dataset, tmp_path):
    """3% cut off the left and the top moves several demo images 8-12 bits from their original's
    pHash; one of the original's crop hashes (the bottom-right 97%) is within a few bits of them."""
    orig_of = {s.origin: k for k, s in enumerate(corpus) if s.kind == "original"}
    corner = [k for k, s in enumerate(corpus) if s.kind == "corner3"]

    def same_family(rows: dict, k: int) -> bool:
        dup = rows[k][schema.DUP_OF]
        return dup is not None and any(corpus[j].origin == corpus[k].origin for j, r in rows.items()
                                       if r[schema.UID] == dup)

    def found(**cfg) -> tuple[int, int]:
        rows = {r["sample"]: r for r in _rows(run_inline(dataset, tmp_path / str(len(cfg)), **cfg))}
        keeper = {k: r[schema.DUP_OF] or r[schema.UID] for k, r in rows.items()}
        hit = sum(keeper[k] == keeper[orig_of[corpus[k].origin]] or same_family(rows, k) for k in corner)
        far = sum(1 for k in corner if rows[k][schema.DROP_REASON] and
                  phash.hamming(rows[k][schema.PHASH], rows[orig_of[corpus[k].origin]][schema.PHASH]) > 6)
        return hit, far

    with_crops, far_with = found()
    without, far_without = found(crop_radius=0)
    # a copy whose original was itself taken by a same-size edit stays apart (leader clusters: no
    # chains), so not every copy is found; the crop hashes find those 7+ bits away, nothing else does
    assert with_crops >= len(corner) - 2 and far_with >= 4
    assert without <= with_crops - far_with and far_without == 0
