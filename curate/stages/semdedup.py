"""semdedup: semantic deduplication (SemDeDup) over CLIP image embeddings, global across all shards.

Input: a dataset whose rows carry ``image_embedding`` (the clip stage with ``embeddings: true``).

Plan (once, every step a parallel map over shards or cluster groups; files written atomically):
1. count the rows with an embedding per shard, then draw a seeded sample of at most
   ``max_train_points`` embeddings proportionally from every shard;
2. spherical k-means on the sample with faiss, in one plan worker (with a GPU when the faiss-gpu build
   is installed and the cluster has GPUs; ``n_clusters`` defaults to sqrt(N));
3. assign every row to its nearest centroid, one task per shard, into
   ``_plan/semdedup/assign/NNNNN.parquet`` (cluster, row, uid, keep scores, embedding);
4. one task per group of clusters (cluster id modulo ``groups``) reads only its clusters' rows, and
   inside each cluster finds the pairs with cosine >= ``threshold`` (blocked matrix products, so memory
   is a block of rows times the cluster size) and walks the members best-first by ``keep``
   (``resolution``: most pixels, then clip_score; ``clip_score``: the reverse; ``first``: input order;
   always ties by input order): a member similar to an already kept one is a duplicate of the most
   similar kept one. Decisions go to ``_plan/semdedup/drops/GGGGG.parquet`` (shard, row, dup_of).
No process ever holds more than the training sample, one shard, or one cluster group.

Apply (per shard): rows in the decisions are rejected ``semdedup:duplicate`` with ``dup_of`` set to the
uid of the kept image. Rows without an embedding pass through untouched.

Unlike the SemDeDup paper (which compares each item with all earlier ones, removed or not), a member is
compared only with kept members, so ``dup_of`` always names a row that is still in the dataset.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field

from curate import schema
from curate.dataset import PLAN_DIR, Dataset
from curate.stage import PlanContext, ShardContext, Stage, StageConfig

log = logging.getLogger(__name__)

NAME = "semdedup"
DUPLICATE = schema.reason(NAME, "duplicate")
SUB = "semdedup"
_BLOCK = 1024  # rows per block of the within-cluster similarity product


class SemDedupConfig(StageConfig):
    # cosine similarity at or above which two images are duplicates (SemDeDup's eps = 1 - threshold)
    threshold: float = Field(0.95, gt=0.0, le=1.0)
    n_clusters: int | None = Field(None, ge=1)  # None: round(sqrt(rows with an embedding))
    niter: int = Field(20, ge=1)
    max_train_points: int = Field(500_000, ge=1)
    seed: int = 0
    keep: Literal["resolution", "clip_score", "first"] = "resolution"
    groups: int = Field(16, ge=1)  # tasks for the pair search; each holds ~1/groups of the embeddings


@dataclasses.dataclass(frozen=True)
class _Job:
    input_url: str
    output_url: str
    shard: int
    cfg_json: str
    quota: int = 0
    centroids: np.ndarray | None = None
    group: int = 0
    groups: int = 1
    shards: tuple[int, ...] = ()


class SemDedupStage(Stage):
    name = NAME
    Config = SemDedupConfig

    config: SemDedupConfig

    def needs(self) -> dict[str, str]:
        return {schema.IMAGE_EMBEDDING: "set embeddings: true on the last clip step before it"}

    def model_device(self, phase: str) -> str | None:
        # The plan's k-means asks for a GPU only where faiss can use one (the faiss-gpu build).
        if phase != "plan":
            return None
        import faiss

        return "auto" if hasattr(faiss, "StandardGpuResources") else "cpu"

    def plan(self, ctx: PlanContext) -> list[int]:
        assert ctx.input is not None
        cfg = self.config
        shards = ctx.input.shard_ids()
        sch = ctx.input.schema()
        if sch is None or schema.IMAGE_EMBEDDING not in sch.names:
            raise ValueError(f"{ctx.input.url} has no {schema.IMAGE_EMBEDDING} column: run the clip stage "
                             "with embeddings: true before semdedup")
        base = _Job(ctx.input.url, ctx.output.url, 0, cfg.model_dump_json())
        counts = ctx.map(_count, [dataclasses.replace(base, shard=n) for n in shards])
        total = int(sum(counts))
        summary: dict[str, Any] = {"rows": total, "clusters": 0, "duplicates": 0}
        if total:
            quotas = [math.ceil(cfg.max_train_points * c / total) for c in counts]
            sample = ctx.map(_sample, [dataclasses.replace(base, shard=n, quota=q)
                                       for n, q in zip(shards, quotas, strict=True)])
            train = np.concatenate([s for s in sample if len(s)])
            # k-means runs in a plan worker, not in the driver: on a cluster the driver sits on the
            # head node, whose GPUs (usually none) say nothing about where the work should run.
            k = cfg.n_clusters or max(1, round(math.sqrt(total)))
            (centroids,) = ctx.map(_kmeans, [(train, k, cfg.niter, cfg.seed)], model=True)
            summary["clusters"] = len(centroids)
            ctx.map(_assign, [dataclasses.replace(base, shard=n, centroids=centroids) for n in shards])
            groups = min(cfg.groups, len(centroids))
            dups = ctx.map(_dedup_group, [dataclasses.replace(base, group=g, groups=groups, shards=tuple(shards))
                                          for g in range(groups)])
            summary["duplicates"] = int(sum(dups))
            summary["groups"] = groups
        ctx.output.write_json(summary, PLAN_DIR, SUB, "summary.json")
        log.info("semdedup: %d rows, %d clusters, %d duplicates", total, summary["clusters"],
                 summary["duplicates"])
        return shards

    def process(self, table: pa.Table, ctx: ShardContext) -> pa.Table:
        out = ctx.output
        summary = out.read_json(PLAN_DIR, SUB, "summary.json") or {}
        dup_of: list[str | None] = [None] * table.num_rows
        for g in range(int(summary.get("groups", 0))):
            path = out.path(PLAN_DIR, SUB, "drops", f"{g:05d}.parquet")
            t = pq.read_table(path, filesystem=out.fs, filters=[("shard", "=", ctx.shard)])
            for row, d in zip(t.column("row").to_pylist(), t.column(schema.DUP_OF).to_pylist(), strict=True):
                dup_of[row] = d
        table = schema.with_column(table, schema.DUP_OF, pa.array(dup_of, pa.string()))
        reasons = [DUPLICATE if d is not None else None for d in dup_of]
        ctx.stats[NAME] = {"duplicates": sum(r is not None for r in reasons)}
        return schema.with_column(table, schema.DROP_REASON, pa.array(reasons, pa.string()))


    def explain(self, output: Dataset, uid: str) -> dict[str, Any] | None:
        summary = output.read_json(PLAN_DIR, SUB, "summary.json")
        if summary is None:
            return None
        as_dup, represents = None, []
        for g in range(int(summary.get("groups", 0))):
            t = pq.read_table(output.path(PLAN_DIR, SUB, "drops", f"{g:05d}.parquet"), filesystem=output.fs,
                              columns=[schema.UID, schema.DUP_OF, "similarity"])
            for r in t.filter(pc.equal(t.column(schema.UID), uid)).to_pylist():
                as_dup = r
            represents += t.filter(pc.equal(t.column(schema.DUP_OF), uid)).to_pylist()
        return {"threshold": self.config.threshold, "keep": self.config.keep, "clusters": summary["clusters"],
                "duplicate_of": as_dup, "represents": represents}


# -- k-means --------------------------------------------------------------------------------------------
def kmeans(x: np.ndarray, k: int, niter: int, seed: int) -> np.ndarray:
    """Spherical k-means centroids (float32 [k', d], k' <= k) with faiss, on GPU when faiss sees one."""
    import faiss

    x = _unit(np.ascontiguousarray(x, dtype=np.float32))
    k = max(1, min(k, len(x)))
    use_gpu = faiss.get_num_gpus() > 0
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, spherical=True, gpu=use_gpu,
                      max_points_per_centroid=max(256, math.ceil(len(x) / k)), verbose=False)
    km.train(x)
    log.info("semdedup k-means: %d points, %d clusters, %s", len(x), k, "GPU" if use_gpu else "CPU")
    return np.ascontiguousarray(km.centroids, dtype=np.float32)


def _kmeans(job: tuple[np.ndarray, int, int, int]) -> np.ndarray:
    return kmeans(*job)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


# -- plan tasks (module level: Ray pickles them) ----------------------------------------------------------
def _embedded(job: _Job, columns: list[str]) -> tuple[pa.Table, np.ndarray]:
    """Rows of the job's shard that have an embedding (with their row numbers) and the float32 unit vectors."""
    t = Dataset(job.input_url).read_shard(job.shard, columns=columns)
    t = t.append_column("row", pa.array(np.arange(t.num_rows, dtype=np.int32)))
    t = t.filter(pc.is_valid(t.column(schema.IMAGE_EMBEDDING)))
    col = t.column(schema.IMAGE_EMBEDDING).combine_chunks()
    dim = col.type.list_size
    emb = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(col), dim) \
        if len(col) else np.zeros((0, dim), np.float32)
    return t, _unit(emb)


def _count(job: _Job) -> int:
    t = Dataset(job.input_url).read_shard(job.shard, columns=[schema.IMAGE_EMBEDDING])
    return t.num_rows - t.column(schema.IMAGE_EMBEDDING).null_count


def _sample(job: _Job) -> np.ndarray:
    _, emb = _embedded(job, [schema.IMAGE_EMBEDDING])
    if len(emb) <= job.quota:
        return emb
    rng = np.random.default_rng([SemDedupConfig.model_validate_json(job.cfg_json).seed, job.shard])
    return emb[np.sort(rng.choice(len(emb), job.quota, replace=False))]


def _assign(job: _Job) -> int:
    cols = [schema.UID, schema.IMAGE_EMBEDDING, schema.WIDTH, schema.HEIGHT, schema.CLIP_SCORE]
    t, emb = _embedded(job, cols)
    cluster = (emb @ job.centroids.T).argmax(axis=1).astype(np.int32) if len(emb) else np.zeros(0, np.int32)
    n = t.num_rows

    def num(name: str, fill: float) -> np.ndarray:
        if name not in t.column_names:
            return np.full(n, fill)
        return t.column(name).fill_null(fill).to_numpy(zero_copy_only=False).astype(np.float64)

    out = pa.table({
        "cluster": pa.array(cluster),
        "shard": pa.array(np.full(n, job.shard, np.int32)),
        "row": t.column("row"),
        schema.UID: t.column(schema.UID),
        "pixels": pa.array(num(schema.WIDTH, 0) * num(schema.HEIGHT, 0)),
        "clip": pa.array(num(schema.CLIP_SCORE, -2.0)),
        "emb": t.column(schema.IMAGE_EMBEDDING),
    })
    _write(Dataset(job.output_url), out, "assign", f"{job.shard:05d}.parquet")
    return n


def _write(ds: Dataset, table: pa.Table, *parts: str) -> None:
    ds.write_table(table, PLAN_DIR, SUB, *parts)


def _dedup_group(job: _Job) -> int:
    """Duplicates within the clusters of one group; writes drops/GGGGG.parquet, returns their count."""
    cfg = SemDedupConfig.model_validate_json(job.cfg_json)
    ds = Dataset(job.output_url)
    parts = []
    for n in job.shards:
        t = pq.read_table(ds.path(PLAN_DIR, SUB, "assign", f"{n:05d}.parquet"), filesystem=ds.fs)
        parts.append(t.filter(pa.array(t.column("cluster").to_numpy() % job.groups == job.group)))
    t = pa.concat_tables(parts) if parts else pa.table({})
    drops: dict[str, list] = {"shard": [], "row": [], schema.UID: [], schema.DUP_OF: [], "similarity": []}
    if t.num_rows:
        cluster = t.column("cluster").to_numpy()
        shard = t.column("shard").to_numpy()
        row = t.column("row").to_numpy()
        pixels = t.column("pixels").to_numpy()
        clip = t.column("clip").to_numpy()
        uids = t.column(schema.UID).to_pylist()
        col = t.column("emb").combine_chunks()
        emb = _unit(col.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(col), -1))
        position = shard.astype(np.int64) << 32 | row.astype(np.int64)
        if cfg.keep == "resolution":
            order = np.lexsort((position, -clip, -pixels, cluster))
        elif cfg.keep == "clip_score":
            order = np.lexsort((position, -pixels, -clip, cluster))
        else:
            order = np.lexsort((position, cluster))
        bounds = np.flatnonzero(np.diff(cluster[order])) + 1
        for members in np.split(order, bounds):
            for i, j, sim in _cluster_dups(emb[members], cfg.threshold):
                drops["shard"].append(int(shard[members[i]]))
                drops["row"].append(int(row[members[i]]))
                drops[schema.UID].append(uids[members[i]])
                drops[schema.DUP_OF].append(uids[members[j]])
                drops["similarity"].append(float(sim))
    out = pa.table({
        "shard": pa.array(drops["shard"], pa.int32()),
        "row": pa.array(drops["row"], pa.int32()),
        schema.UID: pa.array(drops[schema.UID], pa.string()),
        schema.DUP_OF: pa.array(drops[schema.DUP_OF], pa.string()),
        "similarity": pa.array(drops["similarity"], pa.float32()),
    })
    _write(ds, out, "drops", f"{job.group:05d}.parquet")
    return out.num_rows


def _cluster_dups(emb: np.ndarray, threshold: float) -> list[tuple[int, int, float]]:
    """(dropped, kept, similarity) for members in best-first order: each member similar to a kept
    earlier member is a duplicate of the most similar such member."""
    m = len(emb)
    if m < 2:
        return []
    # candidate pairs (i later than j) above the threshold, found block by block
    cand: dict[int, list[tuple[int, float]]] = {}
    for s in range(0, m, _BLOCK):
        e = min(m, s + _BLOCK)
        sims = emb[s:e] @ emb[:e].T
        ii, jj = np.nonzero(sims >= threshold)
        for a, b in zip(ii.tolist(), jj.tolist(), strict=True):
            i = s + a
            if b < i:
                cand.setdefault(i, []).append((b, float(sims[a, b])))
    kept = np.ones(m, dtype=bool)
    out = []
    for i in sorted(cand):
        best = max(((j, sim) for j, sim in cand[i] if kept[j]), key=lambda p: (p[1], -p[0]), default=None)
        if best is not None:
            kept[i] = False
            out.append((i, best[0], best[1]))
    return out
