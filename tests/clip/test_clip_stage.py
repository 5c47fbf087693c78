"""The clip stage: scores and embeddings per shard, undecodable rows, threshold / concept / exact global
top-fraction filters, npy export; on a plain table and through the runner on embedded Ray."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
from clip_data import CORRUPT, corpus_images, reference_scores, write_dataset

from curate import schema
from curate.dataset import Dataset
from curate.runner import run_stage
from curate.stage import RunOptions, ShardContext
from curate.stages.clip import ClipConfig, ClipStage, keep_top, top_threshold


def _ctx(inp: Dataset, out_root, shard: int = 0) -> ShardContext:
    out = Dataset(str(out_root))
    return ShardContext(shard=shard, input_path=inp.url, input=inp, output=out, plan_dir=out.path("_plan"),
                        options=RunOptions())


def _all(ds: Dataset) -> pa.Table:
    parts = [t for _, t in ds.iter_shards()]
    parts += [t.drop_columns([schema.DROP_REASON]) for _, t in ds.iter_rejects() if t.num_rows]
    return pa.concat_tables(parts, promote_options="default")


@pytest.fixture(scope="module")
def rows():
    return corpus_images(24)


def test_scores_embeddings_and_undecodable_on_a_table(tiny_clip, rows, tmp_path):
    data = list(rows[:12])
    data[4] = (CORRUPT, "jpg", "a broken picture")
    inp = write_dataset(tmp_path / "in", [data])
    stage = ClipStage(ClipConfig(model=tiny_clip, pretrained=None, device="cpu", batch_size=5, embeddings=True,
                                 jpeg_draft=None))
    stage.setup()
    out = stage.process(inp.read_shard(0), _ctx(inp, tmp_path / "out"))
    ref = reference_scores(tiny_clip, data)
    reasons = out.column(schema.DROP_REASON).to_pylist()
    assert reasons == [None] * 4 + ["clip:undecodable"] + [None] * 7
    scores = out.column(schema.CLIP_SCORE)
    assert scores.type == pa.float32() and scores[4].as_py() is None
    got = np.array([s if s is not None else np.nan for s in scores.to_pylist()], np.float32)
    ok = np.arange(12) != 4
    assert np.abs(got[ok] - ref[ok]).max() < 1e-3
    img = out.column(schema.IMAGE_EMBEDDING)
    assert img.type == schema.embedding_type(32) and img[4].as_py() is None
    txt = np.array(out.column(schema.TEXT_EMBEDDING).to_pylist(), np.float32)
    vecs = np.array([v for v in img.to_pylist() if v is not None], np.float32)
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1, atol=2e-3)
    assert np.allclose(np.linalg.norm(txt, axis=1), 1, atol=2e-3)
    # the float16 columns reproduce the score to float16 precision
    assert np.abs((vecs * txt[ok]).sum(1) - got[ok]).max() < 3e-3


def test_min_score_and_concepts(tiny_clip, rows, tmp_path):
    inp = write_dataset(tmp_path / "in", [list(rows[:16])])
    table = inp.read_shard(0)
    base = ClipStage(ClipConfig(model=tiny_clip, pretrained=None, device="cpu", embeddings=True))
    base.setup()
    scored = base.process(table, _ctx(inp, tmp_path / "o1"))
    scores = np.array(scored.column(schema.CLIP_SCORE).to_pylist(), np.float32)
    img = np.array(scored.column(schema.IMAGE_EMBEDDING).to_pylist(), np.float32)

    cut = float(np.median(scores))
    low = ClipStage(ClipConfig(model=tiny_clip, pretrained=None, device="cpu", min_score=cut))
    low.setup()
    r = low.process(table, _ctx(inp, tmp_path / "o2")).column(schema.DROP_REASON).to_pylist()
    assert [x == "clip:low_score" for x in r] == list(scores < cut)

    # Concept prompts encoded with the same model; the threshold sits between images' similarities, so
    # the expected hits are known from a plain computation.
    prompts = ("a photo of a weapon", "gore")
    concept = base.clip.encode_texts(list(prompts))
    sims = img @ concept.T
    thr = float(np.sort(sims.max(1))[-4])  # the 4 most similar images (float16 embeddings: skip near-ties)
    expect = sims.max(1) >= thr + 2e-3
    for action in ("drop", "tag"):
        st = ClipStage(ClipConfig(model=tiny_clip, pretrained=None, device="cpu", concepts=prompts,
                                  concept_threshold=thr + 2e-3, concept_action=action))
        st.setup()
        out = st.process(table, _ctx(inp, tmp_path / f"o-{action}"))
        tags = out.column(schema.CLIP_CONCEPT).to_pylist()
        assert [t is not None for t in tags] == list(expect)
        assert all(tags[i] == prompts[int(sims[i].argmax())] for i in np.flatnonzero(expect))
        r = out.column(schema.DROP_REASON).to_pylist()
        assert [x == "clip:concept" for x in r] == (list(expect) if action == "drop" else [False] * 16)
    assert 1 <= expect.sum() <= 4


def test_radix_select_is_exact_with_ties_and_negatives(tmp_path):
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    files, all_scores, all_uids = [], [], []
    for n in range(5):
        m = int(rng.integers(0, 40))
        scores = rng.choice(np.array([-0.5, -0.0, 0.0, 0.1, 0.28, 0.28, 0.3], np.float32), m)
        scores[: m // 3] = rng.normal(0, 0.3, m // 3).astype(np.float32)
        uids = [f"{rng.integers(0, 2**63):032x}" for _ in range(m)]
        nulls = rng.random(m) < 0.1
        t = pa.table({schema.UID: uids, schema.CLIP_SCORE: pa.array(scores, pa.float32(), mask=nulls)})
        pq.write_table(t, tmp_path / f"{n}.parquet")
        files.append(str(tmp_path / f"{n}.parquet"))
        all_scores += list(scores[~nulls])
        all_uids += [u for u, z in zip(uids, nulls, strict=True) if not z]
    s = np.array(all_scores, np.float32)
    # the order the stage promises, in plain Python: score descending, then uid ascending; of the two
    # zeros, +0.0 first (the sign bit orders them)
    order = sorted(range(len(s)), key=lambda i: (-float(s[i]), -math.copysign(1.0, float(s[i])), all_uids[i]))
    for fraction in (0.01, 0.1, 0.3, 0.5, 0.77, 1.0):
        th = top_threshold(files, fraction)
        k = int(np.floor(fraction * len(s) + 0.5))
        assert th["keep"] == k and th["scored"] == len(s)
        kept = keep_top(s, all_uids, th)
        assert kept.sum() == k
        assert set(np.flatnonzero(kept)) == set(order[:k])


def test_top_fraction_is_exact_across_shards_and_workers(tiny_clip, ray_session, tmp_path):
    rows = corpus_images(30)
    shards = [rows[0:9], rows[9:21] + [(CORRUPT, "jpg", "broken")], rows[21:30] + [rows[0]]]
    inp = write_dataset(tmp_path / "in", shards)
    cfg = {"model": tiny_clip, "pretrained": None, "device": "cpu", "batch_size": 8, "jpeg_draft": None,
           "top_fraction": 0.3, "resources": {"num_cpus": 1}}
    summary = run_stage("clip", inp.url, str(tmp_path / "top"), config=cfg)
    out = Dataset(str(tmp_path / "top"))
    every = _all(out)
    uids = every.column(schema.UID).to_pylist()
    score = dict(zip(uids, every.column(schema.CLIP_SCORE).to_pylist(), strict=True))
    # the plan's scoring pass (Ray tasks, one per shard) gives open_clip's scores
    ref_rows = [r for sh in shards for r in sh]
    ref_uids = inp.read_shard(0).column(schema.UID).to_pylist() + inp.read_shard(1).column(
        schema.UID).to_pylist() + inp.read_shard(2).column(schema.UID).to_pylist()
    ref = dict(zip(ref_uids, reference_scores(tiny_clip, ref_rows).tolist(), strict=True))
    assert max(abs(score[u] - ref[u]) for u in score if score[u] is not None) < 1e-3

    scored = [u for u in score if score[u] is not None]
    assert len(scored) == 31 and len(score) == 32
    k = 9  # round(0.3 * 31): the undecodable row does not count
    order = sorted(scored, key=lambda u: (-score[u], u))
    kept = [u for _, t in out.iter_shards() for u in t.column(schema.UID).to_pylist()]
    assert summary["kept"] == k == len(kept)
    assert set(kept) == set(order[:k])
    assert len({n for n, t in out.iter_shards() if t.num_rows}) >= 2  # the winners span shards
    drops = pa.concat_tables([t for _, t in out.iter_rejects()]).column(schema.DROP_REASON).to_pylist()
    assert sorted(drops) == ["clip:below_top_fraction"] * (31 - k) + ["clip:undecodable"]
    threshold = out.read_json("_plan", "clip", "threshold.json")
    assert threshold["keep"] == k and threshold["scored"] == 31 and threshold["score_devices"] == ["cpu"]
    why = ClipStage(ClipConfig.model_validate(cfg)).explain(out, order[k])["top_fraction"]
    assert why["keep"] == k and why["threshold_score"] == pytest.approx(score[order[k - 1]])

    # Resume after a kill that left one shard uncommitted and no manifest: the rerun applies the
    # recorded plan (no rescoring) and gives the same kept set.
    out.fs.rm(out.path("_manifest.json"))
    out.fs.rm(out.shard_path(1, "stats.json"))
    out.fs.rm(out.shard_path(1, "commit.json"))  # killed before its claim: no commit record either
    out.fs.rm(out.shard_path(1, "parquet"))
    again = run_stage("clip", inp.url, str(tmp_path / "top"), config=cfg)
    kept2 = [u for _, t in Dataset(str(tmp_path / "top")).iter_shards() for u in t.column(schema.UID).to_pylist()]
    assert again["kept"] == k and sorted(kept2) == sorted(kept)


def test_score_in_actor_pool_then_top_fraction_over_those_scores(tiny_clip, ray_session, tmp_path):
    """Score once through the runner's actor pool (undecodable row, embeddings, npy export), then a
    top-fraction step over those scores: no rescoring, exact selection."""
    rows = corpus_images(20)
    inp = write_dataset(tmp_path / "in", [rows[:7], rows[7:13] + [(CORRUPT, "jpg", "broken")], rows[13:]])
    common = {"model": tiny_clip, "pretrained": None, "device": "cpu", "resources": {"num_cpus": 1}}
    first = run_stage("clip", inp.url, str(tmp_path / "scored"),
                      config={**common, "embeddings": True, "export_npy": True})
    scored = Dataset(str(tmp_path / "scored"))
    rejects = pa.concat_tables([t for _, t in scored.iter_rejects()])
    assert rejects.column(schema.DROP_REASON).to_pylist() == ["clip:undecodable"]
    assert first["rows_in"] == 21 and first["kept"] == 20
    assert {scored.stats(n)["clip"]["device"] for n in scored.shard_ids()} == {"cpu"}
    for n, t in scored.iter_shards():
        name = scored.shard_name(n)
        img = np.load(scored.path("embeddings", "img_emb", f"img_emb_{name}.npy"))
        txt = np.load(scored.path("embeddings", "text_emb", f"text_emb_{name}.npy"))
        meta = pa.parquet.read_table(scored.path("embeddings", "metadata", f"metadata_{name}.parquet"))
        assert img.dtype == np.float16 and img.shape == (t.num_rows, 32) == txt.shape
        assert meta.column(schema.UID).to_pylist() == t.column(schema.UID).to_pylist()
        assert np.allclose((img.astype(np.float32) * txt).sum(1), t.column(schema.CLIP_SCORE).to_numpy(),
                           atol=3e-3)
        assert np.array_equal(np.array(t.column(schema.IMAGE_EMBEDDING).to_pylist(), np.float16), img)

    # an unrelated stage in between: the chain of manifests still leads to the clip step
    run_stage("semdedup", scored.url, str(tmp_path / "mid"), config={"threshold": 1.0})
    summary = run_stage("clip", str(tmp_path / "mid"), str(tmp_path / "top"),
                        config={**common, "top_fraction": 0.25})
    out = Dataset(str(tmp_path / "top"))
    assert out.read_json("_plan", "clip", "threshold.json")["source"] == "input"
    assert not out.fs.exists(out.path("_plan", "clip", "scores"))
    mid = pa.concat_tables([t for _, t in Dataset(str(tmp_path / "mid")).iter_shards()])
    score = dict(zip(mid.column(schema.UID).to_pylist(), mid.column(schema.CLIP_SCORE).to_pylist(), strict=True))
    k = int(np.floor(0.25 * len(score) + 0.5))
    order = sorted(score, key=lambda u: (-score[u], u))
    kept = [u for _, t in out.iter_shards() for u in t.column(schema.UID).to_pylist()]
    assert summary["kept"] == k == len(kept) and set(kept) == set(order[:k])
    # another model's scores are not reused
    other = ClipStage(ClipConfig(model=tiny_clip, pretrained="other.pt", top_fraction=0.25))
    assert not other.scores_in_input(Dataset(str(tmp_path / "mid")))


@pytest.mark.gpu
def test_top_fraction_scores_on_the_gpu_through_ray(tiny_clip, ray_session, tmp_path):
    """device auto on a Ray that has a GPU: the plan's actors score on CUDA (DALI mixed decode, bf16),
    the kept set is the exact top fraction of those scores, and the scores are within the DALI/bf16
    tolerance of open_clip's own CPU computation."""
    import ray

    assert ray.cluster_resources().get("GPU", 0) >= 1
    rows = corpus_images(24)
    shards = [rows[0:8], rows[8:16] + [(CORRUPT, "jpg", "broken")], rows[16:24]]
    inp = write_dataset(tmp_path / "in", shards)
    cfg = {"model": tiny_clip, "pretrained": None, "batch_size": 8, "top_fraction": 0.5}
    summary = run_stage("clip", inp.url, str(tmp_path / "top"), config=cfg)
    out = Dataset(str(tmp_path / "top"))
    threshold = out.read_json("_plan", "clip", "threshold.json")
    assert threshold["score_devices"] == ["cuda"] and threshold["scored"] == 24
    every = _all(out)
    score = dict(zip(every.column(schema.UID).to_pylist(), every.column(schema.CLIP_SCORE).to_pylist(), strict=True))
    ref_uids = [u for n in range(3) for u in inp.read_shard(n).column(schema.UID).to_pylist()]
    ref = dict(zip(ref_uids, reference_scores(tiny_clip, [r for sh in shards for r in sh]).tolist(), strict=True))
    assert max(abs(score[u] - ref[u]) for u in score if score[u] is not None) < 5e-2
    kept = {u for _, t in out.iter_shards() for u in t.column(schema.UID).to_pylist()}
    order = sorted((u for u in score if score[u] is not None), key=lambda u: (-score[u], u))
    assert summary["kept"] == 12 and kept == set(order[:12])
