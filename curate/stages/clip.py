"""clip: open_clip image-text scores and embeddings; threshold, global top-fraction and concept filters.

Per shard: read each row's image bytes through its pointer (``dataset.read_images``: one open per tar),
decode + preprocess exactly like open_clip (``curate.models.clip``: Pillow on CPU, DALI mixed on GPU),
encode images and captions in batches, and write ``clip_score`` = cosine(image, caption) as float32,
plus, if asked, the L2-normalised float16 ``image_embedding`` / ``text_embedding`` and a clip-retrieval
style ``.npy`` export. A row whose bytes do not decode is rejected ``clip:undecodable``; the rest of the
batch and the shard go on.

Filters (a row is dropped by the first that applies, in this order):
  - ``concepts``: prompts encoded with the same model; an image whose cosine to any prompt reaches
    ``concept_threshold`` is tagged in ``clip_concept`` and, with ``concept_action: drop``, rejected
    ``clip:concept`` (LAION-style removal of unwanted content).
  - ``min_score``: absolute threshold (LAION-2B: ViT-B/32 >= 0.28), ``clip:low_score``.
  - ``top_fraction``: keep exactly the best ``round(top_fraction * N)`` rows of the WHOLE input (DataComp's
    top 30%), N = rows that have a score; ties on the score are broken by uid, so the kept set is
    deterministic. ``clip:below_top_fraction``.

Why the top fraction is two-pass inside one stage: the threshold is a property of all scores, so no
shard can be decided before every shard is scored, and a shard must still be the unit of work and
resume. So ``plan`` first scores every input shard (``ctx.map``, one call per shard) into
``<plan_dir>/clip/scores/NNNNN.parquet`` (written atomically, skipped when present: an interrupted plan
resumes shard by shard), then finds the exact threshold with a three-pass radix select over those
files (histograms of the score's order-preserving 32-bit pattern, high 16 bits then low 16 bits, then
the uids tied at the threshold): memory stays at two 65,536-bin histograms plus the tied uids,
whatever N is, and every pass is a parallel map over shards. The per-shard apply then only reads the
cached scores; no model is loaded. Without ``top_fraction`` there is no plan and shards are scored in
the actor pool directly.

Score once, filter cheaply: when the input rows already carry ``clip_score`` from this same model (the
nearest clip stage up the input chain, read from the manifests, used the same ``model`` and
``pretrained``) and no concept filter asks for new work, the plan skips the scoring pass and selects
over the input's own ``clip_score`` column. So a GPU cluster scores in the actor pool (``clip`` without
``top_fraction``) and a second ``clip`` step with ``top_fraction`` (and any ``min_score``) only reads
Parquet.
"""

from __future__ import annotations

import functools
import io
import logging
import math
import time
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field, model_validator

from curate import schema
from curate.dataset import PLAN_DIR, Dataset, read_images, to_url, url_to_fs
from curate.stage import PlanContext, Resources, ShardContext, Stage, StageConfig

log = logging.getLogger(__name__)

NAME = "clip"
UNDECODABLE = schema.reason(NAME, "undecodable")
CONCEPT = schema.reason(NAME, "concept")
LOW_SCORE = schema.reason(NAME, "low_score")
BELOW_TOP = schema.reason(NAME, "below_top_fraction")

PLAN_SUBDIR = "clip"


class ClipConfig(StageConfig):
    # open_clip model: a built-in name with a `pretrained` tag or checkpoint file, "hf-hub:org/repo", or a
    # local model directory (open_clip_config.json + weights).
    model: str = "ViT-B-32"
    pretrained: str | None = "laion2b_s34b_b79k"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: fp32 on CPU, bf16/fp16 on GPU
    decoder: Literal["auto", "pil", "dali"] = "auto"  # auto: DALI mixed on GPU, Pillow on CPU
    # Pillow only: decode JPEGs in the DCT domain down to this multiple of the model's input size (1 to 8x
    # cheaper); None decodes at full size and gives open_clip's pixels exactly.
    jpeg_draft: float | None = Field(2.0, ge=1.0)
    batch_size: int = Field(256, ge=1)
    decode_threads: int | None = Field(None, ge=1)  # None: the worker's num_cpus
    min_score: float | None = Field(None, ge=-1.0, le=1.0)
    top_fraction: float | None = Field(None, gt=0.0, le=1.0)
    concepts: tuple[str, ...] = ()
    concept_threshold: float = Field(0.3, ge=-1.0, le=1.0)
    concept_action: Literal["drop", "tag"] = "drop"
    embeddings: bool = False  # write image_embedding / text_embedding columns
    # Also write kept rows' embeddings as clip-retrieval does: embeddings/{img_emb,text_emb}/*.npy (float16)
    # + embeddings/metadata/*.parquet, row-aligned, one file per shard.
    export_npy: bool = False
    resources: Resources = Resources(num_cpus=2)

    @model_validator(mode="after")
    def _check(self) -> ClipConfig:
        if not self.model.strip():
            raise ValueError("model must name an open_clip model, an hf-hub: id or a local model directory")
        return self


class ClipStage(Stage):
    name = NAME
    Config = ClipConfig
    uses_model = True

    config: ClipConfig

    def __init__(self, config: ClipConfig):
        super().__init__(config)
        self.clip = None
        self.decoder = None
        self.concept_emb: np.ndarray | None = None

    # -- model --------------------------------------------------------------------------------------
    def model_device(self, phase: str) -> str | None:
        # With top_fraction the model scores in the plan and the apply only reads those scores.
        wanted = "plan" if self.config.top_fraction is not None else "apply"
        return self.config.device if phase == wanted else None

    def models(self) -> list[tuple[str, str, str | None]]:
        return [("open_clip", self.config.model, self.config.pretrained)]

    def columns_after(self, columns: set[str]) -> set[str]:
        embeddings = {schema.IMAGE_EMBEDDING, schema.TEXT_EMBEDDING}
        # without embeddings: true the output drops them, even those the input carried
        return (columns | {schema.CLIP_SCORE} | embeddings) if self.config.embeddings \
            else (columns | {schema.CLIP_SCORE}) - embeddings

    def setup(self) -> None:
        # With top_fraction the plan already scored every shard; the apply only reads those scores.
        if self.config.top_fraction is None:
            self.load_model()

    def load_model(self) -> None:
        if self.clip is not None:
            return
        from curate.models import clip as clipmod

        cfg = self.config
        self.clip = clipmod.load_clip(cfg.model, cfg.pretrained, device=cfg.device, precision=cfg.precision)
        threads = cfg.decode_threads or max(1, int(cfg.resources.num_cpus))
        on_gpu = self.clip.device.startswith("cuda")
        if cfg.decoder == "dali" or (cfg.decoder == "auto" and on_gpu):
            device_id = int(self.clip.device.split(":")[1]) if ":" in self.clip.device else 0
            # Formats DALI cannot decode (GIF) take the Pillow path, so they score as on a CPU worker.
            fallback = clipmod.PilDecoder(self.clip.preprocess, threads=1, draft=cfg.jpeg_draft,
                                          reference=self.clip.reference_transform)
            self.decoder = clipmod.DaliDecoder(self.clip.preprocess, device="gpu" if on_gpu else "cpu",
                                               batch_size=cfg.batch_size, threads=threads, device_id=device_id,
                                               fallback=fallback)
        else:
            self.decoder = clipmod.PilDecoder(self.clip.preprocess, threads=threads, draft=cfg.jpeg_draft,
                                              reference=self.clip.reference_transform)
        if cfg.concepts:
            self.concept_emb = self.clip.encode_texts(list(cfg.concepts))

    # -- scoring ------------------------------------------------------------------------------------
    def score(self, table: pa.Table, ds: Dataset, ctx: ShardContext | None = None) -> pa.Table:
        """New columns for ``table``'s rows (rows of ``ds``): clip_score (null if undecodable), embeddings, clip_concept."""
        from curate.models.clip import embed_images

        self.load_model()
        cfg = self.config
        t0 = time.perf_counter()
        images = read_images(table, ds)
        t1 = time.perf_counter()
        img, ok = embed_images(self.clip, images, self.decoder, cfg.batch_size)
        t2 = time.perf_counter()
        captions = [c or "" for c in table.column(schema.CAPTION).to_pylist()] \
            if schema.CAPTION in table.column_names else [""] * table.num_rows
        txt = self.clip.encode_texts(captions, cfg.batch_size)
        t3 = time.perf_counter()
        if ctx is not None:
            ctx.add_time("read", t1 - t0)
            ctx.add_time("images", t2 - t1)
            ctx.add_time("texts", t3 - t2)
        scores = (img * txt).sum(axis=1).astype(np.float32)
        cols: dict[str, pa.Array] = {
            schema.CLIP_SCORE: pa.array(scores, type=pa.float32(), mask=~ok),
        }
        if cfg.embeddings or cfg.export_npy:
            cols[schema.IMAGE_EMBEDDING] = _embedding_array(img, ok)
            cols[schema.TEXT_EMBEDDING] = _embedding_array(txt, np.ones(len(txt), bool))
        if self.concept_emb is not None:
            sims = img @ self.concept_emb.T
            best = sims.argmax(axis=1)
            hit = ok & (sims[np.arange(len(best)), best] >= cfg.concept_threshold)
            cols[schema.CLIP_CONCEPT] = pa.array(
                [cfg.concepts[b] if h else None for b, h in zip(best, hit, strict=True)], type=pa.string())
        return pa.table(cols)

    # -- global top fraction ------------------------------------------------------------------------
    def plan(self, ctx: PlanContext) -> list[int] | None:
        if self.config.top_fraction is None:
            return None
        assert ctx.input is not None
        shards = ctx.input.shard_ids()
        if self.scores_in_input(ctx.input):
            files = [to_url(ctx.input.fs, ctx.input.shard_path(n, "parquet")) for n in shards]
            threshold = top_threshold(files, self.config.top_fraction, ctx.map)
            threshold["source"] = "input"
            ctx.output.write_json(threshold, PLAN_DIR, PLAN_SUBDIR, "threshold.json")
            log.info("clip top_fraction %s over the input's own scores: keep %d of %d", self.config.top_fraction,
                     threshold["keep"], threshold["scored"])
            return shards
        cfg_json = self.config.model_dump_json()
        t = time.perf_counter()
        # model=True: a pool of actors that each load the model once (a GPU each where the model uses
        # one); the apply that follows reads the cached scores and needs no model at all.
        scored = ctx.map(_score_shard, [(cfg_json, ctx.input.url, ctx.output.url, n) for n in shards], model=True)
        t_score = time.perf_counter() - t
        files = [ctx.output.url_of(*_score_file(ctx.input, n)) for n in shards]
        threshold = top_threshold(files, self.config.top_fraction, ctx.map)
        threshold["score_seconds"] = t_score
        # where the scores were computed ("cuda:0", "cpu"; None: a previous attempt's file was reused)
        threshold["score_devices"] = sorted({str(d) for _, d in scored})
        threshold["source"] = "plan"
        ctx.output.write_json(threshold, PLAN_DIR, PLAN_SUBDIR, "threshold.json")
        log.info("clip top_fraction %s: keep %d of %d scored rows (threshold %s)", self.config.top_fraction,
                 threshold["keep"], threshold["scored"], threshold["score"])
        return shards

    # -- per shard ----------------------------------------------------------------------------------
    def process(self, table: pa.Table, ctx: ShardContext) -> pa.Table:
        cfg = self.config
        if cfg.top_fraction is None:
            scored = self.score(table, ctx.input, ctx)
            threshold = None
        else:
            threshold = ctx.output.read_json(PLAN_DIR, PLAN_SUBDIR, "threshold.json")
            if threshold is None:
                raise RuntimeError(f"{ctx.output.url}: clip threshold.json missing; rerun with --overwrite")
            if threshold["source"] == "input":
                scored = pa.table({})  # the input's own clip_score (and embeddings) stay as they are
            else:
                assert ctx.input is not None
                path = ctx.output.path(*_score_file(ctx.input, ctx.shard))
                scored = pq.read_table(path, filesystem=ctx.output.fs)
                if scored.column(schema.UID).to_pylist() != table.column(schema.UID).to_pylist():
                    raise RuntimeError(f"plan scores {path} do not match input shard {ctx.shard}; "
                                       "rerun with --overwrite")
                scored = scored.drop_columns([schema.UID])

        for name in scored.column_names:
            table = schema.with_column(table, name, scored.column(name), scored.schema.field(name).type)
        reasons = self._reasons(table, threshold)
        table = schema.with_column(table, schema.DROP_REASON, pa.array(reasons, type=pa.string()))
        counts: dict[str, int] = {}
        for r in reasons:
            if r is not None:
                counts[r] = counts.get(r, 0) + 1
        ctx.stats["clip"] = {"model": cfg.model, "pretrained": cfg.pretrained, "drops": counts,
                             "device": self.clip.device if self.clip is not None else None}
        if cfg.export_npy:
            self._export_npy(table, ctx)
        if not cfg.embeddings:
            table = table.drop_columns([c for c in (schema.IMAGE_EMBEDDING, schema.TEXT_EMBEDDING)
                                        if c in table.column_names])
        return table

    def scores_in_input(self, inp: Dataset) -> bool:
        """Whether the input rows already hold what this run would compute (see module docstring)."""
        cfg = self.config
        names = (inp.schema() or pa.schema([])).names
        if cfg.concepts or schema.CLIP_SCORE not in names:
            return False
        if (cfg.embeddings or cfg.export_npy) and not {schema.IMAGE_EMBEDDING, schema.TEXT_EMBEDDING} <= set(names):
            return False
        from curate.lineage import lineage

        manifest = next((d.manifest() for d in lineage(inp).datasets if (d.manifest() or {}).get("stage") == NAME),
                        None)
        if manifest is None:
            return False
        made = manifest.get("config") or {}
        return (made.get("model"), made.get("pretrained")) == (cfg.model, cfg.pretrained)

    def _reasons(self, table: pa.Table, threshold: dict[str, Any] | None) -> list[str | None]:
        cfg = self.config
        n = table.num_rows
        score_col = table.column(schema.CLIP_SCORE)
        undecodable = pc.is_null(score_col).to_numpy(zero_copy_only=False)
        scores = score_col.fill_null(0.0).to_numpy().astype(np.float32)
        reasons: list[str | None] = [None] * n
        concept = table.column(schema.CLIP_CONCEPT).to_pylist() if schema.CLIP_CONCEPT in table.column_names \
            else [None] * n
        top_keep = keep_top(scores, table.column(schema.UID).to_pylist(), threshold) if threshold else None
        for i in range(n):
            if undecodable[i]:
                reasons[i] = UNDECODABLE
            elif concept[i] is not None and cfg.concept_action == "drop":
                reasons[i] = CONCEPT
            elif cfg.min_score is not None and scores[i] < cfg.min_score:
                reasons[i] = LOW_SCORE
            elif top_keep is not None and not top_keep[i]:
                reasons[i] = BELOW_TOP
        return reasons

    def _export_npy(self, table: pa.Table, ctx: ShardContext) -> None:
        kept = table.filter(pc.is_null(table.column(schema.DROP_REASON)))
        name = ctx.output.shard_name(ctx.shard)
        for col, folder in ((schema.IMAGE_EMBEDDING, "img_emb"), (schema.TEXT_EMBEDDING, "text_emb")):
            arr = _embeddings_numpy(kept.column(col), self._dim(table, col))
            buf = io.BytesIO()
            np.save(buf, arr)
            ctx.output.write_bytes(buf.getvalue(), "embeddings", folder, f"{folder}_{name}.npy")
        meta_cols = [c for c in (schema.UID, schema.KEY, schema.URL, schema.CAPTION, schema.CLIP_SCORE)
                     if c in kept.column_names]
        buf = io.BytesIO()
        pq.write_table(kept.select(meta_cols), buf, compression="zstd")
        ctx.output.write_bytes(buf.getvalue(), "embeddings", "metadata", f"metadata_{name}.parquet")

    def explain(self, output: Dataset, uid: str) -> dict[str, Any] | None:
        cfg = self.config
        info: dict[str, Any] = {
            "model": cfg.model, "pretrained": cfg.pretrained, "min_score": cfg.min_score,
            "concepts": list(cfg.concepts), "concept_threshold": cfg.concept_threshold,
            "concept_action": cfg.concept_action,
        }
        if cfg.top_fraction is not None:
            th = output.read_json(PLAN_DIR, PLAN_SUBDIR, "threshold.json") or {}
            info["top_fraction"] = {
                "fraction": cfg.top_fraction, "keep": th.get("keep"), "of_scored": th.get("scored"),
                "threshold_score": th.get("score"),
                "note": "kept iff score > threshold_score, or == it and uid <= tie_break_uid",
                "tie_break_uid": th.get("uid"),
            }
        return info

    @staticmethod
    def _dim(table: pa.Table, col: str) -> int:
        return table.schema.field(col).type.list_size


# -- helpers ------------------------------------------------------------------------------------------
def _score_file(inp: Dataset, n: int) -> tuple[str, ...]:
    return (PLAN_DIR, PLAN_SUBDIR, "scores", f"{inp.shard_name(n)}.parquet")


def _embedding_array(x: np.ndarray, ok: np.ndarray) -> pa.Array:
    n, dim = x.shape
    flat = pa.array(x.astype(np.float16).reshape(-1), type=pa.float16())
    arr = pa.FixedSizeListArray.from_arrays(flat, dim)
    if not ok.all():
        arr = pc.if_else(pa.array(ok), arr, pa.nulls(n, arr.type))
    return arr.cast(schema.embedding_type(dim))


def _embeddings_numpy(col: pa.ChunkedArray, dim: int) -> np.ndarray:
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if len(arr) == 0:
        return np.zeros((0, dim), np.float16)
    return arr.flatten().to_numpy(zero_copy_only=False).astype(np.float16).reshape(len(arr), dim)


@functools.lru_cache(maxsize=2)
def _worker_stage(cfg_json: str) -> ClipStage:
    """One loaded model per plan worker process, reused by every shard that process scores."""
    stage = ClipStage(ClipConfig.model_validate_json(cfg_json))
    stage.load_model()
    return stage


def _score_shard(item: tuple[str, str, str, int]) -> tuple[int, str | None]:
    """Plan step: score input shard ``n`` into the output's plan dir unless a previous attempt already did;
    returns (n, the model's device, or None when the file was there)."""
    cfg_json, input_url, output_url, n = item
    inp = Dataset(input_url)
    out = Dataset(output_url)
    name = _score_file(inp, n)
    if out.exists(*name):
        return n, None
    table = inp.read_shard(n)
    stage = _worker_stage(cfg_json)
    scored = stage.score(table, inp)
    scored = scored.add_column(0, schema.UID, table.column(schema.UID))
    buf = io.BytesIO()
    pq.write_table(scored, buf, compression="zstd")
    out.write_bytes(buf.getvalue(), *name)
    return n, stage.clip.device


# -- exact global top-k over score files: radix select on the float32 bit pattern ------------------------
def sortable_bits(scores: np.ndarray) -> np.ndarray:
    """uint32 keys that sort like the float32 scores (IEEE trick: flip all bits of negatives, sign of others)."""
    bits = np.ascontiguousarray(scores, dtype=np.float32).view(np.uint32)
    return np.where(bits & 0x80000000, ~bits, bits | 0x80000000).astype(np.uint32)


def _scored(path: str) -> tuple[np.ndarray, pa.ChunkedArray]:
    fs, p = url_to_fs(path)
    t = pq.read_table(p, columns=[schema.UID, schema.CLIP_SCORE], filesystem=fs)
    t = t.filter(pc.is_valid(t.column(schema.CLIP_SCORE)))
    return sortable_bits(t.column(schema.CLIP_SCORE).to_numpy()), t.column(schema.UID)


def _hist_high(path: str) -> tuple[np.ndarray, np.ndarray]:
    keys, _ = _scored(path)
    return np.unique(keys >> 16, return_counts=True)


def _hist_low(item: tuple[int, str]) -> tuple[np.ndarray, np.ndarray]:
    high, path = item
    keys, _ = _scored(path)
    return np.unique(keys[(keys >> 16) == high] & 0xFFFF, return_counts=True)


def _tied_uids(item: tuple[int, str]) -> list[str]:
    key, path = item
    keys, uids = _scored(path)
    return uids.filter(pa.array(keys == key)).to_pylist()


def _merge(parts: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    total = np.zeros(1 << 16, np.int64)
    for values, counts in parts:
        np.add.at(total, values.astype(np.int64), counts)
    return total


def _descend(hist: np.ndarray, k: int, above: int) -> tuple[int, int]:
    """The bin holding the k-th largest item (1-based) given ``above`` items in higher bins; and the count
    of items in bins above it (including ``above``)."""
    cum = above + np.cumsum(hist[::-1])
    idx = int(np.searchsorted(cum, k))  # first position (from the top) where the running count reaches k
    b = len(hist) - 1 - idx
    return b, above + int(hist[b + 1:].sum())


def top_threshold(files: list[str], fraction: float, map_fn=None) -> dict[str, Any]:
    """Exact threshold keeping the best ``round(fraction * N)`` scored rows over all ``files``.

    Order: clip_score descending, then uid ascending. Returns {"keep", "scored", "key", "uid", "score"}:
    a row is kept iff its sortable key > key, or == key and uid <= uid. Three map passes over the files.
    """
    run = map_fn or (lambda fn, items: [fn(i) for i in items])
    high = _merge(run(_hist_high, files))
    n = int(high.sum())
    k = min(n, math.floor(fraction * n + 0.5))
    if k == 0:
        return {"keep": 0, "scored": n, "key": None, "uid": None, "score": None}
    b1, above = _descend(high, k, 0)
    low = _merge(run(_hist_low, [(b1, f) for f in files]))
    b2, above = _descend(low, k, above)
    key = (b1 << 16) | b2
    tied = sorted(u for part in run(_tied_uids, [(key, f) for f in files]) for u in part)
    uid = tied[k - above - 1]
    bits = key & 0x7FFFFFFF if key & 0x80000000 else ~key & 0xFFFFFFFF
    score = float(np.array([bits], np.uint32).view(np.float32)[0])
    return {"keep": k, "scored": n, "key": key, "uid": uid, "score": score}


def keep_top(scores: np.ndarray, uids: list[str], threshold: dict[str, Any]) -> np.ndarray:
    """Which rows the global threshold keeps (rows without a score are never passed here as kept)."""
    if threshold["key"] is None:
        return np.zeros(len(uids), bool)
    keys = sortable_bits(scores)
    key, uid = int(threshold["key"]), threshold["uid"]
    return (keys > key) | ((keys == key) & np.array([u <= uid for u in uids], dtype=bool))


