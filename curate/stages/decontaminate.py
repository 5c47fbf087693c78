"""decontaminate: drop corpus samples that are copies of evaluation images (ImageNet, COCO, Flickr30k...).

``curate decontaminate --input DS --output OUT --set reference=PATH`` (or ``reference: {name: PATH,
...}`` / a list of ``{name, path}``). A reference set is a folder of images (searched recursively),
WebDataset tars (a ``.tar`` file or a folder of them) or a curate dataset (rows point at their
bytes; its ``phash`` and ``image_embedding`` columns are used where present).

Plan (once, on the driver): every reference image is hashed (pHash, ``curate.phash``) into
``_plan/decontaminate/reference.parquet`` (set, item, phash, embedding) with a summary per set in
``references.json``. The reference side is small (an evaluation set is 1e3-1e5 images), so it is
held in memory by every worker; the corpus is streamed shard by shard against it, like dedup's
multi-index hashing but one-sided (``curate.hashindex``: per table, sorted reference keys and a
binary search per corpus hash, candidates verified by their full distance, so exact).

Per row, in order: a pHash within ``radius`` bits of a reference image (a resized, recompressed or
lightly edited copy) -> ``decontaminate:<set>``; else, when the corpus has ``image_embedding`` and
the reference set has embeddings of the same width, a cosine >= ``clip_threshold`` ->
``decontaminate:<set>``. The matched item is in ``decontam_match`` (``set:item``) with the distance
or cosine beside it. A row that neither check could look at (its image does not hash and it has no
comparable embedding) cannot be cleared and is dropped as ``decontaminate:unchecked``
(``unchecked: keep`` keeps it).
"""

from __future__ import annotations

import logging
import posixpath
import time
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field, field_validator

from curate import schema
from curate.config import ConfigError
from curate.dataset import PLAN_DIR, Dataset, read_images, url_to_fs
from curate.stage import Frozen, PlanContext, ShardContext, Stage, StageConfig

log = logging.getLogger(__name__)

NAME = "decontaminate"
UNCHECKED = schema.reason(NAME, "unchecked")
PLAN_SUBDIR = "decontaminate"
REFERENCE_FILE = "reference.parquet"
SUMMARY_FILE = "references.json"
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp")
_SET, _ITEM, _HASH, _EMB = "set", "item", "phash", "embedding"


class Reference(Frozen):
    name: str
    path: str


class DecontaminateConfig(StageConfig):
    # PATH, {name: PATH}, or [{name, path}]; a bare PATH is named after its last path component.
    reference: list[Reference]
    radius: int = Field(4, ge=0, le=16)  # pHash Hamming radius
    clip_threshold: float | None = Field(0.95, ge=-1.0, le=1.0)  # None: pHash only
    unchecked: Literal["drop", "keep"] = "drop"

    @field_validator("reference", mode="before")
    @classmethod
    def _refs(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [v]
        if isinstance(v, dict):
            return [{"name": k, "path": p} for k, p in v.items()]
        if isinstance(v, list):
            out = []
            for x in v:
                if isinstance(x, str):
                    out.append({"name": posixpath.basename(x.rstrip("/")).split(".")[0] or "reference", "path": x})
                else:
                    out.append(x)
            return out
        return v

    @field_validator("reference")
    @classmethod
    def _unique(cls, v: list[Reference]) -> list[Reference]:
        if not v:
            raise ValueError("give at least one reference set")
        names = [r.name for r in v]
        if len(set(names)) != len(names):
            raise ValueError(f"reference sets need distinct names, got {names}")
        for n in names:
            if not n or ":" in n or "/" in n:
                raise ValueError(f"reference set name {n!r} must be non-empty, without ':' or '/'")
        return v


# -- reference sets --------------------------------------------------------------------------------
def _kind(path: str) -> str:
    """'dataset', 'tar', 'tars' (a folder of tars), 'images' (a folder) or 'image' (one file)."""
    fs, p = url_to_fs(path)
    if not fs.exists(p):
        return "missing"
    if fs.isdir(p):
        if fs.exists(posixpath.join(p, "_manifest.json")):
            return "dataset"
        if fs.glob(posixpath.join(p, "*.tar")):
            return "tars"
        return "images"
    return "tar" if p.endswith(".tar") else "image"


def _image_files(path: str) -> list[str]:
    fs, p = url_to_fs(path)
    if not fs.isdir(p):
        return [p] if p.lower().endswith(IMAGE_EXTS) else []
    return sorted(f for f in fs.find(p) if f.lower().endswith(IMAGE_EXTS))


def _tar_files(path: str) -> list[str]:
    fs, p = url_to_fs(path)
    return [p] if not fs.isdir(p) else sorted(fs.glob(posixpath.join(p, "*.tar")))


def count_items(ref: Reference) -> int:
    """How many images a reference set offers (cheap: listing, tar headers, manifest totals)."""
    from curate.wds import iter_tar

    kind = _kind(ref.path)
    if kind == "missing":
        raise ConfigError(f"decontaminate: reference set {ref.name!r}: {ref.path} does not exist")
    if kind == "dataset":
        return int((Dataset(ref.path).manifest() or {}).get("totals", {}).get("kept", 0))
    if kind in ("tar", "tars"):
        fs, _ = url_to_fs(ref.path)
        n = 0
        for t in _tar_files(ref.path):
            with fs.open(t, "rb") as f:
                n += sum(1 for m in iter_tar(f) if m.name.lower().endswith(IMAGE_EXTS))
        return n
    return len(_image_files(ref.path))


def _iter_blobs(ref: Reference, batch: int = 256):
    """Batches of (items, blobs, phashes-or-None, embeddings-or-None) of one reference set."""
    from curate.wds import iter_tar

    kind = _kind(ref.path)
    fs, root = url_to_fs(ref.path)
    if kind == "dataset":
        ds = Dataset(ref.path)
        for _, t in ds.iter_shards():
            hashes = t.column(schema.PHASH).to_pylist() if schema.PHASH in t.column_names else None
            emb = t.column(schema.IMAGE_EMBEDDING) if schema.IMAGE_EMBEDDING in t.column_names else None
            blobs = read_images(t, ds) if hashes is None or any(h is None for h in hashes) else [None] * t.num_rows
            yield t.column(schema.UID).to_pylist(), blobs, hashes, emb
        return
    if kind in ("tar", "tars"):
        for tar in _tar_files(ref.path):
            items, blobs = [], []
            with fs.open(tar, "rb") as f:
                members = [m for m in iter_tar(f) if m.name.lower().endswith(IMAGE_EXTS)]
                for m in members:
                    f.seek(m.offset)
                    items.append(f"{posixpath.basename(tar)}/{m.name}")
                    blobs.append(f.read(m.size))
                    if len(items) == batch:
                        yield items, blobs, None, None
                        items, blobs = [], []
            if items:
                yield items, blobs, None, None
        return
    files = _image_files(ref.path)
    base = root if fs.isdir(root) else posixpath.dirname(root)
    for i in range(0, len(files), batch):
        chunk = files[i:i + batch]
        blobs = []
        for f in chunk:
            with fs.open(f, "rb") as fh:
                blobs.append(fh.read())
        yield [posixpath.relpath(f, base) for f in chunk], blobs, None, None


def build_reference(refs: list[Reference]) -> tuple[pa.Table, dict[str, Any]]:
    """The reference table (set, item, phash, embedding) and a per-set summary."""
    from curate.phash import phash_bytes

    sets, items, hashes, embs = [], [], [], []
    summary: dict[str, Any] = {}
    dim = None
    for ref in refs:
        n = hashed = with_emb = 0
        for its, blobs, given, emb in _iter_blobs(ref):
            computed = phash_bytes([b if (given is None or given[i] is None) else None for i, b in enumerate(blobs)])
            hs = [given[i] if given is not None and given[i] is not None else computed[i] for i in range(len(its))]
            vecs: list[Any] = [None] * len(its)
            if emb is not None:
                dim = emb.type.list_size
                vecs = emb.to_pylist()
            sets += [ref.name] * len(its)
            items += its
            hashes += hs
            embs += vecs
            n += len(its)
            hashed += sum(h is not None for h in hs)
            with_emb += sum(v is not None for v in vecs)
        summary[ref.name] = {"path": ref.path, "kind": _kind(ref.path), "items": n, "hashed": hashed,
                             "undecodable": n - hashed, "embeddings": with_emb}
        if n - hashed:
            log.warning("decontaminate: %d of %d images of reference set %r do not decode; they are not checked",
                        n - hashed, n, ref.name)
    cols: dict[str, Any] = {_SET: pa.array(sets, pa.string()), _ITEM: pa.array(items, pa.string()),
                            _HASH: pa.array(hashes, pa.uint64())}
    if dim is not None:
        cols[_EMB] = pa.array(embs, schema.embedding_type(dim))
    return pa.table(cols), summary


# -- the stage -------------------------------------------------------------------------------------
class DecontaminateStage(Stage):
    name = NAME
    Config = DecontaminateConfig

    config: DecontaminateConfig

    def __init__(self, config: DecontaminateConfig):
        super().__init__(config)
        self._ref: dict[str, Any] | None = None

    def check(self, input: Dataset | None) -> None:
        for ref in self.config.reference:
            if count_items(ref) == 0:
                raise ConfigError(f"decontaminate: reference set {ref.name!r} ({ref.path}) holds no images; "
                                  "point it at a folder of images, WebDataset tars or a curate dataset")

    def plan(self, ctx: PlanContext) -> list[int] | None:
        t = time.perf_counter()
        table, summary = build_reference(list(self.config.reference))
        if not any(s["hashed"] or s["embeddings"] for s in summary.values()):
            raise ConfigError("decontaminate: no reference image decodes and none has an embedding; "
                              "nothing to check against")
        out = ctx.output
        out.write_table(table, PLAN_DIR, PLAN_SUBDIR, REFERENCE_FILE)
        summary = {"sets": summary, "radius": self.config.radius, "clip_threshold": self.config.clip_threshold,
                   "seconds": time.perf_counter() - t}
        out.write_json(summary, PLAN_DIR, PLAN_SUBDIR, SUMMARY_FILE)
        log.info("decontaminate: %d reference images in %d set(s)", table.num_rows, len(summary["sets"]))
        return None

    def _reference(self, out: Dataset) -> dict[str, Any]:
        if self._ref is None:
            from curate.hashindex import HashIndex

            path = out.path(PLAN_DIR, PLAN_SUBDIR, REFERENCE_FILE)
            if not out.fs.exists(path):
                raise RuntimeError(f"{out.url}: decontaminate reference {REFERENCE_FILE} is missing; rerun with --overwrite")
            t = pq.read_table(path, filesystem=out.fs)
            labels = [f"{s}:{i}" for s, i in zip(t.column(_SET).to_pylist(), t.column(_ITEM).to_pylist(), strict=True)]
            sets = t.column(_SET).to_pylist()
            hashes = t.column(_HASH).to_pylist()
            hashed = [j for j, h in enumerate(hashes) if h is not None]
            ref: dict[str, Any] = {
                "labels": labels, "sets": sets, "hashed": np.array(hashed, dtype=np.int64),
                "index": HashIndex(np.array([hashes[j] for j in hashed], dtype=np.uint64), self.config.radius),
                "emb": None,
            }
            if _EMB in t.column_names and t.column(_EMB).null_count < t.num_rows:
                from curate.stages.safety import embedding_matrix

                x, ok = embedding_matrix(t.column(_EMB))
                ref["emb"], ref["emb_rows"] = x[ok], np.flatnonzero(ok)
            self._ref = ref
        return self._ref

    def process(self, table: pa.Table, ctx: ShardContext) -> pa.Table:
        from curate.phash import phash_bytes

        cfg = self.config
        ref = self._reference(ctx.output)
        n = table.num_rows
        hashes = table.column(schema.PHASH).to_pylist() if schema.PHASH in table.column_names else [None] * n
        todo = [i for i, h in enumerate(hashes) if h is None]
        if todo:
            t = time.perf_counter()
            for i, h in zip(todo, phash_bytes(read_images(table.take(todo), ctx.input)), strict=True):
                hashes[i] = h
            ctx.add_time("phash", time.perf_counter() - t)
        have = np.array([h is not None for h in hashes], dtype=bool)
        q = np.array([h if h is not None else 0 for h in hashes], dtype=np.uint64)
        hit, dist = ref["index"].query(q)
        hit[~have] = -1
        reasons: list[str | None] = [None] * n
        match: list[str | None] = [None] * n
        distance: list[int | None] = [None] * n
        cosine: list[float | None] = [None] * n
        hits: dict[str, int] = {}
        for i in np.flatnonzero(hit >= 0):
            j = int(ref["hashed"][hit[i]])
            reasons[i], match[i], distance[i] = schema.reason(NAME, ref["sets"][j]), ref["labels"][j], int(dist[i])
        checked = have.copy()
        if ref["emb"] is not None and cfg.clip_threshold is not None and schema.IMAGE_EMBEDDING in table.column_names:
            from curate.stages.safety import embedding_matrix

            x, ok = embedding_matrix(table.column(schema.IMAGE_EMBEDDING))
            if x.shape[1] == ref["emb"].shape[1]:
                checked |= ok
                sims = x @ ref["emb"].T
                best = sims.argmax(axis=1)
                top = sims[np.arange(n), best]
                for i in np.flatnonzero(ok & (top >= cfg.clip_threshold)):
                    if reasons[i] is None:
                        j = int(ref["emb_rows"][best[i]])
                        reasons[i], match[i], cosine[i] = schema.reason(NAME, ref["sets"][j]), ref["labels"][j], \
                            float(top[i])
            else:
                log.warning("decontaminate: corpus embeddings are %d-d, reference %d-d; cosine check skipped",
                            x.shape[1], ref["emb"].shape[1])
        for i in np.flatnonzero(~checked):
            if reasons[i] is None and cfg.unchecked == "drop":
                reasons[i] = UNCHECKED
        for r in reasons:
            if r is not None:
                hits[r] = hits.get(r, 0) + 1
        table = schema.with_column(table, schema.DECONTAM_MATCH, pa.array(match, pa.string()))
        table = schema.with_column(table, schema.DECONTAM_PHASH_DISTANCE, pa.array(distance, pa.int32()))
        table = schema.with_column(table, schema.DECONTAM_COSINE, pa.array(cosine, pa.float32()))
        table = schema.with_column(table, schema.DROP_REASON, pa.array(reasons, pa.string()))
        ctx.stats[NAME] = {"hits": hits}
        return table

    def explain(self, output: Dataset, uid: str) -> dict[str, Any] | None:
        return {"references": (output.read_json(PLAN_DIR, PLAN_SUBDIR, SUMMARY_FILE) or {}).get("sets"),
                "radius": self.config.radius, "clip_threshold": self.config.clip_threshold}


def hits_table(ds: Dataset) -> list[dict[str, Any]] | None:
    """Per reference set of a decontaminate output: path, images, hits (for the report)."""
    summary = ds.read_json(PLAN_DIR, PLAN_SUBDIR, SUMMARY_FILE)
    manifest = ds.manifest() or {}
    if summary is None or manifest.get("stage") != NAME:
        return None
    drops = manifest.get("totals", {}).get("drops", {})
    return [{"reference": name, "path": s["path"], "images": s["items"], "undecodable": s["undecodable"],
             "hits": int(drops.get(schema.reason(NAME, name), 0))} for name, s in summary["sets"].items()]

